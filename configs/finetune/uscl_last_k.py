r"""USCL-style transfer (paper 003): fine-tune the last 3 blocks of the encoder plus a linear head,
against linear probing and full fine-tuning, patient-grouped 5-fold, all labels.

  python -m ssl_us.finetune --config configs/finetune/uscl_last_k.py \
      --config.init_from=/tmp/uscl --config.data.dir=/path/to/pocus/1.0.0
"""
from configs.finetune import base


def get_config(arg: str | None = None):
  c = base.base_config()
  c.name = "uscl_last_k"
  c.task = "classify"
  c.eval.protocols = ("linear", "last_k", "finetune")
  c.eval.fractions = (1.0,)
  c.eval.folds = 5
  c.fit.last_k = 3
  c.fit.lr = 1e-3        # the paper's POCUS lr 0.01 is for SGD; AdamW here
  if arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; this config has none")
  return c
