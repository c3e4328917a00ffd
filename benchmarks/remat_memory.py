"""What rematerialized residual blocks (``config.model.remat``) save, on this backend.

  python -m benchmarks.remat_memory --encoder resnet50 --size 224 --batch 64

For one train-mode encoder, without and with remat: the bytes ``jax.vjp`` keeps for the
backward pass (before XLA), the optimization barriers and convolutions in the lowered
gradient, the convolutions left in the compiled one (XLA's or cuDNN's), XLA's temporary
buffers of the compiled gradient (memory_analysis), and its time per call. One
JSON line per setting. On CPU the compiled step keeps no less: XLA's CPU pipeline removes the
barriers before common-subexpression elimination, then merges part of the recomputation back
and schedules the rest freely (benchmarks/RESULTS.md); GPU and TPU remove them only after
their last CSE.
"""
from __future__ import annotations

import argparse
import json
import re
import time


def residual_bytes(encoder, x) -> int:
  """Bytes that ``jax.vjp`` keeps for the backward pass of a train-mode encoder (its
  residuals: the leaves of the vjp function), traced only."""
  import jax  # pylint: disable=g-import-not-at-top
  v = jax.eval_shape(encoder.init, jax.random.key(0), x)

  def vjp_fn(params, stats):
    def f(params):
      return encoder.apply({"params": params, "batch_stats": stats}, x,
                           mutable=["batch_stats"])[0]
    return jax.vjp(f, params)[1]
  return sum(a.size * a.dtype.itemsize
             for a in jax.tree.leaves(jax.eval_shape(vjp_fn, v["params"], v["batch_stats"])))


def measure(name: str, shape, remat: bool, dtype: str = "auto", conv_impl: str = "auto",
            width: int | None = None, repeats: int = 3) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top,unused-import
  from ssl_us import models, models3d  # noqa: F401  (models3d registers the 3D encoders)
  kwargs = dict(num_filters=width) if width else {}
  enc = models.make_encoder(name, remat=remat, conv_impl=conv_impl,
                            dtype=models.compute_dtype(dtype), **kwargs)
  x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
  v = jax.jit(enc.init)(jax.random.key(0), x)

  def loss(params):
    h, new = enc.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                       mutable=["batch_stats"])
    return jnp.sum(jnp.sin(h)), new
  grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  lowered = grad.lower(v["params"])
  compiled = lowered.compile()
  jax.block_until_ready(compiled(v["params"]))
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = compiled(v["params"])
  jax.block_until_ready(out)
  try:
    temp = round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1)
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    temp = None
  lowered_text, compiled_text = lowered.as_text(), compiled.as_text()
  return {"encoder": name, "shape": list(shape), "remat": remat,
          "device": jax.devices()[0].device_kind,
          "residual_mib": round(residual_bytes(enc, x) / 2**20, 3),
          "barriers": lowered_text.count("stablehlo.optimization_barrier"),
          "lowered_convs": lowered_text.count("stablehlo.convolution"),
          "compiled_convs": len(re.findall(r" convolution\(|__cudnn\$conv", compiled_text)),
          "xla_temp_mib": temp, "ms": round(1e3 * (time.perf_counter() - t0) / repeats, 1)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--encoder", default="resnet18")
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--frames", type=int, default=0, help="clips of this many frames (3D)")
  p.add_argument("--width", type=int, default=None, help="num_filters (default: the model's)")
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
  p.add_argument("--conv_impl", default="auto", choices=("auto", "fast", "xla"))
  a = p.parse_args(argv)
  shape = ((a.batch, a.frames, a.size, a.size, 1) if a.frames
           else (a.batch, a.size, a.size, 3))
  for remat in (False, True):
    print(json.dumps(measure(a.encoder, shape, remat, a.dtype, a.conv_impl, a.width)),
          flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
