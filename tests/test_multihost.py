"""Two local processes joined by jax.distributed (gloo CPU collectives): equal to one process,
and surviving SIGTERM on one process and SIGKILL of both with bit-exact resumes."""
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from ssl_us import checkpoint, input_pipeline, parallel, train
from tests import fixtures, test_train

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(tmp_path, data, wd, tag, steps=3, workers=0, pace=0.0, fail_at_step=""):
  """The two processes; ``data`` and ``wd`` one path for both, or a pair (one each)."""
  data, wd = ((x, x) if isinstance(x, str) else x for x in (data, wd))
  port = _free_port()
  # No persistent compilation cache: a cache hit in one process and a compile in the other
  # desynchronises the processes' collectives.
  env = {k: v for k, v in os.environ.items()
         if k != "XLA_FLAGS" and not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
  return [subprocess.Popen(
      [sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), "2", str(port),
       data[i], wd[i], str(tmp_path / f"{tag}{i}.json"), str(steps), str(workers), str(pace),
       "3", "", str(fail_at_step)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True) for i in range(2)]


def _finish(procs, tmp_path, tag):
  logs = [fixtures.process_output(p) for p in procs]
  failed = [f"process {i} exited with {p.returncode}:\n{log[:3000]}\n...\n{log[-3000:]}"
            for i, (p, log) in enumerate(zip(procs, logs)) if p.returncode != 0]
  assert not failed, "\n\n".join(failed)
  return [json.loads((tmp_path / f"{tag}{i}.json").read_text()) for i in range(2)], logs


def test_two_processes_equal_one_process(tmp_path):
  data = fixtures.write_dataset(str(tmp_path / "data"), num_videos=8, frames=4)
  outs, logs = _finish(_launch(tmp_path, data, str(tmp_path / "wd"), "out"), tmp_path, "out")
  assert outs[0]["devices"] == 8 and outs[0]["local"] == 4
  # process 0 alone read the shards to index them; process 1 read its cache
  assert ["indexes the train shards" in log for log in logs] == [True, False], logs
  np.testing.assert_allclose(outs[0]["loss"], outs[1]["loss"])
  # The same global batches on one process with 8 devices.
  single = train.train_and_evaluate(test_train.tiny_config(data, num_steps=3),
                                    str(tmp_path / "single"), mesh=parallel.make_mesh(8))
  np.testing.assert_allclose(outs[0]["loss"], single["loss"], rtol=2e-5)
  # Both processes' iterator states were checkpointed.
  step_dir = tmp_path / "wd" / "checkpoints" / "3" / "data"
  assert len([f for f in os.listdir(step_dir) if "process" in f]) == 2, os.listdir(step_dir)


def test_processes_refuse_a_workdir_or_dataset_they_do_not_share(tmp_path):
  """What a pod's hosts must share, checked before the first step, with the same error on both
  processes (no hang): a workdir that is one folder for all (two local folders stand for one
  path on two hosts' own disks), and the same records to plan batches over."""
  data = fixtures.write_dataset(str(tmp_path / "data"), num_videos=8, frames=4)
  other = fixtures.write_dataset(str(tmp_path / "other"), num_videos=10, frames=4)
  wd = str(tmp_path / "wd")
  cases = [((data, data), (wd, wd + "_host1"),
            "workdir {wd} is not one folder shared by the 2 processes: process 1 cannot read "
            "the file process 0 wrote there"),
           ((data, other), (wd, wd),
            "process 1 of 2 holds another dataset (the train records of data.dir) than "
            "process 0")]
  for datas, wds, message in cases:
    procs = _launch(tmp_path, datas, wds, "bad")
    logs = [fixtures.process_output(p, timeout=300) for p in procs]
    for p, log, w in zip(procs, logs, wds):
      assert p.returncode != 0 and message.format(wd=w) in log, log[-3000:]
    assert not os.path.exists(os.path.join(wd, "checkpoints")), os.listdir(wd)
  assert [f for f in os.listdir(wd) if f.startswith(".ssl_us_shared")] == []


def _command_env():
  """A command's environment as a process of two: 4 fake CPU devices, gloo collectives."""
  env = {k: v for k, v in os.environ.items()
         if k != "XLA_FLAGS" and not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4 "
             + os.environ.get("SSL_US_TEST_XLA_FLAGS", ""),
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONPATH=os.path.dirname(HERE))
  return env


def _run_command_on_two_processes(module, *args):
  """`python -m MODULE --multihost --coordinator_address ... --process_id i ARGS` for i = 0, 1:
  the processes and their logs."""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", module, "--multihost", "--coordinator_address",
       f"localhost:{port}", "--num_processes", "2", "--process_id", str(i), *args],
      cwd=os.path.dirname(HERE), env=_command_env(), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, start_new_session=True) for i in range(2)]
  return procs, [fixtures.process_output(p, timeout=600) for p in procs]


def test_the_pretraining_command_joins_processes_given_by_flags(tmp_path):
  """`python -m ssl_us.main --multihost --coordinator_address ... --num_processes 2
  --process_id i` on each of two processes (as on hosts no cluster manager describes): one run,
  both processes' input positions in its checkpoint."""
  data = fixtures.write_dataset(str(tmp_path / "data"), num_videos=8, frames=4)
  (tmp_path / "tiny.py").write_text(
      "from tests import test_train\n\n\ndef get_config():\n"
      f"  return test_train.tiny_config({data!r}, num_steps=2)\n")
  wd = str(tmp_path / "wd")
  procs, logs = _run_command_on_two_processes(
      "ssl_us.main", "--config", str(tmp_path / "tiny.py"), "--workdir", wd)
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  assert '"final_step": 2' in logs[0] and '"final_step"' not in logs[1]   # process 0 reports
  data_files = os.listdir(os.path.join(wd, "checkpoints", "2", "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_files), data_files
  r = subprocess.run([sys.executable, "-m", "ssl_us.main", "--process_id", "1", "--config",
                      str(tmp_path / "tiny.py"), "--workdir", wd], cwd=os.path.dirname(HERE),
                     env=_command_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "--process_id given without --multihost" in r.stderr, r.stderr


def test_a_sweep_runs_every_point_on_both_processes(tmp_path):
  """`python -m ssl_us.sweep --multihost ...`: each point trains on both processes (both input
  positions in its checkpoint) and is evaluated alike by both (each restores it on its own
  device); a point that fails fails on both and the sweep goes on; process 0 writes the records
  and the report."""
  data = fixtures.write_dataset(str(tmp_path / "data"), num_videos=12, frames=4)  # 6 patients
  (tmp_path / "tiny.py").write_text(
      "from tests import test_train\n\n\ndef get_config(arg=None):\n"
      f"  return test_train.sgd_config({data!r}, num_steps=2, ckpt_every=2)\n")
  wd = str(tmp_path / "sweep")
  procs, logs = _run_command_on_two_processes(
      "ssl_us.sweep", "--config", str(tmp_path / "tiny.py"), "--workdir", wd,
      "--grid", "config.data.split=train,nosuch")
  for p, log in zip(procs, logs):
    assert p.returncode == 1 and "[sweep] 2 points run, 1 failed" in log, log[-3000:]
  evaluated = [next(line for line in log.splitlines() if line.startswith(
      "[sweep] data.split=train: knn_acc")) for log in logs]
  assert evaluated[0] == evaluated[1], evaluated
  with open(os.path.join(wd, "sweep.csv")) as f:
    rows = {r["name"]: r for r in csv.DictReader(f)}
  assert {n: r["status"] for n, r in rows.items()} == {"data.split=train": "done",
                                                        "data.split=nosuch": "failed"}
  assert 0.0 <= float(rows["data.split=train"]["knn_acc"]) <= 1.0
  step_dir = os.path.join(wd, "data.split=train", "checkpoints", "2", "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(step_dir))


def test_an_error_on_one_process_ends_both_at_once(tmp_path):
  """Process 1 raises after step 2 (each process with a grain worker). Raised on, the error
  reached jax.distributed's shutdown, whose barrier waited for process 0 while process 0
  waited in a collective for process 1: both were aborted (-6) after 5 minutes. In
  parallel.fail_fast, process 1 ends at once and process 0's next collective fails."""
  data = fixtures.write_dataset(str(tmp_path / "data"), num_videos=8, frames=4)
  procs = _launch(tmp_path, data, str(tmp_path / "wd"), "fail", steps=10, workers=1,
                  fail_at_step=2)
  # The barrier's timeout is 300 s; grain's workers must end with their process.
  logs = [fixtures.process_output(p, timeout=200, children_end_with_it=True) for p in procs]
  assert [p.returncode for p in procs] == [1, 1], logs
  assert "RuntimeError: process 1 fails after step 2" in logs[1], logs[1][-3000:]
  assert "process 1 of 2 ends here (exit status 1)" in logs[1]
  assert "process 0 of 2 ends here (exit status 1)" in logs[0], logs[0][-3000:]
  assert "step 4/10" not in logs[0] + logs[1]


def test_with_one_process_fail_fast_raises_as_usual():
  with pytest.raises(RuntimeError, match="one process"):
    with parallel.fail_fast():
      raise RuntimeError("one process")


def _wait_for_line(proc, prefix, lines):
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(prefix):
      return
  raise AssertionError("".join(lines)[-3000:])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted 10-step two-process run (checkpoints at 3, 6, 9, 10)."""
  tmp_path = tmp_path_factory.mktemp("reference")
  data = fixtures.write_dataset(str(tmp_path / "data"), num_videos=8, frames=4)
  ref_wd = str(tmp_path / "ref")
  ref, _ = _finish(_launch(tmp_path, data, ref_wd, "ref", 10, 1), tmp_path, "ref")
  return data, ref_wd, ref


def test_sigterm_on_one_process_and_sigkill_of_both_resume_bit_exactly(tmp_path, reference):
  """Uninterrupted 10 steps, against: SIGTERM to process 1 alone (both stop at one agreed step,
  save, exit 0), the same command again, SIGKILL of both between checkpoints, the same command
  again. Each process runs 1 grain worker process."""
  data, ref_wd, ref = reference
  wd = str(tmp_path / "wd")

  procs = _launch(tmp_path, data, wd, "term", 10, 1, pace=0.4)
  _wait_for_line(procs[1], "step 2/10", [])
  procs[1].send_signal(signal.SIGTERM)
  term, logs = _finish(procs, tmp_path, "term")
  stop = term[0]["final_step"]
  assert term[1]["final_step"] == stop and 2 <= stop < 9, logs[1][-3000:]
  assert term[0]["preempted"] == term[1]["preempted"] == "SIGTERM"
  data_files = os.listdir(os.path.join(wd, "checkpoints", str(stop), "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_files), data_files

  procs = _launch(tmp_path, data, wd, "kill", 10, 1, pace=0.4)
  lines = []
  _wait_for_line(procs[0], f"step {stop + 1}/10", lines)
  for p in procs:
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
  saved = max(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  assert saved < 10

  rest, _ = _finish(_launch(tmp_path, data, wd, "rest", 10, 1), tmp_path, "rest")
  assert rest[0]["step"] == list(range(saved + 1, 11))
  assert rest[0]["loss"] == rest[1]["loss"] == ref[0]["loss"][saved:]
  fixtures.assert_states_equal(checkpoint.load_state(wd)[2],
                                    checkpoint.load_state(ref_wd)[2])
  for i in range(2):
    name = f"process_{i}-of-2.json"
    got, want = (open(os.path.join(d, "checkpoints", "10", "data", name)).read()
                 for d in (wd, ref_wd))
    assert json.loads(got) == json.loads(want)


def test_a_run_resumes_on_another_number_of_processes(tmp_path, reference):
  """The reference's step 9 resumed on one process (a smaller slice after a preemption), and
  written by one process then resumed on two: step 10 takes the reference's global batch from
  the reference's state. (A step written by another number of processes did not restore with
  grain's own iterator state, so neither run could resume.) Compared: one step from a shared
  state, as in fixtures' sharded == single device checks."""
  data, ref_wd, ref = reference
  want = checkpoint.load_state(ref_wd, 10)[2]
  down = str(tmp_path / "down")
  shutil.copytree(ref_wd, down)
  shutil.rmtree(os.path.join(down, "checkpoints", "10"))
  rest = train.train_and_evaluate(test_train.tiny_config(data, num_steps=10, ckpt_every=3),
                                  down, mesh=parallel.make_mesh(8))
  assert rest["step"] == [10]
  np.testing.assert_allclose(rest["loss"], ref[0]["loss"][9:], rtol=2e-5)
  errors = fixtures.normwise_errors(checkpoint.load_state(down)[2].params, want.params)
  assert max(errors.values()) <= fixtures.FLOAT32_STEP_RTOL, errors

  up = str(tmp_path / "up")       # the reference's step 9, as one process saves it
  shutil.copytree(ref_wd, up, ignore=shutil.ignore_patterns("checkpoints"))
  config, _, state = checkpoint.load_state(ref_wd, 9)
  manager = checkpoint.make_manager(up, config)
  checkpoint.save(manager, 9, state, input_pipeline.InputPosition(9))
  manager.wait_until_finished()
  assert [f for f in os.listdir(os.path.join(up, "checkpoints", "9", "data"))
          if f.startswith("process")] == ["process_0-of-1.json"]
  rest, _ = _finish(_launch(tmp_path, data, up, "up", 10, 1), tmp_path, "up")
  assert rest[0]["step"] == rest[1]["step"] == [10]
  assert rest[0]["loss"] == ref[0]["loss"][9:]            # as the reference: two processes
  fixtures.assert_states_equal(checkpoint.load_state(up)[2], want)


def test_a_file_only_process_1_checks_fails_the_step_on_both_processes(tmp_path, reference):
  """Each process hashes its share of a step's files; a changed file in process 1's share
  makes both processes fall back to the step before, and the run ends as the reference."""
  data, ref_wd, ref = reference
  wd = str(tmp_path / "wd")
  shutil.copytree(ref_wd, wd)
  step_dir = os.path.join(wd, "checkpoints", "10")
  with open(os.path.join(step_dir, checkpoint.CHECKSUMS)) as f:
    share_1 = sorted(json.load(f)["files"])[1::2]
  path = os.path.join(step_dir, max(share_1, key=lambda r: os.path.getsize(
      os.path.join(step_dir, r))))
  b = bytearray(open(path, "rb").read())
  b[len(b) // 2] ^= 0x01
  open(path, "wb").write(bytes(b))
  checkpoint.verify_checksums(step_dir, 0, 2)             # process 0's share is intact
  rest, logs = _finish(_launch(tmp_path, data, wd, "rest", 10, 1), tmp_path, "rest")
  for log in logs:
    assert (f"WARNING: checkpoint step 10 in {wd}/checkpoints does not restore (on process 1: "
            f"DATA_LOSS: {path} has changed since it was saved") in log, log[-3000:]
  assert rest[0]["step"] == rest[1]["step"] == [10]
  assert rest[0]["loss"] == ref[0]["loss"][9:]
  fixtures.assert_states_equal(checkpoint.load_state(wd)[2], checkpoint.load_state(ref_wd)[2])
