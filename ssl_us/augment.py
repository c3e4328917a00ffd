"""Image and clip augmentation on device, in JAX, one PRNG key per example.

The host sends uint8; these functions run under jit inside the per-device step. Every example
(image (H, W, C) or clip (T, H, W, C)) draws one set of spatial parameters: a random resized crop,
a small affine (rotation, scale, translation) and a horizontal flip are composed into *one*
inverse map and applied with one bilinear resample, and a random-erasing box; for a clip the same
parameters apply to every frame. Intensity jitter is drawn per example too; Gaussian noise is
per pixel. Output: float32 in model units ((x - mean) / std), shape (..., out_h, out_w, C).

Temporal augmentations for clips live in ssl_us.augment_video and reuse ``augment_clip``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp


BRIGHTNESS_MODES = ("add", "scale")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probabilities and ranges; the defaults are SimCLR-like. Frozen, so it is a jit static."""
  out_size: tuple[int, int] = (64, 64)
  crop_prob: float = 1.0
  crop_scale: tuple[float, float] = (0.08, 1.0)   # area fraction of the input
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio w/h, log-uniform
  flip_prob: float = 0.5
  affine_prob: float = 0.0
  rotate_deg: float = 0.0                          # +- degrees
  scale: float = 0.0                               # +- fraction
  translate: float = 0.0                           # +- fraction of the size
  color_prob: float = 0.8
  brightness: float = 0.4                          # +- b, applied as brightness_mode says
  brightness_mode: str = "scale"                   # "add": x + b (in [0, 1] intensity units);
                                                   # "scale": x * (1 + b) (torchvision's factor)
  contrast: float = 0.4                            # multiplicative about the mean, 1 +- c
  noise_prob: float = 0.0
  noise_std: float = 0.0
  erase_prob: float = 0.0
  erase_area: tuple[float, float] = (0.02, 0.1)
  erase_ratio: tuple[float, float] = (0.3, 3.3)
  mean: float = 0.5
  std: float = 0.25

  def __post_init__(self):
    if self.brightness_mode not in BRIGHTNESS_MODES:
      raise ValueError(f"augmentation brightness_mode={self.brightness_mode!r}; known: "
                       f"{BRIGHTNESS_MODES}")

  @classmethod
  def from_config(cls, cfg, out_size) -> "AugmentConfig":
    """From a ConfigDict / dict of the same field names; unknown keys are an error."""
    d = dict(cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown augmentation keys {unknown}; known: {sorted(names)}")
    d = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()}
    d["out_size"] = tuple(out_size)
    return cls(**d)


def _uniform(key, lo, hi, shape=()):
  return jax.random.uniform(key, shape, minval=lo, maxval=hi)


def _bernoulli(key, p):
  return jax.random.bernoulli(key, float(p)) if p > 0 else jnp.asarray(False)


def sample_spatial(key, cfg: AugmentConfig, in_hw) -> dict[str, Any]:
  """Spatial parameters of one example: inverse map from output to input pixels, erase box."""
  h, w = in_hw
  ks = jax.random.split(key, 12)
  # Random resized crop (Inception style): area and log-aspect uniform, clipped to the image.
  area = _uniform(ks[0], *cfg.crop_scale) * h * w
  log_r = _uniform(ks[1], math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]))
  r = jnp.exp(log_r)
  cw = jnp.clip(jnp.sqrt(area * r), 1.0, w)
  ch = jnp.clip(jnp.sqrt(area / r), 1.0, h)
  do_crop = _bernoulli(ks[2], cfg.crop_prob)
  cw, ch = jnp.where(do_crop, cw, w), jnp.where(do_crop, ch, h)
  y0 = _uniform(ks[3], 0.0, 1.0) * (h - ch)
  x0 = _uniform(ks[4], 0.0, 1.0) * (w - cw)
  # Small affine on centred output coordinates.
  do_aff = _bernoulli(ks[5], cfg.affine_prob)
  theta = jnp.where(do_aff, _uniform(ks[6], -1.0, 1.0) * math.radians(cfg.rotate_deg), 0.0)
  s = jnp.where(do_aff, 1.0 + _uniform(ks[7], -1.0, 1.0) * cfg.scale, 1.0)
  t = jnp.where(do_aff, _uniform(ks[8], -1.0, 1.0, (2,)) * cfg.translate, 0.0)
  flip = _bernoulli(ks[9], cfg.flip_prob)
  # Erasing box in output coordinates (fractions).
  do_erase = _bernoulli(ks[10], cfg.erase_prob)
  ke = jax.random.split(ks[11], 4)
  e_area = _uniform(ke[0], *cfg.erase_area)
  e_r = jnp.exp(_uniform(ke[1], math.log(cfg.erase_ratio[0]), math.log(cfg.erase_ratio[1])))
  eh = jnp.clip(jnp.sqrt(e_area / e_r), 0.0, 1.0)
  ew = jnp.clip(jnp.sqrt(e_area * e_r), 0.0, 1.0)
  ey0 = _uniform(ke[2], 0.0, 1.0) * (1.0 - eh)
  ex0 = _uniform(ke[3], 0.0, 1.0) * (1.0 - ew)
  return dict(crop=jnp.stack([y0, x0, ch, cw]), theta=theta, scale=s, shift=t, flip=flip,
              erase=jnp.stack([ey0, ex0, eh, ew]) * do_erase)


def sample_intensity(key, cfg: AugmentConfig) -> dict[str, Any]:
  k0, k1, k2, k3 = jax.random.split(key, 4)
  on = _bernoulli(k0, cfg.color_prob)
  b = jnp.where(on, _uniform(k1, -cfg.brightness, cfg.brightness), 0.0)
  c = jnp.where(on, 1.0 + _uniform(k2, -cfg.contrast, cfg.contrast), 1.0)
  return dict(brightness=b, contrast=c, noise=_bernoulli(k3, cfg.noise_prob))


def _sample_grid(p, out_hw):
  """Input (y, x) coordinates for every output pixel: crop ∘ affine ∘ flip, pixel centres."""
  oh, ow = out_hw
  u = (jnp.arange(oh, dtype=jnp.float32) + 0.5) / oh - 0.5
  v = (jnp.arange(ow, dtype=jnp.float32) + 0.5) / ow - 0.5
  cy, cx = jnp.meshgrid(u, v, indexing="ij")
  cx = jnp.where(p["flip"], -cx, cx)
  cos, sin = jnp.cos(p["theta"]), jnp.sin(p["theta"])
  ry = (cos * cy - sin * cx) / p["scale"] + p["shift"][0]
  rx = (sin * cy + cos * cx) / p["scale"] + p["shift"][1]
  y0, x0, ch, cw = p["crop"]
  return y0 + (ry + 0.5) * ch - 0.5, x0 + (rx + 0.5) * cw - 0.5


def _warp(frames, grid):
  """Bilinear resample of (T, H, W, C) at grid (out_h, out_w) coords; zero outside."""
  gy, gx = grid

  def one(img2d):
    return jax.scipy.ndimage.map_coordinates(img2d, [gy, gx], order=1, mode="constant", cval=0.0)

  # (T, H, W, C) -> (T, C, H, W) -> map -> (T, out_h, out_w, C)
  out = jax.vmap(jax.vmap(one))(jnp.moveaxis(frames, -1, 1))
  return jnp.moveaxis(out, 1, -1)


def _erase(frames, box):
  oh, ow = frames.shape[-3:-1]
  y0, x0, eh, ew = box
  yy = (jnp.arange(oh) + 0.5) / oh
  xx = (jnp.arange(ow) + 0.5) / ow
  inside = ((yy[:, None] >= y0) & (yy[:, None] < y0 + eh)
            & (xx[None, :] >= x0) & (xx[None, :] < x0 + ew))
  return jnp.where(inside[..., None], 0.0, frames)


def augment_clip(key, clip, cfg: AugmentConfig):
  """One example: uint8 (T, H, W, C) -> float32 (T, out_h, out_w, C), one spatial draw."""
  k_sp, k_in, k_noise = jax.random.split(key, 3)
  x = clip.astype(jnp.float32) / 255.0
  p = sample_spatial(k_sp, cfg, clip.shape[1:3])
  x = _warp(x, _sample_grid(p, cfg.out_size))
  q = sample_intensity(k_in, cfg)
  m = jnp.mean(x)
  x = (x - m) * q["contrast"] + m
  x = x * (1.0 + q["brightness"]) if cfg.brightness_mode == "scale" else x + q["brightness"]
  if cfg.noise_prob > 0 and cfg.noise_std > 0:
    x = x + q["noise"] * cfg.noise_std * jax.random.normal(k_noise, x.shape)
  x = jnp.clip(x, 0.0, 1.0)
  if cfg.erase_prob > 0:
    x = _erase(x, p["erase"])
  return (x - cfg.mean) / cfg.std


def augment_image(key, image, cfg: AugmentConfig):
  """One example: uint8 (H, W, C) -> float32 (out_h, out_w, C)."""
  return augment_clip(key, image[None], cfg)[0]


def example_keys(key, n: int, axis_name=None):
  """One key per example, from its index in the *global* batch.

  Inside shard_map each device holds examples [i * n, (i + 1) * n) of the global batch, so its
  keys differ from every other device's, and the keys (hence the augmentations) do not depend
  on how the batch is split over devices.
  """
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(offset + jnp.arange(n))


def augment_batch(key, images, cfg: AugmentConfig, axis_name=None):
  """A batch of images (B, H, W, C) or clips (B, T, H, W, C), one key per example."""
  keys = example_keys(key, images.shape[0], axis_name)
  fn = augment_image if images.ndim == 4 else augment_clip
  return jax.vmap(lambda k, x: fn(k, x, cfg))(keys, images)


def center_view(images, cfg: AugmentConfig):
  """Deterministic evaluation view: full frame resized to out_size, normalised.

  Resampled as the training views are: bilinear at pixel centres, without antialiasing, so a
  network sees identically filtered pixels in training and evaluation (equal to a training view
  with no crop, flip, affine or intensity change wherever that view samples inside the frame).
  data_prep shrinks frames with antialiasing when it writes shards; write them near image_size.
  """
  x = images.astype(jnp.float32) / 255.0
  shape = x.shape[:-3] + tuple(cfg.out_size) + x.shape[-1:]
  x = jax.image.resize(x, shape, method="linear", antialias=False)
  return (x - cfg.mean) / cfg.std
