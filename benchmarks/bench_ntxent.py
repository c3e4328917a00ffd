"""NT-Xent or AWCL over a large global batch on 8 fake CPU devices: value + gradient, time,
peak memory, dense or ring.

  python -m benchmarks.bench_ntxent --batch 8192 --dim 128 --devices 8
  python -m benchmarks.bench_ntxent --batch 65536 --dim 128 --devices 8 --impl ring
  python -m benchmarks.bench_ntxent --batch 65536 --dim 128 --devices 8 --impl ring --loss awcl

Runs in a subprocess whose XLA_FLAGS (--xla_force_host_platform_device_count) create the fake
devices. ``jax.shard_map`` over the 'data' axis: each device holds batch/devices pairs
(z_a, z_b). ``--impl dense``: ``ssl_us.losses`` gathers all 2 * batch embeddings (all_gather)
and each device forms its (2 * batch/devices, 2 * batch) logits; ``--impl ring``: the key blocks
travel around the devices (losses module docstring). The jitted function returns the global
loss and its gradient with respect to every device's z_a, z_b. Reported: loss, gradient norm,
compile + first call and median call time, XLA's temporary memory per device, and the process's
peak resident memory (ru_maxrss) before and after, next to the machine's total memory. A dense
case whose logits alone would exceed the machine's memory is not run (``skipped``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peak_rss_mb() -> float:
  import resource  # pylint: disable=g-import-not-at-top
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _total_memory_mb() -> float:
  with open("/proc/meminfo", encoding="utf-8") as f:
    for line in f:
      if line.startswith("MemTotal:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def child(batch: int, dim: int, temperature: float, repeats: int, impl: str = "dense",
          loss: str = "nt_xent") -> dict:
  """Runs inside the subprocess (fake devices already configured)."""
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from ssl_us import losses, parallel  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  z_a, z_b = (parallel.shard_host_batch(rng.normal(size=(batch, dim)).astype(np.float32), mesh)
              for _ in range(2))
  rss0 = _peak_rss_mb()

  # AWCL: 4 anatomy classes and unlabeled (-1) examples, spread over every device.
  labels = parallel.shard_host_batch(rng.integers(-1, 4, batch).astype(np.int32), mesh)

  def per_device(za, zb, y):
    def f(a, b):
      if loss == "awcl":
        return losses.awcl(a, b, y, temperature=temperature, axis_name=parallel.DATA, impl=impl)
      return losses.nt_xent(a, b, temperature=temperature, axis_name=parallel.DATA, impl=impl)
    return jax.value_and_grad(f, argnums=(0, 1))(za, zb)

  fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(parallel.DATA),) * 3,
                             out_specs=(P(), (P(parallel.DATA),) * 2)))
  temp_mb = fn.lower(z_a, z_b, labels).compile().memory_analysis().temp_size_in_bytes / 2**20
  t0 = time.perf_counter()
  value, (g_a, g_b) = jax.block_until_ready(fn(z_a, z_b, labels))
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(z_a, z_b, labels))
    times.append(time.perf_counter() - t0)
  grad_norm = float(jnp.sqrt(jnp.sum(g_a**2) + jnp.sum(g_b**2)))
  if not (np.isfinite(float(value)) and np.isfinite(grad_norm)):
    raise FloatingPointError(f"non-finite loss {value} or gradient norm {grad_norm}")
  return {"impl": impl, "loss_fn": loss, "devices": mesh.size, "batch": batch, "dim": dim,
          "loss": round(float(value), 5), "grad_norm": round(grad_norm, 6),
          "logits_per_device": [2 * batch // mesh.size, 2 * batch],
          "xla_temp_mb_per_device": round(temp_mb, 1),
          "compile_and_first_s": round(first, 2), "median_s": round(float(np.median(times)), 3),
          "peak_rss_mb_before": round(rss0), "peak_rss_mb": round(_peak_rss_mb()),
          "machine_memory_mb": round(_total_memory_mb()),
          "load": round(os.getloadavg()[0], 1)}


def run(batch: int = 8192, dim: int = 128, devices: int = 8, temperature: float = 0.5,
        repeats: int = 3, impl: str = "dense", loss: str = "nt_xent") -> dict:
  """Starts the subprocess with ``devices`` fake CPU devices; returns its figures."""
  # Every device's float32 logits, all devices together; value and gradient hold about three
  # such arrays at once (logits, softmax, its gradient): 8192 measured 2.5 GB peak for 1 GiB.
  dense_mb = 2 * batch * 2 * batch * 4 / 2**20
  if impl == "dense" and 3 * dense_mb > _total_memory_mb():
    return {"impl": impl, "loss_fn": loss, "devices": devices, "batch": batch, "dim": dim,
            "skipped": f"the dense logits need {dense_mb / 1024:.0f} GiB (x3 with softmax and "
                       f"gradient) over the {devices} devices; the machine has "
                       f"{_total_memory_mb() / 1024:.0f} GiB"}
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "benchmarks.bench_ntxent", "--child", "--batch", str(batch),
         "--dim", str(dim), "--temperature", str(temperature), "--repeats", str(repeats),
         "--impl", impl, "--loss", loss]
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  if r.returncode != 0:
    raise RuntimeError(f"bench_ntxent child failed ({r.returncode}): {r.stderr[-3000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=8192)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--temperature", type=float, default=0.5)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--impl", default="dense", choices=["dense", "ring"])
  p.add_argument("--loss", default="nt_xent", choices=["nt_xent", "awcl"])
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.child:
    out = child(a.batch, a.dim, a.temperature, a.repeats, a.impl, a.loss)
  else:
    out = run(a.batch, a.dim, a.devices, a.temperature, a.repeats, a.impl, a.loss)
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
