"""Records and shard files: PNG frames, tf.train.Example serialization, TFRecord framing.

Examples are serialized by ``schema.tfds_features(h, w, frame_encoding)`` (tfds's own encoder),
frames passed as lossless PNG bytes made here with Pillow, or as raw uint8 arrays. The TFRecord
framing (length, masked CRC-32C of the length, data, masked CRC-32C of the data) is written
directly, so that a shard can be rolled back to the start of a video that fails half-way: a
video's records are all in one shard or in none.
Shards are written under a ``.tmp`` name, fsync'ed, and renamed when complete.
"""
from __future__ import annotations

import io
import json
import os
import struct
from typing import Any

import google_crc32c
import numpy as np
from PIL import Image

from data_prep import schema

_MASK_DELTA = 0xA282EAD8


def masked_crc(data: bytes) -> int:
  """TFRecord's masked CRC-32C of data."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
  """One TFRecord: uint64 length, masked crc(length), data, masked crc(data), little-endian."""
  length = struct.pack("<Q", len(data))
  return b"".join((length, struct.pack("<I", masked_crc(length)), data,
                   struct.pack("<I", masked_crc(data))))


def framed_size(record: bytes) -> int:
  """Bytes that one record takes in a TFRecord file (16 bytes of framing)."""
  return len(record) + 16


def encode_png(frame: np.ndarray) -> bytes:
  """uint8 (H, W) grayscale -> lossless PNG bytes."""
  if frame.dtype != np.uint8 or frame.ndim != 2:
    raise ValueError(f"expected a uint8 (H, W) frame, got {frame.dtype} {frame.shape}")
  buf = io.BytesIO()
  Image.fromarray(frame, mode="L").save(buf, format="PNG", compress_level=6)
  return buf.getvalue()


def encode_frame(frame: np.ndarray, frame_encoding: str):
  """uint8 (H, W) grayscale -> what the record's frames feature takes: PNG bytes, or for
  'raw' the (H, W, 1) array (tfds stores its bytes)."""
  if frame_encoding == "png":
    return encode_png(frame)
  if frame.dtype != np.uint8 or frame.ndim != 2:
    raise ValueError(f"expected a uint8 (H, W) frame, got {frame.dtype} {frame.shape}")
  return np.ascontiguousarray(frame)[..., None]


class RecordEncoder:
  """Builds and serializes schema records for one image size and frame encoding.

  Serialization is deterministic (the Example's feature map in key order): the same record
  is the same bytes in every process and on every runner (a proto map's default order is
  not).
  """

  def __init__(self, height: int, width: int, frame_encoding: str = "png"):
    from tensorflow_datasets.core import example_serializer  # pylint: disable=g-import-not-at-top
    self.features = schema.tfds_features(height, width, frame_encoding)
    self._serializer = example_serializer.ExampleSerializer(
        self.features.get_serialized_info())

  def serialize(self, *, frames: list, frame_indices: list[int], timestamps: list[float],
                anatomy_coarse: list[int], anatomy_fine: list[int], video: dict[str, Any],
                padded: int) -> bytes:
    """A serialized tf.train.Example; ``video`` holds the per-video schema fields."""
    example = dict(video)
    example.update(
        frames=frames,
        frame_indices=np.asarray(frame_indices, np.int64),
        timestamps=np.asarray(timestamps, np.float32),
        anatomy_coarse=np.asarray(anatomy_coarse, np.int64),
        anatomy_fine=np.asarray(anatomy_fine, np.int64),
        padded=padded)
    proto = self._serializer.get_tf_example(self.features.encode_example(example))
    return proto.SerializeToString(deterministic=True)


def video_fields(*, label: int, label_name: str, video_id: str, patient: str, exam: str,
                 side: str, source: str, fps: float, num_frames: int,
                 metadata: dict[str, str]) -> dict[str, Any]:
  """The schema fields that are the same for every record of a video."""
  return dict(label=label, label_name=label_name, video_id=video_id, patient=patient, exam=exam,
              side=side, source=source, fps=float(fps), video_num_frames=int(num_frames),
              metadata=json.dumps(metadata, ensure_ascii=False, sort_keys=False))


class ShardWriter:
  """Appends framed records to ``path + '.tmp'``; ``commit`` makes it ``path``.

  ``mark()`` remembers the current end; ``rollback()`` truncates back to it (a video that
  failed half-way leaves nothing behind).
  """

  def __init__(self, path: str):
    self.path = path
    self.tmp_path = path + ".tmp"
    self._f = open(self.tmp_path, "wb")
    self.num_records = 0
    self.num_bytes = 0
    self._mark = (0, 0)

  def write(self, record: bytes) -> None:
    data = frame_record(record)
    self._f.write(data)
    self.num_records += 1
    self.num_bytes += len(data)

  def mark(self) -> None:
    self._mark = (self.num_records, self.num_bytes)

  def rollback(self) -> None:
    self.num_records, self.num_bytes = self._mark
    self._f.flush()
    self._f.truncate(self.num_bytes)
    self._f.seek(self.num_bytes)

  def commit(self) -> tuple[int, int]:
    """Flush, fsync and rename to the final name; returns (records, bytes)."""
    self._f.flush()
    os.fsync(self._f.fileno())
    self._f.close()
    os.replace(self.tmp_path, self.path)
    return self.num_records, self.num_bytes

  def discard(self) -> None:
    """Close and delete the temporary file."""
    self._f.close()
    os.remove(self.tmp_path)
