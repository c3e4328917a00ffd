"""ssl_us.sweep: grids and names, errors before any run, skip/resume/failure, the report, and
the evaluation's metrics by hand."""
import csv
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import awcl_fetal, simclr_muscle
from ssl_us import sweep, train
from ssl_us.eval import embeddings
from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Grids and names.


def test_get_sweep_grids_expand_and_name_their_points():
  points = sweep.make_points(simclr_muscle.get_sweep(sweep.hyper))
  assert len(points) == 20
  assert points[0] == sweep.Point("loss.temperature=0.05,batch_size=128",
                                  {"loss.temperature": 0.05, "batch_size": 128})
  assert points[-1].name == "loss.temperature=1.0,batch_size=1024"
  names = [p.name for p in sweep.make_points(awcl_fetal.get_sweep(sweep.hyper))]
  assert names[:3] == ["awcl.pairs=simclr", "awcl.pairs=clpi",
                       "awcl.granularity=coarse,awcl.anatomy_ratio=0.1"]
  assert len(names) == 2 + 2 * 4


def test_hyper_combinators_by_hand():
  h = sweep.hyper
  assert h.product([h.sweep("a", [1, 2]), h.fixed("b", "x")]) == [{"a": 1, "b": "x"},
                                                                 {"a": 2, "b": "x"}]
  assert h.zipit([h.sweep("a", [1, 2]), h.sweep("b", [3, 4])]) == [{"a": 1, "b": 3},
                                                                    {"a": 2, "b": 4}]
  assert h.chainit([h.sweep("a", [1]), h.sweep("b", [2])]) == [{"a": 1}, {"b": 2}]
  with pytest.raises(sweep.SweepError, match=r"one length, got \[1, 2\]"):
    h.zipit([h.sweep("a", [1]), h.sweep("b", [1, 2])])


def test_grid_flags_are_a_product_with_typed_values(tmp_path):
  s = sweep.build_sweep("configs/simclr_muscle.py:runlocal", str(tmp_path),
                        ["config.loss.temperature=0.1,0.5",
                         "config.image_size=(32, 32),(48,48)"],
                        ["config.data.dir=/data/x", "config.aug.brightness_mode=scale"])
  assert [p.name for p in s.points] == [
      "loss.temperature=0.1,image_size=(32,32)", "loss.temperature=0.1,image_size=(48,48)",
      "loss.temperature=0.5,image_size=(32,32)", "loss.temperature=0.5,image_size=(48,48)"]
  c = s.config(s.points[1])
  assert c.loss.temperature == 0.1 and c.image_size == (48, 48)
  assert c.data.dir == "/data/x" and c.aug.brightness_mode == "scale"
  assert s.base.loss.temperature == simclr_muscle.get_config("runlocal").loss.temperature
  cmd = s.command(s.points[1])
  assert cmd.endswith("--only 'loss.temperature=0.1,image_size=(48,48)'"), cmd
  assert "--grid 'config.image_size=(32, 32),(48,48)'" in cmd


@pytest.mark.parametrize("grids,sets,message", [
    (["config.loss.temprature=0.1"], [], "point loss.temprature=0.1: config has no key "
                                         "'config.loss.temprature'"),
    (["config.optim.nope.x=1"], [], "config has no key 'config.optim.nope'"),
    (["config.loss.temperature=warm"], [], "config.loss.temperature='warm' does not fit"),
    (["config.image_size=64"], [], r"config.image_size=64 is not a tuple like \(64, 64\)"),
    ([], ["config.batch_size=1,2"], "one value"),
    (["config.batch_size"], [], "expected config.KEY=VALUE"),
])
def test_bad_grids_are_errors_naming_the_key(tmp_path, grids, sets, message):
  with pytest.raises(sweep.SweepError, match=message):
    sweep.build_sweep("configs/simclr_muscle.py:runlocal", str(tmp_path), grids, sets)
  assert not os.listdir(tmp_path)


def test_seeds_replicate_every_grid_point(tmp_path):
  s = sweep.build_sweep("configs/simclr_muscle.py:runlocal", str(tmp_path),
                        ["config.loss.temperature=0.1,0.5"], seeds=2)
  assert [p.name for p in s.points] == [
      "loss.temperature=0.1,seed=0", "loss.temperature=0.1,seed=1",
      "loss.temperature=0.5,seed=0", "loss.temperature=0.5,seed=1"]
  assert [s.config(p).seed for p in s.points] == [0, 1, 0, 1]
  assert "--seeds 2 --eval_split" in s.command(s.points[3])
  with pytest.raises(sweep.SweepError, match="the grid already sets config.seed"):
    sweep.build_sweep("configs/simclr_muscle.py:runlocal", str(tmp_path),
                      ["config.seed=0,1"], seeds=2)


def test_a_batch_that_does_not_divide_is_an_error_before_any_run(tmp_path):
  s = sweep.build_sweep("configs/simclr_muscle.py:runlocal", str(tmp_path / "w"),
                        ["config.batch_size=64,12"], ["config.data.dir=/data/x"])
  with pytest.raises(sweep.SweepError, match="point batch_size=12: config.batch_size=12 does "
                                             "not divide over 8 devices"):
    sweep.run(s)
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("workdir,data,message", [
    ("gs://b/sweep", "/data/x", "--workdir gs://b/sweep is a URL"),
    ("w", "gs://b/ds", "point loss.temperature=0.1: config.data.dir gs://b/ds is a URL")])
def test_a_url_is_an_error_before_any_run(tmp_path, monkeypatch, workdir, data, message):
  monkeypatch.chdir(tmp_path)
  s = sweep.build_sweep(os.path.join(ROOT, "configs/simclr_muscle.py:runlocal"), workdir,
                        ["config.loss.temperature=0.1,0.5"], [f"config.data.dir={data}"])
  with pytest.raises(sweep.SweepError, match=message):
    sweep.run(s)
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Evaluation metrics by hand.


def test_alignment_and_uniformity_by_hand():
  z_a = np.array([[2.0, 0.0], [0.0, 1.0]])
  z_b = np.array([[0.0, 3.0], [0.0, 5.0]])
  # Normalised: |(1,0) - (0,1)|^2 = 2 and 0 -> mean 1.
  assert float(embeddings.alignment(z_a, z_b)) == pytest.approx(1.0, rel=1e-6)
  assert float(embeddings.alignment(z_a, z_b, alpha=1)) == pytest.approx(math.sqrt(2) / 2,
                                                                         rel=1e-6)
  # Three points at 0, 90 and 180 degrees: squared distances 2, 4, 2 (each pair twice).
  z = np.array([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0]])
  expected = math.log((4 * math.exp(-4) + 2 * math.exp(-8)) / 6)
  assert float(embeddings.uniformity(z)) == pytest.approx(expected, rel=1e-6)
  with pytest.raises(ValueError, match="at least 2"):
    embeddings.uniformity(z[:1])


def test_leave_patient_out_knn_by_hand():
  # 4 examples, patients 0 0 1 1. Example 0's nearest other-patient example is 2 (same label),
  # example 1's is 3 (label 1 vs its 0), 2's is 0, 3's is 1: 2 of 4 right with k = 1.
  feats = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
  labels = np.array([0, 0, 0, 1])
  groups = np.array([0, 0, 1, 1])
  acc = embeddings.knn_accuracy_leave_group_out(feats, labels, groups, k=1, num_classes=2)
  assert float(acc) == 0.5
  # k = 2: both other-patient examples vote; ties go to class 0 -> 0 0 0 0 vs 0 0 0 1.
  acc = embeddings.knn_accuracy_leave_group_out(feats, labels, groups, k=2, num_classes=2)
  assert float(acc) == 0.75


def test_knn_accuracy_by_hand():
  # Two tight clusters; 5 patients; every held-out example's 2 nearest share its label.
  feats = np.array([[1, 0.1 * i] for i in range(5)] + [[0.1 * i, 1] for i in range(5)], float)
  labels = np.array([0] * 5 + [1] * 5)
  groups = np.array([f"p{i % 5}" for i in range(10)])
  mean, std = embeddings.knn_accuracy_cv(feats, labels, groups, k=2, folds=5)
  assert (mean, std) == (1.0, 0.0)


# ----------------------------------------------------------------------------------------------
# Running: skip, resume, failure, report.


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  # 12 videos: 6 patients, two labels: enough for patient-grouped 5-fold evaluation.
  return fixtures.write_dataset(str(tmp_path_factory.mktemp("data")), num_videos=12, frames=4)


def _config_file(tmp_path, data_dir) -> str:
  path = tmp_path / "tiny_sweep_config.py"
  path.write_text(
      "from tests import test_train\n\n\n"
      "def get_config(arg=None):\n"
      f"  c = test_train.sgd_config({data_dir!r}, num_steps=4, ckpt_every=2)\n"
      "  return c\n")
  return str(path)


def test_sweep_runs_skips_resumes_and_records_failures(dataset, tmp_path, monkeypatch):
  cfg = _config_file(tmp_path, dataset)
  wd = str(tmp_path / "sw")
  grids = ["config.loss.temperature=0.2,0.5", "config.data.split=train,nosuch"]
  s = sweep.build_sweep(cfg, wd, grids)
  names = [p.name for p in s.points]
  # One point was killed after 2 of its 4 steps (its record says 'running').
  killed = s.points[2]                                    # temperature 0.5, split train
  sweep._record(s, killed, "running")
  train.train_and_evaluate(s.config(killed), os.path.join(wd, killed.name), max_steps=2)
  calls = []
  real = train.train_and_evaluate
  monkeypatch.setattr(train, "train_and_evaluate",
                      lambda c, w, **kw: calls.append(os.path.basename(w)) or real(c, w, **kw))
  records = {r["name"]: r for r in sweep.run(s, log=lambda m: None)}
  assert [records[n]["status"] for n in names] == ["done", "failed", "done", "failed"]
  assert "nosuch" in records[names[1]]["error"]            # the failure did not stop the rest
  done = records[names[2]]["metrics"]
  assert done["steps"] == [1, 2, 3, 4]                     # resumed: both invocations' logs
  for k in ("knn_acc", "probe_acc"):
    assert 0.0 <= done[k] <= 1.0
  assert 0.0 <= done["alignment"] <= 4.0 and done["uniformity"] <= 0.0
  assert done["eval_records"] == 48
  # A second invocation: the finished points are skipped, the failed ones tried again.
  calls.clear()
  sweep.run(s, log=lambda m: None)
  assert calls == [names[1], names[3]]
  # Run again with more steps: the finished points go on from their checkpoints, evaluated
  # anew; with another augmentation they would be other experiments: each one fails, named.
  longer = sweep.build_sweep(cfg, wd, grids, sets=["config.num_steps=6"])
  calls.clear()
  again = {r["name"]: r for r in sweep.run(longer, log=lambda m: None)}
  assert calls == names and again[names[0]]["metrics"]["steps"][-2:] == [5, 6]
  other = sweep.build_sweep(cfg, wd, grids,
                            sets=["config.num_steps=6", "config.aug.flip_prob=0.0"])
  failed = {r["name"]: r for r in sweep.run(other, log=lambda m: None)}
  assert [failed[n]["status"] for n in names] == ["failed"] * 4
  assert "aug.flip_prob: 0.5 -> 0.0" in failed[names[0]]["error"], failed[names[0]]["error"]
  calls.clear()
  sweep.run(longer, log=lambda m: None)  # as it was
  assert calls == [names[0], names[1], names[2], names[3]]
  # The report.
  rows = list(csv.DictReader(open(os.path.join(wd, "sweep.csv"))))
  assert [r["name"] for r in rows] == names
  assert rows[0]["config.loss.temperature"] == "0.2" and rows[0]["config.data.split"] == "train"
  assert rows[0]["status"] == "done" and float(rows[0]["knn_acc"]) >= 0
  assert rows[0]["command"].endswith(f"--only {names[0]}")
  md = open(os.path.join(wd, "sweep.md")).read()
  assert md.count("\n") == 2 + len(names) and "| failed |" in md
  for f in ("sweep_knn_acc.png", "sweep_final_loss.png", "loss_curves.png"):
    assert os.path.getsize(os.path.join(wd, f)) > 1000, f


def test_aggregate_on_hand_made_point_workdirs(tmp_path):
  wd = tmp_path / "sw"
  for name, temp, status, metrics in [
      ("loss.temperature=0.1", 0.1, "done", {"knn_acc": 0.75, "final_loss": 2.5}),
      ("loss.temperature=0.5", 0.5, "failed", {})]:
    (wd / name).mkdir(parents=True)
    (wd / name / sweep.POINT_FILE).write_text(json.dumps(dict(
        name=name, overrides={"config.loss.temperature": temp}, status=status,
        metrics=metrics, error="" if metrics else "RuntimeError: boom", command=f"cmd {name}")))
  (wd / "not_a_point").mkdir()
  r = subprocess.run([sys.executable, "-m", "ssl_us.sweep", "--workdir", str(wd), "--aggregate"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  text = (wd / "sweep.csv").read_text().splitlines()
  assert text == [
      "name,status,config.loss.temperature,knn_acc,probe_acc,alignment,uniformity,final_loss,"
      "final_contrastive_acc,views_per_sec,mfu,error,command",
      "loss.temperature=0.1,done,0.1,0.75,,,,2.5,,,,,cmd loss.temperature=0.1",
      "loss.temperature=0.5,failed,0.5,,,,,,,,,RuntimeError: boom,cmd loss.temperature=0.5"]
  assert (wd / "sweep_knn_acc.png").exists() and (wd / "loss_curves.png").exists()
  assert not (wd / "sweep_mfu.png").exists()     # no point has it: no plot


def test_final_train_metrics_reads_the_last_logged_values(tmp_path):
  """Last values of a run's TensorBoard scalars; mfu only where the run logged it."""
  from ssl_us import writers  # pylint: disable=g-import-not-at-top
  w = writers.create_writer(str(tmp_path / "gpu" / "logs"))
  for step, (loss, mfu) in enumerate([(3.0, 0.25), (2.0, 0.375)], start=1):
    w.write_scalars(step, {"loss": loss, "contrastive_acc": 0.5 * step, "views_per_sec": 100.0,
                           "mfu": mfu})
  w.flush()
  assert sweep.final_train_metrics(str(tmp_path / "gpu")) == {
      "steps": [1, 2], "loss_curve": [3.0, 2.0], "final_loss": 2.0,
      "final_contrastive_acc": 1.0, "views_per_sec": 100.0, "mfu": 0.375}
  w = writers.create_writer(str(tmp_path / "cpu" / "logs"))
  w.write_scalars(1, {"loss": 3.0, "views_per_sec": 50.0})
  w.flush()
  assert "mfu" not in sweep.final_train_metrics(str(tmp_path / "cpu"))


def test_report_over_seeds_by_hand(tmp_path):
  wd = tmp_path / "sw"
  nan = float("nan")
  points = [  # temperature, seed, status, knn_acc, final_loss ('' : not in the metrics)
      (0.1, 0, "done", 0.5, 3.0), (0.1, 1, "done", 0.7, 2.0), (0.1, 2, "failed", "", ""),
      (0.5, 0, "done", 0.8, 1.5), (0.5, 1, "done", 0.6, ""), (0.5, 2, "done", 0.7, nan)]
  for temp, seed, status, knn, loss in points:
    name = f"loss.temperature={temp},seed={seed}"
    metrics = {k: v for k, v in [("knn_acc", knn), ("final_loss", loss)] if v != ""}
    (wd / name).mkdir(parents=True)
    (wd / name / sweep.POINT_FILE).write_text(json.dumps(dict(
        name=name, overrides={"config.loss.temperature": temp, "config.seed": seed},
        status=status, metrics=metrics, command=f"cmd {name}")))
  rows = sweep.report(str(wd))
  assert len(rows) == 6
  with open(wd / "sweep_seeds.csv") as f:
    summary = list(csv.DictReader(f))
  assert [(r["config.loss.temperature"], r["seeds"]) for r in summary] == [("0.1", "2/3"),
                                                                           ("0.5", "3/3")]
  t1, t5 = summary
  # 0.1: knn {0.5, 0.7}: mean 0.6, std sqrt((0.1^2 + 0.1^2) / 1); loss {3, 2}: 2.5, sqrt(0.5).
  assert float(t1["knn_acc_mean"]) == pytest.approx(0.6)
  assert float(t1["knn_acc_std"]) == pytest.approx(math.sqrt(0.02))
  assert float(t1["final_loss_mean"]) == pytest.approx(2.5)
  assert float(t1["final_loss_std"]) == pytest.approx(math.sqrt(0.5))
  # 0.5: knn {0.8, 0.6, 0.7}: 0.7, sqrt(0.02 / 2); loss: one finite value, so no std.
  assert float(t5["knn_acc_mean"]) == pytest.approx(0.7)
  assert float(t5["knn_acc_std"]) == pytest.approx(0.1)
  assert float(t5["final_loss_mean"]) == 1.5 and t5["final_loss_std"] == ""
  assert t5["probe_acc_mean"] == "" and t5["probe_acc_std"] == ""
  assert "config.seed" not in summary[0]
  md = (wd / "sweep_seeds.md").read_text().splitlines()
  assert md[0].startswith("| config.loss.temperature | seeds | knn_acc_mean | knn_acc_std |")
  assert md[2].startswith("| 0.1 | 2/3 | 0.6 | 0.1414 |"), md[2]
  assert (wd / "sweep_knn_acc.png").exists()


def test_report_without_replicates_writes_no_seed_summary(tmp_path):
  wd = tmp_path / "sw"
  for seed, knn in [(0, 0.5), (1, 0.7)]:   # only the seed varies: nothing to average over
    name = f"seed={seed}"
    (wd / name).mkdir(parents=True)
    (wd / name / sweep.POINT_FILE).write_text(json.dumps(dict(
        name=name, overrides={"config.seed": seed}, status="done",
        metrics={"knn_acc": knn})))
  sweep.report(str(wd))
  assert not (wd / "sweep_seeds.csv").exists()
  assert (wd / "sweep_knn_acc.png").exists()


def test_emit_commands_prints_one_runnable_command_per_point(tmp_path):
  r = subprocess.run([sys.executable, "-m", "ssl_us.sweep", "--config",
                      "configs/simclr_muscle.py:runlocal", "--workdir", str(tmp_path / "w"),
                      "--set", "config.data.dir=/data/x", "--grid",
                      "config.loss.temperature=0.1,0.5", "--emit", "commands"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, XLA_FLAGS=fixtures.xla_flags(8)))
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 2
  assert lines[1].endswith("--only loss.temperature=0.5")
  assert "--set config.data.dir=/data/x" in lines[0]
  assert not os.path.exists(tmp_path / "w")


def test_emitted_commands_carry_the_multihost_flags_and_join_nothing(tmp_path, capsys,
                                                                     monkeypatch):
  """A job array of multi-host points: --emit commands prints each point's command with
  --multihost and the flags every process shares, without joining processes itself."""
  def join(**kw):
    raise AssertionError(f"joined processes {kw}")
  monkeypatch.setattr(jax.distributed, "initialize", join)
  args = ["--config", os.path.join(ROOT, "configs/simclr_muscle.py:runlocal"), "--workdir",
          str(tmp_path / "w"), "--set", "config.data.dir=/data/x", "--grid",
          "config.loss.temperature=0.1,0.5", "--emit", "commands", "--multihost"]
  assert sweep.main(args + ["--coordinator_address", "h0:1234", "--num_processes", "2"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert [line.split(" --eval_max 2000 ")[1] for line in lines] == [
      f"--multihost --coordinator_address h0:1234 --num_processes 2 --only "
      f"loss.temperature={t}" for t in ("0.1", "0.5")]
  assert sweep.main(args) == 0
  assert capsys.readouterr().out.count(" --multihost --only loss.temperature=") == 2
  with pytest.raises(SystemExit) as e:   # one process's id cannot be every process's
    sweep.main(args + ["--process_id", "1"])
  assert e.value.code == 2 and "--process_id" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    sweep.main(args[:-1] + ["--num_processes", "2"])
  assert "--num_processes given without --multihost" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "w")


def test_online_monitor_changes_no_training_result(dataset, tmp_path):
  """The monitor reads the state between steps (no host sync) and changes nothing: losses and
  final states equal to the bit with and without it; its metrics reach the history."""
  cfg = _config_file(tmp_path, dataset)
  s = sweep.build_sweep(cfg, str(tmp_path / "sw"), ["config.loss.temperature=0.5"])
  config = s.config(s.points[0])
  from ssl_us.methods import make_method
  monitor = sweep.make_monitor(make_method(config), *sweep.eval_set(dataset, "train", 32),
                               every=2)
  plain = train.train_and_evaluate(config, str(tmp_path / "plain"))
  watched = train.train_and_evaluate(config, str(tmp_path / "watched"), monitor=monitor)
  assert watched["loss"] == plain["loss"]
  from ssl_us import checkpoint
  fixtures.assert_states_equal(checkpoint.load_state(str(tmp_path / "watched"))[2],
                               checkpoint.load_state(str(tmp_path / "plain"))[2])
  assert [s for s, _ in watched["monitor/knn_acc"]] == [2, 4]
  assert all(0 <= v <= 1 for _, v in watched["monitor/knn_acc"])
  assert "monitor/knn_acc" in sweep.read_scalars(str(tmp_path / "watched" / "logs"))


def test_parallel_points_run_on_disjoint_device_shares(dataset, tmp_path):
  """--parallel 2 on 8 fake CPU devices: two child processes of 4 devices each; the same
  records as a sequential run would write."""
  cfg = _config_file(tmp_path, dataset)
  wd = tmp_path / "sw"
  r = subprocess.run([sys.executable, "-m", "ssl_us.sweep", "--config", cfg, "--workdir",
                      str(wd), "--grid", "config.loss.temperature=0.2,0.5", "--parallel", "2"],
                     cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, XLA_FLAGS=fixtures.xla_flags(8)))
  assert r.returncode == 0, r.stderr[-3000:]
  for name in ("loss.temperature=0.2", "loss.temperature=0.5"):
    rec = sweep.read_point(str(wd / name))
    assert rec["status"] == "done" and rec["devices"] == 4, rec
    assert rec["metrics"]["steps"] == [1, 2, 3, 4]
  assert "devices [0, 1, 2, 3]" in r.stdout and "devices [4, 5, 6, 7]" in r.stdout
  assert len((wd / "sweep.csv").read_text().splitlines()) == 3


def test_device_env_gives_each_child_its_share(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1 --xla_force_host_platform_device_count=8")
  assert sweep.device_env("cpu", [4, 5, 6, 7], 8)["XLA_FLAGS"] == (
      "--xla_foo=1 --xla_force_host_platform_device_count=4")
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
  assert sweep.device_env("gpu", [2, 3], 4)["CUDA_VISIBLE_DEVICES"] == "6,7"
  with pytest.raises(sweep.SweepError, match="not supported"):
    sweep.device_env("tpu", [0], 4)
