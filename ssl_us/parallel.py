"""The one place that decides the device mesh and how per-device code is mapped over it.

All data-parallel code runs per device inside ``jax.shard_map`` over the mesh axis ``DATA``
(the modern form of pmap): the batch is split along ``DATA``, parameters are replicated, and
collectives name the axis. The same code runs on one device, on fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8) and on a multi-host pod.

The mesh uses Explicit axis types (``jax.make_mesh``'s default): inside shard_map the axis is
manual either way, and outside it explicit shardings make every array's placement visible.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over all (or the first ``num_devices``) global devices."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices={n} but {len(devices)} devices are available")
  return jax.make_mesh((n,), (DATA,), axis_types=(AxisType.Explicit,), devices=devices[:n])


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def shard_host_batch(batch, mesh):
  """Assemble a global array from this process's slice of the batch (leading axis)."""
  sharding = data_sharded(mesh)

  def put(x):
    x = np.asarray(x)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(put, batch)


def replicate(tree, mesh):
  return jax.device_put(tree, replicated(mesh))


def varying(tree, axis_name):
  """``tree``'s leaves marked as varying over ``axis_name`` inside shard_map (scan carries keep
  one type; a value differentiated as varying gets a per-device gradient, with no psum)."""
  def cast(x):
    if axis_name in jax.typeof(x).manual_axis_type.varying:
      return x
    return jax.lax.pcast(x, (axis_name,), to="varying")
  return jax.tree.map(cast, tree)
