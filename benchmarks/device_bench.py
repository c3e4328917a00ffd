"""The committed training steps on an accelerator, next to PyTorch mirrors: one prepared call.

  python -m benchmarks.device_bench                 # on a GPU machine, under 8 minutes
  python -m benchmarks.device_bench --tiny          # toy sizes, on CPU (tests/test_device_bench.py)
  python -m benchmarks.device_bench --profile DIR   # also a trace and op summary per JAX case
  python -m benchmarks.device_bench --count_flops   # model FLOPs per step only (any machine)
  bash benchmarks/device_call.sh OUT_DIR            # the prepared GPU call: this, then remat

Needs jax, flax, optax and orbax (and torch for the mirrors: without it the torch rows say so);
no tensorflow, network or data: batches are synthetic uint8, made once on the host and placed
on the device once, so the figures are the step's, not the input pipeline's.

Cases (``CASES``; ``--tiny`` shrinks widths, sizes and batches):
- SimCLR, ResNet-50, 224x224, batch 256 (512 views per step);
- SimCLR, ResNet-18, 224x224, batch 256;
- BYOL, Darknet-53-3D, clips of 16 x 128 x 128, batch 32 (configs/byol_lung.py).

JAX: the committed step (``ssl_us.train.make_train_step``: method, on-device augmentation of
both views, the loss, the optimizer, the state donated) on a 1-device mesh with the backend's
defaults (``conv_impl='auto'``, ``model.dtype='auto'``: XLA's kernels and bfloat16 compute on
GPU). MFU = the step's model FLOPs (ssl_us/flops.py: its convolutions and matrix products,
as the jaxpr states them) / step time / the device's dense bfloat16 peak
(``ssl_us.flops.PEAK_BF16``; none for CPU or float32). The JSON rows also give XLA's own count
of the compiled step (``xla_gflop_per_step``), which on GPU also prices elementwise ops.

PyTorch (benchmarks.torch_models): the same encoders and heads, bf16 autocast, channels_last,
``torch.compile`` unless ``--no_compile`` (falls back to eager if compiling fails, and says so);
SimCLR: NT-Xent over the 2N views, Adam; BYOL: online and EMA target, the symmetric loss,
Adam, the EMA update. No augmentation (the inputs are fixed float views), which favours PyTorch.

Each case: ``warmup`` steps (compilation included), then ``steps`` timed steps ended by a
device sync; reported: items (images or clips) per second, milliseconds per step, MFU for JAX,
and JAX over PyTorch items/s, with the memory each took (XLA's temporary buffers of the
compiled step: JAX's peak bytes in use cannot be reset between cases; PyTorch's peak
allocation). A JAX step that runs out of device memory runs again with its residual blocks
rematerialized (the same mathematics), then with gradient caching over 2, then 4 microbatches
as well, and its row says so (``FITTING``). One markdown table at the end, and one JSON line
per row. A run that fails (out of memory, a compiler
error) is a row that says so, with its traceback on stderr; the other runs go on and the exit
status is 1.

``--profile DIR`` then traces 2 more JAX steps per case (ssl_us/profiling.py, as
config.profile does in a run) and prints where their time went (kinds of op and the longest
XLA ops), keeping DIR/CASE.xplane.pb and DIR/CASE.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback

import numpy as np

CASES = {
    "simclr_resnet50": dict(method="simclr", encoder="resnet50", size=224, batch=256, width=64),
    "simclr_resnet18": dict(method="simclr", encoder="resnet18", size=224, batch=256, width=64),
    "byol_darknet53_3d": dict(method="byol", encoder="darknet53_3d", size=128, frames=16,
                              batch=32, width=32),
}
TINY = {
    "simclr_resnet50": dict(size=32, batch=4, width=4),
    "simclr_resnet18": dict(size=32, batch=4, width=4),
    "byol_darknet53_3d": dict(size=16, frames=4, batch=2, width=2),
}


def case_spec(name: str, tiny: bool, conv_impl: str = "auto", dtype: str = "auto") -> dict:
  return {"name": name, **CASES[name], **(TINY[name] if tiny else {}), "conv_impl": conv_impl,
          "dtype": dtype}


def make_config(spec: dict):
  """The pretraining config of a case: configs/common.py (SimCLR) or configs/byol_lung.py."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import byol_lung, common  # pylint: disable=g-import-not-at-top
  if spec["method"] == "byol":
    c = byol_lung.get_config()
    c.clips.clip_len = spec["frames"]
  else:
    c = common.base_config()
    c.model.encoder = spec["encoder"]
  c.model.encoder_kwargs = ml_collections.ConfigDict(dict(
      num_filters=spec["width"], conv_impl=spec.get("conv_impl", "auto")))
  c.model.remat = spec.get("remat", False)
  c.model.dtype = spec.get("dtype", "auto")
  c.image_size = (spec["size"], spec["size"])
  c.batch_size = spec["batch"]
  c.num_epochs, c.num_steps = 0, 10_000
  c.microbatches = spec.get("microbatches", 1)
  return c


def host_batch(spec: dict, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  n, s = spec["batch"], spec["size"]
  if spec["method"] == "byol":
    return {"clip": rng.integers(0, 256, (n, spec["frames"], s, s, 1), np.uint8),
            "label": np.zeros(n, np.int32), "padded": np.zeros((n, 2), np.int32),
            "distance": np.zeros(n, np.int32)}
  return {"image": rng.integers(0, 256, (n, s, s, 1), np.uint8)}


def _step(spec: dict):
  """(config, mesh, the jitted step, the state's init function) of a case, on one device."""
  import functools  # pylint: disable=g-import-not-at-top
  from ssl_us import parallel, train  # pylint: disable=g-import-not-at-top
  from ssl_us.methods import make_method  # pylint: disable=g-import-not-at-top
  config = make_config(spec)
  mesh = parallel.make_mesh(1)
  method = make_method(config, axis_name=parallel.DATA)
  schedule = train.make_schedule(config, config.batch_size)
  tx = train.make_optimizer(config, schedule)
  step = train.make_train_step(method, tx, schedule, mesh)
  return config, mesh, step, functools.partial(train.create_state, method, tx)


def count_flops(spec: dict, mfu: float = 0.4) -> dict:
  """The step's model FLOPs, traced here without compiling or running it, and the items/s
  that ``mfu`` of each known bfloat16 peak would take."""
  import jax  # pylint: disable=g-import-not-at-top
  from ssl_us import flops, parallel  # pylint: disable=g-import-not-at-top
  _, mesh, step, init = _step(spec)
  batch = host_batch(spec)
  n = flops.step_flops(step, jax.eval_shape(init, jax.random.key(0), batch),
                       parallel.shard_host_batch(batch, mesh))
  return {"case": spec["name"], "model_gflop_per_step": float(f"{n / 1e9:.4g}"),
          "model_gflop_per_item": float(f"{n / 1e9 / spec['batch']:.4g}"),
          f"items_s_at_mfu_{mfu:g}": {k: round(mfu * v / n * spec["batch"], 1)
                                       for k, v in flops.PEAK_BF16.items() if v}}


def run_jax(spec: dict, steps: int, warmup: int, profile_dir: str | None = None) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from ssl_us import flops, models, ops, parallel  # pylint: disable=g-import-not-at-top
  config, mesh, step, init = _step(spec)
  batch = host_batch(spec)
  state = parallel.replicate(jax.jit(init)(jax.random.key(0), batch), mesh)
  dev_batch = parallel.shard_host_batch(batch, mesh)
  t0 = time.perf_counter()
  traced = step.trace(state, dev_batch)
  try:
    model_flops = flops.count(traced.jaxpr)
  except Exception:  # pylint: disable=broad-except  (keep the timing; no MFU)
    traceback.print_exc()
    model_flops = float("nan")
  compiled = traced.lower().compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float((cost or {}).get("flops", float("nan")))
  try:
    memory = compiled.memory_analysis()
    temp_gib = round(memory.temp_size_in_bytes / 2**30, 2)
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    temp_gib = None
  for _ in range(warmup):                  # the compiled executable: no second compilation
    state, metrics = compiled(state, dev_batch)
  loss = float(metrics["loss"])
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, dev_batch)
  jax.block_until_ready(state)
  dt = (time.perf_counter() - t0) / steps
  profiled = None
  if profile_dir:     # after the timing; a failure here keeps the row's figures
    try:
      _profile(compiled, state, dev_batch, profile_dir, spec["name"])
      profiled = "ok"
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      profiled = _error(e)
      try:
        jax.profiler.stop_trace()   # so that the next case can trace; none may be running
      except RuntimeError:
        pass
  device = jax.devices()[0]
  dtype = models.compute_dtype(config.model.dtype)
  peak = flops.peak_flops(device.device_kind, dtype)
  row = {"framework": "jax", "device": device.device_kind,
         "conv_impl": ops.resolve_impl(config.model.encoder_kwargs.conv_impl),
         "dtype": np.dtype(dtype).name,
         "step_ms": round(1e3 * dt, 2), "items_s": round(spec["batch"] / dt, 1),
         "gflop_per_step": float(f"{model_flops / 1e9:.4g}"),
         "xla_gflop_per_step": float(f"{xla_flops / 1e9:.4g}"),
         "mfu": round(model_flops / dt / peak, 3) if peak and model_flops > 0 else None,
         "remat": config.model.remat, "microbatches": config.microbatches,
         "temp_gib": temp_gib,
         "compile_and_warmup_s": round(first, 1), "loss": round(loss, 4)}
  return dict(row, profile=profiled) if profiled else row


def _out_of_memory(e: Exception) -> bool:
  return any(m in str(e) for m in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))


# What a step that runs out of device memory tries next, in order: each residual block
# rematerialized (models.rematerialized: block inputs kept, one more forward pass of the blocks,
# the same mathematics), then gradient caching over 2, then 4 microbatches as well
# (ssl_us/gradcache.py: one chunk's activations at a time, BatchNorm statistics per chunk).
FITTING = (dict(remat=False, microbatches=1), dict(remat=True, microbatches=1),
           dict(remat=True, microbatches=2), dict(remat=True, microbatches=4))


def _fitting(fit: dict) -> str:
  return f"remat {'on' if fit['remat'] else 'off'}, {fit['microbatches']} microbatch(es)"


def run_jax_fitting(spec: dict, steps: int, warmup: int, profile_dir: str | None = None) -> dict:
  """``run_jax``; a step that does not fit in device memory runs again as ``FITTING`` says
  (skipping microbatch counts that do not divide the batch), and its row says so."""
  fits = [f for f in FITTING if spec["batch"] % f["microbatches"] == 0]
  for i, fit in enumerate(fits):
    try:
      return run_jax(dict(spec, **fit), steps, warmup, profile_dir)
    except Exception as e:  # pylint: disable=broad-except
      if not _out_of_memory(e) or i + 1 == len(fits):
        raise
      traceback.print_exc()
      print(f"{spec['name']}: out of device memory with {_fitting(fit)}; again with "
            f"{_fitting(fits[i + 1])}", file=sys.stderr, flush=True)


def _profile(compiled, state, batch, out_dir: str, name: str, steps: int = 2):
  """Traces ``steps`` more steps (ssl_us.profiling.StepTrace, as config.profile does in a run);
  copies the trace and its summary to OUT_DIR/NAME.xplane.pb and NAME.md (one folder deep, as
  the device tool brings files back) and prints the summary."""
  import os  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from ssl_us import profiling  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  with tempfile.TemporaryDirectory() as logdir:
    trace = profiling.StepTrace(logdir, 0, steps, enabled=True,
                                say=lambda m: print(m, file=sys.stderr))
    for step in range(steps):
      trace.start(step, state)
      with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
        state, _ = compiled(state, batch)
      trace.stop(step + 1, state)
    shutil.copyfile(trace.files[0], os.path.join(out_dir, f"{name}.xplane.pb"))
    shutil.copyfile(trace.files[1], os.path.join(out_dir, f"{name}.md"))
    with open(trace.files[1]) as f:
      print(f.read().replace("# Steps 1-", f"# {name}: profile of steps 1-"), flush=True)


def run_torch(spec: dict, steps: int, warmup: int, compile_model: bool) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {"framework": "torch", "skipped": "torch is not installed (pip install torch)"}
  from benchmarks import torch_models as tm  # pylint: disable=g-import-not-at-top
  from configs import byol_lung, common  # pylint: disable=g-import-not-at-top
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  n, s = spec["batch"], spec["size"]
  byol = spec["method"] == "byol"
  base = byol_lung.get_config() if byol else common.base_config()
  hidden, out = base.model.head_hidden[0], base.model.head_out
  if byol:
    enc = tm.Darknet53_3D(1, spec["width"])
    fmt = torch.channels_last_3d
    x = torch.rand(2 * n, 1, spec["frames"], s, s, device=dev)
  else:
    enc = (tm.ResNet50 if spec["encoder"] == "resnet50" else tm.ResNet18)(1, spec["width"])
    fmt = torch.channels_last
    x = torch.rand(2 * n, 1, s, s, device=dev)
  model = tm.Contrastive(enc, tm.MLPHead(enc.out_dim, hidden, out)).to(dev, memory_format=fmt)
  params = list(model.parameters())
  if byol:
    predictor = tm.MLPHead(out, base.byol.predictor_hidden[0], out).to(dev)
    target = copy.deepcopy(model).requires_grad_(False)
    params += list(predictor.parameters())
  opt = torch.optim.Adam(params, lr=1e-4)
  x = x.contiguous(memory_format=fmt)
  compiled = False
  run_model = model
  if compile_model:
    try:
      run_model = torch.compile(model)
      compiled = True
    except Exception:  # pylint: disable=broad-except
      run_model = model

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev, dtype=torch.bfloat16):
      z = run_model(x)
      if byol:
        p = predictor(z)
        with torch.no_grad():
          zt = target(x)
    if byol:
      p_a, p_b = torch.nn.functional.normalize(p.float(), dim=1).chunk(2)
      t_a, t_b = torch.nn.functional.normalize(zt.float(), dim=1).chunk(2)
      loss = (4 - 2 * (p_a * t_b).sum(1) - 2 * (p_b * t_a).sum(1)).mean()
    else:
      loss = tm.nt_xent(*z.float().chunk(2), 0.5)
    loss.backward()
    opt.step()
    if byol:
      with torch.no_grad():
        for pt, po in zip(target.parameters(), model.parameters()):
          pt.mul_(0.99).add_(po, alpha=0.01)
    return loss

  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  try:
    for _ in range(warmup):
      loss = step()
  except Exception:  # pylint: disable=broad-except  (torch.compile failing at first call)
    if not compiled:
      raise
    run_model, compiled = model, False
    for _ in range(warmup):
      loss = step()
  sync()
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = step()
  sync()
  dt = (time.perf_counter() - t0) / steps
  return {"framework": "torch", "device": (torch.cuda.get_device_name() if dev == "cuda"
                                           else "cpu"),
          "compiled": compiled, "step_ms": round(1e3 * dt, 2),
          "items_s": round(n / dt, 1), "compile_and_warmup_s": round(first, 1),
          "peak_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda"
                       else None),
          "loss": round(float(loss), 4)}


def table(rows: list[dict]) -> str:
  lines = ["| case | framework | device | items/s | ms/step | MFU | JAX / torch | notes |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "skipped" in r:
      lines.append(f"| {r['case']} | {r['framework']} | | | | | | {r['skipped']} |")
      continue
    other = next((o for o in rows if o["case"] == r["case"] and o is not r
                  and "items_s" in o), None)
    ratio = (f"{r['items_s'] / other['items_s']:.2f}" if r["framework"] == "jax" and other
             else "")
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else ""
    if r["framework"] == "jax":
      notes = f"{r['conv_impl']} kernels, {r['dtype']}, {r['gflop_per_step']} model GFLOP/step"
      fitted = [s for s, on in (("blocks rematerialized", r.get("remat")),
                                (f"{r['microbatches']} microbatches (gradient caching)",
                                 r["microbatches"] > 1)) if on]
      if fitted:
        notes += f", {' and '.join(fitted)} after running out of memory"
      if r.get("temp_gib") is not None:
        notes += f", XLA temp {r['temp_gib']} GiB"
    else:
      notes = f"bf16 autocast, channels_last, {'compiled' if r['compiled'] else 'eager'}"
      if r.get("peak_gib") is not None:
        notes += f", peak {r['peak_gib']} GiB"
    if r.get("profile", "ok") != "ok":
      notes += f"; profile {r['profile']}"
    lines.append(f"| {r['case']} | {r['framework']} | {r['device']} | {r['items_s']} | "
                 f"{r['step_ms']} | {mfu} | {ratio} | {notes} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="toy sizes, for a CPU")
  p.add_argument("--cases", default=",".join(CASES))
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--conv_impl", default="auto", choices=("auto", "fast", "xla"),
                 help="the JAX encoders' kernels (auto: ops.py's on CPU, XLA's elsewhere)")
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                 help="the JAX compute dtype (auto: float32 on CPU, bfloat16 elsewhere)")
  p.add_argument("--no_torch", action="store_true")
  p.add_argument("--no_compile", action="store_true", help="PyTorch eager (--tiny implies it)")
  p.add_argument("--profile", metavar="DIR", default=None,
                 help="after timing, trace 2 JAX steps per case: DIR/CASE.xplane.pb (for "
                      "TensorBoard's Profile tab) and DIR/CASE.md, the op times (printed too)")
  p.add_argument("--count_flops", action="store_true",
                 help="only trace each case's step (no compiling, no running, any machine): "
                      "its model FLOPs, and the items/s that 40%% MFU would take")
  a = p.parse_args(argv)
  if a.count_flops:
    for name in a.cases.split(","):
      print(json.dumps(count_flops(case_spec(name, a.tiny, a.conv_impl, a.dtype))), flush=True)
    return 0
  rows, t_start = [], time.perf_counter()
  for name in a.cases.split(","):
    spec = case_spec(name, a.tiny, a.conv_impl, a.dtype)
    runs = [lambda: run_jax_fitting(spec, a.steps, a.warmup, a.profile)]
    if not a.no_torch:
      runs.append(lambda: run_torch(spec, a.steps, a.warmup,
                                    compile_model=not (a.no_compile or a.tiny)))
    for framework, run in zip(("jax", "torch"), runs):
      try:
        row = {"case": name, **run()}
      except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: go on)
        traceback.print_exc()
        row = {"case": name, "framework": framework, "skipped": _error(e), "error": True}
      rows.append(row)
      print(json.dumps(row), flush=True)
  print(table(rows))
  print(f"total {time.perf_counter() - t_start:.0f} s")
  return 1 if any(r.get("error") for r in rows) else 0


def _error(e: Exception) -> str:
  """One table-safe line: the exception's type and the start of its first line."""
  first = (str(e).strip().splitlines() or [""])[0]
  return f"failed: {type(e).__name__}: {first[:160]}".replace("|", "/")


if __name__ == "__main__":
  sys.exit(main())
