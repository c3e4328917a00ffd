"""Frame samplers that decide positives and negatives through batch composition.

All of them work on frame-mode shards (one frame per record) and follow the input_pipeline Sampler
protocol: ``plan`` is pure numpy over a RecordIndex (arrays ``video``, ``patient``,
``frame_index``, ``num_frames``, ``label``, ``anatomy_coarse``, ``anatomy_fine``, plus
``video_ids``), returns whole global batches, and is deterministic in its ``rng``; ``assemble``
builds the uint8 host example in a grain worker from the parsed records alone.

- ``FrameSampler`` (SimCLR, paper 000): every frame record once per epoch, shuffled; the two
  views are made on device.
- ``AnatomySampler`` (AWCL, paper 002): a share ``anatomy_ratio`` of every global batch is
  anatomy-labeled frames, drawn as pairs of the same anatomy class from two different videos so
  that cross-video positives always exist; the rest are unlabeled frames, every
  ``unlabeled_every``-th record of each video (the paper keeps every 8th frame).
  ``anatomy_ratio=0`` is plain SimCLR on the same frames (labels hidden).
- ``VideoPairSampler`` (USCL, paper 003): one example per video and no video twice in a global
  batch; an example is three frames of the video in chronological order (anchor = the middle
  one); the video's class label is kept for a fixed fraction of the videos.
- ``SameVideoSampler`` (CLPI, the patient-metadata baseline of paper 002): two different frames
  of one video (or patient) are the positive pair; no video twice in a global batch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
from absl import logging

from ssl_us.input_pipeline import DatasetError

GRANULARITIES = ("coarse", "fine")


def _where(index) -> str:
  return f"{getattr(index, 'dataset_dir', '<index>')} split {getattr(index, 'split', '?')!r}"


def _check_frame_mode(index, sampler: str):
  """The samplers pair single frames; clip-mode shards (T > 1 per record) are an error."""
  if index.num_records == 0:
    raise ValueError(f"{_where(index)}: no records for {sampler}")
  t = int(np.max(index.num_frames))
  if t != 1:
    raise ValueError(f"{_where(index)}: {sampler} needs frame-mode shards (one frame per "
                     f"record); these hold clips of {t} frames")


@dataclasses.dataclass(frozen=True)
class FrameSampler:
  """SimCLR (paper 000): every frame record once per epoch, shuffled; two views made on device.

  Needs frame-mode shards (one frame per record). The example holds the frame and its labels.
  """
  records_per_example: int = 1

  def plan(self, index, rng, global_batch):
    if index.num_records and int(index.num_frames.max()) != 1:
      raise DatasetError(f"{index.dataset_dir}: FrameSampler needs frame-mode shards "
                         f"(one frame per record); these hold clips of {index.num_frames.max()}")
    return rng.permutation(index.num_records)[:, None]

  def assemble(self, records):
    (r,) = records
    return {"image": r["frames"][0], "label": np.int32(r["label"]),
            "anatomy_coarse": np.int32(r["anatomy_coarse"][0]),
            "anatomy_fine": np.int32(r["anatomy_fine"][0])}


def video_runs(groups, frame_index):
  """Records grouped by ``groups`` (e.g. video) in frame order.

  Returns (order, start, count): ``order`` (R,) record ids sorted by (group, frame_index); the
  records of group g are order[start[g] : start[g] + count[g]], count[g] = 0 for absent ids.
  """
  groups = np.asarray(groups)
  order = np.lexsort((np.asarray(frame_index), groups))
  count = np.bincount(groups, minlength=int(groups.max()) + 1 if groups.size else 0)
  start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
  return order, start, count


def rank_in_video(video, frame_index):
  """(R,) position of every record among its video's records in frame order (0, 1, 2, ...)."""
  order, start, count = video_runs(video, frame_index)
  rank = np.empty(order.size, np.int64)
  rank[order] = np.arange(order.size) - np.repeat(start, count)
  return rank


def cycled_permutations(pool, n: int, rng: np.random.Generator):
  """n draws from ``pool``: concatenated fresh permutations, so every member appears once before
  any appears twice."""
  pool = np.asarray(pool)
  reps = -(-n // pool.size) if n else 0
  return np.concatenate([rng.permutation(pool) for _ in range(reps)] or [pool[:0]])[:n]


def distinct_group_batches(num_groups: int, num_batches: int, batch: int,
                           rng: np.random.Generator):
  """(num_batches, batch) group ids, no id twice in a row, every id once per round.

  Rounds are fresh permutations of all groups dealt in order; a batch that straddles two rounds
  takes from the next round only groups it does not hold yet, and the skipped ones stay at the
  front of that round's remainder.
  """
  if num_groups < batch:
    raise ValueError(f"a global batch of {batch} needs at least {batch} distinct groups, have "
                     f"{num_groups}")
  out = np.empty((num_batches, batch), np.int64)
  deck = rng.permutation(num_groups)
  for b in range(num_batches):
    if deck.size >= batch:
      out[b], deck = deck[:batch], deck[batch:]
      continue
    fresh = rng.permutation(num_groups)
    clash = np.isin(fresh, deck)
    take = np.flatnonzero(~clash)[: batch - deck.size]
    out[b] = np.concatenate([deck, fresh[take]])
    keep = np.ones(num_groups, bool)
    keep[take] = False
    deck = fresh[keep]
  return out


# ----------------------------------------------------------------------------------------------
# AWCL


@dataclasses.dataclass(frozen=True)
class AnatomySampler:
  """AWCL batches: round(anatomy_ratio * B) labeled frames (same-anatomy pairs across videos),
  the rest unlabeled frames; the example carries ``anatomy`` (-1 = none) for ``losses.awcl``.

  An epoch has ceil(#pool frames / B) global batches, whatever the ratio, where the pool is the
  labeled frames plus the kept unlabeled ones; labeled anchors and unlabeled frames are drawn as
  cycled permutations of their pools. Labeled frames of classes seen in only one video cannot
  form a cross-video pair and are left out (logged).
  """
  granularity: str = "fine"
  anatomy_ratio: float = 0.5
  unlabeled_every: int = 8
  records_per_example: int = 1

  def __post_init__(self):
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"granularity={self.granularity!r}; use one of {GRANULARITIES}")
    if not 0.0 <= self.anatomy_ratio <= 1.0:
      raise ValueError(f"anatomy_ratio must be in [0, 1], got {self.anatomy_ratio}")
    if self.unlabeled_every < 1:
      raise ValueError(f"unlabeled_every must be >= 1, got {self.unlabeled_every}")

  @property
  def key(self) -> str:
    return f"anatomy_{self.granularity}"

  def num_labeled(self, global_batch: int) -> int:
    return int(round(self.anatomy_ratio * global_batch))

  def pools(self, index):
    """(labeled record ids usable for cross-video pairs, unlabeled record ids kept)."""
    kept = rank_in_video(index.video, index.frame_index) % self.unlabeled_every == 0
    if self.anatomy_ratio == 0:
      return np.zeros(0, np.int64), np.flatnonzero(kept)
    anat = np.asarray(getattr(index, self.key))
    labeled = anat >= 0
    videos_per_class = {c: np.unique(index.video[labeled & (anat == c)]).size
                        for c in np.unique(anat[labeled])}
    lonely = sorted(int(c) for c, n in videos_per_class.items() if n < 2)
    if lonely:
      logging.warning("%s: %s classes %s are labeled in one video only; their %d frames are not "
                      "sampled as labeled frames", _where(index), self.key, lonely,
                      int(np.isin(anat, lonely).sum()))
    return (np.flatnonzero(labeled & ~np.isin(anat, lonely)),
            np.flatnonzero(~labeled & kept))

  def plan(self, index, rng, global_batch):
    _check_frame_mode(index, "AnatomySampler")
    pool_l, pool_u = self.pools(index)
    n_lab = self.num_labeled(global_batch)
    n_unl = global_batch - n_lab
    if n_lab and pool_l.size == 0:
      raise ValueError(f"{_where(index)}: anatomy_ratio={self.anatomy_ratio} needs frames with "
                       f"a {self.key} label in at least two videos of one class; there are none")
    if n_unl and pool_u.size == 0:
      raise ValueError(f"{_where(index)}: anatomy_ratio={self.anatomy_ratio} leaves {n_unl} "
                       f"slots per batch for frames without a {self.key} label; there are none")
    num_batches = max(1, math.ceil((pool_l.size + pool_u.size) / global_batch))
    labeled = self._labeled_slots(index, pool_l, num_batches, n_lab, rng)
    unlabeled = cycled_permutations(pool_u, num_batches * n_unl, rng).reshape(num_batches, n_unl)
    plan = rng.permuted(np.concatenate([labeled, unlabeled], axis=1), axis=1)
    return plan.reshape(-1, 1)

  def _labeled_slots(self, index, pool, num_batches, n_lab, rng):
    """(num_batches, n_lab) labeled record ids: n_lab // 2 anchor/partner pairs of one class from
    two different videos, plus one unpaired anchor when n_lab is odd."""
    if n_lab == 0:
      return np.zeros((num_batches, 0), np.int64)
    n_pairs = n_lab // 2
    anat = np.asarray(getattr(index, self.key))[pool]
    vid = np.asarray(index.video)[pool]
    srt = np.lexsort((vid, anat))                       # pool positions sorted by (class, video)
    cls_s, vid_s = anat[srt], vid[srt]
    pos_of = np.empty(pool.size, np.int64)
    pos_of[srt] = np.arange(pool.size)
    anchors = cycled_permutations(np.arange(pool.size), num_batches * (n_lab - n_pairs), rng)
    p = pos_of[anchors[: num_batches * n_pairs]]
    c_lo = np.searchsorted(cls_s, cls_s[p], "left")
    c_n = np.searchsorted(cls_s, cls_s[p], "right") - c_lo
    key_s = cls_s.astype(np.int64) * (int(vid.max()) + 1) + vid_s
    b_lo = np.searchsorted(key_s, key_s[p], "left")
    b_n = np.searchsorted(key_s, key_s[p], "right") - b_lo
    # Partner uniform over the class's frames outside the anchor's video block [b_lo, b_lo+b_n).
    k = c_lo + np.floor(rng.random(p.size) * (c_n - b_n)).astype(np.int64)
    partner = srt[np.where(k >= b_lo, k + b_n, k)]
    pairs = np.stack([anchors[: p.size], partner], axis=1).reshape(num_batches, 2 * n_pairs)
    single = anchors[p.size:].reshape(num_batches, n_lab - 2 * n_pairs)
    return pool[np.concatenate([pairs, single], axis=1)]

  def assemble(self, records):
    (r,) = records
    label = int(r[self.key][0]) if self.anatomy_ratio > 0 else -1
    return {"image": r["frames"][0], "anatomy": np.int32(label)}


# ----------------------------------------------------------------------------------------------
# USCL


def keeps_label(video_id: str, fraction: float, seed: int) -> bool:
  """Whether a video's class label is used: u(seed, video_id) < fraction, u uniform in [0, 1)
  from sha256, so the labeled subset is fixed across epochs, hosts and worker processes."""
  if fraction >= 1:
    return True
  h = hashlib.sha256(f"{seed}/{video_id}".encode()).digest()
  return int.from_bytes(h[:8], "big") / 2.0**64 < fraction


def chronological_triples(count, rng: np.random.Generator):
  """(n, 3) positions 0 <= a <= b <= c < count[i] of three frames of each video, in order.

  count >= 3: three distinct frames, uniform over the C(count, 3) sets; count == 2: (0, b, 1)
  with the anchor b uniform in {0, 1}; count == 1: (0, 0, 0).
  """
  n = np.asarray(count, np.int64)
  if n.size and n.min() < 1:
    raise ValueError("every video needs at least one frame")
  u = rng.random((n.size, 3))
  a = np.floor(u[:, 0] * n).astype(np.int64)
  b = np.floor(u[:, 1] * np.maximum(n - 1, 1)).astype(np.int64)
  b = b + (b >= a)
  lo, hi = np.minimum(a, b), np.maximum(a, b)
  c = np.floor(u[:, 2] * np.maximum(n - 2, 1)).astype(np.int64)
  c = c + (c >= lo)
  c = c + (c >= hi)
  three = np.sort(np.stack([a, b, c], axis=1), axis=1)
  two = np.stack([np.zeros_like(a), (u[:, 1] < 0.5).astype(np.int64), np.ones_like(a)], axis=1)
  return np.select([n[:, None] >= 3, n[:, None] == 2], [three, two], 0)


@dataclasses.dataclass(frozen=True)
class VideoPairSampler:
  """USCL examples: ``frames`` uint8 (3, H, W, 1) = f1, f2 (anchor), f3 of one video in frame
  order, and ``label`` the video's class if ``keeps_label`` else -1.

  An epoch has ceil(V / B) global batches: every video once, the last batch completed from the
  next round (``distinct_group_batches``), so no batch holds a video twice.
  """
  label_fraction: float = 0.01
  label_seed: int = 0
  num_classes: int | None = None   # when set, plan checks every label is below it
  records_per_example: int = 3

  def __post_init__(self):
    if not 0.0 <= self.label_fraction <= 1.0:
      raise ValueError(f"label_fraction must be in [0, 1], got {self.label_fraction}")

  def _check_labels(self, index):
    top = int(np.max(index.label))
    if self.num_classes is not None and top >= self.num_classes:
      names = getattr(index, "metadata", {}).get("label_names")
      raise ValueError(f"{_where(index)}: video label {top} does not fit a classifier of "
                       f"num_classes={self.num_classes} (label_names: {names})")

  def describe(self, index) -> dict[str, int]:
    """Videos, videos with one or two frames, and videos whose class label is used."""
    _, _, count = video_runs(index.video, index.frame_index)
    labels = np.full(count.size, -1)
    labels[index.video] = index.label
    labeled = sum(keeps_label(index.video_ids[v], self.label_fraction, self.label_seed)
                  for v in np.flatnonzero((labels >= 0) & (count > 0)))
    return {"videos": int((count > 0).sum()), "one_frame": int((count == 1).sum()),
            "two_frames": int((count == 2).sum()), "labeled_videos": int(labeled)}

  def plan(self, index, rng, global_batch):
    _check_frame_mode(index, "VideoPairSampler")
    self._check_labels(index)
    order, start, count = video_runs(index.video, index.frame_index)
    videos = np.flatnonzero(count > 0)
    if videos.size < global_batch:
      raise ValueError(f"{_where(index)}: USCL needs one video per example and a global batch "
                       f"of {global_batch} distinct videos; the split has {videos.size}")
    stats = self.describe(index)
    logging.info("%s: USCL pairs from %d videos (%d with one frame: pair of one frame; %d with "
                 "two: anchor is one of them); class labels kept for %d videos", _where(index),
                 stats["videos"], stats["one_frame"], stats["two_frames"],
                 stats["labeled_videos"])
    num_batches = math.ceil(videos.size / global_batch)
    v = videos[distinct_group_batches(videos.size, num_batches, global_batch, rng)].reshape(-1)
    pos = chronological_triples(count[v], rng)
    return order[start[v][:, None] + pos]

  def assemble(self, records):
    f1, f2, f3 = records
    keep = keeps_label(f2["video_id"], self.label_fraction, self.label_seed)
    label = int(f2["label"]) if keep else -1
    return {"frames": np.stack([f1["frames"][0], f2["frames"][0], f3["frames"][0]]),
            "label": np.int32(label)}


# ----------------------------------------------------------------------------------------------
# CLPI


@dataclasses.dataclass(frozen=True)
class SameVideoSampler:
  """CLPI examples: ``image`` and ``image_b`` uint8 (H, W, 1), two different frames of one video
  (or one patient with ``group='patient'``), the positive pair; other groups are negatives.
  ``anatomy`` is -1, so ``losses.awcl`` on them is NT-Xent.

  Frames are every ``every``-th record of each video. An epoch has ceil(#frames / 2B) global
  batches, each of B distinct groups (``distinct_group_batches``); a group with a single frame
  pairs it with itself (logged).
  """
  group: str = "video"
  every: int = 1
  records_per_example: int = 2

  def __post_init__(self):
    if self.group not in ("video", "patient"):
      raise ValueError(f"group={self.group!r}; use 'video' or 'patient'")
    if self.every < 1:
      raise ValueError(f"every must be >= 1, got {self.every}")

  def plan(self, index, rng, global_batch):
    _check_frame_mode(index, "SameVideoSampler")
    kept = np.flatnonzero(rank_in_video(index.video, index.frame_index) % self.every == 0)
    groups = np.asarray(getattr(index, self.group))[kept]
    order, start, count = video_runs(groups, np.asarray(index.frame_index)[kept])
    present = np.flatnonzero(count > 0)
    if present.size < global_batch:
      raise ValueError(f"{_where(index)}: CLPI needs a global batch of {global_batch} distinct "
                       f"{self.group}s; the split has {present.size}")
    single = int((count == 1).sum())
    if single:
      logging.warning("%s: %d %ss have one frame; their positive pair is that frame twice",
                      _where(index), single, self.group)
    num_batches = math.ceil(kept.size / (2 * global_batch))
    g = present[distinct_group_batches(present.size, num_batches, global_batch, rng)]
    g = g.reshape(-1)
    n = count[g]
    i = np.floor(rng.random(g.size) * n).astype(np.int64)
    j = np.floor(rng.random(g.size) * np.maximum(n - 1, 1)).astype(np.int64)
    j = np.where(n > 1, j + (j >= i), i)
    return kept[order[start[g][:, None] + np.stack([i, j], axis=1)]]

  def assemble(self, records):
    a, b = records
    return {"image": a["frames"][0], "image_b": b["frames"][0], "anatomy": np.int32(-1)}
