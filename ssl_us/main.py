r"""Pretraining entry point.

  python -m ssl_us.main --config configs/simclr_muscle.py[:runlocal] --workdir W \
      [--config.key=value ...] [--multihost]

A workdir that already holds a checkpoint resumes from it. With --multihost, every process
calls jax.distributed.initialize() first: on Cloud TPU, SLURM, Open MPI and Kubernetes it finds
the coordinator, the process count and this process's id itself; elsewhere pass them, e.g. on
two GPU hosts:

  python -m ssl_us.main --multihost --coordinator_address host0:1234 --num_processes 2 \
      --process_id 0 ...        (on host0; the same with --process_id 1 on the other)

The workdir must then be one folder all hosts mount (checked before the first step, with the
config and the records, see parallel.py). An error on one process ends them all, without
the 5-minute wait of jax.distributed's shutdown barrier (parallel.fail_fast).
"""
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pretraining config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "With --multihost: host:port of process 0 (default: found on "
    "Cloud TPU, SLURM, Open MPI, Kubernetes).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "With --multihost: the number of processes (default: found).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "With --multihost: this process's id, 0 .. num_processes - 1 "
    "(default: found).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from ssl_us import parallel  # pylint: disable=g-import-not-at-top
  try:
    parallel.join_processes(_MULTIHOST.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                            _PROCESS_ID.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  from ssl_us import train  # pylint: disable=g-import-not-at-top  (after joining)
  with parallel.fail_fast():   # one process's error ends them all
    history = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(train.summary_json(history))
    print(f"checkpoints: {_WORKDIR.value}/checkpoints  logs: {_WORKDIR.value}/logs")


if __name__ == "__main__":
  app.run(main)
