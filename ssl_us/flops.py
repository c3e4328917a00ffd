"""Model FLOPs of a step, and its model FLOPs utilization (MFU) against the device's peak.

Model FLOPs are the multiply-adds of the step's convolutions and matrix products, counted as 2
FLOPs each, read from the step's jaxpr: nothing else (elementwise ops, reductions, the
optimizer's arithmetic) counts. This is the MFU of the large-model literature (PaLM, App. B:
the FLOPs the model needs, whatever the hardware does), so one number holds on every backend.
XLA's ``cost_analysis`` is not used for it: its count differs per backend (on GPU an
elementwise op costs 3 to 45 "FLOPs" an element, a cuDNN call its convolution) and between the
lowered and the compiled step.

- A convolution counts only the taps that meet the input: padding and the holes of an input
  dilation (the transposed convolutions of a strided convolution's gradient) are not
  multiplied, as in XLA's own HloCostAnalysis; tests/test_flops.py checks the two agree.
- ``dot_general``: 2 * (output elements) * (contracted size). ssl_us/ops.py's CPU convolutions
  are im2col matrix products that multiply the padding's zeros too, so on CPU the count is the
  work those kernels do (the SimCLR ResNet-50 step of benchmarks/device_bench.py: 13,820
  GFLOP with them, 11,850 with XLA's convolutions, as on GPU and TPU).
- Inside ``jax.shard_map`` shapes are per device, so a shard_mapped step (ssl_us.train) counts
  FLOPs per device; ``scan`` multiplies its body by its length; ``cond`` counts its costliest
  branch; a ``while`` loop whose body holds FLOPs has no known trip count and raises
  ``UncountedLoop``. Every other primitive holding a jaxpr (jit, custom_vjp, remat...) counts
  its jaxpr once, so rematerialized work counts as executed: with ``config.model.remat``
  (the blocks' second forward pass) or ``config.microbatches`` > 1 (gradient caching's, in
  ssl_us/gradcache.py) the count includes the recomputation, and ``mfu`` is then what PaLM
  calls hardware FLOPs utilization; compare it between runs of the same settings (device_bench
  --tiny, SimCLR ResNet-18: 9.08 MFLOP per step, 10.30 with remat, 12.33 with 2 microbatches).
  Work whose result is never used counts too (XLA would remove it; the steps have none).

``step_flops`` traces a jitted function (``jit(...).trace``, which the next call with the same
shapes reuses: no second tracing, no compilation) and counts. train.py logs, per step,
``model_tflops_per_device`` and, where the device's peak is known, ``mfu``;
benchmarks/device_bench.py reports the same MFU.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.extend import core as jax_core

# Dense bfloat16 peak FLOP/s per chip by jax ``device_kind`` prefix, the longest matching prefix
# deciding (vendor datasheets, without sparsity; None: not known). SXM H100s are "NVIDIA H100
# 80GB HBM3"; TPU v5p reports "TPU v5", v5e "TPU v5 lite", v6e "TPU v6 lite". Only bfloat16:
# float32 compute has no MFU here.
PEAK_BF16 = {"NVIDIA H100": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
             "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA A100": 312e12,
             "TPU v4": 275e12, "TPU v4 lite": None, "TPU v5": 459e12, "TPU v5p": 459e12,
             "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v6 lite": 918e12,
             "TPU v6e": 918e12}


class UncountedLoop(ValueError):
  """A while loop with FLOPs in its body: its trip count is not known when tracing."""


def peak_flops(device_kind: str, dtype) -> float | None:
  """The dense peak FLOP/s of a chip for ``dtype`` compute, or None where not known."""
  if np.dtype(dtype) != np.dtype(jax.numpy.bfloat16):
    return None
  matches = [k for k in PEAK_BF16 if device_kind.startswith(k)]
  return PEAK_BF16[max(matches, key=len)] if matches else None


def _valid_taps(in_size, kernel, out_size, stride, pad_lo, lhs_dil, rhs_dil) -> int:
  """(output position, kernel tap) pairs of one spatial dimension whose tap reads the input,
  not padding nor an input-dilation hole."""
  pos = (np.arange(out_size)[:, None] * stride - pad_lo
         + np.arange(kernel)[None, :] * rhs_dil)
  return int(np.sum((pos >= 0) & (pos % lhs_dil == 0) & (pos // lhs_dil < in_size)))


def conv_flops(eqn) -> int:
  """2 * multiply-adds of one ``conv_general_dilated`` equation."""
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  out = eqn.outvars[0].aval
  p = eqn.params
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  taps = 1
  for d in range(len(lhs_spec) - 2):
    taps *= _valid_taps(lhs.shape[lhs_spec[2 + d]], rhs.shape[rhs_spec[2 + d]],
                        out.shape[out_spec[2 + d]], p["window_strides"][d],
                        p["padding"][d][0], p["lhs_dilation"][d], p["rhs_dilation"][d])
  # Each output (batch, feature) pair sums over the kernel's input features at every valid
  # tap; grouping is already in the shapes (kernel in-features = input features / groups,
  # output batch = input batch / batch groups).
  return (2 * out.shape[out_spec[0]] * out.shape[out_spec[1]] * rhs.shape[rhs_spec[1]]
          * taps)


def dot_flops(eqn) -> int:
  """2 * multiply-adds of one ``dot_general`` equation."""
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval
  return (2 * math.prod(eqn.outvars[0].aval.shape)
          * math.prod(lhs.shape[d] for d in lhs_contract))


# Both have .eqns (jax 0.11 makes them one class).
_JAXPRS = (jax_core.Jaxpr, jax_core.ClosedJaxpr)


def _sub_jaxprs(value):
  for v in value if isinstance(value, (tuple, list)) else (value,):
    if isinstance(v, _JAXPRS):
      yield v


def count(jaxpr) -> int:
  """Model FLOPs of a jaxpr (closed or not); see the module docstring."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      total += conv_flops(eqn)
    elif name == "dot_general":
      total += dot_flops(eqn)
    elif name == "cond":
      total += max(count(b) for b in eqn.params["branches"])
    elif name == "while":
      inner = sum(count(j) for k in ("cond_jaxpr", "body_jaxpr")
                  for j in _sub_jaxprs(eqn.params[k]))
      if inner:
        raise UncountedLoop(f"a while loop holds {inner:.3g} FLOPs per iteration and its trip "
                            "count is unknown; write it as a scan (lax.fori_loop with static "
                            "bounds, lax.map)")
    else:
      inner = sum(count(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


def step_flops(jitted, *args) -> int:
  """Model FLOPs of one call of ``jitted`` (a ``jax.jit`` function) on ``args`` (arrays or
  ShapeDtypeStructs). Per device when it shard_maps its work."""
  return count(jitted.trace(*args).jaxpr)
