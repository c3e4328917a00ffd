r"""Segmentation transfer (paper 002 Task III): U-Net decoder on the pretrained encoder, fine-tuned
end to end, against the same model from a random init; GAA, MA, mIoU. Masks (background, pleural
line, consolidation, B-line, A-line, rib shadow) from the synthetic generator.

Paper 002 fine-tunes for 50k iterations with RMSprop lr 1e-3; here AdamW lr 1e-3.

  python -m data_prep.synthetic --output /tmp/syn --num_patients 24 --videos_per_patient 3
  python -m ssl_us.finetune --config configs/finetune/segmentation.py \
      --config.init_from=/tmp/uscl --config.data.dense_dir=/tmp/syn
"""
from configs.finetune import base


def get_config(arg: str | None = None):
  c = base.base_config()
  c.name = "segmentation"
  c.task = "segment"
  c.segment.fit.update(steps=2000, lr=1e-3, batch_size=16)
  if arg == "runlocal":
    c.segment.fit.steps = 200
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; use runlocal or nothing")
  return c
