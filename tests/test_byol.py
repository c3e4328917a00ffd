"""BYOL: EMA and tau schedules by hand, stop-gradient into the target, 8 devices == 1, resume."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import byol_lung, simclr_lung3d
from ssl_us import checkpoint, ema, parallel, train
from ssl_us.methods import byol, simclr_video
from tests import fixtures


# ----------------------------------------------------------------------------------------------
# EMA and schedules.


def test_ema_update_by_hand():
  target = {"a": jnp.asarray([1.0, 2.0]), "b": {"c": jnp.asarray(4.0)}}
  online = {"a": jnp.asarray([3.0, 0.0]), "b": {"c": jnp.asarray(0.0)}}
  got = jax.jit(ema.ema_update)(target, online, 0.99)
  # 0.99 * 1 + 0.01 * 3 = 1.02; 0.99 * 2 = 1.98; 0.99 * 4 = 3.96.
  np.testing.assert_allclose(got["a"], [1.02, 1.98], rtol=1e-6)
  np.testing.assert_allclose(got["b"]["c"], 3.96, rtol=1e-6)
  np.testing.assert_array_equal(ema.ema_update(target, online, 1.0)["a"], target["a"])
  np.testing.assert_array_equal(ema.ema_update(target, online, 0.0)["a"], online["a"])
  with pytest.raises(ValueError, match="differ in structure"):
    ema.ema_update(target, {"a": online["a"]}, 0.5)
  with pytest.raises(ValueError, match=r"leaf shapes differ, target \(2,\) vs online \(3,\)"):
    ema.ema_update({"a": target["a"]}, {"a": jnp.zeros(3)}, 0.5)


def test_tau_schedules_by_hand():
  const = jax.jit(ema.make_tau_schedule("constant", 0.99, 100))
  for k in (0, 57, 1000):
    np.testing.assert_allclose(const(k), 0.99, rtol=1e-7)
  cos = jax.jit(ema.make_tau_schedule("cosine", 0.996, 100))
  # 1 - (1 - 0.996) * (cos(pi k / 100) + 1) / 2
  expected = {0: 0.996, 25: 1 - 0.002 * (math.cos(math.pi / 4) + 1), 50: 0.998, 100: 1.0,
              150: 1.0}
  for k, v in expected.items():
    np.testing.assert_allclose(cos(k), v, rtol=1e-7)
  with pytest.raises(ValueError, match="unknown tau schedule 'linear'"):
    ema.make_tau_schedule("linear", 0.99, 10)
  with pytest.raises(ValueError, match=r"base tau must be in \[0, 1\], got 1.5"):
    ema.make_tau_schedule("constant", 1.5, 10)


# ----------------------------------------------------------------------------------------------
# The method on a tiny clip dataset.


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return fixtures.write_dataset(str(tmp_path_factory.mktemp("clips")), num_videos=8, frames=8,
                                clip_len=4)


def tiny_config(data_dir, **over):
  c = byol_lung.get_config("runlocal")
  c.data.dir = data_dir
  c.data.num_workers = 0
  c.image_size = (12, 12)
  c.batch_size = 8
  c.num_steps = 4
  c.log_every = 1
  c.ckpt_every = 2
  c.progress_bar = False
  c.model.encoder = "r3d18"
  c.model.encoder_kwargs = ml_collections.ConfigDict(dict(
      num_filters=4, stage_sizes=(1, 1), temporal_strides=(1, 2), small_stem=True))
  c.model.head_hidden = (16,)
  c.model.head_out = 8
  c.byol.predictor_hidden = (16,)
  c.byol.tau_base = 0.9  # a visible lag in 4 steps
  c.clips.update(clip_len=4)
  # SGD, not Adam: the projection's output bias feeds the predictor's BatchNorm, which removes
  # it, so its true gradient is 0 and Adam would turn float noise into +-lr steps that differ
  # between device counts. SGD keeps the update proportional to the gradient.
  c.optim.update(name="sgd", base_lr=0.1, momentum=0.9, warmup_steps=0)
  for k, v in over.items():
    c[k] = v
  return c


def _batch(n=4, t=4, size=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"clip": rng.integers(0, 256, (n, t, size, size, 1), np.uint8),
          "label": np.zeros(n, np.int32), "padded": np.zeros((n, 2), np.int32),
          "distance": np.zeros(n, np.int32)}


@pytest.fixture(scope="module")
def method_and_vars(dataset):
  method = byol.BYOL(tiny_config(dataset))
  return method, jax.jit(method.init)(jax.random.key(0), _batch())


def test_target_starts_as_a_copy_of_the_online_encoder_and_projection(method_and_vars):
  _, v = method_and_vars
  assert set(v["params"]) == {"encoder", "head", "predictor"}
  assert set(v["target"]["params"]) == {"encoder", "head"}
  for k in ("encoder", "head"):
    jax.tree.map(np.testing.assert_array_equal, v["target"]["params"][k], v["params"][k])
    jax.tree.map(np.testing.assert_array_equal, v["target"]["batch_stats"][k],
                 v["batch_stats"][k])


def test_loss_by_hand_and_gradients_reach_the_online_network_only(method_and_vars):
  method, v = method_and_vars
  batch = jax.tree.map(jnp.asarray, _batch())
  rng = jax.random.key(2)

  def loss_of(params, target):
    return method.loss(params, {**v, "target": target}, batch, rng)

  @jax.jit
  def everything(params, target):
    (loss, (new_vars, metrics)), grads = jax.value_and_grad(loss_of, argnums=(0, 1),
                                                            has_aux=True)(params, target)
    # The same views through both networks, by hand.
    v_a, v_b = method.views(batch, jax.random.split(rng, 3)[0])
    x = jnp.concatenate([v_a, v_b])
    p = method.model.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                           train=True, mutable=["batch_stats"])[0]["p"]
    z = method.target_model.apply(target, x, train=True, mutable=["batch_stats"])[0]["z"]
    return loss, new_vars, metrics, grads, p, z

  loss, new_vars, metrics, (g_params, g_target), p, z = everything(v["params"], v["target"])
  cos = lambda a, b: np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  p, z = np.asarray(p, np.float64), np.asarray(z, np.float64)
  n = batch["clip"].shape[0]
  # Per example 2 - 2 cos(p_a, z_b) + 2 - 2 cos(p_b, z_a), averaged.
  expected = np.mean(4 - 2 * cos(p[:n], z[n:]) - 2 * cos(p[n:], z[:n]))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  # No gradient into the target; every part of the online network gets one.
  for leaf in jax.tree.leaves(g_target):
    np.testing.assert_array_equal(leaf, 0.0)
  for k in ("encoder", "head", "predictor"):
    assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g_params[k])) > 0
  # The loss step leaves the target parameters alone but updates its BatchNorm statistics.
  jax.tree.map(np.testing.assert_array_equal, new_vars["target"]["params"],
               v["target"]["params"])
  assert not np.allclose(new_vars["target"]["batch_stats"]["head"]["BatchNorm_0"]["mean"],
                         v["target"]["batch_stats"]["head"]["BatchNorm_0"]["mean"])
  assert 0.0 < float(metrics["z_std"]) <= math.sqrt(8) + 1e-5


def test_after_update_is_the_ema_of_encoder_and_projection(method_and_vars):
  method, v = method_and_vars
  params = jax.tree.map(lambda x: x + 1.0, v["params"])
  new = jax.jit(method.after_update)(v, params, 3)
  tau = 0.9
  for k in ("encoder", "head"):
    jax.tree.map(lambda t, o, got: np.testing.assert_allclose(got, tau * t + (1 - tau) * o,
                                                              rtol=1e-6, atol=1e-7),
                 v["target"]["params"][k], params[k], new["target"]["params"][k])
  assert "predictor" not in new["target"]["params"]
  jax.tree.map(np.testing.assert_array_equal, new["target"]["batch_stats"],
               v["target"]["batch_stats"])


def test_clip_metrics_by_hand():
  method = simclr_video.SimCLRVideo(simclr_lung3d.get_config("runlocal"))
  batch = {"clip": jnp.zeros((4, 4, 2, 2, 1), jnp.uint8),
           "padded": jnp.asarray([[0, 0], [2, 2], [0, 1], [0, 0]]),
           "distance": jnp.asarray([0, 4, 8, 0])}
  m = jax.jit(method.clip_metrics)(batch)
  np.testing.assert_allclose(m["padded_clip_frac"], 3 / 8)        # 3 of 8 views padded
  np.testing.assert_allclose(m["padded_frame_frac"], 5 / 4 / 8)   # 5 padded frames of 32
  np.testing.assert_allclose(m["view_distance"], 3.0)


def test_config_errors(dataset):
  c = tiny_config(dataset)
  c.byol.tau_momentum = 0.9
  with pytest.raises(ValueError, match=r"unknown config.byol keys \['tau_momentum'\]"):
    byol.BYOL(c)
  c = tiny_config(dataset, num_epochs=3)
  c.byol.tau_schedule = "cosine"
  with pytest.raises(ValueError, match="set config.byol.tau_steps"):
    byol.BYOL(c)
  c = tiny_config(dataset)
  c.clips.clip_length = 4
  with pytest.raises(ValueError, match=r"unknown config.clips keys \['clip_length'\]"):
    byol.BYOL(c)


# ----------------------------------------------------------------------------------------------
# Through the training spine.


def test_sharded_byol_step_equals_single_device(dataset):
  """One clip per device: loss, gradient, BatchNorm statistics (global, online and target) and
  the update with the EMA target, each step from the same state (fixtures: float32 rounding
  only; in float64 the two agree to 1e-14)."""
  config = tiny_config(dataset)
  fixtures.assert_sharded_step_equals_single_device(config, steps=2)
  # The target moved towards the online network but lags it.
  _, s1 = fixtures.run_steps(config, parallel.make_mesh(1), 2)
  enc_t = jax.tree.leaves(s1.variables["target"]["params"]["encoder"])
  enc_o = jax.tree.leaves(s1.params["encoder"])
  assert any(not np.allclose(t, o) for t, o in zip(enc_t, enc_o))


def test_sharded_simclr_video_step_equals_single_device(dataset):
  """Paper 001's SimCLR alternative through the spine: NT-Xent over the 2N views of the global
  batch gathered from 8 devices gives the single-device loss and update."""
  c = simclr_lung3d.get_config("runlocal")
  base = tiny_config(dataset)
  for key in ("data", "image_size", "batch_size", "num_steps", "log_every", "ckpt_every",
              "progress_bar", "model", "clips", "optim"):
    c[key] = base[key]
  c.clips.one_per_video = True
  assert c.method == "simclr_video"
  # One clip per device: only negatives gathered from all 8 devices make the two agree.
  fixtures.assert_sharded_step_equals_single_device(c, steps=2)


def test_resume_restores_the_target_network_exactly(dataset, tmp_path):
  config = tiny_config(dataset, num_steps=4)
  mesh = parallel.make_mesh(1)
  full = train.train_and_evaluate(config, str(tmp_path / "full"), mesh=mesh)
  first = train.train_and_evaluate(config, str(tmp_path / "split"), mesh=mesh, max_steps=2)
  rest = train.train_and_evaluate(config, str(tmp_path / "split"), mesh=mesh)
  assert first["step"] == [1, 2] and rest["step"] == [3, 4]
  assert first["loss"] + rest["loss"] == full["loss"]          # bit for bit
  _, _, s_full = checkpoint.load_state(str(tmp_path / "full"))
  _, _, s_split = checkpoint.load_state(str(tmp_path / "split"))
  fixtures.assert_states_equal(s_split, s_full)                 # target, moments, RNG, ...
  v_full = {"params": s_full.params, **s_full.variables}
  _, _, v_mid = checkpoint.load_variables(str(tmp_path / "split"), step=2)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(v_mid["target"]),
                                                      jax.tree.leaves(v_full["target"])))


def test_pair_views_take_the_second_clip_for_view_b():
  c = simclr_lung3d.get_config("runlocal")
  c.image_size = (8, 8)
  c.clips.views = "pair"
  c.aug.update(crop_prob=0.0, flip_prob=0.0, affine_prob=0.0, color_prob=0.0, noise_prob=0.0,
               erase_prob=0.0)
  c.temporal_aug.enabled = False
  method = simclr_video.SimCLRVideo(c)
  assert method.sampler.views == "pair" and method.sampler.records_per_example == 2
  rng = np.random.default_rng(0)
  batch = {"clip": rng.integers(0, 256, (2, 3, 8, 8, 1), np.uint8),
           "clip_b": rng.integers(0, 256, (2, 3, 8, 8, 1), np.uint8)}
  v_a, v_b = jax.jit(method.views)(batch, jax.random.key(0))
  # Identity spatial map: the views are the clips in model units (x / 255 - 0.5) / 0.25.
  np.testing.assert_allclose(v_a, (batch["clip"] / 255 - 0.5) / 0.25, atol=1e-5)
  np.testing.assert_allclose(v_b, (batch["clip_b"] / 255 - 0.5) / 0.25, atol=1e-5)
