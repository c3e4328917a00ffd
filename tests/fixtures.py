"""Tiny schema-compliant datasets for spine tests, written without data_prep's pipeline.

Each video is a few frames of oriented stripes plus noise; its class (0: horizontal, 1:
vertical) is the stripe orientation, so a trained encoder can separate the classes.
``run_steps`` drives the training spine over such a dataset; ``run_on_8_cpu_devices`` runs a
script in a fresh Python on 8 fake CPU devices.
"""
import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from data_prep import schema


def stripes(rng, cls, size, phase):
  h, w = size
  yy, xx = np.mgrid[0:h, 0:w]
  period = rng.uniform(5, 9)
  coord = yy if cls == 0 else xx
  img = 0.5 + 0.35 * np.sin(2 * np.pi * (coord / period) + phase)
  img = img + rng.normal(0, 0.1, size)
  return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_dataset(root, *, split="train", num_videos=8, frames=4, size=(16, 16),
                  num_shards=2, clip_len=0, seed=0, name="tiny"):
  """Writes <root>/<name>/1.0.0 with shards, metadata.json and dataset_info.json last."""
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


def run_on_8_cpu_devices(script: str, *args: str, timeout: int = 300) -> str:
  """Runs ``python -c script args`` from the repository root on 8 fake CPU devices; asserts a
  zero exit and stdout starting with "OK"; returns stdout."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", script, *args], cwd=root, env=env,
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith("OK"), out.stdout[-3000:]
  return out.stdout
