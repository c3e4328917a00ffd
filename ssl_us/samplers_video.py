"""Clip sampler for video pretraining (BYOL / SimCLR with 3D encoders, paper 001).

Follows the input_pipeline Sampler protocol. An example is one clip of ``clip_len`` frames taken
every ``stride`` frames, plus, for the second view, either the same clip (``views='same'``: the
paper's two augmentations of one clip) or a second clip of the same video whose start lies at
most ``max_distance`` source frames away (``views='pair'``; a video with no such clip pairs a
clip with itself, distance 0).

Two kinds of shards, chosen by ``shards`` (the pipeline needs records_per_example before it
sees the index; ``plan`` checks the index against it):
- clip mode (data_prep --clip_len): a record is a clip; its frames [0, span) every ``stride``
  are used, span = (clip_len - 1) * stride + 1 <= the record's length. Candidate clips are the
  records. Short videos were looped or padded by data_prep.
- frame mode (one frame per record): records are regrouped by video in frame order; clip
  windows of span records (``stride`` counts the shard's frames). A video of n >= span frames
  gives floor(n / span) non-overlapping windows per epoch at a random offset; a shorter one
  gives one window from frame 0 whose positions beyond the end are looped (t mod n,
  ``short='loop'``) or hold the last frame (``short='pad'``).

Per epoch either every candidate clip once, shuffled (``one_per_video=False``), or one random
clip per video with no video twice in a global batch (``one_per_video=True``, so that SimCLR's
negatives never come from the positive's own video).

Host example (uint8 images): ``clip`` (T, H, W, 1), ``clip_b`` (pair mode only), ``label`` int32
(the video's class, -1 none), ``padded`` int32 (2,) looped/padded frames of the two views (a
frame is padded when its source frame index is not above every earlier one of the clip), and
``distance`` int32, source frames between the two clips' first frames.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ssl_us.samplers_frames import distinct_group_batches, video_runs

VIEWS = ("same", "pair")
SHORT = ("loop", "pad")
SHARDS = ("clip", "frame")


def _where(index) -> str:
  return f"{getattr(index, 'dataset_dir', '<index>')} split {getattr(index, 'split', '?')!r}"


def padded_frames(frame_indices) -> int:
  """Frames t whose index is <= max(frame_indices[:t]): looped or repeated frames."""
  fi = np.asarray(frame_indices)
  if fi.size < 2:
    return 0
  return int(np.sum(fi[1:] <= np.maximum.accumulate(fi)[:-1]))


def window_positions(n: int, clip_len: int, stride: int, start: int, short: str) -> np.ndarray:
  """Positions (clip_len,) in a video of n frames: start + t * stride, looped or padded."""
  pos = start + stride * np.arange(clip_len)
  if short == "loop":
    return pos % n
  return np.minimum(pos, n - 1)


@dataclasses.dataclass(frozen=True)
class ClipSampler:
  """Clips of ``clip_len`` frames every ``stride`` from ``shards``-mode shards (see above)."""
  clip_len: int = 8
  stride: int = 1
  views: str = "same"
  max_distance: int = 16
  short: str = "loop"
  one_per_video: bool = False
  shards: str = "clip"   # the pipeline needs records_per_example before it sees the index

  def __post_init__(self):
    if self.clip_len < 1 or self.stride < 1:
      raise ValueError(f"clip_len and stride must be >= 1, got {self.clip_len}, {self.stride}")
    if self.views not in VIEWS:
      raise ValueError(f"views={self.views!r}; use one of {VIEWS}")
    if self.short not in SHORT:
      raise ValueError(f"short={self.short!r}; use one of {SHORT}")
    if self.shards not in SHARDS:
      raise ValueError(f"shards={self.shards!r}; use one of {SHARDS}")
    if self.views == "pair" and self.max_distance < 1:
      raise ValueError(f"views='pair' needs max_distance >= 1, got {self.max_distance}")

  @property
  def span(self) -> int:
    return (self.clip_len - 1) * self.stride + 1

  @property
  def frame_mode(self) -> bool:
    return self.shards == "frame"

  @property
  def records_per_example(self) -> int:
    per_view = self.clip_len if self.frame_mode else 1
    return per_view * (2 if self.views == "pair" else 1)

  def check_index(self, index):
    """Clear errors when the shards are not of the configured kind or too short."""
    if index.num_records == 0:
      raise ValueError(f"{_where(index)}: no records to sample clips from")
    longest = int(np.max(index.num_frames))
    if self.frame_mode and longest != 1:
      raise ValueError(f"{_where(index)}: shards='frame' but the records hold clips of "
                       f"{longest} frames; set shards='clip'")
    if not self.frame_mode and longest == 1:
      raise ValueError(f"{_where(index)}: shards='clip' but the records hold single frames "
                       "(frame-mode shards); set shards='frame' to regroup them by video")
    short = np.flatnonzero(index.num_frames < self.span)
    if not self.frame_mode and short.size:
      raise ValueError(f"{_where(index)}: clips of {self.clip_len} frames every {self.stride} "
                       f"need records of >= {self.span} frames; {short.size} records hold "
                       f"{int(index.num_frames.min())} (rebuild with a longer --clip_len)")

  # -- plan --------------------------------------------------------------------------------------

  def plan(self, index, rng: np.random.Generator, global_batch: int) -> np.ndarray:
    self.check_index(index)
    order, start, count = video_runs(index.video, index.frame_index)
    if self.frame_mode:
      units, unit_video = self._frame_windows(order, start, count, rng)
    else:
      units, unit_video = self._clip_records(index, order, start, count, rng)
    if self.one_per_video:
      rows = self._one_per_video(units, unit_video, global_batch, rng)
    else:
      rows = units[rng.permutation(units.shape[0])]
    return rows

  def _clip_records(self, index, order, start, count, rng):
    """Clip mode: (units (N, 1 or 2) record ids, unit video (N,))."""
    first = order
    if self.views == "same":
      return first[:, None], index.video[first]
    fi = np.asarray(index.frame_index)
    second = np.empty_like(first)
    for v in np.flatnonzero(count):
      ids = order[start[v]:start[v] + count[v]]
      second[start[v]:start[v] + count[v]] = ids[self._partners(fi[ids], rng)]
    return np.stack([first, second], axis=1), index.video[first]

  def _partners(self, starts, rng):
    """For sorted clip starts (n,), a partner position each: another start within max_distance,
    uniformly; the clip itself where there is none."""
    n = starts.size
    lo = np.searchsorted(starts, starts - self.max_distance, "left")
    hi = np.searchsorted(starts, starts + self.max_distance, "right")
    own = np.arange(n)
    others = hi - lo - 1
    k = lo + np.floor(rng.random(n) * np.maximum(others, 0)).astype(np.int64)
    k = np.where(k >= own, k + 1, k)          # skip the clip itself
    return np.where(others > 0, k, own)

  def _frame_windows(self, order, start, count, rng):
    """Frame mode: windows as record ids (N, T or 2T), unit video (N,)."""
    rows, videos = [], []
    for v in np.flatnonzero(count):
      ids = order[start[v]:start[v] + count[v]]
      n = ids.size
      if self.one_per_video:
        starts = np.asarray([rng.integers(0, max(n - self.span, 0) + 1)])
      else:
        k = max(1, n // self.span)
        offset = rng.integers(0, max(n - k * self.span, 0) + 1)
        starts = offset + self.span * np.arange(k)
      for s in starts:
        pos = window_positions(n, self.clip_len, self.stride, s, self.short)
        if self.views == "pair":
          s2 = self._second_start(n, s, rng)
          pos = np.concatenate([pos, window_positions(n, self.clip_len, self.stride, s2,
                                                      self.short)])
        rows.append(ids[pos])
        videos.append(v)
    return np.asarray(rows, np.int64), np.asarray(videos, np.int64)

  def _second_start(self, n, s, rng):
    """Another window start within max_distance of s, uniform; s itself where none fits."""
    last = max(n - self.span, 0)
    cands = np.arange(max(0, s - self.max_distance), min(last, s + self.max_distance) + 1)
    cands = cands[cands != s]
    return int(rng.choice(cands)) if cands.size else int(s)

  def _one_per_video(self, units, unit_video, global_batch, rng):
    """One unit per video, videos dealt so that none appears twice in a global batch."""
    videos = np.unique(unit_video)
    if videos.size < global_batch:
      raise ValueError(f"one_per_video needs a global batch of distinct videos: batch "
                       f"{global_batch} > {videos.size} videos")
    # A random unit of each video: shuffle units, keep each video's first.
    perm = rng.permutation(unit_video.size)
    _, first = np.unique(unit_video[perm], return_index=True)
    pick = perm[first]                                   # sorted by video id
    num_batches = math.ceil(videos.size / global_batch)
    dealt = distinct_group_batches(videos.size, num_batches, global_batch, rng).reshape(-1)
    return units[pick[dealt]]

  # -- assemble ----------------------------------------------------------------------------------

  def _view(self, records) -> tuple[np.ndarray, np.ndarray]:
    """(frames (T, H, W, 1), source frame indices (T,)) of one view's records."""
    if self.frame_mode:
      frames = np.stack([r["frames"][0] for r in records])
      fi = np.asarray([r["frame_indices"][0] for r in records])
      return frames, fi
    (r,) = records
    sl = slice(0, self.span, self.stride)
    return r["frames"][sl], np.asarray(r["frame_indices"][sl])

  def assemble(self, records):
    per_view = self.clip_len if self.frame_mode else 1
    clip, fi = self._view(records[:per_view])
    out = {"clip": clip, "label": np.int32(records[0]["label"])}
    if self.views == "pair":
      clip_b, fi_b = self._view(records[per_view:])
      out["clip_b"] = clip_b
    else:
      fi_b = fi
    out["padded"] = np.asarray([padded_frames(fi), padded_frames(fi_b)], np.int32)
    out["distance"] = np.int32(abs(int(fi_b[0]) - int(fi[0])))
    return out
