"""Occlusion saliency on toy scorers whose answer is known, boxes and weighted IoU by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_us.eval import saliency as S

H, W = 16, 20
R = (4, 6, 9, 12)   # y0, x0, y1, x1 (exclusive): 5 x 6 = 30 pixels


def _region_mean_scorer(boxes):
  """score(x) = sum over boxes of the mean of x inside the box (x: (B, H, W, 1))."""
  def score(x):
    return sum(jnp.mean(x[:, y0:y1, x0:x1, 0], axis=(1, 2)) for y0, x0, y1, x1 in boxes)
  return jax.jit(score)


def test_window_starts_cover_the_border():
  np.testing.assert_array_equal(S.window_starts(10, 3, 3), [0, 3, 6, 7])
  np.testing.assert_array_equal(S.window_starts(9, 3, 3), [0, 3, 6])
  with pytest.raises(ValueError, match="patch 5"):
    S.window_starts(4, 5, 1)


def test_occlusion_map_hand_computed_values():
  # Image of ones, fill 0, patch 3, stride 1: the drop of a window is |window & R| / |R|.
  # A pixel deep inside R is covered by 9 windows, each inside R: S = 9 / 30.
  # A pixel on R's top edge (not a corner): window overlaps of 1, 2, 3 rows x 3 columns -> 6/30.
  # The pixel just above R: overlaps 0, 1, 2 rows x 3 columns -> 3 / 30. Far away: 0.
  x = np.ones((H, W, 1), np.float32)
  sal = S.occlusion_map(_region_mean_scorer([R]), x, patch=3, stride=1, batch_size=50)
  assert sal.shape == (H, W)
  np.testing.assert_allclose(sal[6, 8], 9 / 30, rtol=1e-5)
  np.testing.assert_allclose(sal[4, 8], 6 / 30, rtol=1e-5)
  np.testing.assert_allclose(sal[3, 8], 3 / 30, rtol=1e-5)
  np.testing.assert_allclose(sal[4, 6], 4 / 30, rtol=1e-5)    # inside corner: 2 x 2 avg
  np.testing.assert_allclose(sal[3, 5], 1 / 30, rtol=1e-5)    # outside diagonal: 1 x 1
  np.testing.assert_allclose(sal[0, 0], 0, atol=1e-7)
  # The top 30 pixels are exactly R: one region, its box is R, wIoU = 1.
  out = S.evaluate(sal, [R], fraction=30 / (H * W))
  assert out["boxes"] == [R] and out["sizes"] == [30]
  assert out["wiou"] == pytest.approx(1.0)


def test_strided_occlusion_matches_per_window_definition():
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (H, W, 1)).astype(np.float32)
  score = _region_mean_scorer([R])
  sal = S.occlusion_map(score, x, patch=4, stride=3, fill=0.5, batch_size=7)
  base = float(score(x[None])[0])
  ys, xs = S.window_starts(H, 4, 3), S.window_starts(W, 4, 3)
  num, den = np.zeros((H, W)), np.zeros((H, W))
  for y in ys:
    for xx in xs:
      occ = x.copy()
      occ[y:y + 4, xx:xx + 4] = 0.5
      num[y:y + 4, xx:xx + 4] += base - float(score(occ[None])[0])
      den[y:y + 4, xx:xx + 4] += 1
  np.testing.assert_allclose(sal, num / den, rtol=1e-4, atol=1e-6)


def test_two_regions_give_two_boxes():
  r2 = (10, 1, 13, 5)   # 3 x 4 = 12 pixels
  x = np.ones((H, W, 1), np.float32)
  # Weight the small region like the big one (mean over fewer pixels -> larger per-pixel drop).
  sal = S.occlusion_map(_region_mean_scorer([R, r2]), x, patch=1, stride=1)
  boxes, sizes = S.saliency_boxes(sal, fraction=42 / (H * W))
  assert sorted(boxes) == sorted([R, r2]) and sorted(sizes) == [12, 30]


def test_top_fraction_is_exact_with_ties():
  s = np.zeros((10, 10))
  s[0, :5] = 1.0
  m = S.top_fraction_mask(s, 0.1)
  assert m.sum() == 10
  assert m[0, :5].all()
  assert m[0, 5:].sum() == 5 and m[1:].sum() == 0   # ties broken in raster order


def test_box_iou_and_weighted_iou_by_hand():
  assert S.box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
  assert S.box_iou((0, 0, 2, 2), (2, 2, 4, 4)) == 0
  assert S.box_iou((0, 0, 4, 4), (0, 0, 4, 4)) == 1
  # Box A (weight 3) has IoU 0.5 with the first ground truth; box B (weight 1) misses both.
  a, b = (0, 0, 4, 4), (10, 10, 12, 12)
  gt = [(0, 0, 4, 8), (20, 20, 22, 22)]
  assert S.weighted_iou([a, b], [3, 1], gt) == pytest.approx(3 * 0.5 / 4)
  with pytest.raises(ValueError, match="ground-truth"):
    S.weighted_iou([a], [1], [])


def test_regions_are_eight_connected():
  m = np.zeros((5, 5), bool)
  m[0, 0] = m[1, 1] = m[3, 4] = True
  labels, boxes = S.regions(m)
  assert boxes == [(0, 0, 2, 2), (3, 4, 4, 5)]
  assert labels[1, 1] == labels[0, 0] == 1


def test_class_score_is_the_unsaturated_log_probability():
  logits = jnp.array([[40.0, 0.0], [39.0, 0.0], [0.0, 0.0]])
  score = S.class_score_fn(lambda x: x, 0)(logits)
  # Probabilities of the first two round to 1 in float32; their log-probabilities differ.
  assert jax.nn.softmax(logits)[0, 0] == jax.nn.softmax(logits)[1, 0] == 1.0
  np.testing.assert_allclose(score, [-np.exp(-40.0), -np.exp(-39.0), np.log(.5)], rtol=1e-5)


def test_log_prob_against_float64_log_softmax():
  rng = np.random.default_rng(0)
  z = rng.normal(0, 5, (6, 4))
  expect = z - np.log(np.exp(z).sum(1, keepdims=True))
  for t in range(4):
    np.testing.assert_allclose(jax.jit(S.log_prob, static_argnums=1)(jnp.asarray(z), t),
                               expect[:, t], rtol=1e-5, atol=1e-6)
