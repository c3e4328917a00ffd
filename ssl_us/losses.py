"""Contrastive and regression losses, written per device with optional cross-device negatives.

Every loss takes the *local* embeddings of one device. With ``axis_name`` set (inside
``jax.shard_map`` over that mesh axis) the embeddings of all devices are gathered with
``jax.lax.all_gather`` (which is differentiable: its transpose scatters the gradient back) and
the returned value is the loss over the global batch, identical on every device. Without
``axis_name`` the local batch is the global batch. Value and gradient agree between the two.

View ordering of the 2N anchors is [z_a (N rows); z_b (N rows)] over the *global* batch, so the
partner of row i < N is row N + i.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_MASK = -1e9  # large negative instead of -inf keeps softmax gradients finite in bf16/f32


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def _check_temperature(temperature):
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")


class PairLogits(NamedTuple):
  """Similarities of the local 2n anchors against all 2N global views."""
  logits: jax.Array     # (2n, 2N) cosine similarity / temperature, self entries masked
  self_idx: jax.Array   # (2n,) global column of each anchor itself
  pos_idx: jax.Array    # (2n,) global column of each anchor's augmented partner
  n_global: int         # N


def pair_logits(z_a, z_b, *, temperature, axis_name=None) -> PairLogits:
  """Masked similarity logits of local anchors against the gathered global views."""
  _check_temperature(temperature)
  if z_a.shape != z_b.shape or z_a.ndim != 2:
    raise ValueError(f"z_a and z_b must both be (n, d); got {z_a.shape} and {z_b.shape}")
  za, zb = l2_normalize(z_a), l2_normalize(z_b)
  n = za.shape[0]
  if axis_name is None:
    ga, gb, offset = za, zb, 0
  else:
    ga = jax.lax.all_gather(za, axis_name, tiled=True)
    gb = jax.lax.all_gather(zb, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * n
  big_n = ga.shape[0]
  anchors = jnp.concatenate([za, zb], axis=0)          # (2n, d)
  keys = jnp.concatenate([ga, gb], axis=0)             # (2N, d)
  logits = anchors @ keys.T / temperature              # (2n, 2N)
  local = jnp.arange(n)
  self_idx = jnp.concatenate([offset + local, big_n + offset + local])
  pos_idx = jnp.concatenate([big_n + offset + local, offset + local])
  is_self = self_idx[:, None] == jnp.arange(2 * big_n)[None, :]
  logits = jnp.where(is_self, _MASK, logits)
  return PairLogits(logits, self_idx, pos_idx, big_n)


def _global_mean(x, axis_name):
  m = jnp.mean(x)
  return m if axis_name is None else jax.lax.pmean(m, axis_name)


def nt_xent(z_a, z_b, *, temperature, axis_name=None):
  """NT-Xent (papers' Eq. 1), mean over all 2N anchors of the global batch.

  l_i = -log( exp(sim(z_i, z_j(i))/t) / sum_{k != i} exp(sim(z_i, z_k)/t) ).
  """
  return nt_xent_and_metrics(z_a, z_b, temperature=temperature, axis_name=axis_name)[0]


def nt_xent_and_metrics(z_a, z_b, *, temperature, axis_name=None):
  """NT-Xent plus contrastive top-1 accuracy and mean softmax entropy (global means)."""
  pl = pair_logits(z_a, z_b, temperature=temperature, axis_name=axis_name)
  log_den = jax.nn.logsumexp(pl.logits, axis=-1)
  pos = jnp.take_along_axis(pl.logits, pl.pos_idx[:, None], axis=-1)[:, 0]
  loss = _global_mean(log_den - pos, axis_name)
  metrics = _contrastive_metrics(pl, log_den, axis_name)
  return loss, metrics


def _contrastive_metrics(pl: PairLogits, log_den, axis_name):
  logits = jax.lax.stop_gradient(pl.logits)
  log_den = jax.lax.stop_gradient(log_den)
  acc = (jnp.argmax(logits, axis=-1) == pl.pos_idx).astype(jnp.float32)
  logp = logits - log_den[:, None]
  p = jnp.exp(logp)
  # Masked self entries have p == 0 exactly (exp(-1e9)); 0 * log 0 contributes 0.
  entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
  return {"contrastive_acc": _global_mean(acc, axis_name),
          "contrastive_entropy": _global_mean(entropy, axis_name)}


def byol(p_a, p_b, z_a, z_b, *, axis_name=None):
  """Symmetric BYOL regression loss, mean over the global batch.

  Per example: 2 - 2 cos(p_a, sg(z_b)) + 2 - 2 cos(p_b, sg(z_a)). p are online predictions,
  z target projections; no gradient reaches z.
  """
  z_a, z_b = jax.lax.stop_gradient(z_a), jax.lax.stop_gradient(z_b)
  cos_ab = jnp.sum(l2_normalize(p_a) * l2_normalize(z_b), axis=-1)
  cos_ba = jnp.sum(l2_normalize(p_b) * l2_normalize(z_a), axis=-1)
  return _global_mean(4.0 - 2.0 * cos_ab - 2.0 * cos_ba, axis_name)


def _view_labels(labels, n, axis_name):
  """Per-example labels (n,) -> (local anchors (2n,), global keys (2N,)) in view order."""
  labels = jnp.asarray(labels)
  if labels.shape != (n,) or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be an integer array of shape ({n},) like z_a's rows, got "
                     f"{labels.dtype}{labels.shape}")
  glob = labels if axis_name is None else jax.lax.all_gather(labels, axis_name, tiled=True)
  return jnp.concatenate([labels, labels]), jnp.concatenate([glob, glob])


def awcl_positive_mask(pl: PairLogits, anchor_labels, key_labels):
  """Positive set A(i) of every local anchor as a (2n, 2N) bool mask.

  A(i) = {partner j(i)} U {k != i : label_i >= 0 and label_k == label_i}. Negative labels mean
  "no anatomy label" and match nothing, so an unlabeled anchor's only positive is its partner.
  """
  cols = jnp.arange(2 * pl.n_global)[None, :]
  same = (anchor_labels[:, None] >= 0) & (anchor_labels[:, None] == key_labels[None, :])
  partner = cols == pl.pos_idx[:, None]
  return (same | partner) & (cols != pl.self_idx[:, None])


def awcl(z_a, z_b, labels, *, temperature, axis_name=None):
  """Anatomy-aware contrastive loss (paper 002 Eq. 3), mean over all 2N anchors.

  l_i = -1/|A(i)| sum_{a in A(i)} log( exp(sim(z_i, z_a)/t) / sum_{k != i} exp(sim(z_i, z_k)/t) )
  with A(i) from ``awcl_positive_mask``: Eq. 2 (supervised-contrastive form) for a labeled
  anchor, Eq. 1 (NT-Xent with its partner) for an unlabeled one. ``labels`` (n,) int holds one
  anatomy class per example of this device, -1 for none; both views share it.
  """
  return awcl_and_metrics(z_a, z_b, labels, temperature=temperature, axis_name=axis_name)[0]


def awcl_and_metrics(z_a, z_b, labels, *, temperature, axis_name=None):
  """AWCL loss plus contrastive accuracy/entropy and the mean |A(i)| (global means)."""
  pl = pair_logits(z_a, z_b, temperature=temperature, axis_name=axis_name)
  anchor_labels, key_labels = _view_labels(labels, z_a.shape[0], axis_name)
  pos = awcl_positive_mask(pl, anchor_labels, key_labels)
  log_den = jax.nn.logsumexp(pl.logits, axis=-1)
  log_prob = pl.logits - log_den[:, None]
  num_pos = jnp.sum(pos, axis=-1)
  per_anchor = -jnp.sum(jnp.where(pos, log_prob, 0.0), axis=-1) / num_pos
  metrics = _contrastive_metrics(pl, log_den, axis_name)
  metrics["awcl_num_positives"] = _global_mean(num_pos.astype(jnp.float32), axis_name)
  return _global_mean(per_anchor, axis_name), metrics
