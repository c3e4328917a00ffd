"""Long runs that survive: non-finite steps, damaged checkpoints, SIGTERM/SIGINT, SIGKILL.

Resumed runs are compared with uninterrupted ones bit for bit: parameters, optimizer state,
BatchNorm statistics, method extras (BYOL's EMA target), RNG, step, and the losses of every
step after the restore (so the batches too).
"""
import gc
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssl_us import checkpoint, input_pipeline, parallel, train
from tests import fixtures, test_byol, test_train

# Restoring a damaged checkpoint abandons orbax's other array reads: their coroutines raise
# when closed, unawaited, whenever they are garbage-collected, and a read finishing after its
# event loop closed cannot call back ("Exception ignored in ..."). The fallback under test
# means exactly that, so each test here collects them itself and ignores those two messages
# only, rather than leaving the noise to whichever test runs next in the process.
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <coroutine object _read_array_index_and_device_put"
        ":pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings(
        r"ignore:Exception ignored in. None[\s\S]*RuntimeError. Event loop is closed"
        ":pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(autouse=True)
def _collect_abandoned_reads():
  yield
  gc.collect()

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return fixtures.write_dataset(str(tmp_path_factory.mktemp("data")), num_videos=8, frames=4)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  return fixtures.write_dataset(str(tmp_path_factory.mktemp("clips")), num_videos=8, frames=8,
                                clip_len=4)


# ----------------------------------------------------------------------------------------------
# Non-finite steps.


class _Poisoned:
  """The method, with its loss times NaN (or Inf) when ``bad``: gradients turn non-finite."""

  def __init__(self, method, bad, value):
    self._method, self._bad, self._value = method, bad, value

  def __getattr__(self, name):
    return getattr(self._method, name)

  def loss(self, params, variables, batch, rng):
    loss, aux = self._method.loss(params, variables, batch, rng)
    return loss * jnp.where(self._bad, self._value, 1.0), aux


def poison_steps(monkeypatch, bad_steps, value=jnp.nan):
  """train.make_train_step builds steps whose loss is ``value`` x the loss at ``bad_steps``."""
  real = train.train_step

  def step(state, batch, *, method, **kw):
    bad = jnp.isin(state.step, jnp.asarray(bad_steps))
    return real(state, batch, method=_Poisoned(method, bad, value), **kw)
  monkeypatch.setattr(train, "train_step", step)


@pytest.mark.parametrize("method,value", [("simclr", np.nan), ("byol", np.inf)])
def test_nonfinite_step_leaves_the_state_unchanged(dataset, clips, monkeypatch, method, value):
  config = (test_train.sgd_config(dataset) if method == "simclr"
            else test_byol.tiny_config(clips))
  mesh = parallel.make_mesh(2)
  setup = train.build(config, mesh)
  it = iter(train.make_input(setup, config))
  batches = [parallel.shard_host_batch(next(it), mesh) for _ in range(3)]
  poison_steps(monkeypatch, [1], value)
  step_fn = train.make_train_step(setup.method, setup.tx, setup.schedule, mesh)
  s0 = train.init_state(setup, config, next(it))
  s1, m1 = step_fn(s0, batches[0])
  s1_host = jax.device_get(s1)
  s2, m2 = step_fn(s1, batches[1])         # poisoned
  s2_host = jax.device_get(s2)
  # Nothing moved but the step counter and the streak: parameters, Adam/SGD moments, BatchNorm
  # statistics and (BYOL) the EMA target are bit-equal to the state before.
  for k in ("params", "opt_state", "variables", "rng"):
    jax.tree.map(np.testing.assert_array_equal, getattr(s2_host, k), getattr(s1_host, k))
  assert int(s2_host.step) == 2 and int(s2_host.nonfinite) == 1
  assert int(m2["nonfinite_steps"]) == 1 and int(m2["nonfinite_streak"]) == 1
  assert float(m2["loss"]) == 0.0                      # zeroed, counted out at log steps
  if method == "byol":
    assert "target" in s2_host.variables
  # The next finite step moves the state again and resets the streak.
  s3, m3 = step_fn(s2, batches[2])
  s3_host = jax.device_get(s3)
  assert int(s3_host.nonfinite) == 0 and int(m3["nonfinite_steps"]) == 0
  assert np.isfinite(float(m3["loss"])) and float(m3["loss"]) > 0
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s3_host.params),
                                                      jax.tree.leaves(s2_host.params)))
  assert int(m1["nonfinite_steps"]) == 0


def test_logged_metrics_count_nonfinite_steps_and_average_the_rest(dataset, tmp_path,
                                                                   monkeypatch):
  config = test_train.sgd_config(dataset, num_steps=4, log_every=4, ckpt_every=4)
  clean = train.train_and_evaluate(config, str(tmp_path / "clean"), mesh=parallel.make_mesh(2),
                                   log_fn=lambda m: None)
  poison_steps(monkeypatch, [1, 2])
  hist = train.train_and_evaluate(config, str(tmp_path / "bad"), mesh=parallel.make_mesh(2),
                                  log_fn=lambda m: None)
  assert hist["nonfinite_steps"] == [2] and hist["nonfinite_streak"] == [2]
  assert clean["nonfinite_steps"] == [0] and clean["nonfinite_streak"] == [0]
  assert np.isfinite(hist["loss"][0]) and hist["loss"][0] > 0  # mean of the 2 finite steps


def test_run_stops_after_max_nonfinite_steps_naming_the_last_good_checkpoint(
    dataset, tmp_path, monkeypatch):
  config = test_train.sgd_config(dataset, num_steps=12, log_every=1, ckpt_every=2)
  config.max_nonfinite_steps = 3
  poison_steps(monkeypatch, list(range(4, 100)))    # steps 5, 6, 7, ... are non-finite
  wd = str(tmp_path / "wd")
  with pytest.raises(train.NonFiniteError) as e:
    train.train_and_evaluate(config, wd, mesh=parallel.make_mesh(2), log_fn=lambda m: None)
  msg = str(e.value)
  assert msg.startswith("step 7: 3 steps in a row had a non-finite loss or gradient"), msg
  assert f"step 6 in {wd}/checkpoints" in msg, msg
  # Steps 5 and 6 left the state as step 4 had it, so checkpoint 6 equals checkpoint 4 (but
  # for the step counter and the streak), and nothing non-finite was saved.
  _, _, s4 = checkpoint.load_state(wd, 4)
  _, _, s6 = checkpoint.load_state(wd, 6)
  fixtures.assert_states_equal(s6.replace(step=s4.step, nonfinite=s4.nonfinite), s4)
  assert int(s6.nonfinite) == 2
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4", "6"]


def test_max_nonfinite_steps_must_be_positive(dataset):
  with pytest.raises(ValueError, match="config.max_nonfinite_steps must be an int >= 1, got 0"):
    train.build(test_train.sgd_config(dataset, max_nonfinite_steps=0), parallel.make_mesh(1))


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints.


def _truncate(step_dir):
  for f in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")):
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _garble(step_dir):
  """Every byte of every data file changed. Scattered flips (each 97th byte from a third in,
  as this test had) fail to restore only if one lands where orbax checks (an index node, a
  codec's header), which depends on how orbax happened to lay out the files: a fresh clone's
  suite once restored such a step without an error (array values carry no checksum; README,
  RESULTS.md). Changing every byte also changes the root index node that the manifest points
  to, whatever the layout."""
  for f in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")):
    b = np.frombuffer(open(f, "rb").read(), np.uint8) ^ np.uint8(0x5A)
    open(f, "wb").write(b.tobytes())


def _flip_bit(step_dir, where=0.5):
  """One bit of the largest data file, ``where`` of the way in: in the middle that is nearly
  always inside an array's values, which orbax restores without an error."""
  f = max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
          key=os.path.getsize)
  b = bytearray(open(f, "rb").read())
  b[int(len(b) * where)] ^= 0x10
  open(f, "wb").write(bytes(b))


def _drop_item(step_dir):
  shutil.rmtree(os.path.join(step_dir, "data"))


def _bad_manifest(step_dir):
  with open(os.path.join(step_dir, "state", "manifest.ocdbt"), "wb") as f:
    f.write(b"\0" * 10)


DAMAGES = {"truncated": _truncate, "corrupted": _garble, "one bit": _flip_bit,
           "missing item": _drop_item, "bad manifest": _bad_manifest}


def _drop_checksums(wd):
  """The run as an ssl_us without checksums wrote it."""
  for f in glob.glob(os.path.join(wd, "checkpoints", "*", checkpoint.CHECKSUMS)):
    os.remove(f)


@pytest.fixture(scope="module")
def finished_run(dataset, tmp_path_factory):
  """A 6-step run with checkpoints at 3 and 6, and its final state."""
  wd = str(tmp_path_factory.mktemp("finished") / "wd")
  config = test_train.sgd_config(dataset, num_steps=6, ckpt_every=3, log_every=1)
  history = train.train_and_evaluate(config, wd, mesh=parallel.make_mesh(2),
                                     log_fn=lambda m: None)
  return config, wd, history, checkpoint.load_state(wd)[2]


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(finished_run, tmp_path,
                                                                  damage):
  config, wd0, full, final = finished_run
  wd = str(tmp_path / "wd")
  shutil.copytree(wd0, wd)
  DAMAGES[damage](os.path.join(wd, "checkpoints", "6"))
  messages = []
  rest = train.train_and_evaluate(config, wd, mesh=parallel.make_mesh(2),
                                  log_fn=messages.append)
  warning = [m for m in messages if m.startswith("WARNING: checkpoint step 6")]
  assert len(warning) == 1 and "does not restore" in warning[0], messages
  assert "left in place" in warning[0]
  assert f"{wd}/checkpoints/6/" in warning[0]            # the damaged file, named
  # Restored step 3, replayed 4-6 exactly as the first run did.
  assert rest["step"] == [4, 5, 6]
  assert rest["loss"] == full["loss"][3:]
  fixtures.assert_states_equal(checkpoint.load_state(wd)[2], final)
  # The damaged step was moved aside (not deleted) when step 6 was saved anew.
  moved = glob.glob(os.path.join(wd, "checkpoints.damaged", "6-*"))
  assert len(moved) == 1 and os.path.isdir(moved[0])
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6"]


@pytest.mark.parametrize("checksums", [True, False])
def test_every_checkpoint_damaged_is_an_error_listing_the_steps(finished_run, tmp_path,
                                                               checksums):
  config, wd0, _, _ = finished_run
  wd = str(tmp_path / "wd")
  shutil.copytree(wd0, wd)
  if not checksums:
    _drop_checksums(wd)
  for step in ("3", "6"):
    _truncate(os.path.join(wd, "checkpoints", step))
  # With checksums the size check names the file first; without, tensorstore's check does.
  reason = (r"DATA_LOSS: .*/checkpoints/{}/state/ocdbt.process_0/d/\w+ has \d+ bytes, \d+ at save"
            if checksums else r"OUT_OF_RANGE: .*")
  with pytest.raises(checkpoint.CheckpointError,
                     match=(r"no checkpoint in .* restores; tried step 6: " + reason.format(6)
                            + r"; step 3: " + reason.format(3))):
    train.train_and_evaluate(config, wd, mesh=parallel.make_mesh(2), log_fn=lambda m: None)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6"]  # nothing deleted


@pytest.mark.parametrize("checksums", [True, False])
def test_load_encoder_of_a_damaged_step_names_the_step_and_file(finished_run, tmp_path,
                                                                checksums):
  _, wd0, _, _ = finished_run
  wd = str(tmp_path / "wd")
  shutil.copytree(wd0, wd)
  if not checksums:
    _drop_checksums(wd)
  _truncate(os.path.join(wd, "checkpoints", "6"))
  reason = (r"DATA_LOSS: " + wd + r"/checkpoints/6/state/ocdbt.process_0/d/\w+ has \d+ bytes, "
            r"\d+ at save" if checksums else
            r"OUT_OF_RANGE: Error reading \".*\" in OCDBT database at local file \"" + wd
            + r"/checkpoints/6/state/\".*")
  with pytest.raises(checkpoint.CheckpointError,
                     match=(r"checkpoint step 6 cannot be restored \(" + reason
                            + r"\); other steps: \[3\]")):
    checkpoint.load_encoder(wd, step=6)
  module, variables = checkpoint.load_encoder(wd, step=3)   # the intact one still loads
  assert "params" in variables


def test_a_flipped_bit_that_orbax_restores_wrong_is_found_by_the_checksums(finished_run,
                                                                          tmp_path):
  """What the checksums are for. Without them, a bit flipped inside an array's values restores,
  wrong, without an error. Tried at up to 5 places: a bit on an index node is an error orbax
  reports itself, and one in bytes nothing reads changes nothing."""
  _, wd0, _, final = finished_run
  wd = str(tmp_path / "wd")
  shutil.copytree(wd0, wd)
  step_dir = os.path.join(wd, "checkpoints", "6")
  sums = open(os.path.join(step_dir, checkpoint.CHECKSUMS), "rb").read()
  _drop_checksums(wd)
  for where in (0.5, 0.6, 0.7, 0.8, 0.9):
    _flip_bit(step_dir, where)
    try:
      _, _, wrong = checkpoint.load_state(wd)
      changed = sum(int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in
                    zip(jax.tree.leaves(wrong), jax.tree.leaves(final)))
    except checkpoint.CheckpointError:
      changed = None
    if changed:
      break
    _flip_bit(step_dir, where)                            # undo; try elsewhere
  else:
    pytest.fail("no flipped bit restored wrong without checksums")
  open(os.path.join(step_dir, checkpoint.CHECKSUMS), "wb").write(sums)
  with pytest.raises(checkpoint.CheckpointError, match=r"step 6 cannot be restored \(DATA_LOSS: "
                     + wd + r"/checkpoints/6/state/ocdbt.process_0/d/\w+ has changed since it "
                     r"was saved \(its SHA-256 differs"):
    checkpoint.load_state(wd)


def test_save_lists_the_steps_only_once_the_previous_save_and_its_deletions_are_done(
    tmp_path, monkeypatch):
  """Saves in a row, keeping one step: each save's finalize thread (orbax's) deletes the step
  before it, and a listing of the directory meanwhile can raise FileNotFoundError (seen once:
  one process of a two-process run raised at its last save, the other waited 5 minutes for
  it). The finalize callback is slowed so that the save is surely still in progress when the
  next one starts; no listing may happen while it is."""
  finalize = checkpoint._ChecksumOnFinalize.__call__
  monkeypatch.setattr(checkpoint._ChecksumOnFinalize, "__call__",
                      lambda self: (time.sleep(0.5), finalize(self))[1])
  manager = checkpoint.make_manager(str(tmp_path), ml_collections.ConfigDict(
      dict(keep_checkpoints=1)))
  reload, listed_during_a_save = manager.reload, []
  def recording_reload():
    listed_during_a_save.append(manager.is_saving_in_progress())
    return reload()
  manager.reload = recording_reload
  state = {"w": jnp.arange(4.0)}
  for step in (1, 2, 3):
    checkpoint.save(manager, step, state, input_pipeline.InputPosition(step))
  manager.wait_until_finished()
  assert listed_during_a_save == [False, False, False]
  assert os.listdir(tmp_path / "checkpoints") == ["3"]
  checkpoint.verify_checksums(str(tmp_path / "checkpoints" / "3"))


def test_every_step_holds_the_size_and_sha256_of_every_item_file(finished_run):
  _, wd, _, _ = finished_run
  directory = os.path.join(wd, "checkpoints")
  assert sorted(os.listdir(directory)) == ["3", "6"]           # no temporary directory left
  for step in ("3", "6"):
    step_dir = os.path.join(directory, step)
    with open(os.path.join(step_dir, checkpoint.CHECKSUMS)) as f:
      files = json.load(f)["files"]
    on_disk = sorted(os.path.relpath(os.path.join(root, name), step_dir)
                     for item in ("state", "data")
                     for root, _, names in os.walk(os.path.join(step_dir, item))
                     for name in names)
    assert sorted(files) == on_disk and len(on_disk) > 5
    assert any(f.startswith("state/ocdbt.process_0/d/") for f in files)
    assert "data/process_0-of-1.json" in files
    for rel, want in files.items():
      data = open(os.path.join(step_dir, rel), "rb").read()
      assert want == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    assert checkpoint.verify_checksums(step_dir) is True


def test_a_step_without_checksums_restores_as_before_and_says_so(finished_run, tmp_path):
  config, wd0, full, final = finished_run
  wd = str(tmp_path / "wd")
  shutil.copytree(wd0, wd)
  _drop_checksums(wd)
  shutil.rmtree(os.path.join(wd, "checkpoints", "6"))
  messages = []
  rest = train.train_and_evaluate(config, wd, mesh=parallel.make_mesh(2),
                                  log_fn=messages.append)
  assert [m for m in messages if checkpoint.CHECKSUMS in m] == [
      f"checkpoint step 3 in {wd}/checkpoints has no {checkpoint.CHECKSUMS} (written before "
      "ssl_us wrote checksums): restored with orbax's checks only"]
  assert rest["step"] == [4, 5, 6] and rest["loss"] == full["loss"][3:]
  fixtures.assert_states_equal(checkpoint.load_state(wd)[2], final)
  assert checkpoint.verify_checksums(os.path.join(wd, "checkpoints", "6"))   # new steps have them


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_each_process_checks_its_share_and_together_they_check_every_file(finished_run,
                                                                          tmp_path, parts):
  _, wd0, _, _ = finished_run
  step_dir = str(tmp_path / "6")
  shutil.copytree(os.path.join(wd0, "checkpoints", "6"), step_dir)
  with open(os.path.join(step_dir, checkpoint.CHECKSUMS)) as f:
    listed = sorted(json.load(f)["files"])
  for i in (0, len(listed) // 2, len(listed) - 1):
    path = os.path.join(step_dir, listed[i])
    original = open(path, "rb").read()
    open(path, "wb").write(bytes([original[0] ^ 1]) + original[1:])   # same size
    found = []
    for part in range(parts):
      try:
        checkpoint.verify_checksums(step_dir, part, parts)
      except checkpoint.CheckpointError as e:
        assert str(e).startswith(f"DATA_LOSS: {path} has changed since it was saved"), e
        found.append(part)
    assert found == [i % parts]                       # exactly the share that holds the file
    open(path, "wb").write(original)
  assert all(checkpoint.verify_checksums(step_dir, p, parts) for p in range(parts))


@pytest.mark.parametrize("change,reason", [
    ("added", r"DATA_LOSS: {d}/state/extra was not in the step when it was saved \(1 such"),
    ("removed", r"NOT_FOUND: {d}/data/process_0-of-1.json is missing \(\d+ bytes at save\)"),
    ("checksum file", r"DATA_LOSS: {d}/ssl_us_checksums.json is unreadable \(JSONDecodeError"),
    ("checksum entry", r"DATA_LOSS: {d}/ssl_us_checksums.json is unreadable \(KeyError: 'bytes'"),
])
def test_a_changed_step_layout_is_named(finished_run, tmp_path, change, reason):
  _, wd0, _, _ = finished_run
  step_dir = str(tmp_path / "3")
  shutil.copytree(os.path.join(wd0, "checkpoints", "3"), step_dir)
  if change == "added":
    open(os.path.join(step_dir, "state", "extra"), "w").write("x")
  elif change == "removed":
    os.remove(os.path.join(step_dir, "data", "process_0-of-1.json"))
  elif change == "checksum file":
    with open(os.path.join(step_dir, checkpoint.CHECKSUMS), "r+") as f:
      f.truncate(40)
  else:
    path = os.path.join(step_dir, checkpoint.CHECKSUMS)
    sums = json.load(open(path))
    del next(iter(sums["files"].values()))["bytes"]
    json.dump(sums, open(path, "w"))
  with pytest.raises(checkpoint.CheckpointError, match=reason.format(d=step_dir)):
    checkpoint.verify_checksums(step_dir)


def test_the_command_line_check_names_each_step(finished_run, tmp_path, capsys):
  _, wd0, _, _ = finished_run
  wd = str(tmp_path / "wd")
  shutil.copytree(wd0, wd)
  assert checkpoint.main([wd]) == 0
  out = capsys.readouterr().out.splitlines()
  assert re.fullmatch(r"step 3: \d+ files, [\d,]+ bytes, as saved", out[0]), out
  assert out[2] == f"{wd}/checkpoints: 2 as saved", out
  _flip_bit(os.path.join(wd, "checkpoints", "6"))
  os.remove(os.path.join(wd, "checkpoints", "3", checkpoint.CHECKSUMS))
  assert checkpoint.main([wd]) == 1
  out = capsys.readouterr().out.splitlines()
  assert out[0] == (f"step 3: no {checkpoint.CHECKSUMS} (written before ssl_us wrote "
                    "checksums); unchecked")
  assert out[1].startswith(f"step 6: DATA_LOSS: {wd}/checkpoints/6/state/"), out
  assert out[2] == f"{wd}/checkpoints: 1 without checksums, 1 damaged"
  assert checkpoint.main([str(tmp_path / "empty")]) == 1
  assert capsys.readouterr().out == f"{tmp_path}/empty/checkpoints: no checkpoints\n"


def _deleted_when_checked(monkeypatch, step):
  """verify_checksums as a running pretraining meets it: ``step`` deleted just before (beyond
  keep_checkpoints)."""
  verify = checkpoint.verify_checksums
  def deleting(step_dir, *args):
    if os.path.basename(step_dir) == str(step):
      shutil.rmtree(step_dir)
    return verify(step_dir, *args)
  monkeypatch.setattr(checkpoint, "verify_checksums", deleting)


def test_a_step_deleted_while_it_is_read_or_checked_is_named_so(finished_run, tmp_path,
                                                                 monkeypatch, capsys):
  _, wd0, _, _ = finished_run
  wd = str(tmp_path / "wd")
  shutil.copytree(wd0, wd)
  _deleted_when_checked(monkeypatch, 3)
  assert checkpoint.main([wd]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == (f"step 3: deleted during the check (a run writing {wd} keeps its newest "
                    "keep_checkpoints steps)"), out
  assert re.fullmatch(r"step 6: \d+ files, [\d,]+ bytes, as saved", out[1]), out
  assert out[2:] == [f"{wd}/checkpoints: 1 as saved, 1 deleted during the check"], out
  shutil.copytree(os.path.join(wd0, "checkpoints", "3"), os.path.join(wd, "checkpoints", "3"))
  with pytest.raises(checkpoint.CheckpointError, match=(
      f"{wd}: checkpoint step 3 was deleted while it was read .*; load again")):
    checkpoint.load_state(wd, step=3)


def test_load_state_lists_again_when_orbax_meets_a_step_being_deleted(finished_run,
                                                                       monkeypatch):
  """Orbax lists a workdir's steps as it opens it (a glob, then each step's metadata): a step
  that a running pretraining deletes in between raises FileNotFoundError there (seen with a
  thread deleting steps while another opened read-only managers: 9 of 19 opens failed). The
  first open fails so here; the state still loads."""
  _, wd, _, final = finished_run
  manager, opened = checkpoint.ocp.CheckpointManager, []
  def racing(directory, *args, **kwargs):
    opened.append(directory)
    if len(opened) == 1:
      raise FileNotFoundError(2, "No such file or directory", os.path.join(directory, "3"))
    return manager(directory, *args, **kwargs)
  monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", racing)
  fixtures.assert_states_equal(checkpoint.load_state(wd)[2], final)
  assert len(opened) == 2


def test_reasons_from_several_processes_name_the_first_failing_one(monkeypatch):
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  others = {}

  def allgather(code):
    return np.stack([others.get(i, code) for i in range(3)])
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  assert checkpoint._first_reason(None) is None
  others[2] = np.zeros_like(np.asarray([0] * (checkpoint._REASON_BYTES + 1), np.uint8))
  others[2][0], others[2][1:4] = 1, np.frombuffer(b"bad", np.uint8)
  assert checkpoint._first_reason(None) == "on process 2: bad"
  assert checkpoint._first_reason("mine") == "on process 0: mine"   # every process's own too


# ----------------------------------------------------------------------------------------------
# Signals: SIGTERM/SIGINT save and exit 0; SIGKILL anywhere resumes bit for bit.


def _start(data, wd, out, steps=9, workers=1, pace=0.25):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.Popen(
      [sys.executable, os.path.join(HERE, "survival_worker.py"), data, wd, str(steps),
       str(workers), str(pace), out],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True)


def _wait_for(proc, predicate, lines, timeout=300):
  """Reads the worker's lines until ``predicate(line)``; returns False if it exited first."""
  deadline = time.time() + timeout
  for line in proc.stdout:
    lines.append(line)
    if predicate(line):
      return True
    assert time.time() < deadline, "".join(lines)[-3000:]
  return False


def _finish(proc, lines, timeout=300):
  lines.append(fixtures.process_output(proc, timeout))
  return "".join(lines)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
  """The uninterrupted 9-step run of survival_worker (1 grain worker process)."""
  tmp = tmp_path_factory.mktemp("reference")
  proc = _start(dataset, str(tmp / "wd"), str(tmp / "out.json"), pace=0)
  log = _finish(proc, [])
  assert proc.returncode == 0, log[-3000:]
  history = json.loads((tmp / "out.json").read_text())
  return history, checkpoint.load_state(str(tmp / "wd"))[2], str(tmp / "wd")


def _data_state(wd, step):
  with open(os.path.join(wd, "checkpoints", str(step), "data", "process_0-of-1.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_saves_exits_zero_and_the_same_command_resumes_exactly(dataset, reference,
                                                                      tmp_path, sig):
  ref_history, ref_state, ref_wd = reference
  wd, out = str(tmp_path / "wd"), str(tmp_path / "out.json")
  lines = []
  proc = _start(dataset, wd, out)
  assert _wait_for(proc, lambda l: l.startswith("step 4/9"), lines)   # between checkpoints
  proc.send_signal(getattr(signal, sig))
  log = _finish(proc, lines)
  assert proc.returncode == 0, log[-3000:]
  stopped = json.loads(open(out).read())
  stop = stopped["final_step"]
  assert stopped["preempted"] == sig and 4 <= stop < 9, log[-2000:]
  assert f"{sig}: stopped after step {stop} of 9, checkpoint saved in" in log
  assert str(stop) in os.listdir(os.path.join(wd, "checkpoints"))
  assert _data_state(wd, stop) != _data_state(wd, 3)            # the iterator moved on, saved
  # The same command again resumes there and ends where the uninterrupted run ended.
  lines = []
  proc = _start(dataset, wd, out, pace=0)
  log = _finish(proc, lines)
  assert proc.returncode == 0, log[-3000:]
  rest = json.loads(open(out).read())
  assert rest["step"] == list(range(stop + 1, 10))
  assert rest["loss"] == ref_history["loss"][stop:]
  fixtures.assert_states_equal(checkpoint.load_state(wd)[2], ref_state)
  assert _data_state(wd, 9) == _data_state(ref_wd, 9)


@pytest.mark.parametrize("where", ["between checkpoints", "just after a checkpoint"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(dataset, reference, tmp_path, where):
  ref_history, ref_state, ref_wd = reference
  wd, out = str(tmp_path / "wd"), str(tmp_path / "out.json")
  lines = []
  proc = _start(dataset, wd, out)
  if where == "between checkpoints":
    assert _wait_for(proc, lambda l: l.startswith("step 5/9"), lines)
  else:
    assert _wait_for(proc, lambda l: os.path.isdir(os.path.join(wd, "checkpoints", "6")), lines)
  os.killpg(proc.pid, signal.SIGKILL)          # the run and its grain worker processes
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert not os.path.exists(out)
  saved = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  assert saved == ([3] if where == "between checkpoints" else [3, 6]), saved
  proc = _start(dataset, wd, out, pace=0)
  log = _finish(proc, [])
  assert proc.returncode == 0, log[-3000:]
  rest = json.loads(open(out).read())
  assert rest["step"] == list(range(saved[-1] + 1, 10))
  assert rest["loss"] == ref_history["loss"][saved[-1]:]
  fixtures.assert_states_equal(checkpoint.load_state(wd)[2], ref_state)
  assert _data_state(wd, 9) == _data_state(ref_wd, 9)
