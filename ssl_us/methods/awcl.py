"""AWCL (paper 002): SimCLR's network and views, with anatomy-aware positives.

``config.awcl.pairs`` picks how the batch is composed, so the paper's comparison runs on the
same frames (every ``frame_every``-th record of each video) with the same network and loss code:

- ``anatomy`` (AWCL): ``AnatomySampler``; a share ``anatomy_ratio`` of each global batch is
  labeled at ``granularity`` ('coarse' or 'fine'); ``losses.awcl`` makes all same-anatomy views
  positives (Eq. 2) and the unlabeled ones plain NT-Xent anchors (Eq. 1).
- ``simclr``: the same sampler with anatomy_ratio 0, labels hidden: losses.awcl is NT-Xent.
- ``clpi``: ``SameVideoSampler``; the two views are augmentations of two different frames of one
  video (or patient, ``clpi_group``), no video twice in a global batch; labels hidden.

Both views go through the network in one forward pass, as in SimCLR.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_us import augment, losses
from ssl_us.methods.simclr import SimCLR
from ssl_us.samplers_frames import AnatomySampler, SameVideoSampler

PAIRS = ("anatomy", "simclr", "clpi")


def make_awcl_sampler(awcl_config):
  """The sampler of ``config.awcl``: fields pairs, granularity, anatomy_ratio, frame_every,
  clpi_group."""
  c = awcl_config
  if c.pairs == "anatomy":
    return AnatomySampler(granularity=c.granularity, anatomy_ratio=c.anatomy_ratio,
                          unlabeled_every=c.frame_every)
  if c.pairs == "simclr":
    return AnatomySampler(granularity=c.granularity, anatomy_ratio=0.0,
                          unlabeled_every=c.frame_every)
  if c.pairs == "clpi":
    return SameVideoSampler(group=c.clpi_group, every=c.frame_every)
  raise ValueError(f"config.awcl.pairs={c.pairs!r}; use one of {PAIRS}")


class AWCL(SimCLR):
  """Batches hold ``image`` (and ``image_b`` for CLPI pairs) uint8 and ``anatomy`` int32."""

  def make_sampler(self, config):
    return make_awcl_sampler(config.awcl)

  def views(self, batch, rng):
    """Two augmented views: of ``image`` twice, or of ``image`` and ``image_b`` (CLPI)."""
    if "image_b" not in batch:
      return super().views(batch, rng)
    k_a, k_b = jax.random.split(rng)
    return (augment.augment_batch(k_a, batch["image"], self.aug, self.axis_name),
            augment.augment_batch(k_b, batch["image_b"], self.aug, self.axis_name))

  def objective(self, out, batch):
    z_a, z_b = jnp.split(out["z"], 2)
    loss, metrics = losses.awcl_and_metrics(z_a, z_b, batch["anatomy"],
                                            temperature=self.temperature,
                                            axis_name=self.axis_name, **self.loss_kw)
    metrics["labeled_fraction"] = _labeled_fraction(batch["anatomy"], self.axis_name)
    return loss, metrics


def _labeled_fraction(labels, axis_name):
  """Share of the global batch's examples with an anatomy label (label >= 0)."""
  m = jnp.mean((labels >= 0).astype(jnp.float32))
  return m if axis_name is None else jax.lax.pmean(m, axis_name)
