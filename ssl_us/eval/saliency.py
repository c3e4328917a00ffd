"""Occlusion saliency (Zeiler & Fergus; paper 001 Sec. 3.3) and its weighted IoU with boxes.

Occlusion: a ``patch`` x ``patch`` window filled with ``fill`` slides over the image with
``stride`` (the last row/column of positions is added when the stride does not land on the
border, so every pixel is covered). For window w the drop is d_w = s(x) - s(x with w occluded),
s the class score. The saliency of pixel p is the mean drop over the windows that cover it:
S(p) = sum_w d_w [p in w] / sum_w [p in w] (as Captum's Occlusion).

Evaluation against ground-truth pathology boxes (paper 001): keep the top ``fraction`` (10%) of
pixels by saliency (exactly ceil(fraction * H * W) pixels, ties broken in raster order), take
the 8-connected regions of that mask, and the minimal box around each region. The paper does
not define its weighting; ours weighs each predicted box by the number of retained pixels n_r
of its region, so a speck counts less than a large salient region:

  wIoU = sum_r n_r max_g IoU(box_r, gt_g) / sum_r n_r.

Boxes are (y0, x0, y1, x1) in pixels with exclusive ends.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

Box = tuple[int, int, int, int]


def window_starts(size: int, patch: int, stride: int) -> np.ndarray:
  """Start offsets 0, stride, ... plus size - patch, so that the windows cover [0, size)."""
  if not 1 <= patch <= size or stride < 1:
    raise ValueError(f"occlusion patch {patch} / stride {stride} do not fit a size of {size}")
  starts = np.arange(0, size - patch + 1, stride)
  return starts if starts[-1] == size - patch else np.append(starts, size - patch)


def occlusion_masks(hw: tuple[int, int], patch: int, stride: int) -> np.ndarray:
  """(P, H, W) float32 masks, 1 inside each of the P occluding windows (raster order)."""
  h, w = hw
  ys, xs = window_starts(h, patch, stride), window_starts(w, patch, stride)
  masks = np.zeros((ys.size * xs.size, h, w), np.float32)
  for i, (y, x) in enumerate((y, x) for y in ys for x in xs):
    masks[i, y:y + patch, x:x + patch] = 1.0
  return masks


def occlusion_map(score_fn: Callable, image, patch: int, stride: int, fill: float = 0.0,
                  batch_size: int = 64) -> np.ndarray:
  """Saliency (H, W) of one image (H, W, C) in model units for ``score_fn`` (B, H, W, C) -> (B,).

  ``score_fn`` should be jitted; it is called on fixed-size batches (the last one padded).
  """
  image = jnp.asarray(image, jnp.float32)
  masks = occlusion_masks(image.shape[:2], patch, stride)
  base = float(np.asarray(score_fn(image[None]))[0])
  drops = []
  for i in range(0, len(masks), batch_size):
    m = masks[i:i + batch_size]
    n = len(m)
    if n < batch_size:
      m = np.concatenate([m, np.zeros((batch_size - n,) + m.shape[1:], np.float32)])
    mj = jnp.asarray(m)[..., None]
    occluded = image[None] * (1.0 - mj) + fill * mj
    drops.append(base - np.asarray(score_fn(occluded))[:n])
  drops = np.concatenate(drops)
  cover = masks.sum(0)
  return np.tensordot(drops, masks, axes=1) / cover


def top_fraction_mask(saliency, fraction: float = 0.1) -> np.ndarray:
  """Boolean mask of the ceil(fraction * H * W) most salient pixels (ties: raster order)."""
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  s = np.asarray(saliency)
  k = int(np.ceil(fraction * s.size))
  keep = np.argsort(-s.ravel(), kind="stable")[:k]
  mask = np.zeros(s.size, bool)
  mask[keep] = True
  return mask.reshape(s.shape)


def regions(mask) -> tuple[np.ndarray, list[Box]]:
  """8-connected regions: (label image, 0 = background, region r = r + 1; box of each region)."""
  labels, n = scipy.ndimage.label(np.asarray(mask), structure=np.ones((3, 3), int))
  boxes = [(sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
           for sl in scipy.ndimage.find_objects(labels)]
  assert len(boxes) == n
  return labels, boxes


def box_iou(a: Box, b: Box) -> float:
  """Intersection over union of two (y0, x0, y1, x1) boxes (exclusive ends)."""
  ih = max(0, min(a[2], b[2]) - max(a[0], b[0]))
  iw = max(0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ih * iw
  area = lambda r: max(0, r[2] - r[0]) * max(0, r[3] - r[1])
  union = area(a) + area(b) - inter
  return inter / union if union > 0 else 0.0


def weighted_iou(pred: Sequence[Box], weights: Sequence[float], gt: Sequence[Box]) -> float:
  """sum_r w_r max_g IoU(pred_r, gt_g) / sum_r w_r."""
  if not gt:
    raise ValueError("weighted IoU needs at least one ground-truth box")
  if len(pred) != len(weights) or not pred:
    raise ValueError(f"{len(pred)} predicted boxes but {len(weights)} weights")
  w = np.asarray(weights, np.float64)
  if w.sum() <= 0:
    raise ValueError(f"region weights must have a positive sum, got {w.tolist()}")
  best = np.array([max(box_iou(p, g) for g in gt) for p in pred])
  return float((w * best).sum() / w.sum())


def saliency_boxes(saliency, fraction: float = 0.1) -> tuple[list[Box], list[int]]:
  """Boxes around the connected regions of the top pixels, and each region's pixel count."""
  labels, boxes = regions(top_fraction_mask(saliency, fraction))
  sizes = np.bincount(labels.ravel(), minlength=len(boxes) + 1)[1:]
  return boxes, sizes.tolist()


def evaluate(saliency, gt: Sequence[Box], fraction: float = 0.1) -> dict:
  """wIoU of one saliency map against its ground-truth boxes, with the predicted boxes."""
  boxes, sizes = saliency_boxes(saliency, fraction)
  return dict(wiou=weighted_iou(boxes, sizes, gt), boxes=boxes, sizes=sizes)


def log_prob(logits, target: int):
  """log p_target = -softplus(logsumexp_{j != target}(z_j - z_target)), (N, C) -> (N,).

  Orders occlusions as the probability does without saturating: a confident classifier's
  probability (and float32 log_softmax, z_t - logsumexp z) rounds to 1 (0), so every drop
  would tie at 0; this form keeps log p = -exp(-40) distinct from -exp(-39).
  """
  d = logits - logits[:, target:target + 1]
  d = jnp.where(jnp.arange(logits.shape[1]) == target, -jnp.inf, d)
  return -jax.nn.softplus(jax.nn.logsumexp(d, axis=1))


def class_score_fn(apply_fn: Callable, target: int) -> Callable:
  """score(x) = log p_target(x) of a classifier's logits ``apply_fn(x)``, jitted."""
  return jax.jit(lambda x: log_prob(apply_fn(x), target))
