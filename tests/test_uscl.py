"""USCL pieces (paper 003): mixed pair formula, Beta draws, masked CE and the objective."""
import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_us import losses
from ssl_us.methods import uscl as uscl_method
from tests import fixtures


def test_mix_views_formula_by_hand():
  # Two videos of 2x2 frames; f1 = 0, f2 = 100, f3 = 200 (video 0) and 10, 20, 30 (video 1).
  frames = np.zeros((2, 3, 2, 2, 1), np.uint8)
  frames[0, :] = np.array([0, 100, 200], np.uint8)[:, None, None, None]
  frames[1, :] = np.array([10, 20, 30], np.uint8)[:, None, None, None]
  lam = jnp.array([0.25, 1.0])
  v1, v2 = jax.jit(uscl_method.mix_views)(jnp.asarray(frames), lam)
  assert v1.dtype == jnp.float32 and v1.shape == (2, 2, 2, 1)
  # video 0: 0.25 * 100 + 0.75 * 0 = 25 and 0.25 * 100 + 0.75 * 200 = 175; lambda 1: f2 twice.
  np.testing.assert_allclose(v1[:, 0, 0, 0], [25.0, 20.0])
  np.testing.assert_allclose(v2[:, 0, 0, 0], [175.0, 20.0])
  v1, v2 = uscl_method.mix_views(jnp.asarray(frames), jnp.zeros(2))
  np.testing.assert_allclose(v1, frames[:, 0].astype(np.float32))
  np.testing.assert_allclose(v2, frames[:, 2].astype(np.float32))


def test_mix_views_rejects_bad_shapes():
  with pytest.raises(ValueError, match="three frames per video"):
    uscl_method.mix_views(jnp.zeros((2, 2, 4, 4, 1)), jnp.zeros(2))
  with pytest.raises(ValueError, match="one weight per video"):
    uscl_method.mix_views(jnp.zeros((2, 3, 4, 4, 1)), jnp.zeros(3))


def test_beta_draws_match_the_arcsine_law():
  lam = np.asarray(uscl_method.sample_mix_weights(jax.random.split(jax.random.key(0), 20000), 0.5, 0.5))
  assert lam.shape == (20000,) and lam.min() >= 0 and lam.max() <= 1
  # Beta(1/2, 1/2): mean 1/2, variance 1/8, CDF (2/pi) arcsin(sqrt(x)).
  np.testing.assert_allclose(lam.mean(), 0.5, atol=0.01)
  np.testing.assert_allclose(lam.var(), 0.125, atol=0.005)
  np.testing.assert_allclose((lam < 0.1).mean(), 2 / math.pi * math.asin(math.sqrt(0.1)),
                             atol=0.01)
  skewed = np.asarray(uscl_method.sample_mix_weights(jax.random.split(jax.random.key(1), 20000), 2.0,
                                              5.0))
  np.testing.assert_allclose(skewed.mean(), 2 / 7, atol=0.01)
  with pytest.raises(ValueError, match="must be > 0"):
    uscl_method.sample_mix_weights(jax.random.split(jax.random.key(0), 4), 0.0, 0.5)


def test_masked_cross_entropy_by_hand():
  logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]])
  # Labeled rows 0 (CE ln 2) and 1 with class 1 (p = 1/4 -> CE ln 4); row 2 is unlabeled.
  loss, count = jax.jit(losses.masked_cross_entropy)(logits, jnp.array([0, 1, -1]))
  np.testing.assert_allclose(loss, (math.log(2) + math.log(4)) / 2, rtol=1e-6)
  assert float(count) == 2
  # The unlabeled row's logits get no gradient.
  g = jax.grad(lambda x: losses.masked_cross_entropy(x, jnp.array([0, 1, -1]))[0])(logits)
  np.testing.assert_array_equal(g[2], 0.0)
  np.testing.assert_allclose(g[0], [-0.25, 0.25], rtol=1e-6)  # (softmax - onehot) / 2


def test_masked_cross_entropy_without_labels_is_zero_not_nan():
  logits = jnp.array([[1.0, 2.0], [3.0, -1.0]])
  fn = jax.jit(lambda x: losses.masked_cross_entropy(x, jnp.array([-1, -1]))[0])
  loss, g = jax.value_and_grad(fn)(logits)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(g, 0.0)


def test_uscl_loss_is_nt_xent_plus_weighted_ce():
  rng = np.random.default_rng(0)
  z_a, z_b = (jnp.asarray(rng.normal(size=(4, 6)), jnp.float32) for _ in range(2))
  logits_a = jnp.zeros((4, 3))                                # CE = ln 3 for every view
  logits_b = jnp.zeros((4, 3)).at[1, 2].set(math.log(4.0))    # view 2 of video 1: p(0) = 1/6
  labels = jnp.array([-1, 0, 2, -1])
  fn = jax.jit(lambda *a: losses.uscl(*a, temperature=0.5, lambda_ce=0.2))
  loss, metrics = fn(z_a, z_b, logits_a, logits_b, labels)
  ce = (3 * math.log(3) + math.log(6)) / 4
  con = losses.nt_xent(z_a, z_b, temperature=0.5)
  np.testing.assert_allclose(metrics["ce_loss"], ce, rtol=1e-6)
  np.testing.assert_allclose(loss, con + 0.2 * ce, rtol=1e-6)
  assert float(metrics["num_labeled"]) == 2
  loss0, metrics0 = fn(z_a, z_b, logits_a, logits_b, jnp.full((4,), -1))
  np.testing.assert_allclose(loss0, con, rtol=1e-6)
  assert float(metrics0["ce_loss"]) == 0.0


_SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from ssl_us import losses, parallel

    mesh = parallel.make_mesh(8)
    put = lambda x: jax.device_put(x, parallel.data_sharded(mesh))
    rng = np.random.default_rng(2)
    n = 16
    args = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(n, 5), (n, 5), (n, 3), (n, 3)]]
    labels = np.full(n, -1)
    labels[[0, 1, 11]] = [2, 0, 1]        # devices 0 and 5 hold labels, the rest none
    labels = jnp.asarray(labels)
    kw = dict(temperature=0.5, lambda_ce=0.2)

    def sharded(*a):
      fn = jax.shard_map(lambda *b: losses.uscl(*b, axis_name=parallel.DATA, **kw)[0],
                         mesh=mesh, in_specs=(P(parallel.DATA),) * 5, out_specs=P())
      return fn(*a, put(labels))

    single = lambda *a: losses.uscl(*a, labels, **kw)[0]
    argnums = (0, 1, 2, 3)
    v1, g1 = jax.jit(jax.value_and_grad(single, argnums))(*args)
    v8, g8 = jax.jit(jax.value_and_grad(sharded, argnums))(*[put(a) for a in args])
    # Float32 rounding only, to the tolerance derived in tests/fixtures.py.
    from tests import fixtures
    for x, y in zip(g8, g1):
      assert float(jnp.abs(y).max()) > 1e-4
    fixtures.assert_value_and_gradient_close(v8, v1, g8, g1)
    print("OK")
""")


def test_sharded_uscl_loss_equals_single_device():
  fixtures.run_on_8_cpu_devices(_SHARDED)


# ----------------------------------------------------------------------------------------------
# The USCL method (ssl_us.methods.uscl) on hand-made host batches.


def tiny_uscl_config(**uscl_fields):
  """configs/uscl.py with a 4-wide ConvNet4 on 16x16 and deterministic augmentations."""
  from configs import uscl as uscl_config
  c = uscl_config.get_config()
  c.image_size = (16, 16)
  c.model.encoder = "convnet4"
  c.model.encoder_kwargs = {"width": 4, "dropout_rate": 0.0, "pool": "avg"}
  c.model.head_hidden = (8,)
  c.model.head_out = 8
  c.aug.update(crop_prob=0.0, flip_prob=0.0, color_prob=0.0)  # view = normalised mixed frame
  c.uscl.update(uscl_fields)
  return c


def _three_frame_batch(n=4, labels=None, seed=0):
  rng = np.random.default_rng(seed)
  return {"frames": rng.integers(0, 256, (n, 3, 16, 16, 1), dtype=np.uint8),
          "label": np.asarray(labels if labels is not None else [-1] * n, np.int32)}


def test_views_mix_anchor_with_each_neighbour():
  from ssl_us.methods import make_method
  frames = np.zeros((2, 3, 16, 16, 1), np.uint8)
  frames[:, 0], frames[:, 1], frames[:, 2] = 0, 200, 100
  batch = {"frames": jnp.asarray(frames), "label": jnp.array([-1, -1])}
  # Beta(1000, 1000): lambda = 0.5 +- 0.011, so view 1 ~ 100 and view 2 ~ 150 (of 255).
  method = make_method(tiny_uscl_config(alpha=1000.0, beta=1000.0))
  v_a, v_b = method.views(batch, jax.random.key(0))
  to_units = lambda v: (np.asarray(v) * 0.25 + 0.5) * 255
  np.testing.assert_allclose(to_units(v_a), 100.0, atol=10)
  np.testing.assert_allclose(to_units(v_b), 150.0, atol=10)
  # Beta(1e4, 1e-4): lambda = 1, both views are the anchor f2.
  v_a, v_b = make_method(tiny_uscl_config(alpha=1e4, beta=1e-4)).views(batch, jax.random.key(0))
  np.testing.assert_allclose(to_units(v_a), 200.0, atol=1e-3)
  np.testing.assert_allclose(to_units(v_b), 200.0, atol=1e-3)


def test_one_forward_pass_for_both_views():
  from ssl_us.methods import make_method
  method = make_method(tiny_uscl_config(num_classes=3))
  batch = _three_frame_batch(labels=[0, -1, 2, 1])
  variables = method.init(jax.random.key(0), batch)
  assert variables["params"]["classifier"]["kernel"].shape == (8, 3)
  calls = []
  forward = method.forward

  def counting_forward(params, variables, x, rng):
    calls.append(x.shape)
    return forward(params, variables, x, rng)

  method.forward = counting_forward
  jax.eval_shape(lambda p: method.loss(p, variables, batch, jax.random.key(1)),
                 variables["params"])
  assert calls == [(8, 16, 16, 1)]  # 2 views x 4 videos, once


def test_method_ce_term_zero_without_labels_and_positive_with():
  from ssl_us.methods import make_method
  method = make_method(tiny_uscl_config())
  batch = _three_frame_batch()
  variables = method.init(jax.random.key(0), batch)
  fn = jax.jit(jax.value_and_grad(method.loss, has_aux=True))
  (loss, (_, metrics)), grads = fn(variables["params"], variables, batch, jax.random.key(1))
  assert float(metrics["ce_loss"]) == 0.0 and float(metrics["num_labeled"]) == 0.0
  np.testing.assert_allclose(loss, metrics["contrastive_loss"], rtol=1e-6)
  np.testing.assert_array_equal(grads["classifier"]["kernel"], 0.0)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  batch["label"] = np.array([0, -1, 2, -1], np.int32)
  (loss, (_, metrics)), grads = fn(variables["params"], variables, batch, jax.random.key(1))
  assert float(metrics["num_labeled"]) == 2.0 and float(metrics["ce_loss"]) > 0
  np.testing.assert_allclose(loss, metrics["contrastive_loss"] + 0.2 * metrics["ce_loss"],
                             rtol=1e-6)
  assert float(jnp.abs(grads["classifier"]["kernel"]).max()) > 0
  module, enc_vars = method.encoder(variables)
  h = module.apply(enc_vars, jnp.zeros((2, 16, 16, 1)), train=False)
  assert h.shape == (2, 8)


def test_sharded_method_equals_single_device(tmp_path):
  from tests.test_awcl import run_sharded_method
  batch = _three_frame_batch(n=16, labels=[0, -1, 2, -1, -1, 1, -1, -1,
                                           -1, -1, -1, 0, -1, -1, 2, -1])
  run_sharded_method("test_uscl", "tiny_uscl_config", batch, tmp_path)
