"""benchmarks.paired_probe: run-by-run differences of two downstream runs CSVs."""
import csv

import numpy as np
import pytest

from benchmarks import paired_probe


def _runs(path, protocol, accs, aucs, level="frame"):
  with open(path, "a", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["protocol", "fraction", "fold", "seed", "level",
                                      "accuracy", "auc"])
    if f.tell() == 0:
      w.writeheader()
    for i, (acc, auc) in enumerate(zip(accs, aucs)):
      w.writerow(dict(protocol=protocol, fraction=1.0, fold=i % 2, seed=i // 2, level=level,
                      accuracy=acc, auc=auc))


def test_differences_are_paired_by_fold_and_seed(tmp_path):
  a, b = str(tmp_path / "a.csv"), str(tmp_path / "b.csv")
  _runs(a, "linear", [0.7, 0.6, 0.8, 0.5], [0.9, 0.8, 0.7, 0.6])
  _runs(a, "random_features", [0.0] * 4, [0.0] * 4)          # other protocol: ignored
  _runs(b, "random_features", [0.6, 0.65, 0.7, 0.5], [0.8, 0.8, 0.8, 0.8])
  (row,) = paired_probe.compare(paired_probe.read_runs(a + ":linear"),
                                paired_probe.read_runs(b + ":random_features"))
  d = np.array([0.1, -0.05, 0.1, 0.0])
  assert row["n"] == 4 and row["level"] == "frame"
  np.testing.assert_allclose([row["accuracy_a"], row["accuracy_b"]], [0.65, 0.6125])
  np.testing.assert_allclose([row["accuracy_diff"], row["accuracy_diff_std"]],
                             [d.mean(), d.std()])
  assert row["accuracy_ahead"] == 2            # a tie is not ahead
  np.testing.assert_allclose(row["auc_diff"], -0.05)
  assert row["auc_ahead"] == 1
  assert "| 1.0 | frame | 4 | 0.650 | 0.612 | +0.038 ± 0.065 | 2/4 |" in paired_probe.markdown(
      [row])


def test_errors_name_the_file_and_protocol(tmp_path):
  a = str(tmp_path / "a.csv")
  _runs(a, "linear", [0.5, 0.5], [0.5, 0.5])
  with pytest.raises(ValueError, match="no rows of protocol 'finetune'"):
    paired_probe.read_runs(a + ":finetune")
  with pytest.raises(ValueError, match="expected PATH:PROTOCOL"):
    paired_probe.read_runs(a)
  _runs(a, "linear", [0.5], [0.5])
  with pytest.raises(ValueError, match="two linear rows"):
    paired_probe.read_runs(a + ":linear")
