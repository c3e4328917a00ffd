r"""A PNG grid of a few clips and their two augmented views: what the network sees.

  python -m ssl_us.show_augment --config configs/byol_lung.py:runlocal \
      --config.data.dir /tmp/blues_clips/covid_blues/1.0.0 --out /tmp/views.png [--num_clips 4]

Clips come from the config's ClipSampler (config.clips) over config.data.dir / config.data.split;
the views from ``augment_video`` with config.aug and config.temporal_aug, keyed like training
(one key per clip from its index in the batch). For each clip three rows of T frames: the
original (center view, frames in order), view A and view B, each row labelled with the temporal
draw (reversed, frames shuffled and replaced, the resulting frame order). Pixel values are
shown in [0, 1] intensity units (model units undone), frames enlarged by ``--zoom``.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image, ImageDraw

from data_prep import files as files_lib
from ssl_us import augment, augment_video, input_pipeline
from ssl_us.methods.simclr_video import make_clip_sampler



def _define_flags():
  """Command-line flags, defined only when run as a program (importing defines none)."""
  config_flags.DEFINE_config_file("config", None, "Pretraining config (clip method).",
                                  lock_config=True)
  flags.DEFINE_string("out", None, "Output PNG path.")
  flags.DEFINE_integer("num_clips", 4, "Clips to show.")
  flags.DEFINE_integer("seed", 0, "Seed of the clip choice and the augmentations.")
  flags.DEFINE_integer("zoom", 2, "Integer enlargement of every frame.")
  flags.mark_flags_as_required(["config", "out"])

GAP = 4          # pixels between frames and rows
LABEL_H = 14     # pixels of the text line above each row


def sample_batch(config, num_clips: int, seed: int):
  """(``num_clips`` host examples from the config's clip sampler, the label names)."""
  index = input_pipeline.load_index(config.data.dir, config.data.split)
  ds = input_pipeline.make_dataset(index, make_clip_sampler(config), global_batch=num_clips,
                                   seed=seed, num_workers=0)
  return next(iter(ds)), list(index.metadata.get("label_names", []))


def make_views(batch, cfg: augment_video.VideoAugmentConfig, seed: int):
  """(original, view A, view B) float32 (n, T, h, w, 1) in [0, 1], and the temporal draws."""
  clip_a = jnp.asarray(batch["clip"])
  clip_b = jnp.asarray(batch.get("clip_b", batch["clip"]))
  k_a, k_b = jax.random.split(jax.random.key(seed))

  @jax.jit
  def run(clip_a, clip_b):
    def views(key, clips):
      keys = augment.example_keys(key, clips.shape[0])
      return jax.vmap(lambda k, c: augment_video.augment_video_and_order(k, c, cfg))(keys,
                                                                                     clips)
    return augment.center_view(clip_a, cfg.spatial), views(k_a, clip_a), views(k_b, clip_b)

  orig, (va, idx_a, info_a), (vb, idx_b, info_b) = run(clip_a, clip_b)
  undo = lambda x: np.clip(np.asarray(x) * cfg.spatial.std + cfg.spatial.mean, 0.0, 1.0)
  return undo(orig), (undo(va), np.asarray(idx_a), info_a), (undo(vb), np.asarray(idx_b), info_b)


def describe(idx, info, i: int) -> str:
  """'reversed, shuffled 2, replaced 1: order 7 6 5 ...' for clip i."""
  parts = ["reversed"] if bool(info["reversed"][i]) else []
  parts += [f"shuffled {int(info['shuffled'][i])}", f"replaced {int(info['replaced'][i])}"]
  return ", ".join(parts) + ": order " + " ".join(str(int(t)) for t in idx[i])


def grid(rows: list[tuple[str, np.ndarray]], zoom: int) -> Image.Image:
  """Rows of (label, frames (T, h, w, 1) in [0, 1]) as one grayscale image with labels."""
  t, h, w = rows[0][1].shape[:3]
  fh, fw = h * zoom, w * zoom
  width = GAP + t * (fw + GAP)
  row_h = LABEL_H + fh + GAP
  canvas = np.full((GAP + len(rows) * row_h, max(width, 320)), 255, np.uint8)
  for r, (_, frames) in enumerate(rows):
    y = GAP + r * row_h + LABEL_H
    for j, f in enumerate(frames):
      img = np.kron((f[..., 0] * 255).round().astype(np.uint8), np.ones((zoom, zoom), np.uint8))
      x = GAP + j * (fw + GAP)
      canvas[y:y + fh, x:x + fw] = img
  image = Image.fromarray(canvas, mode="L")
  draw = ImageDraw.Draw(image)
  for r, (label, _) in enumerate(rows):
    draw.text((GAP, GAP + r * row_h), label, fill=0)
  return image


def write_png(path: str, image: Image.Image):
  """Written to a temporary name in the same folder, then renamed."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with files_lib.atomic_path(path) as tmp:
    image.save(tmp, format="PNG")


def render(config, num_clips: int, seed: int, zoom: int) -> Image.Image:
  cfg = augment_video.VideoAugmentConfig.from_config(config.aug, config.temporal_aug,
                                                     config.image_size)
  batch, names = sample_batch(config, num_clips, seed)
  orig, (va, idx_a, info_a), (vb, idx_b, info_b) = make_views(batch, cfg, seed)
  rows = []
  for i in range(orig.shape[0]):
    label = int(batch["label"][i])
    label = names[label] if 0 <= label < len(names) else str(label)
    padded = int(batch["padded"][i][0])
    pad = f", {padded} frames padded" if padded else ""
    rows.append((f"clip {i} ({label}{pad}): original", orig[i]))
    rows.append((f"view A - {describe(idx_a, info_a, i)}", va[i]))
    second = f" (2nd clip, {int(batch['distance'][i])} frames on)" if "clip_b" in batch else ""
    rows.append((f"view B{second} - {describe(idx_b, info_b, i)}", vb[i]))
  return grid(rows, zoom)


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  if not config.data.dir:
    raise app.UsageError("set --config.data.dir=<data_prep dataset dir>")
  if f.num_clips < 1 or f.zoom < 1:
    raise app.UsageError("--num_clips and --zoom must be >= 1")
  write_png(f.out, render(config, f.num_clips, f.seed, f.zoom))
  print(f"wrote {f.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
