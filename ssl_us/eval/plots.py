"""PNG figures of the downstream evaluations (matplotlib, Agg), each written to a temporary name
and renamed when complete.

- ``label_fraction_curve``: metric vs fraction of training labels, one line per protocol with
  +-std error bars (paper 001 Fig. 3).
- ``embedding_scatter``: 2-D embedding (t-SNE) coloured by label (paper 002 Fig. 5).
- ``saliency_overlays``: image | saliency heat map with predicted (yellow) and ground-truth
  (purple, as paper 001 Fig. 2) boxes, one row per example.
- ``segmentation_overlays``: image | ground truth | prediction, one row per example.
- ``roc_curves``: ROC of several scorers (view retrieval).
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from data_prep import files as files_lib  # pylint: disable=wrong-import-position


def _save(fig, path: str):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files_lib.atomic_path(path, ".png") as tmp:
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
  plt.close(fig)


def label_fraction_curve(summary: Sequence[Mapping], metrics: Sequence[str], path: str,
                         labels: Mapping[str, str] | None = None, title: str = ""):
  """``summary`` rows hold 'protocol', 'fraction', '<m>_mean' and '<m>_std' for each metric m."""
  labels = labels or {}
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
  protocols = list(dict.fromkeys(r["protocol"] for r in summary))
  for ax, m in zip(axes[0], metrics):
    for p in protocols:
      rows = sorted((r for r in summary if r["protocol"] == p), key=lambda r: r["fraction"])
      f = np.array([r["fraction"] for r in rows]) * 100
      ax.errorbar(f, [r[f"{m}_mean"] for r in rows], yerr=[r[f"{m}_std"] for r in rows],
                  marker="o", capsize=3, label=labels.get(p, p))
    ax.set_xscale("log")
    ticks = sorted({r["fraction"] * 100 for r in summary})
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.set_xlabel("labelled training data (%)")
    ax.set_ylabel(m)
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  _save(fig, path)


def embedding_scatter(xy, labels, names: Sequence[str], path: str, title: str = ""):
  """Scatter of xy (N, 2) coloured by integer labels, legend from ``names``."""
  xy, labels = np.asarray(xy), np.asarray(labels)
  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  for c in np.unique(labels):
    sel = labels == c
    ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7,
               label=names[c] if 0 <= c < len(names) else str(c))
  ax.set_xticks([])
  ax.set_yticks([])
  ax.legend(fontsize=8, markerscale=2)
  if title:
    ax.set_title(title, fontsize=10)
  _save(fig, path)


def _boxes(ax, boxes, color):
  for y0, x0, y1, x1 in boxes:
    ax.add_patch(plt.Rectangle((x0 - .5, y0 - .5), x1 - x0, y1 - y0, fill=False, lw=1.5,
                               edgecolor=color))


def saliency_overlays(images, saliencies, pred_boxes, gt_boxes, path: str,
                      titles: Sequence[str] = ()):
  """One row per example: image with ground-truth boxes | saliency heat map over the image with
  predicted (yellow) and ground-truth (purple) boxes."""
  n = len(images)
  fig, axes = plt.subplots(n, 2, figsize=(6, 3 * n), squeeze=False)
  for i in range(n):
    img = np.asarray(images[i]).squeeze()
    axes[i][0].imshow(img, cmap="gray")
    _boxes(axes[i][0], gt_boxes[i], "purple")
    axes[i][1].imshow(img, cmap="gray")
    axes[i][1].imshow(np.asarray(saliencies[i]), cmap="jet", alpha=0.45)
    _boxes(axes[i][1], pred_boxes[i], "yellow")
    _boxes(axes[i][1], gt_boxes[i], "purple")
    if i < len(titles):
      axes[i][1].set_title(titles[i], fontsize=8)
    for ax in axes[i]:
      ax.axis("off")
  _save(fig, path)


def segmentation_overlays(images, truths, preds, num_classes: int, path: str,
                          titles: Sequence[str] = ()):
  """One row per example: image | ground-truth ids | predicted ids (same colour map)."""
  n = len(images)
  fig, axes = plt.subplots(n, 3, figsize=(8, 2.8 * n), squeeze=False)
  for i in range(n):
    axes[i][0].imshow(np.asarray(images[i]).squeeze(), cmap="gray")
    for ax, m, t in ((axes[i][1], truths[i], "ground truth"), (axes[i][2], preds[i], "prediction")):
      ax.imshow(np.asarray(m), cmap="tab10", vmin=0, vmax=max(num_classes - 1, 1),
                interpolation="nearest")
      ax.set_title(t if i == 0 else "", fontsize=8)
    if i < len(titles):
      axes[i][0].set_title(titles[i], fontsize=8)
    for ax in axes[i]:
      ax.axis("off")
  _save(fig, path)


def roc_curves(curves: Mapping[str, tuple], path: str, title: str = ""):
  """ROC curves {name: (labels, scores)}, AUC in the legend."""
  from sklearn.metrics import roc_curve, roc_auc_score  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(4.2, 4))
  for name, (y, s) in curves.items():
    fpr, tpr, _ = roc_curve(y, s)
    ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, s):.3f})")
  ax.plot([0, 1], [0, 1], "k:", lw=0.8)
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.legend(fontsize=7)
  if title:
    ax.set_title(title, fontsize=10)
  _save(fig, path)
