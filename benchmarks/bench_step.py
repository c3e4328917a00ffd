"""SimCLR pretraining step: JAX (ssl_us.train) against the same step in PyTorch, views per second.

  python -m benchmarks.bench_step --model resnet18 --size 64 --pairs 64
  python -m benchmarks.bench_step --model resnet18 --size 64 --pairs 64 --conv_impl xla
  python -m benchmarks.bench_step --model convnet4 --size 64 --pairs 128 --dtype bfloat16
  python -m benchmarks.bench_step --model resnet18 --size 64 --pairs 64 --profile /tmp/prof
  python -m benchmarks.bench_step --model resnet18 --size 64 --pairs 64 --guard_cost
  python -m benchmarks.bench_step --model resnet18 --size 64 --pairs 2048 --microbatches 32 --memory

JAX: the whole jitted step of ``ssl_us.train.make_train_step`` on a 1-device mesh (shard_map,
on-device augmentation of both views, forward of the 2N views, NT-Xent, backward, Adam,
metrics), fed a uint8 host batch each step as the training loop does. PyTorch
(benchmarks.torch_models): forward of 2N float32 views, NT-Xent, backward, Adam; no
augmentation, which favours PyTorch. Same architecture, batch, optimizer and loss; before timing,
both frameworks compute the loss of one batch from the same parameters (``loss_gap``).

The machine is shared, so the two are timed back to back, in rounds: ``steps`` JAX steps, then
``steps`` PyTorch steps, ``rounds`` times; figures are medians over all timed steps, and the
ratio is the median of the per-round ratios (JAX views/s over PyTorch views/s). The load average
is recorded before and after.

``--memory``: the JAX step alone with ``config.microbatches`` (gradient caching,
ssl_us/gradcache.py): XLA's compiled temporary memory of the step and, unless
``--compile_only``, the time of ``steps`` steps and the process's peak resident memory.

Models: 'resnet18' (ssl_us.models.ResNet18, 7x7/2 stem + max-pool, 512-128 head, Adam 1e-3) and
'convnet4' (paper 000: configs/simclr_muscle.py, 512-512 head, Adam 1e-5 with L2 1e-5). One
grayscale channel, as the data pipeline delivers.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common, simclr_muscle
from ssl_us import losses, parallel, train
from ssl_us.methods import make_method


def make_config(model: str, size: int, pairs: int, dtype: str = "float32",
                conv_impl: str = "fast", dropout: float | None = None, microbatches: int = 1):
  """The pretraining config of one benchmark case (``data.dir`` unused: batches are synthetic)."""
  if model == "convnet4":
    c = simclr_muscle.get_config()
    if dropout is not None:
      c.model.encoder_kwargs.dropout_rate = dropout
  elif model == "resnet18":
    c = common.base_config()
    c.model.encoder = "resnet18"
  else:
    raise ValueError(f"unknown model {model!r}; use resnet18 or convnet4")
  c.model.encoder_kwargs = ml_collections.ConfigDict(
      dict(c.model.encoder_kwargs.to_dict(), conv_impl=conv_impl))
  c.model.dtype = dtype
  c.image_size = (size, size)
  c.batch_size = pairs
  c.num_epochs = 0
  c.num_steps = 10_000
  c.microbatches = microbatches
  return c


def host_batch(pairs: int, size: int, seed: int = 0) -> dict:
  return {"image": np.random.default_rng(seed).integers(0, 256, (pairs, size, size, 1),
                                                        dtype=np.uint8)}


class JaxStep:
  """The jitted shard_map train step on a 1-device mesh, with its state; ``guard``: the
  non-finite step guard (train.train_step), on as in training."""

  def __init__(self, config, guard: bool = True):
    self.mesh = parallel.make_mesh(1)
    self.method = make_method(config, axis_name=parallel.DATA)
    self.schedule = train.make_schedule(config, config.batch_size)
    self.tx = train.make_optimizer(config, self.schedule)
    self.batch = host_batch(config.batch_size, config.image_size[0])
    create = functools.partial(train.create_state, self.method, self.tx)
    self.state = parallel.replicate(jax.jit(create)(jax.random.key(config.seed), self.batch),
                                    self.mesh)
    self.step_fn = train.make_train_step(self.method, self.tx, self.schedule, self.mesh,
                                         guard=guard)

  def __call__(self) -> float:
    self.state, metrics = self.step_fn(self.state,
                                       parallel.shard_host_batch(self.batch, self.mesh))
    return float(metrics["loss"])

  def hlo_text(self) -> str:
    b = parallel.shard_host_batch(self.batch, self.mesh)
    return self.step_fn.lower(self.state, b).compile().as_text()


class TorchStep:
  """The PyTorch mirror's step on fixed float32 views (2N, 1, H, W)."""

  def __init__(self, config, threads: int):
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks import torch_models as tm  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    self.model = torch_model(config)
    self.opt = tm.make_optimizer(self.model, config.optim.base_lr, config.optim.weight_decay)
    h, w = config.image_size
    self.views = torch.randn(2 * config.batch_size, 1, h, w)
    self.temperature = float(config.loss.temperature)
    self.autocast = torch.bfloat16 if config.model.dtype == "bfloat16" else None
    self.model.train()

  def __call__(self) -> float:
    from benchmarks import torch_models as tm  # pylint: disable=g-import-not-at-top
    return float(tm.train_step(self.model, self.opt, self.views, self.temperature,
                               self.autocast))


def torch_model(config):
  from benchmarks import torch_models as tm  # pylint: disable=g-import-not-at-top
  m = config.model
  if m.encoder == "resnet18":
    enc = tm.ResNet18(in_channels=1)
  else:
    ek = m.encoder_kwargs
    enc = tm.ConvNet4(in_channels=1, width=ek.width, dropout_rate=ek.dropout_rate)
  h, w = config.image_size
  feat = enc.out_dim if m.encoder == "resnet18" else (h // 4) * (w // 4) * 2 * ek.width
  return tm.Contrastive(enc, tm.MLPHead(feat, m.head_hidden[0], m.head_out))


def loss_gap(model: str, size: int, pairs: int = 4) -> float:
  """|JAX loss - PyTorch loss| on the same views and parameters (train mode, no dropout).

  A mismatch in any layer (padding alignment, flatten order, BatchNorm) shows as a gap far
  above float32 rounding (about 1e-6 here).
  """
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_models as tm  # pylint: disable=g-import-not-at-top
  config = make_config(model, size, pairs, dropout=0.0)
  method = make_method(config)
  x = np.random.default_rng(1).normal(size=(2 * pairs, size, size, 1)).astype(np.float32)
  variables = method.init(jax.random.key(0), host_batch(pairs, size))
  # Non-zero BatchNorm scales (residual blocks start at 0), so that every conv counts.
  scales = iter(np.random.default_rng(2).uniform(0.5, 1.5, 1000))
  variables["params"] = jax.tree_util.tree_map_with_path(
      lambda path, v: (jnp.full_like(v, next(scales)) if path[-1].key == "scale" else v),
      variables["params"])
  out, _ = method.model.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
  z_a, z_b = jnp.split(out["z"], 2)
  l_jax = float(losses.nt_xent(z_a, z_b, temperature=config.loss.temperature))
  tmodel = torch_model(config)
  tm.load_flax(tmodel, variables["params"], variables["batch_stats"])
  tmodel.train()
  with torch.no_grad():
    z = tmodel(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    l_torch = float(tm.nt_xent(*z.chunk(2), config.loss.temperature))
  return abs(l_jax - l_torch)


def _time(fn) -> tuple[float, float]:
  """(wall seconds, CPU seconds of this process) of one call."""
  t0, c0 = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - t0, time.process_time() - c0


def run_case(model: str, size: int, pairs: int, *, dtype="float32", conv_impl="fast",
             steps=3, rounds=3, torch_threads=2, with_torch=True, check=True) -> dict:
  """Times one case; returns views/s (medians), the ratio, compile time and the loads.

  Also views per CPU-second (CPU time of the process per step): on a loaded machine it moves
  less than wall time, and it shows how much work each framework spends per view.
  """
  config = make_config(model, size, pairs, dtype, conv_impl)
  views = 2 * pairs
  load0 = os.getloadavg()[0]
  out = {"model": model, "size": size, "pairs": pairs, "dtype": dtype, "conv_impl": conv_impl}
  if check and with_torch:
    out["loss_gap"] = loss_gap(model, size)
  jstep = JaxStep(config)
  out["jax_compile_s"] = round(_time(jstep)[0], 1)  # compile + first step
  tstep = None
  if with_torch:
    tstep = TorchStep(config, torch_threads)
    tstep()
  jt, tt, ratios = [], [], []
  for _ in range(rounds):
    js = [_time(jstep) for _ in range(steps)]
    jt += js
    if tstep is not None:
      time.sleep(0.2)  # let the other framework's worker threads go idle
      ts = [_time(tstep) for _ in range(steps)]
      tt += ts
      ratios.append(np.median([t[0] for t in ts]) / np.median([t[0] for t in js]))
      time.sleep(0.2)
  for name, ts in (("jax", jt), ("torch", tt)):
    if ts:
      wall, cpu = np.median([t[0] for t in ts]), np.median([t[1] for t in ts])
      out[f"{name}_views_s"] = round(views / float(wall), 1)
      out[f"{name}_views_per_cpu_s"] = round(views / float(cpu), 1)
      out[f"{name}_step_s"] = [round(t[0], 3) for t in ts]
  if tt:
    out["ratio"] = round(float(np.median(ratios)), 3)
    out["cpu_ratio"] = round(out["jax_views_per_cpu_s"] / out["torch_views_per_cpu_s"], 3)
  out["load"] = [round(load0, 1), round(os.getloadavg()[0], 1)]
  return out


def guard_cost(model: str, size: int, pairs: int, *, steps=3, rounds=5) -> dict:
  """The non-finite guard's cost: the same JAX step with and without it, timed back to back in
  rounds; ``cost`` = median over rounds of (step time with) / (step time without) - 1."""
  config = make_config(model, size, pairs)
  steps_by = {g: JaxStep(config, guard=g) for g in (True, False)}
  for s in steps_by.values():
    s()                                    # compile
  times = {True: [], False: []}
  ratios = []
  for r in range(rounds):
    med = {}
    for g in ((True, False) if r % 2 == 0 else (False, True)):
      t = [_time(steps_by[g])[0] for _ in range(steps)]
      times[g] += t
      med[g] = float(np.median(t))
    ratios.append(med[True] / med[False])
  views = 2 * pairs
  return {"model": model, "size": size, "pairs": pairs,
          "views_s_guard": round(views / float(np.median(times[True])), 1),
          "views_s_no_guard": round(views / float(np.median(times[False])), 1),
          "cost": round(float(np.median(ratios)) - 1, 4),
          "round_ratios": [round(x, 4) for x in ratios], "load": round(os.getloadavg()[0], 1)}


def memory_case(model: str, size: int, pairs: int, microbatches: int, *, steps: int = 2,
                compile_only: bool = False) -> dict:
  """XLA's temporary memory of the compiled step; unless ``compile_only``, the compile + first
  step time, the median of ``steps`` more, and the peak RSS of the process (ru_maxrss)."""
  import resource  # pylint: disable=g-import-not-at-top
  config = make_config(model, size, pairs, microbatches=microbatches)
  jstep = JaxStep(config)
  b = parallel.shard_host_batch(jstep.batch, jstep.mesh)
  mem = jstep.step_fn.lower(jstep.state, b).compile().memory_analysis()
  out = {"model": model, "size": size, "pairs": pairs, "microbatches": microbatches,
         "chunk_views": 2 * pairs // microbatches,
         "xla_temp_mb": round(mem.temp_size_in_bytes / 2**20),
         "xla_args_mb": round(mem.argument_size_in_bytes / 2**20)}
  if not compile_only:
    out["compile_and_first_s"] = round(_time(jstep)[0], 1)
    times = [_time(jstep)[0] for _ in range(steps)]
    out["step_s"] = round(float(np.median(times)), 2)
    out["views_s"] = round(2 * pairs / out["step_s"], 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  out["load"] = round(os.getloadavg()[0], 1)
  return out


# ----------------------------------------------------------------------------------------------
# Profile: per-HLO-op time of a few jitted steps from a jax.profiler trace.


def profile(model: str, size: int, pairs: int, logdir: str, *, dtype="float32",
            conv_impl="fast", steps=2, top=25, microbatches=1) -> list[dict]:
  """Traces ``steps`` steps; the op times of ssl_us.profiling.summarize (each step ends with
  its loss on the host, so the trace holds whole steps).

  Returns the ``top`` ops: name, ms per step, share, and the op's HLO line (shapes, window).
  """
  from ssl_us import profiling  # pylint: disable=g-import-not-at-top
  jstep = JaxStep(make_config(model, size, pairs, dtype, conv_impl,
                              microbatches=microbatches))
  jstep()
  ops = _hlo_ops(jstep.hlo_text())
  jax.profiler.start_trace(logdir)
  for _ in range(steps):
    jstep()
  jax.profiler.stop_trace()
  s = profiling.summarize(profiling.trace_files(logdir)[-1], steps=steps, top=top)
  return [{"op": o["op"], "ms_per_step": round(o["ms_per_step"], 1),
           "share": round(o["share"], 3), "hlo": ops.get(o["op"], "")[:220]} for o in s["ops"]]


def _hlo_ops(hlo: str) -> dict[str, str]:
  """Instruction name -> its HLO line (the fused computation's root for fusions)."""
  ops = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
    if m:
      ops[m.group(1)] = m.group(2).strip()
  return ops


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="resnet18", choices=["resnet18", "convnet4"])
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--pairs", type=int, default=64)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--conv_impl", default="fast", choices=["auto", "fast", "xla"])
  p.add_argument("--steps", type=int, default=3, help="timed steps per round and framework")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--no_torch", action="store_true")
  p.add_argument("--profile", help="trace a few JAX steps into this folder; print the top ops")
  p.add_argument("--microbatches", type=int, default=1)
  p.add_argument("--memory", action="store_true",
                 help="JAX only: compiled temporary memory, step time and peak RSS")
  p.add_argument("--compile_only", action="store_true", help="with --memory: do not run")
  p.add_argument("--guard_cost", action="store_true",
                 help="time the step with and without the non-finite guard (JAX only)")
  a = p.parse_args(argv)
  if a.memory:
    print(json.dumps(memory_case(a.model, a.size, a.pairs, a.microbatches, steps=a.steps,
                                 compile_only=a.compile_only)))
    return 0
  if a.guard_cost:
    print(json.dumps(guard_cost(a.model, a.size, a.pairs, steps=a.steps, rounds=a.rounds)))
    return 0
  if a.profile:
    rows = profile(a.model, a.size, a.pairs, a.profile, dtype=a.dtype, conv_impl=a.conv_impl,
                   microbatches=a.microbatches)
    for r in rows:
      print(f"{r['ms_per_step']:9.1f} ms {100 * r['share']:5.1f}%  {r['op']:28s} {r['hlo']}")
    return 0
  out = run_case(a.model, a.size, a.pairs, dtype=a.dtype, conv_impl=a.conv_impl, steps=a.steps,
                 rounds=a.rounds, with_torch=not a.no_torch)
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
