"""data_prep.synthetic: hand-built scenes with hand-computed rows/columns, geometry by hand,
invariants of rendered videos (fan, markers, histogram, pleura, B-lines, consolidations, masks,
boxes, frame labels), the written folder against the renders, determinism, the plan's balance
and coverage, bad input, and the folder going through data_prep.build."""
import csv
import glob
import json
import math
import os

import av
import numpy as np
import pytest
from scipy import ndimage

from data_prep import synthetic as syn

SEED = 3
ID = {name: i for i, name in enumerate(syn.MASK_CLASSES)}


def hand_patient(**kw):
  """A 100-row x 120-column polar grid, fan half-angle 30 deg, no ribs in reach."""
  base = dict(probe="C5-2", depth_cm=10, half_angle=math.radians(30), apex_radius=40.0, top=4.0,
              depth_px=100, lateral_px=120, pleura=0.25, speckle_sigma=(1.0, 1.0),
              attenuation=1.0, wall_level=0.6, lung_level=0.3, fascia=(), rib_spacing=1e6,
              rib_width=10.0, gamma=2.0, hi=200.0, lo=0.0)
  base.update(kw)
  return syn.Patient(**base)


def hand_scene(label="normal", frames=3, **kw):
  """Pleura at 0.25 of the depth, A-lines 1.0 decaying by 0.7, no motion, no ribs."""
  base = dict(label=label, pleura=0.25, sweep=np.zeros(frames), slide=np.zeros(frames),
              rib_phase=5e5, vessels=(), a_amp=1.0, a_decay=0.7, b_lines=(), z_lines=(),
              consolidation=(), gamma=2.0, hi=200.0, lo=0.0)
  base.update(kw)
  return syn.Scene(**base)


def render(scene, patient=None):
  return syn.render_polar(np.random.default_rng(0), patient or hand_patient(), scene)


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def decode(path):
  with av.open(path) as c:
    return np.stack([f.to_ndarray(format="gray") for f in c.decode(video=0)])


# ------------------------------------------------------------------------ polar scene by hand
# Rows: depth fraction (i + 0.5) / 100; lines count where |d - centre| < 1.5 * LINE_SIGMA = 0.021.
PLEURA_ROWS = [23, 24, 25, 26]                     # (i + 0.5) in (22.9, 27.1)
A_LINE_ROWS = [48, 49, 50, 51, 73, 74, 75, 76, 98, 99]  # 2p, 3p, 4p (amplitudes 1, .7, .49)


def test_hand_scene_pleura_and_a_line_rows():
  assert syn.LINE_SIGMA == 0.014  # the rows below are computed for this thickness
  _, labels, ids = render(hand_scene())
  expected = np.zeros(100, np.uint8)
  expected[PLEURA_ROWS] = ID["pleural_line"]
  expected[A_LINE_ROWS] = ID["a_line"]
  assert labels.shape == (3, 100, 120)
  assert (labels == expected[None, :, None]).all()
  assert not ids.any()


def test_hand_scene_weak_a_lines_are_not_labelled():
  # Amplitude 0.4 * 0.7**(n - 2) = 0.4, 0.28, ...: only n = 2 reaches A_LINE_VISIBLE = 0.3.
  _, labels, _ = render(hand_scene(a_amp=0.4))
  assert set(np.flatnonzero(labels[0, :, 0] == ID["a_line"])) == {48, 49, 50, 51}


def test_hand_scene_b_line_columns_labels_and_brightness():
  # B-line at column 60, sigma 2: core |x - 60| < 3 -> columns 58..62, rows with
  # d > p + 1.5 sigma = 0.271 -> rows 27.. (row 26 is d = 0.265).
  echo, labels, ids = render(hand_scene("b_lines", b_lines=((60.0, 2.0, 1.0),)))
  core = np.zeros((100, 120), bool)
  core[27:, 58:63] = True
  assert ((labels[0] == ID["b_line"]) == core).all()
  assert ((ids[0] == 1) == core).all() and ids.max() == 1
  assert (labels[0, PLEURA_ROWS, 58:63] == ID["pleural_line"]).all()
  assert (labels[0, 48:52, 50] == ID["a_line"]).all()          # A-lines beside it remain
  line = echo[:, 30:, 59:62].mean()
  beside = echo[:, 30:, 40:50].mean()
  assert line > 2 * beside


def test_hand_scene_consolidation_region_and_darkness():
  # Centre 60, half width 20, depth 0.3, shred sin(pi u): at column 60 the region spans
  # p + 0.5 sigma = 0.257 < d < 0.25 + 0.3 = 0.55 -> rows 26..54.
  shred = (np.ones(1), np.ones(1), np.zeros(1))
  scene = hand_scene("consolidation", consolidation=(60.0, 20.0, 0.3, shred, ()))
  echo, labels, ids = render(scene)
  column = labels[0, :, 60]
  assert set(np.flatnonzero(column == ID["consolidation"])) == set(range(26, 55))
  # Columns 41..79 are covered (|x - 60| < 20); at 41 the border is at d = 0.339 (row 33).
  assert labels[0, 30, 41] == ID["consolidation"] and labels[0, 30, 40] != ID["consolidation"]
  assert labels[0, 30, 79] == ID["consolidation"] and labels[0, 30, 80] != ID["consolidation"]
  # No A-lines under the consolidation (column 45: border at d = 0.406), A-lines beside it.
  assert (labels[0, 48:52, 45] == ID["background"]).all()
  assert (labels[0, 48:52, 10] == ID["a_line"]).all()
  assert ((ids[0] == 1) == (labels[0] == ID["consolidation"])).all()
  assert echo[:, 30:40, 50:70].mean() < 0.5 * echo[:, 30:40, 0:20].mean()


def test_hand_scene_sliding_moves_lung_not_wall():
  # Slide 2 columns per frame, no sweep: the lung texture at frame 1 is frame 0 moved 2 columns
  # left; the chest wall does not move.
  echo, _, _ = render(hand_scene(slide=np.array([0.0, 2.0, 4.0])))
  wall0, wall1 = echo[0, :15], echo[1, :15]
  assert np.allclose(wall0, wall1, rtol=1e-5)
  lung0, lung1 = echo[0, 35:45], echo[1, 35:45]
  moved = np.corrcoef(lung1[:, :-2].ravel(), lung0[:, 2:].ravel())[0, 1]
  still = np.corrcoef(lung1.ravel(), lung0.ravel())[0, 1]
  assert moved > 0.98 and still < 0.8


def test_hand_scene_rib_hides_everything_below_its_surface():
  # Rib centred at column 60, 20 wide: surface at p - 0.02 - 0.02 (1 - (dist / 10)**2).
  scene = hand_scene("b_lines", rib_phase=60.0, b_lines=((60.0, 2.0, 1.0), (100.0, 2.0, 1.0)))
  echo, labels, ids = render(scene, hand_patient(rib_spacing=1000.0, rib_width=20.0))
  assert (labels[0, 40:, 51:70] == ID["rib_shadow"]).all()
  assert (labels[0, 40:, 70:] != ID["rib_shadow"]).all()
  assert (labels[0, 40:, :51] != ID["rib_shadow"]).all()
  assert not (ids[0] == 1).any() and (ids[0] == 2).any()        # the first B-line is hidden
  assert echo[:, 40:, 55:65].mean() < 0.4 * echo[:, 40:, 10:40].mean()


def test_consolidation_scene_has_no_sliding_and_nuisances_do_not_depend_on_class():
  patient = syn.sample_patient(np.random.default_rng(7), 128)
  scenes = {c: syn.sample_scene(np.random.default_rng(11), patient, c, 8) for c in syn.CLASSES}
  for c in syn.CLASSES:
    s, n = scenes[c], scenes["normal"]
    assert (s.gamma, s.hi, s.lo, s.pleura, s.rib_phase) == (n.gamma, n.hi, n.lo, n.pleura,
                                                             n.rib_phase)
    assert (s.vessels, s.z_lines, s.a_amp, s.a_decay) == (n.vessels, n.z_lines, n.a_amp,
                                                          n.a_decay)
    assert np.array_equal(s.sweep, n.sweep)
  assert np.array_equal(scenes["b_lines"].slide, scenes["normal"].slide)
  assert np.abs(scenes["normal"].slide).max() > 0
  assert not scenes["consolidation"].slide.any()
  assert 2 <= len(scenes["b_lines"].b_lines) <= 4 and not scenes["normal"].b_lines
  assert scenes["consolidation"].consolidation and not scenes["b_lines"].consolidation


def test_sample_scene_rejects_unknown_class():
  patient = syn.sample_patient(np.random.default_rng(0), 64)
  with pytest.raises(ValueError, match="unknown class 'pneumothorax'"):
    syn.sample_scene(np.random.default_rng(0), patient, "pneumothorax", 4)


# ------------------------------------------------------------------------ small pieces by hand

def test_fan_geometry_by_hand():
  # Apex at (4 - 40, 64) = (-36, 64); pixel centres at +0.5.
  fan, index = syn.fan_geometry(hand_patient(), 128)
  # (53, 64): r = 89.501 -> row 49; angle 0.00559 rad -> column floor(60.64) = 60.
  assert fan[53, 64] and index[53, 64] == 49 * 120 + 60
  # (90, 20): r = 133.77 -> row 93; angle -0.3312 rad -> column floor(22.07) = 22.
  assert fan[90, 20] and index[90, 20] == 93 * 120 + 22
  assert not fan[3, 64]      # r = 39.50 < the skin line at 40
  assert not fan[100, 0]     # r = 150.5: deeper than 40 + 100
  assert not fan[60, 5]      # angle -0.545 rad: outside +-30 deg


def test_scan_convert_places_polar_values():
  patient = hand_patient()
  fan, index = syn.fan_geometry(patient, 128)
  polar = np.arange(100 * 120, dtype=np.float32).reshape(1, 100, 120)
  image = syn.scan_convert(polar, fan, index)
  assert image[0, 53, 64] == 49 * 120 + 60 and image[0, 90, 20] == 93 * 120 + 22
  assert not image[0][~fan].any()


def test_match_histogram_by_hand():
  # n = 3, quantiles (i + 0.5) / 3: gamma 1, 0..120 -> 20, 60, 100, given in rank order.
  out = syn.match_histogram(np.array([[3.0, 1.0, 2.0]]), gamma=1.0, hi=120.0, lo=0.0)
  assert np.allclose(out, [[100.0, 20.0, 60.0]])
  # gamma 2, 10..100 -> 10 + 90 * (1/36, 1/4, 25/36) = 12.5, 32.5, 72.5.
  out = syn.match_histogram(np.array([[1.0, 5.0, 3.0], [9.0, 8.0, 7.0]]), 2.0, 100.0, 10.0)
  assert np.allclose(out, [[12.5, 72.5, 32.5], [72.5, 32.5, 12.5]])


def test_frame_anatomy_by_hand():
  # 20 columns: the centre band |j + 0.5 - 10| < 1 is columns 9 and 10.
  labels = np.zeros((6, 10, 20), np.uint8)
  labels[0, :, 9:11] = ID["rib_shadow"]                    # band covered -> rib_shadow
  labels[1, :, 9] = ID["rib_shadow"]                       # half covered -> unlabeled
  labels[2, 5, 10] = ID["b_line"]
  labels[2, 6, 2] = ID["consolidation"]                    # outside the band: ignored
  labels[3, 6, 9] = ID["a_line"]
  labels[5, 4, 9], labels[5, 5, 10] = ID["b_line"], ID["consolidation"]
  assert syn.frame_anatomy(labels) == (
      (0, "rib_shadow", "rib_shadow"), (2, "pleura", "b_lines"), (3, "pleura", "a_lines"),
      (4, "pleura", "pleura_only"), (5, "pleura", "consolidation"))


def test_instance_boxes_by_hand():
  ids = np.zeros((2, 6, 8), np.uint8)
  ids[0, 1:3, 2:5] = 1
  ids[1, 4, 7] = 2
  ids[1, 0, 0] = 1
  assert syn.instance_boxes(ids, ("b_line", "consolidation")) == (
      (0, "b_line", 1, 2, 3, 5), (1, "b_line", 0, 0, 1, 1), (1, "consolidation", 4, 7, 5, 8))


def test_markers_stay_outside_the_fan():
  fan, _ = syn.fan_geometry(hand_patient(), 128)
  markers = syn.burned_in_markers(128, fan, "C5-2\n10cm", "T1 L\nv00")
  near_fan = ndimage.binary_dilation(fan)
  assert markers[:20, :40].any() and markers[:20, -40:].any()   # text in both top corners
  assert markers[:, -3:].any()                                   # depth ticks at the right
  assert not markers[near_fan].any()


# ------------------------------------------------------------------------ rendered videos

@pytest.fixture(scope="module")
def videos():
  """One 128x128, 8-frame video per class (one patient each)."""
  specs = syn.plan_videos(3, 1, SEED)
  assert sorted(sp.label for sp in specs) == sorted(syn.CLASSES)
  return {sp.label: syn.make_video(SEED, sp, 8, 128) for sp in specs}


def test_pixels_outside_the_fan_are_black_except_markers(videos):
  for v in videos.values():
    assert v.frames.shape == (8, 128, 128) and v.frames.dtype == np.uint8
    assert v.markers.any() and not (v.markers & v.fan).any()
    assert not v.frames[:, ~v.fan & ~v.markers].any()
    assert (v.frames[:, v.markers] > 0).all()
    assert not v.masks[:, ~v.fan].any()


def test_fan_histogram_is_the_scene_target_in_every_frame(videos):
  for v in videos.values():
    s = v.scene
    n = int(v.fan.sum())
    target = np.round(s.lo + (s.hi - s.lo) * ((np.arange(n) + 0.5) / n) ** s.gamma)
    for frame in v.frames:
      assert np.array_equal(np.sort(frame[v.fan]), target)


def test_frames_change_over_the_video(videos):
  for v in videos.values():
    assert np.mean(v.frames[0] != v.frames[-1]) > 0.2


def pleura_columns(v, f):
  """Columns whose pleural-line pixels have 3..5 rows of chest wall right above them."""
  out = []
  for x in range(v.frames.shape[2]):
    rows = np.flatnonzero(v.masks[f, :, x] == ID["pleural_line"])
    if rows.size and rows[0] >= 8 and not v.masks[f, rows[0] - 5:rows[0], x].any():
      out.append((x, rows))
  return out


def test_pleural_line_is_brighter_than_the_rows_above(videos):
  for v in videos.values():
    line, above = [], []
    for f in range(len(v.frames)):
      for x, rows in pleura_columns(v, f):
        line.append(v.frames[f, rows, x].mean())
        above.append(v.frames[f, rows[0] - 5:rows[0] - 2, x].mean())
    assert len(line) > 100
    assert np.mean(line) > 1.3 * np.mean(above)


def test_a_lines_lie_at_twice_the_pleural_depth(videos):
  x = 64                                             # the centre column of the fan
  checked = 0
  for v in videos.values():
    skin = np.flatnonzero(v.fan[:, x])[0]
    for col in v.masks[:, :, x]:
      pleura = np.flatnonzero(col == ID["pleural_line"])
      a_line = np.flatnonzero(col == ID["a_line"])
      if pleura.size and a_line.size:
        first = a_line[a_line - skin < 2.5 * (pleura.mean() - skin)]
        assert abs((first.mean() - skin) - 2 * (pleura.mean() - skin)) <= 2.0
        checked += 1
  assert checked > 0


def test_b_lines_are_brighter_than_their_neighbours(videos):
  v = videos["b_lines"]
  line, beside = [], []
  for f, frame in enumerate(v.frames):
    lung = (v.masks[f] == ID["background"]) | (v.masks[f] == ID["a_line"])
    for y in range(v.frames.shape[1]):
      xs = np.flatnonzero(v.masks[f, y] == ID["b_line"])
      if xs.size:
        line.append(frame[y, xs].mean())
        near = [x for x in range(xs[0] - 12, xs[-1] + 13) if 0 <= x < 128 and lung[y, x]]
        beside.append(frame[y, near].mean())
  assert len(line) > 100
  assert np.mean(line) > 1.5 * np.mean(beside)


def test_consolidation_is_darker_than_the_aerated_lung(videos):
  v = videos["consolidation"]
  inside, lung = [], []
  for f, frame in enumerate(v.frames):
    rows = np.flatnonzero((v.masks[f] == ID["consolidation"]).any(axis=1))
    band = v.masks[f, rows]
    inside.append(frame[rows][band == ID["consolidation"]])
    lung.append(frame[rows][(band == ID["background"]) & v.fan[rows]])
  assert np.concatenate(inside).mean() < 0.6 * np.concatenate(lung).mean()


def test_boxes_bound_the_pathology_masks(videos):
  assert not videos["normal"].boxes
  assert {b[1] for b in videos["b_lines"].boxes} == {"b_line"}
  assert {b[1] for b in videos["consolidation"].boxes} == {"consolidation"}
  for v in videos.values():
    for name in ("b_line", "consolidation"):
      for f in range(len(v.frames)):
        mask = v.masks[f] == ID[name]
        covered = np.zeros_like(mask)
        for frame, cls, y0, x0, y1, x1 in v.boxes:
          if frame == f and cls == name:
            sub = mask[y0:y1, x0:x1]
            assert sub[0].any() and sub[-1].any() and sub[:, 0].any() and sub[:, -1].any()
            covered[y0:y1, x0:x1] = True
        assert not (mask & ~covered).any()


def test_frame_labels_agree_with_the_masks(videos):
  fine_seen = set()
  for label, v in videos.items():
    x = 64
    bottom = np.flatnonzero(v.fan[:, x])[-1]
    assert v.frame_labels and all(0 <= f < 8 for f, _, _ in v.frame_labels)
    for f, coarse, fine in v.frame_labels:
      assert coarse in syn.ANATOMY_COARSE and fine in syn.ANATOMY_FINE
      if coarse == "rib_shadow":
        assert fine == "rib_shadow" and v.masks[f, bottom, x] == ID["rib_shadow"]
      else:
        assert not (v.masks[f, :, x] == ID["rib_shadow"]).any()
      fine_seen.add((label, fine))
  assert all(lab == "consolidation" for lab, fine in fine_seen if fine == "consolidation")
  assert all(lab == "b_lines" for lab, fine in fine_seen if fine == "b_lines")


# ------------------------------------------------------------------------ the plan

def test_plan_by_hand():
  specs = syn.plan_videos(3, 3, SEED)
  assert [(s.patient_id, s.exam, s.side) for s in specs] == [
      (f"patient{p:03d}", e, side) for p, side in ((0, "left"), (1, "right"), (2, "left"))
      for e in ("T1", "T2", "T3")]
  assert len({s.video_id for s in specs}) == 9
  assert all(s.path == f"{s.label}/{s.video_id}.mp4" for s in specs)


def test_plan_classes_balanced_over_patients():
  for n in (3, 10, 31):
    specs = syn.plan_videos(n, 2, SEED)
    per_patient = {}
    for s in specs:
      per_patient.setdefault(s.patient_id, set()).add(s.label)
    assert all(len(v) == 1 for v in per_patient.values())       # a patient has one class
    counts = [sum(v == {c} for v in per_patient.values()) for c in syn.CLASSES]
    assert max(counts) - min(counts) <= 1 and sum(counts) == n


def test_plan_covers_exams_and_sides():
  combos = {(e, s) for e in syn.EXAMS for s in syn.SIDES}
  by_patient = {}
  for s in syn.plan_videos(4, 6, SEED):
    by_patient.setdefault(s.patient_id, set()).add((s.exam, s.side))
  assert all(v == combos for v in by_patient.values())
  assert {(s.exam, s.side) for s in syn.plan_videos(2, 3, SEED)} == combos


# ------------------------------------------------------------------------ the written folder

P, V, F, S = 3, 2, 5, 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic"))
  manifest = syn.generate(out, num_patients=P, videos_per_patient=V, frames=F, size=S, seed=SEED)
  assert manifest == os.path.join(out, "manifest.csv")
  return out


def test_manifest_and_files(folder):
  rows = read_csv(os.path.join(folder, "manifest.csv"))
  with open(os.path.join(folder, "manifest.csv")) as f:
    assert next(csv.reader(f)) == list(syn.MANIFEST_COLUMNS)
  assert len(rows) == P * V and len({r["video_id"] for r in rows}) == P * V
  assert len({r["patient_id"] for r in rows}) == P
  for r in rows:
    assert r["path"] == f"{r['label']}/{r['video_id']}.mp4"
    assert r["probe"] in syn.PROBES and int(r["depth_cm"]) in syn.DEPTHS_CM
  mp4s = glob.glob(os.path.join(folder, "*", "*.mp4"))
  assert sorted(os.path.relpath(p, folder) for p in mp4s) == sorted(r["path"] for r in rows)
  assert not glob.glob(os.path.join(folder, "**", ".*"), recursive=True)   # no temp files left


def test_videos_decode_to_the_rendered_frames(folder):
  for r in read_csv(os.path.join(folder, "manifest.csv")):
    frames = decode(os.path.join(folder, r["path"]))
    assert frames.shape == (F, S, S)
    spec = next(s for s in syn.plan_videos(P, V, SEED) if s.video_id == r["video_id"])
    video = syn.make_video(SEED, spec, F, S)
    assert np.abs(frames.astype(int) - video.frames).mean() < 2.0
    with np.load(os.path.join(folder, "masks", f"{r['video_id']}.npz")) as z:
      assert z["masks"].dtype == np.uint8 and np.array_equal(z["masks"], video.masks)
      assert tuple(z["class_names"].tolist()) == syn.MASK_CLASSES


def test_frame_labels_and_boxes_files(folder):
  specs = syn.plan_videos(P, V, SEED)
  expected_labels, expected_boxes = [], []
  for spec in specs:
    video = syn.make_video(SEED, spec, F, S)
    expected_labels += [[spec.video_id, str(f), c, fine] for f, c, fine in video.frame_labels]
    expected_boxes += [[spec.video_id] + [str(x) for x in b] for b in video.boxes]
  with open(os.path.join(folder, "frame_labels.csv")) as f:
    rows = list(csv.reader(f))
  assert rows[0] == list(syn.FRAME_LABEL_COLUMNS) and rows[1:] == expected_labels
  assert len(rows) > 1
  with open(os.path.join(folder, "boxes.csv")) as f:
    rows = list(csv.reader(f))
  assert rows[0] == list(syn.BOX_COLUMNS) and rows[1:] == expected_boxes
  for _, _, _, y0, x0, y1, x1 in rows[1:]:
    assert 0 <= int(y0) < int(y1) <= S and 0 <= int(x0) < int(x1) <= S


def test_same_seed_same_bytes_other_seed_other_frames(folder, tmp_path):
  again = str(tmp_path / "again")
  syn.generate(again, num_patients=P, videos_per_patient=V, frames=F, size=S, seed=SEED)
  for name in ("manifest.csv", "frame_labels.csv", "boxes.csv"):
    with open(os.path.join(folder, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
      assert a.read() == b.read()
  for r in read_csv(os.path.join(folder, "manifest.csv")):
    with open(os.path.join(folder, r["path"]), "rb") as a:
      with open(os.path.join(again, r["path"]), "rb") as b:
        assert a.read() == b.read()
  spec = syn.plan_videos(P, V, SEED)[0]
  other = syn.make_video(SEED + 1, spec, F, S)
  assert not np.array_equal(other.frames, syn.make_video(SEED, spec, F, S).frames)


@pytest.mark.parametrize("kwargs, match", [
    (dict(size=63), "size must be an even integer"),
    (dict(size=16), "size must be an even integer >= 32"),
    (dict(frames=0), "frames must be a positive integer"),
    (dict(num_patients=0), "num_patients must be a positive integer"),
    (dict(videos_per_patient=1.5), "videos_per_patient must be a positive integer"),
    (dict(fps=0), "fps must be a positive integer"),
    (dict(seed=-1), "seed must be a non-negative integer"),
])
def test_bad_arguments(tmp_path, kwargs, match):
  args = dict(num_patients=1, videos_per_patient=1, frames=2, size=32)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    syn.generate(str(tmp_path / "out"), **args)
  assert not os.path.exists(tmp_path / "out")


def test_cli(tmp_path, capsys):
  out = str(tmp_path / "cli")
  assert syn.main(["--output", out, "--num_patients", "1", "--videos_per_patient", "1",
                   "--frames", "2", "--size", "32", "--seed", "1"]) == 0
  assert capsys.readouterr().out.strip() == os.path.join(out, "manifest.csv")
  assert len(read_csv(os.path.join(out, "manifest.csv"))) == 1
  with pytest.raises(SystemExit) as e:
    syn.main(["--output", out, "--size", "33"])
  assert e.value.code == 2
  assert "size must be an even integer" in capsys.readouterr().err


# ------------------------------------------------------------------------ through data_prep

def test_folder_goes_through_data_prep_build(folder, tmp_path):
  import tensorflow as tf
  from data_prep import build, schema
  report = build(os.path.join(folder, "manifest.csv"), str(tmp_path / "ds"), name="syn",
                 size=(32, 32), frame_labels=os.path.join(folder, "frame_labels.csv"),
                 splits="train=0.5,test=0.5", num_workers=0, progress=False)
  c = report["counts"]
  assert (c["inputs"], c["written"], c["rejected"]) == (P * V, P * V, 0)
  assert c["records"] == c["frames"] == P * V * F
  assert {f["video_id"] for f in report["files"]} == {
      r["video_id"] for r in read_csv(os.path.join(folder, "manifest.csv"))}
  assert all(f["status"] == "written" and f["records"] == F for f in report["files"])
  assert not report["dropped_columns"]
  with open(os.path.join(report["dataset_dir"], "metadata.json")) as f:
    meta = json.load(f)
  assert meta["label_names"] == sorted(syn.CLASSES)
  labelled = read_csv(os.path.join(folder, "frame_labels.csv"))
  fine_of = {(r["video_id"], int(r["frame_index"])): r["anatomy_fine"] for r in labelled}
  assert meta["anatomy_fine_names"] == sorted(set(fine_of.values()))
  spec = {k: tf.io.FixedLenFeature([], tf.string) for k in ("video_id", "metadata", "label_name")}
  spec["frame_indices"] = tf.io.VarLenFeature(tf.int64)
  spec["anatomy_fine"] = tf.io.VarLenFeature(tf.int64)
  seen = set()
  for path in glob.glob(os.path.join(report["dataset_dir"], "syn-*.tfrecord-*")):
    for raw in tf.data.TFRecordDataset(path):
      ex = tf.io.parse_single_example(raw, spec)
      vid = ex["video_id"].numpy().decode()
      idx = int(tf.sparse.to_dense(ex["frame_indices"]).numpy()[0])
      fine = int(tf.sparse.to_dense(ex["anatomy_fine"]).numpy()[0])
      want = fine_of.get((vid, idx))
      assert fine == (schema.NO_LABEL if want is None else meta["anatomy_fine_names"].index(want))
      assert set(json.loads(ex["metadata"].numpy())) == {"probe", "depth_cm"}
      seen.add((vid, idx))
  assert len(seen) == P * V * F
