"""data_prep --runner beam (Apache Beam, DirectRunner) against the local runner.

Same input, same options: the same records byte for byte (in canonical order: split, then the
raw records sorted; each video's records stay consecutive and in frame order), the same splits
and the same report, on synthetic mp4s and on COVID-BLUES clips. Failure semantics: a video
that raises is a reject; a killed or failed pipeline leaves nothing that passes
``require_complete``, and its re-run completes; a missing extra is a clear CLI error.
"""
import collections
import csv
import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from data_prep import beam_pipeline
from data_prep import cli
from data_prep import dataset as dataset_lib
from data_prep import pipeline
from data_prep import region as region_lib
from data_prep import writer as writer_lib
from tests.test_data_prep_pipeline import REGEX, SHARED, check_videos_contiguous, make_folder
from tests.test_data_prep_pipeline import read_records

beam = pytest.importorskip("apache_beam", reason="the [beam] extra is not installed")

OPTS = dict(every=2, size=16, patient_regex=REGEX, salt="s", progress=False, min_size=16,
            splits="train=0.5,val=0.5", previews=1, random_previews=1)


def raw_records(dataset_dir):
  """split -> sorted raw records of its shards (TFRecord framing and CRCs checked)."""
  out = collections.defaultdict(list)
  for path in sorted(glob.glob(os.path.join(dataset_dir, "*.tfrecord-*"))):
    split = os.path.basename(path).split("-")[1].split(".")[0]
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == writer_lib.masked_crc(
          data[pos:pos + 8])
      record = data[pos + 12:pos + 12 + n]
      assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == writer_lib.masked_crc(
          record)
      out[split].append(record)
      pos += 16 + n
  return {s: sorted(r) for s, r in out.items()}


def comparable(report):
  """The report without what may differ between runners: shard cut, timings, runner, dir."""
  files = [{k: v for k, v in f.items() if k != "shard"} for f in report["files"]]
  splits = {s: {k: v for k, v in t.items() if k != "shards"} for s, t in report["splits"].items()}
  return dict(files=files, splits=splits, counts=report["counts"],
              rejected=report["rejected_by_reason"], labels=report["label_names"],
              previews=report["previews"], warnings=report["warnings"])


def assert_same_build(local_dir, beam_dir, local_report, beam_report):
  assert raw_records(beam_dir) == raw_records(local_dir)
  assert comparable(beam_report) == comparable(local_report)
  assert sorted(os.listdir(os.path.join(beam_dir, "report", "previews"))) == sorted(
      os.listdir(os.path.join(local_dir, "report", "previews")))
  check_videos_contiguous(read_records(beam_dir))
  assert dataset_lib.require_complete(beam_dir) == beam_dir
  assert not os.path.exists(os.path.join(beam_dir, pipeline.WORK))
  assert beam_report["tasks"][0]["runner"] == "beam"


def test_balanced_shards_cut_consecutive_videos_into_equal_bytes():
  assert beam_pipeline.balanced_shards([10] * 6, 25) == [0, 0, 1, 1, 2, 2]  # 3 shards of 20
  assert beam_pipeline.balanced_shards([10] * 6, 1000) == [0] * 6
  # one big video: ceil(130 / 40) = 4 shards planned, the big one's middle falls in shard 2;
  # shard 1 is left empty and dropped
  assert beam_pipeline.balanced_shards([10, 100, 10, 10], 40) == [0, 1, 2, 2]
  assert beam_pipeline.balanced_shards([5], 1) == [0]


def test_beam_equals_local_and_a_bad_video_is_a_reject(tmp_path):
  src = str(tmp_path / "in")
  make_folder(src)
  with open(os.path.join(src, "covid", "patient_9_L1.mp4"), "wb") as f:
    f.write(b"not a video")
  opts = dict(OPTS, shard_mb=0.008)  # a few shards per split
  local = pipeline.build(src, str(tmp_path / "local"), num_workers=0, **opts)
  ddir = str(tmp_path / "beam" / "ultrasound" / "1.0.0")
  report = pipeline.build(src, str(tmp_path / "beam"), runner="beam", num_workers=2, **opts)
  assert_same_build(str(tmp_path / "local" / "ultrasound" / "1.0.0"), ddir, local, report)
  assert report["counts"]["written"] == 6 and report["rejected_by_reason"] == {"unreadable": 1}
  sizes = [os.path.getsize(p) for p in glob.glob(os.path.join(ddir, "*-val.tfrecord-*"))]
  assert len(sizes) >= 2 and max(sizes) < 2 * min(sizes)  # balanced
  # a finished build re-run returns its report, whichever runner asks
  assert pipeline.build(src, str(tmp_path / "beam"), num_workers=0, **opts) == report


def test_beam_writes_raw_frames_like_local(tmp_path):
  src = str(tmp_path / "in")
  make_folder(src, frames=(6, 7, 8, 6))
  opts = dict(OPTS, frame_encoding="raw")
  local = pipeline.build(src, str(tmp_path / "local"), num_workers=0, **opts)
  beam_report = pipeline.build(src, str(tmp_path / "beam"), runner="beam", num_workers=0, **opts)
  dirs = [str(tmp_path / r / "ultrasound" / "1.0.0") for r in ("local", "beam")]
  assert raw_records(dirs[1]) == raw_records(dirs[0])
  assert comparable(beam_report) == comparable(local)
  for d in dirs:
    assert dataset_lib.require_complete(d) == d
    with open(os.path.join(d, "metadata.json"), encoding="utf-8") as f:
      assert json.load(f)["frame_encoding"] == "raw"


def test_a_video_that_raises_inside_the_pipeline_is_a_reject(tmp_path, monkeypatch):
  src = str(tmp_path / "in")
  make_folder(src, frames=(6, 7, 8, 6))
  find = region_lib.find_region
  calls = []

  def flaky(frames):
    calls.append(1)
    if len(calls) == 2:
      raise RuntimeError("a region bug")
    return find(frames)

  monkeypatch.setattr(region_lib, "find_region", flaky)  # in this process: num_workers=0
  report = pipeline.build(src, str(tmp_path / "out"), runner="beam", num_workers=0, **OPTS)
  assert report["counts"]["written"] == 3 and report["rejected_by_reason"] == {"error": 1}
  (bad,) = [f for f in report["files"] if f["status"] == "rejected"]
  assert "RuntimeError: a region bug" in bad["message"] and "traceback" in bad
  ddir = str(tmp_path / "out" / "ultrasound" / "1.0.0")
  assert bad["video_id"] not in {r["video_id"] for _, _, r in read_records(ddir)}


def test_a_failed_pipeline_leaves_nothing_complete_and_its_rerun_completes(tmp_path,
                                                                             monkeypatch):
  src = str(tmp_path / "in")
  make_folder(src, frames=(6, 7, 8, 6))
  out = str(tmp_path / "out")
  ddir = os.path.join(out, "ultrasound", "1.0.0")
  write_metadata = dataset_lib.write_metadata

  def stopped(*args, **kwargs):  # the shards are in place, dataset_info.json is not
    raise RuntimeError("cancelled")

  monkeypatch.setattr(dataset_lib, "write_metadata", stopped)
  with pytest.raises(Exception, match="cancelled"):
    pipeline.build(src, out, runner="beam", num_workers=0, **OPTS)
  assert glob.glob(os.path.join(ddir, "*.tfrecord-*"))
  with pytest.raises(dataset_lib.IncompleteDatasetError, match="re-run the same"):
    dataset_lib.require_complete(ddir)
  monkeypatch.setattr(dataset_lib, "write_metadata", write_metadata)
  report = pipeline.build(src, out, runner="beam", num_workers=0, **OPTS)
  local = pipeline.build(src, str(tmp_path / "local"), num_workers=0, **OPTS)
  assert_same_build(str(tmp_path / "local" / "ultrasound" / "1.0.0"), ddir, local, report)


def test_a_shard_that_lost_a_video_is_refused(tmp_path, monkeypatch):
  """If the runner hands WriteShard fewer videos than planned, Finalize refuses the build."""
  src = str(tmp_path / "in")
  make_folder(src, frames=(6, 7, 8, 6))
  out = str(tmp_path / "out")
  write_shard = beam_pipeline._write_shard

  def lossy(keyed, plan, attempts_dir):
    key, videos = keyed
    return write_shard((key, sorted(videos)[:-1]), plan, attempts_dir)

  monkeypatch.setattr(beam_pipeline, "_write_shard", lossy)
  with pytest.raises(pipeline.BuildError, match=r"written \d+ videos, .* planned \d+ videos"):
    pipeline.build(src, out, runner="beam", num_workers=0, **OPTS)
  ddir = os.path.join(out, "ultrasound", "1.0.0")
  with pytest.raises(dataset_lib.IncompleteDatasetError):
    dataset_lib.require_complete(ddir)
  monkeypatch.setattr(beam_pipeline, "_write_shard", write_shard)
  assert pipeline.build(src, out, runner="beam", num_workers=0, **OPTS)["counts"]["written"] == 4


def test_a_killed_direct_runner_leaves_nothing_complete_and_its_rerun_completes(tmp_path):
  src = str(tmp_path / "in")
  make_folder(src)
  out = str(tmp_path / "out")
  ddir = os.path.join(out, "ultrasound", "1.0.0")
  argv = ["--input", src, "--output", out, "--every", "2", "--size", "16", "--min_size", "16",
          "--patient_regex", REGEX, "--salt", "s", "--splits", "train=0.5,val=0.5",
          "--runner", "beam", "--no_progress"]
  proc = subprocess.Popen([sys.executable, "-m", "data_prep"] + argv + ["--num_workers", "2"],
                          start_new_session=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    # Killed once a worker has begun writing a video (a piece in the work dir), which leaves
    # the rest of the build to do on any machine; a fixed delay did not (the whole build takes
    # 3 s here after config.json, so a 3x faster host would finish within a 1 s delay).
    pieces = pipeline.WorkDir(os.path.join(ddir, pipeline.WORK)).file("videos")
    deadline = time.time() + 120
    while (not (os.path.isdir(pieces) and os.listdir(pieces))
           and proc.poll() is None and time.time() < deadline):
      time.sleep(0.01)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its Beam worker processes
    proc.wait()
  assert not os.path.exists(os.path.join(ddir, "dataset_info.json")), "killed too late"
  assert os.listdir(pieces), "killed before any video began"
  with pytest.raises(dataset_lib.IncompleteDatasetError):
    dataset_lib.require_complete(ddir)
  assert cli.main(argv + ["--num_workers", "0"]) == cli.EXIT_OK
  assert dataset_lib.require_complete(ddir) == ddir
  opts = dict(OPTS, previews=4, random_previews=4)  # the CLI's defaults
  local = pipeline.build(src, str(tmp_path / "local"), num_workers=0, **opts)
  report = pipeline.build(src, out, runner="beam", **opts)  # finished: its report
  assert_same_build(str(tmp_path / "local" / "ultrasound" / "1.0.0"), ddir, local, report)


def test_a_retried_shard_bundle_duplicates_no_record(tmp_path):
  """Two attempts at one shard write two folders; Finalize moves the one the runner kept."""
  plan = {"train": [{"shard": "ds-train.tfrecord-00000-of-00001", "positions": [0, 1]}]}
  files = []
  for pos, records in ((0, [b"a", b"b"]), (1, [b"c"])):
    files.append(str(tmp_path / f"video{pos}.tfrecord"))
    with open(files[-1], "wb") as f:
      f.write(b"".join(writer_lib.frame_record(r) for r in records))
  videos = [(1, files[1]), (0, files[0])]
  first = beam_pipeline._write_shard((("train", 0), videos), plan, str(tmp_path / "a"))
  second = beam_pipeline._write_shard((("train", 0), videos[::-1]), plan, str(tmp_path / "a"))
  assert first["path"] != second["path"] and first["positions"] == second["positions"] == [0, 1]
  want = b"".join(writer_lib.frame_record(r) for r in (b"a", b"b", b"c"))
  for w in (first, second):
    with open(w["path"], "rb") as f:
      assert f.read() == want
    assert w["bytes"] == len(want)
  assert not glob.glob(str(tmp_path / "a" / "*" / "*.tmp"))


def test_without_the_extra_the_cli_says_how_to_install_it(tmp_path, monkeypatch, capsys):
  src = str(tmp_path / "in")
  make_folder(src, frames=(6, 7))
  monkeypatch.setitem(sys.modules, "apache_beam", None)  # import apache_beam -> ImportError
  out = str(tmp_path / "out")
  assert cli.main(["--input", src, "--output", out, "--runner", "beam"]) == cli.EXIT_FAILED
  assert "pip install -e '.[beam]'" in capsys.readouterr().err
  assert not os.path.exists(out)


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "covid_blues")),
                    reason="shared COVID-BLUES data not present")
def test_beam_equals_local_on_covid_blues_clips(tmp_path):
  rows = list(csv.DictReader(open(os.path.join(SHARED, "manifest.csv"))))
  rows = [r for r in rows if r["dataset"] == "covid_blues"]
  picked = [r for r in rows if r["label"] == "covid"][:3] + [
      r for r in rows if r["label"] != "covid"][:3]
  m = tmp_path / "m.csv"
  with open(m, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(picked)
  opts = dict(root=SHARED, clip_len=4, clip_stride=8, size=32, progress=False, salt="s",
              splits="train=0.5,test=0.5")
  local = pipeline.build(str(m), str(tmp_path / "local"), num_workers=0, **opts)
  report = pipeline.build(str(m), str(tmp_path / "beam"), runner="beam", num_workers=2, **opts)
  assert report["counts"]["written"] == len(picked) and report["counts"]["records"] > len(picked)
  assert_same_build(str(tmp_path / "local" / "ultrasound" / "1.0.0"),
                    str(tmp_path / "beam" / "ultrasound" / "1.0.0"), local, report)
