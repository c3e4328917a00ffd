"""Pretraining methods on the shared spine.

A method turns a host batch into a loss, per device, inside shard_map. Each has:
  sampler                      the input_pipeline Sampler that builds its host examples
  init(rng, host_batch)        -> variables {'params', 'batch_stats', ...extras}
  loss(params, variables, batch, rng)
                               -> (loss, (updated non-param variables, metrics)); runs per device
                                  with ``axis_name`` for global BatchNorm and cross-device terms;
                                  it is views -> embed -> objective (methods/simclr.py), which
                                  ssl_us.gradcache runs chunk by chunk (config.microbatches)
  after_update(variables, params, step)
                               -> variables after the optimizer step (e.g. BYOL's EMA target)
  encoder(variables)           -> (encoder module, {'params', 'batch_stats'}) for downstream use
Methods register by name with ``register`` and are built by ``make_method(config, axis_name)``.
"""
from __future__ import annotations

import importlib

_METHODS: dict[str, str] = {
    "simclr": "ssl_us.methods.simclr:SimCLR",
    "byol": "ssl_us.methods.byol:BYOL",
    "simclr_video": "ssl_us.methods.simclr_video:SimCLRVideo",
    "awcl": "ssl_us.methods.awcl:AWCL",
    "uscl": "ssl_us.methods.uscl:USCL",
}


def register(name: str, target: str):
  """Register ``"module.path:ClassName"`` under ``name``."""
  _METHODS[name] = target


def method_class(name: str):
  if name not in _METHODS:
    raise ValueError(f"config.method={name!r} is not a known method; known: {sorted(_METHODS)}")
  module, cls = _METHODS[name].split(":")
  try:
    mod = importlib.import_module(module)
  except ModuleNotFoundError as e:
    raise ValueError(f"method {name!r} is not available in this install ({e})") from e
  return getattr(mod, cls)


def make_method(config, axis_name=None):
  return method_class(config.method)(config, axis_name=axis_name)
