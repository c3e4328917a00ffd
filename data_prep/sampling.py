"""Which source frames go into which record: the four sampling modes, as pure functions.

A *plan* is a list of ``Group``s, one per record, in writing order; each group lists the source
frame indices of the record (one index in the frame modes, ``clip_len`` in clip mode) and how
many of them are loop/pad copies.

Modes (exactly one per build):

- ``all``: every decoded frame, one record each.
- ``fps``: frames at times k / fps seconds (k = 0, 1, ...), each taken as the source frame that
  is showing at that time (index floor(k * source_fps / fps)); a target rate at or above the
  source rate keeps every frame once. A video whose frame rate is unknown (0) cannot be sampled
  by time unless it is a single still frame.
- ``every``: frames 0, N, 2N, ...
- ``clip``: clips of ``clip_len`` frames taken ``clip_stride`` frames apart (a clip spans
  (clip_len - 1) * clip_stride + 1 source frames); clip starts are ``clip_hop`` frames apart
  (default: the span, so clips do not overlap); frames after the last whole clip are not used.
  A video shorter than one span gives one clip, by ``short_clips``: ``loop`` (indices wrap
  around to the start), ``pad`` (the last frame on the stride grid repeats) or ``reject``.
  ``Group.padded`` counts the looped/padded positions.
"""
from __future__ import annotations

import dataclasses
import math

MODES = ("all", "fps", "every", "clip")
SHORT_CLIP_POLICIES = ("loop", "pad", "reject")
_EPS = 1e-6  # absorbs float error in k * src_fps / fps when the exact value is an integer


class SamplingError(ValueError):
  """A video the sampling mode cannot use; ``reason`` is the short audit code."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Sampling:
  """One sampling mode and its parameters (see the module docstring)."""
  mode: str = "all"
  fps: float = 0.0
  every: int = 0
  clip_len: int = 0
  clip_stride: int = 1
  clip_hop: int = 0
  short_clips: str = "loop"

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"sampling mode {self.mode!r} is not one of {MODES}")
    if self.mode == "fps" and not self.fps > 0:
      raise ValueError(f"--fps must be > 0, got {self.fps}")
    if self.mode == "every" and self.every < 1:
      raise ValueError(f"--every must be >= 1, got {self.every}")
    if self.mode == "clip":
      if self.clip_len < 1:
        raise ValueError(f"--clip_len must be >= 1, got {self.clip_len}")
      if self.clip_stride < 1:
        raise ValueError(f"--clip_stride must be >= 1, got {self.clip_stride}")
      if self.clip_hop < 0:
        raise ValueError(f"--clip_hop must be >= 0 (0 = one clip span), got {self.clip_hop}")
      if self.short_clips not in SHORT_CLIP_POLICIES:
        raise ValueError(f"--short_clips {self.short_clips!r} is not one of "
                         f"{SHORT_CLIP_POLICIES}")

  @property
  def span(self) -> int:
    """Source frames covered by one clip (1 in the frame modes)."""
    return (self.clip_len - 1) * self.clip_stride + 1 if self.mode == "clip" else 1

  @property
  def record_len(self) -> int:
    """Frames per record: clip_len in clip mode, else 1."""
    return self.clip_len if self.mode == "clip" else 1


@dataclasses.dataclass(frozen=True)
class Group:
  """The source frames of one record, and how many of them are loop/pad copies."""
  indices: tuple[int, ...]
  padded: int = 0


def fps_indices(num_frames: int, src_fps: float, fps: float) -> list[int]:
  """Frame indices shown at times k / fps, k = 0, 1, ..., inside the video; no repeats."""
  if src_fps <= 0:
    if num_frames == 1:
      return [0]
    raise SamplingError("unknown_fps", f"frame rate unknown for a {num_frames}-frame video: "
                        "cannot sample by --fps (use --every or --clip_len)")
  if fps >= src_fps:
    return list(range(num_frames))
  out = []
  k = 0
  while (i := math.floor(k * src_fps / fps + _EPS)) < num_frames:
    out.append(i)
    k += 1
  return out


def clip_groups(num_frames: int, s: Sampling) -> list[Group]:
  """Clip mode: whole clips hop frames apart, or one looped/padded clip for a short video."""
  span, hop = s.span, s.clip_hop or s.span
  offsets = [i * s.clip_stride for i in range(s.clip_len)]
  if num_frames >= span:
    return [Group(tuple(start + o for o in offsets))
            for start in range(0, num_frames - span + 1, hop)]
  padded = sum(o >= num_frames for o in offsets)
  if s.short_clips == "reject":
    raise SamplingError("too_short", f"{num_frames} frames < one clip span of {span} "
                        "(--short_clips reject)")
  if s.short_clips == "loop":
    return [Group(tuple(o % num_frames for o in offsets), padded)]
  last = (num_frames - 1) // s.clip_stride * s.clip_stride
  return [Group(tuple(min(o, last) for o in offsets), padded)]


def plan(s: Sampling, num_frames: int, src_fps: float) -> list[Group]:
  """The records of one video: groups of source frame indices, in writing order."""
  if num_frames < 1:
    raise SamplingError("zero_frames", "the video has no decodable frames")
  if s.mode == "clip":
    return clip_groups(num_frames, s)
  if s.mode == "fps":
    indices = fps_indices(num_frames, src_fps, s.fps)
  elif s.mode == "every":
    indices = list(range(0, num_frames, s.every))
  else:
    indices = list(range(num_frames))
  return [Group((i,)) for i in indices]
