"""The ultrasound scan area of a video: find it once from a few frames, then crop every frame.

``find_region`` works on a sample of K frames (uint8 (K, H, W)) at a working resolution of at
most ``WORK_SIZE`` pixels on the long side (strided subsampling by s = ceil(max(H, W) /
WORK_SIZE)):

1. Candidate component. Temporal (K > 1): the scan area is where the picture changes, so a
   pixel is active when max_k - min_k > ``DYNAMIC_THRESHOLD``; burned-in text, logos, scales
   and colour bars are static. A binary opening with a disk of radius ``OPEN_RADIUS`` cuts
   thin strokes and the thin bridges that join codec noise around text to the scan area, and
   the largest 8-connected component is taken if it covers at least ``MIN_AREA`` of the frame.
2. Spatial (K = 1, or nothing large changes; on the middle frame): pixels brighter than
   ``BRIGHT_THRESHOLD``, opened the same way; the largest component that is textured (median
   3x3 standard deviation over it > ``TEXTURE_THRESHOLD``: speckle, not a flat banner or bar)
   and covers at least ``MIN_AREA``. If there is none either, the region is the full frame.
3. The mask is the convex hull of that component, rasterized at full resolution (pixel centres
   inside every hull half-plane). Sectors (phased array) and rectangles (linear) are convex, so
   dark parts of the picture (fluid, heart chambers) that touch its border stay inside; for a
   curvilinear fan the hull also covers the thin lens between the skin-line arc and its chord.
   The box is the mask's bounding box. A hull that fills at least ``RECTANGLE_FILL`` of its box
   is a ``rectangle`` (mask all True), else a ``sector``.

``apply_region`` crops to the box, zeroes pixels outside the mask (which blanks text and
markers inside the box but outside the scan area), resizes keeping the aspect ratio (Pillow
bilinear, antialiased when shrinking), zeroes outside the nearest-neighbour resized mask again
(so no interpolated value leaks past the mask edge) and pads to the output size, centred, with
zeros.

Cost on one CPU core: find_region ~5-10 ms for 32 frames of 350 x 350; apply_region ~1 ms per
frame.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from data_prep import files as files_lib

WORK_SIZE = 256
DYNAMIC_THRESHOLD = 2
BRIGHT_THRESHOLD = 12.0
TEXTURE_THRESHOLD = 4.0
OPEN_RADIUS = 2
MIN_AREA = 0.02
RECTANGLE_FILL = 0.97
KINDS = ("sector", "rectangle", "full")


@dataclasses.dataclass(frozen=True)
class Region:
  """Crop box [y0, y1) x [x0, x1) in source pixels; ``mask`` bool (y1 - y0, x1 - x0), True
  inside the scan area (read-only); ``kind`` in KINDS."""
  y0: int
  x0: int
  y1: int
  x1: int
  mask: np.ndarray = dataclasses.field(compare=False, repr=False)
  kind: str

  def __post_init__(self):
    if not (0 <= self.y0 < self.y1 and 0 <= self.x0 < self.x1):
      raise ValueError(f"Region: empty or negative box y[{self.y0}, {self.y1}) x[{self.x0}, "
                       f"{self.x1})")
    mask = np.array(self.mask, dtype=bool)
    if mask.shape != (self.y1 - self.y0, self.x1 - self.x0):
      raise ValueError(f"Region: mask shape {mask.shape} != box shape "
                       f"{(self.y1 - self.y0, self.x1 - self.x0)}")
    if self.kind not in KINDS:
      raise ValueError(f"Region: kind {self.kind!r} not in {KINDS}")
    mask.setflags(write=False)
    object.__setattr__(self, "mask", mask)


def full_region(height: int, width: int) -> Region:
  """The whole frame, all pixels kept."""
  return Region(0, 0, height, width, np.ones((height, width), bool), "full")


def find_region(frames: np.ndarray) -> Region:
  """The scan area of uint8 frames (K, H, W) sampled from one video (K = 1 for a still)."""
  frames = np.asarray(frames)
  if frames.ndim != 3 or frames.dtype != np.uint8 or 0 in frames.shape:
    raise ValueError(f"find_region: frames must be non-empty uint8 (K, H, W), got "
                     f"{frames.dtype} {frames.shape}")
  _, h, w = frames.shape
  s = max(1, math.ceil(max(h, w) / WORK_SIZE))
  small = frames[:, ::s, ::s]
  component = _moving_component(small) if len(small) > 1 else None
  if component is None:
    component = _bright_component(small[len(small) // 2])
  if component is None:
    return full_region(h, w)
  return _hull_region(component, s, h, w)


def apply_region(frame: np.ndarray, region: Region, size: tuple[int, int]) -> np.ndarray:
  """uint8 (H, W) frame -> uint8 ``size`` (out_h, out_w): crop, mask, resize, pad (see top)."""
  frame = np.asarray(frame)
  out_h, out_w = size
  if frame.ndim != 2 or frame.dtype != np.uint8:
    raise ValueError(f"apply_region: frame must be uint8 (H, W), got {frame.dtype} "
                     f"{frame.shape}")
  if region.y1 > frame.shape[0] or region.x1 > frame.shape[1]:
    raise ValueError(f"apply_region: region box y[{region.y0}, {region.y1}) x[{region.x0}, "
                     f"{region.x1}) exceeds the {frame.shape} frame")
  if out_h < 1 or out_w < 1:
    raise ValueError(f"apply_region: size must be positive, got {size}")
  crop = np.where(region.mask, frame[region.y0:region.y1, region.x0:region.x1], np.uint8(0))
  ch, cw = crop.shape
  scale = min(out_h / ch, out_w / cw)
  rh, rw = min(out_h, max(1, round(ch * scale))), min(out_w, max(1, round(cw * scale)))
  resized = _resize(crop, rh, rw)
  keep = region.mask[_nearest(ch, rh)[:, None], _nearest(cw, rw)[None, :]]
  out = np.zeros((out_h, out_w), np.uint8)
  top, left = (out_h - rh) // 2, (out_w - rw) // 2
  out[top:top + rh, left:left + rw] = np.where(keep, resized, 0)
  return out


def save_preview(frame: np.ndarray, region: Region, size: tuple[int, int], path) -> None:
  """PNG at ``path``: the frame with the box (red) and mask outline (green), and beside it the
  ``apply_region`` output; written to a temporary name and renamed."""
  from PIL import Image
  frame = np.asarray(frame, np.uint8)
  before = np.repeat(frame[..., None], 3, axis=2)
  box = np.zeros(frame.shape, bool)
  box[region.y0:region.y1, region.x0:region.x1] = True
  outline = np.zeros(frame.shape, bool)
  outline[region.y0:region.y1, region.x0:region.x1] = region.mask & ~ndimage.binary_erosion(
      region.mask, border_value=0)
  before[box & ~ndimage.binary_erosion(box, border_value=0)] = (255, 0, 0)
  before[outline] = (0, 255, 0)
  after = np.repeat(apply_region(frame, region, size)[..., None], 3, axis=2)
  gap = 8
  canvas = np.zeros((max(before.shape[0], after.shape[0]),
                     before.shape[1] + gap + after.shape[1], 3), np.uint8)
  canvas[:before.shape[0], :before.shape[1]] = before
  canvas[:after.shape[0], before.shape[1] + gap:] = after
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with files_lib.atomic_path(path) as tmp:
    Image.fromarray(canvas).save(tmp, format="PNG")


def _dynamic(small: np.ndarray) -> np.ndarray:
  """bool (h, w): pixels whose range over the K frames exceeds DYNAMIC_THRESHOLD."""
  return small.max(axis=0) - small.min(axis=0) > DYNAMIC_THRESHOLD


def _local_std(image: np.ndarray) -> np.ndarray:
  """Standard deviation of each pixel's 3x3 neighbourhood, float32 (h, w)."""
  x = image.astype(np.float32)
  mean = ndimage.uniform_filter(x, 3)
  return np.sqrt(np.maximum(ndimage.uniform_filter(x * x, 3) - mean * mean, 0))


def _disk(radius: int) -> np.ndarray:
  y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
  return x * x + y * y <= radius * radius


def _components(active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(labels, sizes): 8-connected components of ``active`` after an opening with a disk of
  radius OPEN_RADIUS; label i + 1 has sizes[i] pixels."""
  opened = ndimage.binary_opening(active, structure=_disk(OPEN_RADIUS))
  labels, _ = ndimage.label(opened, structure=np.ones((3, 3), bool))
  return labels, np.bincount(labels.ravel())[1:]


def _largest(labels: np.ndarray, sizes: np.ndarray, eligible: np.ndarray) -> np.ndarray | None:
  """Mask of the largest eligible component, or None if it covers less than MIN_AREA."""
  sizes = np.where(eligible, sizes, 0)
  if sizes.size == 0 or sizes.max() < MIN_AREA * labels.size:
    return None
  return labels == int(np.argmax(sizes)) + 1


def _moving_component(small: np.ndarray) -> np.ndarray | None:
  """Largest component of the pixels that change over the K frames."""
  labels, sizes = _components(_dynamic(small))
  return _largest(labels, sizes, np.ones(sizes.shape, bool))


def _bright_component(image: np.ndarray) -> np.ndarray | None:
  """Largest component of bright pixels (> BRIGHT_THRESHOLD) that is textured: the median 3x3
  standard deviation over it exceeds TEXTURE_THRESHOLD (speckle; flat banners and colour bars
  are not)."""
  labels, sizes = _components(image > BRIGHT_THRESHOLD)
  if sizes.size == 0:
    return None
  std = _local_std(image)
  texture = np.asarray(ndimage.median(std, labels, np.arange(1, sizes.size + 1)))
  return _largest(labels, sizes, texture > TEXTURE_THRESHOLD)


def _hull_region(component: np.ndarray, s: int, h: int, w: int) -> Region:
  """Region from the convex hull of a working-resolution component (subsampling stride s) of an
  (h, w) frame. Working pixel (i, j) covers source pixels [i s, (i + 1) s) x [j s, (j + 1) s)."""
  edge = component & ~ndimage.binary_erosion(component)
  ii, jj = np.nonzero(edge)
  corners = np.concatenate([np.stack([jj + dx, ii + dy], 1) for dy in (0, 1) for dx in (0, 1)])
  hull = ConvexHull(corners.astype(np.float64) * s)
  xs, ys = hull.points[hull.vertices, 0], hull.points[hull.vertices, 1]
  y0, y1 = max(0, int(np.floor(ys.min()))), min(h, int(np.ceil(ys.max())))
  x0, x1 = max(0, int(np.floor(xs.min()))), min(w, int(np.ceil(xs.max())))
  mask = _rasterize(hull.equations, y0, y1, x0, x1)
  rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
  mask = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
  y0, x0 = y0 + int(rows[0]), x0 + int(cols[0])
  y1, x1 = y0 + mask.shape[0], x0 + mask.shape[1]
  if mask.mean() >= RECTANGLE_FILL:
    return Region(y0, x0, y1, x1, np.ones_like(mask), "rectangle")
  return Region(y0, x0, y1, x1, mask, "sector")


def _rasterize(equations: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
  """bool (y1 - y0, x1 - x0): pixel centres (x + 0.5, y + 0.5) with a x + b y + c <= 0 for
  every hull facet (a, b, c), computed row by row as an interval [lo, hi] of x."""
  a, b, c = equations[:, 0], equations[:, 1], equations[:, 2]
  yc = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
  rhs = -(b[None, :] * yc + c[None, :])             # a x <= rhs, one column per facet
  eps = 1e-9
  upper = np.where(a > eps, rhs / np.where(a > eps, a, 1), np.inf).min(axis=1)
  lower = np.where(a < -eps, rhs / np.where(a < -eps, a, 1), -np.inf).max(axis=1)
  flat_ok = np.where(np.abs(a) <= eps, rhs >= -eps, True).all(axis=1)
  xc = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5
  return (xc >= lower[:, None] - eps) & (xc <= upper[:, None] + eps) & flat_ok[:, None]


def _nearest(n_in: int, n_out: int) -> np.ndarray:
  """Index of the input pixel whose extent holds each output pixel centre:
  floor((i + 0.5) n_in / n_out), i < n_out."""
  return np.minimum((np.arange(n_out) * 2 + 1) * n_in // (2 * n_out), n_in - 1)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 (h, w) -> uint8 (height, width), Pillow bilinear (antialiased when shrinking)."""
  from PIL import Image
  if image.shape == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
