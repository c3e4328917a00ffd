"""The training spine: sharded == single device, resume == uninterrupted, load_encoder, configs."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import awcl_fetal, byol_lung, simclr_lung3d, simclr_muscle, uscl
from ssl_us import checkpoint, flops, input_pipeline, parallel, train
from ssl_us.methods import method_class
from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return fixtures.write_dataset(str(tmp_path_factory.mktemp("data")), num_videos=8, frames=4)


def tiny_config(data_dir, **over):
  c = simclr_muscle.get_config("runlocal")
  c.data.dir = data_dir
  c.data.num_workers = 0
  c.image_size = (16, 16)
  c.batch_size = 8
  c.num_steps = 4
  c.log_every = 1
  c.ckpt_every = 2
  c.progress_bar = False
  c.model.encoder_kwargs.width = 4
  c.model.encoder_kwargs.dropout_rate = 0.0  # dropout masks are per device by design
  c.model.head_hidden = (16,)
  c.model.head_out = 8
  for k, v in over.items():
    c[k] = v
  return c


def sgd_config(data_dir, **over):
  """tiny_config with SGD and no warmup, for the 8 == 1 device checks (fixtures: Adam's first
  update is elementwise g / |g|, so a zero gradient's rounding noise would become +-lr)."""
  c = tiny_config(data_dir, **over)
  c.optim.update(name="sgd", base_lr=0.1, momentum=0.9, warmup_steps=0)
  return c


def test_eight_devices_equal_one_device(dataset):
  """Same global batch on 8 fake devices and on 1, each step from the same state: loss,
  gradient, BatchNorm statistics (global) and the update, to float32 rounding."""
  errors = fixtures.assert_sharded_step_equals_single_device(sgd_config(dataset), steps=2)
  assert len(errors) == 2


def test_equivalence_check_catches_per_device_batchnorm(dataset, monkeypatch):
  """The check above can fail: BatchNorm statistics taken per device (one example each)
  instead of over the global batch differ from one device by far more than the tolerance."""
  from ssl_us import models
  batch_norm = models.batch_norm
  monkeypatch.setattr(models, "batch_norm",
                      lambda train, axis_name, dtype, **kw: batch_norm(train, None, dtype, **kw))
  errors = fixtures.sharded_step_errors(sgd_config(dataset), steps=1, full=False)
  assert errors[0]["grads"] > 100 * fixtures.FLOAT32_STEP_RTOL, errors


def test_resume_equals_uninterrupted(dataset, tmp_path):
  config = tiny_config(dataset, num_steps=4)
  mesh = parallel.make_mesh(2)
  full = train.train_and_evaluate(config, str(tmp_path / "full"), mesh=mesh)
  first = train.train_and_evaluate(config, str(tmp_path / "split"), mesh=mesh, max_steps=2)
  rest = train.train_and_evaluate(config, str(tmp_path / "split"), mesh=mesh)
  assert first["step"] == [1, 2] and rest["step"] == [3, 4]
  assert first["loss"] + rest["loss"] == full["loss"]          # bit for bit
  fixtures.assert_states_equal(checkpoint.load_state(str(tmp_path / "split"))[2],
                               checkpoint.load_state(str(tmp_path / "full"))[2])


def test_prefetching_loop_equals_the_synchronous_one(dataset, tmp_path):
  """config.prefetch = 2 (the next batch on the devices during the step) and 1 (placed when
  taken): the same losses and final state, bit for bit."""
  mesh = parallel.make_mesh(2)
  runs = {p: train.train_and_evaluate(tiny_config(dataset, num_steps=4, prefetch=p),
                                      str(tmp_path / f"p{p}"), mesh=mesh) for p in (1, 2)}
  assert runs[1]["loss"] == runs[2]["loss"] and len(runs[2]["loss"]) == 4
  fixtures.assert_states_equal(checkpoint.load_state(str(tmp_path / "p1"))[2],
                               checkpoint.load_state(str(tmp_path / "p2"))[2])


def test_a_workdir_resumes_only_the_experiment_it_holds(dataset, tmp_path):
  """Resuming under another temperature or dataset is refused, naming what changed, and
  leaves the workdir as it was; how long and how it runs may change (logged); with
  resume_with_changes the run goes on, keeping the config it had."""
  mesh, wd = parallel.make_mesh(2), str(tmp_path / "wd")
  first = train.train_and_evaluate(tiny_config(dataset, num_steps=2), wd, mesh=mesh)
  assert first["step"] == [1, 2]
  saved = {k: open(os.path.join(wd, f"{k}.json")).read() for k in ("config", "dataset")}
  assert json.loads(saved["dataset"])["records"] == 32
  other = fixtures.write_dataset(str(tmp_path / "other"), num_videos=9, frames=4)
  for config, message in [
      (tiny_config(dataset, num_steps=4, loss=dict(temperature=0.1, dense_limit_mb=1024,
                                                   impl="auto")),
       r"\n  loss.temperature: 0.5 -> 0.1\n  \(num_steps: 2 -> 4: may change\)\nUse a new "
       r"workdir, or set config.resume_with_changes"),
      (tiny_config(other, num_steps=4),
       r"the train records of data.dir: 32 records of 8 videos \(.*\) -> 36 of 9 \(.*\), not")]:
    with pytest.raises(checkpoint.ResumeError, match=message):
      train.train_and_evaluate(config, wd, mesh=mesh)
    assert {k: open(os.path.join(wd, f"{k}.json")).read() for k in saved} == saved
  # a copy of the dataset elsewhere, two more steps, another logging cadence: resumed, logged
  copy = str(tmp_path / "copy")
  shutil.copytree(dataset, copy)
  logs = []
  more = train.train_and_evaluate(tiny_config(copy, num_steps=4, log_every=2), wd, mesh=mesh,
                                  log_fn=logs.append)
  assert more["step"] == [4] and any(
      "with changes:" in m and "data.dir: " in m and "log_every: 1 -> 2" in m and
      "num_steps: 2 -> 4" in m for m in logs), logs
  # asked to, the run goes on under the new temperature; the config it had is kept
  changed = tiny_config(copy, num_steps=5, log_every=2, resume_with_changes=True,
                        loss=dict(temperature=0.1, dense_limit_mb=1024, impl="auto"))
  assert train.train_and_evaluate(changed, wd, mesh=mesh)["final_step"] == 5
  kept = [f for f in os.listdir(wd) if f.startswith("config.") and f != "config.json"]
  assert len(kept) == 2  # before the copy's run, before this one
  assert checkpoint.load_config(wd).loss.temperature == 0.1


def test_checkpoint_saved_while_a_batch_is_prefetched_resumes_at_that_batch(dataset, tmp_path):
  """The step-2 checkpoint of a 4-step run was written while batch 3 sat on the devices: its
  input state is that before batch 3, so resuming from it repeats steps 3 and 4 exactly."""
  mesh = parallel.make_mesh(2)
  config = tiny_config(dataset, num_steps=4, ckpt_every=2, keep_checkpoints=5)
  full = train.train_and_evaluate(config, str(tmp_path / "full"), mesh=mesh)
  shutil.copytree(tmp_path / "full", tmp_path / "from2")
  shutil.rmtree(tmp_path / "from2" / "checkpoints" / "4")
  rest = train.train_and_evaluate(config, str(tmp_path / "from2"), mesh=mesh)
  assert rest["step"] == [3, 4] and rest["loss"] == full["loss"][2:]
  fixtures.assert_states_equal(checkpoint.load_state(str(tmp_path / "from2"))[2],
                               checkpoint.load_state(str(tmp_path / "full"))[2])


@pytest.mark.parametrize("workers", [(0, 2), (1, 2)])
def test_resume_with_other_input_workers_equals_uninterrupted(dataset, tmp_path, workers):
  """data.num_workers may change on resume: the checkpoint holds the input position in global
  batches, not grain's per-worker iterator layout (with it, 0 -> 2 workers failed to restore
  and 1 -> 2 resumed at the wrong batch)."""
  mesh = parallel.make_mesh(2)
  before, after = (tiny_config(dataset, num_steps=4, data=dict(dir=dataset, split="train",
                                                               num_workers=w)) for w in workers)
  full = train.train_and_evaluate(before, str(tmp_path / "full"), mesh=mesh)
  first = train.train_and_evaluate(before, str(tmp_path / "split"), mesh=mesh, max_steps=2)
  logs = []
  rest = train.train_and_evaluate(after, str(tmp_path / "split"), mesh=mesh, log_fn=logs.append)
  assert first["step"] == [1, 2] and rest["step"] == [3, 4]
  assert first["loss"] + rest["loss"] == full["loss"]          # bit for bit
  assert (f"resumed at step 2 of {tmp_path}/split/checkpoints; input at global batch 2; "
          f"processes 1, devices 2, input workers per process {workers[1]}") in logs, logs
  fixtures.assert_states_equal(checkpoint.load_state(str(tmp_path / "split"))[2],
                               checkpoint.load_state(str(tmp_path / "full"))[2])


def test_a_checkpoint_with_grains_iterator_state_resumes_at_its_step(dataset, tmp_path):
  """Checkpoints written before InputPosition hold grain's own iterator state: their input
  resumes at their step (a batch a step), as the uninterrupted run."""
  config, mesh = tiny_config(dataset, num_steps=4), parallel.make_mesh(2)
  full = train.train_and_evaluate(config, str(tmp_path / "full"), mesh=mesh)
  first = train.train_and_evaluate(config, str(tmp_path / "old"), mesh=mesh, max_steps=2)
  step_dir = tmp_path / "old" / "checkpoints" / "2"
  (step_dir / "data" / "process_0-of-1.json").write_text('{\n    "next_index": 2\n}')
  checkpoint.write_checksums(str(step_dir))       # as that version's save wrote them
  rest = train.train_and_evaluate(config, str(tmp_path / "old"), mesh=mesh)
  assert rest["step"] == [3, 4] and first["loss"] + rest["loss"] == full["loss"]


@pytest.mark.parametrize("size", [1, 2, 3])
def test_device_prefetch_order_limit_and_state(size):
  it, placed = iter(range(100)), []
  put = lambda b: (placed.append(b), -b)[1]
  pf = input_pipeline.DevicePrefetch(it, put, size=size, limit=5, start=7)
  position = lambda: json.loads(pf.get_state())["global_batches"]
  assert position() == 7                                      # the iterator's first batch
  assert next(pf) == 0 and placed == list(range(size))        # size - 1 batches ahead
  assert position() == 8                                      # the first batch not taken
  assert [next(pf) for _ in range(4)] == [-1, -2, -3, -4]
  with pytest.raises(StopIteration):
    next(pf)
  assert placed == [0, 1, 2, 3, 4] and next(it) == 5          # never past the limit
  assert position() == 12
  restored = input_pipeline.InputPosition()
  restored.set_state(pf.get_state())
  assert restored.global_batches == 12
  restored.set_state(b'{"next_index": 3}')   # grain's own state (older checkpoints): unknown
  assert restored.global_batches is None
  with pytest.raises(ValueError, match="prefetch size must be >= 1"):
    input_pipeline.DevicePrefetch(it, put, size=0)


def test_training_without_tensorflow_logs_what_clus_writer_logs(dataset, tmp_path):
  """A host without tensorflow (a GPU/TPU image): clu's writer cannot be imported there, so the
  run logs through tensorboard's own event writer. Same losses as with tensorflow, and the same
  TensorBoard scalars and hyperparameters as clu's writer wrote."""
  script = ("import json, sys\n"
            "for m in ('tensorflow', 'tensorflow_datasets'):\n"
            "  sys.modules[m] = None\n"
            "from tests.test_train import tiny_config\n"
            "from ssl_us import train\n"
            "h = train.train_and_evaluate(tiny_config(sys.argv[1]), sys.argv[2])\n"
            "print(json.dumps(h['loss']))\n")
  r = subprocess.run([sys.executable, "-c", script, dataset, str(tmp_path / "no_tf")], cwd=ROOT,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "tensorflow is not installed" in r.stderr
  with_tf = train.train_and_evaluate(tiny_config(dataset), str(tmp_path / "tf"))
  assert json.loads(r.stdout.splitlines()[-1]) == with_tf["loss"]
  from ssl_us import sweep  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  timing = {"steps_per_sec", "views_per_sec", "eta_min",   # wall-clock rates differ
            "model_tflops_per_device"}
  logs = {}
  for name in ("no_tf", "tf"):
    scalars = sweep.read_scalars(str(tmp_path / name / "logs"))
    logs[name] = {k: v for k, v in scalars.items() if k not in timing}
    acc = event_accumulator.EventAccumulator(str(tmp_path / name / "logs"))
    acc.Reload()
    assert "_hparams_/session_start_info" in acc.summary_metadata, name
  assert logs["no_tf"] == logs["tf"]
  assert [s for s, _ in logs["tf"]["loss"]] == [1, 2, 3, 4]


def test_device_memory_is_the_largest_peak():
  class Device:
    def __init__(self, stats):
      self.stats = stats

    def memory_stats(self):
      return self.stats
  gib = 2**30
  devices = [Device({"peak_bytes_in_use": 3 * gib, "bytes_in_use": 1}),
             Device({"peak_bytes_in_use": 5 * gib}), Device(None),
             Device({"bytes_in_use": 9 * gib})]
  assert train.device_memory(devices) == {"process_peak_memory_gib": 5.0}
  assert train.device_memory([Device(None)]) == {}


def test_runs_log_model_flops_per_device(dataset, tmp_path, monkeypatch):
  """model_tflops_per_device = the step's model FLOPs per device (ssl_us/flops.py) * steps/s;
  every FLOP of the step scales with the examples a device holds, so 2 devices count half of
  1 device's. No mfu on CPU: no peak is known, and the log says so."""
  per_device, said = {}, []
  # CPU devices report no memory (device_memory: {}); a stand-in shows what is logged.
  assert train.device_memory(parallel.make_mesh(2).devices.flat) == {}
  monkeypatch.setattr(train, "device_memory",
                      lambda devices: {"process_peak_memory_gib": float(len(devices))})
  for n in (1, 2):
    h = train.train_and_evaluate(tiny_config(dataset, num_steps=2), str(tmp_path / f"d{n}"),
                                 mesh=parallel.make_mesh(n), log_fn=said.append)
    rates = [t * 1e12 / s for t, s in zip(h["model_tflops_per_device"], h["steps_per_sec"])]
    assert rates == pytest.approx([rates[0]] * 2, rel=1e-9) and rates[0] > 0
    assert "mfu" not in h
    assert h["process_peak_memory_gib"] == [n, n]    # the run's local devices, each log step
    per_device[n] = rates[0]
  assert per_device[2] == pytest.approx(per_device[1] / 2, rel=1e-9)
  assert sum(f"model FLOPs per step and device: {per_device[n] / 1e9:.4g} GFLOP; no known "
             "peak for cpu (float32): no mfu" in m for n in (1, 2) for m in said) == 2
  # A step whose FLOPs cannot be counted still trains, and the log says why.
  def uncounted(jitted, *args):
    raise flops.UncountedLoop("a while loop holds 1 FLOPs per iteration")
  monkeypatch.setattr(flops, "step_flops", uncounted)
  said.clear()
  h = train.train_and_evaluate(tiny_config(dataset, num_steps=2), str(tmp_path / "uncounted"),
                               mesh=parallel.make_mesh(1), log_fn=said.append)
  assert h["final_step"] == 2 and "model_tflops_per_device" not in h
  assert ("model FLOPs not counted (UncountedLoop: a while loop holds 1 FLOPs per iteration): "
          "no model_tflops_per_device or mfu") in said


def test_load_encoder_round_trip(dataset, tmp_path):
  config = tiny_config(dataset, num_steps=2)
  mesh = parallel.make_mesh(1)
  wd = str(tmp_path / "wd")
  train.train_and_evaluate(config, wd, mesh=mesh)
  module, variables = checkpoint.load_encoder(wd)
  _, method, full = checkpoint.load_variables(wd)
  index = input_pipeline.load_index(dataset, "train")
  x = method.eval_view(np.stack([input_pipeline.read_record(index, i)["frames"][0]
                                 for i in range(4)]))
  feats = checkpoint.encode(module, variables, x)
  ref = method.model.apply({"params": full["params"], "batch_stats": full["batch_stats"]},
                           x, train=False)["h"]
  np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-6)
  assert feats.shape == (4, 8 * 4 * 4)  # 2*width channels at 16/4 x 16/4, flattened
  # The trained encoder differs from a fresh one.
  fresh = method.init(jax.random.key(1), {"image": np.zeros((2, 16, 16, 1), np.uint8)})
  assert not np.allclose(jax.tree.leaves(fresh["params"]["encoder"])[0],
                         jax.tree.leaves(variables["params"])[0])
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 7"):
    checkpoint.load_encoder(wd, step=7)


@pytest.mark.parametrize("override,message", [
    (dict(batch_size=12), "does not divide over 8 devices"),
    (dict(num_steps=0), "num_steps"),
])
def test_config_errors_before_compiling(dataset, override, message):
  with pytest.raises(ValueError, match=message):
    train.build(tiny_config(dataset, **override), parallel.make_mesh(8))


def test_temperature_error(dataset):
  config = tiny_config(dataset)
  config.loss.temperature = 0.0
  with pytest.raises(ValueError, match="temperature must be > 0"):
    train.build(config, parallel.make_mesh(1))


@pytest.mark.parametrize("where", ["workdir", "data.dir"])
@pytest.mark.parametrize("url", ["gs://bucket/run", "s3://bucket/run"])
def test_a_url_is_refused_before_anything_is_written(dataset, tmp_path, monkeypatch, where, url):
  """os.makedirs('gs://b/run') would make a local folder 'gs:' (lost with the machine)."""
  monkeypatch.chdir(tmp_path)
  config = tiny_config(url if where == "data.dir" else dataset)
  workdir = url if where == "workdir" else str(tmp_path / "wd")
  what = "workdir" if where == "workdir" else "config.data.dir"
  with pytest.raises(ValueError, match=f"{what} {url} is a URL; ssl_us reads and writes "
                                       "through the file system: mount the bucket"):
    train.train_and_evaluate(config, workdir, mesh=parallel.make_mesh(1))
  assert os.listdir(tmp_path) == []


def _main(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "ssl_us.main", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--config", "configs/simclr_muscle.py", "--config.no_such_key=1"], "no_such_key"),
    (["--config", "configs/broken_config_for_test.py"], "broken_config_for_test"),
    (["--config", "configs/simclr_muscle.py:bogus"], "unknown config variant 'bogus'"),
])
def test_cli_config_errors(tmp_path, args, message):
  broken = os.path.join(ROOT, "configs", "broken_config_for_test.py")
  if "broken" in args[1]:
    args = ["--config", str(tmp_path / "broken_config_for_test.py")]
    (tmp_path / "broken_config_for_test.py").write_text("def get_config(:\n")
  r = _main(*args, "--workdir", str(tmp_path / "wd"))
  assert r.returncode != 0
  assert message in r.stderr + r.stdout
  assert not os.path.exists(broken)


@pytest.mark.parametrize("arg", [None, "runlocal"])
@pytest.mark.parametrize("config_module, expected", [
    (simclr_muscle, "ssl_us.methods.simclr.SimCLR"),
    (byol_lung, "ssl_us.methods.byol.BYOL"),
    (simclr_lung3d, "ssl_us.methods.simclr_video.SimCLRVideo"),
    (awcl_fetal, "ssl_us.methods.awcl.AWCL"),
    (uscl, "ssl_us.methods.uscl.USCL"),
])
def test_every_pretraining_config_names_a_registered_method(config_module, expected, arg):
  """ssl_us.main builds the method from config.method through the registry: each config's
  method must resolve there to its paper's class."""
  cls = method_class(config_module.get_config(arg).method)
  assert f"{cls.__module__}.{cls.__qualname__}" == expected
