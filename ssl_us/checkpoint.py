"""Checkpoints: orbax CheckpointManager in <workdir>/checkpoints, plus the run's config.

Each checkpoint step holds two items: 'state' (TrainState: step, params, optimizer state, batch
statistics and method extras such as BYOL's EMA target, RNG) and 'data' (the grain iterator
state of every process). Orbax writes each step to a temporary directory and renames it when
complete, so a preempted save is never taken for a checkpoint. <workdir>/config.json and
<workdir>/batch_spec.json (shapes of one host batch) let ``load_encoder`` rebuild the model
without the data.
"""
from __future__ import annotations

import json
import os

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


def save(manager: ocp.CheckpointManager, step: int, state, data_iter):
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)))


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore_latest(manager: ocp.CheckpointManager, state, data_iter):
  """(state, step) from the latest checkpoint, restoring ``data_iter`` in place; else (state, None)."""
  step = manager.latest_step()
  if step is None:
    return state, None
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(state)),
      data=grain.checkpoint.CheckpointRestore(data_iter)))
  return restored["state"], step


def load_variables(workdir: str, step: int | None = None):
  """(config, method, variables) of a pretraining run at ``step`` (default: latest).

  ``variables`` is {'params': ..., **non-param collections and extras}, on the default device.
  """
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
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))["state"]
  manager.close()
  return config, method, {"params": restored.params, **restored.variables}


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
