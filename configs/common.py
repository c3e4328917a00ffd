"""Defaults shared by every pretraining config; each paper's config overrides what it states."""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "simclr"
  c.seed = 0
  c.num_devices = 0                 # 0 = all devices
  c.data = ml_collections.ConfigDict(dict(dir="", split="train", num_workers=2))
  c.image_size = (64, 64)           # network input (H, W); shards may be larger
  c.batch_size = 128                # global batch (all devices and hosts)
  c.num_steps = 1000                # or set num_epochs > 0 to derive it from the data
  c.num_epochs = 0
  c.model = ml_collections.ConfigDict(dict(
      encoder="resnet18", encoder_kwargs=ml_collections.ConfigDict(), head_hidden=(512,),
      head_out=128, head_bn_last=False, dtype="auto",
      # True: the encoder's residual blocks are recomputed in the backward pass instead of
      # kept (models.rematerialized; ResNets and the 3D encoders): less activation memory on
      # GPU/TPU for one more forward pass, the same result. README, Large batches.
      remat=False))
  # impl: 'dense' (2n x 2N logits per device), 'ring' (key blocks around the mesh axis, O(n^2)
  # memory), or 'auto' (ring once the dense float32 logits would pass dense_limit_mb).
  c.loss = ml_collections.ConfigDict(dict(temperature=0.5, impl="auto", dense_limit_mb=1024))
  # Each device's batch goes through the network in this many chunks (ssl_us/gradcache.py):
  # activation memory of one chunk, the same contrastive batch; BatchNorm statistics per chunk.
  c.microbatches = 1
  # Global batches on the devices ahead of the step (2: the next one transfers while the
  # current step runs; 1: each batch is placed when the step takes it). Same results either way.
  c.prefetch = 2
  c.optim = ml_collections.ConfigDict(dict(
      name="adam", base_lr=1e-3, lr_scaling="none", lr_base_batch=256, warmup_steps=0,
      end_lr_factor=0.0, weight_decay=0.0, b1=0.9, b2=0.999, momentum=0.9))
  # brightness_mode 'scale': x (1 + b), b uniform in +-brightness (torchvision's and SimCLR v2's
  # factor). On ultrasound (mean intensity ~0.16) the additive x + b ('add') blacks out many
  # views; measured on SimCLR, AWCL and USCL (benchmarks/RESULTS.md, brightness study).
  c.aug = ml_collections.ConfigDict(dict(
      crop_prob=1.0, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_prob=0.5,
      affine_prob=0.0, rotate_deg=0.0, scale=0.0, translate=0.0, color_prob=0.8,
      brightness=0.4, brightness_mode="scale", contrast=0.4, noise_prob=0.0, noise_std=0.0,
      erase_prob=0.0, erase_area=(0.02, 0.1), erase_ratio=(0.3, 3.3), mean=0.5, std=0.25))
  c.log_every = 50
  c.ckpt_every = 1000
  c.keep_checkpoints = 3
  # Steps whose loss or gradient is NaN/Inf leave the state unchanged; after this many in a row
  # (checked at log steps) the run stops with an error naming the newest good checkpoint.
  c.max_nonfinite_steps = 10
  # Trace steps start_step + 1 .. start_step + num_steps (0: off) into <workdir>/logs for
  # TensorBoard's Profile tab, with a summary.md of the op times (ssl_us/profiling.py).
  c.profile = ml_collections.ConfigDict(dict(start_step=10, num_steps=0))
  c.progress_bar = True
  # A workdir with checkpoints resumes only under the config and dataset it was started with,
  # but for how it runs and how long (checkpoint.RESUME_MAY_CHANGE); True continues it anyway.
  c.resume_with_changes = False
  return c
