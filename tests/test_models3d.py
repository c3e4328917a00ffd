"""3D encoders: structure from the papers, shapes, dtype and BatchNorm conventions."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_us import models, models3d, ops

CLIP = (2, 8, 32, 32, 1)


def _init(module, shape=CLIP):
  """Variables with numpy values (He-normal kernels, BN scale 1) and an input clip.

  Shapes come from jax.eval_shape; no jax.random, whose threefry kernels take minutes to
  compile on a loaded CPU.
  """
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)
  shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      return jnp.asarray(rng.normal(0, (2 / np.prod(s.shape[:-1])) ** 0.5, s.shape), s.dtype)
    if name.endswith("['scale']") or name.endswith("['var']"):
      return jnp.ones(s.shape, s.dtype)
    return jnp.zeros(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes), x


def _shapes(module, shape=CLIP, **apply_kwargs):
  """Abstract variables and the abstract output of apply (no compilation)."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  v = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)
  return v, jax.eval_shape(lambda v, x: module.apply(v, x, train=False, **apply_kwargs), v, x)


def _conv_kernels(params):
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [(jax.tree_util.keystr(p), v) for p, v in flat
          if jax.tree_util.keystr(p).endswith("['kernel']")]


@pytest.mark.parametrize("name,kwargs,dim", [
    ("darknet53_3d", dict(num_filters=2), 2 * 2**5),
    ("r3d18", dict(num_filters=4), 4 * 8),
    ("r2plus1d18", dict(num_filters=4), 4 * 8),
    ("r3d18", dict(num_filters=4, small_stem=True), 4 * 8),
])
def test_registered_encoders_give_pooled_features(name, kwargs, dim):
  _, h = _shapes(models.make_encoder(name, **kwargs))
  assert h.shape == (CLIP[0], dim) and h.dtype == jnp.float32


def test_forward_is_finite_and_pools_over_time_height_width():
  enc = models3d.R2Plus1D18(num_filters=2, stage_sizes=(1, 1, 1, 1))
  variables, x = _init(enc, (2, 4, 16, 16, 1))
  apply = jax.jit(lambda v, x: enc.apply(v, x, train=False))
  h = np.asarray(apply(variables, x))
  assert h.shape == (2, 16) and np.all(np.isfinite(h))
  # Pooled representation of a clip does not depend on the other clips in eval mode.
  np.testing.assert_allclose(np.asarray(apply(variables, x[:1])), h[:1], rtol=1e-5, atol=1e-6)


def test_darknet53_has_52_convolutions_all_3d():
  # Darknet-53 = 52 convolutions + 1 linear layer: stem, 5 downsampling convs, 23 blocks of 2.
  variables, _ = _shapes(models3d.Darknet53_3D(num_filters=1), (1, 2, 32, 32, 1))
  kernels = _conv_kernels(variables["params"])
  assert len(kernels) == 52
  assert all(len(k.shape) == 5 for _, k in kernels)
  one_by_one = [k for _, k in kernels if k.shape[:3] == (1, 1, 1)]
  assert len(one_by_one) == 23  # the first conv of every residual block


def _intermediates(module, shape):
  _, (_, state) = _shapes(module, shape, capture_intermediates=True, mutable=["intermediates"])
  return state["intermediates"]


def test_darknet_time_is_downsampled_by_stage_openers_only():
  inter = _intermediates(models3d.Darknet53_3D(num_filters=1, stage_sizes=(1, 1, 1, 1, 1)),
                         (1, 8, 32, 32, 1))
  shapes = [inter[f"down{i}"]["__call__"][0].shape[1:4] for i in range(5)]
  # temporal strides (1, 1, 2, 2, 2), spatial stride 2 at every stage.
  assert shapes == [(8, 16, 16), (8, 8, 8), (4, 4, 4), (2, 2, 2), (1, 1, 1)]
  assert inter["stage2_block0"]["__call__"][0].shape[1] == 4  # blocks keep T


def test_r3d18_stage_strides_and_stem():
  enc = models3d.R3D18(num_filters=2)
  inter = _intermediates(enc, (1, 8, 32, 32, 1))
  # stem (1, 2, 2): 8x16x16; stages 2-4 halve T, H, W.
  assert inter["conv_init"]["__call__"][0].shape[1:4] == (8, 16, 16)
  got = [inter[f"ResNetBlock_{i}"]["__call__"][0].shape[1:4] for i in (1, 3, 5, 7)]
  assert got == [(8, 16, 16), (4, 8, 8), (2, 4, 4), (1, 2, 2)]
  variables, _ = _shapes(enc, (1, 8, 32, 32, 1))
  assert variables["params"]["conv_init"]["kernel"].shape == (3, 7, 7, 1, 2)


def test_conv2plus1d_matches_full_3d_parameter_count():
  # c_in = c_out = 64, k = t = 3: M = 27*64*64 / (9*64 + 3*64) = 144 and
  # 9*64*144 + 3*144*64 = 110592 = 27*64*64 weights, exactly the full 3x3x3 kernel.
  norm = models.batch_norm(False, None, jnp.float32)
  conv = models3d.Conv2Plus1D(64, (3, 3, 3), norm=norm)
  v = jax.eval_shape(conv.init, jax.random.key(0), jnp.zeros((1, 4, 6, 6, 64)))
  assert v["params"]["spatial"]["kernel"].shape == (1, 3, 3, 64, 144)
  assert v["params"]["temporal"]["kernel"].shape == (3, 1, 1, 144, 64)
  n = sum(np.prod(k.shape) for _, k in _conv_kernels(v["params"]))
  assert n == 27 * 64 * 64


def test_conv2plus1d_strides_split_between_space_and_time():
  norm = models.batch_norm(False, None, jnp.float32)
  x = jnp.zeros((1, 8, 8, 8, 2))
  conv = models3d.Conv2Plus1D(3, (3, 3, 3), strides=(2, 2, 2), norm=norm)
  v = jax.eval_shape(conv.init, jax.random.key(0), x)
  assert jax.eval_shape(conv.apply, v, x).shape == (1, 4, 4, 4, 3)
  proj = models3d.Conv2Plus1D(5, (1, 1, 1), strides=(2, 2, 2), norm=norm)
  vp = jax.eval_shape(proj.init, jax.random.key(0), x)
  assert set(vp["params"]) == {"Conv_0"}  # nothing to factorise: one plain conv
  assert jax.eval_shape(proj.apply, vp, x).shape == (1, 4, 4, 4, 5)


def test_bfloat16_compute_keeps_float32_params_and_output():
  enc = models3d.R2Plus1D18(num_filters=2, dtype=jnp.bfloat16)
  variables, h = _shapes(enc, (1, 4, 16, 16, 1))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  assert h.dtype == jnp.float32
  inter = _intermediates(enc, (1, 4, 16, 16, 1))
  assert inter["conv_init"]["__call__"][0].dtype == jnp.bfloat16


def test_train_mode_normalises_with_batch_statistics_and_updates_running_stats():
  enc = models3d.Darknet53_3D(num_filters=1, stage_sizes=(1, 1, 1, 1, 1))
  variables, x = _init(enc, (2, 4, 16, 16, 1))
  x = 3.0 * x + 1.0

  @jax.jit
  def train_apply(v, x):
    return enc.apply(v, x, train=True, mutable=["batch_stats", "intermediates"],
                     capture_intermediates=lambda mdl, _: mdl.name in ("conv_init", "bn_init"))

  _, state = train_apply(variables, x)
  y = np.asarray(state["intermediates"]["bn_init"]["__call__"][0], np.float64)
  # Batch statistics over (N, T, H, W): per-channel mean 0, variance 1 (scale 1, bias 0).
  np.testing.assert_allclose(y.mean(axis=(0, 1, 2, 3)), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var(axis=(0, 1, 2, 3)), 1.0, rtol=1e-3)
  # Running mean from 0 moves by (1 - momentum) = 0.1 of the stem conv's batch mean.
  conv_out = np.asarray(state["intermediates"]["conv_init"]["__call__"][0], np.float64)
  np.testing.assert_allclose(state["batch_stats"]["bn_init"]["mean"],
                             0.1 * conv_out.mean(axis=(0, 1, 2, 3)), rtol=1e-4, atol=1e-7)


def test_non_clip_input_is_a_clear_error():
  enc = models3d.R3D18(num_filters=2)
  with pytest.raises(ValueError, match=r"clips \(N, T, H, W, C\)"):
    jax.eval_shape(lambda x: enc.init(jax.random.key(0), x, train=False),
                   jnp.zeros((2, 32, 32, 1)))
  bad = models3d.Darknet53_3D(num_filters=1, temporal_strides=(1, 2))
  with pytest.raises(ValueError, match="temporal_strides has 2 entries for 5 stages"):
    jax.eval_shape(lambda x: bad.init(jax.random.key(0), x, train=False), jnp.zeros(CLIP))


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((2, 5, 9, 8, 3), (3, 3, 3), (1, 1, 1), "SAME"),
    ((2, 6, 9, 8, 3), (3, 3, 3), (2, 2, 2), "SAME"),
    ((1, 7, 5, 5, 2), (3, 1, 1), (2, 1, 1), "SAME"),
    ((1, 4, 4, 4, 2), (1, 3, 3), (1, 2, 2), "VALID"),
    ((1, 7, 9, 9, 2), (3, 7, 7), (1, 2, 2), ((1, 1), (3, 3), (3, 3))),
    ((1, 1, 2, 2, 4), (3, 3, 3), (2, 2, 2), "SAME"),
])
def test_fast_3d_conv_equals_lax_in_value_and_gradient(shape, kernel, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=kernel + (shape[-1], 5)), jnp.float32)
  dn = ("NDHWC", "DHWIO", "NDHWC")
  ref = lambda x, w: jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)
  fast = lambda x, w: ops.conv3d_general_dilated(x, w, strides, padding,
                                                 dimension_numbers=dn)
  y_ref, y = jax.jit(ref)(x, w), jax.jit(fast)(x, w)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)
  # Gradients of <y, c> for a fixed cotangent c.
  c = jnp.asarray(rng.normal(size=y_ref.shape), jnp.float32)
  g_ref = jax.jit(jax.grad(lambda x, w: jnp.sum(ref(x, w) * c), argnums=(0, 1)))(x, w)
  g = jax.jit(jax.grad(lambda x, w: jnp.sum(fast(x, w) * c), argnums=(0, 1)))(x, w)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_conv_impls_share_parameters_and_outputs():
  fast = models3d.R2Plus1D18(num_filters=2, stage_sizes=(1, 1), temporal_strides=(1, 2),
                             conv_impl="fast")
  xla = models3d.R2Plus1D18(num_filters=2, stage_sizes=(1, 1), temporal_strides=(1, 2),
                            conv_impl="xla")
  variables, x = _init(fast, (2, 4, 16, 16, 1))
  shapes = jax.eval_shape(lambda x: xla.init(jax.random.key(0), x, train=False), x)
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  run = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=False))(variables, x)
  np.testing.assert_allclose(run(fast), run(xla), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="conv_impl='cuda'; use one of"):
    ops.select_conv(nn.Conv, "cuda", spatial_dims=3)
