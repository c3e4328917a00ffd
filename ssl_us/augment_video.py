"""Spatio-temporal clip augmentation on device (paper 001, Table 2), one PRNG key per clip.

A clip uint8 (T, H, W, C) first has its frame order changed by the temporal group, then goes
through ``ssl_us.augment.augment_clip`` (one spatial draw - affine, flip, erasing box - and one
intensity draw for all T frames; per-pixel noise). Output float32 (T, out_h, out_w, C) in model
units, as augment_clip's.

Temporal ops act on an index vector idx (T,) int32 (start: 0..T-1) and are composed into one
gather ``clip[idx]``, so the uint8 frames are moved once:
  reverse  with probability reverse_prob: idx <- idx[::-1]
  shuffle  with probability shuffle_prob: k ~ U{0..shuffle_max} (at most T) positions are chosen
           uniformly and their entries permuted uniformly among themselves; the multiset of
           idx is unchanged and at most k entries move
  replace  with probability replace_prob: k ~ U{0..replace_max} (at most T) positions are chosen
           and each takes the entry of another position (offset uniform in 1..T-1, mod T), i.e.
           that frame is replaced by a different frame of the same clip (a duplicate); exactly k
           entries change
The whole temporal group is off with ``TemporalConfig.enabled=False`` (the paper's ablation).
The order of the Table 2 rows is the order applied.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ssl_us import augment


@dataclasses.dataclass(frozen=True)
class TemporalConfig:
  """Probabilities and frame counts of the temporal group (defaults: paper 001, Table 2)."""
  enabled: bool = True
  reverse_prob: float = 0.5
  shuffle_prob: float = 0.5
  shuffle_max: int = 4       # frames shuffled: uniform in 0..shuffle_max
  replace_prob: float = 0.5
  replace_max: int = 4       # frames replaced: uniform in 0..replace_max

  def __post_init__(self):
    for f in ("reverse_prob", "shuffle_prob", "replace_prob"):
      p = getattr(self, f)
      if not 0.0 <= p <= 1.0:
        raise ValueError(f"temporal augmentation {f}={p} is not a probability in [0, 1]")
    for f in ("shuffle_max", "replace_max"):
      if getattr(self, f) < 0:
        raise ValueError(f"temporal augmentation {f}={getattr(self, f)} must be >= 0")

  @classmethod
  def from_config(cls, cfg) -> "TemporalConfig":
    """From a ConfigDict / dict of the same field names; unknown keys are an error."""
    d = dict(cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown temporal augmentation keys {unknown}; known: {sorted(names)}")
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class VideoAugmentConfig:
  """Spatial (augment.AugmentConfig, shared by all frames) and temporal parts; a jit static."""
  spatial: augment.AugmentConfig
  temporal: TemporalConfig

  @classmethod
  def from_config(cls, aug, temporal_aug, out_size) -> "VideoAugmentConfig":
    """From config.aug (AugmentConfig fields), config.temporal_aug and config.image_size."""
    return cls(augment.AugmentConfig.from_config(aug, out_size=out_size),
               TemporalConfig.from_config(temporal_aug))


def _count(u_on, u_k, prob: float, max_frames: int, num_frames: int):
  """k = floor(u_k * (max_frames + 1)) ~ U{0..max_frames} if u_on < prob, else 0; <= T."""
  k = jnp.minimum(jnp.floor(u_k * (max_frames + 1)), max_frames).astype(jnp.int32)
  return jnp.where(u_on < prob, jnp.minimum(k, num_frames), 0).astype(jnp.int32)


def _chosen(u_pos, k):
  """Bool mask (T,) of k positions, uniformly without replacement (ranks of i.i.d. uniforms)."""
  t = u_pos.shape[0]
  rank = jnp.argsort(u_pos)  # a uniform permutation
  return jnp.zeros((t,), bool).at[rank].set(jnp.arange(t) < k)


def reverse_indices(idx, do_reverse):
  """idx[::-1] where do_reverse, else idx."""
  return jnp.where(do_reverse, idx[::-1], idx)


def shuffle_indices(u_pos, u_perm, idx, k):
  """Permute the entries at k random positions of idx uniformly among those positions.

  u_pos, u_perm: (T,) i.i.d. U[0, 1). The k positions with the smallest u_pos are chosen; in
  ascending order p_1 < ... < p_k they receive the entries of the same positions taken in the
  order of u_perm (a uniform permutation); all other positions keep theirs.
  """
  t = idx.shape[0]
  chosen = _chosen(u_pos, k)
  pos = jnp.arange(t)
  # Chosen positions first (ascending / random order), then the rest ascending in both.
  targets = jnp.argsort(jnp.where(chosen, pos, t + pos))
  sources = jnp.argsort(jnp.where(chosen, u_perm, 2.0 + pos))
  return idx.at[targets].set(idx[sources])


def replace_indices(u_pos, u_off, idx, k):
  """Replace the entries at k random positions by those of other positions.

  u_pos, u_off: (T,) i.i.d. U[0, 1). The k positions with the smallest u_pos take the entry at
  (position + offset) mod T with offset = 1 + floor(u_off * (T - 1)), uniform in 1..T-1.
  """
  t = idx.shape[0]
  if t < 2:
    return idx
  chosen = _chosen(u_pos, k)
  offset = 1 + jnp.minimum(jnp.floor(u_off * (t - 1)), t - 2).astype(jnp.int32)
  return jnp.where(chosen, idx[(jnp.arange(t) + offset) % t], idx)


def temporal_indices(key, num_frames: int, cfg: TemporalConfig):
  """Frame order of one augmented clip: (idx (T,) int32, {'reversed', 'shuffled', 'replaced'}).

  'shuffled' and 'replaced' are the drawn frame counts k (0 when the op is off). All draws come
  from one uniform vector (5 + 4T,), a single threefry call (each call costs compile time).
  """
  t = num_frames
  idx = jnp.arange(t, dtype=jnp.int32)
  zero = jnp.zeros((), jnp.int32)
  if not cfg.enabled:
    return idx, {"reversed": jnp.asarray(False), "shuffled": zero, "replaced": zero}
  u = jax.random.uniform(key, (5 + 4 * t,))
  rev = u[0] < cfg.reverse_prob
  n_shuf = _count(u[1], u[2], cfg.shuffle_prob, cfg.shuffle_max, t)
  n_repl = _count(u[3], u[4], cfg.replace_prob, cfg.replace_max, t)
  v = u[5:].reshape(4, t)
  idx = reverse_indices(idx, rev)
  idx = shuffle_indices(v[0], v[1], idx, n_shuf)
  idx = replace_indices(v[2], v[3], idx, n_repl)
  return idx, {"reversed": rev, "shuffled": n_shuf, "replaced": n_repl}


def augment_video_and_order(key, clip, cfg: VideoAugmentConfig):
  """``augment_video`` plus what the temporal group did: (clip, idx (T,), temporal info)."""
  if clip.ndim != 4:
    raise ValueError(f"augment_video expects one clip (T, H, W, C); got shape {clip.shape}")
  k_t, k_s = jax.random.split(key)
  idx, info = temporal_indices(k_t, clip.shape[0], cfg.temporal)
  return augment.augment_clip(k_s, clip[idx], cfg.spatial), idx, info


def augment_video(key, clip, cfg: VideoAugmentConfig):
  """One clip: uint8 (T, H, W, C) -> float32 (T, out_h, out_w, C); temporal, then spatial."""
  return augment_video_and_order(key, clip, cfg)[0]


def augment_video_batch(key, clips, cfg: VideoAugmentConfig, axis_name=None):
  """Clips (B, T, H, W, C); keys from global example indices (augment.example_keys)."""
  if clips.ndim != 5:
    raise ValueError(f"augment_video_batch expects clips (B, T, H, W, C); got {clips.shape}")
  keys = augment.example_keys(key, clips.shape[0], axis_name)
  return jax.vmap(lambda k, x: augment_video(k, x, cfg))(keys, clips)
