"""One process of the two-process tests (tests/test_multihost.py); not a test by itself.

  python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_DIR WORKDIR OUT_JSON \
      [NUM_STEPS NUM_WORKERS PACE_S CKPT_EVERY KEEP_CHECKPOINTS FAIL_AT_STEP]

Each process has 4 fake CPU devices; jax.distributed joins them into one 8-device mesh with gloo
CPU collectives. Trains test_train's tiny config (NUM_STEPS, default 3; checkpoints every
CKPT_EVERY steps, default 3, and at the end, keeping KEEP_CHECKPOINTS, default the config's 3;
NUM_WORKERS grain worker processes, default 0), resuming from WORKDIR,
prints every log line (then sleeps PACE_S, so a test can signal it at a chosen step) and when it
reads shards to index them, and writes the history to OUT_JSON. Process 1 raises a
RuntimeError after logging step FAIL_AT_STEP (default: none). The run is in
parallel.fail_fast(), as in python -m ssl_us.main.
"""
import json
import os
import sys
import time


def main(pid, nproc, port, data_dir, workdir, out, num_steps="3", num_workers="0", pace="0",
         ckpt_every="3", keep_checkpoints="", fail_at_step=""):
  os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=4 "
                             + os.environ.get("SSL_US_TEST_XLA_FLAGS", ""))
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=int(nproc), process_id=int(pid))

  from ssl_us import input_pipeline, parallel, train  # pylint: disable=g-import-not-at-top
  from tests import test_train  # pylint: disable=g-import-not-at-top

  build_index = input_pipeline._build_index  # pylint: disable=protected-access
  def say_when_indexing(dataset_dir, split, *args):
    print(f"process {pid} indexes the {split} shards", flush=True)
    return build_index(dataset_dir, split, *args)
  input_pipeline._build_index = say_when_indexing  # pylint: disable=protected-access

  def log(msg):
    print(msg, flush=True)
    if pid == "1" and fail_at_step and msg.startswith(f"step {fail_at_step}/"):
      raise RuntimeError(f"process 1 fails after step {fail_at_step}")
    time.sleep(float(pace))

  config = test_train.tiny_config(data_dir, num_steps=int(num_steps), ckpt_every=int(ckpt_every))
  if keep_checkpoints:
    config.keep_checkpoints = int(keep_checkpoints)
  config.data.num_workers = int(num_workers)
  with parallel.fail_fast():
    history = train.train_and_evaluate(config, workdir, mesh=parallel.make_mesh(), log_fn=log)
  with open(out, "w") as f:
    json.dump(dict(history, devices=jax.device_count(), local=jax.local_device_count()), f)
  jax.distributed.shutdown()


if __name__ == "__main__":  # grain starts its worker processes with spawn
  main(*sys.argv[1:])
