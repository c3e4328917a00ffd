"""U-Net decoder on ssl_us.models encoders: skips, parameter layout, shapes, learning, metrics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_us import augment, models
from ssl_us.eval import protocols as P
from ssl_us.eval import segmentation as seg

HW = 16


def _small_resnet(**kw):
  return models.ResNet(stage_sizes=(1, 1, 1), block_cls=models.ResNetBlock, num_filters=4,
                       **kw)


def _toy(n, seed):
  """Noise images with a bright 5x5 square at a random place; mask 1 on the square."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 60, (n, HW, HW, 1)).astype(np.uint8)
  m = np.zeros((n, HW, HW), np.int32)
  for i in range(n):
    y0, x0 = rng.integers(0, HW - 5, 2)
    x[i, y0:y0 + 5, x0:x0 + 5] = 220
    m[i, y0:y0 + 5, x0:x0 + 5] = 1
  return x, m


def test_select_skips_keeps_the_last_output_per_resolution():
  a, b, c, d = (jnp.full((1, s, s, 1), v) for s, v in ((8, 1.), (8, 2.), (2, 3.), (4, 4.)))
  skips = seg.select_skips([a, b, c, d])
  assert [float(s[0, 0, 0, 0]) for s in skips] == [2., 4., 3.]
  with pytest.raises(ValueError, match="2D encoder"):
    seg.select_skips([jnp.zeros((1, 2, 4, 4, 1))])


def test_skips_are_the_encoders_block_outputs():
  """Against flax's own capture_intermediates on the standalone encoder."""
  enc = _small_resnet(small_stem=True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, HW, HW, 1)), jnp.float32)
  v = enc.init(jax.random.key(0), x, train=False)
  _, inter = enc.apply(v, x, train=False, capture_intermediates=True, mutable=["intermediates"])
  expect = [inter["intermediates"][f"ResNetBlock_{i}"]["__call__"][0] for i in range(3)]
  h, skips = enc.apply(v, x, train=False,
                       method=lambda m, x, train: seg.encoder_skips(m, (), x, train))
  assert [s.shape for s in skips] == [(2, 16, 16, 4), (2, 8, 8, 8), (2, 4, 4, 16)]
  for s, e in zip(skips, expect):
    np.testing.assert_allclose(s, e, rtol=1e-6)
  np.testing.assert_allclose(h, enc.apply(v, x, train=False), rtol=1e-6)


@pytest.mark.parametrize("encoder", [_small_resnet(small_stem=True), _small_resnet(),
                                     models.make_encoder("convnet4", width=4)])
def test_logits_at_input_size_and_encoder_params_unchanged_in_layout(encoder):
  x = jnp.zeros((2, HW, HW, 1))
  model = seg.SegmentationModel(encoder, num_classes=3)
  v = jax.eval_shape(lambda: model.init({"params": jax.random.key(0),
                                         "dropout": jax.random.key(0)}, x, train=False))
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), v)
  assert out.shape == (2, HW, HW, 3)
  enc_v = jax.eval_shape(lambda: encoder.init(jax.random.key(0), x, train=False))
  same = jax.tree.map(lambda a, b: a.shape == b.shape, v["params"]["encoder"], enc_v["params"])
  assert all(jax.tree.leaves(same))
  assert set(v["params"]) == {"encoder", "decoder"}


def test_pixel_xent_hand_computed():
  logits = jnp.zeros((1, 1, 2, 2)).at[0, 0, 1, 1].set(jnp.log(3.))
  masks = jnp.array([[[0, 1]]])
  # CE = log 2 (pixel 0, label 0), log(4/3) (pixel 1, label 1); weights 1 and 3.
  got = jax.jit(seg.pixel_xent)(logits, masks, jnp.array([1., 3.]))
  np.testing.assert_allclose(got, (np.log(2) + 3 * np.log(4 / 3)) / 4, rtol=1e-6)


def test_evaluate_hand_computed():
  masks = np.array([[[0, 0, 1, 1]]])
  pred = np.array([[[0, 1, 1, 1]]])
  out = seg.evaluate(pred, masks, 2)
  assert out["confusion"] == [[1, 1], [0, 2]]
  assert out["global_accuracy"] == pytest.approx(3 / 4)
  assert out["mean_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
  assert out["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_fine_tuned_unet_segments_the_toy_squares():
  enc = _small_resnet(small_stem=True)
  aug = augment.AugmentConfig(out_size=(HW, HW))
  x, m = _toy(48, 0)
  model = seg.SegmentationModel(enc, num_classes=2)
  enc_v = P.random_encoder_variables(enc, jnp.zeros((1, HW, HW, 1)), 0)
  v = seg.init_variables(model, enc_v, jnp.zeros((1, HW, HW, 1)), jax.random.key(1))
  assert jax.tree.structure(v["params"]["encoder"]) == jax.tree.structure(enc_v["params"])
  cfg = P.FitConfig(steps=120, batch_size=16, lr=3e-3)
  v, losses = seg.fit(model, v, x, m, cfg, aug)
  assert losses[-10:].mean() < 0.5 * losses[:10].mean()
  xt, mt = _toy(16, 1)
  out = seg.evaluate(seg.predict(model, v, xt, aug), mt, 2)
  assert out["miou"] > 0.8, out
  with pytest.raises(ValueError, match="mask ids"):
    seg.fit(model, v, x, m * 2, cfg, aug)


def test_region_geometry_of_masks_and_boxes_by_hand():
  from data_prep.region import Region
  from ssl_us.eval import data
  keep = np.ones((40, 80), bool)
  keep[:, :4] = False                       # outside the scan area: blanked to class 0
  region = Region(y0=10, x0=20, y1=50, x1=100, mask=keep, kind="sector")
  mask = np.zeros((60, 120), np.uint8)
  mask[20:30, 40:60] = 2
  mask[10:50, 20:24] = 1
  # Scale min(32 / 40, 32 / 80) = 0.4 -> 16 x 32 pixels, padded by 8 rows above and below.
  # Output row i reads source row 10 + floor((i - 8 + .5) * 2.5): rows 12..15 hit 20..29;
  # column j reads 20 + floor((j + .5) * 2.5): columns 8..15 hit 40..59.
  out = data.apply_region_to_mask(mask, region, (32, 32))
  expect = np.zeros((32, 32), np.uint8)
  expect[12:16, 8:16] = 2
  np.testing.assert_array_equal(out, expect)
  assert data.apply_region_to_box((20, 40, 30, 60), region, (32, 32)) == (12, 8, 16, 16)


def test_load_dense_aligns_frames_masks_and_boxes(tmp_path):
  from data_prep import synthetic
  from ssl_us.eval import data
  synthetic.generate(str(tmp_path), num_patients=3, videos_per_patient=1, frames=2, size=64)
  d = data.load_dense(str(tmp_path), (32, 32), frame_step=1)
  assert d.images.shape == (6, 32, 32, 1) and d.masks.shape == (6, 32, 32)
  assert d.label_names == tuple(sorted(synthetic.CLASSES))
  assert d.mask_names == synthetic.MASK_CLASSES
  assert len(set(d.patient)) == 3 and len(d.boxes) == 6
  # Every pixel of a pathology class lies inside one of that class's boxes.
  checked = 0
  for i in range(6):
    for name in ("consolidation", "b_line"):
      ys, xs = np.nonzero(d.masks[i] == synthetic.MASK_CLASSES.index(name))
      boxes = [b[1:] for b in d.boxes[i] if b[0] == name]
      inside = np.zeros(ys.size, bool)
      for y0, x0, y1, x1 in boxes:
        inside |= (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
      assert inside.all(), (i, name)
      checked += ys.size
  assert checked > 0
