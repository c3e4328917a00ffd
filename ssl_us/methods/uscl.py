"""USCL (paper 003): mixed-frame positive pairs, one per video, plus a linear classifier.

Batches (``VideoPairSampler``) hold ``frames`` uint8 (n, 3, H, W, 1) = f1, f2, f3 of one video in
frame order, no video twice in a global batch, and ``label`` (n,) int32 (-1 where the video's
label is not used, see ``config.uscl.label_fraction``). Per step and per video one
lambda ~ Beta(alpha, beta) mixes the pair (``mix_views``):

  view_1 = lambda * f2 + (1 - lambda) * f1,    view_2 = lambda * f2 + (1 - lambda) * f3;

each view is augmented and goes through the network once (both views in one forward pass); the
loss (``losses.uscl``) is NT-Xent on the projections plus lambda_ce * cross-entropy of the linear
classifier on the encoder features h of both views, averaged over the labeled views only
(label -1 = none); without labeled views the CE term is exactly 0.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_us import augment, losses, models
from ssl_us.methods.simclr import SimCLR
from ssl_us.samplers_frames import VideoPairSampler


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


class ClassifiedContrastiveModel(nn.Module):
  """encoder -> {'h', 'z': head(h), 'logits': Dense(num_classes)(h)}.

  Parameters {'encoder', 'head', 'classifier'}: the encoder's subtree is laid out as in
  ``models.ContrastiveModel``, so ``SimCLR.encoder`` extracts it unchanged.
  """
  encoder: nn.Module
  head: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    h = self.encoder(x, train=train)
    return {"h": h, "z": self.head(h, train=train),
            "logits": nn.Dense(self.num_classes, name="classifier")(h)}


class USCL(SimCLR):
  """config.uscl: alpha, beta (mixing Beta), lambda_ce, label_fraction, label_seed,
  num_classes."""
  view_key = "frames"

  def __init__(self, config, axis_name=None):
    super().__init__(config, axis_name)
    u = config.uscl
    if u.num_classes < 1:
      raise ValueError(f"config.uscl.num_classes must be >= 1, got {u.num_classes}")
    if u.alpha <= 0 or u.beta <= 0:
      raise ValueError(f"config.uscl.alpha and beta must be > 0, got {u.alpha}, {u.beta}")
    base: models.ContrastiveModel = self.model
    self.model = ClassifiedContrastiveModel(encoder=base.encoder, head=base.head,
                                            num_classes=u.num_classes)
    self.alpha, self.beta = float(u.alpha), float(u.beta)
    self.lambda_ce = float(u.lambda_ce)

  def make_sampler(self, config):
    u = config.uscl
    return VideoPairSampler(label_fraction=u.label_fraction, label_seed=u.label_seed,
                            num_classes=u.num_classes)

  def init(self, rng, batch):
    """Initialised on the anchor frames f2."""
    return super().init(rng, {self.view_key: batch[self.view_key][:, 1]})

  def views(self, batch, rng):
    """Mixed pair (one Beta draw per video, keyed by its global index), then augmented."""
    k_mix, k_a, k_b = jax.random.split(rng, 3)
    frames = batch[self.view_key]
    keys = augment.example_keys(k_mix, frames.shape[0], self.axis_name)
    m_a, m_b = mix_views(frames, sample_mix_weights(keys, self.alpha, self.beta))
    return (augment.augment_batch(k_a, m_a, self.aug, self.axis_name),
            augment.augment_batch(k_b, m_b, self.aug, self.axis_name))

  def objective(self, out, batch):
    z_a, z_b = jnp.split(out["z"], 2)
    logits_a, logits_b = jnp.split(out["logits"], 2)
    return losses.uscl(z_a, z_b, logits_a, logits_b, batch["label"],
                       temperature=self.temperature, lambda_ce=self.lambda_ce,
                       axis_name=self.axis_name, **self.loss_kw)
