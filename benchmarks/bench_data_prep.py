"""Throughput of data_prep: videos per minute and MB/s, on this machine.

  python -m benchmarks.bench_data_prep --input /work/shared/data/covid_blues \\
      --output /tmp/bench_data_prep --fps 3 --patient_regex 'patient_(?P<patient>\\d+)_' \\
      --num_workers 2

Every argument is passed to ``python -m data_prep`` (``--overwrite`` is added: each run starts
from scratch); add ``--runner beam`` for the Beam DirectRunner. Prints one JSON object: wall
seconds of the whole build (input scan, decoding, writing, merge), videos per minute, input
MB/s (source files read), output MB/s (shards written), record counts, and the machine (CPU
model, cores, Python, date) and command.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time

from data_prep import cli
from data_prep import pipeline


def cpu_model() -> str:
  """The CPU model name from /proc/cpuinfo, else platform.processor()."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def figures(report: dict, seconds: float) -> dict:
  """Throughput figures of one finished build."""
  files = report["files"]
  input_bytes = sum(f.get("input_bytes", 0) for f in files)
  c = report["counts"]
  return {
      "seconds": round(seconds, 2),
      "videos": c["inputs"], "written": c["written"], "rejected": c["rejected"],
      "records": c["records"], "frames": c["frames"],
      "input_mb": round(input_bytes / 2**20, 2), "output_mb": round(c["bytes"] / 2**20, 2),
      "videos_per_minute": round(60 * c["inputs"] / seconds, 1),
      "input_mb_per_s": round(input_bytes / 2**20 / seconds, 3),
      "output_mb_per_s": round(c["bytes"] / 2**20 / seconds, 3),
      "records_per_s": round(c["records"] / seconds, 1),
  }


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  input_path, output, args = cli.parse(argv + ["--overwrite"])
  t0 = time.perf_counter()
  report = pipeline.build(input_path, output, **args)
  seconds = time.perf_counter() - t0
  out = figures(report, seconds)
  out.update(
      machine={"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
               "system": platform.platform()},
      date=datetime.datetime.now().isoformat(timespec="seconds"),
      command="python -m benchmarks.bench_data_prep " + " ".join(argv),
      dataset_dir=report["dataset_dir"])
  print(json.dumps(out, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
