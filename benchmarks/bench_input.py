"""Input pipeline throughput: frames per second of ssl_us.input_pipeline from data_prep shards.

  python -m benchmarks.bench_input --size 64 --batch 64
  python -m benchmarks.bench_input --size 224 --batch 32 --num_workers 0 2
  python -m benchmarks.bench_input --size 224 --batch 32 --frame_encoding raw

Shards: the COVID-BLUES clips in ../shared/data/covid_blues, made into frame-mode shards by the
data_prep CLI (3 frames per second of video, grayscale ``size`` x ``size``, one split) under
``--workdir``; a finished build there is reused (data_prep returns at once). Where the clips are
absent, a synthetic dataset from tests/fixtures.write_dataset of the same frame size is used
instead, and the result says so.

Timed: the grain pipeline exactly as training builds it (``make_dataset`` with FrameSampler:
plan, record reads at their offsets, protobuf parse, frame decode (PNG, or a copy for
``--frame_encoding raw`` shards), batching, optionally
``mp_prefetch`` worker processes), after ``warmup`` batches, for ``batches`` batches. Frames per
second = batch * batches / seconds. Also timed: one ``RecordReader.read`` in this process, with
and without its CRC check, alternated. A training step consumes ``batch`` frames (two views are
made on device), so the pipeline keeps up while its frames/s exceeds the step's views/s / 2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from ssl_us import input_pipeline, samplers_frames

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COVID_BLUES = os.path.join(ROOT, "..", "shared", "data", "covid_blues")


def build_shards(size: int, workdir: str, frame_encoding: str = "png") -> tuple[str, str]:
  """(dataset dir, source name): COVID-BLUES via the data_prep CLI, else a synthetic set."""
  if os.path.isdir(COVID_BLUES):
    out = os.path.join(workdir, f"covid_blues_{size}" + ("" if frame_encoding == "png" else
                                                         f"_{frame_encoding}"))
    cmd = [sys.executable, "-m", "data_prep", "--input", COVID_BLUES, "--output", out,
           "--fps", "3", "--patient_regex", r"patient_(?P<patient>\d+)_", "--size", str(size),
           str(size), "--splits", "train=1.0", "--salt", "bench", "--num_workers", "2",
           "--frame_encoding", frame_encoding, "--no_progress"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if r.returncode not in (0, 3):  # 3: finished, some inputs rejected
      raise RuntimeError(f"data_prep failed ({r.returncode}): {r.stderr[-2000:]}")
    return os.path.join(out, "ultrasound", "1.0.0"), "COVID-BLUES (data_prep --fps 3)"
  if frame_encoding != "png":
    raise SystemExit("--frame_encoding raw needs the COVID-BLUES clips (../shared/data)")
  from tests import fixtures  # pylint: disable=g-import-not-at-top
  out = os.path.join(workdir, f"synthetic_{size}")
  path = os.path.join(out, "tiny", "1.0.0")
  if not os.path.exists(os.path.join(path, "dataset_info.json")):
    path = fixtures.write_dataset(out, num_videos=64, frames=32, size=(size, size),
                                  num_shards=4)
  return path, "synthetic (tests/fixtures.write_dataset; COVID-BLUES absent)"


def frames_per_second(index, batch: int, num_workers: int, batches: int, warmup: int) -> float:
  ds = input_pipeline.make_dataset(index, samplers_frames.FrameSampler(), global_batch=batch,
                                   seed=0, num_workers=num_workers)
  it = iter(ds)
  for _ in range(warmup):
    next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
    assert b["image"].shape[0] == batch
  return batch * batches / (time.perf_counter() - t0)


def read_us_per_record(index, check_crc: bool = True, repeats: int = 3) -> float:
  """Microseconds per ``RecordReader.read`` (pread, CRC check, parse, decode), every record in
  order in this process, best of ``repeats``; ``check_crc=False`` times it without the check."""
  reader = input_pipeline.RecordReader(index)
  saved = input_pipeline._check_crc  # pylint: disable=protected-access
  if not check_crc:
    input_pipeline._check_crc = lambda *a: None  # pylint: disable=protected-access
  try:
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      for i in range(index.num_records):
        reader.read(i)
      best = min(best, time.perf_counter() - t0)
  finally:
    input_pipeline._check_crc = saved  # pylint: disable=protected-access
  return 1e6 * best / index.num_records


def run(size: int = 64, batch: int = 64, num_workers=(0, 2), batches: int = 40,
        warmup: int = 3, workdir: str | None = None, frame_encoding: str = "png") -> dict:
  workdir = workdir or os.path.join(tempfile.gettempdir(), "ssl_us_bench_input")
  t0 = time.perf_counter()
  path, source = build_shards(size, workdir, frame_encoding)
  build_s = time.perf_counter() - t0
  index = input_pipeline.load_index(path, "train")
  out = {"size": size, "batch": batch, "frame_encoding": frame_encoding, "source": source,
         "dataset_dir": path,
         "records": index.num_records, "shard_bytes": sum(os.path.getsize(f) for f in index.files),
         "prepare_s": round(build_s, 1), "load": [round(os.getloadavg()[0], 1)]}
  for w in num_workers:
    out[f"frames_s_workers{w}"] = round(frames_per_second(index, batch, w, batches, warmup), 1)
  for check in (True, False, True, False):  # alternated: the CRC check's share of a read
    key = "read_us_per_record" + ("" if check else "_without_crc")
    out[key] = round(min(out.get(key, float("inf")), read_us_per_record(index, check)), 1)
  out["load"].append(round(os.getloadavg()[0], 1))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--num_workers", type=int, nargs="+", default=[0, 2])
  p.add_argument("--batches", type=int, default=40)
  p.add_argument("--workdir", default=None)
  p.add_argument("--frame_encoding", default="png", choices=("png", "raw"))
  a = p.parse_args(argv)
  print(json.dumps(run(a.size, a.batch, tuple(a.num_workers), a.batches, workdir=a.workdir,
                       frame_encoding=a.frame_encoding)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
