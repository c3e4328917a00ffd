"""Per-device batches beyond activation memory: gradient caching and accumulation.

``value_and_grad(method, microbatches)`` has the signature and result of
``jax.value_and_grad(method.loss, has_aux=True)``: (loss, (new_vars, metrics)), grads. With
M = ``microbatches`` > 1 each device splits its n examples into M chunks of c = n / M (chunk i
holds examples [i c, (i + 1) c) and both of their views) and only one chunk's activations are
alive at a time. Methods are views -> embed -> objective (methods/simclr.py):

- **Gradient caching** (GradCache, Gao et al. 2021), for objectives that couple the batch
  (NT-Xent, AWCL, USCL: ``method.batch_coupled``):
  1. the views of the whole per-device batch (keys from global example indices, as always);
  2. ``embed`` on every chunk, not differentiated, so no activation is kept: all outputs;
  3. the objective over the global batch (dense or ring loss) and its gradient with respect to
     the outputs, reassembled in the order of the unchunked pass;
  4. ``embed`` again on every chunk under ``jax.vjp``, pulled back with the chunk's slice of
     that cotangent; parameter gradients summed in float32 over the chunks, then over devices.
  The result is the unchunked gradient, up to float32 summation order, when the network has no
  batch coupling; it costs one more forward pass (about 1.3x the compute of a step).
- **Accumulation**, for objectives that are a mean over examples (BYOL): value and gradient of
  the objective on each chunk, averaged over the M chunks.

Both: the loss and metrics are the objective's on the outputs of all chunks (those of step 2 or
of the accumulation). BatchNorm normalises each chunk with its own statistics (over that chunk
of every device: ghost BatchNorm), and the running statistics move once per step, by the mean
of the M chunks' updates from the same old value: for the running mean that is the update the
mean of the chunk means gives; the running variance becomes the mean of the within-chunk
variances. Dropout masks are drawn per chunk (the step key folded with the chunk index), so
they depend on M too. Without BatchNorm and dropout, results do not depend on M.

Within a step, each device accumulates its own share of the gradient (the parameters are
differentiated as device-varying values) and the devices sum once at the end, not once per
chunk.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssl_us import parallel


def value_and_grad(method, microbatches: int = 1):
  """A function (params, variables, batch, rng) -> ((loss, (new_vars, metrics)), grads)."""
  if microbatches == 1:
    return jax.value_and_grad(method.loss, has_aux=True)
  step = cached if method.batch_coupled else accumulated
  return lambda params, variables, batch, rng: step(method, microbatches, params, variables,
                                                    batch, rng)


# ----------------------------------------------------------------------------------------------
# Chunk layout: the unchunked pass sees x = [v_a; v_b] (2n rows); chunk i sees
# [v_a[i c:(i + 1) c]; v_b[i c:(i + 1) c]] (2c rows).


def _pair_chunks(v_a, v_b, m):
  """(n, ...) views -> (m, 2c, ...) chunks of both views."""
  split = lambda v: v.reshape((m, v.shape[0] // m) + v.shape[1:])
  return jnp.concatenate([split(v_a), split(v_b)], axis=1)


def _unchunk(tree, m):
  """Chunk outputs (m, 2c, ...) -> (2n, ...) in the order of the unchunked pass."""
  def one(x):
    c = x.shape[1] // 2
    flat = lambda y: y.reshape((m * c,) + y.shape[2:])
    return jnp.concatenate([flat(x[:, :c]), flat(x[:, c:])])
  return jax.tree.map(one, tree)


def _chunk_like_views(tree, m):
  """(2n, ...) cotangents -> (m, 2c, ...), the inverse of ``_unchunk``."""
  def one(x):
    n = x.shape[0] // 2
    return _pair_chunks(x[:n], x[n:], m)
  return jax.tree.map(one, tree)


def _chunk_batch(batch, m):
  """Every batch entry (n, ...) -> (m, c, ...)."""
  def one(path, x):
    if x.ndim == 0 or x.shape[0] % m:
      raise ValueError(f"batch[{jax.tree_util.keystr(path)}] of shape {x.shape} does not split "
                       f"into {m} microbatches")
    return x.reshape((m, x.shape[0] // m) + x.shape[1:])
  return jax.tree_util.tree_map_with_path(one, batch)


def _chunked_views(method, m, batch, rng):
  """The views of the whole per-device batch (as ``method.loss`` makes them: the same key split)
  as (m, 2c, ...) chunks, and one embed key per chunk."""
  k_views, k_embed = jax.random.split(rng)
  v_a, v_b = method.views(batch, k_views)
  if v_a.shape[0] % m:
    raise ValueError(f"a per-device batch of {v_a.shape[0]} does not split into {m} microbatches")
  return _pair_chunks(v_a, v_b, m), _chunk_keys(k_embed, m)


def _chunk_keys(rng, m):
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(m))


def _mean_update(variables, chunk_vars):
  """old + mean over chunks of (new_i - old): the running statistics move once per step by the
  chunks' mean update; entries no chunk changes stay bit for bit."""
  old = {k: variables[k] for k in chunk_vars}
  return jax.tree.map(lambda o, new: o + jnp.mean(new - o, axis=0).astype(o.dtype),
                      old, chunk_vars)


def _sum_over_devices(grads, axis_name):
  return grads if axis_name is None else jax.lax.psum(grads, axis_name)


def _zeros_f32(params, axis_name):
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  return zeros if axis_name is None else parallel.varying(zeros, axis_name)


def _local(params, axis_name):
  """Parameters as this device's own copy: their gradient is this device's share (no psum)."""
  return params if axis_name is None else parallel.varying(params, axis_name)


def _add_f32(acc, g):
  return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)


# ----------------------------------------------------------------------------------------------
# The two strategies.


def cached(method, m, params, variables, batch, rng):
  """Gradient caching (module docstring, steps 1-4)."""
  axis = method.axis_name
  xs, keys = _chunked_views(method, m, batch, rng)

  def embed(p, x, key):
    return method.embed(p, variables, x, key)

  outs, chunk_vars = jax.lax.scan(lambda c, a: (c, embed(params, *a)), 0, (xs, keys), unroll=True)[1]
  full = jax.lax.stop_gradient(_unchunk(outs, m))
  (loss, metrics), d_full = jax.value_and_grad(
      lambda o: method.objective(o, batch), has_aux=True)(full)
  d_chunks = _chunk_like_views(d_full, m)
  local = _local(params, axis)

  def backward(acc, a):
    x, key, d_out = a
    _, pull = jax.vjp(lambda p: embed(p, x, key)[0], local)
    return _add_f32(acc, pull(d_out)[0]), None

  grads, _ = jax.lax.scan(backward, _zeros_f32(params, axis), (xs, keys, d_chunks))
  grads = _sum_over_devices(grads, axis)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return (loss, (_mean_update(variables, chunk_vars), metrics)), grads


def accumulated(method, m, params, variables, batch, rng):
  """Gradient accumulation for objectives that are a mean over examples."""
  axis = method.axis_name
  xs, keys = _chunked_views(method, m, batch, rng)
  batches = _chunk_batch(batch, m)

  def chunk_loss(p, x, key, b):
    out, new_vars = method.embed(p, variables, x, key)
    return method.objective(out, b)[0], (jax.lax.stop_gradient(out), new_vars)

  def body(acc, a):
    (_, aux), g = jax.value_and_grad(chunk_loss, has_aux=True)(_local(params, axis), *a)
    return _add_f32(acc, g), aux

  grads, (outs, chunk_vars) = jax.lax.scan(body, _zeros_f32(params, axis), (xs, keys, batches))
  grads = _sum_over_devices(grads, axis)
  grads = jax.tree.map(lambda g, p: (g / m).astype(p.dtype), grads, params)
  loss, metrics = method.objective(_unchunk(outs, m), batch)
  return (loss, (_mean_update(variables, chunk_vars), metrics)), grads
