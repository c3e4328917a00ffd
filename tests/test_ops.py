"""ssl_us.ops equals flax: nn.Conv and nn.max_pool in value and gradient; encoders fast == xla."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_us import models, ops, parallel
from tests.fixtures import (ENCODER_RTOL, assert_close, encoder_value_and_grads,
                            sharded_encoder_value_and_grads, unit_scales_f64)


def _value_and_grads(module, variables, x, r):
  """Jitted value and gradients (parameters, input) of sum(sin(module(x)) * r)."""
  def f(v, x):
    return jnp.sum(jnp.sin(module.apply(v, x).astype(jnp.float32)) * r)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(variables, x)


CONV_CASES = [
    # (input N, H, W, C), features, kernel, strides, padding: which path it takes
    ((4, 2, 2, 16), 8, (3, 3), 1, "SAME"),               # 2x2 map: im2col
    ((4, 1, 1, 16), 8, (3, 3), 1, "SAME"),               # 1x1 map: im2col
    ((4, 4, 4, 8), 16, (3, 3), 2, "SAME"),               # stride 2 into 2x2: im2col
    ((4, 3, 5, 8), 8, (3, 3), 1, "VALID"),               # 1x3 output: im2col
    ((4, 8, 8, 8), 16, (1, 1), 2, "SAME"),               # 1x1 stride-2 projection: slice + dot
    ((4, 5, 5, 8), 16, (1, 1), 1, "VALID"),              # 1x1 stride 1: dot
    ((3, 16, 16, 1), 8, (7, 7), 2, [(3, 3), (3, 3)]),    # 7x7/2 stem: chunked weight gradient
    ((4, 8, 12, 4), 8, (3, 3), 1, "SAME"),               # 8x12: chunked weight gradient
    ((4, 16, 16, 8), 8, (3, 3), 2, "SAME"),              # stride 2 into 8x8: chunked
    ((4, 10, 10, 4), 8, (3, 3), 1, "VALID"),             # VALID into 8x8: chunked
    ((4, 8, 8, 1), 8, (3, 3), 1, "SAME"),                # 9 patch features: lax
    ((4, 4, 4, 8), 8, (3, 3), 1, "SAME"),                # 4x4 map: chunked
]


@pytest.mark.parametrize("shape,features,kernel,strides,padding", CONV_CASES)
def test_conv_equals_flax(shape, features, kernel, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  ref = nn.Conv(features, kernel, strides, padding)
  fast = ops.Conv(features, kernel, strides, padding)
  v_ref = ref.init(jax.random.key(1), x)
  v_fast = fast.init(jax.random.key(1), x)
  # Same parameter names, shapes and initial values: checkpoints are interchangeable.
  assert jax.tree.structure(v_ref) == jax.tree.structure(v_fast)
  assert_close(v_ref, v_fast, 0.0)
  y_ref = ref.apply(v_ref, x)
  y_fast = jax.jit(fast.apply)(v_ref, x)
  assert y_fast.shape == y_ref.shape and y_fast.dtype == y_ref.dtype
  assert_close(y_ref, y_fast, 1e-5)
  r = jnp.asarray(rng.normal(size=y_ref.shape), jnp.float32)
  l_ref, g_ref = _value_and_grads(ref, v_ref, x, r)
  l_fast, g_fast = _value_and_grads(fast, v_ref, x, r)
  np.testing.assert_allclose(l_fast, l_ref, rtol=1e-5)
  assert_close(g_ref, g_fast, 1e-5)


def test_conv_bfloat16_equals_flax():
  rng = np.random.default_rng(0)
  for shape, features, kernel, strides, padding in (((4, 2, 2, 16), 8, (3, 3), 1, "SAME"),
                                                    ((4, 8, 8, 8), 8, (3, 3), 1, "SAME")):
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    ref = nn.Conv(features, kernel, strides, padding, dtype=jnp.bfloat16)
    fast = ops.Conv(features, kernel, strides, padding, dtype=jnp.bfloat16)
    v = ref.init(jax.random.key(1), x)
    y_ref, y_fast = ref.apply(v, x), jax.jit(fast.apply)(v, x)
    assert y_fast.dtype == y_ref.dtype == jnp.bfloat16
    assert_close(y_ref, y_fast, 2e-2)
    r = jnp.asarray(rng.normal(size=y_ref.shape), jnp.float32)
    assert_close(_value_and_grads(ref, v, x, r)[1], _value_and_grads(fast, v, x, r)[1], 3e-2)


def test_weight_grad_over_many_chunks(monkeypatch):
  """One image per chunk (a loop of 6) gives lax's weight gradient."""
  monkeypatch.setattr(ops, "_CHUNK_BYTES", 1)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 9, 9, 5)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=(6, 5, 5, 7)), jnp.float32)
  w = jnp.zeros((3, 3, 5, 7), jnp.float32)
  pads = ((1, 1), (1, 1))
  conv = lambda w_: jax.lax.conv_general_dilated(x, w_, (2, 2), pads,
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
  want = jax.vjp(conv, w)[1](dy)[0]
  got = jax.jit(lambda x, dy: ops.weight_grad(x, dy, (3, 3), (2, 2), pads))(x, dy)
  assert_close(want, got, 1e-5)


def test_patches_layout():
  """patches[n, i, j, (a * kw + b) * C + c] = x_pad[n, s i + a, s j + b, c]."""
  x = jnp.arange(2 * 5 * 4 * 3, dtype=jnp.float32).reshape(2, 5, 4, 3)
  p = ops.patches(x, (3, 2), (2, 1), ((1, 1), (0, 1)))
  xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (0, 1), (0, 0)))
  assert p.shape == (2, 3, 4, 3 * 2 * 3)
  for a in range(3):
    for b in range(2):
      k = (a * 2 + b) * 3
      np.testing.assert_array_equal(p[..., k:k + 3], xp[:, a:a + 5:2, b:b + 4])


POOL_CASES = [
    ((2, 8, 8, 3), (3, 3), (2, 2), "SAME"),     # the ResNet stem's pool
    ((2, 7, 9, 3), (3, 3), (2, 2), "SAME"),     # odd sizes
    ((2, 8, 8, 3), (2, 2), (2, 2), "VALID"),    # ConvNet4's pool
    ((2, 6, 6, 3), (3, 3), (1, 1), "SAME"),     # overlapping, stride 1
    ((2, 6, 6, 3), (3, 2), (2, 1), ((1, 0), (0, 1))),  # explicit padding, rectangular window
    ((2, 2, 2, 3), (3, 3), (2, 2), "SAME"),     # 2x2 map
]


@pytest.mark.parametrize("shape,window,strides,padding", POOL_CASES)
def test_max_pool_equals_flax_with_ties(shape, window, strides, padding):
  """Values drawn from {0, 1, 2}: most windows tie; the gradient goes where XLA's goes."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 3, size=shape), jnp.float32)
  y_ref = nn.max_pool(x, window, strides, padding)
  y_fast = jax.jit(lambda x: ops.max_pool(x, window, strides, padding))(x)
  np.testing.assert_array_equal(y_fast, y_ref)
  r = jnp.asarray(rng.normal(size=y_ref.shape), jnp.float32)
  g_ref = jax.jit(jax.grad(lambda x: jnp.sum(nn.max_pool(x, window, strides, padding) * r)))(x)
  g_fast = jax.jit(jax.grad(lambda x: jnp.sum(ops.max_pool(x, window, strides, padding) * r)))(x)
  # Where windows overlap, an input collects several cotangents: equal up to summation order.
  np.testing.assert_allclose(g_fast, g_ref, rtol=1e-6, atol=1e-7)


def test_max_pool_random_and_bfloat16():
  rng = np.random.default_rng(1)
  for dtype in (jnp.float32, jnp.bfloat16):
    x = jnp.asarray(rng.normal(size=(3, 10, 10, 4)), dtype)
    r = jnp.asarray(rng.normal(size=(3, 5, 5, 4)), dtype)
    f = lambda pool: jax.jit(jax.value_and_grad(
        lambda x: jnp.sum((pool(x, (3, 3), (2, 2), "SAME") * r).astype(jnp.float32))))(x)
    (v_ref, g_ref), (v_fast, g_fast) = f(nn.max_pool), f(ops.max_pool)
    assert g_fast.dtype == g_ref.dtype == dtype
    np.testing.assert_array_equal(v_fast, v_ref)
    # Overlapping windows sum cotangents in another order: bfloat16 rounds those sums.
    assert_close(g_ref, g_fast, 1e-2 if dtype == jnp.bfloat16 else 1e-6)


def test_select_rejects_unknown_impl():
  with pytest.raises(ValueError, match="conv_impl"):
    ops.select_conv(nn.Conv, "cudnn")
  with pytest.raises(ValueError, match="conv_impl"):
    models.ResNet18(conv_impl="fastest").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


@pytest.mark.parametrize("backend,expected", [("cpu", "fast"), ("gpu", "xla"), ("cuda", "xla"),
                                              ("tpu", "xla")])
def test_auto_resolves_per_backend(backend, expected):
  assert ops.resolve_impl("auto", backend) == expected
  assert ops.resolve_impl("fast", backend) == "fast"
  assert ops.resolve_impl("xla", backend) == "xla"


def test_auto_is_the_default_and_logs_its_choice_once(caplog, monkeypatch):
  """This machine is CPU: the encoders' default 'auto' builds ops.py's kernels, and says so
  once per backend."""
  assert jax.default_backend() == "cpu"
  monkeypatch.setattr(ops, "_LOGGED", set())
  with caplog.at_level("INFO", logger="ssl_us.ops"):
    assert ops.select_conv(nn.Conv, "auto").keywords["conv_general_dilated"] is (
        ops.conv_general_dilated)
    assert ops.select_conv(nn.Conv, "auto", spatial_dims=3).keywords[
        "conv_general_dilated"] is ops.conv3d_general_dilated
    assert ops.select_max_pool("auto") is ops.max_pool
  assert [r.getMessage() for r in caplog.records] == [
      "conv_impl='auto' on the cpu backend: ssl_us.ops kernels"]
  assert models.ResNet18().conv_impl == models.ConvNet4().conv_impl == "auto"




@pytest.mark.parametrize("name,kwargs", [
    ("resnet18", dict(num_filters=8)),
    ("convnet4", dict(width=4, dropout_rate=0.0)),
])
def test_encoder_fast_equals_xla(name, kwargs):
  """32x32 input: ResNet-18 stages at 8x8 and 4x4 (chunked), 2x2 and 1x1 (im2col)."""
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 1))
  v = models.make_encoder(name, conv_impl="xla", **kwargs).init(
      jax.random.key(0), x.astype(np.float32), train=False)
  assert_close(v, models.make_encoder(name, conv_impl="fast", **kwargs).init(
      jax.random.key(0), x.astype(np.float32), train=False), 0.0)  # the same parameters
  with jax.enable_x64(True):
    ref = models.make_encoder(name, conv_impl="xla", dtype=jnp.float64, **kwargs)
    fast = models.make_encoder(name, conv_impl="fast", dtype=jnp.float64, **kwargs)
    v, x = unit_scales_f64(v), jnp.asarray(x, jnp.float64)
    ((l_ref, _), (gp_ref, gx_ref)) = encoder_value_and_grads(ref, v, x)
    ((l_fast, _), (gp_fast, gx_fast)) = encoder_value_and_grads(fast, v, x)
  l_ref, gp_ref, gx_ref, l_fast, gp_fast, gx_fast = jax.device_get(
      (l_ref, gp_ref, gx_ref, l_fast, gp_fast, gx_fast))   # float64 numpy from here on
  assert l_fast.dtype == np.float64 and all(
      g.dtype == np.float64 for g in jax.tree.leaves((gp_fast, gx_fast)))
  np.testing.assert_allclose(l_fast, l_ref, rtol=ENCODER_RTOL)
  assert_close(gx_ref, gx_fast, ENCODER_RTOL)
  for a, b in zip(jax.tree.leaves(gp_ref), jax.tree.leaves(gp_fast)):
    if np.abs(a).max() > 1e-6:  # BatchNorm biases before a max-pool: about 0 + noise
      assert_close(a, b, ENCODER_RTOL)


def test_resnet18_fast_inside_shard_map():
  """Global BatchNorm over 2 devices, replicated kernels: same loss and gradient as 'xla'
  (float64, as above)."""
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 1))
  v = models.ResNet18(num_filters=8).init(jax.random.key(0), x[:1].astype(np.float32))
  out = {}
  with jax.enable_x64(True):
    v = unit_scales_f64(v)
    for impl in ("xla", "fast"):
      enc = models.ResNet18(num_filters=8, conv_impl=impl, axis_name=parallel.DATA,
                            dtype=jnp.float64)
      out[impl] = sharded_encoder_value_and_grads(enc, v, x)
  assert out["fast"][0].dtype == np.float64
  np.testing.assert_allclose(out["fast"][0], out["xla"][0], rtol=ENCODER_RTOL)
  assert_close(out["xla"][1]["conv_init"], out["fast"][1]["conv_init"], ENCODER_RTOL)
  assert_close(out["xla"][1]["ResNetBlock_7"], out["fast"][1]["ResNetBlock_7"], ENCODER_RTOL)


