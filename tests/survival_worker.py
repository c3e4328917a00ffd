"""One pretraining run for tests/test_survival.py, to be signalled or killed; not a test itself.

  python tests/survival_worker.py DATA_DIR WORKDIR NUM_STEPS NUM_WORKERS PACE_S OUT_JSON

Runs test_train's tiny SimCLR config (SGD, checkpoints every 3 steps, a log line every step)
on 2 of the 8 fake CPU devices with NUM_WORKERS grain worker processes, resuming from WORKDIR
like `python -m ssl_us.main`. Each log line is printed and flushed, then the run sleeps PACE_S
seconds, so that a test can signal it at a chosen step. At the end it writes the run's history
(bit-exact float losses) to OUT_JSON and prints "DONE".
"""
import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                           + os.environ.get("SSL_US_TEST_XLA_FLAGS", ""))
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



def main(data_dir, workdir, num_steps, num_workers, pace, out):
  # Imported here, not at the top: grain's spawned worker processes import this module again.
  from ssl_us import parallel, train  # pylint: disable=g-import-not-at-top
  from tests import test_train  # pylint: disable=g-import-not-at-top

  def log(msg):
    print(msg, flush=True)
    time.sleep(float(pace))

  config = test_train.sgd_config(data_dir, num_steps=int(num_steps), ckpt_every=3)
  config.data.num_workers = int(num_workers)
  history = train.train_and_evaluate(config, workdir, mesh=parallel.make_mesh(2), log_fn=log)
  with open(out, "w") as f:
    json.dump(history, f)
  print("DONE", history["final_step"], history.get("preempted"), flush=True)


if __name__ == "__main__":  # grain starts its worker processes with spawn
  main(*sys.argv[1:7])
