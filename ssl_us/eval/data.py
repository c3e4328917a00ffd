"""Downstream data in memory: records of data_prep shards, and dense ground truth of the
synthetic generator (data_prep.synthetic) for segmentation and saliency.

``load_records``: every record of the given splits of a data_prep dataset (through
ssl_us.input_pipeline), as numpy arrays; images uint8 (N, H, W, 1) for frame records or
(N, T, H, W, 1) for clip records.

``load_dense``: frames, masks and pathology boxes of a synthetic-generator folder (manifest.csv,
<label>/<video_id>.mp4, masks/<video_id>.npz, boxes.csv). Frames go through data_prep's own
geometry (``region.find_region`` on the video, ``region.apply_region``: crop to the scan area,
blank outside it, resize keeping the aspect ratio, pad centred), so they look like the records
the encoder was pretrained on; masks take the same crop, blanking (to class 0), nearest-
neighbour resize and padding, and boxes the same affine map (outward rounding).
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import logging
import os

import numpy as np

from data_prep import region as region_lib
from ssl_us import input_pipeline


@dataclasses.dataclass(frozen=True)
class Records:
  """One row per record (frame or clip)."""
  images: np.ndarray        # uint8 (N, H, W, 1) or (N, T, H, W, 1)
  label: np.ndarray         # int64 (N,), -1 = none
  video: np.ndarray         # str (N,)
  patient: np.ndarray       # str (N,)
  exam: np.ndarray          # str (N,)
  side: np.ndarray          # str (N,)
  frame_index: np.ndarray   # int64 (N,) first frame of the record in its video
  anatomy_fine: np.ndarray  # int64 (N,) of the first frame, -1 = none
  label_names: tuple[str, ...]
  anatomy_fine_names: tuple[str, ...]

  def __len__(self):
    return int(self.label.shape[0])

  def subset(self, idx) -> "Records":
    arrays = {f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)
              if isinstance(getattr(self, f.name), np.ndarray)}
    return dataclasses.replace(self, **arrays)


def load_records(dataset_dir: str, splits: tuple[str, ...]) -> Records:
  """All records of ``splits`` (those that exist; at least one must) of a data_prep dataset."""
  found = _existing_splits(dataset_dir, splits)
  if not found:
    raise FileNotFoundError(f"{dataset_dir}: none of the splits {list(splits)} has shards")
  if len(found) < len(splits):  # e.g. no 'val' in a train/test build, or a misspelt name
    logging.warning("%s: no shards for the splits %s; using %s", dataset_dir,
                    [s for s in splits if s not in found], found)
  cols = {k: [] for k in ("images", "label", "video", "patient", "exam", "side", "frame_index",
                          "anatomy_fine")}
  metadata = {}
  for split in found:
    index = input_pipeline.load_index(dataset_dir, split)
    metadata = index.metadata
    reader = input_pipeline.RecordReader(index)
    for i in range(index.num_records):
      r = reader.read(i)
      cols["images"].append(r["frames"][0] if r["frames"].shape[0] == 1 else r["frames"])
      cols["label"].append(r["label"])
      cols["video"].append(r["video_id"])
      cols["patient"].append(r["patient"])
      cols["exam"].append(r["exam"])
      cols["side"].append(r["side"])
      cols["frame_index"].append(r["frame_indices"][0])
      cols["anatomy_fine"].append(r["anatomy_fine"][0])
  shapes = {x.shape for x in cols["images"]}
  if len(shapes) != 1:
    raise ValueError(f"{dataset_dir}: records of different shapes {sorted(shapes)}")
  return Records(images=np.stack(cols["images"]),
                 label=np.asarray(cols["label"], np.int64),
                 video=np.asarray(cols["video"]), patient=np.asarray(cols["patient"]),
                 exam=np.asarray(cols["exam"]), side=np.asarray(cols["side"]),
                 frame_index=np.asarray(cols["frame_index"], np.int64),
                 anatomy_fine=np.asarray(cols["anatomy_fine"], np.int64),
                 label_names=tuple(metadata.get("label_names", ())),
                 anatomy_fine_names=tuple(metadata.get("anatomy_fine_names", ())))


def _existing_splits(dataset_dir: str, splits) -> list[str]:
  """The splits that have shard files; a split with incomplete shards is an error."""
  out = []
  for s in splits:
    if glob.glob(os.path.join(glob.escape(dataset_dir), f"*-{s}.tfrecord-*")):
      input_pipeline.shard_files(dataset_dir, s)   # raises on missing shards / unfinished build
      out.append(s)
  return out


# ----------------------------------------------------------------------------------------------
# Dense ground truth of the synthetic generator.


@dataclasses.dataclass(frozen=True)
class Dense:
  images: np.ndarray        # uint8 (N, S, S, 1)
  masks: np.ndarray         # uint8 (N, S, S) class ids
  boxes: tuple              # per frame: tuple of ((class, y0, x0, y1, x1), ...)
  label: np.ndarray         # int64 (N,) video class id (index into label_names)
  video: np.ndarray         # str (N,)
  patient: np.ndarray       # str (N,)
  label_names: tuple[str, ...]
  mask_names: tuple[str, ...]

  def __len__(self):
    return int(self.label.shape[0])

  def subset(self, idx) -> "Dense":
    idx = np.asarray(idx)
    return dataclasses.replace(self, images=self.images[idx], masks=self.masks[idx],
                               boxes=tuple(self.boxes[i] for i in idx), label=self.label[idx],
                               video=self.video[idx], patient=self.patient[idx])


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
  """Source index of each output pixel of a nearest-neighbour resize (pixel centres)."""
  return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def _placement(region, size):
  """(scale_y, scale_x, rh, rw, top, left) of ``apply_region``'s resize and centred padding."""
  out_h, out_w = size
  ch, cw = region.y1 - region.y0, region.x1 - region.x0
  scale = min(out_h / ch, out_w / cw)
  rh, rw = min(out_h, max(1, round(ch * scale))), min(out_w, max(1, round(cw * scale)))
  return rh / ch, rw / cw, rh, rw, (out_h - rh) // 2, (out_w - rw) // 2


def apply_region_to_mask(mask: np.ndarray, region, size) -> np.ndarray:
  """Class-id mask (H, W) -> ``size``: the geometry of ``apply_region``, nearest neighbour."""
  crop = np.where(region.mask, mask[region.y0:region.y1, region.x0:region.x1], 0)
  _, _, rh, rw, top, left = _placement(region, size)
  out = np.zeros(size, mask.dtype)
  ch, cw = crop.shape
  out[top:top + rh, left:left + rw] = crop[_nearest_index(ch, rh)[:, None],
                                           _nearest_index(cw, rw)[None, :]]
  return out


def apply_region_to_box(box, region, size):
  """(y0, x0, y1, x1) source box -> output pixels (outward rounding, clipped to the output)."""
  sy, sx, _, _, top, left = _placement(region, size)
  y0, x0, y1, x1 = box
  ny0 = int(np.floor(top + (max(y0, region.y0) - region.y0) * sy))
  nx0 = int(np.floor(left + (max(x0, region.x0) - region.x0) * sx))
  ny1 = int(np.ceil(top + (min(y1, region.y1) - region.y0) * sy))
  nx1 = int(np.ceil(left + (min(x1, region.x1) - region.x0) * sx))
  return (max(ny0, 0), max(nx0, 0), min(ny1, size[0]), min(nx1, size[1]))


def _read_csv(path):
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: missing (not a data_prep.synthetic output folder?)")
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _decode_gray(path: str) -> np.ndarray:
  import av  # pylint: disable=g-import-not-at-top
  with av.open(path) as c:
    frames = [f.to_ndarray(format="gray") for f in c.decode(video=0)]
  if not frames:
    raise ValueError(f"{path}: no decodable frames")
  return np.stack(frames)


def load_dense(root: str, size: tuple[int, int], frame_step: int = 1) -> Dense:
  """Frames 0, frame_step, ... of every video of a synthetic folder, with masks and boxes."""
  manifest = _read_csv(os.path.join(root, "manifest.csv"))
  boxes_by_frame: dict[tuple[str, int], list] = {}
  for row in _read_csv(os.path.join(root, "boxes.csv")):
    key = (row["video_id"], int(row["frame_index"]))
    boxes_by_frame.setdefault(key, []).append(
        (row["class"],) + tuple(int(row[k]) for k in ("y0", "x0", "y1", "x1")))
  label_names = tuple(sorted({r["label"] for r in manifest}))
  images, masks, boxes, labels, videos, patients = [], [], [], [], [], []
  mask_names: tuple[str, ...] = ()
  for row in manifest:
    vid = row["video_id"]
    frames = _decode_gray(os.path.join(root, row["path"]))
    mask_path = os.path.join(root, "masks", f"{vid}.npz")
    if not os.path.exists(mask_path):
      raise FileNotFoundError(f"{mask_path}: no masks for video {vid!r}")
    with np.load(mask_path) as z:
      vmasks, mask_names = z["masks"], tuple(z["class_names"].tolist())
    if vmasks.shape != frames.shape:
      raise ValueError(f"{mask_path}: masks {vmasks.shape} do not match the video's frames "
                       f"{frames.shape}")
    reg = region_lib.find_region(frames)
    for t in range(0, len(frames), frame_step):
      images.append(region_lib.apply_region(frames[t], reg, size)[..., None])
      masks.append(apply_region_to_mask(vmasks[t], reg, size))
      boxes.append(tuple((c,) + apply_region_to_box(b, reg, size)
                         for c, *b in boxes_by_frame.get((vid, t), [])))
      labels.append(label_names.index(row["label"]))
      videos.append(vid)
      patients.append(row["patient_id"])
  return Dense(images=np.stack(images), masks=np.stack(masks), boxes=tuple(boxes),
               label=np.asarray(labels, np.int64), video=np.asarray(videos),
               patient=np.asarray(patients), label_names=label_names, mask_names=mask_names)
