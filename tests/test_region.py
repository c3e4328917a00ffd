"""data_prep.region: scan-area detection on synthetic fans/rectangles with hand-computed boxes and
on real COVID-BLUES and DICOM frames; apply_region's crop, mask, resize and padding."""
import json
import math
import os

import av
import numpy as np
import pytest
from PIL import Image

from data_prep import readers, region
from tests.conftest import SHARED_DATA

DATA = SHARED_DATA
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data is absent")

# Synthetic annular sector: apex (20, 120), radii 20..150, half-angle 40 degrees, in 200 x 240.
H, W = 200, 240
APEX_Y, APEX_X, R0, R1, HALF = 20.0, 120.0, 20.0, 150.0, math.radians(40)
# Its pixel-centre bounding box, by hand: bottom row centre <= 20 + 150 = 170 -> y1 = 170;
# sides 120 -+ 150 sin 40 = 23.58 / 216.42 -> x0 = 24 (centre 24.5), x1 = 216 (last centre
# 215.5); top: the inner-arc corners are at y = 20 + 20 cos 40 = 35.3, and row 36 (centre 36.5,
# dy = 16.5, 11.30 <= dx <= 13.84) is the first row with a pixel centre inside -> y0 = 36.
FAN_BOX = (36, 24, 170, 216)
TEXT_IN_BOX = (slice(40, 50), slice(26, 60))    # inside the box, left of the fan's edge
TEXT_OUTSIDE = (slice(100, 130), slice(222, 238))


def _fan_mask(r1=R1):
  y, x = np.mgrid[0:H, 0:W] + 0.5
  r = np.hypot(y - APEX_Y, x - APEX_X)
  theta = np.arctan2(x - APEX_X, y - APEX_Y)
  return (r >= R0) & (r <= r1) & (np.abs(theta) <= HALF)


def _text(frames, where):
  """Burned-in 'text': static white strokes 2 px wide, 2 px apart."""
  ys, xs = where
  frames[:, ys, xs] = 0
  frames[:, ys, xs.start:xs.stop:4] = 255
  frames[:, ys, xs.start + 1:xs.stop:4] = 255


def _speckle(rng, k, inside, low=30, high=200):
  frames = np.zeros((k,) + inside.shape, np.uint8)
  frames[:, inside] = rng.integers(low, high, (k, int(inside.sum())), dtype=np.uint8)
  return frames


def _in_frame(reg, shape):
  full = np.zeros(shape, bool)
  full[reg.y0:reg.y1, reg.x0:reg.x1] = reg.mask
  return full


def _iou(a, b):
  return (a & b).sum() / (a | b).sum()


def test_synthetic_fan_with_text():
  rng = np.random.default_rng(0)
  fan = _fan_mask()
  frames = _speckle(rng, 8, fan)
  _text(frames, TEXT_IN_BOX)
  _text(frames, TEXT_OUTSIDE)
  assert not fan[TEXT_IN_BOX].any() and not fan[TEXT_OUTSIDE].any()
  reg = region.find_region(frames)
  assert reg.kind == "sector"
  np.testing.assert_allclose((reg.y0, reg.x0, reg.y1, reg.x1), FAN_BOX, atol=2)
  mask = _in_frame(reg, (H, W))
  assert _iou(mask, fan) > 0.97
  assert not mask[TEXT_IN_BOX].any() and not mask[TEXT_OUTSIDE].any()
  out = region.apply_region(frames[0], reg, reg.mask.shape)    # no resize: exact crop * mask
  crop = frames[0, reg.y0:reg.y1, reg.x0:reg.x1]
  np.testing.assert_array_equal(out, np.where(reg.mask, crop, 0))
  text_rows = slice(TEXT_IN_BOX[0].start - reg.y0, TEXT_IN_BOX[0].stop - reg.y0)
  text_cols = slice(TEXT_IN_BOX[1].start - reg.x0, TEXT_IN_BOX[1].stop - reg.x0)
  assert crop[text_rows, text_cols].max() == 255 and out[text_rows, text_cols].max() == 0


def test_still_fan_ignores_a_larger_flat_banner_and_text():
  """K = 1 with a small fan (outer radius 80: area 0.698 (80^2 - 20^2) = 4189 px) under a flat
  banner of 30 x 240 = 7200 px: the largest bright region is the banner, but it has no texture.
  Box by hand: y1 = 20 + 80 = 100; x = 120 -+ 80 sin 40 = 68.58 / 171.42 -> [69, 171)."""
  rng = np.random.default_rng(1)
  fan = _fan_mask(r1=80.0)
  frames = _speckle(rng, 1, fan)
  frames[:, 0:30, :] = 120
  _text(frames, (slice(4, 12), slice(10, 100)))  # text on the banner
  _text(frames, TEXT_OUTSIDE)
  reg = region.find_region(frames)
  assert reg.kind == "sector"
  np.testing.assert_allclose((reg.y0, reg.x0, reg.y1, reg.x1), (36, 69, 100, 171), atol=2)
  assert _iou(_in_frame(reg, (H, W)), fan) > 0.95


def test_rectangle_between_text_and_a_colour_bar():
  rng = np.random.default_rng(2)
  inside = np.zeros((120, 160), bool)
  inside[30:100, 20:140] = True
  frames = _speckle(rng, 6, inside)
  _text(frames, (slice(5, 15), slice(10, 150)))
  frames[:, 30:100, 146:154] = np.linspace(40, 250, 70, dtype=np.uint8)[:, None]  # static bar
  reg = region.find_region(frames)
  assert (reg.kind, reg.y0, reg.x0, reg.y1, reg.x1) == ("rectangle", 30, 20, 100, 140)
  assert reg.mask.all() and reg.mask.shape == (70, 120)


def test_large_frames_use_a_subsampled_working_grid():
  """A 600 x 720 fan (stride 3 on the working grid) still gets its box within the stride."""
  rng = np.random.default_rng(3)
  y, x = np.mgrid[0:600, 0:720] + 0.5
  r, theta = np.hypot(y - 60, x - 360), np.arctan2(x - 360, y - 60)
  fan = (r >= 60) & (r <= 450) & (np.abs(theta) <= HALF)
  frames = _speckle(rng, 4, fan)
  reg = region.find_region(frames)
  # 3 x the small fan: top 60 + 60 cos 40 = 106.0, bottom 60 + 450 = 510, sides
  # 360 -+ 450 sin 40 = 70.75 / 649.25 -> pixel centres 71.5 .. 648.5 -> [71, 649).
  np.testing.assert_allclose((reg.y0, reg.x0, reg.y1, reg.x1), (106, 71, 510, 649), atol=4)
  assert _iou(_in_frame(reg, fan.shape), fan) > 0.97


def test_nothing_found_gives_the_full_frame():
  for frames in (np.zeros((4, 30, 40), np.uint8), np.full((1, 30, 40), 200, np.uint8)):
    reg = region.find_region(frames)
    assert (reg.kind, reg.y0, reg.x0, reg.y1, reg.x1) == ("full", 0, 0, 30, 40)
    assert reg.mask.all()


def test_find_region_rejects_bad_input():
  with pytest.raises(ValueError, match="uint8 \\(K, H, W\\)"):
    region.find_region(np.zeros((30, 40), np.uint8))
  with pytest.raises(ValueError, match="float32"):
    region.find_region(np.zeros((2, 30, 40), np.float32))


def test_region_validates_and_freezes_its_mask():
  with pytest.raises(ValueError, match="mask shape"):
    region.Region(0, 0, 4, 5, np.ones((5, 4), bool), "sector")
  with pytest.raises(ValueError, match="kind"):
    region.Region(0, 0, 4, 5, np.ones((4, 5), bool), "circle")
  with pytest.raises(ValueError, match="empty"):
    region.Region(3, 0, 3, 5, np.ones((0, 5), bool), "sector")
  reg = region.Region(0, 0, 4, 5, np.ones((4, 5), bool), "rectangle")
  with pytest.raises(ValueError):
    reg.mask[0, 0] = False


def test_apply_region_crop_mask_resize_pad():
  rng = np.random.default_rng(4)
  frame = rng.integers(1, 256, (30, 30), dtype=np.uint8)
  mask = np.tril(np.ones((10, 20), bool), k=5)
  reg = region.Region(2, 3, 12, 23, mask, "sector")
  out = region.apply_region(frame, reg, (10, 20))
  assert out.dtype == np.uint8 and out.shape == (10, 20)
  np.testing.assert_array_equal(out, np.where(mask, frame[2:12, 3:23], 0))
  # 10 x 20 into 32 x 32: scale 1.6 -> 16 x 32, padded with 8 zero rows above and below.
  half = np.zeros((10, 20), bool)
  half[:, 10:] = True
  flat = np.full((30, 30), 200, np.uint8)
  out = region.apply_region(flat, region.Region(2, 3, 12, 23, half, "sector"), (32, 32))
  assert out.shape == (32, 32) and out.dtype == np.uint8
  assert not out[:8].any() and not out[24:].any()
  # Mask: output column c takes input column floor((c + 0.5) / 1.6): 15 -> 9 (off), 16 -> 10 (on).
  # Values: bilinear samples input (c + 0.5) / 1.6 - 0.5: column 16 -> 9.81 mixes 0 and 200;
  # from column 18 (11.06) on only value-200 pixels are interpolated.
  assert not out[8:24, :16].any()
  assert out[8:24, 16:].all()
  np.testing.assert_array_equal(out[8:24, 18:], 200)


def test_apply_region_keeps_aspect_and_centres():
  frame = np.arange(200, dtype=np.uint8).reshape(10, 20)
  out = region.apply_region(frame, region.full_region(10, 20), (20, 20))  # scale 1: no resize
  assert not out[:5].any() and not out[15:].any()
  np.testing.assert_array_equal(out[5:15], frame)
  out = region.apply_region(frame, region.full_region(10, 20), (5, 40))   # 5 x 10, at col 15
  assert not out[:, :15].any() and not out[:, 25:].any() and out[:, 15:25].all()
  with pytest.raises(ValueError, match="exceeds"):
    region.apply_region(frame[:5], region.full_region(10, 20), (8, 8))


def test_save_preview_writes_a_side_by_side_png(tmp_path):
  rng = np.random.default_rng(5)
  frames = _speckle(rng, 4, _fan_mask())
  reg = region.find_region(frames)
  path = tmp_path / "previews" / "fan.png"
  region.save_preview(frames[0], reg, (64, 96), path)
  assert os.listdir(path.parent) == ["fan.png"]            # no temporary file left behind
  with Image.open(path) as im:
    rgb = np.asarray(im.convert("RGB"))
  assert rgb.shape == (H, W + 8 + 96, 3)
  assert (rgb[reg.y0, reg.x0:reg.x1] == (255, 0, 0)).all(axis=1).sum() > (reg.x1 - reg.x0) // 2
  np.testing.assert_array_equal(rgb[:64, W + 8:, 0], region.apply_region(frames[0], reg, (64, 96)))


# ------------------------------------------------------------------------------ real data

def _sample(path, k=32):
  n = readers.probe(path).num_frames
  keep = set(np.linspace(0, n - 1, min(k, n)).round().astype(int))
  return np.stack([f for i, f in readers.iter_frames(path) if i in keep])


@needs_data
@pytest.mark.parametrize("clip", ["covid/patient_12_L1.mp4", "covid_negative/patient_10_R1.mp4",
                                  "covid/patient_5_R3.mp4"])
def test_covid_blues_sector_with_added_side_text(tmp_path, clip):
  frames = _sample(os.path.join(DATA, "covid_blues", clip))
  padded = np.pad(frames, ((0, 0), (0, 0), (40, 40)))          # black margins for side text
  left, right = (slice(20, 300), slice(4, 34)), (slice(60, 200), slice(396, 426))
  _text(padded, left)
  _text(padded, right)
  reg = region.find_region(padded)
  assert reg.kind == "sector"
  assert reg.x0 >= 34 and reg.x1 <= 396                       # the side text is outside the box
  sector = padded.max(axis=0) > 10                            # every pixel the scan ever lit
  sector[left] = sector[right] = False
  mask = _in_frame(reg, sector.shape)
  assert (mask & sector).sum() >= 0.99 * sector.sum()
  assert not mask[left].any() and not mask[right].any()
  region.save_preview(padded[len(padded) // 2], reg, (128, 128),
                      tmp_path / f"{os.path.basename(clip)}.png")


@needs_data
def test_real_dicom_cine_excludes_its_burned_in_text():
  frames = np.stack([f for _, f in readers.iter_frames(os.path.join(
      DATA, "dicom", "examples_ybr_color.dcm"))])
  reg = region.find_region(frames)
  assert reg.kind == "sector"
  mask = _in_frame(reg, frames.shape[1:])
  span = frames.max(axis=0).astype(int) - frames.min(axis=0)
  overlay = (span == 0) & (frames[0] >= 40)         # static lit pixels: text, marks, menu bar
  moving = span >= 32                               # clearly moving anatomy
  assert overlay.sum() > 1000 and moving.sum() > 10000
  assert not mask[overlay].any()
  assert mask[moving].mean() >= 0.99


@needs_data
def test_real_dicom_cine_after_lossy_h264(tmp_path):
  """Screen recordings are lossy: codec noise makes text flicker. Re-encode the cine at a low
  quality (crf 35, an I-frame every 6 frames); text, marks and menu bar must stay out."""
  frames = np.stack([f for _, f in readers.iter_frames(os.path.join(
      DATA, "dicom", "examples_ybr_color.dcm"))])
  path = str(tmp_path / "cine.mp4")
  with av.open(path, "w") as c:
    s = c.add_stream("h264", rate=30, options={"crf": "35", "g": "6"})
    s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
    for f in frames:
      for packet in s.encode(av.VideoFrame.from_ndarray(np.repeat(f[..., None], 3, 2), "rgb24")):
        c.mux(packet)
    for packet in s.encode():
      c.mux(packet)
  lossy = np.stack([f for _, f in readers.iter_frames(path)])
  reg = region.find_region(lossy)
  mask = _in_frame(reg, frames.shape[1:])
  span = frames.max(axis=0).astype(int) - frames.min(axis=0)
  overlay = (span == 0) & (frames[0] >= 40)
  assert reg.kind == "sector"
  assert (mask & overlay).sum() <= 0.02 * overlay.sum()
  assert mask[span >= 32].mean() >= 0.99


@needs_data
def test_real_dicom_stills():
  """K = 1: the GE lymph-node image is a rectangle below its text header; the Philips palette
  image's visible fan lies below the blue banner and right of the left text column."""
  rgb = np.stack([f for _, f in readers.iter_frames(os.path.join(DATA, "dicom",
                                                                 "examples_rgb_color.dcm"))])
  reg = region.find_region(rgb)
  assert reg.kind == "rectangle" and reg.y0 >= 50 and reg.y1 <= 180   # text rows 0-50, 180+
  pal = np.stack([f for _, f in readers.iter_frames(os.path.join(DATA, "dicom",
                                                                 "examples_palette.dcm"))])
  reg = region.find_region(pal)
  assert reg.kind == "sector" and reg.y0 >= 60 and reg.x0 >= 300


@needs_data
def test_the_region_benchmark_times_a_real_clip(capsys):
  """The speed budget itself is benchmarks/bench_region.py's (RESULTS.md), not a test's: CPU
  time differs between machines."""
  from benchmarks import bench_region  # pylint: disable=g-import-not-at-top
  status = bench_region.main(["--repeats", "1", "--frames", "8"])
  out = json.loads(capsys.readouterr().out)
  assert out["frames"] == [8, 350, 350] and out["region"] == "sector", out
  over = [k for k, budget in out["budget_ms"].items() if out[k] > budget]
  assert all(out[k] > 0 for k in out["budget_ms"]) and out["over_budget"] == over
  assert status == (1 if over else 0)
