"""Exponential moving averages of parameter trees and their decay (tau) schedules (BYOL).

  target <- tau * target + (1 - tau) * online        (leaf-wise, in the target's dtype)

Schedules map the optimizer step k (int, possibly traced) to tau:
  constant: tau_k = base                                          (paper 001: 0.99)
  cosine:   tau_k = 1 - (1 - base) * (cos(pi * k / K) + 1) / 2    (BYOL, Grill et al. 2020:
            base at k = 0, 1 at k >= K = total_steps)
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

TAU_SCHEDULES = ("constant", "cosine")


def ema_update(target, online, tau):
  """tau * target + (1 - tau) * online for every leaf; the trees must have the same structure."""
  if jax.tree.structure(target) != jax.tree.structure(online):
    raise ValueError("ema_update: target and online trees differ in structure: "
                     f"{jax.tree.structure(target)} vs {jax.tree.structure(online)}")

  def avg(t, o):
    if t.shape != o.shape:
      raise ValueError(f"ema_update: leaf shapes differ, target {t.shape} vs online {o.shape}")
    return (tau * t + (1.0 - tau) * o).astype(t.dtype)

  return jax.tree.map(avg, target, online)


def constant_tau(base: float) -> Callable:
  _check_base(base)
  return lambda step: jnp.full((), base, jnp.float32)


def cosine_tau(base: float, total_steps: int) -> Callable:
  """1 - (1 - base) * (cos(pi * min(k, K) / K) + 1) / 2."""
  _check_base(base)
  if total_steps <= 0:
    raise ValueError(f"cosine tau schedule needs total_steps > 0, got {total_steps}")

  def tau(step):
    k = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps)
    return 1.0 - (1.0 - base) * (jnp.cos(math.pi * k / total_steps) + 1.0) / 2.0

  return tau


def make_tau_schedule(kind: str, base: float, total_steps: int) -> Callable:
  """'constant' or 'cosine' (see the module docstring)."""
  if kind == "constant":
    return constant_tau(base)
  if kind == "cosine":
    return cosine_tau(base, total_steps)
  raise ValueError(f"unknown tau schedule {kind!r}; use one of {TAU_SCHEDULES}")


def _check_base(base):
  if not 0.0 <= base <= 1.0:
    raise ValueError(f"EMA base tau must be in [0, 1], got {base}")
