"""Spatio-temporal augmentation: temporal ops on indices, shared spatial draw, range, shapes."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import byol_lung, simclr_lung3d
from ssl_us import augment, augment_video as av, parallel

OFF = dict(crop_prob=0.0, flip_prob=0.0, affine_prob=0.0, color_prob=0.0, noise_prob=0.0,
           erase_prob=0.0)
TABLE2 = dict(crop_prob=0.0, affine_prob=1.0, scale=0.2, translate=0.1, rotate_deg=10.0,
              flip_prob=0.5, color_prob=1.0, brightness=0.3, brightness_mode="scale",
              contrast=0.3, noise_prob=0.5, noise_std=0.03, erase_prob=0.5,
              erase_area=(0.02, 0.1), erase_ratio=(0.3, 3.3))
TABLE2_TEMPORAL = dict(enabled=True, reverse_prob=0.5, shuffle_prob=0.5, shuffle_max=4,
                       replace_prob=0.5, replace_max=4)


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


def _cfg(spatial, out_size, **temporal):
  return av.VideoAugmentConfig(augment.AugmentConfig(out_size=out_size, **spatial),
                               av.TemporalConfig(**temporal))


def test_reverse():
  idx = jnp.arange(5)
  np.testing.assert_array_equal(av.reverse_indices(idx, jnp.asarray(True)), [4, 3, 2, 1, 0])
  np.testing.assert_array_equal(av.reverse_indices(idx, jnp.asarray(False)), idx)


@jax.jit
def _op_many(u, ks):
  """(shuffled, replaced) index vectors of a reversed arange for uniforms u (n, 4, T), counts."""
  base = jnp.arange(u.shape[-1], dtype=jnp.int32)[::-1]
  shuf = jax.vmap(lambda v, n: av.shuffle_indices(v[0], v[1], base, n))(u, ks)
  repl = jax.vmap(lambda v, n: av.replace_indices(v[2], v[3], base, n))(u, ks)
  return shuf, repl


def _uniforms(n, t, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(n, 4, t)), jnp.float32)


def test_shuffle_keeps_the_frame_set_and_moves_at_most_k():
  t, n = 8, 600
  ks = np.arange(n) % (t + 1)
  shuf, _ = map(np.asarray, _op_many(_uniforms(n, t), jnp.asarray(ks)))
  base = np.arange(t)[::-1]
  for row, k in zip(shuf, ks):
    np.testing.assert_array_equal(np.sort(row), np.arange(t))   # same multiset of frames
    assert np.sum(row != base) <= k
  assert np.all(shuf[ks <= 1] == base)                           # 0 or 1 frames: no change
  assert np.mean(np.sum(shuf[ks == t] != base, axis=1)) > t - 2  # a full shuffle moves ~T-1


def test_shuffle_chooses_the_smallest_u_pos_and_orders_them_by_u_perm():
  # Hand example, T = 5, k = 3: u_pos picks positions {1, 3, 4}; u_perm ranks them 4 < 1 < 3,
  # so positions 1, 3, 4 (ascending) receive the entries of positions 4, 1, 3.
  u_pos = jnp.asarray([0.9, 0.1, 0.8, 0.3, 0.2])
  u_perm = jnp.asarray([0.5, 0.4, 0.0, 0.6, 0.1])
  idx = jnp.asarray([10, 11, 12, 13, 14])
  np.testing.assert_array_equal(av.shuffle_indices(u_pos, u_perm, idx, 3), [10, 14, 12, 11, 13])
  np.testing.assert_array_equal(av.shuffle_indices(u_pos, u_perm, idx, 0), idx)


def test_shuffle_is_uniform_over_permutations_of_the_chosen_frames():
  # k = T = 3: all 3! = 6 orders equally likely (1/6 each).
  n = 3000
  shuf, _ = _op_many(_uniforms(n, 3, 1), jnp.full((n,), 3))
  counts = collections.Counter(map(tuple, np.asarray(shuf)))
  assert len(counts) == 6
  for c in counts.values():
    assert abs(c / n - 1 / 6) < 0.03


def test_replace_changes_exactly_k_frames_to_other_frames_of_the_clip():
  t, n = 8, 600
  ks = np.arange(n) % (t + 1)
  _, repl = map(np.asarray, _op_many(_uniforms(n, t), jnp.asarray(ks)))
  base = np.arange(t)[::-1]
  for row, k in zip(repl, ks):
    changed = row != base
    assert changed.sum() == k
    assert np.all((row >= 0) & (row < t))
  # Hand example, T = 4, k = 2: positions 2 and 0 (smallest u_pos); offsets 1 + floor(u * 3)
  # = 3 and 1: position 0 takes entry 3, position 2 takes entry 3.
  got = av.replace_indices(jnp.asarray([0.2, 0.7, 0.1, 0.9]), jnp.asarray([0.9, 0.5, 0.0, 0.5]),
                           jnp.asarray([20, 21, 22, 23]), 2)
  np.testing.assert_array_equal(got, [23, 21, 23, 23])
  one = av.replace_indices(jnp.zeros(1), jnp.zeros(1), jnp.zeros((1,), jnp.int32), 3)
  np.testing.assert_array_equal(one, [0])  # a single frame has nothing to be replaced by


def test_temporal_draws_follow_table2_probabilities():
  t, n = 8, 4000
  cfg = av.TemporalConfig()
  idx, info = jax.jit(jax.vmap(lambda k: av.temporal_indices(k, t, cfg)))(_keys(n, 2))
  idx, info = np.asarray(idx), {k: np.asarray(v) for k, v in info.items()}
  assert abs(info["reversed"].mean() - 0.5) < 0.03
  for name in ("shuffled", "replaced"):
    freq = np.bincount(info[name], minlength=6) / n
    # off with p 0.5, else k uniform in 0..4: P(0) = 0.5 + 0.5/5, P(k) = 0.1 for k = 1..4.
    np.testing.assert_allclose(freq, [0.6, 0.1, 0.1, 0.1, 0.1, 0.0], atol=0.025)
  for row, r in zip(idx, info["replaced"]):
    assert len(np.unique(row)) >= t - r
    if r == 0:
      np.testing.assert_array_equal(np.sort(row), np.arange(t))
  plain = idx[(info["replaced"] == 0) & (info["shuffled"] <= 1)]
  rev = info["reversed"][(info["replaced"] == 0) & (info["shuffled"] <= 1)]
  np.testing.assert_array_equal(plain[rev], np.tile(np.arange(t)[::-1], (rev.sum(), 1)))
  np.testing.assert_array_equal(plain[~rev], np.tile(np.arange(t), ((~rev).sum(), 1)))


def test_temporal_group_switches_off_as_one_flag():
  cfg = av.TemporalConfig(enabled=False)
  idx, info = jax.vmap(lambda k: av.temporal_indices(k, 6, cfg))(_keys(50))
  np.testing.assert_array_equal(idx, np.tile(np.arange(6), (50, 1)))
  assert not np.any(info["reversed"]) and not np.any(info["shuffled"])


def test_clip_frames_are_reordered_or_duplicated_never_invented():
  # Constant frames 10*t and an identity spatial map: each output frame is one input frame,
  # at most replace_max = 4 of them duplicates; with T = 6, >= 2 distinct frames survive.
  t = 6
  clip = np.broadcast_to((10 * np.arange(t, dtype=np.uint8))[:, None, None, None],
                         (t, 8, 8, 1))
  cfg = _cfg(OFF, (8, 8), reverse_prob=1.0, shuffle_prob=1.0, replace_prob=1.0)
  run = jax.jit(jax.vmap(av.augment_video, in_axes=(0, None, None)), static_argnums=2)
  out = np.asarray(run(_keys(64), jnp.asarray(clip), cfg))
  vals = np.rint((out * 0.25 + 0.5) * 255).astype(int)         # back to uint8 units
  assert np.all(vals == vals[:, :, :1, :1, :])                  # frames stay constant
  per_frame = vals[:, :, 0, 0, 0]
  for row in per_frame:
    assert set(row) <= set(10 * np.arange(t))
    assert len(set(row)) >= t - 4
  # Reversal is certain: where nothing was replaced or shuffled, the order is reversed.
  assert np.any(np.all(per_frame == 10 * np.arange(t)[::-1], axis=1))
  assert len({tuple(r) for r in per_frame}) > 32                # the draws differ per key


def test_one_spatial_transform_for_all_frames_of_a_clip():
  # Frames are img, img/2, img/4, img/8 (exact in uint8). A shared bilinear warp (plus shared
  # flip and erasing box) is linear, so the outputs keep the ratios 1 : 1/2 : 1/4 : 1/8; a
  # different warp per frame would break them.
  rng = np.random.default_rng(0)
  img = (rng.integers(0, 32, (20, 20, 1)) * 8).astype(np.uint8)
  clip = np.stack([img, img // 2, img // 4, img // 8])
  spatial = dict(OFF, affine_prob=1.0, rotate_deg=10.0, scale=0.2, translate=0.1,
                 flip_prob=0.5, erase_prob=1.0, crop_prob=1.0, crop_scale=(0.5, 1.0))
  cfg = _cfg(spatial, (12, 12), enabled=False)
  out = jax.jit(jax.vmap(av.augment_video, in_axes=(0, None, None)), static_argnums=2)(
      _keys(8), jnp.asarray(clip), cfg)
  x = np.asarray(out, np.float64) * 0.25 + 0.5
  for clip_out in x:
    assert np.any(clip_out[0] > 0.05)
    for i in range(1, 4):
      np.testing.assert_allclose(clip_out[i], clip_out[0] / 2**i, atol=1e-5)
  # ...and different clips got different transforms.
  assert not np.allclose(x[0, 0], x[1, 0])


def test_table2_augmentations_keep_range_and_shapes_under_jit_on_any_device_count():
  cfg = _cfg(TABLE2, (8, 8))
  clips = jnp.asarray(np.random.default_rng(1).integers(0, 256, (8, 3, 12, 10, 1), np.uint8))
  key = jax.random.key(3)
  out = jax.jit(av.augment_video_batch, static_argnums=2)(key, clips, cfg)
  assert out.shape == (8, 3, 8, 8, 1) and out.dtype == jnp.float32
  out = np.asarray(out)
  lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
  assert np.all(np.isfinite(out)) and out.min() >= lo - 1e-6 and out.max() <= hi + 1e-6
  assert not np.allclose(out[0], out[1])                        # one key per clip
  # Keys come from global example indices: 8 devices with one clip each give the same views.
  mesh = parallel.make_mesh(8)
  sharded = jax.jit(jax.shard_map(
      lambda c: av.augment_video_batch(key, c, cfg, axis_name=parallel.DATA), mesh=mesh,
      in_specs=P(parallel.DATA), out_specs=P(parallel.DATA)))(
          jax.device_put(clips, parallel.data_sharded(mesh)))
  np.testing.assert_allclose(np.asarray(sharded), out, rtol=1e-5, atol=2e-5)


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match=r"unknown temporal augmentation keys \['shufle_max'\]"):
    av.TemporalConfig.from_config({"shufle_max": 3})
  with pytest.raises(ValueError, match="reverse_prob=1.5 is not a probability"):
    av.TemporalConfig(reverse_prob=1.5)
  with pytest.raises(ValueError, match="replace_max=-1 must be >= 0"):
    av.TemporalConfig(replace_max=-1)
  cfg = av.VideoAugmentConfig.from_config(TABLE2, {"enabled": False}, (32, 32))
  assert cfg.spatial.out_size == (32, 32) and not cfg.temporal.enabled
  with pytest.raises(ValueError, match=r"one clip \(T, H, W, C\)"):
    av.augment_video(jax.random.key(0), jnp.zeros((2, 4, 8, 8, 1), jnp.uint8), cfg)


def _colour_only(mode):
  """Table 2's colour jitter alone, outputs in [0, 1] intensity units."""
  return augment.AugmentConfig(out_size=(4, 4), **{**OFF, "color_prob": 1.0}, brightness=0.3,
                               contrast=0.3, brightness_mode=mode, mean=0.0, std=1.0)


@pytest.mark.parametrize("mode", ["add", "scale"])
def test_colour_jitter_by_hand(mode):
  """Contrast about the clip mean, then brightness b added ("add") or as the factor 1 + b
  ("scale", torchvision's ColorJitter); the draws are the ones sample_intensity makes."""
  cfg = _colour_only(mode)
  clip = jnp.asarray(np.arange(2 * 4 * 4).reshape(2, 4, 4, 1) * 5, jnp.uint8)
  key = jax.random.key(3)
  out = jax.jit(augment.augment_clip, static_argnums=2)(key, clip, cfg)
  q = augment.sample_intensity(jax.random.split(key, 3)[1], cfg)
  b, c = float(q["brightness"]), float(q["contrast"])
  assert b != 0.0 and c != 1.0
  x = np.asarray(clip, np.float64) / 255.0
  y = (x - x.mean()) * c + x.mean()
  y = y + b if mode == "add" else y * (1.0 + b)
  np.testing.assert_allclose(out, np.clip(y, 0.0, 1.0), atol=1e-6)
  with pytest.raises(ValueError, match="brightness_mode='mul'; known"):
    augment.AugmentConfig(brightness_mode="mul")


def test_show_augment_grid_and_labels():
  from ssl_us import show_augment
  info = {"reversed": np.asarray([True, False]), "shuffled": np.asarray([2, 0]),
          "replaced": np.asarray([1, 0])}
  idx = np.asarray([[3, 1, 2, 2], [0, 1, 2, 3]])
  assert show_augment.describe(idx, info, 0) == "reversed, shuffled 2, replaced 1: order 3 1 2 2"
  assert show_augment.describe(idx, info, 1) == "shuffled 0, replaced 0: order 0 1 2 3"
  frames = np.zeros((4, 8, 8, 1))
  frames[2] = 1.0
  img = np.asarray(show_augment.grid([("a", frames), ("b", frames)], zoom=2))
  gap, label_h = show_augment.GAP, show_augment.LABEL_H
  row_h = label_h + 16 + gap
  assert img.shape == (gap + 2 * row_h, 320)                # 4 frames of 16 px < 320 px min
  for r in range(2):
    y = gap + r * row_h + label_h
    for j in range(4):
      x = gap + j * (16 + gap)
      assert np.all(img[y:y + 16, x:x + 16] == (255 if j == 2 else 0))


@pytest.mark.parametrize("module", [byol_lung, simclr_lung3d])
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_video_configs_carry_paper_001_table2(module, arg):
  c = module.get_config(arg)
  assert {k: c.aug[k] for k in TABLE2} == TABLE2
  assert c.temporal_aug.to_dict() == TABLE2_TEMPORAL


@pytest.mark.parametrize("mode,blacked_out", [("scale", False), ("add", True)])
def test_table2_brightness_never_blacks_out_a_dark_clip(mode, blacked_out):
  """A dark clip (intensity 40/255 = 0.16, the COVID-BLUES mean) under the Table 2 colour jitter
  alone, 64 draws (contrast about a constant clip's mean changes nothing): torchvision's factor
  keeps every pixel within 0.16 * (1 +- 0.3); the additive +-0.3 takes the whole clip to 0
  whenever b < -0.16."""
  cfg = _colour_only(mode)
  clip = jnp.full((2, 4, 4, 1), 40, jnp.uint8)
  out = np.asarray(jax.jit(jax.vmap(lambda k: augment.augment_clip(k, clip, cfg)))(_keys(64)))
  lowest = out.reshape(64, -1).min(axis=1)
  if blacked_out:
    assert (lowest == 0.0).any() and lowest.max() > 0.16
  else:
    assert lowest.min() >= 40 / 255 * 0.7 - 1e-6 and lowest.max() <= 40 / 255 * 1.3 + 1e-6


@pytest.mark.parametrize("in_hw,out_hw", [((16, 16), (16, 16)), ((16, 16), (8, 8)),
                                          ((16, 12), (4, 6)), ((18, 18), (12, 12))])
def test_center_view_filters_pixels_as_the_training_views_do(in_hw, out_hw):
  """Evaluation view == a training view with every random change off, when shrinking (all
  sample points then lie inside the frame): one bilinear kernel, no antialiasing, on both
  sides. An antialiased resize differs on these random frames by a large margin."""
  cfg = augment.AugmentConfig(out_size=out_hw, **OFF)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3,) + in_hw + (1,), np.uint8)
  train_view = jax.jit(augment.augment_batch, static_argnums=2)(jax.random.key(0),
                                                                 jnp.asarray(images), cfg)
  eval_view = jax.jit(augment.center_view, static_argnums=1)(jnp.asarray(images), cfg)
  np.testing.assert_allclose(eval_view, train_view, atol=1e-5)
  if in_hw != out_hw:
    smooth = jax.image.resize(jnp.asarray(images, jnp.float32) / 255.0,
                              (3,) + out_hw + (1,), "linear", antialias=True)
    assert np.abs((smooth - cfg.mean) / cfg.std - eval_view).max() > 0.1
