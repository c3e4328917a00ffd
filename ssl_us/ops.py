"""Convolution and max-pooling with flax's mathematics, written so that XLA's CPU backend runs
them (and their gradients) fast.

XLA's CPU forward convolutions are fast in most shapes, but (benchmarks/RESULTS.md) a 3x3
convolution whose output is 2x2 or 1x1 (ResNet-18's last stage at 64x64 input) takes seconds
forward and backward, so does the input gradient of a stride-2 3x3 convolution into a 2x2
output, weight gradients run at a fraction of the forward's speed (the activations are
transposed to a batch-as-feature layout first), and the gradient of ``reduce_window`` max
(``select_and_scatter``) is 20x slower than the forward. Here:

- ``conv_general_dilated`` has ``lax.conv_general_dilated``'s signature, so it plugs into
  ``nn.Conv(conv_general_dilated=...)`` (``Conv`` below): parameters, names, shapes and
  initialisation are flax's own, and checkpoints are interchangeable. For 2D NHWC/HWIO
  convolutions without dilation or groups it computes
    1x1 kernels, no padding:  y[n,i,j,:] = x[n, s_h i, s_w j, :] @ W[0, 0]
    outputs smaller than the kernel (Ho < kh or Wo < kw):
                              y[n,i,j,:] = P(x)[n,i,j,:] @ W.reshape(kh kw C_in, C_out),
      P(x)[n,i,j] = concat_{a<kh, b<kw} x_pad[n, s_h i + a, s_w j + b, :] (im2col),
  whose JAX gradients are matmuls and strided pads (dW = P^T dy, dx = col2im(dy W^T));
    other outputs with at least 32 patch features: lax's convolution and input
      gradient, and the weight gradient dW = sum over chunks of images of P(x_c)^T dy_c
      (``weight_grad``: each chunk's patches stay in cache);
  and every other case is ``lax.conv_general_dilated`` itself.
- ``max_pool`` has ``nn.max_pool``'s signature and value (``reduce_window`` max) and the same
  gradient as XLA's ``select_and_scatter`` (each window's cotangent goes to the first maximal
  element in row-major window order), computed as a sum of masked, strided pads.

- ``conv3d_general_dilated``: a 3D NDHWC convolution as one 2D convolution with time folded
  into channels (XLA's CPU backend runs 3D convolutions 4-12x slower than 2D ones).

``select_conv`` / ``select_max_pool`` pick these ('fast') or flax's ('xla', XLA's own kernels:
cuDNN on GPU, the TPU's) by name; 'auto' (the encoders' default) is 'fast' on the CPU backend
and 'xla' on every other, and says which once per process.
"""
from __future__ import annotations

import functools
import itertools
import logging
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "fast", "xla")

_NHWC = ("NHWC", "HWIO", "NHWC")
# Convolutions with at least this many patch features get the chunked im2col weight gradient;
# below (a 3x3 kernel on one input channel: 9 features) its matmuls get too small and XLA's own
# weight gradient is as fast. Small outputs (4x4 at ResNet-18's third stage on 64x64) get it
# too: outside loops XLA's weight gradient is about as fast there, but inside a loop body
# (lax.scan: gradient caching's backward, ssl_us/gradcache.py) XLA's CPU backend leaves it a
# generic convolution, about 300 ms per layer at 64 images (benchmarks/RESULTS.md, issue 24).
_MIN_CHUNKED_K = 32
# Images per chunk: as many as keep one chunk's patches under this size (cache-resident).
_CHUNK_BYTES = 3 * 2**19


def _pads(padding, in_shape, window, strides) -> tuple[tuple[int, int], ...]:
  """lax padding ('SAME', 'VALID' or (lo, hi) pairs) -> explicit (lo, hi) pairs."""
  if isinstance(padding, str):
    return tuple(tuple(p) for p in lax.padtype_to_pads(in_shape, window, strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _is_nhwc_2d(lhs, rhs, dimension_numbers) -> bool:
  if lhs.ndim != 4 or rhs.ndim != 4:
    return False
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return dn == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)


def patches(x, kernel_hw, strides, pads):
  """im2col: x (N, H, W, C) -> (N, Ho, Wo, kh * kw * C), feature index (a * kw + b) * C + c.

  Zero padding ``pads`` ((lo, hi), (lo, hi)); Ho = (H + lo + hi - kh) // s_h + 1 (same for W).
  The order matches a HWIO kernel reshaped to (kh * kw * C, C_out).
  """
  (kh, kw), (sh, sw) = kernel_hw, strides
  x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  n, h, w, c = x.shape
  ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
  cols = [lax.slice(x, (0, a, b, 0), (n, a + sh * (ho - 1) + 1, b + sw * (wo - 1) + 1, c),
                    (1, sh, sw, 1))
          for a in range(kh) for b in range(kw)]
  return jnp.concatenate(cols, axis=-1)


def _matmul(x, w, precision, preferred_element_type):
  """(..., K) @ (K, O) -> (..., O)."""
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)


def _lax_fallback(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count, batch_group_count, precision,
                  preferred_element_type):
  """(lax's own convolution of these arguments, as a thunk; whether they have no dilation and
  no groups, which the fast forms need)."""
  plain = functools.partial(
      lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
  undilated = all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
  return plain, undilated and feature_group_count == 1 and batch_group_count == 1


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated`` with matmul forms for 1x1 kernels, tiny outputs and weights.

  Same arguments and result (up to float summation order). The fast forms apply to 2D
  NHWC/HWIO convolutions without dilation or groups: a 1x1 kernel without padding is a strided
  slice and a matmul; an output smaller than the kernel in height or width is im2col
  (``patches``) and one matmul; any other with at least _MIN_CHUNKED_K patch features is lax's
  convolution with ``weight_grad`` as its kernel gradient. Everything else is lax's convolution.
  """
  plain, simple = _lax_fallback(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                dimension_numbers, feature_group_count, batch_group_count,
                                precision, preferred_element_type)
  if not (simple and _is_nhwc_2d(lhs, rhs, dimension_numbers)):
    return plain()
  kh, kw, cin, cout = rhs.shape
  strides = tuple(window_strides)
  pads = _pads(padding, lhs.shape[1:3], (kh, kw), strides)
  h, w = lhs.shape[1] + sum(pads[0]), lhs.shape[2] + sum(pads[1])
  ho, wo = (h - kh) // strides[0] + 1, (w - kw) // strides[1] + 1
  if (kh, kw) == (1, 1) and pads == ((0, 0), (0, 0)):
    x = lhs[:, ::strides[0], ::strides[1]][:, :ho, :wo]
    return _matmul(x, rhs.reshape(cin, cout), precision, preferred_element_type)
  if ho < kh or wo < kw:
    p = patches(lhs, (kh, kw), strides, pads)
    return _matmul(p, rhs.reshape(kh * kw * cin, cout), precision, preferred_element_type)
  if kh * kw * cin >= _MIN_CHUNKED_K:
    return _conv_chunked_wgrad(*_same_varying(lhs, rhs), strides, pads, precision,
                               preferred_element_type)
  return plain()


def _varying_axes(x) -> frozenset:
  """Mesh axes that x varies over inside shard_map (empty outside)."""
  t = jax.typeof(x)
  mat = getattr(t, "manual_axis_type", None)  # this jax; earlier releases call it ``vma``
  return mat.varying if mat is not None else getattr(t, "vma", frozenset())


def _same_varying(*xs):
  """Casts each array to vary over the union of their varying mesh axes, as lax's own ops do
  implicitly; a custom_vjp's cotangents then get the primal inputs' types (the transpose of
  the cast sums a replicated kernel's gradient over the devices)."""
  axes = frozenset().union(*(_varying_axes(x) for x in xs))
  return tuple(lax.pcast(x, tuple(sorted(axes - _varying_axes(x))), to="varying")
               if axes - _varying_axes(x) else x for x in xs)


def _lax_conv(x, w, strides, pads, precision, preferred_element_type):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                  precision=precision,
                                  preferred_element_type=preferred_element_type)


def _chunk_images(n: int, bytes_per_image: int) -> int:
  """The largest divisor of n whose images' patches fit in _CHUNK_BYTES (at least 1)."""
  fit = max(1, _CHUNK_BYTES // max(bytes_per_image, 1))
  return max(d for d in range(1, min(n, fit) + 1) if n % d == 0)


def weight_grad(x, dy, kernel_hw, strides, pads, precision=None):
  """dW[a, b, c, o] = sum_{n,i,j} x_pad[n, s_h i + a, s_w j + b, c] dy[n, i, j, o].

  Computed as sum over chunks of images of P(x_chunk)^T dy_chunk (im2col, ``patches``) in a
  sequential loop, so each chunk's patches stay in cache; accumulated in float32, or float64
  for float64 inputs. Returns (kh, kw, C_in, C_out) in that type.
  """
  n, (kh, kw), cin, cout = x.shape[0], kernel_hw, x.shape[-1], dy.shape[-1]
  k = kh * kw * cin
  per_image = dy.shape[1] * dy.shape[2] * k * x.dtype.itemsize
  d = _chunk_images(n, per_image)
  xs = x.reshape((n // d, d) + x.shape[1:])
  ds = dy.reshape((n // d, d) + dy.shape[1:])
  acc_type = jnp.promote_types(x.dtype, jnp.float32)

  def chunk(xc, dc):
    p = patches(xc, kernel_hw, strides, pads).reshape(-1, k)
    return lax.dot_general(p, dc.reshape(-1, cout), (((0,), (0,)), ((), ())),
                           precision=precision, preferred_element_type=acc_type)

  # The first chunk starts the sum, so the carry has the inputs' type (inside shard_map: the
  # same varying mesh axes) without naming any axis here.
  acc, _ = lax.scan(lambda acc, xd: (acc + chunk(*xd), None), chunk(xs[0], ds[0]),
                    (xs[1:], ds[1:]))
  return acc.reshape(kh, kw, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_chunked_wgrad(x, w, strides, pads, precision, preferred_element_type):
  """lax's convolution and input gradient, ``weight_grad`` for the kernel's gradient."""
  return _lax_conv(x, w, strides, pads, precision, preferred_element_type)


def _conv_chunked_wgrad_fwd(x, w, strides, pads, precision, preferred_element_type):
  return _lax_conv(x, w, strides, pads, precision, preferred_element_type), (x, w)


def _conv_chunked_wgrad_bwd(strides, pads, precision, preferred_element_type, res, dy):
  x, w = res
  _, vjp_x = jax.vjp(lambda x_: _lax_conv(x_, w, strides, pads, precision,
                                          preferred_element_type), x)
  (dx,) = vjp_x(dy)
  dw = weight_grad(x, dy.astype(x.dtype), w.shape[:2], strides, pads, precision)
  return dx, dw.astype(w.dtype)


_conv_chunked_wgrad.defvjp(_conv_chunked_wgrad_fwd, _conv_chunked_wgrad_bwd)


# flax.linen.Conv computing with ``conv_general_dilated``: flax's own parameters and init.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


# ----------------------------------------------------------------------------------------------
# Max-pooling.


def _reduce_max(x, window, strides, pads):
  neg_inf = jnp.array(-jnp.inf, x.dtype)
  return lax.reduce_window(x, neg_inf, lax.max, (1,) + window + (1,), (1,) + strides + (1,),
                           ((0, 0),) + pads + ((0, 0),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
  return _reduce_max(x, window, strides, pads)


def _max_pool_fwd(x, window, strides, pads):
  y = _reduce_max(x, window, strides, pads)
  return y, (x, y)


def _max_pool_bwd(window, strides, pads, res, dy):
  """dx = sum over window offsets o (row-major) of scatter_o(dy * [x_o == y, first such o]).

  x_o is the input seen at offset o of every window (a strided slice of the -inf padded
  input); scatter_o, its transpose, is a pad with interior (stride - 1) zeros.
  """
  x, y = res
  neg_inf = jnp.array(-jnp.inf, x.dtype)
  xp = lax.pad(x, neg_inf, ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads) + ((0, 0, 0),))
  out_sp = y.shape[1:-1]
  dxp = jnp.zeros(xp.shape, dy.dtype)
  taken = jnp.zeros(y.shape, bool)
  for off in itertools.product(*(range(k) for k in window)):
    limit = tuple(o + s * (m - 1) + 1 for o, s, m in zip(off, strides, out_sp))
    xo = lax.slice(xp, (0,) + off + (0,), (xp.shape[0],) + limit + (xp.shape[-1],),
                   (1,) + strides + (1,))
    sel = (xo == y) & ~taken
    taken = taken | sel
    contrib = jnp.where(sel, dy, jnp.zeros((), dy.dtype))
    cfg = tuple((o, size - lim, s - 1) for o, lim, s, size in zip(off, limit, strides,
                                                                  xp.shape[1:-1]))
    dxp = dxp + lax.pad(contrib, jnp.zeros((), dy.dtype), ((0, 0, 0),) + cfg + ((0, 0, 0),))
  start = (0,) + tuple(lo for lo, _ in pads) + (0,)
  return (lax.slice(dxp, start, tuple(b + n for b, n in zip(start, x.shape))),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(inputs, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding="VALID"):
  """``nn.max_pool`` (value and gradient) with a fast gradient for (N, spatial..., C) floats.

  y[n, i, c] = max over the window at strides * i of the -inf padded input; the gradient sends
  dy[n, i, c] to the first maximal element of the window (row-major), like select_and_scatter.
  Other inputs (no batch dimension, integers) go to ``nn.max_pool``.
  """
  window = tuple(window_shape)
  strides = tuple(strides) if strides is not None else (1,) * len(window)
  if inputs.ndim != len(window) + 2 or not jnp.issubdtype(inputs.dtype, jnp.floating):
    return nn.max_pool(inputs, window, strides, padding)
  pads = _pads(padding, inputs.shape[1:-1], window, strides)
  return _max_pool(inputs, window, strides, pads)


# ----------------------------------------------------------------------------------------------
# 3D convolutions.

_NDHWC = ("NDHWC", "DHWIO", "NDHWC")


def conv3d_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                           batch_group_count=1, precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated`` for NDHWC/DHWIO 3D convolutions, as one 2D convolution.

  XLA's CPU backend runs 3D convolutions far slower than 2D ones (4-12x measured here, forward
  and gradients). Time is folded into channels instead (temporal im2col):
    X[n t', h, w, a C + c] = x_pad[n, s_t t' + a, h, w, c]      (a < k_t)
    y[n, t', :, :, :] = conv2d(X[n t'], W'),  W'[i, j, a C + c, o] = W[a, i, j, c, o]
  with x_pad the input zero-padded in time, and the height/width padding and strides passed to
  the 2D convolution: the same sums, so the same result up to float summation order, and the
  gradients are 2D convolutions too. Other layouts, dilation or groups use lax's convolution.
  """
  plain, simple = _lax_fallback(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                dimension_numbers, feature_group_count, batch_group_count,
                                precision, preferred_element_type)
  if (lhs.ndim != 5 or not simple
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NDHWC)):
    return plain()
  kt, kh, kw, cin, cout = rhs.shape
  st, sh, sw = window_strides
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(lhs.shape[1:4], (kt, kh, kw), (st, sh, sw), padding)
  else:
    pads = padding
  n, t = lhs.shape[:2]
  x = jnp.pad(lhs, ((0, 0), tuple(pads[0]), (0, 0), (0, 0), (0, 0)))
  t_out = (x.shape[1] - kt) // st + 1
  x = jnp.concatenate([x[:, a:a + st * (t_out - 1) + 1:st] for a in range(kt)], axis=-1)
  x = x.reshape((n * t_out,) + x.shape[2:])
  w = jnp.transpose(rhs, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * cin, cout)
  y = lax.conv_general_dilated(x, w, (sh, sw), (tuple(pads[1]), tuple(pads[2])),
                               dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision,
                               preferred_element_type=preferred_element_type)
  return y.reshape((n, t_out) + y.shape[1:])


# ----------------------------------------------------------------------------------------------
# Selection by name (the encoders' ``conv_impl`` field).


_LOGGED: set = set()


def resolve_impl(impl: str, backend: str | None = None) -> str:
  """'fast' or 'xla' for ``impl``: 'auto' is 'fast' on the CPU backend and 'xla' on any other
  (``backend``: jax.default_backend() unless given). Logs the choice of 'auto' once."""
  if impl not in IMPLS:
    raise ValueError(f"conv_impl={impl!r}; use one of {IMPLS}")
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  chosen = "fast" if backend == "cpu" else "xla"
  if backend not in _LOGGED:
    _LOGGED.add(backend)
    logging.getLogger(__name__).info(
        "conv_impl='auto' on the %s backend: %s", backend,
        "ssl_us.ops kernels" if chosen == "fast" else "XLA's own convolutions and pooling")
  return chosen


def select_conv(conv: Callable, impl: str, spatial_dims: int = 2) -> Callable:
  """The conv module to use: ``conv`` itself ('xla') or ``conv`` computing with this module's
  ``conv_general_dilated`` (``conv3d_general_dilated`` for ``spatial_dims`` = 3) ('fast';
  ``conv`` must take nn.Conv's ``conv_general_dilated``); 'auto': see ``resolve_impl``."""
  if resolve_impl(impl) == "xla":
    return conv
  fn = conv3d_general_dilated if spatial_dims == 3 else conv_general_dilated
  return functools.partial(conv, conv_general_dilated=fn)


def select_max_pool(impl: str) -> Callable:
  """``nn.max_pool`` ('xla') or ``max_pool`` ('fast'); 'auto': see ``resolve_impl``."""
  return nn.max_pool if resolve_impl(impl) == "xla" else max_pool
