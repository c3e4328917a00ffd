"""SimCLR (papers 000 and 001's alternative): two augmented views of each example, NT-Xent.

Both views go through the network in one forward pass (2n examples per device), so BatchNorm
statistics are computed over both views of the global batch, as in SimCLR's global BN.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_us import augment, losses, models
from ssl_us.samplers_frames import FrameSampler


def build_model(config, axis_name) -> models.ContrastiveModel:
  m = config.model
  dtype = models.compute_dtype(m.dtype)
  kwargs = dict(m.encoder_kwargs)
  if m.get("remat", False):
    kwargs["remat"] = True
  encoder = models.make_encoder(m.encoder, dtype=dtype, axis_name=axis_name, **kwargs)
  head = models.MLPHead(hidden=tuple(m.head_hidden), out_dim=m.head_out, dtype=dtype,
                        axis_name=axis_name, bn_last=m.get("head_bn_last", False))
  return models.ContrastiveModel(encoder=encoder, head=head)


class SimCLR:
  """Views from ``batch[view_key]`` (uint8 images (n, H, W, C) or clips (n, T, H, W, C))."""
  view_key = "image"

  def __init__(self, config, axis_name=None):
    self.config = config
    self.axis_name = axis_name
    self.model = build_model(config, axis_name)
    self.aug = augment.AugmentConfig.from_config(config.aug, out_size=config.image_size)
    self.temperature = float(config.loss.temperature)
    # NT-Xent / AWCL implementation (losses.IMPLS): dense logits, or the ring over the mesh axis.
    self.loss_kw = dict(impl=config.loss.get("impl", "dense"),
                        dense_limit_bytes=int(config.loss.get("dense_limit_mb", 1024) * 2**20))
    self.sampler = self.make_sampler(config)

  def make_sampler(self, config):
    del config
    return FrameSampler()

  def eval_view(self, x):
    return augment.center_view(x, self.aug)

  def init(self, rng, batch):
    x = self.eval_view(jnp.asarray(batch[self.view_key][:2]))
    k_param, k_drop = jax.random.split(rng)
    variables = self.model.init({"params": k_param, "dropout": k_drop}, x, train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

  def views(self, batch, rng):
    """Two augmented views; example keys from global indices (see augment.example_keys)."""
    k_a, k_b = jax.random.split(rng)
    x = batch[self.view_key]
    return (augment.augment_batch(k_a, x, self.aug, self.axis_name),
            augment.augment_batch(k_b, x, self.aug, self.axis_name))

  def forward(self, params, variables, x, rng):
    """Train-mode forward pass; returns (outputs, updated batch_stats).

    ``rng`` is the same on every device; dropout masks are drawn per device from it.
    """
    if self.axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(self.axis_name))
    out, state = self.model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  x, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": rng})
    return out, state["batch_stats"]

  # A step is views -> embed -> objective. ``loss`` runs them on the whole per-device batch;
  # ssl_us.gradcache runs embed chunk by chunk (config.microbatches) around the same objective.
  # batch_coupled: the objective couples the examples of the batch (negatives), so chunks need
  # gradient caching; False (BYOL) means it is a mean over examples: plain accumulation.
  batch_coupled = True

  def loss(self, params, variables, batch, rng):
    k_views, k_embed = jax.random.split(rng)
    x = jnp.concatenate(self.views(batch, k_views))
    out, new_vars = self.embed(params, variables, x, k_embed)
    loss, metrics = self.objective(out, batch)
    return loss, (new_vars, metrics)

  def embed(self, params, variables, x, rng):
    """Outputs of the network on the views x = [v_a; v_b] and the new (non-param) variables."""
    out, batch_stats = self.forward(params, variables, x, rng)
    return out, {"batch_stats": batch_stats}

  def objective(self, out, batch):
    """(global loss, metrics) from the outputs of ``embed`` on [v_a; v_b] and the batch."""
    del batch
    z_a, z_b = jnp.split(out["z"], 2)
    return losses.nt_xent_and_metrics(z_a, z_b, temperature=self.temperature,
                                      axis_name=self.axis_name, **self.loss_kw)

  def after_update(self, variables, params, step):
    del params, step
    return variables

  def encoder(self, variables):
    """The encoder alone, for feature extraction (single device, no axis_name)."""
    module = build_model(self.config, None).encoder
    return module, {"params": variables["params"]["encoder"],
                    "batch_stats": variables["batch_stats"].get("encoder", {})}
