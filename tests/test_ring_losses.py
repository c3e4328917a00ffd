"""Ring NT-Xent and AWCL (losses, impl='ring') against the dense ones on 8 fake devices:
values, metrics and gradients; memory that does not grow with the global batch; 'auto'."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ssl_us import losses, parallel
from tests import fixtures

N_LOCAL, DIM = 6, 8           # per device; the global batch is 8 x 6 = 48 pairs


def _embeddings(kind, seed):
  rng = np.random.default_rng(seed)
  n = 8 * N_LOCAL
  if kind == "random":
    return rng.normal(size=(n, DIM)), rng.normal(size=(n, DIM))
  if kind == "identical":          # every view the same direction: all logits tie
    z = np.ones((n, DIM))
    return z, z.copy()
  if kind == "near_duplicates":    # partners almost equal, large norms, one hard negative each
    z = rng.normal(size=(n, DIM)) * 100
    return z, z + rng.normal(size=(n, DIM)) * 1e-3
  if kind == "collapsed_pairs":    # two clusters: half the batch on each of two directions
    base = np.where(np.arange(n)[:, None] % 2 == 0, np.eye(DIM)[0], np.eye(DIM)[1])
    return base + rng.normal(size=(n, DIM)) * 1e-2, base + rng.normal(size=(n, DIM)) * 1e-2
  raise ValueError(kind)


def _labels(seed):
  # -1 (no anatomy) included; classes span devices.
  return np.random.default_rng(seed).integers(-1, 3, 8 * N_LOCAL).astype(np.int32)


def _run(name, impl, z_a, z_b, labels, temperature):
  mesh = parallel.make_mesh(8)
  put = lambda x: jax.device_put(x, parallel.data_sharded(mesh))

  def per_device(a, b, y):
    if name == "nt_xent":
      return losses.nt_xent_and_metrics(a, b, temperature=temperature, axis_name=parallel.DATA,
                                        impl=impl)
    return losses.awcl_and_metrics(a, b, y, temperature=temperature, axis_name=parallel.DATA,
                                   impl=impl)

  fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(parallel.DATA),) * 3,
                     out_specs=(P(), P()))
  labels = put(jnp.asarray(labels))
  grad_fn = jax.jit(jax.value_and_grad(lambda a, b: fn(a, b, labels), argnums=(0, 1),
                                       has_aux=True))
  (value, metrics), grads = grad_fn(put(z_a), put(z_b))
  return float(value), jax.device_get(metrics), jax.device_get(grads)


@pytest.mark.parametrize("name", ["nt_xent", "awcl"])
@pytest.mark.parametrize("kind", ["random", "identical", "near_duplicates", "collapsed_pairs"])
@pytest.mark.parametrize("temperature", [0.05, 0.2, 1.0])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ring_equals_dense_in_value_metrics_and_gradient(name, kind, temperature, dtype):
  """Float32 rounding only: the ring sums the same terms blockwise (online logsumexp), so the
  repo's float32 reordering tolerance (tests/fixtures.py) applies. bfloat16 embeddings are
  normalised in float32 by both, so values and metrics keep that tolerance; their gradients
  come back in bfloat16, each element rounded once (at most 2**-8 of it), so two float32
  gradients within the tolerance can round 2**-8 apart."""
  z_a, z_b = (jnp.asarray(z, dtype) for z in _embeddings(kind, seed=len(kind)))
  labels = _labels(7)
  v_d, m_d, g_d = _run(name, "dense", z_a, z_b, labels, temperature)
  v_r, m_r, g_r = _run(name, "ring", z_a, z_b, labels, temperature)
  tol = fixtures.FLOAT32_STEP_RTOL
  assert np.isfinite(v_r) and abs(v_r - v_d) <= tol * abs(v_d), (v_r, v_d)
  assert set(m_r) == set(m_d)
  for k in m_d:
    if k == "contrastive_acc" and kind in ("identical", "collapsed_pairs"):
      continue   # ties between partner and others: argmax picks an index, the ring says no
    np.testing.assert_allclose(m_r[k], m_d[k], rtol=tol, atol=tol, err_msg=k)
  g_d = [np.asarray(g, np.float32) for g in g_d]
  g_r = [np.asarray(g, np.float32) for g in g_r]
  if kind == "identical":
    # Every logit ties, so the loss does not change along the sphere: the true gradient is 0
    # (normalisation removes the radial part) and both hold only rounding noise.
    for g in g_d + g_r:
      assert np.abs(g).max() < 1e-4, np.abs(g).max()
  else:
    errors = fixtures.normwise_errors(g_r, g_d)
    assert max(errors.values()) <= tol + (2**-8 if dtype == "bfloat16" else 0), errors


@pytest.mark.parametrize("name", ["nt_xent", "awcl"])
def test_ring_in_anchor_tiles_equals_dense(name, monkeypatch):
  """Blocks computed 4 anchor rows at a time (3 tiles of the 12 local views) as at large n."""
  monkeypatch.setattr(losses, "RING_TILE_ROWS", 4)
  assert losses._tile_rows(12) == 4 and losses._tile_rows(14) == 2  # pylint: disable=protected-access
  z_a, z_b = (jnp.asarray(z, jnp.float32) for z in _embeddings("random", 5))
  labels = _labels(5)
  v_d, m_d, g_d = _run(name, "dense", z_a, z_b, labels, 0.1)
  v_r, m_r, g_r = _run(name, "ring", z_a, z_b, labels, 0.1)
  fixtures.assert_value_and_gradient_close(v_r, v_d, g_r, g_d)
  for k in m_d:
    np.testing.assert_allclose(m_r[k], m_d[k], rtol=fixtures.FLOAT32_STEP_RTOL, err_msg=k)


def test_ring_on_one_device_equals_dense():
  z_a, z_b = _embeddings("random", 3)
  y = _labels(3)
  for fn in (lambda impl: losses.nt_xent(z_a, z_b, temperature=0.1, impl=impl),
             lambda impl: losses.awcl(z_a, z_b, y, temperature=0.1, impl=impl)):
    np.testing.assert_allclose(fn("ring"), fn("dense"), rtol=1e-6)
  g = [jax.grad(lambda a, impl=impl: losses.nt_xent(a, z_b, temperature=0.1, impl=impl))(
      jnp.asarray(z_a, jnp.float32)) for impl in ("dense", "ring")]
  np.testing.assert_allclose(g[1], g[0], rtol=1e-5, atol=1e-7)


def _temp_bytes(impl, devices, n_local=256, dim=128):
  """XLA's temporary buffer size of one device's compiled loss + gradient."""
  mesh = parallel.make_mesh(devices)
  fn = jax.shard_map(lambda a, b: losses.nt_xent(a, b, temperature=0.1,
                                                 axis_name=parallel.DATA, impl=impl),
                     mesh=mesh, in_specs=(P(parallel.DATA),) * 2, out_specs=P())
  shape = jax.ShapeDtypeStruct((devices * n_local, dim), jnp.float32,
                               sharding=parallel.data_sharded(mesh))
  compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(shape, shape).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_ring_memory_does_not_grow_with_the_global_batch():
  """At n = 256 per device, from 2 to 8 devices (N = 512 .. 2048): the dense logits (2n x 2N,
  with their softmax) grow with N; the ring's (2n x 2n) blocks do not."""
  ring = {d: _temp_bytes("ring", d) for d in (2, 4, 8)}
  dense = {d: _temp_bytes("dense", d) for d in (2, 4, 8)}
  assert dense[8] > 3 * dense[2], dense
  block = (2 * 256) ** 2 * 4                      # one float32 (2n x 2n) block: 1 MiB
  assert ring[8] <= ring[4] <= ring[2], ring      # measured 4.8, 3.3, 3.3 MiB
  assert ring[8] < 8 * block, ring                # a few blocks, whatever N
  assert ring[8] < dense[8] / 2, (ring, dense)


@pytest.mark.parametrize("impl,n,devices,limit,expected", [
    ("auto", 256, 8, 1 << 30, "dense"),        # 512 x 4096 x 4 B = 8 MiB
    ("auto", 256, 8, 4 << 20, "ring"),
    ("dense", 4096, 8, 1, "dense"), ("ring", 2, 1, 1 << 30, "ring")])
def test_auto_picks_the_ring_above_the_dense_limit(impl, n, devices, limit, expected):
  if devices == 1:
    assert losses.resolve_impl(impl, n, None, limit) == expected
    return
  mesh = parallel.make_mesh(devices)
  got = {}

  def f(x):
    got["impl"] = losses.resolve_impl(impl, n, parallel.DATA, limit)
    return x
  jax.shard_map(f, mesh=mesh, in_specs=P(parallel.DATA), out_specs=P(parallel.DATA))(
      jax.device_put(jnp.zeros(devices), parallel.data_sharded(mesh)))
  assert got["impl"] == expected
  with pytest.raises(ValueError, match="loss impl 'sparse'"):
    losses.resolve_impl("sparse", n, None)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return fixtures.write_dataset(str(tmp_path_factory.mktemp("data")), num_videos=8, frames=4)


def test_training_step_with_the_ring_equals_one_device(dataset):
  """config.loss.impl='ring' through the spine: 8 devices (keys around the ring) == 1 device,
  each step from a shared state (tests/fixtures.py)."""
  from tests import test_train
  config = test_train.sgd_config(dataset)
  config.loss.impl = "ring"
  fixtures.assert_sharded_step_equals_single_device(config, steps=2)
