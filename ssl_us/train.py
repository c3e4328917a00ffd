"""Pretraining loop: mesh, input, model, state, step, checkpoint, loop.

One jitted step, ``jax.shard_map`` over the mesh's data axis: each device augments its slice of
the global batch with its own keys, runs the method's loss with global BatchNorm and
cross-device terms, and applies the (already global, see below) gradient. The same code runs on
one device, on fake CPU devices and on a multi-host pod (jax.distributed).

Gradients: parameters are replicated (P()) inputs of the shard_map; the losses return values
that are identical on every device (pmean of the local terms), so ``jax.grad`` inside the
shard_map yields the gradient of the global loss on every device (the transpose of the implicit
broadcast of replicated parameters is a psum). No explicit gradient all-reduce is needed, and
tests check the result against one device on the global batch.

Survival: a step with a non-finite loss or gradient leaves the state unchanged (``train_step``);
SIGTERM/SIGINT end the loop after the current step with a checkpoint (``StopSignal``, agreed by
all processes); a damaged newest checkpoint falls back to the next (``checkpoint.restore_latest``).

Imports: the checkpoints (ssl_us.checkpoint, which imports grain for its orbax handler) are
imported by ``train_and_evaluate``, the one function that uses them, so that the step builds on
a host without grain or tensorflow (benchmarks/device_bench.py; tests/test_device_bench.py
checks it).
A whole run needs no tensorflow either: records are parsed with protobuf alone, and metrics go
through ``writers.create_writer`` (tests/test_train.py checks it).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from ssl_us import flops, gradcache, input_pipeline, models, parallel, profiling, writers
from ssl_us.methods import make_method

# ----------------------------------------------------------------------------------------------
# Config checks (before anything compiles).


def validate_config(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1):
  """Clear errors for configs that cannot run; called before any compilation."""
  b = config.batch_size
  if not isinstance(b, int) or b <= 0:
    raise ValueError(f"config.batch_size must be a positive int, got {b!r}")
  if b % num_devices:
    raise ValueError(f"config.batch_size={b} does not divide over {num_devices} devices "
                     f"(use a multiple of {num_devices})")
  if b % num_processes:
    raise ValueError(f"config.batch_size={b} does not divide over {num_processes} processes")
  if "loss" in config and "temperature" in config.loss and not config.loss.temperature > 0:
    raise ValueError(f"config.loss.temperature must be > 0, got {config.loss.temperature}")
  impl = config.get("loss", {}).get("impl", "dense")
  if impl not in ("dense", "ring", "auto"):
    raise ValueError(f"config.loss.impl={impl!r}; use dense, ring or auto")
  if config.optim.name not in ("adam", "adamw", "lars", "sgd"):
    raise ValueError(f"config.optim.name={config.optim.name!r}; use adam, adamw, lars or sgd")
  if config.optim.lr_scaling not in ("none", "linear", "sqrt"):
    raise ValueError(f"config.optim.lr_scaling={config.optim.lr_scaling!r}; "
                     "use none, linear or sqrt")
  models.compute_dtype(config.model.dtype)    # raises unless auto, float32 or bfloat16
  if config.num_steps <= 0 and config.get("num_epochs", 0) <= 0:
    raise ValueError(f"set config.num_steps > 0 or config.num_epochs > 0 "
                     f"(got {config.num_steps} and {config.get('num_epochs')})")
  if not config.data.dir:
    raise ValueError("config.data.dir is empty: pass --config.data.dir=<data_prep dataset dir>")
  parallel.check_mounted_path(config.data.dir, "config.data.dir")
  mb = config.get("microbatches", 1)
  if not isinstance(mb, int) or mb < 1:
    raise ValueError(f"config.microbatches must be an int >= 1, got {mb!r}")
  if (b // num_devices) % mb:
    raise ValueError(f"config.microbatches={mb} does not divide the per-device batch "
                     f"{b // num_devices} (config.batch_size={b} over {num_devices} devices)")
  pf = config.get("prefetch", 2)
  if not isinstance(pf, int) or pf < 1:
    raise ValueError(f"config.prefetch must be an int >= 1 (1: no prefetch), got {pf!r}")
  profiling.validate(config.get("profile", {}))
  m = config.get("max_nonfinite_steps", 1)
  if not isinstance(m, int) or m < 1:
    raise ValueError(f"config.max_nonfinite_steps must be an int >= 1, got {m!r}")


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule (pure functions of the config).


def learning_rate(config, global_batch: int) -> float:
  """base_lr scaled with the global batch: linear (lr * B/256), sqrt (lr * sqrt(B/256)), none."""
  o = config.optim
  scale = {"none": 1.0, "linear": global_batch / o.lr_base_batch,
           "sqrt": math.sqrt(global_batch / o.lr_base_batch)}[o.lr_scaling]
  return o.base_lr * scale


def make_schedule(config, global_batch: int) -> optax.Schedule:
  """Linear warmup from 0 then cosine decay to ``end_lr_factor`` * peak over num_steps."""
  peak = learning_rate(config, global_batch)
  o = config.optim
  warmup = min(o.warmup_steps, max(config.num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else peak, peak_value=peak, warmup_steps=warmup,
      decay_steps=config.num_steps, end_value=peak * o.end_lr_factor)


def decay_mask(params):
  """True for weights that get weight decay / LARS trust ratio: not biases, not norm params."""
  def keep(path, x):
    names = [getattr(k, "key", str(k)) for k in path]
    is_norm = any("bn" in n.lower() or "norm" in n.lower() for n in names[:-1])
    return x.ndim > 1 and not is_norm and names[-1] not in ("bias", "scale")
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(config, schedule) -> optax.GradientTransformation:
  """adam: L2 in the gradient (Keras-style, paper 000); adamw: decoupled; lars: SimCLR-style.

  Biases and normalization parameters are excluded from weight decay and from LARS's trust
  ratio.
  """
  o = config.optim
  wd = o.weight_decay
  if o.name == "adam":
    return optax.chain(optax.add_decayed_weights(wd, mask=decay_mask),
                       optax.adam(schedule, b1=o.b1, b2=o.b2))
  if o.name == "adamw":
    return optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=wd, mask=decay_mask)
  if o.name == "lars":
    return optax.lars(schedule, weight_decay=wd, weight_decay_mask=decay_mask,
                      trust_ratio_mask=decay_mask, momentum=o.momentum)
  return optax.chain(optax.add_decayed_weights(wd, mask=decay_mask),
                     optax.sgd(schedule, momentum=o.momentum))


# ----------------------------------------------------------------------------------------------
# State.


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  variables: Any     # non-parameter collections and extras (batch_stats, BYOL target, ...)
  rng: jax.Array     # raw uint32 key data, so orbax can save it
  nonfinite: jax.Array  # consecutive non-finite steps up to this one (0 after a finite step)


def create_state(method, tx, rng, sample_batch) -> TrainState:
  k_init, k_train = jax.random.split(rng)
  variables = dict(method.init(k_init, sample_batch))
  params = variables.pop("params")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    variables=variables, rng=jax.random.key_data(k_train),
                    nonfinite=jnp.zeros((), jnp.int32))


def all_finite(tree) -> jax.Array:
  """True iff no floating leaf of ``tree`` holds a NaN or an Inf (optax's check)."""
  floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.logical_not(optax.skip_not_finite(floats, None, None)[0])


# ----------------------------------------------------------------------------------------------
# Step.


def train_step(state: TrainState, batch, *, method, tx, schedule, guard: bool = True,
               microbatches: int = 1):
  """One optimizer step, per device (inside shard_map over the method's axis_name).

  ``microbatches`` > 1: the per-device batch goes through the network in that many chunks
  (gradient caching or accumulation, ssl_us/gradcache.py).

  ``guard``: a step whose loss or any gradient is NaN or Inf changes nothing but the step
  counter (the data moves on) and ``nonfinite``: no parameter update, no optimizer moment,
  no BatchNorm statistics, no EMA target. Its metrics are zeros, counted out at log steps.
  """
  # The step key is the same on every device; methods derive per-example keys from global
  # example indices (augment.example_keys) and fold the device index in where they need
  # per-device randomness (dropout), so results do not depend on the device count.
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  (loss, (new_vars, metrics)), grads = gradcache.value_and_grad(method, microbatches)(
      state.params, state.variables, batch, rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  variables = method.after_update({**state.variables, **new_vars}, params, state.step)
  metrics = dict(metrics, loss=loss, learning_rate=schedule(state.step),
                 grad_norm=optax.tree.norm(grads))
  # Loss and gradients are global (identical on every device), so is the decision.
  ok = jnp.isfinite(loss) & all_finite(grads) if guard else jnp.asarray(True)
  keep = lambda new, old: optax.tree_utils.tree_where(ok, new, old)
  nonfinite = jnp.where(ok, 0, state.nonfinite + 1)
  metrics = dict(keep(metrics, jax.tree.map(jnp.zeros_like, metrics)),
                 nonfinite_steps=1 - ok.astype(jnp.int32), nonfinite_streak=nonfinite)
  new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                            opt_state=keep(opt_state, state.opt_state),
                            variables=keep(variables, state.variables), nonfinite=nonfinite)
  return new_state, metrics


def make_train_step(method, tx, schedule, mesh, guard: bool = True,
                    microbatches: int | None = None):
  """The jitted, shard_mapped step; the state is donated. ``microbatches``: by default
  ``config.microbatches`` of the method's config."""
  if microbatches is None:
    microbatches = method.config.get("microbatches", 1)
  step = functools.partial(train_step, method=method, tx=tx, schedule=schedule, guard=guard,
                           microbatches=microbatches)
  mapped = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(parallel.DATA)),
                         out_specs=(P(), P()))
  return jax.jit(mapped, donate_argnums=0)


# ----------------------------------------------------------------------------------------------
# Everything a run needs, built once from the config.


@flax.struct.dataclass
class Setup:
  config: Any = flax.struct.field(pytree_node=False)
  mesh: Any = flax.struct.field(pytree_node=False)
  method: Any = flax.struct.field(pytree_node=False)
  tx: Any = flax.struct.field(pytree_node=False)
  schedule: Any = flax.struct.field(pytree_node=False)
  index: Any = flax.struct.field(pytree_node=False)


def build(config, mesh=None) -> Setup:
  """Checks the config, then builds mesh, index, method and optimizer; derives num_steps."""
  mesh = mesh or parallel.make_mesh(config.get("num_devices") or None)
  validate_config(config, mesh.size, jax.process_count())
  method = make_method(config, axis_name=parallel.DATA)
  # Several processes: process 0 reads every shard once to index (and cache) the split, then
  # the others read its cache, not each the whole dataset again.
  index = parallel.process_0_first(
      lambda: input_pipeline.load_index(config.data.dir, config.data.split))
  if config.get("num_epochs", 0) > 0:
    per_epoch = input_pipeline.steps_per_epoch(index, method.sampler, config.batch_size,
                                               config.seed)
    config = ml_collections.ConfigDict(config.to_dict())
    config.num_steps = config.num_epochs * per_epoch
  schedule = make_schedule(config, config.batch_size)
  tx = make_optimizer(config, schedule)
  return Setup(config=config, mesh=mesh, method=method, tx=tx, schedule=schedule, index=index)


def make_input(setup: Setup, config, start: int = 0):
  """This process's part of every global batch from batch ``start`` on."""
  return input_pipeline.make_dataset(
      setup.index, setup.method.sampler, global_batch=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_workers=config.data.num_workers, start=start)


def init_state(setup: Setup, config, sample_batch) -> TrainState:
  """Replicated initial state (identical on all hosts: same seed)."""
  rng = jax.random.key(config.seed)
  create = functools.partial(create_state, setup.method, setup.tx)
  return jax.jit(create, out_shardings=parallel.replicated(setup.mesh))(rng, sample_batch)


# ----------------------------------------------------------------------------------------------
# Preemption.


class StopSignal:
  """SIGTERM or SIGINT: stop after the current step, save a checkpoint, return normally.

  One process: the handlers set a flag that the loop reads after every step (no device sync).
  Several processes: every process must stop at the same step, so the decision goes through
  JAX's preemption service (jax.distributed): it owns SIGTERM, and
  ``multihost_utils.reached_preemption_sync_point``, called after every step, returns True on
  all processes at the same step once any of them got one. SIGINT is turned into a SIGTERM of
  the process to take that path. After the first signal the previous handlers are back, so a
  second one acts as usual (SIGINT: KeyboardInterrupt; SIGTERM: exit without saving).
  """

  def __init__(self):
    self.multiprocess = jax.process_count() > 1
    self.received: str | None = None
    self._previous: dict = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signal.signal's requirement
      sigs = (signal.SIGINT,) if self.multiprocess else (signal.SIGTERM, signal.SIGINT)
      self._previous = {s: signal.signal(s, self._handle) for s in sigs}
    return self

  def __exit__(self, *exc):
    self._restore()

  def _restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name
    self._restore()
    logging.warning("%s received: stopping after the current step with a checkpoint",
                    self.received)
    if self.multiprocess:
      os.kill(os.getpid(), signal.SIGTERM)

  def should_stop(self, step: int) -> bool:
    if not self.multiprocess:
      return self.received is not None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.reached_preemption_sync_point(step)


@dataclasses.dataclass(frozen=True)
class Monitor:
  """An online evaluation every ``every`` steps: ``fn(state)`` -> {name: device scalar}, jitted.
  Its results stay on device until the next log step, where they are written at their step."""
  every: int
  fn: Any


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row; the message names the step and the last checkpoint."""


# ----------------------------------------------------------------------------------------------
# Loop.


def _accumulate(pending, metrics):
  """Per-step metrics summed on device between log steps; the non-finite streak keeps its max."""
  if pending is None:
    return metrics
  return {k: (jnp.maximum if k == "nonfinite_streak" else jnp.add)(pending[k], v)
          for k, v in metrics.items()}


def device_memory(devices) -> dict:
  """{'process_peak_memory_gib': the largest peak of bytes in use over ``devices`` since the
  process started} where the backend reports it (GPU, TPU: the allocator's count, read on the
  host without a sync); {} on CPU. JAX cannot reset the peak: runs one after another in one
  process (a sweep without --parallel) each see the largest so far."""
  peaks = [s["peak_bytes_in_use"] for s in (d.memory_stats() for d in devices)
           if s and "peak_bytes_in_use" in s]
  return {"process_peak_memory_gib": max(peaks) / 2**30} if peaks else {}


def _host_metrics(pending, count) -> dict:
  """Means over the finite steps of the interval, the count of non-finite ones, the streak."""
  raw = jax.device_get(pending)
  skipped = int(raw.pop("nonfinite_steps"))
  streak = int(raw.pop("nonfinite_streak"))
  good = count - skipped
  host = {k: float(v) / good if good else float("nan") for k, v in raw.items()}
  return dict(host, nonfinite_steps=skipped, nonfinite_streak=streak)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, mesh=None,
                       max_steps: int | None = None, log_fn=None,
                       monitor: Monitor | None = None) -> dict:
  """Pretrain to config.num_steps (or stop early at ``max_steps``); resumes from the workdir.

  ``monitor``: an online evaluation (see Monitor) of the state after every ``monitor.every``
  steps, logged with the metrics; it reads the state and changes nothing.

  Returns the host-side history: {'step': [...], 'loss': [...], ...} at each logging step,
  'final_step', and 'preempted' (the signal's name) when SIGTERM or SIGINT stopped the run
  after saving. Raises NonFiniteError after config.max_nonfinite_steps non-finite steps in a
  row (checked at log steps, where metrics reach the host).
  """
  from ssl_us import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  parallel.check_mounted_path(workdir, "workdir")
  setup = build(config, mesh)
  config = setup.config
  os.makedirs(workdir, exist_ok=True)
  say = log_fn or (lambda msg: logging.warning("%s", msg) if jax.process_index() == 0 else None)
  dataset = {"dir": config.data.dir, "split": setup.index.split,
             "records": setup.index.num_records, "videos": setup.index.num_videos,
             "digest": input_pipeline.content_digest(setup.index)}
  # Several processes: one command, one dataset (a copy per host may sit elsewhere), one workdir.
  parallel.check_processes_agree({
      "config": json.dumps({k: v for k, v in ckpt_lib.flat_config(config).items()
                            if k != "data.dir"}, sort_keys=True),
      f"dataset (the {setup.index.split} records of data.dir)": dataset["digest"]})
  parallel.check_shared_folder(workdir, "workdir")
  ckpt_lib.check_resume(workdir, config, dataset, log_fn=say)
  ckpt_lib.save_config(workdir, config, dataset)

  # State: fresh, or restored with the input position from the newest checkpoint that restores.
  sample = next(iter(input_pipeline.make_dataset(
      setup.index, setup.method.sampler, global_batch=config.batch_size, seed=config.seed,
      process_index=0, process_count=jax.process_count(), num_workers=0)))
  ckpt_lib.save_batch_spec(workdir, sample)
  state = init_state(setup, config, sample)
  manager = ckpt_lib.make_manager(workdir, config)
  position = input_pipeline.InputPosition(0)
  state, restored_step = ckpt_lib.restore_latest(manager, state, position, log_fn=say)
  start = int(restored_step or 0)
  if position.global_batches is None:   # a checkpoint from before positions: a batch a step
    position.global_batches = start
  if restored_step is not None:
    say(f"resumed at step {start} of {manager.directory}; input at global batch "
        f"{position.global_batches}; processes {jax.process_count()}, devices "
        f"{setup.mesh.size}, input workers per process {config.data.num_workers}")

  # Input, from that position: the same global batches on any number of processes or workers.
  data_iter = iter(make_input(setup, config, start=position.global_batches))

  step_fn = make_train_step(setup.method, setup.tx, setup.schedule, setup.mesh)
  writer = writers.create_writer(os.path.join(workdir, "logs"),
                                 just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams({k: str(v) for k, v in ckpt_lib.flat_config(config).items()})

  end = config.num_steps if max_steps is None else min(config.num_steps, max_steps)
  history: dict[str, Any] = {}
  views_per_example = 2
  progress = _Progress(start, end, config.log_every, config.batch_size * views_per_example,
                       enabled=jax.process_index() == 0 and config.get("progress_bar", True))
  # The next global batch goes to the devices while the current step runs (config.prefetch).
  batches = input_pipeline.DevicePrefetch(
      data_iter, functools.partial(parallel.shard_host_batch, mesh=setup.mesh),
      size=config.get("prefetch", 2), limit=end - start, start=position.global_batches)
  prof = config.get("profile", {})
  trace = profiling.StepTrace(os.path.join(workdir, "logs"), prof.get("start_step", 0),
                              prof.get("num_steps", 0), enabled=jax.process_index() == 0,
                              say=say)
  trace.check(start, end)
  pending, count = None, 0  # metric sums stay on device between logging steps
  local_devices = [d for d in setup.mesh.devices.flat if d.process_index == jax.process_index()]
  monitored = []            # (step, device metrics) of the online monitor since the last log
  last = start
  with StopSignal() as stop:
    for step in range(start, end):
      trace.start(step, state)
      with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
        batch = next(batches)
        if step == start:   # traces the step; the call below reuses that trace
          progress.count_flops(step_fn, state, batch, setup.mesh, config.model.dtype, say)
        state, metrics = step_fn(state, batch)
      pending, count = _accumulate(pending, metrics), count + 1
      last = step + 1
      trace.stop(last, state)
      if monitor is not None and last % monitor.every == 0:
        monitored.append((last, monitor.fn(state)))
      stopping = stop.should_stop(last)
      if last % config.log_every == 0 or last == end or stopping:
        for mstep, m in jax.device_get(monitored):
          writer.write_scalars(mstep, {k: float(v) for k, v in m.items()})
          for k, v in m.items():
            history.setdefault(k, []).append((mstep, float(v)))
        monitored = []
        host = _host_metrics(pending, count)
        pending, count = None, 0
        host.update(progress.rates(last))
        host.update(device_memory(local_devices))
        writer.write_scalars(last, host)
        for k, v in host.items():
          history.setdefault(k, []).append(v)
        history.setdefault("step", []).append(last)
        progress.log(last, host, log_fn)
        if host["nonfinite_streak"] >= config.max_nonfinite_steps:
          manager.wait_until_finished()
          raise NonFiniteError(
              f"step {last}: {host['nonfinite_streak']} steps in a row had a non-finite loss or "
              f"gradient (config.max_nonfinite_steps={config.max_nonfinite_steps}); they left "
              f"the state unchanged. Newest good checkpoint: "
              f"{ckpt_lib.describe_latest(manager)}. Lower optim.base_lr or check the data.")
      if last % config.ckpt_every == 0 or last == end or stopping:
        if not bool(jax.jit(all_finite)((state.params, state.opt_state, state.variables))):
          raise NonFiniteError(f"step {last}: the state holds NaN or Inf; not saved. Newest good "
                               f"checkpoint: {ckpt_lib.describe_latest(manager)}")
        ckpt_lib.save(manager, last, state, batches)    # the input state of step last + 1
      if stopping:
        manager.wait_until_finished()
        history["preempted"] = stop.received or "SIGTERM"
        say(f"{history['preempted']}: stopped after step {last} of {end}, checkpoint saved in "
            f"{manager.directory}; run the same command to resume")
        break
  trace.close(last, state)
  manager.wait_until_finished()
  writer.flush()
  parallel.barrier("ssl_us_run_end")   # the logs are complete for every process that reads them
  progress.close()
  history["final_step"] = last
  return history


class _Progress:
  """Console progress bar, views/s, ETA and model TFLOP/s (MFU where the peak is known); only
  reads host time."""

  def __init__(self, start, end, log_every, views_per_step, enabled):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self.start, self.end, self.views = start, end, views_per_step
    self.t0, self.s0 = time.time(), start
    self.bar = tqdm(total=end, initial=start, unit="step", disable=not enabled,
                    dynamic_ncols=True)
    self.enabled = enabled
    self.flops, self.peak = None, None   # model FLOPs per device and step; peak FLOP/s

  def count_flops(self, step_fn, state, batch, mesh, dtype, say):
    """Model FLOPs per device of one step (ssl_us.flops) and the device's peak, said once."""
    try:
      self.flops = flops.step_flops(step_fn, state, batch)
    except Exception as e:  # pylint: disable=broad-except  (a metric never stops a run; a step
      # that cannot be traced fails in its own call right after, with its own error)
      say(f"model FLOPs not counted ({type(e).__name__}: {e}): no model_tflops_per_device "
          "or mfu")
      return
    device = mesh.devices.flat[0]
    self.peak = flops.peak_flops(device.device_kind, models.compute_dtype(dtype))
    peak = (f"{self.peak / 1e12:.0f} TFLOP/s peak ({device.device_kind}, bfloat16)"
            if self.peak else f"no known peak for {device.device_kind} "
            f"({np.dtype(models.compute_dtype(dtype)).name}): no mfu")
    say(f"model FLOPs per step and device: {self.flops / 1e9:.4g} GFLOP; {peak}")

  def rates(self, step):
    dt = max(time.time() - self.t0, 1e-9)
    steps = step - self.s0
    self.t0, self.s0 = time.time(), step
    sps = steps / dt
    out = {"steps_per_sec": sps, "views_per_sec": sps * self.views,
           "eta_min": (self.end - step) / max(sps, 1e-9) / 60}
    if self.flops:
      out["model_tflops_per_device"] = self.flops * sps / 1e12
      if self.peak:
        out["mfu"] = self.flops * sps / self.peak
    return out

  def log(self, step, host, log_fn):
    self.bar.update(step - self.bar.n)
    msg = (f"step {step}/{self.end} loss {host['loss']:.4f} "
           f"acc {host.get('contrastive_acc', float('nan')):.3f} "
           f"lr {host['learning_rate']:.2e} {host['views_per_sec']:.1f} views/s "
           f"eta {host['eta_min']:.1f} min")
    if "mfu" in host:
      msg += f" mfu {host['mfu']:.1%}"
    if host.get("nonfinite_steps"):
      msg += f" non-finite steps skipped {host['nonfinite_steps']}"
    self.bar.set_postfix_str(f"loss {host['loss']:.4f}")
    if log_fn is not None:
      log_fn(msg)
    elif self.enabled:
      self.bar.write(msg)

  def close(self):
    self.bar.close()


def summary_json(history) -> str:
  return json.dumps({k: (v[-1] if isinstance(v, list) and v else v)
                     for k, v in history.items()}, indent=1)
