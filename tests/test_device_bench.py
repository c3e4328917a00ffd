"""benchmarks/device_bench.py --tiny: every case through the committed step (and the PyTorch
mirror where torch is installed), one table, in a process where tensorflow and grain cannot be
imported."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_bench_tiny_runs_every_case(tmp_path):
  from benchmarks import device_bench  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, XLA_FLAGS=fixtures.xla_flags(1))   # one device, as on a 1-GPU machine
  # As on the GPU image the issue names: no tensorflow, grain or apache_beam to import.
  run = ("import runpy, sys\n"
         "for m in ('tensorflow', 'grain', 'tensorflow_datasets', 'apache_beam'):\n"
         "  sys.modules[m] = None\n"
         "runpy.run_module('benchmarks.device_bench', run_name='__main__', alter_sys=True)\n")
  out = subprocess.run([sys.executable, "-c", run, "--tiny", "--steps", "1", "--warmup", "1",
                        "--profile", str(tmp_path)],
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
  # --profile: each JAX case's trace and op summary, one folder deep, the summary printed.
  assert sorted(os.listdir(tmp_path)) == sorted(
      f"{c}.{ext}" for c in device_bench.CASES for ext in ("md", "xplane.pb"))
  for c in device_bench.CASES:
    with open(tmp_path / f"{c}.md") as f:
      summary = f.read()
    assert summary.startswith("# Steps 1-2\n") and "| op | kind | ms/step |" in summary
    assert f"# {c}: profile of steps 1-2\n" in out


def test_a_failing_profile_keeps_the_rows_figures(monkeypatch, tmp_path, capsys):
  """--profile runs after the timing: if tracing fails, the row keeps its figures and says
  why, and the next case can trace again."""
  from benchmarks import device_bench  # pylint: disable=g-import-not-at-top
  from ssl_us import profiling  # pylint: disable=g-import-not-at-top
  calls = []

  def fail_once(*args):
    calls.append(args[-1])
    if len(calls) == 1:
      import jax  # pylint: disable=g-import-not-at-top
      jax.profiler.start_trace(str(tmp_path / "left_running"))
      raise ValueError("no device plane | here")
    return profile(*args)

  profile = device_bench._profile  # pylint: disable=protected-access
  monkeypatch.setattr(device_bench, "_profile", fail_once)
  monkeypatch.setattr(device_bench, "CASES", dict(device_bench.CASES,
                                                  again=device_bench.CASES["simclr_resnet18"]))
  monkeypatch.setattr(device_bench, "TINY", dict(device_bench.TINY,   # the same step again:
                                                 again=device_bench.TINY["simclr_resnet18"]))
  rc = device_bench.main(["--tiny", "--no_torch", "--cases", "simclr_resnet18,again",
                          "--steps", "1", "--warmup", "1", "--profile", str(tmp_path / "p")])
  out = capsys.readouterr().out
  rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert rc == 0 and calls == ["simclr_resnet18", "again"]
  assert rows[0]["profile"] == "failed: ValueError: no device plane / here"
  assert rows[0]["items_s"] > 0 and rows[1]["profile"] == "ok"
  assert "; profile failed: ValueError" in out
  assert profiling.trace_files(str(tmp_path / "left_running"))     # stopped, hence written
  assert sorted(os.listdir(tmp_path / "p")) == ["again.md", "again.xplane.pb"]
  # --count_flops traces the same step without compiling it: the same model FLOPs.
  assert device_bench.main(["--tiny", "--count_flops", "--cases", "simclr_resnet18"]) == 0
  counted = json.loads(capsys.readouterr().out)
  assert counted["model_gflop_per_step"] == rows[0]["gflop_per_step"] > 0
  assert counted["model_gflop_per_item"] == pytest.approx(rows[0]["gflop_per_step"] / 4,
                                                          rel=1e-3)   # --tiny batch: 4 pairs


def test_a_failing_run_is_a_row_and_the_others_go_on(monkeypatch, capsys):
  from benchmarks import device_bench  # pylint: disable=g-import-not-at-top

  def out_of_memory(spec, steps, warmup, profile_dir):
    raise RuntimeError(f"RESOURCE_EXHAUSTED: Out of memory | batch {spec['batch']}\nmore")

  monkeypatch.setattr(device_bench, "run_jax", out_of_memory)
  monkeypatch.setattr(device_bench, "run_torch", lambda spec, steps, warmup, compile_model: {
      "framework": "torch", "device": "cpu", "compiled": False, "step_ms": 2.0,
      "items_s": spec["batch"] / 2e-3, "compile_and_warmup_s": 0.0, "loss": 1.0})
  rc = device_bench.main(["--tiny", "--cases", "simclr_resnet18,simclr_resnet50"])
  out = capsys.readouterr()
  assert rc == 1
  rows = [json.loads(line) for line in out.out.splitlines() if line.startswith("{")]
  assert [(r["case"], r["framework"], "error" in r) for r in rows] == [
      ("simclr_resnet18", "jax", True), ("simclr_resnet18", "torch", False),
      ("simclr_resnet50", "jax", True), ("simclr_resnet50", "torch", False)]
  assert rows[0]["skipped"] == ("failed: RuntimeError: RESOURCE_EXHAUSTED: Out of memory / "
                                "batch 4")
  assert "Traceback" in out.err and out.out.count("| torch | cpu | 2000.0 | 2.0 |") == 2


def test_a_step_out_of_memory_runs_again_rematerialized_then_with_gradient_caching(
    monkeypatch, capsys):
  """Out of device memory: the same step again with its blocks rematerialized, then over 2
  microbatches as well (for real), and the row and table say so; any other error is not
  retried."""
  from benchmarks import device_bench  # pylint: disable=g-import-not-at-top
  run_jax, tried = device_bench.run_jax, []

  def fits_from_two(spec, steps, warmup, profile_dir):
    tried.append((spec["remat"], spec["microbatches"]))
    if spec["microbatches"] < 2:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.1GiB")
    return run_jax(spec, steps, warmup, profile_dir)

  monkeypatch.setattr(device_bench, "run_jax", fits_from_two)
  rc = device_bench.main(["--tiny", "--no_torch", "--cases", "simclr_resnet18",
                          "--steps", "1", "--warmup", "1"])
  out = capsys.readouterr()
  row = json.loads(next(line for line in out.out.splitlines() if line.startswith("{")))
  assert rc == 0 and tried == [(False, 1), (True, 1), (True, 2)]
  assert row["remat"] is True and row["microbatches"] == 2
  assert row["items_s"] > 0 and math.isfinite(row["loss"]) and row["temp_gib"] >= 0
  assert ("blocks rematerialized and 2 microbatches (gradient caching) after running out of "
          "memory") in out.out
  assert ("out of device memory with remat off, 1 microbatch(es); again with remat on, "
          "1 microbatch(es)") in out.err
  assert "again with remat on, 2 microbatch(es)" in out.err

  tried.clear()

  def broken(spec, steps, warmup, profile_dir):
    tried.append((spec["remat"], spec["microbatches"]))
    raise ValueError("not a memory problem")

  monkeypatch.setattr(device_bench, "run_jax", broken)
  assert device_bench.main(["--tiny", "--no_torch", "--cases", "simclr_resnet18"]) == 1
  assert tried == [(False, 1)]


def _device_call(out, *args, budget):
  env = dict(os.environ, XLA_FLAGS=fixtures.xla_flags(1), CALL_BUDGET_S=str(budget),
             PYTHONPATH=ROOT,   # python3 is this interpreter, as on the device image
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
             REMAT_ARGS="--encoder resnet18 --width 2 --size 16 --batch 2 --conv_impl xla")
  return subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_call.sh"), str(out),
                         *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_prepared_device_call_keeps_its_logs_and_budget(tmp_path):
  """benchmarks/device_call.sh: device_bench's log, then remat_memory's while the budget
  allows; device_bench's exit status is the call's."""
  done = _device_call(tmp_path / "ok", "--count_flops", "--tiny", "--cases", "simclr_resnet18",
                      budget=10_000)
  assert done.returncode == 0, done.stderr
  bench = (tmp_path / "ok" / "device_bench.log").read_text()
  assert json.loads(bench.splitlines()[-1])["model_gflop_per_step"] > 0
  remat = [json.loads(line) for line in (tmp_path / "ok" / "remat_memory.log").read_text()
           .splitlines()]
  assert [(r["remat"], r["barriers"]) for r in remat] == [(False, 0), (True, 8)]

  failed = _device_call(tmp_path / "failed", "--cases", "no_such_case", budget=0)
  assert failed.returncode == 1
  assert "KeyError: 'no_such_case'" in (tmp_path / "failed" / "device_bench.log").read_text()
  assert re.fullmatch(r"remat_memory skipped: -?\d+ s of the call's 0 s left\n",
                      (tmp_path / "failed" / "remat_memory.log").read_text())
