"""data_prep survives a kill (resume without duplicates) and a worker that dies mid-video."""
import collections
import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from data_prep import config as config_lib
from data_prep import dataset as dataset_lib
from data_prep import pipeline
from data_prep import worker as worker_lib
from tests import fixtures
from tests.test_data_prep_pipeline import check_videos_contiguous, read_records, write_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _committed_pieces(work):
  n = 0
  for path in glob.glob(os.path.join(work, "journals", "*.jsonl")):
    with open(path) as f:
      n += sum('"event": "piece"' in line for line in f)
  return n


def test_killed_run_resumes_without_duplicates(tmp_path):
  src, out = str(tmp_path / "in"), str(tmp_path / "out")
  num_videos, frames = 30, 12
  for i in range(num_videos):
    write_video(os.path.join(src, f"p{i // 3}", f"v{i:02d}.mp4"), frames, seed=i)
  argv = ["--input", src, "--output", out, "--size", "96", "--label_rule", "none",
          "--patient_regex", r"^(p\d+)/", "--shard_mb", "0.000001", "--no_progress"]
  ddir = os.path.join(out, "ultrasound", "1.0.0")
  work = os.path.join(ddir, pipeline.WORK)
  proc = subprocess.Popen([sys.executable, "-m", "data_prep", *argv, "--num_workers", "1"],
                          cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while _committed_pieces(work) < 3 and proc.poll() is None and time.time() < deadline:
      time.sleep(0.01)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker process
    proc.wait()
  done_before = _committed_pieces(work)
  assert os.stat(os.path.join(work, "salt")).st_mode & 0o777 == 0o600   # the build's secret
  assert 3 <= done_before < num_videos, "the run was not killed half-way"
  assert not os.path.exists(os.path.join(ddir, "dataset_info.json"))
  with pytest.raises(dataset_lib.IncompleteDatasetError, match="re-run the same"):
    dataset_lib.require_complete(ddir)

  from data_prep import cli
  assert cli.main(argv + ["--num_workers", "0"]) == cli.EXIT_OK
  report = pipeline.build(src, out, **{"size": 96, "label_rule": "none",
                                       "patient_regex": r"^(p\d+)/", "shard_mb": 0.000001})
  (task,) = report["tasks"]
  assert task["resumed_from"] >= done_before and task["run"]["videos"] == num_videos - (
      task["resumed_from"])
  assert report["counts"]["written"] == num_videos
  records = read_records(ddir)
  keys = [(r["video_id"], int(r["frame_indices"][0])) for _, _, r in records]
  assert len(keys) == len(set(keys)) == num_videos * frames
  check_videos_contiguous(records)
  assert not fixtures.temporary_files(ddir)
  assert not os.path.exists(work)


@pytest.fixture
def deadline():
  """A run_in_workers that never ends (a worker respawned forever) fails the test after 120 s
  instead of hanging the suite."""
  def expire(signum, frame):
    raise TimeoutError("run_in_workers did not finish in 120 s")
  previous = signal.signal(signal.SIGALRM, expire)
  signal.alarm(120)
  yield
  signal.alarm(0)
  signal.signal(signal.SIGALRM, previous)


def _worker_run(tmp_path, names):
  """One task's videos ``names`` (<name>.mp4, 4 frames each), ready for run_in_workers:
  (work dir, jobs, worker config, tracker)."""
  src = str(tmp_path / "in")
  for i, n in enumerate(names):
    write_video(os.path.join(src, f"{n}.mp4"), 4, seed=i)
  cfg = config_lib.BuildConfig.create(src, tmp_path / "out", size=16, min_size=16)
  work = pipeline.WorkDir(str(tmp_path / "work"))
  work.make()
  prep = pipeline.prepare(cfg, b"salt")
  wcfg = worker_lib.WorkerConfig(
      pieces_dir=work.pieces, journal_dir=work.journals, preview_dir=str(tmp_path / "pv"),
      prefix="t00000-a001", image_size=(16, 16), sampling=cfg.sampling, min_size=16,
      region_samples=4, shard_bytes=1 << 30, buffer_bytes=1 << 20)
  tracker = pipeline.Tracker(len(prep.jobs), 0, progress=False, strict=False)
  return work, prep.jobs, wcfg, tracker


def slow_starting_worker(cfg, index, jobs, results):
  """worker_lib.worker_process after a start-up longer than the --video_timeout of the test
  below (as spawning and imports take on a loaded host)."""
  time.sleep(2.5)
  worker_lib.worker_process(cfg, index, jobs, results)


def test_video_timeout_counts_from_the_video_not_the_worker_start_up(tmp_path, deadline):
  work, jobs, wcfg, tracker = _worker_run(tmp_path, "abc")
  pipeline.run_in_workers(wcfg, jobs, 1, tracker, target=slow_starting_worker,
                          video_timeout=1.0)
  tracker.close()
  final, _ = pipeline.outcomes(pipeline.read_events(work))
  assert {v: a["status"] for v, a in final.items()} == {
      "a.mp4": "written", "b.mp4": "written", "c.mp4": "written"}


def broken_worker(cfg, index, jobs, results):
  """A worker whose start-up fails (a missing module, say) before it begins any video."""
  os._exit(3)


def test_a_worker_that_dies_starting_up_is_an_error_not_a_respawn_loop(tmp_path, deadline):
  _, jobs, wcfg, tracker = _worker_run(tmp_path, "a")
  with pytest.raises(pipeline.BuildError, match=r"worker 0 exited with code 3 before it began "
                     r"a video: its start-up failed. Run with --num_workers 0"):
    pipeline.run_in_workers(wcfg, jobs, 1, tracker, target=broken_worker)
  tracker.close()


def misbehaving_worker(cfg, index, jobs, results):
  """worker_lib.worker_process, except that the process dies on the video crash.mp4 and never
  finishes hang.mp4 (a decoder looping forever on a damaged file)."""
  w = worker_lib.Worker(cfg, index, results.send)
  while (job := jobs.recv()) is not None:
    if job.entry.video_id in ("crash.mp4", "hang.mp4"):
      w.begin(job.entry.video_id)
      if job.entry.video_id == "crash.mp4":
        os._exit(7)
      time.sleep(3600)
    w.run(job)
  w.close()
  results.send({"msg": "exit", "worker": index})


@pytest.mark.parametrize("bad,reason", [("crash", "crash"), ("hang", "timeout")])
def test_worker_death_rejects_its_video_and_redoes_the_uncommitted(tmp_path, deadline, bad, reason):
  work, jobs, wcfg, tracker = _worker_run(tmp_path, ["a", "b", bad, "c", "d"])
  t0 = time.monotonic()
  pipeline.run_in_workers(wcfg, jobs, 2, tracker, target=misbehaving_worker,
                          video_timeout=3.0)
  assert time.monotonic() - t0 < 60
  tracker.close()
  final, pieces = pipeline.outcomes(pipeline.read_events(work))
  assert {v: a["status"] for v, a in final.items()} == {
      "a.mp4": "written", "b.mp4": "written", f"{bad}.mp4": "rejected", "c.mp4": "written",
      "d.mp4": "written"}
  assert final[f"{bad}.mp4"]["reason"] == reason
  if reason == "timeout":
    assert "still being read after 3 s (--video_timeout)" in final["hang.mp4"]["message"]
  in_pieces = collections.Counter(v["video_id"] for p in pieces for v in p["videos"])
  assert in_pieces == {"a.mp4": 1, "b.mp4": 1, "c.mp4": 1, "d.mp4": 1}
  assert (tracker.counts["written"], tracker.counts["rejected"]) == (4, 1)
