r"""SimCLR for muscle-ultrasound view retrieval (paper 000).

Paper settings: 64x64 input, the 4-conv encoder (BatchNorm, dropout 0.2), projection head of two
dense layers of 512, batch 128, Adam lr 1e-5 with L2 weight 1e-5, 500 epochs, augmentations
horizontal flip and random crops ("size 10x10": we read it as crops that remove up to 10 pixels
of the 64x64 frame, i.e. a 54x54 window resized back to 64x64). The paper does not state the
temperature; it is a field (default 0.5, swept below).

  python -m ssl_us.main --config configs/simclr_muscle.py --workdir /tmp/simclr \
      --config.data.dir /path/to/ultrasound/1.0.0
  python -m ssl_us.main --config configs/simclr_muscle.py:runlocal --workdir /tmp/simclr_local \
      --config.data.dir /path/to/ultrasound/1.0.0
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.base_config()
  c.method = "simclr"
  c.image_size = (64, 64)
  c.batch_size = 128
  c.num_epochs = 500
  c.model.encoder = "convnet4"
  c.model.encoder_kwargs = ml_collections.ConfigDict(dict(width=32, dropout_rate=0.2))
  c.model.head_hidden = (512,)
  c.model.head_out = 512
  c.loss.temperature = 0.5
  c.optim.update(name="adam", base_lr=1e-5, weight_decay=1e-5, lr_scaling="none",
                 warmup_steps=0, end_lr_factor=1.0)  # constant lr, as the paper's Adam
  c.aug.update(crop_scale=((54 / 64) ** 2, (54 / 64) ** 2), crop_ratio=(1.0, 1.0),
               flip_prob=0.5, color_prob=0.0)

  if arg == "runlocal":
    # A few minutes on 2 CPU cores: fewer steps, a higher learning rate so that they count, a
    # smaller batch, and SimCLR's usual colour jitter and wider crops, which the short run needs
    # to learn anything (the paper's flip + small crop is too easy a task in 300 steps).
    c.num_epochs = 0
    c.num_steps = 300
    c.batch_size = 64
    c.optim.update(base_lr=1e-3, warmup_steps=20, end_lr_factor=0.0)
    c.aug.update(crop_scale=(0.3, 1.0), crop_ratio=(3 / 4, 4 / 3), color_prob=0.8)
    c.data.num_workers = 1
    c.log_every = 20
    c.ckpt_every = 100
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; use runlocal or nothing")
  return c


def get_sweep(hyper):
  """Temperature x batch size, as users sweep them."""
  return hyper.product([
      hyper.sweep("config.loss.temperature", [0.05, 0.1, 0.2, 0.5, 1.0]),
      hyper.sweep("config.batch_size", [128, 256, 512, 1024]),
  ])
