r"""USCL: ultrasound semi-supervised contrastive learning with mixed video frames (paper 003).

Paper settings: ResNet-18, 224 x 224 random crops with flips and colour jitter, batch of 32
videos (one positive pair each), Adam lr 3e-4 with weight decay 1e-4, 300 epochs, temperature
0.5, lambda ~ Beta(0.5, 0.5) mixing, lambda_ce 0.2 on a linear classifier over the encoder
features, 1% of the labels. We draw one lambda per video for both views (the paper writes two,
xi_1 and xi_2, the task asks for one); the projection head is ssl_us's MLP head (512 hidden,
BatchNorm) with a 128-d output, which the paper does not state.

  python -m ssl_us.main --config configs/uscl.py --workdir /tmp/uscl \
      --config.data.dir /path/to/us4/1.0.0 --config.uscl.num_classes 3
  python -m ssl_us.main --config configs/uscl.py:runlocal --workdir /tmp/uscl_local \
      --config.data.dir /path/to/synthetic/1.0.0
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.base_config()
  c.method = "uscl"
  c.image_size = (224, 224)
  c.batch_size = 32
  c.num_epochs = 300
  c.model.encoder = "resnet18"
  c.model.encoder_kwargs = ml_collections.ConfigDict()
  c.model.head_hidden = (512,)
  c.model.head_out = 128
  c.loss.temperature = 0.5
  c.optim.update(name="adam", base_lr=3e-4, weight_decay=1e-4, lr_scaling="none",
                 warmup_steps=0, end_lr_factor=1.0)
  c.aug.update(crop_scale=(0.08, 1.0), flip_prob=0.5, color_prob=0.8)
  c.uscl = ml_collections.ConfigDict(dict(
      alpha=0.5, beta=0.5,      # lambda ~ Beta(alpha, beta), one per video and step
      lambda_ce=0.2,            # weight of the classifier's cross-entropy
      label_fraction=0.01,      # share of videos whose class label is used
      label_seed=0,             # which videos those are (fixed for a run)
      num_classes=3))           # classifier outputs; every video label must be below it

  if arg == "runlocal":
    # Minutes on 2 CPU cores: 64x64 input, ResNet-18 at a quarter of its width (16 filters in
    # the stem, 128-d features; the full width costs 16x the FLOPs), a few hundred steps with
    # warmup and decay, and a label fraction that leaves labeled videos in a small synthetic
    # set.
    c.image_size = (64, 64)
    c.model.encoder_kwargs = ml_collections.ConfigDict(dict(num_filters=16))
    c.num_epochs = 0
    c.num_steps = 300
    c.optim.update(base_lr=1e-3, warmup_steps=20, end_lr_factor=0.0)
    c.uscl.label_fraction = 0.1
    c.data.num_workers = 1
    c.log_every = 20
    c.ckpt_every = 100
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; use runlocal or nothing")
  return c


def get_sweep(hyper):
  """The paper's label-fraction and CE-weight ablations."""
  return hyper.product([
      hyper.sweep("config.uscl.label_fraction", [0.0, 0.01, 0.1]),
      hyper.sweep("config.uscl.lambda_ce", [0.0, 0.2]),
  ])
