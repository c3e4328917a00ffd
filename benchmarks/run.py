"""Runs the benchmarks and prints one markdown table (plus every figure as JSON).

  python -m benchmarks.run                        # the default set (about 10 minutes)
  python -m benchmarks.run --only step_resnet18_64 input_64
  python -m benchmarks.run --only step_resnet18_64_xla   # flax's own conv/pool: slow
  ./run.sh bench [ARGS]

Each benchmark runs in its own subprocess (fresh JAX and PyTorch thread pools and memory) and
prints one JSON line; see benchmarks/bench_step.py, bench_input.py and bench_ntxent.py for what
is timed. An input row is compared with the step of the same frame size when both ran: the
pipeline's frames/s over the frames/s the step consumes (views/s / 2).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

from benchmarks.bench_data_prep import cpu_model
from data_prep import files as files_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (module, arguments); the step's frame size for input rows comes from 'size'.
BENCHMARKS = {
    "step_resnet18_64": ("bench_step", "--model resnet18 --size 64 --pairs 64 --steps 3 "
                                       "--rounds 2"),
    "step_resnet18_64_bf16": ("bench_step", "--model resnet18 --size 64 --pairs 64 --steps 3 "
                                            "--rounds 2 --dtype bfloat16"),
    "step_resnet18_224": ("bench_step", "--model resnet18 --size 224 --pairs 32 --steps 1 "
                                        "--rounds 3"),
    "step_convnet4_64": ("bench_step", "--model convnet4 --size 64 --pairs 128 --steps 2 "
                                       "--rounds 2"),
    "input_64": ("bench_input", "--size 64 --batch 64"),
    "input_224": ("bench_input", "--size 224 --batch 32 --batches 20"),
    "ntxent_8192": ("bench_ntxent", "--batch 8192 --dim 128 --devices 8"),
    "step_resnet18_64_xla": ("bench_step", "--model resnet18 --size 64 --pairs 64 --steps 1 "
                                           "--rounds 2 --conv_impl xla"),
}
DEFAULT = [n for n in BENCHMARKS if not n.endswith("_xla")]


def run_one(name: str) -> dict:
  module, args = BENCHMARKS[name]
  cmd = [sys.executable, "-m", f"benchmarks.{module}"] + args.split()
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  if r.returncode != 0:
    return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else
                     f"exit {r.returncode}", "command": " ".join(cmd[1:])}
  out = json.loads(r.stdout.strip().splitlines()[-1])
  out["command"] = "python " + " ".join(cmd[1:])
  return out


def _step_row(name, r):
  jax_s = f"{r['jax_views_s']} views/s ({r['jax_views_per_cpu_s']}/CPU-s)"
  torch_s = (f"{r['torch_views_s']} views/s ({r['torch_views_per_cpu_s']}/CPU-s)"
             if "torch_views_s" in r else "-")
  ratio = f"{r['ratio']} (CPU {r['cpu_ratio']})" if "ratio" in r else "-"
  notes = (f"{r['dtype']}, conv_impl={r['conv_impl']}, {2 * r['pairs']} views of "
           f"{r['size']}x{r['size']}, compile {r['jax_compile_s']} s")
  if "loss_gap" in r:
    notes += f", loss gap {r['loss_gap']:.1e}"
  return [name, jax_s, torch_s, ratio, f"{r['load'][0]}-{r['load'][1]}", notes]


def _input_row(name, r, steps):
  w = sorted(k for k in r if k.startswith("frames_s_workers"))
  figs = ", ".join(f"{r[k]} ({k.removeprefix('frames_s_workers')} workers)" for k in w)
  step = steps.get(r["size"])
  if step:
    need = step["jax_views_s"] / 2
    ratio = f"{max(r[k] for k in w) / need:.1f}x the {need:.1f} frames/s the step uses"
  else:
    ratio = "-"
  notes = f"{r['records']} records, batch {r['batch']}, {r['source']}"
  return [name, f"{figs} frames/s", "-", ratio, f"{r['load'][0]}-{r['load'][1]}", notes]


def _ntxent_row(name, r):
  jax_s = (f"{r['median_s']} s per value+grad, peak RSS {r['peak_rss_mb']} MB of "
           f"{r['machine_memory_mb']} MB")
  notes = (f"{r['devices']} devices, logits {r['logits_per_device'][0]}x"
           f"{r['logits_per_device'][1]} per device, loss {r['loss']}, compile+first "
           f"{r['compile_and_first_s']} s")
  return [name, jax_s, "-", "-", f"{r['load']}", notes]


def table(results: dict) -> str:
  steps = {}  # frame size -> the fastest float32 'fast' step of that size (the hungriest consumer)
  for n, r in results.items():
    if (n.startswith("step_") and "error" not in r and r["conv_impl"] == "fast"
        and r["dtype"] == "float32"
        and r["jax_views_s"] > steps.get(r["size"], {}).get("jax_views_s", 0)):
      steps[r["size"]] = r
  rows = [["benchmark", "JAX", "PyTorch", "ratio JAX/PyTorch", "load", "notes"]]
  for name, r in results.items():
    if "error" in r:
      rows.append([name, "failed", "-", "-", "-", r["error"]])
    elif name.startswith("step_"):
      rows.append(_step_row(name, r))
    elif name.startswith("input_"):
      rows.append(_input_row(name, r, steps))
    else:
      rows.append(_ntxent_row(name, r))
  lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows[1:]]
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run just these")
  p.add_argument("--json", help="also write all results to this file")
  a = p.parse_args(argv)
  names = a.only or DEFAULT
  header = (f"{datetime.date.today().isoformat()}, {cpu_model()}, {os.cpu_count()} cores, "
            f"python -m benchmarks.run {' '.join(sys.argv[1:] if argv is None else argv)}")
  print(header, flush=True)
  results = {}
  for name in names:
    results[name] = run_one(name)
    print(f"{name}: {json.dumps(results[name])}", flush=True)
  print()
  print(table(results))
  if a.json:
    files_lib.write_json(a.json, {"header": header, "results": results})
  return 0


if __name__ == "__main__":
  sys.exit(main())
