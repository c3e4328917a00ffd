"""Checkpoints: orbax CheckpointManager in <workdir>/checkpoints, plus the run's config.

Each checkpoint step holds two items: 'state' (TrainState: step, params, optimizer state, batch
statistics and method extras such as BYOL's EMA target, RNG) and 'data' (the grain iterator
state of every process). Orbax writes each step to a temporary directory and renames it when
complete, so a preempted save is never taken for a checkpoint. <workdir>/config.json and
<workdir>/batch_spec.json (shapes of one host batch) let ``load_encoder`` rebuild the model
without the data.

Damage (truncated or corrupted files, a missing item) is survived: ``restore_latest`` warns
about a step that does not restore, names it and the reason, and tries the next newest. The
damaged step stays where it is until the resumed run saves that step number again; it is then
moved, not deleted, to <workdir>/checkpoints.damaged/<step>-<time>. What "does not restore"
covers is what orbax and tensorstore check: the manifest, the b-tree nodes that index the
arrays, the arrays' sizes and codecs. The array bytes themselves carry no checksum, so a few
flipped bits inside an array's values can restore, wrong, without an error.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp


def _write_json(path, obj):
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def save_config(workdir: str, config: ml_collections.ConfigDict):
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))


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


def make_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()})


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored; the message names the step and the reason."""


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
  manager.reload()
  return sorted(manager.all_steps())


def describe_latest(manager) -> str:
  steps = _steps(manager)
  return f"step {steps[-1]} in {manager.directory}" if steps else f"none in {manager.directory}"


def save(manager: ocp.CheckpointManager, step: int, state, data_iter):
  """Saves ``state`` and the input position: ``data_iter`` is the grain iterator, or anything
  with its ``get_state`` (input_pipeline.DevicePrefetch: the state before the batches it holds).
  """
  damaged = step in _steps(manager)
  # Every process looks before process 0 moves anything, so all take the same branch.
  _barrier(f"ssl_us_looked_for_{step}")
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
    _barrier(f"ssl_us_move_damaged_{step}")
    manager.reload()
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)))


def _barrier(name):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _all_processes_ok(ok: bool) -> bool:
  """True iff ``ok`` on every process (they must agree on the step they restore)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore_latest(manager: ocp.CheckpointManager, state, data_iter, log_fn=None):
  """(state, step) from the newest checkpoint that restores, restoring ``data_iter`` in place;
  (state, None) if there is none. A step that fails (on any process) is reported through
  ``log_fn`` with its reason and skipped; if every step fails, CheckpointError lists them."""
  log_fn = log_fn or print
  tried = []
  for step in reversed(_steps(manager)):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(state)),
          data=grain.checkpoint.CheckpointRestore(data_iter)))
      reason = None
    except Exception as e:  # pylint: disable=broad-except  (tensorstore, orbax, OS, grain)
      reason = _reason(e)
    if _all_processes_ok(reason is None):
      return restored["state"], step
    reason = reason or "failed on another process"
    log_fn(f"WARNING: checkpoint step {step} in {manager.directory} does not restore "
           f"({reason}); it is left in place; trying the next newest")
    tried.append(f"step {step}: {reason}")
  if tried:
    raise CheckpointError(f"no checkpoint in {manager.directory} restores; tried "
                          + "; ".join(tried))
  return state, None


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
  manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.StandardCheckpointHandler()})
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"{workdir}: no checkpoints")
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"{workdir}: no checkpoint at step {step}; have {sorted(steps)}")
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          abstract)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
  except Exception as e:  # pylint: disable=broad-except  (tensorstore, orbax, OS)
    raise CheckpointError(f"{workdir}: checkpoint step {step} cannot be restored "
                          f"({_reason(e)}); other steps: "
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
