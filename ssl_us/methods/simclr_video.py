"""Paper 001's SimCLR alternative (its Table 3): NT-Xent over the global batch on clips.

``ClipViews`` is the clip input shared with BYOL (methods/byol.py): clips from
``samplers_video.ClipSampler`` (config.clips), two views by ``augment_video`` (config.aug for the
spatial part shared by all frames of a clip, config.temporal_aug for the temporal group):
batch['clip'] twice (the paper), or batch['clip'] and batch['clip_b'] (two clips of one video);
and the clip metrics ``padded_clip_frac``, ``padded_frame_frac`` (looped/padded short videos) and
``view_distance`` (source frames between the two views' clips).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_us import augment_video
from ssl_us import models3d  # noqa: F401  (registers the 3D encoders with make_encoder)
from ssl_us.methods.simclr import SimCLR
from ssl_us.samplers_video import ClipSampler


def _global_mean(x, axis_name):
  m = jnp.mean(x)
  return m if axis_name is None else jax.lax.pmean(m, axis_name)


def make_clip_sampler(config) -> ClipSampler:
  """ClipSampler from config.clips (ClipSampler's field names; unknown keys are an error)."""
  d = dict(config.clips)
  known = set(ClipSampler.__dataclass_fields__)
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"unknown config.clips keys {unknown}; known: {sorted(known)}")
  return ClipSampler(**d)


class ClipViews:
  """Clip input for a SimCLR-style method: sampler, two spatio-temporal views, clip metrics."""
  view_key = "clip"

  def __init__(self, config, axis_name=None):
    super().__init__(config, axis_name)
    self.video_aug = augment_video.VideoAugmentConfig.from_config(
        config.aug, config.temporal_aug, config.image_size)

  def make_sampler(self, config):
    return make_clip_sampler(config)

  def views(self, batch, rng):
    """Two augmented views (n, T, h, w, C); keys from global example indices."""
    k_a, k_b = jax.random.split(rng)
    clip_a = batch[self.view_key]
    clip_b = batch.get("clip_b", clip_a)
    return (augment_video.augment_video_batch(k_a, clip_a, self.video_aug, self.axis_name),
            augment_video.augment_video_batch(k_b, clip_b, self.video_aug, self.axis_name))

  def clip_metrics(self, batch):
    """Global shares of padded clips and frames, and the mean distance between the views."""
    padded = batch["padded"].astype(jnp.float32)            # (n, 2)
    t = batch[self.view_key].shape[1]
    return {"padded_clip_frac": _global_mean(padded > 0, self.axis_name),
            "padded_frame_frac": _global_mean(padded / t, self.axis_name),
            "view_distance": _global_mean(batch["distance"].astype(jnp.float32),
                                          self.axis_name)}


class SimCLRVideo(ClipViews, SimCLR):
  """SimCLR (NT-Xent over the global batch) on spatio-temporally augmented clips."""

  def objective(self, out, batch):
    loss, metrics = super().objective(out, batch)
    return loss, {**metrics, **self.clip_metrics(batch)}
