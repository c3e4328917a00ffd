"""CPU time of data_prep.region on a real clip: find_region on 32 frames, apply_region per frame.

  python -m benchmarks.bench_region [--clip ../shared/data/covid_blues/covid/patient_12_L1.mp4]

CPU time of this process (time.process_time, best of --repeats), not wall time, so that a
shared machine reads about the same. Prints one JSON line with both figures, their budgets
(find_region 150 ms for 32 frames; apply_region 4 ms per frame: data_prep reads and decodes a
frame in more) and the machine; exit status 1 if a figure is over its budget.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

from benchmarks.bench_data_prep import cpu_model
from data_prep import readers, region

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = os.path.join(os.path.dirname(ROOT), "shared", "data", "covid_blues", "covid",
                    "patient_12_L1.mp4")
BUDGET_MS = {"find_region_ms": 150.0, "apply_region_ms_per_frame": 4.0}


def sample(path: str, k: int = 32) -> np.ndarray:
  """``k`` frames spread evenly over the clip, uint8 (k, H, W), as data_prep samples them."""
  n = readers.probe(path).num_frames
  keep = set(np.linspace(0, n - 1, min(k, n)).round().astype(int))
  return np.stack([f for i, f in readers.iter_frames(path) if i in keep])


def cpu_seconds(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.process_time()
    fn()
    best = min(best, time.process_time() - start)
  return best


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.bench_region", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--clip", default=CLIP, help="a video data_prep reads")
  p.add_argument("--frames", type=int, default=32, help="frames sampled for find_region")
  p.add_argument("--size", type=int, default=128, help="apply_region's output side")
  p.add_argument("--repeats", type=int, default=3, help="best of this many")
  a = p.parse_args(argv)
  if not os.path.isfile(a.clip):
    p.error(f"--clip {a.clip}: no such file")
  frames = sample(a.clip, a.frames)
  found = region.find_region(frames)
  figures = {
      "find_region_ms": 1e3 * cpu_seconds(lambda: region.find_region(frames), a.repeats),
      "apply_region_ms_per_frame": 1e3 * cpu_seconds(
          lambda: [region.apply_region(f, found, (a.size, a.size)) for f in frames],
          a.repeats) / len(frames)}
  over = [k for k, v in figures.items() if v > BUDGET_MS[k]]
  print(json.dumps({
      **{k: round(v, 3) for k, v in figures.items()}, "budget_ms": BUDGET_MS,
      "over_budget": over, "frames": [int(x) for x in frames.shape], "region": found.kind,
      "clip": a.clip, "cpu": cpu_model(),
      "python": platform.python_version(), "date": datetime.date.today().isoformat(),
      "command": "python -m benchmarks.bench_region " + " ".join(argv or sys.argv[1:])}))
  return 1 if over else 0


if __name__ == "__main__":
  sys.exit(main())
