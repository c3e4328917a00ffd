"""USCL (paper 003): mixed-frame positive pairs and the semi-supervised objective, on device.

A USCL example is three frames f1, f2, f3 of one video in chronological order (the sampler in
``ssl_us.samplers_frames`` guarantees one example per video in a global batch). The positive
pair mixes the anchor f2 with each perturbation frame using one weight per video,
lambda ~ Beta(alpha, beta):

  view_1 = lambda * f2 + (1 - lambda) * f1,    view_2 = lambda * f2 + (1 - lambda) * f3,

before the usual augmentations. The objective is NT-Xent on the pairs plus lambda_ce times the
cross-entropy of a linear classifier on the encoder features h of both views, averaged over the
labeled views only (label -1 = none); without labeled views the CE term is exactly 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_us import losses


def sample_mix_weights(keys, alpha: float, beta: float) -> jax.Array:
  """One lambda ~ Beta(alpha, beta) per video from its own key: keys (n,) -> (n,) float32.

  Per-example keys (``augment.example_keys``) make the draws independent of the device count.
  """
  if alpha <= 0 or beta <= 0:
    raise ValueError(f"Beta parameters must be > 0, got alpha={alpha}, beta={beta}")
  return jax.vmap(lambda k: jax.random.beta(k, alpha, beta, dtype=jnp.float32))(keys)


def mix_views(frames, lam):
  """Mixed positive pair of every video: frames (n, 3, ...) -> two (n, ...) float32 arrays.

  view_1 = lam * f2 + (1 - lam) * f1 and view_2 = lam * f2 + (1 - lam) * f3, per video, in the
  input's units (uint8 frames give float32 in [0, 255]).
  """
  if frames.ndim < 2 or frames.shape[1] != 3:
    raise ValueError(f"frames must be (n, 3, ...) = three frames per video, got {frames.shape}")
  if lam.shape != frames.shape[:1]:
    raise ValueError(f"lam must be ({frames.shape[0]},), one weight per video, got {lam.shape}")
  x = frames.astype(jnp.float32)
  w = lam.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 2))
  f1, f2, f3 = x[:, 0], x[:, 1], x[:, 2]
  return w * f2 + (1 - w) * f1, w * f2 + (1 - w) * f3


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


def uscl_loss(z_a, z_b, logits_a, logits_b, labels, *, temperature, lambda_ce, axis_name=None,
              **loss_kw):
  """Paper 003 Eq. 1: L = NT-Xent(z_a, z_b) + lambda_ce * CE over the labeled views of both.

  z_* (n, d) projections and logits_* (n, C) classifier outputs of view 1 and view 2; labels (n,)
  the video's class or -1. ``loss_kw``: losses.nt_xent_and_metrics's impl options. Returns
  (loss, metrics).
  """
  con, metrics = losses.nt_xent_and_metrics(z_a, z_b, temperature=temperature,
                                            axis_name=axis_name, **loss_kw)
  ce, count = masked_cross_entropy(jnp.concatenate([logits_a, logits_b]),
                                   jnp.concatenate([labels, labels]), axis_name=axis_name)
  metrics = dict(metrics, contrastive_loss=con, ce_loss=ce, num_labeled=count / 2)
  return con + lambda_ce * ce, metrics
