"""benchmarks.synthetic_difficulty: the hand-made features, by hand."""
import numpy as np

from benchmarks import synthetic_difficulty as sd


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
