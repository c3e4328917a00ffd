"""Patient-grouped splits never leak; label fractions are exact, stratified and nested."""
import numpy as np
import pytest

from data_prep import splits as prep_splits
from ssl_us.eval import splits


def _records(n_pos=13, n_neg=17, seed=0):
  """Patients with 1-6 records each; the patient's label is its records' label."""
  rng = np.random.default_rng(seed)
  groups, labels = [], []
  for p in range(n_pos + n_neg):
    n = rng.integers(1, 7)
    groups += [f"p{p}"] * n
    labels += [int(p < n_pos)] * n
  return np.array(groups), np.array(labels)


def test_patient_label_is_majority():
  pats, lab = splits.patient_labels(["a", "a", "a", "b"], [2, 1, 2, 0])
  np.testing.assert_array_equal(pats, ["a", "b"])
  np.testing.assert_array_equal(lab, [2, 0])


@pytest.mark.parametrize("k", [3, 5])
def test_group_kfold_partitions_patients_without_leak(k):
  groups, labels = _records()
  folds = splits.group_kfold(groups, labels, k, seed=1)
  assert len(folds) == k
  seen = []
  for tr, te in folds:
    assert np.intersect1d(tr, te).size == 0
    assert tr.size + te.size == groups.size
    assert not set(groups[tr]) & set(groups[te])
    seen.append(te)
  all_test = np.sort(np.concatenate(seen))
  np.testing.assert_array_equal(all_test, np.arange(groups.size))   # each record tested once
  # Stratified: per class, patients per test fold differ by at most one.
  for c, n_c in ((1, 13), (0, 17)):
    counts = [np.unique(groups[te][labels[te] == c]).size for _, te in folds]
    assert sum(counts) == n_c and max(counts) - min(counts) <= 1


def test_group_kfold_depends_on_seed_only():
  groups, labels = _records()
  a = splits.group_kfold(groups, labels, 5, seed=3)
  b = splits.group_kfold(groups, labels, 5, seed=3)
  c = splits.group_kfold(groups, labels, 5, seed=4)
  assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b))
  assert not all(np.array_equal(x[1], y[1]) for x, y in zip(a, c))


def test_group_split_is_disjoint_and_covers_everything():
  groups, labels = _records(n_pos=20, n_neg=20)
  out = splits.group_split(groups, labels, {"train": .8, "val": .1, "test": .1}, seed=0)
  names = list(out)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      assert not set(groups[out[a]]) & set(groups[out[b]])
  assert sum(v.size for v in out.values()) == groups.size
  # 20 patients per class cut at round(20 * (.8, .9)) = 16, 18: 16 / 2 / 2 per class.
  for n, per_class in zip(names, (16, 2, 2)):
    for c in (0, 1):
      assert np.unique(groups[out[n]][labels[out[n]] == c]).size == per_class
  # Few patients: every class still reaches every split that its count allows.
  g, y = _records(n_pos=3, n_neg=3)
  small = splits.group_split(g, y, {"train": .7, "test": .3}, seed=1)
  for c in (0, 1):   # round(3 * .7) = 2 train, 1 test patient of each class
    assert np.unique(g[small["test"]][y[small["test"]] == c]).size == 1
  with pytest.raises(ValueError, match="sum to 1"):
    splits.group_split(groups, labels, {"train": .8, "test": .1})


def test_group_split_is_data_preps_assignment():
  # 7 patients of class 0, 3 of class 1 into .8/.1/.1: 8/1/1 patients (largest remainder), and
  # the class rows [5.6 .7 .7] [2.4 .3 .3] rounded so rows and columns add up: [5 1 1] [3 0 0].
  # (A per-class cut at round(n_c * cumulative fraction) would give [6 0 1] [2 1 0].)
  groups = np.array([f"p{i}" for i in range(10)])
  labels = np.array([0] * 7 + [1] * 3)
  out = splits.group_split(groups, labels, {"train": .8, "val": .1, "test": .1}, seed=5)
  got = {n: [int((labels[idx] == c).sum()) for c in (0, 1)] for n, idx in out.items()}
  assert got == {"train": [5, 3], "val": [1, 0], "test": [1, 0]}
  # Record for record the same as data_prep's --splits on these patients and seed.
  strata = {str(g): int(c) for g, c in zip(groups, labels)}
  prep = prep_splits.assign_splits(strata, {"train": .8, "val": .1, "test": .1}, seed=5)
  assert {n: sorted(groups[idx]) for n, idx in out.items()} == {
      n: sorted(p for p, s in prep.items() if s == n) for n in out}


# round(f * n_c) patients per class (halves up, at least one) of 13 positive, 17 negative:
# 0.05 -> (0.65, 0.85) -> (1, 1); 0.1 -> (1.3, 1.7) -> (1, 2); 0.3 -> (3.9, 5.1) -> (4, 5);
# 0.5 -> (6.5, 8.5) -> (7, 9); 1.0 -> (13, 17).
@pytest.mark.parametrize("fraction,expect", [(.05, (1, 1)), (.1, (1, 2)), (.3, (4, 5)),
                                             (.5, (7, 9)), (1.0, (13, 17))])
def test_label_fraction_exact_stratified_by_patient(fraction, expect):
  groups, labels = _records()
  sub = splits.label_fraction(np.arange(groups.size), groups, labels, fraction, seed=0)
  n_pos = np.unique(groups[sub][labels[sub] == 1]).size
  n_neg = np.unique(groups[sub][labels[sub] == 0]).size
  assert (n_pos, n_neg) == expect
  # Whole patients only: every record of a chosen patient is in.
  chosen = np.isin(groups, groups[sub])
  np.testing.assert_array_equal(np.flatnonzero(chosen), np.sort(sub))


def test_label_fractions_nested_and_inside_training_indices():
  groups, labels = _records()
  tr, _ = splits.group_kfold(groups, labels, 5, seed=0)[0]
  prev = set()
  for f in (.05, .1, .3, .5, 1.0):
    sub = splits.label_fraction(tr, groups, labels, f, seed=2)
    assert set(sub) <= set(tr)
    assert prev <= set(sub)
    prev = set(sub)
  assert prev == set(tr)


def test_unlabelled_records_are_an_error():
  with pytest.raises(ValueError, match="no label"):
    splits.group_kfold(["a", "b", "c"], [0, -1, 1], 2)
  with pytest.raises(ValueError, match="cannot split 2 patients"):
    splits.group_kfold(["a", "b"], [0, 1], 3)


def test_finetune_classify_cross_validates_by_patient(tmp_path):
  """`python -m ssl_us.finetune` classify on a tiny dataset: every record is tested exactly once
  per (protocol, fraction), label fractions count whole patients, outputs are written."""
  import csv
  import os

  import ml_collections

  from configs.finetune import covid_blues
  from ssl_us import finetune
  from tests import fixtures
  data = fixtures.write_dataset(str(tmp_path / "d"), num_videos=12, frames=3)   # 6 patients
  c = covid_blues.get_config()
  c.init_from = "random"
  c.encoder.name = "convnet4"
  c.encoder.kwargs = ml_collections.ConfigDict({"width": 2, "pool": "avg"})
  c.data.dir = data
  c.image_size = (16, 16)
  c.eval.update(positive_label="vertical", protocols=("random_features", "supervised"),
                fractions=(0.5, 1.0), folds=3, seeds=(0,))
  c.fit.update(steps=1, batch_size=4)
  c.fit_head.update(steps=2)
  c.output_dir = str(tmp_path / "out")
  out = finetune.run(c)
  with open(out["runs"]) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 3 * 2 * 2 * 2     # folds x fractions x protocols x levels
  for proto in ("random_features", "supervised"):
    for frac in ("0.5", "1.0"):
      sel = [r for r in rows if r["protocol"] == proto and r["fraction"] == frac]
      frames = sum(int(r["n_test"]) for r in sel if r["level"] == "frame")
      videos = sum(int(r["n_test"]) for r in sel if r["level"] == "video")
      assert (frames, videos) == (36, 12)
      # 4 training patients per fold; patient labels are all 0 (ties): round(.5 * 4) = 2.
      assert {int(r["train_patients"]) for r in sel} == ({2} if frac == "0.5" else {4})
  linear = [r for r in rows if r["protocol"] == "random_features"]
  assert {int(r["trainable_params"]) for r in linear} == {4 * 2 + 2}   # 4-d features, 2 classes
  for key in ("summary", "markdown", "plot_frame", "plot_video"):
    assert os.path.getsize(out[key]) > 0
  with open(out["markdown"]) as f:
    md = f.read()
  assert "Random feature extractor" in md and "Fully supervised" in md and "video-level" in md


def test_finetune_classify_rejects_label_ids_beyond_the_label_names(tmp_path, monkeypatch):
  """A dataset whose records carry label id 2 but whose metadata names two labels is an error
  that names the dataset and the names, not a silently grown class list."""
  import numpy as np

  from configs.finetune import covid_blues
  from ssl_us import finetune
  from ssl_us.eval import data
  n = 6
  strs = np.asarray([f"v{i}" for i in range(n)])
  recs = data.Records(images=np.zeros((n, 8, 8, 1), np.uint8), label=np.asarray([0, 1, 2] * 2),
                      video=strs, patient=strs, exam=strs, side=strs,
                      frame_index=np.zeros(n, np.int64), anatomy_fine=np.full(n, -1),
                      label_names=("covid", "covid_negative"), anatomy_fine_names=())
  monkeypatch.setattr(data, "load_records", lambda *a, **k: recs)
  c = covid_blues.get_config()
  c.data.dir = str(tmp_path / "ds")
  with pytest.raises(ValueError, match=r"ds: label id 2 but only 2 label names"):
    finetune.run_classify(c)
