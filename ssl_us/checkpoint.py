"""Checkpoints: orbax CheckpointManager in <workdir>/checkpoints, plus the run's config.

Each checkpoint step holds two items: 'state' (TrainState: step, params, optimizer state, batch
statistics and method extras such as BYOL's EMA target, RNG) and 'data' (the input position,
``input_pipeline.InputPosition``, in grain's per-process files; a run resumes it on any number
of processes and grain workers). Orbax writes each step to a temporary directory and renames
it when complete, so a preempted save is never taken for a checkpoint. <workdir>/config.json and
<workdir>/batch_spec.json (shapes of one host batch) let ``load_encoder`` rebuild the model
without the data. config.json and dataset.json (what the samplers plan over, hashed) are what
``check_resume`` holds a resumed run to.

Damage (truncated or corrupted files, a missing item) is survived: ``restore_latest`` warns
about a step that does not restore, names it and the reason, and tries the next newest. The
damaged step stays where it is until the resumed run saves that step number again; it is then
moved, not deleted, to <workdir>/checkpoints.damaged/<step>-<time>.

Orbax and tensorstore check the manifest, the b-tree nodes that index the arrays, the arrays'
sizes and codecs, but not the array bytes: a few flipped bits inside an array's values restore,
wrong, without an error. So every step also holds <step>/ssl_us_checksums.json, the size and
SHA-256 of every file of its items, written by orbax's post-finalization callback: on the
primary process, after every process has written the step and before orbax renames it into
place, so no step appears without it. ``restore_latest`` and ``load_state`` check it before
restoring (each process hashes its share of the files); a changed, missing or added file makes
the step one that does not restore, named with the file. A step without the file (written
before ssl_us wrote checksums) restores as before, unverified, and says so.
``python -m ssl_us.checkpoint WORKDIR`` checks every step, e.g. after copying a run.
"""
from __future__ import annotations

import collections
import datetime
import hashlib
import json
import os
import re
import shutil
import sys
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from data_prep import files as files_lib
from ssl_us import parallel


def _write_json(path, obj):
  files_lib.write_json(path, obj, sort_keys=True)


def save_config(workdir: str, config: ml_collections.ConfigDict, dataset: dict | None = None):
  """<workdir>/config.json and, given, dataset.json (what ``check_resume`` compares with)."""
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
    if dataset is not None:
      _write_json(os.path.join(workdir, "dataset.json"), dataset)


class ResumeError(ValueError):
  """A workdir's run that this config or dataset would not continue as it was started."""


# Config keys that change how a run runs, not what it computes: logging, checkpoints, workers,
# devices, remat, the loss's dense or ring form (each equal by test), a moved copy of the data.
RUN_ONLY = (
    "log_every", "ckpt_every", "keep_checkpoints", "progress_bar", "profile.", "prefetch",
    "max_nonfinite_steps", "num_devices", "model.remat", "loss.impl", "loss.dense_limit_mb",
    "data.dir", "data.num_workers", "resume_with_changes")
# ... and what a resumed run may change besides, logged: memory (microbatches: ghost BatchNorm
# groups) and how long (num_steps, num_epochs: the learning-rate schedule then ends at the new
# step). Any other change would continue the run as another experiment: a ResumeError unless
# config.resume_with_changes.
RESUME_MAY_CHANGE = RUN_ONLY + ("microbatches", "num_steps", "num_epochs")


def _saved_json(workdir: str, name: str) -> dict | None:
  path = os.path.join(workdir, f"{name}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def config_changes(workdir: str, config: ml_collections.ConfigDict, ignore=()) -> dict:
  """{key: (saved value, value now)} for every leaf that differs between the workdir's
  config.json and ``config``, but keys under ``ignore`` prefixes and keys only one of them has
  (added or removed by another ssl_us version); {} without a config.json."""
  was = _flat(_saved_json(workdir, "config") or {})
  now = flat_config(config)
  return {k: (was[k], now[k]) for k in sorted(was.keys() & now.keys())
          if was[k] != now[k] and not k.startswith(tuple(ignore))}


def flat_config(config: ml_collections.ConfigDict) -> dict:
  """{'optim.base_lr': 0.001, ...}: the config's leaves as config.json holds them."""
  return _flat(json.loads(config.to_json_best_effort()))


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def check_resume(workdir: str, config: ml_collections.ConfigDict, dataset: dict,
                 log_fn=None) -> None:
  """Before a run continues the checkpoints of ``workdir``: its config and dataset against
  those the run was started with (config.json, dataset.json). Changes in RESUME_MAY_CHANGE are
  logged; any other change, or a dataset whose records differ, is a ResumeError naming each
  key (or the records) unless config.resume_with_changes. A run that goes on with changes
  keeps the config and dataset it had as config.<time>.json and dataset.<time>.json."""
  directory = os.path.join(workdir, "checkpoints")
  if not (os.path.isdir(directory) and any(s.isdigit() for s in os.listdir(directory))):
    return
  saved = {k: v for k in ("config", "dataset") if (v := _saved_json(workdir, k)) is not None}
  if "config" not in saved:
    return
  changed = config_changes(workdir, config)
  fixed = [k for k in changed if not k.startswith(RESUME_MAY_CHANGE)]
  lines = {k: f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()}
  old_data = saved.get("dataset")
  if old_data and old_data["digest"] != dataset["digest"]:
    fixed.append("dataset")
    lines["dataset"] = (
        f"the {dataset['split']} records of data.dir: {old_data['records']:,} records of "
        f"{old_data['videos']:,} videos ({old_data['dir']}) -> {dataset['records']:,} of "
        f"{dataset['videos']:,} ({dataset['dir']}), not the same")
  if fixed and not config.get("resume_with_changes", False):
    allowed = [lines[k] for k in changed if k not in fixed]
    raise ResumeError(
        f"{workdir} holds a run started with another config or dataset; resuming it here "
        "would continue it as another experiment:\n  " + "\n  ".join(lines[k] for k in fixed)
        + "".join(f"\n  ({line}: may change)" for line in allowed) +
        "\nUse a new workdir, or set config.resume_with_changes=True to continue it with these "
        "changes.")
  if changed or fixed:
    (log_fn or print)(f"resuming {workdir} with changes:\n  " + "\n  ".join(lines.values()))
    if jax.process_index() == 0:
      stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
      for k, obj in saved.items():
        _write_json(os.path.join(workdir, f"{k}.{stamp}.json"), obj)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir}: no config.json; not a pretraining workdir")
  with open(path) as f:
    return _to_config(json.load(f))


def _to_config(d):
  """JSON lists back to tuples, so the config matches what the run used."""
  def fix(v):
    if isinstance(v, dict):
      return {k: fix(x) for k, x in v.items()}
    if isinstance(v, list):
      return tuple(fix(x) for x in v)
    return v
  return ml_collections.ConfigDict(fix(d))


def save_batch_spec(workdir: str, batch):
  if jax.process_index() == 0:
    spec = {k: [list(np.shape(v)[1:]), str(np.asarray(v).dtype)] for k, v in batch.items()}
    _write_json(os.path.join(workdir, "batch_spec.json"), spec)


def dummy_batch(workdir: str, n: int = 2):
  with open(os.path.join(workdir, "batch_spec.json")) as f:
    spec = json.load(f)
  return {k: np.zeros([n] + shape, dtype) for k, (shape, dtype) in spec.items()}


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored; the message names the step and the reason."""


# ----------------------------------------------------------------------------------------------
# Checksums: the size and SHA-256 of every file in a step's item directories.

CHECKSUMS = "ssl_us_checksums.json"


def _item_files(step_dir: str) -> list[str]:
  """Paths, relative to ``step_dir``, of every file in its subdirectories (the items), sorted.
  The step's own files (orbax's step metadata and commit marker, which orbax writes after the
  checksums, and the checksum file) are not items."""
  found = []
  for entry in sorted(os.listdir(step_dir)):
    top = os.path.join(step_dir, entry)
    if os.path.isdir(top):
      for root, _, files in os.walk(top):
        found += [os.path.relpath(os.path.join(root, f), step_dir) for f in files]
  return sorted(found)


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(step_dir: str):
  """Writes <step_dir>/ssl_us_checksums.json (through a temporary name)."""
  files = {rel: {"bytes": os.path.getsize(os.path.join(step_dir, rel)),
                 "sha256": _sha256(os.path.join(step_dir, rel))}
           for rel in _item_files(step_dir)}
  _write_json(os.path.join(step_dir, CHECKSUMS), {"files": files})


def verify_checksums(step_dir: str, part: int = 0, parts: int = 1) -> bool:
  """Checks the files of ``step_dir`` against its ssl_us_checksums.json: the ``part``-th of
  ``parts`` shares of the listed files (one share per process); share 0 also looks for files
  added since. True if checked, False if the step has no checksum file; CheckpointError, naming
  the file and what differs, if anything does."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      saved = json.load(f)["files"]
    saved = {str(rel): {"bytes": int(v["bytes"]), "sha256": str(v["sha256"])}
             for rel, v in saved.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointError(f"DATA_LOSS: {path} is unreadable ({type(e).__name__}: {e})") from None
  listed = sorted(saved)
  for rel in listed[part::parts]:
    f, want = os.path.join(step_dir, rel), saved[rel]
    if not os.path.isfile(f):
      raise CheckpointError(f"NOT_FOUND: {f} is missing ({want['bytes']} bytes at save)")
    size = os.path.getsize(f)
    if size != want["bytes"]:
      raise CheckpointError(f"DATA_LOSS: {f} has {size} bytes, {want['bytes']} at save")
    if _sha256(f) != want["sha256"]:
      raise CheckpointError(f"DATA_LOSS: {f} has changed since it was saved (its SHA-256 "
                            f"differs from the one in {CHECKSUMS})")
  if part == 0:
    added = sorted(set(_item_files(step_dir)) - set(listed))
    if added:
      raise CheckpointError(f"DATA_LOSS: {os.path.join(step_dir, added[0])} was not in the "
                            f"step when it was saved ({len(added)} such files)")
  return True


class _ChecksumOnFinalize:
  """Orbax's post-finalization callback. Orbax runs it on the primary process, in its save
  thread, once every process has written the step and before it renames the step's temporary
  directory into place; it takes no arguments, so ``save`` queues the step numbers (saves are
  finalized one at a time, in order)."""

  def __init__(self, directory: str):
    self.directory = directory
    self.pending = collections.deque()

  def __call__(self):
    step = self.pending.popleft()
    final = os.path.join(self.directory, str(step))
    tmp = final + ocp.path.atomicity_types.TMP_DIR_SUFFIX
    for step_dir in (tmp, final):
      if os.path.isdir(step_dir):
        return write_checksums(step_dir)
    raise CheckpointError(f"checkpoint step {step}: neither {tmp} nor {final} exists to write "
                          f"{CHECKSUMS} in")


class _PositionHandler(grain.checkpoint.CheckpointHandler):
  """grain's orbax handler (a JSON file per process), restoring a step that another number of
  processes wrote too: the input position is global, the same in every process's file."""

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    found = [own] if own.exists() else sorted(directory.glob("process_0-of-*.json"))
    if not found:
      raise FileNotFoundError(f"{own} is missing (nor is there another process count's)")
    item.set_state(found[0].read_bytes())
    return item


# The handler's arguments: grain's, registered with it (orbax maps argument types to handlers).
@ocp.args.register_with_handler(_PositionHandler, for_save=True)
class _PositionSave(grain.checkpoint.CheckpointSave):
  pass


@ocp.args.register_with_handler(_PositionHandler, for_restore=True)
class _PositionRestore(grain.checkpoint.CheckpointRestore):
  pass


def make_manager(workdir: str, config, checksums: bool = True) -> ocp.CheckpointManager:
  """The run's manager; ``checksums=False`` is orbax alone (benchmarks/checkpoint_checksums.py
  compares the two)."""
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  callback = _ChecksumOnFinalize(directory) if checksums else None
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True,
      async_options=ocp.AsyncOptions(post_finalization_callback=callback))
  manager = ocp.CheckpointManager(
      directory, options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": _PositionHandler()})
  manager.ssl_us_checksums = callback
  return manager


# A TensorStore status in an error message: 'OUT_OF_RANGE: Error reading "<array key>" in OCDBT
# database at local file "<path>": ...', followed by a long spec that says nothing more.
_STATUS = re.compile(r"\b((?:OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|INVALID_ARGUMENT|"
                     r"FAILED_PRECONDITION|PERMISSION_DENIED|UNAVAILABLE|INTERNAL|UNKNOWN): .*?)"
                     r"(?: \[tensorstore_spec|\n|$)")


def _reason(e: BaseException) -> str:
  """One line naming the file: the first TensorStore status along the exception's chain of
  causes, else the exception's type and first line."""
  chain, x = [], e
  while x is not None and x not in chain and len(chain) < 8:
    chain.append(x)
    x = x.__cause__ or x.__context__
  for x in chain:
    status = _STATUS.search(str(x))
    if status:
      return status.group(1).strip()[:500]
  return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:500]}"


def _steps(manager) -> list[int]:
  """The steps on disk, once the previous save is finished on every process. Orbax finalizes a
  save in a thread, which on process 0 then deletes the steps beyond ``max_to_keep``; listing
  the directory meanwhile raises FileNotFoundError (a step removed between orbax's glob and its
  stat), on whichever process lists. ``manager.save`` waits for that save anyway."""
  manager.wait_until_finished()
  manager.reload()
  return sorted(manager.all_steps())


def describe_latest(manager) -> str:
  steps = _steps(manager)
  return f"step {steps[-1]} in {manager.directory}" if steps else f"none in {manager.directory}"


def save(manager: ocp.CheckpointManager, step: int, state, position):
  """Saves ``state`` and the input position: ``position.get_state()`` (JSON bytes) of an
  input_pipeline.InputPosition, or of the DevicePrefetch (the position before the batches it
  holds)."""
  damaged = step in _steps(manager)
  # Every process looks before process 0 moves anything, so all take the same branch.
  parallel.barrier(f"ssl_us_looked_for_{step}")
  if damaged:
    # Only a step that did not restore can be here again (restore_latest fell back below it):
    # keep it for the user, out of the manager's way.
    src = os.path.join(str(manager.directory), str(step))
    dst = os.path.join(f"{manager.directory}.damaged", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
      print(f"checkpoint step {step} did not restore; moved to {dst} to save step {step} anew",
            flush=True)
    parallel.barrier(f"ssl_us_move_damaged_{step}")
    manager.reload()
  callback = getattr(manager, "ssl_us_checksums", None)      # None: orbax's manager alone
  queue = callback.pending if callback and jax.process_index() == 0 else None
  if queue is not None:
    queue.append(step)
  saved = False
  try:
    saved = manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=_PositionSave(position)))
  finally:
    if not saved and queue and queue[-1] == step:
      queue.pop()          # nothing to finalize: no callback will take it


_REASON_BYTES = 600


def _first_reason(reason: str | None) -> str | None:
  """None if ``reason`` is None on every process, else the first process's reason (with the
  process named when there are several): the processes must agree on the step they restore."""
  if jax.process_count() == 1:
    return reason
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  code = np.zeros(_REASON_BYTES + 1, np.uint8)
  if reason is not None:
    text = reason.encode()[:_REASON_BYTES]
    code[0], code[1:1 + len(text)] = 1, np.frombuffer(text, np.uint8)
  every = np.asarray(multihost_utils.process_allgather(code)).reshape(-1, _REASON_BYTES + 1)
  for i, row in enumerate(every):
    if row[0]:
      return f"on process {i}: " + bytes(row[1:]).rstrip(b"\0").decode(errors="replace")
  return None


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore_latest(manager: ocp.CheckpointManager, state, position, log_fn=None):
  """(state, step) from the newest checkpoint that restores, restoring ``position``
  (input_pipeline.InputPosition, or anything with ``set_state(bytes)``) in place;
  (state, None) if there is none. A step that fails (on any process) is reported through
  ``log_fn`` with its reason and skipped; if every step fails, CheckpointError lists them."""
  log_fn = log_fn or print
  tried = []
  for step in reversed(_steps(manager)):
    step_dir = os.path.join(str(manager.directory), str(step))
    try:
      verified = verify_checksums(step_dir, jax.process_index(), jax.process_count())
      reason = None
    except (CheckpointError, OSError) as e:
      reason = str(e) if isinstance(e, CheckpointError) else _reason(e)
    reason = _first_reason(reason)      # every process restores, or none
    if reason is None:
      try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(state)),
            data=_PositionRestore(position)))
      except Exception as e:  # pylint: disable=broad-except  (tensorstore, orbax, OS, grain)
        reason = _reason(e)
      reason = _first_reason(reason)
    if reason is None:
      if not verified:
        log_fn(f"checkpoint step {step} in {manager.directory} has no {CHECKSUMS} (written "
               f"before ssl_us wrote checksums): restored with orbax's checks only")
      return restored["state"], step
    log_fn(f"WARNING: checkpoint step {step} in {manager.directory} does not restore "
           f"({reason}); it is left in place; trying the next newest")
    tried.append(f"step {step}: {reason}")
  if tried:
    raise CheckpointError(f"no checkpoint in {manager.directory} restores; tried "
                          + "; ".join(tried))
  return state, None


def _open_read_only(directory: str, item_handlers: dict, tries: int = 5):
  """A read-only manager of ``directory``, which a running pretraining may be writing. Orbax
  lists the steps as it opens (a glob, then each step's metadata); a step that the run deletes
  in between (beyond keep_checkpoints) raises FileNotFoundError, and the listing is read
  again."""
  for attempt in range(tries):
    try:
      return ocp.CheckpointManager(directory, item_handlers=item_handlers,
                                   options=ocp.CheckpointManagerOptions(read_only=True))
    except FileNotFoundError:
      if attempt == tries - 1 or not os.path.isdir(directory):
        raise
      time.sleep(0.1)


def load_state(workdir: str, step: int | None = None):
  """(config, method, TrainState) of a pretraining run at ``step`` (default: latest), on the
  default device. A step that does not restore raises CheckpointError naming it and the file."""
  from ssl_us import train  # pylint: disable=g-import-not-at-top
  from ssl_us.methods import make_method  # pylint: disable=g-import-not-at-top
  config = load_config(workdir)
  method = make_method(config, axis_name=None)
  schedule = train.make_schedule(config, config.batch_size)
  tx = train.make_optimizer(config, schedule)
  batch = dummy_batch(workdir)
  abstract = jax.eval_shape(lambda r: train.create_state(method, tx, r, batch),
                            jax.random.key(0))
  manager = _open_read_only(os.path.abspath(os.path.join(workdir, "checkpoints")),
                            {"state": ocp.StandardCheckpointHandler()})
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"{workdir}: no checkpoints")
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"{workdir}: no checkpoint at step {step}; have {sorted(steps)}")
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          abstract)
  try:
    verify_checksums(os.path.join(str(manager.directory), str(step)))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
  except Exception as e:  # pylint: disable=broad-except  (tensorstore, orbax, OS)
    if not os.path.isdir(os.path.join(str(manager.directory), str(step))):
      raise CheckpointError(
          f"{workdir}: checkpoint step {step} was deleted while it was read (a run writing "
          f"{workdir} keeps its newest keep_checkpoints steps); load again") from None
    reason = str(e) if isinstance(e, CheckpointError) else _reason(e)
    raise CheckpointError(f"{workdir}: checkpoint step {step} cannot be restored "
                          f"({reason}); other steps: "
                          f"{sorted(set(steps) - {step})}") from None
  finally:
    manager.close()
  return config, method, restored


def load_variables(workdir: str, step: int | None = None):
  """(config, method, variables) of a pretraining run at ``step`` (default: latest).

  ``variables`` is {'params': ..., **non-param collections and extras}, on the default device.
  """
  config, method, state = load_state(workdir, step)
  return config, method, {"params": state.params, **state.variables}


def load_encoder(workdir: str, step: int | None = None):
  """(encoder module, {'params', 'batch_stats'}) of a pretraining run; heads dropped.

  Apply as ``module.apply(variables, x, train=False)`` on model-unit inputs
  (see ssl_us.augment.center_view).
  """
  _, method, variables = load_variables(workdir, step)
  return method.encoder(variables)


def encode(module, variables, x, batch_size: int = 256):
  """Features of float inputs x (N, ...) in batches, jitted, as numpy."""
  fn = jax.jit(lambda v, xb: module.apply(v, xb, train=False))
  out = [np.asarray(fn(variables, jnp.asarray(x[i:i + batch_size])))
         for i in range(0, len(x), batch_size)]
  return np.concatenate(out) if out else np.zeros((0,))


def main(argv=None) -> int:
  """Checks every checkpoint step of a workdir against its checksums; 1 if any differs."""
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m ssl_us.checkpoint", description=main.__doc__)
  p.add_argument("workdir", help="a pretraining workdir (holding checkpoints/)")
  args = p.parse_args(argv)
  directory = os.path.join(args.workdir, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit()) if os.path.isdir(
      directory) else []
  if not steps:
    print(f"{directory}: no checkpoints")
    return 1
  counts = collections.Counter()
  for step in steps:
    step_dir = os.path.join(directory, str(step))
    try:
      if verify_checksums(step_dir):
        with open(os.path.join(step_dir, CHECKSUMS)) as f:
          files = json.load(f)["files"]
        outcome, line = "as saved", (f"{len(files)} files, "
                                     f"{sum(v['bytes'] for v in files.values()):,} bytes, as saved")
      else:
        outcome, line = "without checksums", (f"no {CHECKSUMS} (written before ssl_us wrote "
                                              "checksums); unchecked")
    except (CheckpointError, OSError) as e:
      outcome, line = "damaged", str(e) if isinstance(e, CheckpointError) else _reason(e)
    if not os.path.isdir(step_dir):   # a running pretraining deleted it (keep_checkpoints)
      outcome, line = "deleted during the check", (
          f"deleted during the check (a run writing {args.workdir} keeps its newest "
          "keep_checkpoints steps)")
    counts[outcome] += 1
    print(f"step {step}: {line}")
  print(f"{directory}: " + ", ".join(
      f"{counts[k]} {k}" for k in ("as saved", "without checksums", "damaged",
                                   "deleted during the check") if counts[k]))
  return 1 if counts["damaged"] else 0


if __name__ == "__main__":
  sys.exit(main())
