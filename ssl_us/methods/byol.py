"""BYOL on clips (paper 001); its SimCLR alternative is methods/simclr_video.py.

Clips and their two views come from ``simclr_video.ClipViews`` (config.clips, config.aug,
config.temporal_aug). Both views go through each network in one forward pass (2n clips per
device), with global BatchNorm (axis_name) in every network.

BYOL (Grill et al. 2020), per step with views v_a, v_b:
  online  f_theta -> g_theta -> q_theta:  p = q(g(f(v)))     (params: encoder, head, predictor)
  target  f_xi -> g_xi:                   z' = g_xi(f_xi(v))  (variables['target'])
  loss  = mean over the global batch of 2 - 2 cos(p_a, sg(z'_b)) + 2 - 2 cos(p_b, sg(z'_a))
          (ssl_us.losses.byol; the target outputs are stop-gradiented and the target is not a
          parameter, so gradients reach the online network only)
  after the optimizer step k: xi <- tau_k xi + (1 - tau_k) theta  (ema.ema_update, encoder and
          projection head), tau_k from config.byol (constant 0.99 as in paper 001, or BYOL's
          cosine from tau_base to 1 over tau_steps, default num_steps).
The target starts as a copy of the online network; its BatchNorm statistics come from its own
train-mode forward pass. variables = {'params', 'batch_stats', 'target': {'params',
'batch_stats'}}, all saved in checkpoints. Downstream use takes the online encoder.

Metrics besides the loss: ``z_std`` (per-dimension standard deviation of the l2-normalised
online projections over the global batch, times sqrt(dim): about 1 for spread-out embeddings,
0 at collapse), ``padded_clip_frac`` and ``padded_frame_frac`` (looped/padded short videos),
``view_distance`` (source frames between the two views' clips).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_us import ema, losses, models
from ssl_us.methods.simclr import SimCLR, build_model
from ssl_us.methods.simclr_video import ClipViews

BYOL_KEYS = ("tau_base", "tau_schedule", "tau_steps", "predictor_hidden")


def embedding_spread(z, axis_name=None):
  """sqrt(d) * mean_j std_i(z_ij / |z_i|) over the global batch: ~1 spread out, 0 collapsed."""
  zn = losses.l2_normalize(z)
  mean = _pmean(jnp.mean(zn, axis=0), axis_name)
  var = _pmean(jnp.mean(zn * zn, axis=0), axis_name) - mean * mean
  return jnp.sqrt(zn.shape[-1]) * jnp.mean(jnp.sqrt(jnp.maximum(var, 0.0)))


def _pmean(x, axis_name):
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


class OnlineNetwork(nn.Module):
  """encoder -> projection head -> predictor; {'h', 'z', 'p'}. Subtrees laid out as in
  models.ContrastiveModel ('encoder', 'head'), plus 'predictor'."""
  encoder: nn.Module
  head: nn.Module
  predictor: nn.Module

  def __call__(self, x, train: bool = True):
    h = self.encoder(x, train=train)
    z = self.head(h, train=train)
    return {"h": h, "z": z, "p": self.predictor(z, train=train)}


class BYOL(ClipViews, SimCLR):
  """config.byol: tau_base, tau_schedule ('constant' | 'cosine'), tau_steps (0: num_steps),
  predictor_hidden; the projection head is config.model.head_hidden / head_out."""

  def __init__(self, config, axis_name=None):
    super().__init__(config, axis_name)
    b = config.byol
    unknown = sorted(set(b) - set(BYOL_KEYS))
    if unknown:
      raise ValueError(f"unknown config.byol keys {unknown}; known: {sorted(BYOL_KEYS)}")
    if b.tau_schedule == "cosine" and b.tau_steps <= 0 and config.get("num_epochs", 0) > 0:
      raise ValueError("config.byol.tau_schedule='cosine' needs the total step count when the "
                       "model is built: set config.byol.tau_steps (num_epochs is resolved later)")
    steps = b.tau_steps if b.tau_steps > 0 else config.num_steps
    self.tau = ema.make_tau_schedule(b.tau_schedule, b.tau_base, steps)
    self.target_model = build_model(config, axis_name)      # encoder + projection head
    predictor = models.MLPHead(hidden=tuple(b.predictor_hidden), out_dim=config.model.head_out,
                               dtype=models.compute_dtype(config.model.dtype), axis_name=axis_name)
    self.model = OnlineNetwork(encoder=self.target_model.encoder, head=self.target_model.head,
                               predictor=predictor)

  def init(self, rng, batch):
    """Online variables and a target that copies the online encoder and projection head."""
    variables = super().init(rng, batch)
    params, stats = variables["params"], variables["batch_stats"]
    target = {"params": {k: params[k] for k in ("encoder", "head")},
              "batch_stats": {k: stats[k] for k in ("encoder", "head") if k in stats}}
    return {**variables, "target": jax.tree.map(jnp.copy, target)}

  def target_forward(self, variables, x, rng):
    """Train-mode target pass: (stop-gradiented projections z', updated target batch_stats)."""
    if self.axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(self.axis_name))
    out, state = self.target_model.apply(variables["target"], x, train=True,
                                         mutable=["batch_stats"], rngs={"dropout": rng})
    return jax.lax.stop_gradient(out["z"]), state["batch_stats"]

  # The loss is a mean over examples (no negatives): microbatches accumulate gradients.
  batch_coupled = False

  def embed(self, params, variables, x, rng):
    """Online outputs {'h', 'z', 'p'} plus the target's 'z_t' (stop-gradiented)."""
    k_online, k_target = jax.random.split(rng)
    out, batch_stats = self.forward(params, variables, x, k_online)
    z_t, target_stats = self.target_forward(variables, x, k_target)
    new_vars = {"batch_stats": batch_stats,
                "target": {"params": variables["target"]["params"],
                           "batch_stats": target_stats}}
    return {**out, "z_t": z_t}, new_vars

  def objective(self, out, batch):
    p_a, p_b = jnp.split(out["p"], 2)
    zt_a, zt_b = jnp.split(out["z_t"], 2)
    loss = losses.byol(p_a, p_b, zt_a, zt_b, axis_name=self.axis_name)
    metrics = {"z_std": embedding_spread(jax.lax.stop_gradient(out["z"]), self.axis_name),
               **self.clip_metrics(batch)}
    return loss, metrics

  def after_update(self, variables, params, step):
    """EMA of the online encoder and head into the target, with tau of this step."""
    online = {k: params[k] for k in ("encoder", "head")}
    target = variables["target"]
    new = ema.ema_update(target["params"], online, self.tau(step))
    return {**variables, "target": {**target, "params": new}}
