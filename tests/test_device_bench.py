"""benchmarks/device_bench.py --tiny: every case through the committed step (and the PyTorch
mirror where torch is installed), one table, in a process where tensorflow and grain cannot be
imported."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_bench_tiny_runs_every_case():
  from benchmarks import device_bench  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, XLA_FLAGS="")   # one CPU device, as on a one-GPU machine
  # As on the GPU image the issue names: no tensorflow, grain or apache_beam to import.
  run = ("import runpy, sys\n"
         "for m in ('tensorflow', 'grain', 'tensorflow_datasets', 'apache_beam'):\n"
         "  sys.modules[m] = None\n"
         "runpy.run_module('benchmarks.device_bench', run_name='__main__', alter_sys=True)\n")
  out = subprocess.run([sys.executable, "-c", run, "--tiny", "--steps", "1", "--warmup", "1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                       check=True).stdout
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert [(r["case"], r["framework"]) for r in rows] == [
      (c, f) for c in device_bench.CASES for f in ("jax", "torch")]
  for r in rows:
    if r["framework"] == "torch" and "skipped" in r:
      assert "torch is not installed" in r["skipped"]
      continue
    assert r["items_s"] > 0 and r["step_ms"] > 0 and math.isfinite(r["loss"]), r
    if r["framework"] == "jax":
      assert r["device"] == "cpu" and r["mfu"] is None        # no bf16 peak known for a CPU
      assert (r["conv_impl"], r["dtype"]) == ("fast", "float32")   # 'auto' on CPU
      assert r["gflop_per_step"] > 0
  assert "| case | framework |" in out and out.count("| simclr_resnet50 |") == 2
