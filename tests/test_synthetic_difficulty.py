"""benchmarks.synthetic_difficulty: hand-made features by hand; the probe sweep's C and folds."""
import numpy as np
import pytest

from benchmarks import synthetic_difficulty as sd
from ssl_us import demo
from tests import fixtures


def test_statistics_of_a_vertical_line_by_hand():
  # One 8x4 frame, column 2 bright: mean 1/4, std sqrt(1/4 * 3/4), |d/dx| 1 at 2 of 3 column
  # steps in every row, |d/dy| 0; every one-row band the same as the frame.
  x = np.zeros((1, 8, 4), np.float32)
  x[0, :, 2] = 1.0
  f = sd.statistics(x, bands=8)
  np.testing.assert_allclose(f["global stats (4)"], [[0.25, np.sqrt(0.1875), 2 / 3, 0.0]],
                             rtol=1e-6)
  np.testing.assert_allclose(f["depth bands (16)"], [[0.25] * 8 + [2 / 3] * 8], rtol=1e-6)
  assert f["pixels"].shape == (1, 32)


def test_depth_bands_follow_the_rows():
  # A bright top half: the first 4 of 8 bands have mean 1, the rest 0; no lateral gradient.
  x = np.zeros((2, 8, 6), np.float32)
  x[:, :4] = 1.0
  f = sd.statistics(x, bands=8)["depth bands (16)"]
  np.testing.assert_allclose(f, np.tile([1.0] * 4 + [0.0] * 4 + [0.0] * 8, (2, 1)))


@pytest.mark.parametrize("scores, expected", [
    ({0.01: 0.5, 0.1: 0.7, 1.0: 0.6}, 0.1),
    ({0.01: 0.6, 0.1: 0.7, 1.0: 0.7, 10.0: 0.7}, 0.1),  # a tie goes to the most regularised
    ({1.0: 0.4}, 1.0),
])
def test_select_c_by_hand(scores, expected):
  assert sd.select_c(scores) == expected


def _grouped_problem(n_patients=8, per=10, seed=0):
  # The label is the patient's (as in the synthetic data); one informative, noisy feature.
  rng = np.random.default_rng(seed)
  groups = np.repeat(np.arange(n_patients), per)
  y = groups % 2
  x = np.stack([y + 0.8 * rng.normal(size=y.size), rng.normal(size=y.size)], 1)
  return x, y, groups


def test_probe_sweep_equals_the_demo_probe_and_cv_never_splits_a_patient(monkeypatch):
  x, y, groups = _grouped_problem()
  xte, yte, _ = _grouped_problem(seed=1)
  cs = (0.01, 0.1, 1.0)
  calls = []
  real = demo.linear_probe

  def spy(xa, ya, xb, yb, c):
    calls.append((xa, xb))
    return real(xa, ya, xb, yb, c)

  monkeypatch.setattr(demo, "linear_probe", spy)
  test, chosen, acc = sd.probe_sweep(x, y, groups, xte, yte, cs=cs, folds=4)
  assert set(test) == set(cs) and chosen in cs and acc == test[chosen]
  for c in cs:
    assert test[c] == real(x, y, xte, yte, c)
  assert test[0.1] == real(x, y, xte, yte)  # the demo's probe is the sweep's C = 0.1
  # One test fit and 4 fold fits per C; no row (so no patient) on both sides of a fold.
  assert len(calls) == len(cs) * 5
  row = {tuple(r): g for r, g in zip(x, groups)}
  for xa, xb in calls:
    if xb is xte:
      continue
    fit = {row[tuple(r)] for r in xa}
    held = {row[tuple(r)] for r in xb}
    assert held and not fit & held
    assert len(fit | held) == 8 and len(held) == 2


def test_probe_sweep_needs_as_many_patients_as_folds():
  x, y, groups = _grouped_problem(n_patients=3)
  with pytest.raises(ValueError, match="3 patients in 'train', need >= 4"):
    sd.probe_sweep(x, y, groups, x, y)


def test_cli_sweeps_every_feature_set_and_random_seed(tmp_path, capsys):
  # Horizontal vs vertical stripes: every feature set separates them at every C, so every grouped
  # CV score ties at 1 and the tie goes to the smallest C.
  ds = fixtures.write_dataset(str(tmp_path), num_videos=8, frames=2)
  fixtures.write_dataset(str(tmp_path), split="test", num_videos=8, frames=2, seed=1)
  assert sd.main(["--dataset", ds, "--random_seeds", "2", "--probe", "sweep"]) == 0
  rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ")]
  names = [r.split(" | ")[0][2:] for r in rows[1:]]
  assert names == ["global stats (4)", "depth bands (16)", "pixels"] + [
      f"random ConvNet4 (init seed {s}), {p}" for s in (12345, 12346)
      for p in ("flattened", "averaged")] + ["chance"]
  for r in rows[1:-1]:
    assert r.endswith("| 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 (C=0.001) |"), r
  assert rows[-1].endswith("| 0.500 |")
  with pytest.raises(SystemExit):
    sd.main(["--dataset", ds, "--random_seeds", "0"])
