"""Metrics against hand-computed confusion matrices and against sklearn."""
import numpy as np
import pytest
from sklearn import metrics as skm

from ssl_us.eval import metrics


def test_confusion_matrix_hand_computed():
  y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
  y_pred = [0, 1, 0, 1, 2, 2, 2, 0, 2]
  expected = [[2, 1, 0],
              [0, 1, 1],
              [1, 0, 3]]
  np.testing.assert_array_equal(metrics.confusion_matrix(y_true, y_pred, 3), expected)


def test_binary_metrics_hand_computed():
  # TP=3 (labels 1 predicted 1), FN=1, TN=4, FP=2.
  y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
  p1 = np.array([.9, .8, .7, .2, .1, .3, .4, .45, .6, .65])
  m = metrics.classification_metrics(y, np.stack([1 - p1, p1], 1))
  assert m["confusion"] == [[4, 2], [1, 3]]
  assert m["accuracy"] == pytest.approx(7 / 10)
  assert m["sensitivity"] == pytest.approx(3 / 4)
  assert m["specificity"] == pytest.approx(4 / 6)
  # precision: class 0 = 4/5, class 1 = 3/5; recall: 4/6, 3/4.
  assert m["precision"] == pytest.approx((4 / 5 + 3 / 5) / 2)
  assert m["recall"] == pytest.approx((4 / 6 + 3 / 4) / 2)
  f1_0 = 2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6)
  f1_1 = 2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4)
  assert m["f1"] == pytest.approx((f1_0 + f1_1) / 2)
  # AUC: of the 4*6 (pos, neg) pairs, pos .2 beats only .1 -> 24 - 5 wrongly ordered = 19.
  assert m["auc"] == pytest.approx(19 / 24)


def test_auc_ties_count_half():
  assert metrics.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
  assert metrics.roc_auc([0, 0, 1], [0.1, 0.5, 0.5]) == pytest.approx((1 + 0.5) / 2)
  with pytest.raises(ValueError, match="undefined"):
    metrics.roc_auc([1, 1], [0.1, 0.2])


@pytest.mark.parametrize("c", [2, 4])
def test_against_sklearn(c):
  rng = np.random.default_rng(c)
  y = np.concatenate([np.arange(c), rng.integers(0, c, 200)])
  logits = rng.normal(size=(y.size, c)) + 1.5 * np.eye(c)[y]
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  probs = np.round(probs, 2)  # ties in the scores
  probs /= probs.sum(1, keepdims=True)
  m = metrics.classification_metrics(y, probs)
  pred = probs.argmax(1)
  np.testing.assert_array_equal(m["confusion"], skm.confusion_matrix(y, pred))
  assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
  for ours, avg in (("precision", "macro"), ("recall", "macro"), ("f1", "macro")):
    fn = getattr(skm, f"{ours}_score")
    assert m[ours] == pytest.approx(fn(y, pred, average=avg, zero_division=0))
  if c == 2:
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred, pos_label=1))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
  else:
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
    cm = skm.multilabel_confusion_matrix(y, pred)  # per class [[tn, fp], [fn, tp]]
    spec = np.mean([cm[k, 0, 0] / (cm[k, 0, 0] + cm[k, 0, 1]) for k in range(c)])
    assert m["specificity"] == pytest.approx(spec)


def test_missing_class_gives_nan_auc_and_zero_precision():
  probs = np.array([[.9, .1, 0], [.8, .2, 0], [.3, .7, 0]])
  m = metrics.classification_metrics([0, 0, 1], probs)
  assert np.isnan(m["auc"])
  assert m["precision"] == pytest.approx((1 + 1 + 0) / 3)


def test_bad_labels_are_named():
  with pytest.raises(ValueError, match="y_true"):
    metrics.classification_metrics([0, 3], np.full((2, 2), .5))
  with pytest.raises(ValueError, match="probs"):
    metrics.classification_metrics([0, 1], np.ones(2))


def test_aggregate_by_group_means_scores_per_video():
  groups = np.array(["b", "a", "b", "a", "c"])
  scores = np.array([[1., 0.], [.2, .8], [0., 1.], [.4, .6], [.3, .7]])
  labels = np.array([0, 1, 0, 1, 1])
  ids, s, y = metrics.aggregate_by_group(groups, scores, labels)
  np.testing.assert_array_equal(ids, ["a", "b", "c"])
  np.testing.assert_allclose(s, [[.3, .7], [.5, .5], [.3, .7]])
  np.testing.assert_array_equal(y, [1, 0, 1])
  with pytest.raises(ValueError, match="'b'"):
    metrics.aggregate_by_group(groups, scores, np.array([0, 1, 1, 1, 1]))


def test_segmentation_metrics_hand_computed():
  conf = np.array([[50, 10, 0],
                   [5, 25, 0],
                   [0, 0, 0]])   # class 2 neither present nor predicted: ignored
  m = metrics.segmentation_metrics(conf)
  assert m["global_accuracy"] == pytest.approx(75 / 90)
  assert m["mean_accuracy"] == pytest.approx((50 / 60 + 25 / 30) / 2)
  # IoU = TP / (support + predicted - TP): 50 / (60 + 55 - 50), 25 / (30 + 35 - 25).
  assert m["miou"] == pytest.approx((50 / 65 + 25 / 40) / 2)
  # A predicted-but-absent class counts in mIoU with IoU 0, not in mean accuracy.
  conf2 = np.array([[8, 2], [0, 0]])
  m2 = metrics.segmentation_metrics(conf2)
  assert m2["mean_accuracy"] == pytest.approx(0.8)
  assert m2["miou"] == pytest.approx((0.8 + 0) / 2)


def test_summarize_mean_std_per_group():
  rows = [dict(p="a", f=.1, acc=.5), dict(p="a", f=.1, acc=.7), dict(p="b", f=.1, acc=1.)]
  out = metrics.summarize(rows, ["acc"], by=["p", "f"])
  assert out[0] == dict(p="a", f=.1, n=2, acc_mean=pytest.approx(.6), acc_std=pytest.approx(.1))
  assert out[1]["n"] == 1 and out[1]["acc_std"] == 0


def test_knn_by_hand_and_against_sklearn():
  from sklearn.neighbors import KNeighborsClassifier
  from ssl_us.eval import embeddings
  train = np.array([[1., 0.], [2., .1], [0., 1.], [.1, 3.], [-1., 0.]])
  y = np.array([0, 0, 1, 1, 2])
  test = np.array([[1., .05], [.2, 1.], [-1., .2]])
  # k=1: the nearest in angle. k=3: [1, .05] -> both class-0 points + one class-1 -> 0;
  # [.2, 1] -> both class-1 points + (2, .1) -> 1; [-1, .2] -> (-1, 0), then both class-1
  # points (cos .20, .16) beat the class-0 ones (cos < 0) -> 1.
  np.testing.assert_array_equal(embeddings.knn_predict(train, y, test, 1, 3), [0, 1, 2])
  np.testing.assert_array_equal(embeddings.knn_predict(train, y, test, 3, 3), [0, 1, 1])
  rng = np.random.default_rng(0)
  f = rng.normal(size=(60, 5))
  lab = (f[:, 0] > 0).astype(int)
  g = rng.normal(size=(20, 5))
  sk = KNeighborsClassifier(5, metric="cosine", algorithm="brute").fit(f, lab).predict(g)
  np.testing.assert_array_equal(embeddings.knn_predict(f, lab, g, 5, 2), sk)


def test_knn_cv_separable_features_and_tsne_shape():
  from ssl_us.eval import embeddings
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(2), 20)
  groups = np.repeat(np.arange(10), 4)     # patient = 4 records of one class
  feats = np.eye(2)[labels] * 5 + rng.normal(0, .5, (40, 2))
  mean, std = embeddings.knn_accuracy_cv(feats, labels, groups, k=5, folds=5)
  assert mean == 1.0 and std == 0.0
  xy = embeddings.tsne(feats, perplexity=5)
  assert xy.shape == (40, 2) and np.all(np.isfinite(xy))
