r"""BYOL on lung-ultrasound clips with a 3D Darknet-53 (paper 001).

Paper settings: BYOL with an online network (3D encoder, projection MLP with one hidden layer of
4096) and a target network updated as an EMA of the online one with momentum 0.99, "modified
Darknet-53 with 3D convolutions" as the encoder, learning rate 3e-4, the two views being two
augmentations of one video clip with the Table 2 augmentations:
  spatial (one draw per clip): random affine scale +-20 %, translation +-10 %, rotation +-10
  degrees; horizontal flip 0.5; colour jitter brightness 0.3, contrast 0.3; Gaussian noise std
  0.03; random erasing of area 0.02-0.1 and aspect 0.3-3.3;
  temporal: reversed order 0.5, shuffling of 0-4 frames 0.5, replacement of 0-4 frames 0.5.
Not stated by the paper, chosen here: Adam (no weight decay), a constant learning rate; clips of
16 frames every 2nd frame (the paper's videos have >= 60 frames), 128x128 input, batch 32,
projection and prediction outputs of 256 with hidden 4096 (BYOL's), the probabilities of noise
and erasing (0.5, torchvision's RandomErasing default) and of the affine (always, like
torchvision's RandomAffine), colour jitter always. Brightness is torchvision's ColorJitter
factor, x * (1 + b) with b uniform in +-0.3 (``aug.brightness_mode='scale'``), as the paper's
names (ColorJitter, RandomAffine, RandomErasing) suggest; ssl_us.augment's default, x + b in
[0, 1] units, blacks out much of these dark clips (mean ~0.16): SimCLR-3D runlocal does not
learn with it, and BYOL-3D runlocal gains far less (benchmarks/RESULTS.md, BYOL-3D sessions
10-11; ``--config.aug.brightness_mode=add`` gives the additive shift back). The paper's
encoder has 133,880 parameters (Table 3), far fewer than Darknet-53 at its usual width 32 (115M
in 3D); the width is ``model.encoder_kwargs.num_filters`` (1 gives 113k).

Shards: data_prep in clip mode, e.g. ``python -m data_prep --input <videos> --output <out>
--clip_len 16 --clip_stride 2 --size 128``; frame-mode shards work with
``--config.clips.shards=frame`` (frames regrouped by video).

  python -m ssl_us.main --config configs/byol_lung.py --workdir /tmp/byol \
      --config.data.dir /path/to/lung/1.0.0
  python -m ssl_us.main --config configs/byol_lung.py:runlocal --workdir /tmp/byol_local \
      --config.data.dir /tmp/blues_clips/covid_blues/1.0.0
"""
import ml_collections

from configs import common


def table2_augmentations(c: ml_collections.ConfigDict):
  """Paper 001 Table 2, spatial (config.aug) and temporal (config.temporal_aug)."""
  c.aug.update(crop_prob=0.0, affine_prob=1.0, scale=0.2, translate=0.1, rotate_deg=10.0,
               flip_prob=0.5, color_prob=1.0, brightness=0.3, brightness_mode="scale",
               contrast=0.3, noise_prob=0.5, noise_std=0.03, erase_prob=0.5,
               erase_area=(0.02, 0.1), erase_ratio=(0.3, 3.3))
  c.temporal_aug = ml_collections.ConfigDict(dict(
      enabled=True, reverse_prob=0.5, shuffle_prob=0.5, shuffle_max=4, replace_prob=0.5,
      replace_max=4))


def video_config() -> ml_collections.ConfigDict:
  """Settings shared by the clip methods: input, clips, 3D encoder, Table 2 augmentations."""
  c = common.base_config()
  c.image_size = (128, 128)
  c.batch_size = 32
  c.num_steps = 20000
  c.model.encoder = "darknet53_3d"
  c.model.encoder_kwargs = ml_collections.ConfigDict(dict(num_filters=32))
  c.clips = ml_collections.ConfigDict(dict(
      clip_len=16, stride=2,
      views="same",            # same: one clip augmented twice (the paper) | pair: two clips
      max_distance=16,         # pair: source frames between the two clips' starts, at most
      short="loop",            # frame shards: videos shorter than a clip are looped | pad
      one_per_video=False,     # True: one clip per video per epoch, no video twice per batch
      shards="clip"))          # clip: data_prep --clip_len shards | frame: regrouped by video
  table2_augmentations(c)
  c.optim.update(name="adam", base_lr=3e-4, weight_decay=0.0, lr_scaling="none",
                 warmup_steps=0, end_lr_factor=1.0)  # constant lr, as the paper states one
  return c


def runlocal(c: ml_collections.ConfigDict):
  """About 45 minutes on 2 idle CPU cores (0.15-0.16 steps/s, 2.4-2.6 clips/s;
  benchmarks/RESULTS.md): 8 frames of 64x64, R3D-18 at width 16 (2.1M parameters), small heads,
  400 steps of 16 clips. On COVID-BLUES clips its linear probe beats the random R3D by +0.09 to
  +0.10 accuracy on COVID and +0.05 to +0.07 on B-lines (two pretraining seeds, 13-15 of 15
  paired runs ahead; RESULTS BYOL-3D session 11).

  R3D-18, not Darknet-53-3D: issue 4 names it the variant for small machines, and at this size
  it is the encoder whose BYOL features beat its own random init in every run; the
  Darknet-53-3D at width 4 (1.8M parameters, 8 clips/s) did not consistently in eleven runs
  (with the additive brightness). For the paper's trunk on the CPU:
  ``--config.model.encoder=darknet53_3d --config.model.encoder_kwargs.num_filters=4
  --config.num_steps=1000 --config.ckpt_every=250`` (and ``--config.aug.brightness_mode=add`` to
  reproduce those runs)."""
  c.image_size = (64, 64)
  c.batch_size = 16
  c.num_steps = 400
  c.model.encoder = "r3d18"
  c.model.encoder_kwargs = ml_collections.ConfigDict(dict(num_filters=16))
  c.model.head_hidden = (256,)
  c.model.head_out = 64
  c.clips.update(clip_len=8, stride=1)
  c.optim.update(base_lr=1e-3, warmup_steps=10, end_lr_factor=0.0)
  c.data.num_workers = 1
  c.log_every = 10
  c.ckpt_every = 100


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = video_config()
  c.method = "byol"
  c.model.head_hidden = (4096,)
  c.model.head_out = 256
  c.byol = ml_collections.ConfigDict(dict(
      tau_base=0.99, tau_schedule="constant",   # or "cosine": tau_base -> 1 (BYOL paper)
      tau_steps=0,                              # cosine horizon; 0 = num_steps
      predictor_hidden=(4096,)))
  if arg == "runlocal":
    runlocal(c)
    c.byol.predictor_hidden = (256,)
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; use runlocal or nothing")
  return c


def get_sweep(hyper):
  """The paper's temporal-augmentation ablation and the EMA schedule."""
  return hyper.product([
      hyper.sweep("config.temporal_aug.enabled", [True, False]),
      hyper.sweep("config.byol.tau_schedule", ["constant", "cosine"]),
  ])
