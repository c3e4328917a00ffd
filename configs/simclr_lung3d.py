r"""SimCLR on lung-ultrasound clips with a 3D Darknet-53: paper 001's alternative (its Table 3).

Same encoder, clips and Table 2 augmentations as configs/byol_lung.py, with SimCLR's NT-Xent
over the global batch instead of BYOL (method ``simclr_video``). Not stated by the paper, chosen
here: temperature 0.5, a projection head of one hidden layer of 2048 to 128 (SimCLR's), one
clip per video per epoch so that no clip's negatives come from its own video.

  python -m ssl_us.main --config configs/simclr_lung3d.py --workdir /tmp/simclr3d \
      --config.data.dir /path/to/lung/1.0.0
  python -m ssl_us.main --config configs/simclr_lung3d.py:runlocal --workdir /tmp/simclr3d_l \
      --config.data.dir /tmp/blues_clips/covid_blues/1.0.0
"""
import ml_collections

from configs import byol_lung


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = byol_lung.video_config()
  c.method = "simclr_video"
  c.model.head_hidden = (2048,)
  c.model.head_out = 128
  c.loss.temperature = 0.5
  c.clips.one_per_video = True
  if arg == "runlocal":
    byol_lung.runlocal(c)
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; use runlocal or nothing")
  return c


def get_sweep(hyper):
  return hyper.product([
      hyper.sweep("config.temporal_aug.enabled", [True, False]),
      hyper.sweep("config.loss.temperature", [0.1, 0.5]),
  ])
