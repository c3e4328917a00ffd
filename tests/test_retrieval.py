"""View retrieval: pair labelling by hand, NCC, thresholds, metrics, retrieval and the models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_us import augment, models
from ssl_us.eval import retrieval as R


def _frames():
  """(patient, side, exam, view, video) per frame record."""
  rows = [
      # 0-1: patient a, left leg, T1 reference exam
      ("a", "L", "T1", 0, "aL1"), ("a", "L", "T1", 1, "aL1"),
      # 2-4: a, left, T2 (one frame not annotated)
      ("a", "L", "T2", 0, "aL2"), ("a", "L", "T2", 1, "aL2"), ("a", "L", "T2", -1, "aL2"),
      # 5: a, left, T10 (natural order: after T2)
      ("a", "L", "T10", 0, "aL10"),
      # 6: a, right, T2 (other side: never paired with left references)
      ("a", "R", "T2", 0, "aR2"),
      # 7-8: b, left: T1 unannotated, T2 annotated -> no reference
      ("b", "L", "T1", -1, "bL1"), ("b", "L", "T2", 0, "bL2"),
  ]
  return [np.array(c) for c in zip(*rows)]


def test_make_pairs_by_hand():
  patient, side, exam, view, video = _frames()
  p = R.make_pairs(patient, side, exam, view, video)
  got = sorted(zip(p.ref.tolist(), p.cand.tolist(), p.label.tolist(), p.video.tolist()))
  assert got == [(0, 2, 1, "aL2"), (0, 3, 0, "aL2"), (0, 5, 1, "aL10"),
                 (1, 2, 0, "aL2"), (1, 3, 1, "aL2"), (1, 5, 0, "aL10")]


def test_make_pairs_from_a_later_reference_and_caps():
  patient, side, exam, view, video = _frames()
  p = R.make_pairs(patient, side, exam, view, video, ref_exam="T2")
  # References at T2: frames 2, 3 (a, L) -> candidate 5 (T10); 6 (a, R): none; 8 (b, L): none.
  assert sorted(zip(p.ref.tolist(), p.cand.tolist(), p.label.tolist())) == [(2, 5, 1), (3, 5, 0)]
  capped = R.make_pairs(patient, side, exam, view, video, max_per_reference=1, seed=0)
  for r in (0, 1):   # each reference keeps one positive and one negative
    assert sorted(capped.label[capped.ref == r].tolist()) == [0, 1]
  with pytest.raises(ValueError, match="'T9' not in the data"):
    R.make_pairs(patient, side, exam, view, video, ref_exam="T9")


def test_ncc_properties_and_against_corrcoef():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, 8, 8, 1))
  b = rng.normal(size=(3, 8, 8, 1))
  np.testing.assert_allclose(R.ncc(a, a), 1.0)
  np.testing.assert_allclose(R.ncc(a, -2 * a + 5), -1.0)
  expect = [np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1] for i in range(3)]
  np.testing.assert_allclose(R.ncc(a, b), expect, rtol=1e-10)
  np.testing.assert_array_equal(R.ncc(np.ones((1, 4, 4)), a[:1, :4, :4, 0]), [0.0])


def test_best_f1_threshold_and_pair_metrics_by_hand():
  y = np.array([1, 1, 0, 1, 0, 0])
  s = np.array([.9, .8, .7, .6, .3, .3])
  # Cut after k top scores: F1 = 2 TP / (k + 3): k=1 .5, k=2 .8, k=3 .667, k=4 .857, k=6 .667.
  t = R.best_f1_threshold(y, s)
  assert t == pytest.approx(.6)
  m = R.pair_metrics(y, s, t)
  assert (m["precision"], m["recall"]) == (pytest.approx(3 / 4), pytest.approx(1.0))
  assert m["f1"] == pytest.approx(6 / 7)
  # AUC: positives .9, .8, .6 against negatives .7, .3, .3: 8 of 9 pairs ordered.
  assert m["auc"] == pytest.approx(8 / 9)


def test_retrieval_accuracy_by_hand():
  pairs = R.Pairs(ref=np.array([0, 0, 0, 1, 1, 2]), cand=np.array([5, 6, 7, 5, 6, 7]),
                  label=np.array([1, 0, 0, 0, 1, 0]), video=np.array([9, 9, 8, 9, 9, 8]))
  scores = np.array([.9, .1, .5, .8, .2, .4])
  # (ref 0, video 9): top = cand 5, positive -> hit; (ref 0, video 8): no positive, skipped;
  # (ref 1, video 9): top = cand 5, negative -> miss; (ref 2, video 8): no positive.
  assert R.retrieval_accuracy(pairs, scores) == pytest.approx(1 / 2)


def test_pair_classifier_layers_are_the_papers():
  h = jnp.zeros((2, 16))
  params = jax.eval_shape(lambda: R.PairClassifier().init(jax.random.key(0), h, h))["params"]
  kernels = [params[f"Dense_{i}"]["kernel"].shape for i in range(4)]
  assert kernels == [(32, 2024), (2024, 1024), (1024, 512), (512, 2)]


def test_pair_classifier_learns_same_view_from_features():
  rng = np.random.default_rng(0)
  views = np.arange(60) % 3
  feats = np.eye(3)[views] * 2 + rng.normal(0, .3, (60, 3))
  feats = np.concatenate([feats, rng.normal(0, 1, (60, 5))], 1).astype(np.float32)
  ref, cand = np.meshgrid(np.arange(60), np.arange(60), indexing="ij")
  ref, cand = ref.ravel(), cand.ravel()
  label = (views[ref] == views[cand]).astype(np.int32)
  train = (ref < 40) & (cand < 40)
  test = (ref >= 40) & (cand >= 40)
  pairs = R.Pairs(ref, cand, label, cand)
  model, params = R.fit_pair_classifier(feats, pairs.subset(train),
                                        R.PairFitConfig(steps=150, lr=1e-3))
  scores = R.score_pair_classifier(model, params, feats, pairs.subset(test))
  m = R.pair_metrics(label[test], scores, 0.5)
  assert m["auc"] > 0.95 and m["f1"] > 0.8


def test_siamese_trains_the_encoder_end_to_end():
  enc = models.make_encoder("convnet4", width=2, pool="avg")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (6, 8, 8, 1)).astype(np.uint8)
  pairs = R.Pairs(np.array([0, 1, 2, 3]), np.array([1, 2, 4, 5]), np.array([1, 0, 1, 0]),
                  np.zeros(4, int))
  aug = augment.AugmentConfig(out_size=(8, 8), color_prob=0.0)
  model, v0 = R.fit_siamese(enc, images, pairs, R.PairFitConfig(steps=0, batch_size=4), aug)
  _, v2 = R.fit_siamese(enc, images, pairs, R.PairFitConfig(steps=2, batch_size=4, lr=1e-2), aug)
  k0 = v0["params"]["encoder"]["Conv_0"]["kernel"]
  assert v0["params"]["head"]["kernel"].shape == (2 * 4, 2)   # concat of two 4-d features
  assert not np.array_equal(k0, v2["params"]["encoder"]["Conv_0"]["kernel"])
  s = R.score_siamese(model, v2, images, pairs, aug)
  assert s.shape == (4,) and np.all((s >= 0) & (s <= 1))
