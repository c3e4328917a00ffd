"""Two local processes joined by jax.distributed (gloo CPU collectives) == one process."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from ssl_us import parallel, train
from tests import fixtures, test_train

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
  data = fixtures.write_dataset(str(tmp_path / "data"), num_videos=8, frames=4)
  port = _free_port()
  # No persistent compilation cache: a cache hit in one process and a compile in the other
  # desynchronises the processes' collectives.
  env = {k: v for k, v in os.environ.items()
         if k != "XLA_FLAGS" and not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), "2", str(port), data,
       str(tmp_path / "wd"), str(tmp_path / f"out{i}.json")],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=900)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[:4000] + "\n...\n" + log[-2000:]
  outs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
  assert outs[0]["devices"] == 8 and outs[0]["local"] == 4
  np.testing.assert_allclose(outs[0]["loss"], outs[1]["loss"])
  # The same global batches on one process with 8 devices.
  single = train.train_and_evaluate(test_train.tiny_config(data, num_steps=3),
                                    str(tmp_path / "single"), mesh=parallel.make_mesh(8))
  np.testing.assert_allclose(outs[0]["loss"], single["loss"], rtol=2e-5)
  # Both processes' iterator states were checkpointed.
  step_dir = tmp_path / "wd" / "checkpoints" / "3" / "data"
  assert len([f for f in os.listdir(step_dir) if "process" in f]) == 2, os.listdir(step_dir)
