"""Microbatches (ssl_us.gradcache): gradient caching and accumulation equal the unchunked step.

The equivalence tests run a model without normalisation layers (``no_norm``): BatchNorm couples
the examples of a chunk (ghost BatchNorm, by design), so only a BN-free network gives the same
gradient whatever the chunking. LayerNorm is not used as the BN-free stand-in: over the 4
channels of these tiny encoders it divides by near-zero deviations on the flat regions of the
frames, and its backward pass then turns float32 rounding (which differs with the per-device
batch shape) into 1e-3 relative gradient differences between one and eight devices even
without microbatches.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from ssl_us import gradcache, models, parallel, train
from ssl_us.methods import make_method
from tests import fixtures
from tests.test_awcl import tiny_awcl_config
from tests.test_byol import _batch as clip_batch
from tests.test_byol import tiny_config as tiny_byol_config
from tests.test_train import sgd_config, tiny_config
from tests.test_uscl import _three_frame_batch, tiny_uscl_config


class NoNorm(nn.Module):
  """Identity with BatchNorm's constructor arguments."""
  scale_init: object = None
  use_scale: bool = True
  use_bias: bool = True

  def __call__(self, x):
    return x


@pytest.fixture
def no_norm(monkeypatch):
  monkeypatch.setattr(models, "batch_norm", lambda train, axis_name, dtype, **kw: NoNorm)


def _image_batch(n=16, seed=0):
  return {"image": np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 1), np.uint8)}


_ANATOMY = np.array([0, 1, -1, 0, 2, -1, -1, 1, 0, -1, 2, -1, -1, -1, 1, -1], np.int32)


def _case(name):
  """(config, host batch of 16 examples) of each method, small."""
  if name.startswith("simclr"):
    c = tiny_config("unused")
    c.loss.impl = "ring" if name.endswith("ring") else "dense"
    return c, _image_batch()
  if name.startswith("awcl"):
    c = tiny_awcl_config()
    c.loss.impl = "ring" if name.endswith("ring") else "dense"
    c.aug.update(crop_prob=1.0, flip_prob=0.5)    # random views: keys must follow the examples
    return c, {**_image_batch(), "anatomy": _ANATOMY}
  if name == "uscl":
    return tiny_uscl_config(), _three_frame_batch(n=16, labels=list(_ANATOMY))
  if name == "byol":
    return tiny_byol_config("unused"), clip_batch(n=16, t=4, size=16)
  raise ValueError(name)


METHODS = ["simclr", "simclr_ring", "awcl", "awcl_ring", "uscl", "byol"]


@pytest.mark.parametrize("name", METHODS)
def test_microbatches_equal_the_unchunked_step_without_batchnorm(no_norm, name):
  """Loss and gradient with 2 and 4 chunks, on 1 and 8 devices, equal one device unchunked
  to float32 summation order (fixtures.FLOAT32_STEP_RTOL); measured <= 3e-6."""
  config, batch = _case(name)
  errors = fixtures.loss_step_errors(config, batch, [(1, 2), (1, 4), (8, 2)])
  for case, err in errors.items():
    for k, v in err.items():
      assert v <= fixtures.FLOAT32_STEP_RTOL, (name, case, k, errors)


def _cached_step(method, mesh, m):
  def f(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, (new_vars, _)), grads = gradcache.cached(method, m, state.params, state.variables,
                                                    batch, rng)
    return loss, grads, new_vars
  return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P(parallel.DATA)),
                               out_specs=(P(), P(), P())))


def test_gradient_caching_with_one_chunk_equals_the_plain_step_with_batchnorm():
  """With one chunk, ghost BatchNorm is the global BatchNorm: caching's two passes give the
  plain step's loss, gradient and statistics on 8 devices (SimCLR, BatchNorm everywhere)."""
  config, batch = _case("simclr")
  mesh = parallel.make_mesh(8)
  method = make_method(config, parallel.DATA)
  state = parallel.replicate(train.create_state(make_method(config), optax.sgd(0.1),
                                                jax.random.key(0), batch), mesh)
  sharded = parallel.shard_host_batch(batch, mesh)
  got = jax.device_get(_cached_step(method, mesh, 1)(state, sharded))
  want = jax.device_get(fixtures.loss_step(method, mesh, 1)(state, sharded))
  assert abs(float(got[0]) - float(want[0])) <= 1e-6 * abs(float(want[0]))
  for g, w in zip(got[1:], want[1:]):
    errors = fixtures.normwise_errors(g, w)
    assert max(errors.values()) <= fixtures.FLOAT32_STEP_RTOL, errors


def test_batchnorm_chunks_are_ghost_batches():
  """With BatchNorm, chunking changes the result (each chunk is normalised on its own), by far
  more than rounding: the equivalence above is not an accident of the test model."""
  config, batch = _case("simclr")
  err = fixtures.loss_step_errors(config, batch, [(1, 2)])[(1, 2)]
  assert err["grads"] > 100 * fixtures.FLOAT32_STEP_RTOL, err


def test_running_statistics_move_once_by_the_mean_chunk_update():
  old = {"batch_stats": {"mean": jnp.array([1.0, 2.0]), "var": jnp.array([4.0])}}
  chunks = {"batch_stats": {"mean": jnp.array([[2.0, 2.0], [4.0, 2.0]]),   # updates 1, 3; 0, 0
                            "var": jnp.array([[3.0], [7.0]])}}             # updates -1, 3
  new = gradcache._mean_update(old, chunks)
  np.testing.assert_array_equal(new["batch_stats"]["mean"], [3.0, 2.0])
  np.testing.assert_array_equal(new["batch_stats"]["var"], [5.0])
  # An entry no chunk changes (BYOL's target parameters) stays bit for bit.
  x = jnp.array([0.1, 1e-8, 3.3])
  same = gradcache._mean_update({"t": x}, {"t": jnp.stack([x, x, x])})
  np.testing.assert_array_equal(same["t"], x)


def test_chunk_layout_round_trips():
  """Chunk i holds examples [i c, (i + 1) c) of both views; unchunk restores [v_a; v_b]."""
  v_a, v_b = jnp.arange(6), 10 + jnp.arange(6)
  chunks = gradcache._pair_chunks(v_a, v_b, 3)
  np.testing.assert_array_equal(chunks, [[0, 1, 10, 11], [2, 3, 12, 13], [4, 5, 14, 15]])
  np.testing.assert_array_equal(gradcache._unchunk(chunks, 3), jnp.concatenate([v_a, v_b]))
  np.testing.assert_array_equal(
      gradcache._chunk_like_views(jnp.concatenate([v_a, v_b]), 3), chunks)


@pytest.mark.parametrize("value,message", [
    (3, r"config.microbatches=3 does not divide the per-device batch 2"),
    (0, r"config.microbatches must be an int >= 1, got 0"),
    (-2, r"config.microbatches must be an int >= 1, got -2")])
def test_config_errors(value, message):
  c = sgd_config("some/dir", batch_size=16, microbatches=value)
  with pytest.raises(ValueError, match=message):
    train.validate_config(c, num_devices=8, num_processes=1)


def _temp_mb(config, batch, m):
  method = make_method(config, parallel.DATA)
  mesh = parallel.make_mesh(1)
  state = train.create_state(make_method(config), optax.sgd(0.1), jax.random.key(0), batch)
  fn = fixtures.loss_step(method, mesh, m)
  compiled = fn.lower(parallel.replicate(state, mesh),
                      parallel.shard_host_batch(batch, mesh)).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2**20


def test_step_memory_is_set_by_one_chunk():
  """XLA's compiled temporary memory: 4 chunks of a 64-example batch need about what 16
  examples unchunked need, far below 64 unchunked."""
  config = tiny_config("unused")
  config.image_size = (32, 32)
  config.model.encoder_kwargs.width = 16
  t64 = _temp_mb(config, _image_batch(64), 1)
  t16 = _temp_mb(config, _image_batch(16), 1)
  t64_m4 = _temp_mb(config, _image_batch(64), 4)
  assert t64_m4 < 0.5 * t64, (t64, t16, t64_m4)
  assert t64_m4 < 1.5 * t16, (t64, t16, t64_m4)


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
  # 16 videos: USCL draws one video per example.
  return fixtures.write_dataset(str(tmp_path_factory.mktemp("frames")), num_videos=16, frames=4)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  return fixtures.write_dataset(str(tmp_path_factory.mktemp("clips")), num_videos=8, frames=8,
                                clip_len=4)


@pytest.mark.parametrize("name", ["simclr", "awcl", "uscl", "byol"])
def test_training_run_with_microbatches_on_8_devices(no_norm, frames, clips, tmp_path, name,
                                                    monkeypatch):
  """The whole spine (input, step, checkpoints) with config.microbatches = 2 on 8 devices
  goes through caching (accumulation for BYOL) with 2 chunks, and its losses equal the
  unchunked run's to float32 rounding (2 steps: rounding grows about 40x per step, fixtures)."""
  traced = []
  for strategy in ("cached", "accumulated"):
    real = getattr(gradcache, strategy)
    monkeypatch.setattr(gradcache, strategy, lambda method, m, *a, real=real, s=strategy: (
        traced.append((s, m)), real(method, m, *a))[1])
  config, _ = _case(name)
  data = clips if name == "byol" else frames
  run = tiny_byol_config(data) if name == "byol" else tiny_config(data)
  for key in ("data", "batch_size", "log_every", "ckpt_every", "progress_bar", "optim"):
    config[key] = run[key]
  config.batch_size, config.num_steps, config.num_epochs = 16, 2, 0
  mesh = parallel.make_mesh(8)
  history = {}
  for m in (1, 2):
    c = config.copy_and_resolve_references()
    c.microbatches = m
    history[m] = train.train_and_evaluate(c, str(tmp_path / f"m{m}"), mesh=mesh)
  assert history[2]["step"] == [1, 2]
  assert set(traced) == {("accumulated" if name == "byol" else "cached", 2)}, traced
  np.testing.assert_allclose(history[2]["loss"], history[1]["loss"], rtol=1e-5)
