"""data_prep end to end on tiny mp4s made here with PyAV (and on a few COVID-BLUES clips).

Shards are read back with tf.data (TFRecordDataset + parse_single_example: CRCs checked) and
with tfds.builder_from_directory, and compared with what the inputs and options imply.
"""
import collections
import csv
import glob
import json
import os
import re

import av
import numpy as np
import pytest

import data_prep
from data_prep import cli
from data_prep import config as config_lib
from data_prep import manifest
from data_prep import pipeline
from data_prep import readers
from data_prep import region as region_lib
from data_prep import report as report_lib
from data_prep import schema
from data_prep import worker as worker_lib
from tests import fixtures
from tests.conftest import SHARED_DATA as SHARED
REGEX = r"patient_(?P<patient>\d+)_(?P<side>[LR])"


def write_video(path, n, h=48, w=64, fps=10, seed=0):
  """An h264 mp4 of n frames: a noisy bright box (the 'scan area') on a black frame."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with av.open(path, "w") as c:
    s = c.add_stream("libx264", rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    s.options = {"crf": "10"}
    for _ in range(n):
      img = np.zeros((h, w, 3), np.uint8)
      img[6:h - 6, 8:w - 8] = rng.integers(60, 250, (h - 12, w - 16, 1))
      for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        c.mux(pkt)
    for pkt in s.encode():
      c.mux(pkt)


def make_folder(root, frames=(9, 11, 7, 12, 10, 8)):
  """covid/negative folders, two videos per patient; returns {relative path: frames}."""
  videos = {}
  for i, n in enumerate(frames):
    patient = i // 2
    rel = f"{'covid' if patient % 2 == 0 else 'negative'}/patient_{patient}_{'LR'[i % 2]}1.mp4"
    write_video(os.path.join(root, rel), n, seed=i)
    videos[rel] = n
  return videos


def as_written(rel, salt=b"s"):
  """A relative path as data_prep writes it with REGEX and --salt s: the patient id -> its hash."""
  return re.sub(r"(?<=patient_)(\d+)(?=_)",
                lambda m: "patient-" + manifest.hash_patient(m.group(1), salt), rel)


def parse_spec():
  import tensorflow as tf
  spec = {schema.FRAMES: tf.io.VarLenFeature(tf.string)}
  spec.update({k: tf.io.VarLenFeature(tf.int64) for k in schema.INT_LIST_KEYS})
  spec.update({k: tf.io.VarLenFeature(tf.float32) for k in schema.FLOAT_LIST_KEYS})
  spec.update({k: tf.io.FixedLenFeature([], tf.int64) for k in schema.INT_KEYS})
  spec.update({k: tf.io.FixedLenFeature([], tf.float32) for k in schema.FLOAT_KEYS})
  spec.update({k: tf.io.FixedLenFeature([], tf.string) for k in schema.BYTES_KEYS})
  return spec


def read_records(dataset_dir):
  """[(shard file, split, record dict)] in file order, through tf.data."""
  import tensorflow as tf
  spec = parse_spec()
  out = []
  for path in sorted(glob.glob(os.path.join(dataset_dir, "*.tfrecord-*"))):
    split = os.path.basename(path).split("-")[1].split(".")[0]
    for raw in tf.data.TFRecordDataset(path):
      ex = tf.io.parse_single_example(raw, spec)
      rec = {}
      for k, v in ex.items():
        v = tf.sparse.to_dense(v) if isinstance(v, tf.sparse.SparseTensor) else v
        v = v.numpy()
        rec[k] = v.decode() if isinstance(v, bytes) else v
      rec["frames"] = [tf.io.decode_png(b).numpy() for b in rec["frames"]]
      out.append((path, split, rec))
  return out


def check_videos_contiguous(records):
  """Every video's records are consecutive, in frame order, in one shard."""
  seen_done = set()
  prev = None
  for path, _, r in records:
    key = (path, r["video_id"])
    if prev is not None and key != prev:
      seen_done.add(prev[1])
    assert r["video_id"] not in seen_done, f"{r['video_id']} records are not consecutive"
    prev = key
  by_video = collections.defaultdict(list)
  for _, _, r in records:
    by_video[r["video_id"]].append(int(r["frame_indices"][0]))
  for vid, firsts in by_video.items():
    assert firsts == sorted(firsts), vid


def test_folder_build_reads_back_with_tf_data_and_tfds(tmp_path):
  import tensorflow_datasets as tfds
  src, out = str(tmp_path / "in"), str(tmp_path / "out")
  videos = make_folder(src)
  # rejects of known patients (splits are decided before decoding: patients count anyway)
  write_video(os.path.join(src, "covid", "patient_0_L2.mp4"), 5, h=16, w=16)  # too small
  with open(os.path.join(src, "negative", "patient_1_R2.mp4"), "wb") as f:
    f.write(b"not a video" * 10)
  with open(os.path.join(src, "README.txt"), "w") as f:
    f.write("notes")
  argv = ["--input", src, "--output", out, "--every", "3", "--size", "32",
          "--patient_regex", REGEX, "--salt", "s", "--splits", "train=0.34,val=0.33,test=0.33",
          "--num_workers", "0", "--no_progress", "--previews", "1", "--random_previews", "1"]
  assert cli.main(argv) == cli.EXIT_REJECTS  # finished, with two rejects
  ddir = os.path.join(out, "ultrasound", "1.0.0")
  report = json.load(open(os.path.join(ddir, "report", "report.json")))
  assert report["counts"] | {"frames": 0, "bytes": 0} == {
      "inputs": 8, "written": 6, "rejected": 2, "ignored": 1, "records": 3 + 4 + 3 + 4 + 4 + 3,
      "frames": 0, "bytes": 0}
  assert report["rejected_by_reason"] == {"too_small": 1, "unreadable": 1}
  assert report["ignored"] == [{"source": "README.txt", "reason": "unsupported file type"}]
  # the patient ids REGEX finds in the paths are hashed, as in the records' patient field
  written = {as_written(v): v for v in videos}
  assert {f["source"] for f in report["files"]} == set(written) | {
      as_written("covid/patient_0_L2.mp4"), as_written("negative/patient_1_R2.mp4")}
  assert len(report["previews"]) == 2 and all(
      os.path.exists(os.path.join(ddir, "report", "previews", p)) for p in report["previews"])
  assert "rejected: 2 (too_small: 1, unreadable: 1)" in open(
      os.path.join(ddir, "report", "summary.txt")).read()
  meta = json.load(open(os.path.join(ddir, "metadata.json")))
  assert (meta["label_names"], meta["mode"], meta["image_size"], meta["clip_len"]) == (
      ["covid", "negative"], "every", [32, 32], 0)
  assert not fixtures.temporary_files(ddir)
  assert not os.path.exists(os.path.join(ddir, pipeline.WORK))

  records = read_records(ddir)
  check_videos_contiguous(records)
  by_video = collections.defaultdict(list)
  for _, split, r in records:
    by_video[r["video_id"]].append((split, r))
  assert set(by_video) == set(written)
  split_of_patient = {}
  for vid, recs in by_video.items():
    n = videos[written[vid]]
    assert [int(r["frame_indices"][0]) for _, r in recs] == list(range(0, n, 3))
    for split, r in recs:
      assert r["frames"][0].shape == (32, 32, 1) and r["padded"] == 0
      assert meta["label_names"][r["label"]] == r["label_name"] == vid.split("/")[0]
      assert r["video_num_frames"] == n and r["fps"] == 10.0 and r["source"] == vid
      assert np.allclose(r["timestamps"], r["frame_indices"] / 10.0)
      assert r["side"] == vid.split("_")[2][0] and r["exam"] == "" and r["metadata"] == "{}"
      assert vid.split("_")[1] == "patient-" + r["patient"]
      assert r["patient"] == manifest.hash_patient(written[vid].split("_")[1], b"s")
      assert split_of_patient.setdefault(r["patient"], split) == split  # patient-disjoint
  assert len(split_of_patient) == 3 and len(set(split_of_patient.values())) == 3

  # the pixels are region.apply_region of the decoded source frames
  vid = as_written("covid/patient_0_L1.mp4")
  frames = dict(readers.iter_frames(os.path.join(src, written[vid])))
  sample = np.stack([frames[i] for i in worker_lib.sample_indices(len(frames), 16)])
  reg = region_lib.find_region(sample)
  for _, r in by_video[vid]:
    want = region_lib.apply_region(frames[int(r["frame_indices"][0])], reg, (32, 32))
    np.testing.assert_array_equal(r["frames"][0][..., 0], want)

  builder = tfds.builder_from_directory(ddir)
  counts = collections.Counter(split for _, split, _ in records)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == dict(counts)
  for split in counts:
    ds = builder.as_dataset(split=split)
    got = [ex for ex in ds.as_numpy_iterator()]
    assert len(got) == counts[split]
    assert got[0]["frames"].shape == (1, 32, 32, 1)

  # a finished build is not redone; other options are refused
  shard = glob.glob(os.path.join(ddir, "*.tfrecord-*"))[0]
  mtime = os.path.getmtime(shard)
  assert pipeline.build(src, out, every=3, size=32, patient_regex=REGEX,
                        splits="train=0.34,val=0.33,test=0.33", num_workers=0,
                        progress=False)["counts"] == report["counts"]
  assert os.path.getmtime(shard) == mtime
  with pytest.raises(pipeline.BuildError, match="other options"):
    pipeline.build(src, out, every=2, size=32, patient_regex=REGEX, num_workers=0,
                   progress=False)
  assert data_prep.require_complete(ddir) == ddir
  again = pipeline.build(src, out, every=2, size=32, patient_regex=REGEX, num_workers=0,
                         progress=False, overwrite=True)
  assert again["counts"]["records"] == sum((n + 1) // 2 for n in videos.values())


def test_manifest_clips_privacy_frame_labels_and_strict(tmp_path):
  src, out = tmp_path / "in", str(tmp_path / "out")
  uid = "1.2.840.113619.2.55.3.6046"  # a file named by its DICOM UID
  lengths = {"v0": 20, "v1": 5, "v2": 16, uid: 9}
  for i, (vid, n) in enumerate(lengths.items()):
    write_video(str(src / f"{vid}.mp4"), n, seed=i)
  (src / "m.csv").write_text(
      "path,video_id,patient_id,label,exam,split,PatientName,split_group,probe\n"
      "v0.mp4,v0,Doe^John-7431,b_lines,T1,train,Doe^John,Doe^John-7431,C5-2\n"
      "v1.mp4,v1,Doe^John-7431,b_lines,T2,train,Doe^John,Doe^John-7431,C5-2\n"
      "v2.mp4,v2,Roe^Jane-9921,normal,T1,val,Roe^Jane,Roe^Jane-9921,C3-1\n"
      f"{uid}.mp4,v3,Poe^Ed-5550,,T1,test,Poe^Ed,Poe^Ed-5550,C3-1\n")
  (src / "fl.csv").write_text("video_id,frame_index,anatomy_coarse,anatomy_fine\n"
                              "v0,2,pleura,a_lines\nv0,9,rib_shadow,\nv1,4,pleura,b_lines\n")
  report = pipeline.build(str(src / "m.csv"), out, clip_len=4, clip_stride=2,
                          frame_labels=str(src / "fl.csv"), size=(24, 32), num_workers=0,
                          progress=False, min_size=16)
  ddir = os.path.join(out, "ultrasound", "1.0.0")
  assert report["counts"]["written"] == 4 and report["counts"]["rejected"] == 0
  assert report["dropped_columns"] == {"PatientName": "name looks like a personal identifier",
                                       "split_group": "values repeat 'patient_id'"}
  meta = json.load(open(os.path.join(ddir, "metadata.json")))
  assert meta["clip_len"] == 4 and meta["mode"] == "clip"
  assert meta["anatomy_coarse_names"] == ["pleura", "rib_shadow"]
  assert meta["anatomy_fine_names"] == ["a_lines", "b_lines"]
  assert meta["label_names"] == ["b_lines", "normal"]
  records = read_records(ddir)
  check_videos_contiguous(records)
  got = collections.defaultdict(list)
  for _, split, r in records:
    got[r["video_id"]].append((split, tuple(r["frame_indices"]), int(r["padded"]),
                               tuple(r["anatomy_coarse"]), tuple(r["anatomy_fine"])))
    assert len(r["frames"]) == 4 and r["frames"][0].shape == (24, 32, 1)
    assert json.loads(r["metadata"]) == {"probe": "C5-2" if r["video_id"] < "v2" else "C3-1"}
  # span 7, no overlap; the 5-frame video loops (offset 6 -> frame 1) and is flagged
  assert got["v0"] == [("train", (0, 2, 4, 6), 0, (-1, 0, -1, -1), (-1, 0, -1, -1)),
                       ("train", (7, 9, 11, 13), 0, (-1, 1, -1, -1), (-1, -1, -1, -1))]
  assert got["v1"] == [("train", (0, 2, 4, 1), 1, (-1, -1, 0, -1), (-1, -1, 1, -1))]
  assert [g[1] for g in got["v2"]] == [(0, 2, 4, 6), (7, 9, 11, 13)]
  assert [g[:3] for g in got["v3"]] == [("test", (0, 2, 4, 6), 0)]
  sources = {r["video_id"]: r["source"] for _, _, r in records}
  assert sources["v0"] == "v0.mp4" and re.fullmatch(r"uid-[0-9a-f]{16}\.mp4", sources["v3"])
  # no raw patient id or name anywhere in the dataset directory
  for path in fixtures.paths_below(ddir):
    if os.path.isfile(path):
      data = open(path, "rb").read()
      for secret in (b"Doe^John", b"Roe^Jane", b"Poe^Ed", b"7431", b"9921", b"113619"):
        assert secret not in data, (path, secret)
  # --strict stops at a rejected video and leaves no finished-looking directory
  (src / "m2.csv").write_text("path,patient_id\nv0.mp4,a\nbroken.mp4,b\n")
  (src / "broken.mp4").write_bytes(b"\x00" * 100)
  out2 = str(tmp_path / "out2")
  code = cli.main(["--input", str(src / "m2.csv"), "--output", out2, "--strict",
                   "--num_workers", "0", "--no_progress", "--min_size", "16"])
  assert code == cli.EXIT_FAILED
  assert not os.path.exists(os.path.join(out2, "ultrasound", "1.0.0", "dataset_info.json"))


MRNS = ("MRN4471902", "MRN5500321", "MRN7781234")


@pytest.mark.parametrize("kind", ["folder", "manifest"])
def test_patient_ids_in_paths_never_reach_the_output(tmp_path, kind):
  """Record numbers as folder and file names (found by the regex, or given in the manifest)
  are hashed in every file of the dataset, and the hash is the records' patient field."""
  src, out = tmp_path / "in", str(tmp_path / f"export_{MRNS[2]}")  # even in the output path
  rels = [f"{label}/{mrn}/{mrn}_lung {k}.mp4" for k, (label, mrn) in enumerate(
      [("covid", MRNS[0]), ("negative", MRNS[0]), ("covid", MRNS[1]), ("negative", MRNS[2])])]
  for k, rel in enumerate(rels):
    write_video(str(src / rel), 4, seed=k)
  (src / "covid" / MRNS[1] / f"{MRNS[1]}_broken.mp4").write_bytes(b"\x00" * 100)  # rejected
  opts = dict(size=16, min_size=16, num_workers=0, progress=False, salt="s", previews=4)
  key = str(tmp_path / "key.csv")
  with pytest.raises(ValueError, match="--id_key .* is inside --output"):
    pipeline.build(str(src), out, id_key=os.path.join(out, "key.csv"), **opts)
  if kind == "folder":
    args, more = (str(src),), dict(patient_regex=r"/(MRN\d+)/")
  else:
    rows = [f"{r},{r.split('/')[1]},follow-up of {r.split('/')[1]}" for r in rels]
    (src / "m.csv").write_text("path,patient_id,note\n" + "\n".join(rows) + "\n")
    args, more = (str(src / "m.csv"),), dict(label_rule="top")
  build = lambda: pipeline.build(*args, out, id_key=key, **more, **opts)  # noqa: E731
  report = build()
  ddir = os.path.join(out, "ultrasound", "1.0.0")
  token = {m: "patient-" + manifest.hash_patient(m, b"s") for m in MRNS}
  assert report["counts"]["written"] == 4 and report["dataset_dir"] == ddir  # where it is
  written = json.load(open(os.path.join(ddir, "report", "report.json")))
  assert written["dataset_dir"] == ddir.replace(MRNS[2], token[MRNS[2]])
  again = build()  # finished: its report, and where the dataset is
  assert again == report and again["files"] == written["files"]
  for _, _, r in read_records(ddir):
    mrn = next(m for m in MRNS if token[m] in r["source"])
    assert r["source"] == r["video_id"] and r["patient"] == token[mrn][len("patient-"):]
    assert r["source"].replace(token[mrn], mrn) in rels
    if kind == "manifest":
      assert json.loads(r["metadata"]) == {"note": f"follow-up of {token[mrn]}"}
  # the key, kept apart and readable by its owner only, leads from every video_id and patient
  # written back to its file
  assert os.stat(key).st_mode & 0o777 == 0o600
  with open(key, newline="") as f:
    rows = list(csv.DictReader(f))
  assert {f["video_id"] for f in report["files"]} == {r["video_id"] for r in rows}
  summary = open(os.path.join(ddir, "report", "summary.txt")).read()
  broken = f"covid/{token[MRNS[1]]}/{token[MRNS[1]]}_broken.mp4: unreadable"
  assert ((f"  {broken}" in summary and "(paths de-identified: the --id_key file leads to"
           in summary) == (kind == "folder")), summary  # the manifest does not list it
  for r in rows:
    mrn = os.path.basename(os.path.dirname(r["path"]))
    assert r["path"] == str(src / r["video_id"].replace(token[mrn], mrn))
    assert r["patient"] == token[mrn][len("patient-"):]
  names = [p for p in fixtures.paths_below(ddir)]
  assert len([p for p in names if p.endswith(".png")]) == 4  # previews, named by video
  for path in names:
    data = open(path, "rb").read() if os.path.isfile(path) else b""
    if path.endswith("metadata.json"):  # the options as given, to recognise a re-run
      meta = json.loads(data)
      assert meta["args"].pop("output") == out and meta["args"].pop("input") in (str(src), str(
          src / "m.csv"))
      data = json.dumps(meta).encode()
    for mrn in MRNS:
      assert mrn not in os.path.relpath(path, ddir) and mrn[3:].encode() not in data, (path, mrn)
  # asked to keep the ids, the paths are as they were
  kept = pipeline.build(str(src), str(tmp_path / "kept"), patient_regex=r"/(MRN\d+)/",
                        keep_patient_id=True, **opts)
  assert {f["source"] for f in kept["files"]} == set(rels) | {
      f"covid/{MRNS[1]}/{MRNS[1]}_broken.mp4"}
  assert "de-identified" not in report_lib.summary_text(kept)


def test_id_key_of_a_finished_build_needs_its_salt(tmp_path):
  """--id_key on a re-run of a finished build writes the build's key, or refuses (and writes
  nothing) where it could not be the build's: no salt, another salt, a random salt, an older
  report, an input that lists other videos now."""
  src, out = tmp_path / "in", str(tmp_path / "out")
  for k, mrn in enumerate(MRNS):
    write_video(str(src / mrn / f"{mrn}_lung.mp4"), 4, seed=k)
  opts = dict(size=16, min_size=16, num_workers=0, progress=False, splits="train=1.0",
              patient_regex=r"^(MRN\d+)/")
  key = str(tmp_path / "key.csv")
  report = pipeline.build(str(src), out, salt="s", **opts)
  assert report["salt_check"] == config_lib.salt_digest(b"s")
  again = pipeline.build(str(src), out, salt="s", id_key=key, **opts)
  assert again == report
  with open(key, newline="") as f:
    rows = {r["video_id"]: r for r in csv.DictReader(f)}
  records = {r["video_id"]: r for _, _, r in read_records(os.path.join(out, "ultrasound",
                                                                        "1.0.0"))}
  assert sorted(rows) == sorted(records) and len(rows) == 3
  for video_id, r in rows.items():
    mrn = os.path.basename(os.path.dirname(r["path"]))
    assert r["patient"] == records[video_id]["patient"] == manifest.hash_patient(mrn, b"s")
    assert r["path"] == str(src / mrn / f"{mrn}_lung.mp4")
  os.remove(key)
  refusals = [(dict(salt="t"), "built with, and this one differs"),
              (dict(), "needs the --salt it was built with \\(")]
  for more, match in refusals:
    with pytest.raises(pipeline.BuildError, match=match):
      pipeline.build(str(src), out, id_key=key, **more, **opts)
  report_path = os.path.join(out, "ultrasound", "1.0.0", "report", "report.json")
  written = json.load(open(report_path))
  json.dump({k: v for k, v in written.items() if k != "salt_check"}, open(report_path, "w"))
  with pytest.raises(pipeline.BuildError, match="predates the salt check"):
    pipeline.build(str(src), out, salt="s", id_key=key, **opts)
  json.dump(written, open(report_path, "w"))
  write_video(str(src / "MRN0000001" / "new.mp4"), 4, seed=9)
  with pytest.raises(pipeline.BuildError, match="lists other videos now \\(1 new"):
    pipeline.build(str(src), out, salt="s", id_key=key, **opts)
  random_salt = str(tmp_path / "random")
  assert pipeline.build(str(src), random_salt, **opts)["salt_check"] is None
  with pytest.raises(pipeline.BuildError, match="made with a random salt"):
    pipeline.build(str(src), random_salt, id_key=key, salt="s", **opts)
  assert not os.path.exists(key)


def test_dicom_uid_names_never_reach_the_output(tmp_path):
  src, out = tmp_path / "in", str(tmp_path / "out")
  uid = "1.2.826.0.1.3680043.8.498.1234567"
  write_video(str(src / uid / "IM_0001.mp4"), 4, seed=1)
  write_video(str(src / "plain" / "clip.mp4"), 4, seed=2)
  report = pipeline.build(str(src), out, size=16, min_size=16, num_workers=0, progress=False,
                          splits="train=1.0")
  assert report["counts"]["written"] == 2
  assert sorted(f["source"] for f in report["files"])[0] == "plain/clip.mp4"
  assert re.fullmatch(r"uid-[0-9a-f]{16}/IM_0001\.mp4",
                      sorted(f["source"] for f in report["files"])[1])
  ddir = os.path.join(out, "ultrasound", "1.0.0")
  assert {r["source"] for _, _, r in read_records(ddir)} == {f["source"] for f in report["files"]}
  for path in fixtures.paths_below(ddir):
    assert "3680043" not in os.path.basename(path)
    if os.path.isfile(path):
      assert b"3680043" not in open(path, "rb").read(), path


def test_two_pass_decoding_equals_one_pass(tmp_path):
  src = str(tmp_path / "in")
  make_folder(src, frames=(6, 7, 8, 6, 7, 8))
  opts = dict(every=2, size=16, patient_regex=REGEX, salt="s", num_workers=0, progress=False,
              min_size=16, splits="train=0.5,val=0.5")

  def contents(ddir):
    return sorted((s, r["video_id"], r["patient"], tuple(r["frame_indices"]), r["label"],
                   r["frames"][0].tobytes()) for _, s, r in read_records(ddir))

  one = str(tmp_path / "one")
  report = pipeline.build(src, one, **opts)
  assert report["counts"]["written"] == 6
  (run,) = report["tasks"]
  assert run["runner"] == "local" and run["run"]["videos"] == 6
  want = contents(os.path.join(one, "ultrasound", "1.0.0"))
  assert len(want) == 3 + 4 + 4 + 3 + 4 + 4  # ceil(n / 2) records of n = 6, 7, 8, 6, 7, 8
  # videos too big for the frame buffer are decoded twice, with the same result
  twice = str(tmp_path / "twice")
  pipeline.build(src, twice, buffer_mb=1e-6, **opts)
  assert contents(os.path.join(twice, "ultrasound", "1.0.0")) == want


def test_the_retired_task_flags_say_what_replaced_them(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--input", "x", "--output", "y", "--num_tasks", "4", "--task_index", "1"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "--task_index, --num_tasks: removed" in err and "--runner beam" in err


def test_a_dataset_of_an_earlier_version_is_still_recognised_as_finished(tmp_path):
  """metadata.json of an earlier data_prep: with the retired task options and without the
  options added since (--frame_encoding). Re-running the same command returns its report;
  another --frame_encoding is refused."""
  src = str(tmp_path / "in")
  make_folder(src, frames=(6, 7))
  opts = dict(every=3, size=16, min_size=16, patient_regex=REGEX, splits="train=1.0",
              num_workers=0, progress=False)
  report = pipeline.build(src, str(tmp_path / "out"), **opts)
  path = os.path.join(report["dataset_dir"], "metadata.json")
  meta = json.load(open(path))
  del meta["args"]["frame_encoding"]
  meta["args"].update(task_index=0, num_tasks=1, merge=False)
  with open(path, "w") as f:
    json.dump(meta, f)
  assert pipeline.build(src, str(tmp_path / "out"), **opts) == report
  with pytest.raises(pipeline.BuildError, match="finished dataset made with other options"):
    pipeline.build(src, str(tmp_path / "out"), frame_encoding="raw", **opts)


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "covid_blues")),
                    reason="shared COVID-BLUES data not present")
def test_covid_blues_clips_from_the_manifest(tmp_path):
  import csv
  rows = list(csv.DictReader(open(os.path.join(SHARED, "manifest.csv"))))
  picked = [r for r in rows if r["patient_id"] in ("blues_p10", "blues_p100")][:3]
  picked += [r for r in rows if r["dataset"] == "covid_blues" and r["label"] == "covid"][:2]
  m = tmp_path / "m.csv"
  with open(m, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(picked)
  report = pipeline.build(str(m), str(tmp_path / "out"), root=SHARED, fps=3, size=64,
                          num_workers=0, progress=False, splits="train=0.5,test=0.5")
  assert report["counts"]["written"] == len(picked) and report["counts"]["rejected"] == 0
  assert report["dropped_columns"]["split_group"] == "values repeat 'patient_id'"
  by_source = {f["source"]: f for f in report["files"]}
  for r in picked:
    n, fps = int(r["n_frames"]), float(r["fps"])
    assert fps == 25.0
    # frames k / 3 s for k * 25 / 3 < n: ceil(3 n / 25) records
    assert by_source[r["file"]]["records"] == (3 * n + 24) // 25, r["file"]
    assert by_source[r["file"]]["num_frames"] == n
  records = read_records(os.path.join(str(tmp_path / "out"), "ultrasound", "1.0.0"))
  assert {r["label_name"] for _, _, r in records} == {r["label"] for r in picked}
  assert not any("blues_p" in r["patient"] for _, _, r in records)
