"""benchmarks.byol3d_sweep: clip alignment, run specs, the epoch sampler, paired differences."""
import os

import numpy as np
import pytest

from benchmarks import byol3d_sweep
from configs import byol_lung


def test_align_matches_clips_by_content():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 255, (6, 2, 4, 4, 1), dtype=np.uint8)
  perm = np.array([3, 0, 5, 1, 4, 2])
  b = np.empty_like(a)
  b[perm] = a                                  # b[perm[i]] = a[i]
  got = byol3d_sweep.align(a, b)
  np.testing.assert_array_equal(got, perm)
  np.testing.assert_array_equal(b[got], a)


def test_align_errors():
  a = np.arange(3 * 8, dtype=np.uint8).reshape(3, 8)
  with pytest.raises(ValueError, match="not hold the same clips"):
    byol3d_sweep.align(a, a[:2])
  b = a.copy()
  b[1, 0] += 1
  with pytest.raises(ValueError, match="1 clips of a are not in b"):
    byol3d_sweep.align(a, b)
  with pytest.raises(ValueError, match="dataset b: two clips are identical"):
    byol3d_sweep.align(a, a[[0, 0, 1]])


def test_run_spec_and_overrides():
  name, seed, steps, over = byol3d_sweep.parse_run(
      "w16:1:2000:model.encoder_kwargs.num_filters=16,batch_size=64,aug.erase_area=(0.1,0.2)")
  assert (name, seed, steps) == ("w16", 1, 2000)
  c = byol3d_sweep.apply_overrides(byol_lung.get_config("runlocal"), over)
  assert c.model.encoder_kwargs.num_filters == 16 and c.batch_size == 64
  assert tuple(c.aug.erase_area) == (0.1, 0.2)
  assert byol3d_sweep.parse_run("base:0:10") == ("base", 0, 10, "")
  with pytest.raises(ValueError, match="NAME:SEED:STEPS"):
    byol3d_sweep.parse_run("base:0")
  with pytest.raises(ValueError, match="config has no 'model.width'"):
    byol3d_sweep.apply_overrides(byol_lung.get_config("runlocal"), "model.width=3")
  with pytest.raises(ValueError, match="config has no 'modl'"):
    byol3d_sweep.apply_overrides(byol_lung.get_config("runlocal"), "modl.width=3")


@pytest.mark.parametrize("n,b", [(10, 4), (7, 7), (5, 8)])
def test_epoch_sampler_visits_every_clip_once_per_epoch(n, b):
  s = byol3d_sweep.EpochSampler(n, b, seed=3)
  batches = [s() for _ in range(3 * n)]                    # 3n batches: at least 3 epochs
  assert all(len(x) == b for x in batches)
  draws = np.concatenate(batches)
  for e in range(len(draws) // n):
    np.testing.assert_array_equal(np.sort(draws[e * n:(e + 1) * n]), np.arange(n))
  again = byol3d_sweep.EpochSampler(n, b, seed=3)
  np.testing.assert_array_equal(np.concatenate([again() for _ in range(3 * n)]), draws)


def test_paired_difference_by_fold():
  enc = np.array([[0.7, 0.8], [0.6, 0.5], [0.9, 0.7]])
  rand = np.array([[0.6, 0.7], [0.6, 0.6], [0.8, 0.7]])
  p = byol3d_sweep.paired(enc, rand)
  d = np.array([0.1, 0.0, 0.1])
  np.testing.assert_allclose([p["acc"], p["d_acc"], p["d_acc_std"]],
                             [0.7333333, d.mean(), d.std()], rtol=1e-6)
  np.testing.assert_allclose([p["auc"], p["d_auc"], p["d_auc_std"]],
                             [2 / 3, 0.0, np.sqrt(2 / 300)], rtol=1e-6, atol=1e-12)
  assert p["ahead"] == 2                       # a tie is not ahead


def test_save_features_one_file_per_width(tmp_path):
  out = str(tmp_path / "feats.npz")
  meta = {"label_a": np.array([0, 1]), "patient": np.array([4, 5])}
  feats = {"run": np.ones((2, 3), np.float32), "random_w4_0": np.zeros((2, 3)),
           "wide": np.full((2, 5), 0.5)}
  byol3d_sweep.save_features(out, meta, feats)
  d3, d5 = np.load(str(tmp_path / "feats_d3.npz")), np.load(str(tmp_path / "feats_d5.npz"))
  assert sorted(d3.files) == ["label_a", "patient", "random_w4_0", "run"]
  assert sorted(d5.files) == ["label_a", "patient", "wide"]
  assert d3["run"].dtype == np.float16 and d5["wide"][0, 0] == np.float16(0.5)
  assert [f for f in os.listdir(tmp_path) if ".tmp" in f] == []
