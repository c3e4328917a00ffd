"""Tiny schema-compliant datasets for spine tests, written without data_prep's pipeline.

Each video is a few frames of oriented stripes plus noise; its class (0: horizontal, 1:
vertical) is the stripe orientation, so a trained encoder can separate the classes.
``run_steps`` drives the training spine over such a dataset; ``run_on_8_cpu_devices`` runs a
script in a fresh Python on 8 fake CPU devices.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np

from data_prep import schema


def stripes(rng, cls, size, phase):
  h, w = size
  yy, xx = np.mgrid[0:h, 0:w]
  period = rng.uniform(5, 9)
  coord = yy if cls == 0 else xx
  img = 0.5 + 0.35 * np.sin(2 * np.pi * (coord / period) + phase)
  img = img + rng.normal(0, 0.1, size)
  return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def paths_below(root: str) -> list[str]:
  """Every file and folder below ``root``, hidden ones included (glob's '**/*' skips those)."""
  return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files]


def temporary_files(root: str) -> list[str]:
  """Every file below ``root`` named as written but not yet complete: shards' '.tmp' and the
  hidden '.<name>.<random>.tmp<ext>' of data_prep/files.py."""
  return [os.path.join(d, f) for d, _, names in os.walk(root) for f in names
          if f.endswith(".tmp") or ".tmp." in f]


def write_dataset(root, *, split="train", num_videos=8, frames=4, size=(16, 16),
                  num_shards=2, clip_len=0, seed=0, name="tiny"):
  """Writes <root>/<name>/1.0.0 with shards, metadata.json and dataset_info.json last."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (the step tests run without)
  rng = np.random.default_rng(seed)
  out = os.path.join(root, name, "1.0.0")
  os.makedirs(out, exist_ok=True)
  features = schema.tfds_features(*size)
  per_shard = [[] for _ in range(num_shards)]
  for v in range(num_videos):
    cls = v % 2
    imgs = [stripes(rng, cls, size, phase=0.7 * t) for t in range(frames)]
    groups = ([list(range(t, t + clip_len)) for t in range(0, frames - clip_len + 1, clip_len)]
              if clip_len else [[t] for t in range(frames)])
    for g in groups:
      ex = {
          "frames": [imgs[t][..., None] for t in g],
          "frame_indices": np.asarray(g, np.int64),
          "timestamps": np.asarray(g, np.float32) / 10.0,
          "anatomy_coarse": np.asarray([t % 2 for t in g], np.int64),
          "anatomy_fine": np.asarray([t % 3 if t % 4 else -1 for t in g], np.int64),
          "label": cls, "label_name": ["horizontal", "vertical"][cls],
          "video_id": f"video{v:03d}", "patient": f"p{v // 2}", "exam": "T1", "side": "left",
          "source": f"video{v:03d}.mp4", "fps": 10.0, "video_num_frames": frames,
          "padded": 0, "metadata": "{}",
      }
      per_shard[v % num_shards].append(features.serialize_example(ex))
  for i, recs in enumerate(per_shard):
    path = os.path.join(out, f"{name}-{split}.tfrecord-{i:05d}-of-{num_shards:05d}")
    with tf.io.TFRecordWriter(path) as w:
      for r in recs:
        w.write(r)
  with open(os.path.join(out, "metadata.json"), "w") as f:
    json.dump({"label_names": ["horizontal", "vertical"], "anatomy_coarse_names": ["a", "b"],
               "anatomy_fine_names": ["x", "y", "z"], "mode": "clip" if clip_len else "all",
               "image_size": list(size), "clip_len": clip_len}, f)
  with open(os.path.join(out, "dataset_info.json"), "w") as f:
    json.dump({"name": name}, f)
  return out


def run_steps(config, mesh, steps):
  """Steps from a fresh state on ``mesh``; returns (losses, final state as numpy)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ssl_us import parallel, train  # pylint: disable=g-import-not-at-top
  setup = train.build(config, mesh)
  it = iter(train.make_input(setup, config))
  batches = [next(it) for _ in range(steps)]
  state = train.init_state(setup, config, batches[0])
  step = train.make_train_step(setup.method, setup.tx, setup.schedule, mesh)
  losses = []
  for b in batches:
    state, m = step(state, parallel.shard_host_batch(b, mesh))
    losses.append(float(m["loss"]))
  return losses, jax.device_get(state)


def assert_states_equal(a, b):
  """Every leaf of two TrainStates equal to the bit, with its path on failure."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves_b = jax.tree.leaves(b)
  assert len(jax.tree.leaves(a)) == len(leaves_b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), leaves_b):
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


# ----------------------------------------------------------------------------------------------
# Sharded == single device, in float32, to a derived tolerance.
#
# The 8-device and the 1-device programs compute the same sums in different orders: BatchNorm
# statistics as 8 partial sums then a psum instead of one reduction, NT-Xent over gathered rows,
# and every reduction vectorised for a per-device batch of n/8 instead of n (XLA's vector width
# also differs between x86 CPUs: SSE, AVX2, AVX-512). In float64 the two programs agree to 1e-14
# (benchmarks/RESULTS.md, issue 27), so what differs in float32 is rounding. A sum of K terms
# whose order changes moves by about sqrt(K) * u relative, u = 2**-24 = 6.0e-8 (random-walk
# rounding); the longest sums here are BatchNorm's over the views of the global batch,
# K <= 2**14 elements per channel (16 views x 4 frames x 16 x 16), so sqrt(K) * u <= 7.7e-6 per
# normalised layer, and forward plus backward through the <= 10 such layers of the tiny test
# models adds up to <= 7.7e-5. Hence FLOAT32_STEP_RTOL = 1e-4, relative to the norm of the
# whole quantity (gradient, update): measured at most 6.1e-6 (SimCLR and BYOL-3D test configs,
# XLA's SSE4.2 and AVX-512 code, --xla_cpu_max_isa), while a real difference, BatchNorm
# statistics taken per device, moves the loss by 0.17-0.38 and the gradient by 0.56-1.9
# (test_train.test_equivalence_check_catches_per_device_batchnorm).
#
# Only what one step computes from a shared state is compared. Trajectories are not: after the
# first step the two states differ by that rounding, and the next gradients (BatchNorm over
# 12x12 frames, SGD with lr 0.1 and momentum) amplify it about 40x per step. Elementwise
# comparisons are not used either: a leaf whose true gradient is 0 (a bias feeding a BatchNorm)
# holds pure rounding noise, so each leaf is compared against the norm of its whole tree.
FLOAT32_STEP_RTOL = 1e-4


def normwise_errors(got, want) -> dict:
  """{leaf path: ||got_l - want_l|| / ||want||}, the denominator over the whole tree (1 if
  ``want`` is all zeros, so the errors are then absolute)."""
  import jax  # pylint: disable=g-import-not-at-top
  want_l = jax.tree_util.tree_leaves_with_path(want)
  got_l = jax.tree.leaves(got)
  assert len(got_l) == len(want_l), (len(got_l), len(want_l))
  scale = math.sqrt(sum(float(np.sum(np.square(np.asarray(w, np.float64))))
                        for _, w in want_l))
  scale = scale or 1.0
  return {jax.tree_util.keystr(p): float(np.linalg.norm(
      (np.asarray(g, np.float64) - np.asarray(w, np.float64)).ravel())) / scale
          for (p, w), g in zip(want_l, got_l)}


def assert_value_and_gradient_close(value, want_value, grads, want_grads):
  """A loss and its gradient equal to a reference up to float32 reordering: the value within
  FLOAT32_STEP_RTOL relative, the gradient within it normwise (``normwise_errors``)."""
  value, want_value = float(value), float(want_value)
  assert math.isfinite(value), value
  assert abs(value - want_value) <= FLOAT32_STEP_RTOL * abs(want_value), (value, want_value)
  errors = normwise_errors(grads, want_grads)
  assert max(errors.values()) <= FLOAT32_STEP_RTOL, errors


# Whole encoders are compared in float64. Their gradients amplify rounding about 1,000-fold
# (BatchNorm over 4 values at the 1x1 stage), so in float32 two ways of computing an encoder
# (tests/test_ops.py: ops.py's kernels against XLA's) are 1e-4 from the exact gradient and from
# each other, by amounts that depend on the CPU's instruction set (AMD EPYC: 1.7e-4); in
# float64 they agree to 1e-13 on any CPU, and a wrong patch, pad or transpose shows as O(1).
ENCODER_RTOL = 1e-10


def assert_close(a, b, rtol):
  """|a - b| <= rtol * max|a|, leaf by leaf (float64 leaves compared in float64)."""
  import jax  # pylint: disable=g-import-not-at-top
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    dtype = np.float64 if np.asarray(x).dtype == np.float64 else np.float32
    x, y = np.asarray(x, dtype), np.asarray(y, dtype)
    assert x.shape == y.shape
    np.testing.assert_allclose(y, x, rtol=0, atol=rtol * max(float(np.abs(x).max()), 1e-30))


def encoder_value_and_grads(encoder, variables, x):
  """Jitted ((sum(sin(h)), the updated batch_stats), (d/dparams, d/dx)) of a train-mode
  encoder."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def f(params, x):
    h, new = encoder.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                           train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(h)), new["batch_stats"]
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(variables["params"], x)


def sharded_encoder_value_and_grads(encoder, variables, x, devices: int = 2):
  """(mean of sin(h) over the global batch, d/dparams) of a train-mode ``encoder`` (built with
  ``axis_name=parallel.DATA``: BatchNorm over all devices) under shard_map on ``devices``
  devices, ``x`` split between them."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from ssl_us import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(devices)

  def loss(params, x):
    h, _ = encoder.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                         train=True, mutable=["batch_stats"])
    return jax.lax.pmean(jnp.mean(jnp.sin(h)), parallel.DATA)

  fn = jax.jit(jax.shard_map(jax.value_and_grad(loss), mesh=mesh,
                             in_specs=(P(), P(parallel.DATA)), out_specs=(P(), P())))
  return jax.device_get(fn(parallel.replicate(variables["params"], mesh),
                           parallel.shard_host_batch(x, mesh)))


def unit_scales_f64(variables):
  """float64 copies; every BatchNorm scale 1, so that every convolution reaches the output
  (the residual branches' last scales are initialised at 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return {"params": jax.tree_util.tree_map_with_path(
      lambda p, a: (jnp.ones_like(a) if p[-1].key == "scale" else a).astype(jnp.float64),
      variables["params"]),
          "batch_stats": jax.tree.map(lambda a: a.astype(jnp.float64), variables["batch_stats"])}


def _delta(new, old):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                      new, old)


def loss_step(method, mesh, microbatches: int = 1, full: bool = True):
  """jit(shard_map) of (state, batch) -> (loss, gradient, new variables) as the train step
  computes them (ssl_us.gradcache with ``microbatches``); new variables are {} unless ``full``."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from ssl_us import gradcache, parallel  # pylint: disable=g-import-not-at-top

  def f(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, (new_vars, _)), grads = gradcache.value_and_grad(method, microbatches)(
        state.params, state.variables, batch, rng)
    return (loss, grads, new_vars) if full else (loss, grads, {})
  return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P(parallel.DATA)),
                               out_specs=(P(), P(), P())))


def loss_step_errors(config, batch, cases, reference=(1, 1)) -> dict:
  """{(devices, microbatches): {'loss', 'grads', 'new_vars': normwise relative error}} of the
  loss step of every case against ``reference``, all from one fresh state on one host batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from ssl_us import parallel, train  # pylint: disable=g-import-not-at-top
  from ssl_us.methods import make_method  # pylint: disable=g-import-not-at-top
  state = jax.device_get(train.create_state(make_method(config), optax.sgd(0.1),
                                            jax.random.key(0), batch))
  out = {}
  for d, m in {reference, *cases}:
    mesh = parallel.make_mesh(d)
    loss, grads, new_vars = jax.device_get(loss_step(make_method(config, parallel.DATA), mesh, m)(
        parallel.replicate(state, mesh), parallel.shard_host_batch(batch, mesh)))
    out[(d, m)] = dict(loss=loss, grads=grads, new_vars=_delta(new_vars, {
        k: state.variables[k] for k in new_vars}))
  want = out[reference]
  return {case: {"loss": abs(float(out[case]["loss"]) - float(want["loss"])) / abs(float(
      want["loss"])), **{k: max(normwise_errors(out[case][k], want[k]).values(), default=0.0)
                         for k in ("grads", "new_vars")}} for case in cases}


def sharded_step_errors(config, steps: int = 2, devices: int = 8,
                        full: bool = True) -> list[dict]:
  """Per step, from one shared state: the normwise relative differences between ``devices``
  devices and one device of the loss, its gradient and, if ``full``, the BatchNorm statistics
  the loss step produces and the train step's parameter and variable updates. The shared state
  follows the 1-device run. Returns one {quantity: max relative error} per step.

  ``full=False`` measures a method whose statistics wrongly differ between devices, which
  shard_map would refuse to return as replicated."""
  import jax  # pylint: disable=g-import-not-at-top
  from ssl_us import parallel, train  # pylint: disable=g-import-not-at-top
  meshes = {n: parallel.make_mesh(n) for n in (devices, 1)}
  setups = {n: train.build(config, m) for n, m in meshes.items()}
  it = iter(train.make_input(setups[1], config))
  batches = [next(it) for _ in range(steps)]
  state = jax.device_get(train.init_state(setups[1], config, batches[0]))

  fns = {n: (loss_step(s.method, meshes[n], full=full),
              train.make_train_step(s.method, s.tx, s.schedule, meshes[n]))
         for n, s in setups.items()}
  errors = []
  for batch in batches:
    out = {}
    for n, (g_fn, step_fn) in fns.items():
      put = lambda x, n=n: parallel.replicate(x, meshes[n])
      sharded = parallel.shard_host_batch(batch, meshes[n])
      loss, grads, new_vars = jax.device_get(g_fn(put(state), sharded))
      new_state = jax.device_get(step_fn(put(state), sharded)[0]) if full else state
      out[n] = dict(loss=loss, grads=grads, new_vars=_delta(new_vars, {
          k: state.variables[k] for k in new_vars}), new_state=new_state)
    a, b = out[devices], out[1]
    err = {"loss": abs(float(a["loss"]) - float(b["loss"])) / abs(float(b["loss"]))}
    for k in ("grads", "new_vars"):
      err[k] = max(normwise_errors(a[k], b[k]).values(), default=0.0)
    for k in ("params", "variables") if full else ():
      err[f"update_{k}"] = max(normwise_errors(
          _delta(getattr(a["new_state"], k), getattr(state, k)),
          _delta(getattr(b["new_state"], k), getattr(state, k))).values(), default=0.0)
    errors.append(err)
    state = b["new_state"]
  return errors


def assert_sharded_step_equals_single_device(config, steps: int = 2, devices: int = 8):
  """Every quantity of every step within FLOAT32_STEP_RTOL (see the derivation above).

  The config's optimizer must be linear in the gradient (SGD, LARS): Adam's first update is
  g / |g| elementwise, which turns the rounding noise of a zero gradient into +-lr."""
  assert config.optim.name in ("sgd", "lars"), config.optim.name
  errors = sharded_step_errors(config, steps, devices)
  for i, err in enumerate(errors):
    for k, v in err.items():
      assert v <= FLOAT32_STEP_RTOL, f"step {i}: {k} differs by {v:.3e} relative: {errors}"
  return errors


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test subprocess: ``devices`` fake CPU devices and the suite's compiler
  flags (tests/conftest.py, SSL_US_TEST_XLA_FLAGS)."""
  return (f"--xla_force_host_platform_device_count={devices} "
          f"{os.environ.get('SSL_US_TEST_XLA_FLAGS', '')}").strip()


def run_on_8_cpu_devices(script: str, *args: str, timeout: int = 300) -> str:
  """Runs ``python -c script args`` from the repository root on 8 fake CPU devices; asserts a
  zero exit and stdout starting with "OK"; returns stdout."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", script, *args], cwd=root, env=env,
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith("OK"), out.stdout[-3000:]
  return out.stdout


def process_output(proc, timeout: float = 900, children_end_with_it: bool = False) -> str:
  """The whole stdout of ``proc`` (a Popen with stdout=PIPE, text=True, start_new_session=True)
  once it has exited. Its process group is killed then: worker processes that a crashed process
  leaves behind (grain's) hold its stdout open, so reading to the end would wait for them.
  ``children_end_with_it``: an AssertionError if such a process still holds it 30 s after."""
  import signal  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  out = []
  reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
  reader.start()
  proc.wait(timeout=timeout)
  if children_end_with_it:
    reader.join(timeout=30)
  outlived = reader.is_alive()
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  reader.join(timeout=60)
  log = out[0] if out else ""
  assert not (children_end_with_it and outlived), (
      f"a process that {proc.args} started outlived it, holding its output:\n{log[-3000:]}")
  return log
