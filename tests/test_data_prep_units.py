"""data_prep building blocks: sampling plans, patient splits, inputs, record files, options."""
import collections
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_prep import config as config_lib
from data_prep import files
from data_prep import manifest
from data_prep import sampling
from data_prep import splits
from data_prep import writer


# ---------------------------------------------------------------------------------- sampling

def _plan(n, src_fps=25.0, **kw):
  return [g.indices for g in sampling.plan(sampling.Sampling(**kw), n, src_fps)]


def test_fps_mode_takes_the_frame_showing_at_each_time():
  # 25 fps -> 3 fps: t = k/3 s shows frame floor(25 k / 3): 0, 8.33, 16.67, 25, ...
  assert [i for (i,) in _plan(100, mode="fps", fps=3)] == [
      0, 8, 16, 25, 33, 41, 50, 58, 66, 75, 83, 91]
  # 29.97 -> 10 fps: floor(2.997 k) for k = 0..10 (k = 11 gives 32.97 > 29)
  assert [i for (i,) in _plan(30, 29.97, mode="fps", fps=10)] == [
      0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29]
  # exact multiples must not be lost to float error: 25 / 5 = 5 frames apart
  assert [i for (i,) in _plan(12, mode="fps", fps=5)] == [0, 5, 10]


def test_fps_mode_at_or_above_the_source_rate_keeps_every_frame_once():
  assert [i for (i,) in _plan(7, 25.0, mode="fps", fps=30)] == list(range(7))
  assert [i for (i,) in _plan(7, 25.0, mode="fps", fps=25)] == list(range(7))


def test_fps_mode_needs_a_frame_rate_except_for_a_still():
  assert _plan(1, 0.0, mode="fps", fps=3) == [(0,)]
  with pytest.raises(sampling.SamplingError) as e:
    _plan(5, 0.0, mode="fps", fps=3)
  assert e.value.reason == "unknown_fps"


def test_every_and_all_modes():
  assert _plan(20, mode="every", every=8) == [(0,), (8,), (16,)]
  assert _plan(3, mode="all") == [(0,), (1,), (2,)]
  with pytest.raises(sampling.SamplingError) as e:
    _plan(0, mode="all")
  assert e.value.reason == "zero_frames"


def test_clip_mode_spans_hops_and_drops_the_tail():
  s = sampling.Sampling(mode="clip", clip_len=4, clip_stride=2)
  assert s.span == 7 and s.record_len == 4
  # span 7, hop 7: clips at 0 and 7 (14 + 7 > 20)
  assert _plan(20, mode="clip", clip_len=4, clip_stride=2) == [(0, 2, 4, 6), (7, 9, 11, 13)]
  # hop 3: starts 0, 3, 6, 9, 12 (15 + 7 > 20)
  assert [g[0] for g in _plan(20, mode="clip", clip_len=4, clip_stride=2, clip_hop=3)] == [
      0, 3, 6, 9, 12]
  assert all(g.padded == 0 for g in sampling.plan(s, 20, 25.0))


def test_short_videos_are_looped_padded_or_rejected_and_flagged():
  kw = dict(mode="clip", clip_len=4, clip_stride=2)
  # offsets 0, 2, 4, 6 in a 5-frame video: 6 is past the end
  (loop,) = sampling.plan(sampling.Sampling(short_clips="loop", **kw), 5, 25.0)
  assert loop == sampling.Group((0, 2, 4, 1), padded=1)
  (pad,) = sampling.plan(sampling.Sampling(short_clips="pad", **kw), 5, 25.0)
  assert pad == sampling.Group((0, 2, 4, 4), padded=1)
  (still,) = sampling.plan(sampling.Sampling(mode="clip", clip_len=3), 1, 0.0)
  assert still == sampling.Group((0, 0, 0), padded=2)
  with pytest.raises(sampling.SamplingError) as e:
    sampling.plan(sampling.Sampling(short_clips="reject", **kw), 5, 25.0)
  assert e.value.reason == "too_short"


def test_sampling_rejects_bad_parameters():
  for kw in (dict(mode="fps", fps=0), dict(mode="every", every=0), dict(mode="clip"),
             dict(mode="clip", clip_len=2, clip_stride=0), dict(mode="bogus"),
             dict(mode="clip", clip_len=2, short_clips="wrap")):
    with pytest.raises(ValueError):
      sampling.Sampling(**kw)


# ------------------------------------------------------------------------------------ splits

def test_parse_fractions():
  assert splits.parse_fractions("train=0.8, val=0.1,test=0.1") == {
      "train": 0.8, "val": 0.1, "test": 0.1}
  for bad in ("train=0.8,val=0.1", "train=1,train=0", "tr-ain=1", "train", "train=x",
              "train=1.0,val=0"):
    with pytest.raises(ValueError, match="--splits"):
      splits.parse_fractions(bad)


def test_split_sizes_round_by_largest_remainder_and_keep_every_split():
  assert splits.apportion(10, [0.8, 0.1, 0.1]) == [8, 1, 1]
  assert splits.apportion(3, [0.8, 0.1, 0.1]) == [3, 0, 0]  # 2.4, 0.3, 0.3
  assert splits.split_sizes(3, [0.8, 0.1, 0.1]) == [1, 1, 1]
  assert splits.split_sizes(2, [0.8, 0.1, 0.1]) == [2, 0, 0]  # fewer patients than splits
  assert splits.split_sizes(63, [0.8, 0.1, 0.1]) == [51, 6, 6]  # 50.4, 6.3, 6.3


def test_stratum_counts_match_rows_and_columns():
  # ideal rows (3, 1.8, 1.2) and (2, 1.2, 0.8); the 0.8 remainders get the leftover units
  assert splits.stratum_counts([6, 4], [5, 3, 2]) == [[3, 2, 1], [2, 1, 1]]
  rng = np.random.default_rng(0)
  for _ in range(200):
    sizes = [int(x) for x in rng.integers(0, 9, 4)]
    totals = splits.split_sizes(sum(sizes), [0.7, 0.2, 0.1])
    cells = splits.stratum_counts(sizes, totals)
    assert [sum(r) for r in cells] == sizes
    assert [sum(c) for c in zip(*cells)] == totals


def test_patient_strata_take_the_most_common_label():
  videos = [("p1", "a"), ("p1", "b"), ("p1", "a"), ("p2", ""), ("p3", "b"), ("p3", ""),
            ("p4", "b"), ("p4", "a")]
  assert splits.patient_strata(videos) == {"p1": "a", "p2": "", "p3": "b", "p4": "a"}


def test_assign_splits_is_patient_level_stratified_and_seeded():
  strata = {f"p{i:02d}": ("covid" if i < 30 else "negative") for i in range(40)}
  frac = {"train": 0.8, "val": 0.1, "test": 0.1}
  a = splits.assign_splits(strata, frac, seed=0)
  assert set(a) == set(strata)
  assert collections.Counter(a.values()) == {"train": 32, "val": 4, "test": 4}
  per = collections.Counter((strata[p], s) for p, s in a.items())
  assert per == {("covid", "train"): 24, ("covid", "val"): 3, ("covid", "test"): 3,
                 ("negative", "train"): 8, ("negative", "val"): 1, ("negative", "test"): 1}
  assert splits.assign_splits(strata, frac, seed=0) == a
  assert splits.assign_splits(dict(reversed(strata.items())), frac, seed=0) == a
  assert splits.assign_splits(strata, frac, seed=1) != a


def test_check_patient_disjoint_names_both_places():
  splits.check_patient_disjoint([("p1", "train", "x"), ("p1", "train", "y"), ("p2", "val", "z")])
  with pytest.raises(ValueError, match="line 2.*line 9"):
    splits.check_patient_disjoint([("p1", "train", "line 2"), ("p1", "test", "line 9")])


# ------------------------------------------------------------------------------------ inputs

def _touch(path, data=b"x"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def _png(value=0):
  buf = io.BytesIO()
  Image.fromarray(np.full((4, 4), value, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _supported(path):
  from data_prep import readers
  return readers.is_supported(path)


def test_folder_input_labels_patients_frames_dirs_and_ignored(tmp_path):
  root = str(tmp_path)
  _touch(f"{root}/covid/patient_1_L1.mp4")
  _touch(f"{root}/negative/site b/patient_2_R2 (1).MP4")
  _touch(f"{root}/negative/clip7/frame_001.png", _png())
  _touch(f"{root}/negative/clip7/frame_002.png", _png())
  _touch(f"{root}/top.mp4")
  _touch(f"{root}/README.txt")
  rx = manifest.compile_patient_regex(r"patient_(?P<patient>\d+)_(?P<side>[LR])")
  inp = manifest.folder_inputs(root, _supported, rx, "top")
  by_src = {e.source: e for e in inp.entries}
  assert sorted(by_src) == ["covid/patient_1_L1.mp4", "negative/clip7",
                            "negative/site b/patient_2_R2 (1).MP4", "top.mp4"]
  e = by_src["negative/site b/patient_2_R2 (1).MP4"]
  assert (e.label, e.patient_id, e.side, e.video_id) == ("negative", "2", "R", e.source)
  assert e.path == os.path.join(root, "negative", "site b", "patient_2_R2 (1).MP4")
  assert by_src["covid/patient_1_L1.mp4"].label == "covid"
  assert by_src["top.mp4"].label == "" and by_src["top.mp4"].reject == "no_patient"
  assert by_src["negative/clip7"].reject == "no_patient"
  assert inp.ignored == [{"source": "README.txt", "reason": "unsupported file type"}]
  parent = manifest.folder_inputs(root, _supported, None, "parent")
  assert {e.source: e.label for e in parent.entries}[
      "negative/site b/patient_2_R2 (1).MP4"] == "site b"
  assert all(not e.reject for e in parent.entries)


def test_patient_regex_needs_a_group():
  with pytest.raises(ValueError, match="patient_regex"):
    manifest.compile_patient_regex(r"patient_\d+")
  with pytest.raises(ValueError, match="patient_regex"):
    manifest.compile_patient_regex(r"patient_(")
  assert manifest.regex_fields(manifest.compile_patient_regex(r"p(\d+)"), "a/p12.mp4") == {
      "patient": "12", "exam": "", "side": ""}


def _write_csv(path, text):
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return str(path)


def test_manifest_columns_alias_metadata_and_identifier_columns(tmp_path):
  root = str(tmp_path)
  _touch(f"{root}/v/a.mp4")
  _touch(f"{root}/v/b.mp4")
  _touch(f"{root}/v/notes.txt")
  csv_path = _write_csv(tmp_path / "m.csv", (
      "file,patient_id,label,exam,dataset,split_group,PatientName,Birth Date,notes\n"
      "v/a.mp4,P1,covid,T1,blues,P1,Doe^John,1970-01-01,first\n"
      "v/b.mp4,P2,,T2,blues,P2,Roe^Jane,1980-02-02,\n"
      "v/missing.mp4,P3,covid,,blues,P3,X,1990,\n"
      "v/notes.txt,P4,covid,,blues,P4,Y,1991,\n"))
  inp = manifest.manifest_inputs(csv_path, root, _supported, None, "none")
  assert inp.dropped_columns == {"split_group": "values repeat 'patient_id'",
                                 "PatientName": "name looks like a personal identifier",
                                 "Birth Date": "name looks like a personal identifier"}
  a, b, missing, txt = inp.entries
  assert (a.video_id, a.patient_id, a.label, a.exam, a.source) == (
      "v/a.mp4", "P1", "covid", "T1", "v/a.mp4")
  assert a.metadata == (("dataset", "blues"), ("notes", "first"))
  assert a.where == "m.csv line 2" and b.label == "" and not a.reject and not b.reject
  assert missing.reject == "missing_file" and "line 4" in missing.reject_message
  assert txt.reject == "unsupported"
  dropped = manifest.manifest_inputs(csv_path, root, _supported, None, "none",
                                     drop_columns=["notes"])
  assert dropped.entries[0].metadata == (("dataset", "blues"),)
  with pytest.raises(ValueError, match="--drop_columns"):
    manifest.manifest_inputs(csv_path, root, _supported, None, "none", drop_columns=["nope"])


def test_manifest_errors_name_the_file_and_line(tmp_path):
  root = str(tmp_path)
  _touch(f"{root}/a.mp4")
  _touch(f"{root}/b.mp4")
  cases = {
      "video,label\na.mp4,x\n": "no 'file' column",
      "path,label\n,x\n": "line 2: empty 'path'",
      "path,split\na.mp4,train\nb.mp4,\n": "split column is empty in 1 rows",
      "path,split\na.mp4,tr-ain\n": "line 2: split name 'tr-ain'",
      "path,label\na.mp4,x,y\n": "line 2: more cells than columns",
  }
  for text, message in cases.items():
    path = _write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(ValueError, match=message):
      manifest.manifest_inputs(path, root, _supported, None, "none")


def test_finalize_checks_ids_and_manifest_splits(tmp_path):
  root = str(tmp_path)
  for n in ("a", "b", "c"):
    _touch(f"{root}/{n}.mp4")
  ok = manifest.manifest_inputs(_write_csv(tmp_path / "m.csv", "path,patient_id\na.mp4,P1\n"
                                           "b.mp4,\n"), root, _supported, None, "none")
  manifest.finalize_entries(ok)
  assert [e.patient_id for e in ok.entries] == ["P1", "b.mp4"]
  assert "1 videos have no patient id" in ok.warnings[0]
  dup = manifest.manifest_inputs(_write_csv(tmp_path / "d.csv", "path,video_id\na.mp4,x\n"
                                            "b.mp4,x\n"), root, _supported, None, "none")
  with pytest.raises(ValueError, match="video_id 'x' is used twice: d.csv line 2 and d.csv "
                     "line 3"):
    manifest.finalize_entries(dup)
  leak = manifest.manifest_inputs(_write_csv(tmp_path / "s.csv", "path,patient_id,split\n"
                                             "a.mp4,P1,train\nb.mp4,P2,val\nc.mp4,P1,test\n"),
                                  root, _supported, None, "none")
  with pytest.raises(ValueError, match="patient 'P1' is in two splits"):
    manifest.finalize_entries(leak)


def test_frame_labels_vocabularies_and_lookup(tmp_path):
  path = _write_csv(tmp_path / "fl.csv", (
      "video_id,frame_index,anatomy_coarse,anatomy_fine\n"
      "v1,4,pleura,b_lines\nv1,0,rib,\nv2,1,pleura,a_lines\n"))
  fl = manifest.read_frame_labels(path)
  assert fl.coarse_names == ("pleura", "rib") and fl.fine_names == ("a_lines", "b_lines")
  # v1: frame 0 rib / none, frame 4 pleura / b_lines; frames 1 and 7 unlabelled
  assert manifest.label_ids(fl.of_video("v1"), [0, 1, 4, 7]) == ([1, -1, 0, -1],
                                                                 [-1, -1, 1, -1])
  assert manifest.label_ids(fl.of_video("nope"), [0, 1]) == ([-1, -1], [-1, -1])
  entries = [manifest.Entry(path="x", source="x", video_id="v1", patient_id="p")]
  with pytest.raises(ValueError, match="1 video_id"):
    manifest.check_frame_labels(fl, entries)
  for text, message in (("video_id,frame_index,anatomy_coarse\nv1,x,a\n", "not an integer"),
                        ("video_id,frame_index,anatomy_coarse\nv1,1,a\nv1,1,b\n",
                         "labelled twice"),
                        ("video_id,frame_index\nv1,1\n", "anatomy_coarse")):
    with pytest.raises(ValueError, match=message):
      manifest.read_frame_labels(_write_csv(tmp_path / "bad.csv", text))


def test_patient_hash_is_salted_and_hides_the_id():
  h = manifest.hash_patient("blues_p10", b"salt-a")
  assert len(h) == 16 and int(h, 16) >= 0 and "p10" not in h
  assert h == manifest.hash_patient("blues_p10", b"salt-a")
  assert h != manifest.hash_patient("blues_p10", b"salt-b")
  assert h != manifest.hash_patient("blues_p11", b"salt-a")


def test_uid_shaped_names_are_replaced_by_a_salted_hash():
  uid = "1.2.840.113619.2.55.3.604688119"
  h = manifest.hash_patient(uid, b"k")
  assert manifest.redact_uids(f"study/{uid}/IM0001.dcm", b"k") == f"study/uid-{h}/IM0001.dcm"
  assert manifest.redact_uids(f"{uid}.dcm", b"k") == f"uid-{h}.dcm"
  assert manifest.redact_uids(f"a {uid}", b"k") == f"a uid-{h}"
  for kept in ("v1.0.0.1.2/clip.mp4", "1.0.0.mp4", "1.2.3.4.5.mp4", "3.1.2.3.4.5.6.mp4",
               "patient_12_L1.mp4", f"{uid}5x"):
    assert manifest.redact_uids(kept, b"k") == kept
  e = manifest.Entry(path=f"/d/{uid}.dcm", source=f"{uid}.dcm", video_id=f"{uid}.dcm",
                     patient_id="p", metadata=(("series", uid), ("n", "3")))
  redactor = manifest.Redactor.of_entries([e], b"k", None, patients=False, uids=True)
  r = redactor.entry(e)
  assert (r.source, r.video_id, r.metadata, r.path, r.patient_id) == (
      f"uid-{h}.dcm", f"uid-{h}.dcm", (("series", f"uid-{h}"), ("n", "3")), e.path, "p")
  assert redactor.tree({uid: [uid, 3, {"x": uid}]}) == {
      f"uid-{h}": [f"uid-{h}", 3, {"x": f"uid-{h}"}]}
  kept = manifest.Redactor.of_entries([e], b"k", None, patients=False, uids=False)
  assert kept.entry(e) == e


def _entry(source, patient_id, **kw):
  return manifest.Entry(path="/in/" + source, source=source, video_id=source,
                        patient_id=patient_id, **kw)


@pytest.mark.parametrize("source, patient_id, regex, want", [
    # a long id (>= 5 characters) wherever it occurs, with or without a regex
    ("covid/MRN4471902/MRN4471902_lung 1.mp4", "MRN4471902", None,
     "covid/{t}/{t}_lung 1.mp4"),
    ("site/4471902/scan_4471902.mp4", "4471902", r"^site/(\d+)/", "site/{t}/scan_{t}.mp4"),
    ("a/x4471902y.mp4", "4471902", None, "a/x{t}y.mp4"),
    # a short id only where the regex finds it: not in the zone L1, nor in a version
    ("covid/patient_1_L1.mp4", "1", r"patient_(?P<patient>\d+)_", "covid/patient_{t}_L1.mp4"),
    ("v1.0.1/patient_1_L1.mp4", "1", r"patient_(\d+)_", "v1.0.1/patient_{t}_L1.mp4"),
    ("covid/patient_1_L1.mp4", "1", None, "covid/patient_1_L1.mp4"),
    ("P12/P12_b.mp4", "12", r"P(\d+)", "P{t}/P{t}_b.mp4"),
])
def test_patient_ids_leave_what_is_written(source, patient_id, regex, want):
  rx = manifest.compile_patient_regex(regex) if regex else None
  e = _entry(source, patient_id, metadata=(("note", source),))
  redactor = manifest.Redactor.of_entries([e], b"k", rx, patients=True, uids=True)
  token = "patient-" + manifest.hash_patient(patient_id, b"k")
  assert redactor.patient(patient_id) == token[len("patient-"):]
  r = redactor.entry(e)
  assert r.video_id == r.source == r.metadata[0][1] == want.format(t=token)
  assert (r.path, r.patient_id) == (e.path, patient_id)
  assert redactor.text(r.source) == r.source  # what was written goes through unchanged
  assert redactor.tree({"files": [{"source": source}]}) == {"files": [{"source": r.source}]}


def test_patient_id_redaction_prefers_the_longest_id_and_skips_own_patients():
  entries = [_entry("a/1234567/x.mp4", "1234567"), _entry("a/12345678/x.mp4", "12345678"),
             _entry("b/123456789.mp4", "b/123456789.mp4", patient_given=False)]
  redactor = manifest.Redactor.of_entries(entries, b"k", None, patients=True, uids=True)
  t = lambda p: "patient-" + manifest.hash_patient(p, b"k")  # noqa: E731
  assert redactor.patient_ids == {"1234567", "12345678"}
  assert [redactor.text(e.source) for e in entries] == [
      f"a/{t('1234567')}/x.mp4", f"a/{t('12345678')}/x.mp4", f"b/{t('12345678')}9.mp4"]
  off = manifest.Redactor.of_entries(entries, b"k", None, patients=False, uids=True)
  assert [off.text(e.source) for e in entries] == [e.source for e in entries]
  assert (redactor.patient("1234567"), off.patient("1234567")) == (t("1234567")[8:], "1234567")


# ------------------------------------------------------------------------------------ writer

def test_shard_writer_bytes_equal_tensorflows_and_rollback_removes_a_video(tmp_path):
  import tensorflow as tf
  records = [b"", b"a", bytes(range(256)) * 3, b"video2-a", b"video2-b"]
  ref = str(tmp_path / "ref.tfrecord")
  with tf.io.TFRecordWriter(ref) as w:
    for r in records[:3]:
      w.write(r)
  ours = writer.ShardWriter(str(tmp_path / "ours.tfrecord"))
  for r in records[:3]:
    ours.write(r)
  ours.mark()
  for r in records[3:]:
    ours.write(r)
  ours.rollback()  # the second video failed: its two records go away
  assert not os.path.exists(ours.path)
  assert ours.commit() == (3, os.path.getsize(ref))
  assert not os.path.exists(ours.tmp_path)
  with open(ref, "rb") as f1, open(ours.path, "rb") as f2:
    assert f1.read() == f2.read()
  got = [r.numpy() for r in tf.data.TFRecordDataset(ours.path)]
  assert got == records[:3]


def test_encode_png_is_lossless():
  frame = np.random.default_rng(0).integers(0, 256, (5, 7), dtype=np.uint8)
  back = np.asarray(Image.open(io.BytesIO(writer.encode_png(frame))))
  np.testing.assert_array_equal(back, frame)
  with pytest.raises(ValueError, match="uint8"):
    writer.encode_png(frame.astype(np.float32))


# ----------------------------------------------------------------------------------- options

def test_config_checks_options(tmp_path):
  inp = str(tmp_path / "in")
  os.makedirs(inp)
  cfg = config_lib.BuildConfig.create(inp, tmp_path / "out", size=[96], fps=3,
                                      drop_columns="a, b")
  assert cfg.size == (96, 96) and cfg.sampling.mode == "fps" and cfg.drop_columns == ("a", "b")
  assert cfg.dataset_dir == os.path.join(str(tmp_path / "out"), "ultrasound", "1.0.0")
  assert config_lib.BuildConfig.create(inp, "o", size=(64, 32)).size == (64, 32)
  assert config_lib.BuildConfig.create(inp, "o").sampling.mode == "all"
  assert "s3cret" not in str(config_lib.BuildConfig.create(inp, "o", salt="s3cret").public_args())
  bad = [(dict(fps=3, every=2), "mutually exclusive"), (dict(runner="spark"), "--runner"),
         (dict(frame_encoding="jpeg"), "--frame_encoding 'jpeg' is not one of"),
         (dict(beam_options="--runner=FlinkRunner"), "--beam_options is for --runner beam"),
         (dict(size=(1, 2, 3)), "--size"), (dict(name="a-b"), "--name"),
         (dict(label_rule="folder"), "--label_rule"), (dict(splits="train=2"), "--splits")]
  for kw, message in bad:
    with pytest.raises(ValueError, match=message):
      config_lib.BuildConfig.create(inp, "o", **kw)
  with pytest.raises(TypeError, match="unknown data_prep option"):
    config_lib.BuildConfig.create(inp, "o", frame_rate=3)
  with pytest.raises(ValueError, match="no such file"):
    config_lib.BuildConfig.create(str(tmp_path / "nope"), "o")
  with pytest.raises(ValueError, match="is inside --input"):
    config_lib.BuildConfig.create(inp, tmp_path / "in" / "out")
  with pytest.raises(ValueError, match="manifest .csv"):
    (tmp_path / "list.txt").write_text("a.mp4\n")
    config_lib.BuildConfig.create(str(tmp_path / "list.txt"), "o")


# ----------------------------------------------------------------------------------------------
# Files written whole or not at all (data_prep/files.py).


def test_atomic_files_appear_whole_or_not_at_all(tmp_path):
  target = str(tmp_path / "report.json")
  files.write_json(target, {"a": [1, 2], "é": "ü"})
  assert open(target, encoding="utf-8").read() == '{\n "a": [\n  1,\n  2\n ],\n "é": "ü"\n}'
  # a failure half-way leaves the previous file as it was, and no temporary file
  with pytest.raises(RuntimeError, match="disk full"):
    with files.atomic_path(target) as tmp:
      with open(tmp, "w") as f:
        f.write('{"half": ')
      raise RuntimeError("disk full")
  assert json.load(open(target, encoding="utf-8")) == {"a": [1, 2], "é": "ü"}
  assert os.listdir(tmp_path) == ["report.json"]
  # two writers of one path (processes on two hosts) never share a temporary file
  with files.atomic_path(target, ".npz") as t1, files.atomic_path(target, ".npz") as t2:
    assert t1 != t2 and os.path.dirname(t1) == str(tmp_path)
    assert os.path.basename(t1).startswith(".report.json.") and t1.endswith(".tmp.npz")
    for t, text in ((t1, "one"), (t2, "two")):
      open(t, "w").write(text)
  assert open(target).read() == "one" and os.listdir(tmp_path) == ["report.json"]
  key = str(tmp_path / "key.csv")
  files.write_text(key, "video_id\n", mode=0o600)
  assert os.stat(key).st_mode & 0o777 == 0o600
