"""AWCL loss (paper 002 Eq. 1-3): hand-computed values, a loop reference, and sharded == global."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_us import losses

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
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
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
    np.testing.assert_allclose(v8, v1, rtol=1e-5)
    for x, y in zip(g8, g1):
      assert float(jnp.abs(y).max()) > 1e-4
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    print("OK", float(v1))
""")


def test_sharded_equals_single_device_value_and_gradient():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", _SHARDED], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith("OK")
