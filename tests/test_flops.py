"""ssl_us/flops.py: model FLOPs against hand-computed counts and XLA's own HloCostAnalysis."""
import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from ssl_us import flops, parallel


def _flops(fn, *args):
  return flops.step_flops(jax.jit(fn), *args)


def _xla_flops(fn, *args):
  """XLA's count (HloCostAnalysis of the lowered module), for functions of convolutions and
  matrix products only."""
  cost = jax.jit(fn).lower(*args).cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def test_matrix_products_by_hand():
  x, w = jnp.ones((3, 5)), jnp.ones((5, 7))
  assert _flops(jnp.matmul, x, w) == 2 * 3 * 7 * 5
  a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 6))
  assert _flops(functools.partial(jnp.einsum, "bij,bjk->bik"), a, b) == 2 * 2 * 3 * 6 * 4
  # The gradient of a product is two more products of the same size: 3x the forward.
  grad = jax.grad(lambda x, w: jnp.sum(jnp.tanh(x @ w)), argnums=(0, 1))
  assert _flops(grad, x, w) == 3 * 2 * 3 * 7 * 5


@pytest.mark.parametrize("stride,expected_taps", [
    (1, 13),   # length 5, kernel 3, SAME: 5 * 3 taps less one padded tap at each end
    (2, 7),    # outputs 0, 1, 2 read positions (-1, 0, 1), (1, 2, 3), (3, 4, 5): 2 + 3 + 2
])
def test_a_padded_convolution_by_hand(stride, expected_taps):
  x, w = jnp.ones((2, 5, 3)), jnp.ones((3, 3, 4))           # N W C, W I O
  conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(stride,),
                           padding="SAME", dimension_numbers=("NWC", "WIO", "NWC"))
  assert _flops(conv, x, w) == 2 * 2 * 4 * 3 * expected_taps    # 2 * N * O * I * taps


def _conv(x, w, *, strides, padding, lhs_dil, rhs_dil, groups):
  spatial = "DHW"[-(x.ndim - 2):]
  return jax.lax.conv_general_dilated(
      x, w, strides, padding, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
      dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
      feature_group_count=groups)


CONVS = {   # name: (input shape NHWC / NDHWC, kernel shape HWIO / DHWIO, conv options)
    "same": ((2, 9, 9, 4), (3, 3, 4, 8), dict(strides=(1, 1), padding="SAME")),
    "valid_stride2": ((2, 9, 8, 4), (3, 3, 4, 6), dict(strides=(2, 2), padding="VALID")),
    "same_stride2_7x7": ((1, 16, 16, 1), (7, 7, 1, 8), dict(strides=(2, 2), padding="SAME")),
    "rhs_dilated": ((2, 11, 11, 3), (3, 3, 3, 5), dict(strides=(1, 1), padding=((2, 1), (0, 3)),
                                                       rhs_dil=(2, 3))),
    "lhs_dilated": ((2, 5, 6, 3), (3, 3, 3, 5), dict(strides=(1, 1), padding=((2, 2), (1, 2)),
                                                     lhs_dil=(2, 2))),
    "grouped": ((2, 8, 8, 6), (3, 3, 2, 9), dict(strides=(1, 2), padding="SAME", groups=3)),
    "depthwise": ((2, 8, 8, 4), (3, 3, 1, 4), dict(strides=(2, 2), padding="SAME", groups=4)),
    "3d": ((1, 5, 8, 8, 2), (3, 3, 3, 2, 4), dict(strides=(1, 2, 2), padding="SAME")),
}


def _conv_fn(opts, d):
  return functools.partial(_conv, strides=opts["strides"], padding=opts["padding"],
                           lhs_dil=opts.get("lhs_dil", (1,) * d),
                           rhs_dil=opts.get("rhs_dil", (1,) * d), groups=opts.get("groups", 1))


@pytest.mark.parametrize("name", CONVS)
def test_convolutions_and_their_gradients_agree_with_xla(name):
  """Padding, strides, both dilations, groups, 3D; and the vjp's transposed convolutions
  (input-dilated for the input gradient, batch-grouped for a grouped kernel's gradient)."""
  x_shape, w_shape, opts = CONVS[name]
  conv = _conv_fn(opts, len(x_shape) - 2)
  x, w = jnp.ones(x_shape), jnp.ones(w_shape)
  ours = _flops(conv, x, w)
  assert ours == _xla_flops(conv, x, w) > 0
  ct = jnp.ones(jax.eval_shape(conv, x, w).shape)
  def vjp(x, w, ct):   # the output too: XLA would drop an unused forward, the jaxpr holds it
    y, back = jax.vjp(conv, x, w)
    return y, back(ct)
  assert _flops(vjp, x, w, ct) == _xla_flops(vjp, x, w, ct) > 2 * ours


def test_every_padded_tap_is_left_out():
  """A 3x3 SAME convolution of a 1x1 input multiplies only the kernel's centre."""
  conv = _conv_fn(dict(strides=(1, 1), padding="SAME"), 2)
  assert _flops(conv, jnp.ones((1, 1, 1, 4)), jnp.ones((3, 3, 4, 2))) == 2 * 2 * 4 * 1


def test_scan_multiplies_its_body_and_cond_counts_its_costliest_branch():
  x, w = jnp.ones((2, 4)), jnp.ones((4, 4))
  one = 2 * 2 * 4 * 4
  scan = lambda x, w: jax.lax.scan(lambda h, _: (h @ w, None), x, None, length=7)[0]
  assert _flops(scan, x, w) == 7 * one
  assert _flops(lambda x, w: jax.lax.map(lambda r: r @ w, x), x, w) == one   # 2 rows of 1x4
  cond = lambda x, w: jax.lax.cond(x.sum() > 0, lambda: x @ w @ w, lambda: x @ w)
  assert _flops(cond, x, w) == 2 * one
  fori = lambda x, w: jax.lax.fori_loop(0, 5, lambda i, h: h @ w, x)   # static bounds: a scan
  assert _flops(fori, x, w) == 5 * one


def test_rematerialized_work_counts_as_executed():
  """d/dw sum(sin(x @ w)): the forward product and dw = x^T (g cos(x @ w)); under
  jax.checkpoint the backward pass computes x @ w once more (model.remat's hardware FLOPs)."""
  x, w = jnp.ones((2, 4)), jnp.ones((4, 3))
  one = 2 * 2 * 4 * 3
  f = lambda x, w: jnp.sum(jnp.sin(x @ w))
  assert _flops(jax.grad(f, argnums=1), x, w) == 2 * one
  assert _flops(jax.grad(jax.checkpoint(f), argnums=1), x, w) == 3 * one


def test_a_while_loop_with_flops_says_it_cannot_be_counted():
  x, w = jnp.ones((2, 4)), jnp.ones((4, 4))
  loop = lambda x, w: jax.lax.while_loop(lambda h: h.sum() < 100.0, lambda h: h @ w, x)
  with pytest.raises(flops.UncountedLoop, match="while loop holds 64 FLOPs per iteration"):
    _flops(loop, x, w)
  counter = lambda x, w: (jax.lax.while_loop(lambda i: i < x.sum(), lambda i: i + 1, 0.0), x @ w)
  assert _flops(counter, x, w) == 64       # a loop without products counts nothing


def test_shard_map_counts_per_device():
  mesh = parallel.make_mesh(8)
  f = jax.shard_map(jnp.matmul, mesh=mesh, in_specs=(P(parallel.DATA), P()),
                    out_specs=P(parallel.DATA))
  x = jax.device_put(jnp.ones((16, 5)), jax.NamedSharding(mesh, P(parallel.DATA)))
  w = jax.device_put(jnp.ones((5, 7)), jax.NamedSharding(mesh, P()))
  assert _flops(f, x, w) == 2 * 2 * 7 * 5                  # 16 rows over 8 devices: 2 each
  assert _flops(jnp.matmul, x, w) == 2 * 16 * 7 * 5        # outside shard_map: the whole product


@pytest.mark.parametrize("kind,dtype,peak", [
    ("NVIDIA H100 80GB HBM3", jnp.bfloat16, 989e12),      # SXM
    ("NVIDIA H100 PCIe", jnp.bfloat16, 756e12),           # the longer prefix decides
    ("NVIDIA H200", jnp.bfloat16, 989e12),
    ("NVIDIA A100-SXM4-80GB", jnp.bfloat16, 312e12),
    ("TPU v4", jnp.bfloat16, 275e12),
    ("TPU v4 lite", jnp.bfloat16, None),                 # not "TPU v4"'s peak
    ("TPU v5", jnp.bfloat16, 459e12),                     # v5p
    ("TPU v5 lite", jnp.bfloat16, 197e12),                # v5e
    ("NVIDIA H100 80GB HBM3", jnp.float32, None),     # bfloat16 peaks only
    ("cpu", jnp.bfloat16, None),
])
def test_peak_flops(kind, dtype, peak):
  assert flops.peak_flops(kind, dtype) == peak

