"""Contrastive and regression losses, written per device with optional cross-device negatives.

Every loss takes the *local* embeddings of one device. With ``axis_name`` set (inside
``jax.shard_map`` over that mesh axis) the embeddings of all devices are gathered with
``jax.lax.all_gather`` (which is differentiable: its transpose scatters the gradient back) and
the returned value is the loss over the global batch, identical on every device. Without
``axis_name`` the local batch is the global batch. Value and gradient agree between the two.

View ordering of the 2N anchors is [z_a (N rows); z_b (N rows)] over the *global* batch, so the
partner of row i < N is row N + i.

Two implementations of NT-Xent and AWCL, equal in value and gradient (``impl``):

- ``dense``: each device builds its (2n x 2N) logits against the gathered global batch.
- ``ring``: the key blocks (each device's 2n views) travel around the mesh axis with
  ``jax.lax.ppermute``; each device accumulates, per local anchor, an online logsumexp of the
  denominator, the sum and count of its positives' logits, and for the metrics the largest
  non-partner logit and sum p*logit, one (2n x 2n) block at a time. The backward pass
  (``jax.custom_vjp``) recomputes every block in a second pass of the ring, sending each block's
  key gradient along with it until it is home again, so no (2n x 2N) array exists on a device
  in either pass: memory is O(n^2 + n d), whatever N.
- ``auto``: ``ring`` when the dense logits would exceed ``dense_limit_bytes``.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ssl_us import parallel

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


IMPLS = ("dense", "ring", "auto")
DENSE_LIMIT_BYTES = 1 << 30   # 'auto': the dense (2n x 2N) float32 logits above this -> ring


def resolve_impl(impl: str, n: int, axis_name, dense_limit_bytes: int = DENSE_LIMIT_BYTES):
  """'dense' or 'ring' for ``impl`` on a device holding n examples of the global batch."""
  if impl not in IMPLS:
    raise ValueError(f"loss impl {impl!r}; use one of {IMPLS}")
  if impl != "auto":
    return impl
  devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
  return "ring" if (2 * n) * (2 * n * devices) * 4 > dense_limit_bytes else "dense"


def nt_xent(z_a, z_b, *, temperature, axis_name=None, impl="dense"):
  """NT-Xent (papers' Eq. 1), mean over all 2N anchors of the global batch.

  l_i = -log( exp(sim(z_i, z_j(i))/t) / sum_{k != i} exp(sim(z_i, z_k)/t) ).
  """
  return nt_xent_and_metrics(z_a, z_b, temperature=temperature, axis_name=axis_name,
                             impl=impl)[0]


def nt_xent_and_metrics(z_a, z_b, *, temperature, axis_name=None, impl="dense",
                        dense_limit_bytes: int = DENSE_LIMIT_BYTES):
  """NT-Xent plus contrastive top-1 accuracy and mean softmax entropy (global means)."""
  if resolve_impl(impl, z_a.shape[0], axis_name, dense_limit_bytes) == "ring":
    return _ring_loss_and_metrics(z_a, z_b, None, temperature, axis_name)
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


def awcl(z_a, z_b, labels, *, temperature, axis_name=None, impl="dense"):
  """Anatomy-aware contrastive loss (paper 002 Eq. 3), mean over all 2N anchors.

  l_i = -1/|A(i)| sum_{a in A(i)} log( exp(sim(z_i, z_a)/t) / sum_{k != i} exp(sim(z_i, z_k)/t) )
  with A(i) from ``awcl_positive_mask``: Eq. 2 (supervised-contrastive form) for a labeled
  anchor, Eq. 1 (NT-Xent with its partner) for an unlabeled one. ``labels`` (n,) int holds one
  anatomy class per example of this device, -1 for none; both views share it.
  """
  return awcl_and_metrics(z_a, z_b, labels, temperature=temperature, axis_name=axis_name,
                          impl=impl)[0]


def awcl_and_metrics(z_a, z_b, labels, *, temperature, axis_name=None, impl="dense",
                     dense_limit_bytes: int = DENSE_LIMIT_BYTES):
  """AWCL loss plus contrastive accuracy/entropy and the mean |A(i)| (global means)."""
  if resolve_impl(impl, z_a.shape[0], axis_name, dense_limit_bytes) == "ring":
    _view_labels(labels, z_a.shape[0], None)   # the same checks as dense
    return _ring_loss_and_metrics(z_a, z_b, jnp.asarray(labels), temperature, axis_name,
                                  with_num_positives=True)
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


# ----------------------------------------------------------------------------------------------
# Ring implementation (see the module docstring).


def _ring_loss_and_metrics(z_a, z_b, labels, temperature, axis_name, with_num_positives=False):
  """NT-Xent (labels None) or AWCL over the ring; the dense functions' outputs."""
  _check_temperature(temperature)
  if z_a.shape != z_b.shape or z_a.ndim != 2:
    raise ValueError(f"z_a and z_b must both be (n, d); got {z_a.shape} and {z_b.shape}")
  n = z_a.shape[0]
  anchors = jnp.concatenate([l2_normalize(z_a), l2_normalize(z_b)])    # (2n, d) float32
  view_labels = (jnp.full((2 * n,), -1, jnp.int32) if labels is None
                 else jnp.concatenate([labels, labels]).astype(jnp.int32))
  per_anchor, stats = _ring(anchors, view_labels, float(temperature), axis_name)
  log_den, s1, max_other, partner, num_pos = stats
  metrics = {
      "contrastive_acc": _global_mean((partner > max_other).astype(jnp.float32), axis_name),
      "contrastive_entropy": _global_mean(log_den - s1, axis_name)}
  if with_num_positives:
    metrics["awcl_num_positives"] = _global_mean(num_pos, axis_name)
  return _global_mean(per_anchor, axis_name), metrics


def _ring_size(axis_name):
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def _shift(x, axis_name):
  """Every device's x to the next device on the ring (device d gets d - 1's)."""
  size = jax.lax.axis_size(axis_name)
  return jax.lax.ppermute(x, axis_name, [(i, (i + 1) % size) for i in range(size)])


# Rows of anchors per tile of a block: a block's logits are computed for this many anchors at a
# time (one float32 (tile x 2n) array), so a device's memory stays bounded at large n too.
RING_TILE_ROWS = 1024


def _tile_rows(two_n: int) -> int:
  """The largest divisor of 2n that is at most RING_TILE_ROWS (2n itself when it fits)."""
  max_rows = RING_TILE_ROWS
  if two_n <= max_rows:
    return two_n
  return max(d for d in range(1, max_rows + 1) if two_n % d == 0)


def _block(anchors, rows, keys, anchor_labels, key_labels, home, temperature):
  """Logits of anchor rows ``rows`` (of the local 2n) against one key block (2n keys), with the
  self and positive masks. ``home``: the block is this device's own (step 0), where anchor r
  meets itself (key r) and its partner (key r + n mod 2n)."""
  two_n = keys.shape[0]
  logits = anchors @ keys.T / temperature                          # (tile, 2n) float32
  cols = jnp.arange(two_n)[None, :]
  is_self = home & (rows[:, None] == cols)
  is_partner = home & ((rows[:, None] + two_n // 2) % two_n == cols)
  same = (anchor_labels[:, None] >= 0) & (anchor_labels[:, None] == key_labels[None, :])
  positive = (same | is_partner) & ~is_self
  return jnp.where(is_self, _MASK, logits), is_self, is_partner, positive


def _tiles(x, tile):
  return x.reshape((x.shape[0] // tile, tile) + x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _ring(anchors, view_labels, temperature, axis_name):
  """Per-anchor loss (2n,) and statistics; see _ring_forward."""
  return _ring_forward(anchors, view_labels, temperature, axis_name)[0]


def _ring_forward(anchors, view_labels, temperature, axis_name):
  two_n = anchors.shape[0]
  tile = _tile_rows(two_n)
  rows = jnp.arange(two_n)

  def visit_tile(acc, a, r, y, keys, key_labels, home):
    m, s0, s1, pos_sum, num_pos, max_other, partner = acc
    logits, is_self, is_partner, positive = _block(a, r, keys, y, key_labels, home,
                                                   temperature)
    live = jnp.where(is_self, -jnp.inf, logits)
    m_new = jnp.maximum(m, live.max(axis=1))
    scale = jnp.exp(m - m_new)
    e = jnp.exp(live - m_new[:, None])
    s0 = s0 * scale + e.sum(axis=1)
    s1 = s1 * scale + (e * jnp.where(is_self, 0.0, logits)).sum(axis=1)
    pos_sum = pos_sum + jnp.where(positive, logits, 0.0).sum(axis=1)
    num_pos = num_pos + positive.sum(axis=1)
    max_other = jnp.maximum(max_other, jnp.where(is_self | is_partner, -jnp.inf,
                                                 logits).max(axis=1))
    partner = partner + jnp.where(is_partner, logits, 0.0).sum(axis=1)
    return (m_new, s0, s1, pos_sum, num_pos, max_other, partner)

  def visit(acc, keys, key_labels, home):
    per_tile = lambda xs: visit_tile(xs[0], xs[1], xs[2], xs[3], keys, key_labels, home)
    out = jax.lax.map(per_tile, (jax.tree.map(lambda v: _tiles(v, tile), acc),
                                 _tiles(anchors, tile), _tiles(rows, tile),
                                 _tiles(view_labels, tile)))
    return jax.tree.map(lambda v: v.reshape(two_n), out)

  neg_inf = jnp.full((two_n,), -jnp.inf, jnp.float32)
  zeros = jnp.zeros((two_n,), jnp.float32)
  acc = (neg_inf, zeros, zeros, zeros, zeros, neg_inf, zeros)
  if axis_name is not None:
    acc = parallel.varying(acc, axis_name)
  acc = visit(acc, anchors, view_labels, True)
  steps = _ring_size(axis_name) - 1
  if steps:
    def body(carry, _):
      acc, keys, key_labels = carry
      keys, key_labels = _shift(keys, axis_name), _shift(key_labels, axis_name)
      return (visit(acc, keys, key_labels, False), keys, key_labels), None
    carry = parallel.varying((acc, anchors, view_labels), axis_name)
    (acc, _, _), _ = jax.lax.scan(body, carry, None, length=steps)
  m, s0, s1, pos_sum, num_pos, max_other, partner = acc
  log_den = m + jnp.log(s0)
  per_anchor = log_den - pos_sum / num_pos
  stats = (log_den, s1 / s0, max_other, partner, num_pos)
  return (per_anchor, jax.lax.stop_gradient(stats)), (anchors, view_labels, log_den, num_pos)


def _ring_fwd(anchors, view_labels, temperature, axis_name):
  return _ring_forward(anchors, view_labels, temperature, axis_name)


def _ring_bwd(temperature, axis_name, residuals, cotangents):
  """d per_anchor_i / d logit_ik = p_ik - [k in A(i)] / |A(i)|; a second pass of the ring
  recomputes each block (tile by tile) and carries its key gradient home with it."""
  anchors, view_labels, log_den, num_pos = residuals
  g = cotangents[0]                                                    # (2n,)
  two_n = anchors.shape[0]
  tile = _tile_rows(two_n)
  rows = jnp.arange(two_n)

  def visit(keys, key_labels, home):
    """(d anchors (2n, d), d keys (2n, d)) of this block, accumulated over anchor tiles."""
    def per_tile(d_keys, xs):
      a, r, y, ld, npos, gt = xs
      logits, is_self, _, positive = _block(a, r, keys, y, key_labels, home, temperature)
      p = jnp.where(is_self, 0.0, jnp.exp(logits - ld[:, None]))
      dlogits = gt[:, None] * (p - positive / npos[:, None]) / temperature
      return d_keys + dlogits.T @ a, dlogits @ keys
    xs = tuple(_tiles(v, tile) for v in (anchors, rows, view_labels, log_den, num_pos, g))
    d_keys0 = jnp.zeros_like(keys)
    if axis_name is not None:
      d_keys0 = parallel.varying(d_keys0, axis_name)
    d_keys, d_anchors = jax.lax.scan(per_tile, d_keys0, xs)
    return d_anchors.reshape(anchors.shape), d_keys

  d_anchors, d_keys = visit(anchors, view_labels, True)
  size = _ring_size(axis_name)
  if size > 1:
    def body(carry, _):
      d_anchors, keys, key_labels, d_keys = carry
      keys, key_labels, d_keys = (_shift(x, axis_name) for x in (keys, key_labels, d_keys))
      da, dk = visit(keys, key_labels, False)
      return (d_anchors + da, keys, key_labels, d_keys + dk), None
    carry = parallel.varying((d_anchors, anchors, view_labels, d_keys), axis_name)
    (d_anchors, _, _, d_keys), _ = jax.lax.scan(body, carry, None, length=size - 1)
    d_keys = _shift(d_keys, axis_name)                   # the last hop: every block home
  return d_anchors + d_keys, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# ----------------------------------------------------------------------------------------------
# USCL (paper 003): NT-Xent plus the cross-entropy of the labeled views.


def masked_cross_entropy(logits, labels, *, axis_name=None):
  """Mean softmax cross-entropy over the examples with label >= 0 of the global batch.

  logits (n, C), labels (n,) int with -1 = unlabeled. Returns (loss, number of labeled examples
  in the global batch); loss = sum_i [y_i >= 0] CE(logits_i, y_i) / max(#labeled, 1), so a batch
  without labels gives 0 with zero gradient.
  """
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"need logits (n, C) and labels (n,), got {logits.shape} and {labels.shape}")
  labeled = labels >= 0
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_p, jnp.where(labeled, labels, 0)[:, None], axis=-1)[:, 0]
  total = jnp.sum(jnp.where(labeled, nll, 0.0))
  count = jnp.sum(labeled).astype(jnp.float32)
  if axis_name is not None:
    total, count = jax.lax.psum((total, count), axis_name)
  return total / jnp.maximum(count, 1.0), count


def uscl(z_a, z_b, logits_a, logits_b, labels, *, temperature, lambda_ce, axis_name=None,
         **loss_kw):
  """Paper 003 Eq. 1: L = NT-Xent(z_a, z_b) + lambda_ce * CE over the labeled views of both.

  z_* (n, d) projections and logits_* (n, C) classifier outputs of view 1 and view 2; labels (n,)
  the video's class or -1. ``loss_kw``: nt_xent_and_metrics's impl options. Returns
  (loss, metrics).
  """
  con, metrics = nt_xent_and_metrics(z_a, z_b, temperature=temperature,
                                     axis_name=axis_name, **loss_kw)
  ce, count = masked_cross_entropy(jnp.concatenate([logits_a, logits_b]),
                                   jnp.concatenate([labels, labels]), axis_name=axis_name)
  metrics = dict(metrics, contrastive_loss=con, ce_loss=ce, num_labeled=count / 2)
  return con + lambda_ce * ce, metrics
