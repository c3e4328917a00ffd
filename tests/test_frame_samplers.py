"""Frame samplers: AWCL batch composition, USCL video pairs, CLPI same-video pairs (pure numpy)."""
import dataclasses
import itertools

import numpy as np
import pytest

from ssl_us import samplers_frames as sf


@dataclasses.dataclass
class FakeIndex:
  """The RecordIndex fields the samplers read."""
  video: np.ndarray
  frame_index: np.ndarray
  anatomy_fine: np.ndarray
  anatomy_coarse: np.ndarray
  label: np.ndarray
  patient: np.ndarray
  video_ids: tuple
  num_frames: np.ndarray
  dataset_dir: str = "/fake/ds"
  split: str = "train"

  @property
  def num_records(self):
    return int(self.video.size)


def make_index(frames_per_video, fine=None, coarse=None, video_label=None, patient_of=None,
               shuffle=False):
  """Records of video v are frames 0..n_v-1; fine/coarse(v, f) give per-frame anatomy."""
  video = np.concatenate([np.full(n, v) for v, n in enumerate(frames_per_video)])
  frame = np.concatenate([np.arange(n) for n in frames_per_video])
  anat = lambda fn: np.array([fn(v, f) if fn else -1 for v, f in zip(video, frame)])
  nv = len(frames_per_video)
  vl = np.asarray(video_label if video_label is not None else [-1] * nv)
  pat = np.asarray(patient_of if patient_of is not None else range(nv))
  idx = FakeIndex(video=video.astype(np.int32), frame_index=frame * 3, anatomy_fine=anat(fine),
                  anatomy_coarse=anat(coarse), label=vl[video], patient=pat[video],
                  video_ids=tuple(f"vid{v:03d}" for v in range(nv)),
                  num_frames=np.ones(video.size, np.int32))
  if shuffle:
    perm = np.random.default_rng(5).permutation(video.size)
    for f in ("video", "frame_index", "anatomy_fine", "anatomy_coarse", "label", "patient"):
      setattr(idx, f, getattr(idx, f)[perm])
  return idx


# ----------------------------------------------------------------------------------------------
# Helpers


def test_rank_in_video_with_shuffled_records():
  idx = make_index([3, 2], shuffle=True)
  rank = sf.rank_in_video(idx.video, idx.frame_index)
  np.testing.assert_array_equal(rank, idx.frame_index // 3)


def test_distinct_group_batches_rounds_and_no_repeats():
  rng = np.random.default_rng(0)
  b = sf.distinct_group_batches(7, 7, 3, rng)      # 21 slots = exactly 3 rounds of 7 groups
  assert all(len(set(row)) == 3 for row in b)
  np.testing.assert_array_equal(np.bincount(b.ravel(), minlength=7), [3] * 7)
  # The first round is the first 7 slots: every group once.
  assert sorted(b.ravel()[:7]) == list(range(7))
  for seed in range(20):  # batches of 4 out of 5 groups straddle a round almost every time
    b = sf.distinct_group_batches(5, 10, 4, np.random.default_rng(seed))
    assert all(len(set(row)) == 4 for row in b)
    np.testing.assert_array_equal(np.bincount(b.ravel(), minlength=5), [8] * 5)
  with pytest.raises(ValueError, match="at least 4 distinct groups, have 3"):
    sf.distinct_group_batches(3, 1, 4, rng)


def test_cycled_permutations_cover_before_repeating():
  draws = sf.cycled_permutations(np.array([10, 11, 12, 13]), 10, np.random.default_rng(1))
  assert sorted(draws[:4]) == [10, 11, 12, 13] and sorted(draws[4:8]) == [10, 11, 12, 13]
  assert set(draws[8:]) <= {10, 11, 12, 13} and len(set(draws[8:])) == 2


# ----------------------------------------------------------------------------------------------
# AWCL


def awcl_index():
  # 6 videos x 16 frames; frames 1-4 of video v carry fine class v % 3 (each class in 2 videos),
  # coarse class 0 on frames 5-6 of videos 0-2 only.
  return make_index([16] * 6, fine=lambda v, f: v % 3 if 1 <= f <= 4 else -1,
                    coarse=lambda v, f: 0 if 5 <= f <= 6 and v < 3 else -1)


def test_anatomy_batches_by_hand():
  idx = awcl_index()
  s = sf.AnatomySampler(granularity="fine", anatomy_ratio=0.4, unlabeled_every=8)
  plan = s.plan(idx, np.random.default_rng(0), 10)
  # 24 labeled frames + 12 kept unlabeled (frames 0 and 8 of each video) -> ceil(36/10) = 4.
  assert plan.shape == (40, 1)
  rows = plan[:, 0].reshape(4, 10)
  fine = idx.anatomy_fine[rows]
  np.testing.assert_array_equal((fine >= 0).sum(axis=1), [4] * 4)  # round(0.4 * 10)
  for b in range(4):
    lab = rows[b][fine[b] >= 0]
    for c in np.unique(idx.anatomy_fine[lab]):
      assert np.unique(idx.video[lab[idx.anatomy_fine[lab] == c]]).size >= 2
  unl = rows[fine < 0]
  assert set(idx.frame_index[unl] // 3) <= {0, 8}
  # 24 unlabeled slots over a pool of 12: each kept frame exactly twice.
  np.testing.assert_array_equal(np.unique(unl, return_counts=True)[1], [2] * 12)


@pytest.mark.parametrize("ratio,n_lab", [(0.1, 3), (0.3, 10), (0.5, 16), (0.8, 26)])
def test_anatomy_ratio_share_per_batch(ratio, n_lab):
  idx = make_index([40] * 12, fine=lambda v, f: (v % 4) if f % 2 else -1)
  s = sf.AnatomySampler(granularity="fine", anatomy_ratio=ratio, unlabeled_every=1)
  rows = s.plan(idx, np.random.default_rng(3), 32)[:, 0].reshape(-1, 32)
  np.testing.assert_array_equal((idx.anatomy_fine[rows] >= 0).sum(axis=1), n_lab)
  # Pairs: with an even share every class in a batch comes from >= 2 videos.
  if n_lab % 2 == 0:
    for r in rows:
      lab = r[idx.anatomy_fine[r] >= 0]
      for c in np.unique(idx.anatomy_fine[lab]):
        assert np.unique(idx.video[lab[idx.anatomy_fine[lab] == c]]).size >= 2


def test_partner_is_same_class_other_video():
  # Class 0 in videos 0, 1, 2 with very different frame counts; one pair per batch.
  idx = make_index([30, 1, 2, 20], fine=lambda v, f: 0 if v < 3 else -1)
  s = sf.AnatomySampler(granularity="fine", anatomy_ratio=0.5, unlabeled_every=1)
  seen = set()
  for epoch in range(5):
    rows = s.plan(idx, np.random.default_rng(epoch), 4)[:, 0].reshape(-1, 4)
    for r in rows:
      lab = r[idx.anatomy_fine[r] >= 0]
      assert lab.size == 2 and idx.video[lab[0]] != idx.video[lab[1]]
      seen.add(tuple(sorted(idx.video[lab])))
  assert seen == {(0, 1), (0, 2), (1, 2)}


def test_granularity_selects_the_label_field():
  idx = awcl_index()
  s = sf.AnatomySampler(granularity="coarse", anatomy_ratio=0.5, unlabeled_every=8)
  rows = s.plan(idx, np.random.default_rng(0), 4)[:, 0].reshape(-1, 4)
  np.testing.assert_array_equal((idx.anatomy_coarse[rows] >= 0).sum(axis=1), 2)
  rec = {"frames": np.zeros((1, 4, 4, 1), np.uint8), "anatomy_coarse": np.array([0]),
         "anatomy_fine": np.array([2])}
  assert int(s.assemble([rec])["anatomy"]) == 0
  fine = sf.AnatomySampler(granularity="fine", anatomy_ratio=0.5)
  assert int(fine.assemble([rec])["anatomy"]) == 2


def test_single_video_class_is_never_a_labeled_frame():
  # Class 5 only in video 0; class 1 in videos 1 and 2.
  idx = make_index([8, 8, 8], fine=lambda v, f: (5 if v == 0 else 1) if f < 4 else -1)
  s = sf.AnatomySampler(granularity="fine", anatomy_ratio=0.5, unlabeled_every=1)
  plan = s.plan(idx, np.random.default_rng(0), 4)[:, 0]
  assert 5 not in idx.anatomy_fine[plan]
  assert (idx.anatomy_fine[plan] == 1).sum() == plan.size // 2


def test_ratio_zero_is_plain_simclr_on_kept_frames():
  idx = awcl_index()
  s = sf.AnatomySampler(granularity="fine", anatomy_ratio=0.0, unlabeled_every=8)
  plan = s.plan(idx, np.random.default_rng(0), 4)[:, 0]
  # Kept frames 0 and 8 of 6 videos = 12 -> 3 batches, each once.
  assert sorted(plan) == sorted(np.flatnonzero(idx.frame_index // 3 % 8 == 0))
  rec = {"frames": np.full((1, 4, 4, 1), 7, np.uint8), "anatomy_fine": np.array([2]),
         "anatomy_coarse": np.array([0])}
  out = s.assemble([rec])
  assert int(out["anatomy"]) == -1 and out["image"].shape == (4, 4, 1)
  assert out["image"].dtype == np.uint8


def test_anatomy_sampler_errors_name_the_problem():
  unlabeled = make_index([8] * 4)
  with pytest.raises(ValueError, match=r"/fake/ds split 'train'.*anatomy_fine label"):
    sf.AnatomySampler(anatomy_ratio=0.3).plan(unlabeled, np.random.default_rng(0), 8)
  all_labeled = make_index([8] * 4, fine=lambda v, f: v % 2)
  with pytest.raises(ValueError, match="without a anatomy_fine label"):
    sf.AnatomySampler(anatomy_ratio=0.5).plan(all_labeled, np.random.default_rng(0), 8)
  plan = sf.AnatomySampler(anatomy_ratio=1.0).plan(all_labeled, np.random.default_rng(0), 8)
  assert (all_labeled.anatomy_fine[plan] >= 0).all()
  clips = make_index([4] * 4)
  clips.num_frames = np.full(16, 8, np.int32)
  with pytest.raises(ValueError, match="frame-mode shards.*clips of 8 frames"):
    sf.AnatomySampler(anatomy_ratio=0.0).plan(clips, np.random.default_rng(0), 8)
  with pytest.raises(ValueError, match="granularity"):
    sf.AnatomySampler(granularity="medium")
  with pytest.raises(ValueError, match="anatomy_ratio"):
    sf.AnatomySampler(anatomy_ratio=1.5)


def test_anatomy_plan_is_deterministic_in_rng_and_constant_size():
  idx = awcl_index()
  s = sf.AnatomySampler(anatomy_ratio=0.3)
  a = s.plan(idx, np.random.default_rng(7), 8)
  np.testing.assert_array_equal(a, s.plan(idx, np.random.default_rng(7), 8))
  b = s.plan(idx, np.random.default_rng(8), 8)
  assert a.shape == b.shape and not np.array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# USCL


def test_uscl_batches_one_pair_per_video_in_frame_order():
  counts = [1, 2, 5, 3, 4, 6, 7]
  idx = make_index(counts, video_label=[0, 1, 2, 0, 1, -1, 2], shuffle=True)
  s = sf.VideoPairSampler(label_fraction=1.0)
  plan = s.plan(idx, np.random.default_rng(0), 3)
  assert plan.shape == (9, 3)                        # ceil(7 / 3) batches of 3
  vids = idx.video[plan]
  assert (vids == vids[:, :1]).all()                 # the three frames of a row: one video
  for batch in vids[:, 0].reshape(3, 3):
    assert len(set(batch)) == 3                      # no video twice in a global batch
  assert set(vids[:7, 0]) == set(range(7))           # every video in the epoch's first round
  fi = idx.frame_index[plan]
  n = np.asarray(counts)[vids[:, 0]]
  assert (np.diff(fi, axis=1) >= 0).all()
  assert (np.diff(fi[n >= 3], axis=1) > 0).all()     # distinct frames where there are three
  np.testing.assert_array_equal(fi[n == 1], 0)
  two = fi[n == 2]
  np.testing.assert_array_equal(two[:, [0, 2]], np.tile([0, 3], (len(two), 1)))


def test_uscl_describe_counts_short_videos_and_labels():
  idx = make_index([1, 2, 5, 3, 1, 2, 2], video_label=[0, 1, 2, 0, -1, -1, 2])
  stats = sf.VideoPairSampler(label_fraction=1.0).describe(idx)
  assert stats == {"videos": 7, "one_frame": 2, "two_frames": 3, "labeled_videos": 5}
  assert sf.VideoPairSampler(label_fraction=0.0).describe(idx)["labeled_videos"] == 0


def test_chronological_triples_uniform():
  rng = np.random.default_rng(0)
  t = sf.chronological_triples(np.full(20000, 5), rng)
  combos = list(itertools.combinations(range(5), 3))
  freq = np.array([np.all(t == c, axis=1).mean() for c in combos])
  np.testing.assert_allclose(freq.sum(), 1.0)
  np.testing.assert_allclose(freq, 0.1, atol=0.015)
  two = sf.chronological_triples(np.full(4000, 2), rng)
  assert {tuple(r) for r in two} == {(0, 0, 1), (0, 1, 1)}
  np.testing.assert_allclose(two[:, 1].mean(), 0.5, atol=0.04)
  np.testing.assert_array_equal(sf.chronological_triples(np.array([1]), rng), [[0, 0, 0]])
  with pytest.raises(ValueError, match="at least one frame"):
    sf.chronological_triples(np.array([0, 3]), rng)


def test_keeps_label_fraction_and_stability():
  ids = [f"video_{i}" for i in range(4000)]
  kept = np.array([sf.keeps_label(v, 0.3, seed=1) for v in ids])
  np.testing.assert_allclose(kept.mean(), 0.3, atol=0.03)
  assert kept.tolist() == [sf.keeps_label(v, 0.3, seed=1) for v in ids]
  other_seed = np.array([sf.keeps_label(v, 0.3, seed=2) for v in ids])
  assert (kept != other_seed).any()
  # Nested in the fraction for one seed: 10% of the videos are inside the 30%.
  assert all(kept[i] for i, v in enumerate(ids) if sf.keeps_label(v, 0.1, seed=1))


def test_uscl_assemble_stacks_frames_and_masks_label():
  recs = [{"frames": np.full((1, 2, 2, 1), k, np.uint8), "label": np.int64(2),
           "video_id": "v"} for k in (10, 20, 30)]
  out = sf.VideoPairSampler(label_fraction=1.0).assemble(recs)
  assert out["frames"].shape == (3, 2, 2, 1) and out["frames"].dtype == np.uint8
  np.testing.assert_array_equal(out["frames"][:, 0, 0, 0], [10, 20, 30])
  assert int(out["label"]) == 2
  assert int(sf.VideoPairSampler(label_fraction=0.0).assemble(recs)["label"]) == -1


def test_uscl_label_out_of_classifier_range():
  idx = make_index([2, 2, 2], video_label=[0, 3, 1])
  with pytest.raises(ValueError, match="video label 3 does not fit a classifier of num_classes=3"):
    sf.VideoPairSampler(num_classes=3).plan(idx, np.random.default_rng(0), 2)
  assert sf.VideoPairSampler(num_classes=4).plan(idx, np.random.default_rng(0), 2).shape == (4, 3)


def test_uscl_needs_enough_videos():
  with pytest.raises(ValueError, match="batch of 8 distinct videos; the split has 3"):
    sf.VideoPairSampler().plan(make_index([4, 4, 4]), np.random.default_rng(0), 8)


# ----------------------------------------------------------------------------------------------
# CLPI


def test_same_video_pairs():
  idx = make_index([6, 1, 4, 5, 3], shuffle=True)
  s = sf.SameVideoSampler(group="video")
  plan = s.plan(idx, np.random.default_rng(0), 2)
  assert plan.shape == (2 * 5, 2)                    # ceil(19 frames / (2 * 2)) batches of 2
  vids = idx.video[plan]
  assert (vids[:, 0] == vids[:, 1]).all()
  multi = vids[:, 0] != 1
  assert (plan[multi, 0] != plan[multi, 1]).all()    # two different frames
  assert (plan[~multi, 0] == plan[~multi, 1]).all()  # the one-frame video pairs with itself
  for batch in vids[:, 0].reshape(-1, 2):
    assert batch[0] != batch[1]


def test_same_patient_pairs_and_every():
  idx = make_index([8, 8, 8, 8], patient_of=[0, 0, 1, 1])
  s = sf.SameVideoSampler(group="patient", every=4)
  plan = s.plan(idx, np.random.default_rng(0), 2)
  pats = idx.patient[plan]
  assert (pats[:, 0] == pats[:, 1]).all()
  assert set(idx.frame_index[plan].ravel() // 3) <= {0, 4}
  for batch in pats[:, 0].reshape(-1, 2):
    assert set(batch) == {0, 1}
  recs = [{"frames": np.full((1, 3, 3, 1), k, np.uint8)} for k in (4, 9)]
  out = s.assemble(recs)
  assert out["image"].shape == out["image_b"].shape == (3, 3, 1)
  assert int(out["image"][0, 0, 0]) == 4 and int(out["image_b"][0, 0, 0]) == 9
  assert int(out["anatomy"]) == -1
