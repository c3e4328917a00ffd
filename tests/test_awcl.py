"""AWCL loss (paper 002 Eq. 1-3): hand-computed values, a loop reference, and sharded == global."""
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_us import losses
from tests import fixtures

T = 0.5


def _orthonormal(n, d=8):
  """z_a = z_b = e_1..e_n: partners have cosine 1, every other pair cosine 0."""
  z = np.eye(d, dtype=np.float32)[:n]
  return jnp.asarray(z), jnp.asarray(z)


def _log_den(n, t=T):
  # Denominator of every anchor for orthonormal views: exp(1/t) + (2n - 2) * exp(0).
  return np.log(np.exp(1 / t) + 2 * n - 2)


def _awcl(z_a, z_b, labels, t=T):
  return jax.jit(lambda a, b, y: losses.awcl(a, b, y, temperature=t))(z_a, z_b, labels)


def test_none_labeled_is_nt_xent_by_hand():
  z_a, z_b = _orthonormal(3)
  labels = jnp.array([-1, -1, -1])
  # Every anchor: -log(e^{1/t} / (e^{1/t} + 4)).
  np.testing.assert_allclose(_awcl(z_a, z_b, labels), _log_den(3) - 1 / T, rtol=1e-6)


def test_all_labeled_same_class_by_hand():
  z_a, z_b = _orthonormal(3)
  labels = jnp.array([2, 2, 2])
  # A(i) = the other 5 views: the partner (logit 1/t) and four with logit 0.
  np.testing.assert_allclose(_awcl(z_a, z_b, labels), _log_den(3) - (1 / T) / 5, rtol=1e-6)


def test_singleton_labels_reduce_to_partner():
  z_a, z_b = _orthonormal(3)
  # Distinct labels: each A(i) is only the partner, exactly the unlabeled case.
  np.testing.assert_allclose(_awcl(z_a, z_b, jnp.array([0, 1, 2])), _log_den(3) - 1 / T,
                             rtol=1e-6)


def test_mixed_labeled_and_unlabeled_by_hand():
  z_a, z_b = _orthonormal(3)
  labels = jnp.array([0, 0, -1])
  # Examples 0, 1 (4 anchors): |A| = 3, sum of positive logits 1/t -> log D - (1/t)/3.
  # Example 2 (2 anchors): partner only -> log D - 1/t.
  expected = (4 * (_log_den(3) - (1 / T) / 3) + 2 * (_log_den(3) - 1 / T)) / 6
  np.testing.assert_allclose(_awcl(z_a, z_b, labels), expected, rtol=1e-6)


def test_minus_one_never_matches_another_minus_one():
  # Were -1 a class, the views of examples 0 and 1 would be positives of each other.
  z = jnp.asarray([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
  got = _awcl(z, z, jnp.array([-1, -1, 5]))
  ref = losses.nt_xent(z, z, temperature=T)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  np.testing.assert_allclose(_awcl(z, z, jnp.array([-1, -1, -1])), ref, rtol=1e-6)
  # As a class, label 7 for both changes the value: the test above can tell the difference.
  assert abs(float(_awcl(z, z, jnp.array([7, 7, -1]))) - float(ref)) > 1e-3


def _reference(z_a, z_b, labels, t):
  """Direct loop over anchors of Eq. 2/Eq. 1 in float64."""
  z = np.concatenate([z_a, z_b]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  lab = np.concatenate([labels, labels])
  n2 = len(z)
  total = 0.0
  for i in range(n2):
    partner = (i + n2 // 2) % n2
    sims = {k: z[i] @ z[k] / t for k in range(n2) if k != i}
    log_den = np.log(sum(np.exp(s) for s in sims.values()))
    if lab[i] >= 0:
      pos = [k for k in sims if lab[k] == lab[i]]
    else:
      pos = [partner]
    total += -np.mean([sims[k] - log_den for k in pos])
  return total / n2


def test_matches_loop_reference_on_random_batch():
  rng = np.random.default_rng(0)
  z_a = rng.normal(size=(6, 5)).astype(np.float32)
  z_b = rng.normal(size=(6, 5)).astype(np.float32)
  labels = np.array([0, 1, -1, 0, 1, -1])
  got = _awcl(jnp.asarray(z_a), jnp.asarray(z_b), jnp.asarray(labels), t=0.3)
  np.testing.assert_allclose(got, _reference(z_a, z_b, labels, 0.3), rtol=1e-5)


def test_gradient_is_finite_and_metrics():
  z_a, z_b = _orthonormal(3)
  labels = jnp.array([1, 1, -1])
  fn = jax.jit(lambda a, b: losses.awcl_and_metrics(a, b, labels, temperature=T))
  (loss, metrics), grads = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(z_a, z_b)
  assert all(np.isfinite(g).all() for g in grads)
  # |A(i)|: 4 anchors with 3 positives, 2 with 1 -> mean 14/6.
  np.testing.assert_allclose(metrics["awcl_num_positives"], 14 / 6, rtol=1e-6)
  np.testing.assert_allclose(metrics["contrastive_acc"], 1.0)


def test_bad_labels_raise():
  z_a, z_b = _orthonormal(3)
  with pytest.raises(ValueError, match=r"labels must be an integer array of shape \(3,\)"):
    losses.awcl(z_a, z_b, jnp.array([0, 1]), temperature=T)
  with pytest.raises(ValueError, match="integer"):
    losses.awcl(z_a, z_b, jnp.array([0.0, 1.0, 2.0]), temperature=T)


_SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from ssl_us import losses, parallel

    mesh = parallel.make_mesh(8)
    assert mesh.size == 8
    rng = np.random.default_rng(1)
    z_a = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
    z_b = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
    # Positives span devices: class 0 lives on devices 0 and 7, class 3 on 2 and 5.
    labels = np.full(16, -1)
    labels[[0, 15, 1]] = 0
    labels[[4, 10]] = 3
    labels[[6]] = 2
    labels = jnp.asarray(labels)

    put = lambda x: jax.device_put(x, parallel.data_sharded(mesh))
    labels_8 = put(labels)

    def sharded(a, b):
      fn = jax.shard_map(
          lambda a, b, y: losses.awcl(a, b, y, temperature=0.2, axis_name=parallel.DATA),
          mesh=mesh, in_specs=(P(parallel.DATA),) * 3, out_specs=P())
      return fn(a, b, labels_8)

    single = lambda a, b: losses.awcl(a, b, labels, temperature=0.2)
    v1, g1 = jax.jit(jax.value_and_grad(single, argnums=(0, 1)))(z_a, z_b)
    v8, g8 = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(put(z_a), put(z_b))
    # Float32 rounding only, to the tolerance derived in tests/fixtures.py.
    from tests import fixtures
    for x, y in zip(g8, g1):
      assert float(jnp.abs(y).max()) > 1e-4
    fixtures.assert_value_and_gradient_close(v8, v1, g8, g1)
    print("OK", float(v1))
""")


def test_sharded_equals_single_device_value_and_gradient():
  fixtures.run_on_8_cpu_devices(_SHARDED)


# ----------------------------------------------------------------------------------------------
# The AWCL method (ssl_us.methods.awcl) on hand-made host batches.


def tiny_awcl_config(**awcl):
  """configs/awcl_fetal.py with a 4-wide ConvNet4 on 16x16 and deterministic views."""
  from configs import awcl_fetal
  c = awcl_fetal.get_config()
  c.image_size = (16, 16)
  c.model.encoder = "convnet4"
  c.model.encoder_kwargs = {"width": 4, "dropout_rate": 0.0, "pool": "avg"}
  c.model.head_hidden = (8,)
  c.model.head_out = 8
  c.aug.update(crop_prob=0.0, flip_prob=0.0, color_prob=0.0)  # view = normalised frame
  c.awcl.update(awcl)
  return c


def test_method_builds_the_configured_sampler():
  from ssl_us.methods import make_method
  from ssl_us.samplers_frames import AnatomySampler, SameVideoSampler
  s = make_method(tiny_awcl_config(pairs="anatomy", granularity="coarse",
                                   anatomy_ratio=0.3)).sampler
  assert s == AnatomySampler(granularity="coarse", anatomy_ratio=0.3, unlabeled_every=8)
  s = make_method(tiny_awcl_config(pairs="simclr")).sampler
  assert isinstance(s, AnatomySampler) and s.anatomy_ratio == 0.0
  s = make_method(tiny_awcl_config(pairs="clpi", clpi_group="patient")).sampler
  assert s == SameVideoSampler(group="patient", every=8)
  with pytest.raises(ValueError, match="config.awcl.pairs='moco'"):
    make_method(tiny_awcl_config(pairs="moco"))


def test_clpi_views_are_the_two_frames():
  from ssl_us.methods import make_method
  method = make_method(tiny_awcl_config(pairs="clpi"))
  batch = {"image": np.zeros((2, 16, 16, 1), np.uint8),
           "image_b": np.full((2, 16, 16, 1), 255, np.uint8), "anatomy": np.full(2, -1)}
  v_a, v_b = method.views(batch, jax.random.key(0))
  # (x / 255 - mean) / std with mean 0.5, std 0.25.
  np.testing.assert_allclose(v_a, -2.0, atol=1e-5)
  np.testing.assert_allclose(v_b, 2.0, atol=1e-5)


def test_method_loss_uses_anatomy_labels():
  from ssl_us.methods import make_method
  method = make_method(tiny_awcl_config())
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 16, 16, 1), dtype=np.uint8)
  variables = method.init(jax.random.key(0), {"image": images})
  params = variables["params"]

  def run(labels):
    batch = {"image": jnp.asarray(images), "anatomy": jnp.asarray(labels, jnp.int32)}
    fn = jax.jit(jax.value_and_grad(method.loss, has_aux=True))
    return fn(params, variables, batch, jax.random.key(1))

  (l_none, (_, m_none)), _ = run([-1, -1, -1, -1])
  (l_lab, (new_vars, m_lab)), grads = run([0, 0, 1, -1])
  assert float(m_none["labeled_fraction"]) == 0.0 and float(m_lab["labeled_fraction"]) == 0.75
  # Positives: 4 anchors of class 0 with 3, 2 of class 1 with 1, 2 unlabeled with 1 -> 16/8.
  np.testing.assert_allclose(m_lab["awcl_num_positives"], 2.0)
  assert abs(float(l_lab) - float(l_none)) > 1e-4
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert jax.tree.structure(new_vars["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])


_SHARDED_METHOD = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from ssl_us import parallel
    from ssl_us.methods import make_method
    from tests.{module} import {config_fn} as tiny_config

    mesh = parallel.make_mesh(8)
    cfg = tiny_config()
    cfg.aug.update(crop_prob=1.0, flip_prob=0.5, color_prob=0.8)  # random views, keyed per example
    single, sharded = make_method(cfg), make_method(cfg, axis_name=parallel.DATA)
    batch = {{k: jnp.asarray(v) for k, v in np.load(sys.argv[1]).items()}}
    variables = single.init(jax.random.key(0), batch)
    params, key = variables["params"], jax.random.key(3)

    def loss_1(p):
      return single.loss(p, variables, batch, key)[0]

    def loss_8(p, b):
      fn = jax.shard_map(lambda p, b: sharded.loss(p, variables, b, key)[0], mesh=mesh,
                         in_specs=(P(), P(parallel.DATA)), out_specs=P())
      return fn(p, b)

    put = lambda x: jax.device_put(x, parallel.data_sharded(mesh))
    v1, g1 = jax.jit(jax.value_and_grad(loss_1))(params)
    v8, g8 = jax.jit(jax.value_and_grad(loss_8))(parallel.replicate(params, mesh),
                                                 jax.tree.map(put, batch))
    # Float32 rounding only, to the tolerance derived in tests/fixtures.py.
    from tests import fixtures
    fixtures.assert_value_and_gradient_close(v8, v1, g8, g1)
    print("OK", float(v1))
""")


def run_sharded_method(module, config_fn, batch, tmp_path):
  """Runs a method's loss on 8 fake devices and on one; asserts equal value and gradient."""
  path = str(tmp_path / "batch.npz")
  np.savez(path, **batch)
  fixtures.run_on_8_cpu_devices(_SHARDED_METHOD.format(module=module, config_fn=config_fn),
                                path, timeout=600)


def test_sharded_method_equals_single_device(tmp_path):
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (16, 16, 16, 1), dtype=np.uint8),
           "anatomy": np.array([0, 1, -1, 0, 2, -1, -1, 1, 0, -1, 2, -1, -1, -1, 1, -1],
                               np.int32)}
  run_sharded_method("test_awcl", "tiny_awcl_config", batch, tmp_path)
