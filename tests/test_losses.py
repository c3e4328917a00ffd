"""nt_xent and byol: hand-computed values, finite differences, sharded == single device."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ssl_us import losses, parallel


def nt_xent_by_hand(za, zb, t):
  """Eq. 1 written out with loops over the 2N anchors."""
  z = np.concatenate([za, zb]).astype(np.float64)
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  n2 = len(z)
  n = n2 // 2
  total = 0.0
  for i in range(n2):
    j = (i + n) % n2
    num = np.exp(z[i] @ z[j] / t)
    den = sum(np.exp(z[i] @ z[k] / t) for k in range(n2) if k != i)
    total += -np.log(num / den)
  return total / n2


def test_nt_xent_two_pairs_closed_form():
  # Orthonormal pairs: za = [e1, e2], zb = [e1, e2] -> each anchor: sim 1 with partner,
  # 0 with the two others: l = -log(e^{1/t} / (e^{1/t} + 2)).
  t = 0.5
  za = np.eye(2, 3, dtype=np.float32)
  loss = jax.jit(lambda a, b: losses.nt_xent(a, b, temperature=t))(za, za)
  expected = -np.log(np.exp(1 / t) / (np.exp(1 / t) + 2.0))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.parametrize("n,d,t", [(3, 4, 0.1), (5, 8, 0.5), (4, 2, 1.0)])
def test_nt_xent_matches_loops(n, d, t):
  rng = np.random.default_rng(n * d)
  za, zb = rng.normal(size=(n, d)), rng.normal(size=(n, d))
  loss = jax.jit(lambda a, b: losses.nt_xent(a, b, temperature=t))(
      za.astype(np.float32), zb.astype(np.float32))
  np.testing.assert_allclose(loss, nt_xent_by_hand(za, zb, t), rtol=1e-5)


def test_nt_xent_gradient_finite_differences():
  rng = np.random.default_rng(0)
  za, zb = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
  g = jax.grad(lambda a: losses.nt_xent(a, jnp.asarray(zb, jnp.float32), temperature=0.3))(
      jnp.asarray(za, jnp.float32))
  eps = 1e-5
  fd = np.zeros_like(za)
  for i, j in itertools.product(range(3), range(4)):
    e = np.zeros_like(za)
    e[i, j] = eps
    fd[i, j] = (nt_xent_by_hand(za + e, zb, 0.3) - nt_xent_by_hand(za - e, zb, 0.3)) / (2 * eps)
  np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-5)


def test_nt_xent_rejects_bad_temperature_and_shapes():
  z = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="temperature"):
    losses.nt_xent(z, z, temperature=0.0)
  with pytest.raises(ValueError, match="z_a and z_b"):
    losses.nt_xent(z, jnp.ones((3, 3)), temperature=0.5)


def test_contrastive_metrics_perfect_alignment():
  # Partners identical and orthogonal to everything else: top-1 accuracy 1.
  za = np.eye(4, 8, dtype=np.float32)
  _, m = losses.nt_xent_and_metrics(za, za, temperature=0.05)
  np.testing.assert_allclose(m["contrastive_acc"], 1.0)
  # Entropy of a softmax over 7 candidates is within [0, log 7].
  assert 0.0 <= float(m["contrastive_entropy"]) <= np.log(7) + 1e-6


def _sharded(fn, mesh):
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(parallel.DATA), P(parallel.DATA)),
                               out_specs=(P(), P(parallel.DATA), P(parallel.DATA))))


@pytest.mark.parametrize("devices", [2, 8])
def test_nt_xent_sharded_equals_global(devices):
  """Each device sees its local pairs; negatives span the global batch; value and gradient."""
  mesh = parallel.make_mesh(devices)
  rng = np.random.default_rng(devices)
  big_n, d, t = 16, 8, 0.2
  za = jnp.asarray(rng.normal(size=(big_n, d)), jnp.float32)
  zb = jnp.asarray(rng.normal(size=(big_n, d)), jnp.float32)

  def local(a, b):
    loss, (ga, gb) = jax.value_and_grad(
        lambda a, b: losses.nt_xent(a, b, temperature=t, axis_name=parallel.DATA),
        argnums=(0, 1))(a, b)
    return loss, ga, gb

  put = lambda x: jax.device_put(x, parallel.data_sharded(mesh))
  loss, ga, gb = _sharded(local, mesh)(put(za), put(zb))
  ref, (ra, rb) = jax.value_and_grad(lambda a, b: losses.nt_xent(a, b, temperature=t),
                                     argnums=(0, 1))(za, zb)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(ga, ra, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(gb, rb, rtol=1e-4, atol=1e-7)


def test_byol_loss_values_and_stop_gradient():
  p_a = jnp.asarray([[1.0, 0.0], [0.0, 2.0]])
  p_b = jnp.asarray([[0.0, 1.0], [3.0, 0.0]])
  z_a = jnp.asarray([[1.0, 1.0], [0.0, -1.0]])
  z_b = jnp.asarray([[2.0, 0.0], [0.0, 5.0]])
  # Example 0: cos(p_a, z_b)=1, cos(p_b, z_a)=1/sqrt2 -> 0 + 2 - sqrt2.
  # Example 1: cos(p_a, z_b)=1, cos(p_b, z_a)=0 -> 0 + 2.
  expected = ((2 - np.sqrt(2)) + 2.0) / 2
  np.testing.assert_allclose(jax.jit(losses.byol)(p_a, p_b, z_a, z_b), expected, rtol=1e-6)
  gz = jax.grad(lambda za, zb: losses.byol(p_a, p_b, za, zb), argnums=(0, 1))(z_a, z_b)
  assert all(float(jnp.abs(g).sum()) == 0.0 for g in gz)
  gp = jax.grad(lambda pa: losses.byol(pa, p_b, z_a, z_b))(p_a + 0.1)
  assert float(jnp.abs(gp).sum()) > 0
