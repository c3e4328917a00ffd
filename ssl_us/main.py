r"""Pretraining entry point.

  python -m ssl_us.main --config configs/simclr_muscle.py[:runlocal] --workdir W \
      [--config.key=value ...] [--multihost]

A workdir that already holds a checkpoint resumes from it. With --multihost, every process
calls jax.distributed.initialize() first (coordinator, process count and id from the usual
environment or flags of jax.distributed); the workdir must then be one folder all hosts mount
(checked before the first step, with the config and the records, see parallel.py).
"""
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pretraining config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize().")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  if _MULTIHOST.value:
    jax.distributed.initialize()
  from ssl_us import train  # pylint: disable=g-import-not-at-top
  history = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(train.summary_json(history))
    print(f"checkpoints: {_WORKDIR.value}/checkpoints  logs: {_WORKDIR.value}/logs")


if __name__ == "__main__":
  app.run(main)
