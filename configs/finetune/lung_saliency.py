r"""Occlusion saliency against pathology boxes (paper 001 Sec. 3.3, Fig. 2) on synthetic lung
videos: a classifier per protocol, occlusion maps of the consolidation class on test frames,
top 10% of pixels, boxes around connected regions, weighted IoU with the ground-truth boxes.

  python -m data_prep.synthetic --output /tmp/syn --num_patients 24 --videos_per_patient 3
  python -m ssl_us.finetune --config configs/finetune/lung_saliency.py \
      --config.init_from=/tmp/simclr_syn --config.data.dense_dir=/tmp/syn
"""
from configs.finetune import base


def get_config(arg: str | None = None):
  c = base.base_config()
  c.name = "lung_saliency"
  c.task = "saliency"
  if arg == "runlocal":
    c.fit.steps = 150
    c.fit_head.steps = 300
    c.saliency.max_images = 8
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; use runlocal or nothing")
  return c
