"""The one place that decides the device mesh and how per-device code is mapped over it.

All data-parallel code runs per device inside ``jax.shard_map`` over the mesh axis ``DATA``
(the modern form of pmap): the batch is split along ``DATA``, parameters are replicated, and
collectives name the axis. The same code runs on one device, on fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8) and on a multi-host pod.

The mesh uses Explicit axis types (``jax.make_mesh``'s default): inside shard_map the axis is
manual either way, and outside it explicit shardings make every array's placement visible.

Several processes (jax.distributed) must run one config on the same records and write to one
shared workdir; the checks at the end of this file say so before the first step, on every
process alike, instead of a run that hangs in a collective or trains on wrong batches.
"""
from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import re
import secrets
import sys
import traceback

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from data_prep import files as files_lib

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


# ----------------------------------------------------------------------------------------------
# Several processes (jax.distributed): what they must share, checked before the first step.


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_mounted_path(path: str, what: str) -> None:
  """A ValueError for a URL (gs://, s3://): runs read data and write checkpoints through the file
  system, and os.makedirs('gs://b/run') would make a local folder 'gs:', lost with the machine."""
  if _URL.match(path):
    raise ValueError(f"{what} {path} is a URL; ssl_us reads and writes through the file "
                     "system: mount the bucket (e.g. gcsfuse, at the same path on every host) "
                     "and give the mounted path")


def process_flags(multihost: bool, coordinator_address: str | None = None,
                  num_processes: int | None = None, process_id: int | None = None) -> dict:
  """The given ones of ``--coordinator_address --num_processes --process_id`` as
  jax.distributed.initialize's keywords; a ValueError for them without ``multihost``."""
  given = {k: v for k, v in (("coordinator_address", coordinator_address),
                             ("num_processes", num_processes),
                             ("process_id", process_id)) if v is not None}
  if given and not multihost:
    raise ValueError(f"--{', --'.join(given)} given without --multihost")
  return given


def join_processes(multihost: bool, coordinator_address: str | None = None,
                   num_processes: int | None = None, process_id: int | None = None) -> None:
  """``--multihost``: jax.distributed.initialize() with what is given; the rest it finds on
  Cloud TPU, SLURM, Open MPI and Kubernetes. A ValueError for those flags without
  ``multihost``."""
  given = process_flags(multihost, coordinator_address, num_processes, process_id)
  if multihost:
    jax.distributed.initialize(**given)


@contextlib.contextmanager
def fail_fast():
  """With several processes, an exception that leaves this block ends the process at once: its
  traceback printed, its worker processes (grain's) stopped, exit status 1. Raised on, it would
  reach jax.distributed's shutdown, whose barrier waits for the other processes while they
  wait in a collective for this one: all then stop only when the barrier times out (5 minutes)
  and aborts them. Ended at once, it fails the others' next collective (gloo: connection
  reset; on GPU and TPU once the coordination service misses its heartbeats, 100 s), and they
  end the same way. Nothing changes with one process."""
  try:
    yield
  except BaseException:  # pylint: disable=broad-except  (any error, Ctrl-C included)
    if jax.process_count() == 1:
      raise
    traceback.print_exc()
    print(f"process {jax.process_index()} of {jax.process_count()} ends here (exit status 1), "
          "not in jax.distributed's shutdown, so that the other processes stop too",
          file=sys.stderr)
    children = multiprocessing.active_children()
    for child in children:
      child.terminate()
    for child in children:
      child.join(timeout=10)
      if child.is_alive():
        child.kill()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access


def _multihost_utils():
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils


def barrier(name: str) -> None:
  """Every process waits here for the others (nothing with one process)."""
  if jax.process_count() > 1:
    _multihost_utils().sync_global_devices(name)


def process_0_first(fn):
  """``fn()`` on process 0, then on the others: e.g. process 0 builds a cache the others read.
  An error on process 0 is raised after the others have been let go (they meet their own, not
  a wait without end). ``fn()`` alone with one process."""
  if jax.process_index() > 0:
    barrier("ssl_us_process_0_first")
    return fn()
  try:
    return fn()
  finally:
    barrier("ssl_us_process_0_first")


def check_processes_agree(values: dict[str, str]) -> None:
  """A ValueError on every process unless each holds the same ``values`` (name -> text, e.g. the
  config, the dataset's hash) as process 0: processes that plan batches over different records
  or configs would train on wrong batches, or wait forever in a collective. One all-gather of
  the texts' hashes; nothing with one process."""
  if jax.process_count() == 1:
    return
  names = sorted(values)
  mine = np.stack([np.frombuffer(hashlib.sha256(values[n].encode()).digest(), np.uint8)
                   for n in names])
  every = np.asarray(_multihost_utils().process_allgather(mine)).reshape(-1, len(names), 32)
  for k, name in enumerate(names):
    differ = [p for p in range(len(every)) if not np.array_equal(every[p, k], every[0, k])]
    if differ:
      raise ValueError(f"process {differ[0]}{' and others' if len(differ) > 1 else ''} of "
                       f"{len(every)} holds another {name} than process 0 (this is process "
                       f"{jax.process_index()}): every process must run the same command on "
                       "the same data")


def check_shared_folder(path: str, what: str) -> None:
  """A ValueError on every process unless ``path`` is one folder that all processes see: process
  0 writes a fresh file there and every process reads it. Orbax's multi-host checkpoints need
  it (each process writes its share, process 0 completes the step), as does resuming. Nothing
  with one process."""
  if jax.process_count() == 1:
    return
  mh = _multihost_utils()
  token = bytes(np.asarray(mh.broadcast_one_to_all(
      np.frombuffer(secrets.token_bytes(16), np.uint8)), np.uint8)).hex()
  probe = os.path.join(path, f".ssl_us_shared_{token}")
  if jax.process_index() == 0:
    files_lib.write_text(probe, token)
  barrier(f"ssl_us_shared_written_{token}")
  try:
    with open(probe) as f:
      seen = f.read() == token
  except OSError:
    seen = False
  every = np.asarray(mh.process_allgather(np.array([seen]))).ravel()
  barrier(f"ssl_us_shared_read_{token}")
  if jax.process_index() == 0:
    os.remove(probe)
  missing = [p for p, ok in enumerate(every) if not ok]
  if missing:
    raise ValueError(
        f"{what} {path} is not one folder shared by the {len(every)} processes: process "
        f"{', '.join(map(str, missing))} cannot read the file process 0 wrote there. A "
        "multi-host run writes its checkpoints there from every host: use a file system every "
        "host mounts at the same path (NFS, Filestore, Lustre, a bucket through gcsfuse)")

