r"""AWCL: anatomy-aware contrastive learning on fetal ultrasound frames (paper 002).

Paper settings: ResNet-18, projection to 128-d, temperature 0.5, batch 32, Adam lr 1e-3 with
weight decay 1e-6 (L2 in the gradient, as PyTorch's Adam), 10 epochs, SimCLR's augmentations,
frames cropped to the ultrasound region and resized to 224 x 288, every 8th frame of each video.
The anatomy ratio of the paper's main table is not stated; its Fig. 6 finds 80% best, our
default. ``awcl.pairs`` switches to the paper's baselines on the same frames: ``simclr`` (plain
frame pairs) and ``clpi`` (two frames of one video as positives, "patient information").

  python -m ssl_us.main --config configs/awcl_fetal.py --workdir /tmp/awcl \
      --config.data.dir /path/to/fetal/1.0.0 --config.awcl.granularity coarse
  python -m ssl_us.main --config configs/awcl_fetal.py:runlocal --workdir /tmp/awcl_local \
      --config.data.dir /path/to/synthetic/1.0.0
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.base_config()
  c.method = "awcl"
  c.image_size = (224, 288)
  c.batch_size = 32
  c.num_epochs = 10
  c.model.encoder = "resnet18"
  c.model.encoder_kwargs = ml_collections.ConfigDict()
  c.model.head_hidden = (512,)
  c.model.head_out = 128
  c.loss.temperature = 0.5
  c.optim.update(name="adam", base_lr=1e-3, weight_decay=1e-6, lr_scaling="none",
                 warmup_steps=0, end_lr_factor=1.0)  # constant lr, as the paper states one
  c.awcl = ml_collections.ConfigDict(dict(
      pairs="anatomy",          # anatomy (AWCL) | simclr | clpi
      granularity="fine",       # coarse | fine: which per-frame anatomy label defines A(i)
      anatomy_ratio=0.8,        # share of each global batch drawn from labeled frames
      frame_every=8,            # keep every k-th unlabeled frame of each video
      clpi_group="video"))      # clpi positives: two frames of one video | patient

  if arg == "runlocal":
    # Minutes on 2 CPU cores: 64x64 input, ResNet-18 at a quarter of its width (16 filters in
    # the stem, 128-d features; the full width costs 16x the FLOPs), more steps than 10 short
    # epochs, a warmup and decay. Synthetic shards are already sampled sparsely in time, so
    # every frame is kept.
    c.image_size = (64, 64)
    c.model.encoder_kwargs = ml_collections.ConfigDict(dict(num_filters=16))
    c.num_epochs = 0
    c.num_steps = 300
    c.optim.update(warmup_steps=20, end_lr_factor=0.0)
    c.awcl.frame_every = 1
    c.awcl.anatomy_ratio = 0.5
    c.data.num_workers = 1
    c.log_every = 20
    c.ckpt_every = 100
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; use runlocal or nothing")
  return c


def get_sweep(hyper):
  """The paper's comparisons: baselines, both granularities, and the anatomy-ratio study."""
  return hyper.chainit([
      hyper.sweep("config.awcl.pairs", ["simclr", "clpi"]),
      hyper.product([
          hyper.sweep("config.awcl.granularity", ["coarse", "fine"]),
          hyper.sweep("config.awcl.anatomy_ratio", [0.1, 0.3, 0.5, 0.8]),
      ]),
  ])
