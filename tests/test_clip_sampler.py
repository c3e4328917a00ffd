"""Clip sampler: windows, short videos, pair distances, batch composition, real shards."""
import collections
import dataclasses

import numpy as np
import pytest

from ssl_us import input_pipeline
from ssl_us.samplers_video import ClipSampler, padded_frames, window_positions
from tests import fixtures


@dataclasses.dataclass
class FakeIndex:
  """The RecordIndex fields the sampler reads; records shuffled across videos."""
  video: np.ndarray
  frame_index: np.ndarray
  num_frames: np.ndarray
  label: np.ndarray
  dataset_dir: str = "/fake/ds"
  split: str = "train"

  @property
  def num_records(self):
    return int(self.video.size)


def make_index(records_per_video, *, frames_per_record=1, hop=None, seed=0):
  """Video v has records r = 0..n_v-1 starting at source frame r * hop (hop: 3 frames apart
  for frame records, frames_per_record for clips); stored in a shuffled order."""
  hop = hop or (3 if frames_per_record == 1 else frames_per_record)
  video = np.concatenate([np.full(n, v) for v, n in enumerate(records_per_video)])
  fi = np.concatenate([np.arange(n) * hop for n in records_per_video])
  perm = np.random.default_rng(seed).permutation(video.size)
  return FakeIndex(video=video[perm].astype(np.int32), frame_index=fi[perm],
                   num_frames=np.full(video.size, frames_per_record, np.int32),
                   label=(video[perm] % 2).astype(np.int64))


def _rng(epoch=0):
  return np.random.default_rng([0, epoch])


def test_window_positions_loop_and_pad_by_hand():
  np.testing.assert_array_equal(window_positions(10, 3, 2, 4, "loop"), [4, 6, 8])
  np.testing.assert_array_equal(window_positions(3, 4, 1, 0, "loop"), [0, 1, 2, 0])
  np.testing.assert_array_equal(window_positions(3, 4, 1, 0, "pad"), [0, 1, 2, 2])
  np.testing.assert_array_equal(window_positions(3, 3, 2, 0, "loop"), [0, 2, 1])


def test_padded_frames_counts_looped_and_repeated_frames():
  assert padded_frames([0, 3, 6, 9]) == 0
  assert padded_frames([0, 3, 6, 0, 3, 6, 0]) == 4       # looped
  assert padded_frames([0, 3, 6, 6, 6]) == 2             # last frame repeated
  # data_prep --clip_len 8 --clip_stride 2 --short_clips loop on a 7-frame COVID-BLUES video
  # wraps the stride grid modulo 7 and stores padded=4 in the record.
  assert padded_frames([0, 2, 4, 6, 1, 3, 5, 0]) == 4
  assert padded_frames([5]) == 0


def test_frame_mode_windows_cover_each_video_without_overlap():
  # clip_len 3, stride 2 -> span 5. Video 0 (10 frames): 2 windows; video 1 (3 frames): one
  # looped window; video 2 (7 frames): 1 window at offset 0..2.
  idx = make_index([10, 3, 7])
  s = ClipSampler(clip_len=3, stride=2, shards="frame")
  offsets = collections.defaultdict(set)
  for epoch in range(20):
    plan = s.plan(idx, _rng(epoch), global_batch=2)
    assert plan.shape == (4, 3)
    vids = idx.video[plan]
    assert np.all(vids == vids[:, :1])                    # one video per clip
    pos = idx.frame_index[plan] // 3                       # frame position in its video
    by_video = collections.defaultdict(list)
    for v, p in zip(vids[:, 0], pos):
      by_video[v].append(p)
    assert sorted(len(w) for w in by_video.values()) == [1, 1, 2]
    np.testing.assert_array_equal(by_video[1][0], [0, 2, 1])   # looped: positions 0, 2, 4 % 3
    for v in (0, 2):
      for p in by_video[v]:
        np.testing.assert_array_equal(np.diff(p), [2, 2])
      starts = sorted(p[0] for p in by_video[v])
      offsets[v].add(starts[0])
      if v == 0:
        assert starts[1] - starts[0] == 5                  # non-overlapping
  assert offsets[0] == {0} and offsets[2] == {0, 1, 2}       # 10 = 2 * 5: no slack for video 0


def test_frame_mode_pad_repeats_the_last_frame_and_assemble_reports_it():
  idx = make_index([2, 6])
  s = ClipSampler(clip_len=4, stride=1, short="pad", shards="frame")
  plan = s.plan(idx, _rng(), global_batch=1)
  short_row = plan[idx.video[plan[:, 0]] == 0][0]
  np.testing.assert_array_equal(idx.frame_index[short_row] // 3, [0, 1, 1, 1])
  records = [{"frames": np.full((1, 4, 4, 1), f, np.uint8), "frame_indices": np.asarray([f]),
              "label": np.int64(1)} for f in idx.frame_index[short_row]]
  ex = s.assemble(records)
  assert ex["clip"].shape == (4, 4, 4, 1) and ex["clip"].dtype == np.uint8
  np.testing.assert_array_equal(ex["clip"][:, 0, 0, 0], [0, 3, 3, 3])
  np.testing.assert_array_equal(ex["padded"], [2, 2])
  assert ex["distance"] == 0 and ex["label"] == 1 and "clip_b" not in ex


def test_frame_mode_pairs_lie_within_max_distance_in_the_same_video():
  idx = make_index([12, 2, 9])
  s = ClipSampler(clip_len=3, stride=1, views="pair", max_distance=2, shards="frame")
  assert s.records_per_example == 6
  dists = collections.Counter()
  for epoch in range(30):
    plan = s.plan(idx, _rng(epoch), global_batch=1)
    vids = idx.video[plan]
    assert np.all(vids == vids[:, :1])
    a, b = idx.frame_index[plan[:, 0]] // 3, idx.frame_index[plan[:, 3]] // 3
    for v, x, y in zip(vids[:, 0], a, b):
      d = abs(int(x) - int(y))
      if v == 1:
        assert d == 0                                      # 2 frames < span: no other clip
      else:
        assert 1 <= d <= 2
        dists[d] += 1
  assert set(dists) == {1, 2}


def test_clip_mode_same_uses_every_record_once_per_epoch():
  idx = make_index([3, 1, 4], frames_per_record=4)
  s = ClipSampler(clip_len=4, stride=1)
  plan = s.plan(idx, _rng(), global_batch=2)
  assert plan.shape == (8, 1)
  np.testing.assert_array_equal(np.sort(plan[:, 0]), np.arange(8))
  assert not np.array_equal(plan[:, 0], s.plan(idx, _rng(1), global_batch=2)[:, 0])


def test_clip_mode_pair_partner_is_uniform_over_clips_within_max_distance():
  # Video 0: 5 clips of 4 frames starting at 0, 4, 8, 12, 16; max_distance 8 -> clip 2 (start
  # 8) pairs with starts 0, 4, 12, 16, each with probability 1/4. Video 1 has one clip.
  idx = make_index([5, 1], frames_per_record=4)
  s = ClipSampler(clip_len=4, views="pair", max_distance=8)
  partners = collections.Counter()
  for epoch in range(400):
    plan = s.plan(idx, _rng(epoch), global_batch=2)
    for a, b in plan:
      assert idx.video[a] == idx.video[b]
      d = abs(int(idx.frame_index[a]) - int(idx.frame_index[b]))
      if idx.video[a] == 1:
        assert a == b                                      # alone in its video: itself
      else:
        assert 1 <= d <= 8 and a != b
      if idx.video[a] == 0 and idx.frame_index[a] == 8:
        partners[int(idx.frame_index[b])] += 1
  assert set(partners) == {0, 4, 12, 16}
  for c in partners.values():
    assert abs(c / 400 - 0.25) < 0.07


def test_clip_mode_uses_frames_every_stride_and_counts_padding():
  s = ClipSampler(clip_len=3, stride=2, views="pair", max_distance=10)
  rec = lambda first, fi: {"frames": np.arange(first, first + 6, dtype=np.uint8)[:, None, None,
                                                                                   None],
                           "frame_indices": np.asarray(fi), "label": np.int64(-1)}
  a = rec(0, [0, 1, 2, 3, 4, 5])
  b = rec(10, [6, 7, 8, 6, 7, 8])                          # a looped record from data_prep
  ex = s.assemble([a, b])
  np.testing.assert_array_equal(ex["clip"][:, 0, 0, 0], [0, 2, 4])
  np.testing.assert_array_equal(ex["clip_b"][:, 0, 0, 0], [10, 12, 14])
  np.testing.assert_array_equal(ex["padded"], [0, 1])      # frame indices 6, 8, 7
  assert ex["distance"] == 6 and ex["label"] == -1


def test_one_per_video_never_repeats_a_video_within_a_global_batch():
  idx = make_index([4, 1, 3, 2, 5, 6, 1], frames_per_record=2)
  s = ClipSampler(clip_len=2, one_per_video=True)
  rows = None
  for epoch in range(10):
    plan = s.plan(idx, _rng(epoch), global_batch=3)
    assert plan.shape == (9, 1)                            # ceil(7 / 3) batches of 3
    rows = plan.shape[0] if rows is None else rows
    assert plan.shape[0] == rows                           # constant across epochs
    for batch in plan[:, 0].reshape(3, 3):
      assert len(set(idx.video[batch])) == 3
    assert set(idx.video[plan[:7, 0]]) == set(range(7))    # every video in the first round


def test_configuration_and_index_errors_are_clear():
  with pytest.raises(ValueError, match="views='twice'"):
    ClipSampler(views="twice")
  with pytest.raises(ValueError, match="short='wrap'"):
    ClipSampler(short="wrap")
  with pytest.raises(ValueError, match="shards='frame' but the records hold clips of 4"):
    ClipSampler(shards="frame").plan(make_index([2], frames_per_record=4), _rng(), 1)
  with pytest.raises(ValueError, match="shards='clip' but the records hold single frames"):
    ClipSampler().plan(make_index([3]), _rng(), 1)
  with pytest.raises(ValueError, match=r"/fake/ds split 'train': clips of 8 frames every 2 need "
                                       r"records of >= 15 frames; 2 records hold 8"):
    ClipSampler(clip_len=8, stride=2).plan(make_index([2], frames_per_record=8), _rng(), 1)
  with pytest.raises(ValueError, match="batch 4 > 3 videos"):
    ClipSampler(one_per_video=True).plan(make_index([1, 1, 1], frames_per_record=8), _rng(), 4)


@pytest.mark.parametrize("shards,clip_len", [("clip", 4), ("frame", 0)])
def test_through_the_input_pipeline_on_written_shards(tmp_path, shards, clip_len):
  root = fixtures.write_dataset(str(tmp_path), num_videos=4, frames=8, clip_len=clip_len)
  index = input_pipeline.load_index(root, "train")
  s = ClipSampler(clip_len=4, stride=1, views="pair", max_distance=4, shards=shards)
  ds = input_pipeline.make_dataset(index, s, global_batch=4, seed=0, num_workers=0)
  batch = next(iter(ds))
  assert batch["clip"].shape == (4, 4, 16, 16, 1) and batch["clip"].dtype == np.uint8
  assert batch["clip_b"].shape == (4, 4, 16, 16, 1)
  np.testing.assert_array_equal(batch["padded"], 0)
  if shards == "clip":
    np.testing.assert_array_equal(batch["distance"], 4)     # the video's other clip record
  else:
    assert np.all((batch["distance"] >= 1) & (batch["distance"] <= 4))  # window starts 0..4
  # Each clip is 4 consecutive frames of one video, as stored.
  frames = {}
  for i in range(index.num_records):
    r = input_pipeline.read_record(index, i)
    for f, img in zip(r["frame_indices"], r["frames"]):
      frames[(r["video_id"], int(f))] = img
  for clip in batch["clip"]:
    hits = [(v, f) for (v, f), img in frames.items() if np.array_equal(img, clip[0])]
    assert len(hits) == 1
    v, f0 = hits[0]
    for t in range(4):
      np.testing.assert_array_equal(clip[t], frames[(v, f0 + t)])
