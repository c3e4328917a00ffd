"""Classification and segmentation metrics in numpy, plus video-level aggregation and summaries.

Conventions:
- ``confusion_matrix``: C[i, j] = number of examples of true class i predicted as class j.
- Binary tasks (2 classes): class ``positive`` (default 1) is the disease class.
  sensitivity = TP / (TP + FN), specificity = TN / (TN + FP), AUC of the positive-class score.
- More than 2 classes: sensitivity and specificity are the one-vs-rest values averaged over
  classes (macro); AUC is the macro one-vs-rest AUC (sklearn ``multi_class='ovr'``).
- Macro precision / recall / F1 average the per-class values; a class never predicted has
  precision 0 (sklearn ``zero_division=0``).
- ROC AUC is the Mann-Whitney statistic P(s_pos > s_neg) + 0.5 P(s_pos = s_neg); it is undefined
  (``nan`` in ``classification_metrics``, ValueError in ``roc_auc``) when one class is absent.
- Segmentation: global accuracy = sum(diag) / sum(C); mean accuracy and mIoU average over the
  classes that occur in the ground truth (accuracy) or in ground truth or prediction (IoU).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import scipy.stats


def _as_labels(y, name: str, num_classes: int) -> np.ndarray:
  y = np.asarray(y)
  if y.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
  if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"{name} must hold integer class ids in [0, {num_classes}); got values "
                     f"{np.unique(y)[:10].tolist()} of dtype {y.dtype}")
  return y.astype(np.int64)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
  """(C, C) int64 counts, rows = true class, columns = predicted class."""
  t = _as_labels(y_true, "y_true", num_classes)
  p = _as_labels(y_pred, "y_pred", num_classes)
  if t.shape != p.shape:
    raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in length")
  return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(
      num_classes, num_classes)


def roc_auc(y_true, score) -> float:
  """Binary ROC AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg), R_pos = sum of midranks."""
  y = np.asarray(y_true).astype(bool)
  s = np.asarray(score, dtype=np.float64)
  if y.shape != s.shape or y.ndim != 1:
    raise ValueError(f"y_true {y.shape} and score {s.shape} must be equal-length 1-D arrays")
  n_pos = int(y.sum())
  n_neg = y.size - n_pos
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"ROC AUC is undefined with {n_pos} positive and {n_neg} negative examples")
  ranks = scipy.stats.rankdata(s)  # average ranks for ties
  return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_class_rates(conf: np.ndarray) -> dict[str, np.ndarray]:
  """Per-class precision, recall (= sensitivity), specificity and F1 from a confusion matrix."""
  conf = np.asarray(conf, dtype=np.float64)
  tp = np.diag(conf)
  support = conf.sum(axis=1)          # TP + FN
  predicted = conf.sum(axis=0)        # TP + FP
  tn = conf.sum() - support - predicted + tp
  negatives = conf.sum() - support    # TN + FP
  div = lambda a, b: np.divide(a, b, out=np.zeros_like(a), where=b > 0)
  precision, recall = div(tp, predicted), div(tp, support)
  return dict(precision=precision, recall=recall, specificity=div(tn, negatives),
              f1=div(2 * precision * recall, precision + recall))


def classification_metrics(y_true, probs, positive: int = 1) -> dict[str, float | list]:
  """All classification metrics from labels (N,) and class probabilities / scores (N, C).

  Predictions are argmax(probs). Returns accuracy, sensitivity, specificity, precision, recall,
  f1 (macro), auc, n and the confusion matrix (nested list) under 'confusion'.
  """
  probs = np.asarray(probs, dtype=np.float64)
  if probs.ndim != 2 or probs.shape[1] < 2:
    raise ValueError(f"probs must be (N, C) with C >= 2, got shape {probs.shape}")
  c = probs.shape[1]
  y = _as_labels(y_true, "y_true", c)
  if y.shape[0] != probs.shape[0]:
    raise ValueError(f"{y.shape[0]} labels but {probs.shape[0]} rows of probabilities")
  conf = confusion_matrix(y, probs.argmax(axis=1), c)
  rates = per_class_rates(conf)
  if c == 2:
    sens, spec = rates["recall"][positive], rates["recall"][1 - positive]
    auc_fn = lambda: roc_auc(y == positive, probs[:, positive])
  else:
    sens, spec = rates["recall"].mean(), rates["specificity"].mean()
    auc_fn = lambda: float(np.mean([roc_auc(y == k, probs[:, k]) for k in range(c)]))
  present = np.unique(y).size
  return dict(
      n=int(y.size),
      accuracy=float(np.trace(conf) / max(conf.sum(), 1)),
      sensitivity=float(sens),
      specificity=float(spec),
      precision=float(rates["precision"].mean()),
      recall=float(rates["recall"].mean()),
      f1=float(rates["f1"].mean()),
      auc=auc_fn() if present == c else float("nan"),
      confusion=conf.tolist(),
  )


def aggregate_by_group(groups, scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Video-level evaluation: mean score per group (video) and that group's single label.

  groups (N,), scores (N, C), labels (N,) -> (unique groups (G,), mean scores (G, C), labels (G,)).
  Raises ValueError naming the group when its examples disagree on the label.
  """
  groups = np.asarray(groups)
  scores = np.asarray(scores, dtype=np.float64)
  labels = np.asarray(labels)
  if not groups.shape[0] == scores.shape[0] == labels.shape[0]:
    raise ValueError(f"lengths differ: groups {groups.shape}, scores {scores.shape}, "
                     f"labels {labels.shape}")
  uniq, first, inv = np.unique(groups, return_index=True, return_inverse=True)
  counts = np.bincount(inv, minlength=uniq.size)
  sums = np.zeros((uniq.size, scores.shape[1]))
  np.add.at(sums, inv, scores)
  group_labels = labels[first]
  bad = np.flatnonzero(labels != group_labels[inv])
  if bad.size:
    g = uniq[inv[bad[0]]]
    raise ValueError(f"group {g!r} has examples with different labels "
                     f"{sorted(set(labels[inv == inv[bad[0]]].tolist()))}")
  return uniq, sums / counts[:, None], group_labels


def segmentation_metrics(conf) -> dict[str, float]:
  """Global accuracy, mean (per-class) accuracy and mIoU from a pixel confusion matrix."""
  conf = np.asarray(conf, dtype=np.float64)
  tp = np.diag(conf)
  support, predicted = conf.sum(axis=1), conf.sum(axis=0)
  union = support + predicted - tp
  if conf.sum() == 0:
    raise ValueError("segmentation_metrics: the confusion matrix is empty")
  return dict(global_accuracy=float(tp.sum() / conf.sum()),
              mean_accuracy=float(np.mean(tp[support > 0] / support[support > 0])),
              miou=float(np.mean(tp[union > 0] / union[union > 0])))


def summarize(rows: Iterable[Mapping], keys: Sequence[str],
              by: Sequence[str]) -> list[dict]:
  """Mean and std (ddof=0) of ``keys`` over the rows that share the values of ``by``.

  Returns one dict per group in first-seen order: the ``by`` values, ``n`` (rows averaged) and
  ``<key>_mean`` / ``<key>_std`` for every key. NaN values propagate (nothing is skipped).
  """
  groups: dict[tuple, list[Mapping]] = {}
  for r in rows:
    groups.setdefault(tuple(r[b] for b in by), []).append(r)
  out = []
  for values, members in groups.items():
    d = dict(zip(by, values), n=len(members))
    for k in keys:
      v = np.array([m[k] for m in members], dtype=np.float64)
      d[f"{k}_mean"], d[f"{k}_std"] = float(v.mean()), float(v.std())
    out.append(d)
  return out
