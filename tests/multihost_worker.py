"""One process of the two-process test (tests/test_multihost.py); not a test by itself.

  python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_DIR WORKDIR OUT_JSON

Each process has 4 fake CPU devices; jax.distributed joins them into one 8-device mesh with gloo
CPU collectives. Trains a few steps, checkpoints, and writes the logged losses.
"""
import json
import os
import sys

pid, nproc, port, data_dir, workdir, out = sys.argv[1:7]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                           num_processes=int(nproc), process_id=int(pid))

from ssl_us import parallel, train  # noqa: E402
from tests import test_train  # noqa: E402

config = test_train.tiny_config(data_dir, num_steps=3)
history = train.train_and_evaluate(config, workdir, mesh=parallel.make_mesh())
with open(out, "w") as f:
  json.dump({"loss": history["loss"], "devices": jax.device_count(),
             "local": jax.local_device_count()}, f)
jax.distributed.shutdown()
