"""Input: grain over data_prep's TFRecord shards, with pluggable samplers.

Layout of the pipeline (one per process):

  RecordIndex (where every record of a split is, plus its video/patient/labels)
    -> epoch plans from a Sampler: (num_examples, k) record ids per epoch, in sampling order,
       every block of ``global_batch`` rows one global batch
    -> this process's contiguous slice of every global batch (disjoint across processes)
    -> grain MapDataset.map(read the k records, decode the frames, sampler.assemble)
    -> batch(per-process batch), from the run's position -> mp_prefetch (worker processes)

Frames are PNG, or raw bytes when data_prep made them with --frame_encoding raw (metadata.json
says which; ``frame_format``): raw costs a copy instead of a PNG inflate.

The input's position (``InputPosition``: global batches taken, in the infinite sequence of
epoch plans) is checkpointed with the model through orbax (grain's handler). An example is a
function of its row of the plan alone, so batch k is the same on any number of processes and
workers. Records are read at their byte offset, so the plan can shuffle globally across
shards; the index is built once by scanning the shards and cached next to them (or kept in
memory when the dataset directory is read-only).

Every record's bytes are checked against the CRC-32C that data_prep framed it with, when the
index is built and at every read, and each shard's record count against dataset_info.json: a
shard damaged after it was written (a flipped bit on a disk or in a copy) is a DatasetError naming
the file and byte, never a record trained on as it reads.

Batches are dicts of numpy arrays; images stay uint8 (augmentation runs on device).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import hashlib
import io
import json
import logging
import os
import re
import struct
import zipfile
from typing import Any, Protocol

import numpy as np
from PIL import Image

from data_prep import files as files_lib
from data_prep import schema

_HEADER = 12  # uint64 length + uint32 masked crc of the length
_FOOTER = 4   # uint32 masked crc of the data
_SHARD_RE = re.compile(r"-(?P<split>[^-/]+)\.tfrecord-(?P<i>\d{5})-of-(?P<n>\d{5})$")


class DatasetError(ValueError):
  """A dataset directory or shard that cannot be used; the message names the path."""


# ----------------------------------------------------------------------------------------------
# Index over the records of one split.


@dataclasses.dataclass(frozen=True)
class RecordIndex:
  """Where each record of one split is and what it holds (one row per record)."""
  dataset_dir: str
  split: str
  files: tuple[str, ...]
  file_id: np.ndarray          # int32 (R,)
  offset: np.ndarray           # int64 (R,) start of the serialized Example
  length: np.ndarray           # int64 (R,)
  video: np.ndarray            # int32 (R,) index into video_ids
  video_ids: tuple[str, ...]
  patient: np.ndarray          # int32 (R,) index into patients
  patients: tuple[str, ...]
  frame_index: np.ndarray      # int64 (R,) first frame of the record
  num_frames: np.ndarray       # int32 (R,) frames in the record (1, or clip_len)
  label: np.ndarray            # int64 (R,) -1 = none
  anatomy_coarse: np.ndarray   # int64 (R,) first frame's, -1 = none
  anatomy_fine: np.ndarray     # int64 (R,)
  metadata: dict

  @property
  def num_records(self) -> int:
    return int(self.offset.shape[0])

  @property
  def num_videos(self) -> int:
    return len(self.video_ids)


def dataset_info(dataset_dir: str) -> dict:
  """The dataset_info.json of a finished data_prep build; DatasetError naming what is missing."""
  if not os.path.isdir(dataset_dir):
    raise DatasetError(f"{dataset_dir}: not a directory")
  path = os.path.join(dataset_dir, "dataset_info.json")
  if not os.path.exists(path):
    raise DatasetError(f"{dataset_dir}: no dataset_info.json: not a data_prep dataset, or its "
                       "build did not finish (re-run data_prep with the same arguments)")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def shard_files(dataset_dir: str, split: str) -> list[str]:
  """The split's shards, checked complete: a dataset_info.json and every -of-N shard present."""
  dataset_info(dataset_dir)
  files = sorted(glob.glob(os.path.join(glob.escape(dataset_dir), f"*-{split}.tfrecord-*")))
  files = [f for f in files if _SHARD_RE.search(f)]
  if not files:
    present = sorted({m.group("split") for f in os.listdir(dataset_dir)
                      if (m := _SHARD_RE.search(f))})
    raise DatasetError(f"{dataset_dir}: no shards for split {split!r}; splits present: {present}")
  n = int(_SHARD_RE.search(files[0]).group("n"))
  got = sorted(int(_SHARD_RE.search(f).group("i")) for f in files)
  if got != list(range(n)):
    raise DatasetError(f"{dataset_dir}: split {split!r} expects {n} shards, found {got}")
  return files


def _scan_offsets(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Record offsets and lengths of one TFRecord file, reading only the headers (each one's
  length checked against its CRC)."""
  offsets, lengths = [], []
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    pos = 0
    while pos < size:
      head = f.read(_HEADER)
      if len(head) != _HEADER:
        raise DatasetError(f"{path}: truncated record header at byte {pos}")
      _check_crc(head[:8], head[8:], f"{path}: the record header at byte {pos}")
      (n,) = struct.unpack("<Q", head[:8])
      end = pos + _HEADER + n + _FOOTER
      if end > size:
        raise DatasetError(f"{path}: truncated record at byte {pos} (needs {end}, file {size})")
      offsets.append(pos + _HEADER)
      lengths.append(n)
      f.seek(end)
      pos = end
  return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


def _check_crc(data: bytes, crc: bytes, what: str) -> None:
  """DatasetError unless ``crc`` is TFRecord's masked CRC-32C of ``data``."""
  if len(crc) != _FOOTER or struct.unpack("<I", crc)[0] != _masked_crc()(data):
    raise DatasetError(f"{what} does not match its CRC: the shard was damaged after data_prep "
                       "wrote it (disk, copy); copy it again or rebuild the dataset")


@functools.cache
def _masked_crc():
  from data_prep import writer  # pylint: disable=g-import-not-at-top  # google_crc32c, when read
  return writer.masked_crc


def _shard_lengths(dataset_dir: str, split: str) -> list[int] | None:
  """The split's records per shard as dataset_info.json records them (None if it does not)."""
  for s in dataset_info(dataset_dir).get("splits", []):
    if s.get("name") == split and "shardLengths" in s:
      return [int(n) for n in s["shardLengths"]]
  return None


@functools.cache
def _example_cls():
  """tf.train.Example's message class, built from its schema (tensorflow/core/example/
  example.proto and feature.proto) in a private descriptor pool: protobuf's own parser, without
  importing tensorflow (a 600 MB wheel) into the training process."""
  from google.protobuf import descriptor_pb2  # pylint: disable=g-import-not-at-top
  from google.protobuf import descriptor_pool, message_factory  # pylint: disable=g-import-not-at-top
  fdp = descriptor_pb2.FieldDescriptorProto
  f = descriptor_pb2.FileDescriptorProto(name="ssl_us/tf_example.proto", package="tensorflow",
                                         syntax="proto3")

  def message(name, fields, parent=None):
    m = (parent.nested_type if parent else f.message_type).add(name=name)
    for field_name, number, kind, label, type_name in fields:
      fd = m.field.add(name=field_name, number=number, type=kind, label=label)
      if type_name:
        fd.type_name = type_name
    return m

  rep, opt = fdp.LABEL_REPEATED, fdp.LABEL_OPTIONAL
  message("BytesList", [("value", 1, fdp.TYPE_BYTES, rep, None)])
  message("FloatList", [("value", 1, fdp.TYPE_FLOAT, rep, None)])
  message("Int64List", [("value", 1, fdp.TYPE_INT64, rep, None)])
  feature = message("Feature", [("bytes_list", 1, fdp.TYPE_MESSAGE, opt, ".tensorflow.BytesList"),
                                ("float_list", 2, fdp.TYPE_MESSAGE, opt, ".tensorflow.FloatList"),
                                ("int64_list", 3, fdp.TYPE_MESSAGE, opt, ".tensorflow.Int64List")])
  feature.oneof_decl.add(name="kind")
  for fd in feature.field:
    fd.oneof_index = 0
  features = message("Features", [("feature", 1, fdp.TYPE_MESSAGE, rep,
                                   ".tensorflow.Features.FeatureEntry")])
  entry = message("FeatureEntry", [("key", 1, fdp.TYPE_STRING, opt, None),
                                   ("value", 2, fdp.TYPE_MESSAGE, opt, ".tensorflow.Feature")],
                  parent=features)
  entry.options.map_entry = True
  message("Example", [("features", 1, fdp.TYPE_MESSAGE, opt, ".tensorflow.Features")])
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def parse_example(data: bytes, *, decode: bool = True, where: str = "",
                  frame_encoding: str = "png", image_size=None) -> dict[str, Any]:
  """A serialized record -> dict of numpy values per data_prep.schema.

  'frames' decoded to uint8 (T, H, W, 1): PNG, or for ``frame_encoding='raw'`` (the dataset's
  metadata says which) H*W bytes each, ``image_size`` (H, W) giving the shape; undecoded with
  ``decode=False`` (the list of bytes).
  """
  try:
    feats = _example_cls().FromString(data).features.feature
  except Exception as e:  # protobuf DecodeError
    raise DatasetError(f"{where}: not a tf.train.Example ({e})") from e
  missing = [k for k in schema.ALL_KEYS if k not in feats]
  if missing:
    raise DatasetError(f"{where}: record lacks keys {missing}")
  out: dict[str, Any] = {}
  for k in schema.INT_LIST_KEYS:
    out[k] = np.asarray(feats[k].int64_list.value, np.int64)
  for k in schema.FLOAT_LIST_KEYS:
    out[k] = np.asarray(feats[k].float_list.value, np.float32)
  for k in schema.INT_KEYS:
    out[k] = np.int64(feats[k].int64_list.value[0])
  for k in schema.FLOAT_KEYS:
    out[k] = np.float32(feats[k].float_list.value[0])
  for k in schema.BYTES_KEYS:
    out[k] = feats[k].bytes_list.value[0].decode("utf-8")
  frames = list(feats[schema.FRAMES].bytes_list.value)
  if not decode:
    out["frames"] = frames
  elif frame_encoding == "raw":
    out["frames"] = np.stack([decode_raw(b, image_size, where) for b in frames])
  else:
    out["frames"] = np.stack([decode_png(b) for b in frames])
  return out


def decode_raw(data: bytes, image_size, where: str = "") -> np.ndarray:
  """H*W bytes (data_prep --frame_encoding raw) -> uint8 (H, W, 1), a read-only view of them
  (``parse_example`` stacks the frames into a new array)."""
  h, w = image_size
  if len(data) != h * w:
    raise DatasetError(f"{where}: a raw frame of {len(data)} bytes, but metadata.json's "
                       f"image_size {h}x{w} needs {h * w}")
  return np.frombuffer(data, np.uint8).reshape(h, w, 1)


def decode_png(data: bytes) -> np.ndarray:
  """PNG bytes -> uint8 (H, W, 1)."""
  img = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
  return img[..., None]


_INDEX_VERSION = 2  # 2: rows in canonical order (see _canonical)


def _cache_key(files) -> str:
  h = hashlib.sha256(f"v{_INDEX_VERSION};".encode())
  for f in files:
    st = os.stat(f)
    h.update(f"{os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns};".encode())
  return h.hexdigest()


_INDEX_ARRAYS = ("file_id", "offset", "length", "video", "patient", "frame_index", "num_frames",
                 "label", "anatomy_coarse", "anatomy_fine")


def load_index(dataset_dir: str, split: str, *, cache: bool = True) -> RecordIndex:
  """Index of one split; cached as <dataset_dir>/.index/<split>.npz keyed by shard sizes."""
  files = shard_files(dataset_dir, split)
  metadata = {}
  meta_path = os.path.join(dataset_dir, "metadata.json")
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      metadata = json.load(f)
  key = _cache_key(files)
  cache_path = _cache_path(dataset_dir, split)
  if cache and os.path.exists(cache_path):
    try:
      with np.load(cache_path, allow_pickle=False) as z:
        if str(z["key"]) == key:
          return RecordIndex(
              dataset_dir=dataset_dir, split=split, files=tuple(files),
              video_ids=tuple(z["video_ids"].tolist()), patients=tuple(z["patients"].tolist()),
              metadata=metadata, **{k: z[k] for k in _INDEX_ARRAYS})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      # a damaged cache (its zip CRCs and structure are checked) is a cache miss
      logging.warning("%s: damaged record index cache (%s: %s); rebuilding it", cache_path,
                      type(e).__name__, e)
  index = _build_index(dataset_dir, split, files, metadata)
  if cache:
    _write_cache(cache_path, key, index)
  return index


def _cache_path(dataset_dir: str, split: str) -> str:
  return os.path.join(dataset_dir, ".index", f"{split}.npz")


def _build_index(dataset_dir: str, split: str, files: list[str], metadata: dict) -> RecordIndex:
  """One pass over the split's shards: every record's CRC, header fields and position."""
  cols = {k: [] for k in _INDEX_ARRAYS}
  videos: dict[str, int] = {}
  patients: dict[str, int] = {}
  want = _shard_lengths(dataset_dir, split)
  for fid, path in enumerate(files):
    offsets, lengths = _scan_offsets(path)
    if want is not None and len(offsets) != want[fid]:
      raise DatasetError(f"{path}: {len(offsets)} records, dataset_info.json says {want[fid]}: "
                         "the shard is incomplete or was changed after data_prep wrote it")
    with open(path, "rb") as f:
      for off, n in zip(offsets, lengths):
        f.seek(off)
        data = f.read(n)
        _check_crc(data, f.read(_FOOTER), f"{path}: the record at byte {off}")
        rec = parse_example(data, decode=False, where=f"{path}@{off}")
        cols["file_id"].append(fid)
        cols["offset"].append(off)
        cols["length"].append(n)
        cols["video"].append(videos.setdefault(rec["video_id"], len(videos)))
        cols["patient"].append(patients.setdefault(rec["patient"], len(patients)))
        cols["frame_index"].append(rec["frame_indices"][0])
        cols["num_frames"].append(len(rec["frames"]))
        cols["label"].append(rec["label"])
        cols["anatomy_coarse"].append(rec["anatomy_coarse"][0])
        cols["anatomy_fine"].append(rec["anatomy_fine"][0])
  dtypes = dict(file_id=np.int32, video=np.int32, patient=np.int32, num_frames=np.int32)
  arrays = {k: np.asarray(v, dtypes.get(k, np.int64)) for k, v in cols.items()}
  arrays, video_ids, patient_ids = _canonical(arrays, tuple(videos), tuple(patients))
  return RecordIndex(dataset_dir=dataset_dir, split=split, files=tuple(files),
                     video_ids=video_ids, patients=patient_ids, metadata=metadata, **arrays)


def content_digest(index: RecordIndex) -> str:
  """What the samplers plan over, as a hash: every record's video, patient, labels and frames,
  in index order. The same for a copy of the dataset elsewhere; another for a rebuilt one whose
  records differ."""
  h = hashlib.sha256(f"v{_INDEX_VERSION};{index.split};".encode())
  h.update(json.dumps([index.video_ids, index.patients]).encode())
  for k in ("video", "patient", "frame_index", "num_frames", "label", "anatomy_coarse",
            "anatomy_fine"):
    h.update(np.ascontiguousarray(getattr(index, k), np.int64).tobytes())
  return h.hexdigest()


def _canonical(arrays: dict, video_ids: tuple, patient_ids: tuple):
  """Rows sorted by (video id, first frame), video and patient ids numbered in sorted order.

  data_prep's worker processes write videos in the order they finish, so two builds of the same
  input can hold the same records in different shard positions; samplers permute row numbers,
  so without this the batches of a seeded run would depend on that write order.
  """
  def renumber(ids, col):
    order = sorted(range(len(ids)), key=ids.__getitem__)
    new_id = np.empty(len(ids), np.int32)
    new_id[order] = np.arange(len(ids), dtype=np.int32)
    return tuple(ids[i] for i in order), new_id[col] if len(ids) else col
  video_ids, video = renumber(video_ids, arrays["video"])
  patient_ids, patient = renumber(patient_ids, arrays["patient"])
  arrays = dict(arrays, video=video, patient=patient)
  rows = np.lexsort((arrays["offset"], arrays["file_id"], arrays["frame_index"], video))
  return {k: v[rows] for k, v in arrays.items()}, video_ids, patient_ids


def _write_cache(path, key, index: RecordIndex):
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with files_lib.atomic_path(path, ".npz") as tmp:  # processes on other hosts may write it too
      np.savez(tmp, key=np.asarray(key), video_ids=np.asarray(index.video_ids, dtype=str),
               patients=np.asarray(index.patients, dtype=str),
               **{k: getattr(index, k) for k in _INDEX_ARRAYS})
  except OSError as e:  # e.g. a read-only dataset directory: the index stays in memory
    logging.warning("%s: could not cache the record index (%s); it is rebuilt next time",
                    path, e)


def frame_format(index: RecordIndex) -> dict[str, Any]:
  """``parse_example``'s frame arguments from the dataset's metadata.json (PNG when it has no
  'frame_encoding': datasets made before it)."""
  meta, where = index.metadata, os.path.join(index.dataset_dir, "metadata.json")
  encoding = meta.get("frame_encoding", "png")
  if encoding not in schema.FRAME_ENCODINGS:
    raise DatasetError(f"{where}: frame_encoding {encoding!r} is not one of "
                       f"{schema.FRAME_ENCODINGS}")
  if encoding == "png":
    return {"frame_encoding": "png"}
  size = meta.get("image_size")
  if not (isinstance(size, list) and len(size) == 2 and all(
      isinstance(v, int) and v > 0 for v in size)):
    raise DatasetError(f"{where}: raw frames need image_size [H, W], got {size!r}")
  return {"frame_encoding": "raw", "image_size": tuple(size)}


class RecordReader:
  """Random access to the records of an index; thread-safe (positional reads, os.pread).

  File descriptors are opened lazily in each process (the reader pickles to its index only).
  """

  def __init__(self, index: RecordIndex):
    self.index = index
    self._fds: dict[int, int] = {}
    self._frames = frame_format(index)

  def __getstate__(self):
    return {"index": self.index}

  def __setstate__(self, state):
    self.__init__(state["index"])

  def __del__(self, _close=os.close):
    # os.close bound at definition: at interpreter exit the module's globals may be gone.
    for fd in self._fds.values():
      _close(fd)
    self._fds.clear()

  def read(self, i: int) -> dict[str, Any]:
    ix = self.index
    fid = int(ix.file_id[i])
    fd = self._fds.get(fid)
    if fd is None:
      fd = self._fds.setdefault(fid, os.open(ix.files[fid], os.O_RDONLY))
    off, n = int(ix.offset[i]), int(ix.length[i])
    data, crc = os.pread(fd, n, off), os.pread(fd, _FOOTER, off + n)  # no copy of the data
    if len(data) != n or len(crc) != _FOOTER:
      raise DatasetError(f"{ix.files[fid]}: record at byte {off} is truncated (file changed "
                         "after indexing?)")
    _check_crc(data, crc, f"{ix.files[fid]}: the record at byte {off}")
    return parse_example(data, where=f"{ix.files[fid]}@{off}", **self._frames)


def read_record(index: RecordIndex, i: int) -> dict[str, Any]:
  """One record, parsed and decoded ('frames' uint8 (T, H, W, 1)). Opens the file each time."""
  return RecordReader(index).read(i)


# ----------------------------------------------------------------------------------------------
# Samplers.


class Sampler(Protocol):
  records_per_example: int

  def plan(self, index: RecordIndex, rng: np.random.Generator, global_batch: int) -> np.ndarray:
    """(num_examples, records_per_example) record ids for one epoch, in sampling order."""

  def assemble(self, records: list[dict]) -> dict[str, np.ndarray]:
    """Fixed-shape uint8 host example from the parsed records: a function of the records
    alone (randomness is the plan's, per epoch, or the device's, per global example index, so
    an example is the same on any number of processes and workers)."""


# FrameSampler (SimCLR) and the other frame samplers live in ssl_us/samplers_frames.py; clip
# samplers in ssl_us/samplers_video.py.


# ----------------------------------------------------------------------------------------------
# The grain pipeline.


class _PlanSource:
  """Random access over this process's rows of the infinite sequence of epoch plans.

  Row j of epoch e: this process's p-th contiguous chunk of each global batch of the epoch's
  plan. Plans are deterministic in (seed, epoch), so any position can be recomputed on resume.
  """

  def __init__(self, index, sampler, *, seed, global_batch, process_index, process_count,
               num_epochs=None):
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} not divisible by {process_count} processes")
    self.index, self.sampler, self.seed = index, sampler, seed
    self.global_batch, self.p, self.np = global_batch, process_index, process_count
    self.local_batch = global_batch // process_count
    first = self._epoch_rows(0)
    self.rows_per_epoch = first.shape[0]
    if self.rows_per_epoch == 0:
      raise DatasetError(
          f"{index.dataset_dir} split {index.split!r}: {index.num_records} records give no "
          f"full global batch of {global_batch} with {type(sampler).__name__}")
    self._cache = (0, first)
    self.num_epochs = num_epochs

  def _epoch_rows(self, epoch):
    rng = np.random.default_rng([self.seed, epoch])
    plan = np.asarray(self.sampler.plan(self.index, rng, self.global_batch), np.int64)
    if plan.ndim != 2 or plan.shape[1] != self.sampler.records_per_example:
      raise ValueError(f"{type(self.sampler).__name__}.plan returned shape {plan.shape}")
    nb = plan.shape[0] // self.global_batch
    plan = plan[: nb * self.global_batch].reshape(nb, self.global_batch, plan.shape[1])
    chunk = plan[:, self.p * self.local_batch:(self.p + 1) * self.local_batch]
    return chunk.reshape(nb * self.local_batch, plan.shape[2])

  def __len__(self):
    epochs = self.num_epochs if self.num_epochs is not None else 1_000_000
    return epochs * self.rows_per_epoch

  def __getitem__(self, j):
    epoch, row = divmod(int(j), self.rows_per_epoch)
    if self._cache[0] != epoch:
      rows = self._epoch_rows(epoch)
      if rows.shape[0] != self.rows_per_epoch:
        raise DatasetError(f"{type(self.sampler).__name__} planned {rows.shape[0]} rows in "
                           f"epoch {epoch}, {self.rows_per_epoch} in epoch 0; must be constant")
      self._cache = (epoch, rows)
    return self._cache[1][row]


class _ReadAndAssemble:
  """grain's map: a row of record numbers -> the sampler's example."""

  def __init__(self, index, sampler):
    self.reader = RecordReader(index)
    self.sampler = sampler

  def __call__(self, element):
    return self.sampler.assemble([self.reader.read(int(i)) for i in element])


def make_dataset(index: RecordIndex, sampler: Sampler, *, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                 num_epochs: int | None = None, start: int = 0) -> grain.IterDataset:
  """Batches of ``global_batch // process_count`` examples for this process, from global batch
  ``start`` on (a resumed run's ``InputPosition``): batch k is the same global batch whatever
  the number of processes and workers."""
  # grain is imported here, its one use: the rest of the input code (index, parsing, samplers,
  # DevicePrefetch) and the training step then import on a host without it.
  import grain  # pylint: disable=g-import-not-at-top
  src = _PlanSource(index, sampler, seed=seed, global_batch=global_batch,
                    process_index=process_index, process_count=process_count,
                    num_epochs=num_epochs)
  ds = grain.MapDataset.source(src)
  ds = ds.map(_ReadAndAssemble(index, sampler))
  ds = ds.batch(src.local_batch, drop_remainder=True)[start:]
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  if num_workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # library use outside absl.app: grain reads its flags
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=2))
  return ds


def steps_per_epoch(index: RecordIndex, sampler: Sampler, global_batch: int, seed: int) -> int:
  src = _PlanSource(index, sampler, seed=seed, global_batch=global_batch, process_index=0,
                    process_count=1)
  return src.rows_per_epoch // global_batch


# ----------------------------------------------------------------------------------------------
# Device prefetch.


class InputPosition:
  """Where a run's input is: the number of global batches its steps have taken.

  What a checkpoint holds of the input, through grain's orbax handler (one file per process,
  all alike): batch k of a run is the same global batch on any number of processes and grain
  workers (``make_dataset(start=k)``), while grain's own iterator state follows both (one
  cursor per worker), so a run resumed with other ``data.num_workers`` or on another number of
  hosts failed to restore it, or restored it at another batch. ``global_batches`` is None
  after ``set_state`` of such a state (checkpoints written before this class): there the
  position is the restored step, one batch per step.
  """

  def __init__(self, global_batches: int | None = None):
    self.global_batches = global_batches

  def get_state(self) -> bytes:
    return json.dumps({"global_batches": self.global_batches}).encode()

  def set_state(self, state: bytes) -> None:
    self.global_batches = json.loads(state).get("global_batches")

  def start_prefetch(self) -> None:
    """grain's handler calls this after set_state; nothing to start."""


class DevicePrefetch:
  """Global batches placed on the devices ahead of the step that takes them.

  ``put`` places one host batch (``parallel.shard_host_batch``, asynchronous): with ``size`` = 2
  the next batch is transferred while the current step runs (double buffering); ``size`` = 1
  places each batch when it is taken. At most ``limit`` batches are fetched in all.

  ``get_state()`` is the ``InputPosition`` of the first batch no step has taken (``start``:
  that of the iterator's first batch), so a checkpoint saved between steps resumes at exactly
  that batch however far the prefetch has read.
  """

  def __init__(self, iterator, put, size: int = 2, limit: int | None = None, start: int = 0):
    if size < 1:
      raise ValueError(f"prefetch size must be >= 1, got {size}")
    self._it, self._put, self._size, self._left = iterator, put, size, limit
    self._taken = start       # global batches taken by steps
    self._queue: collections.deque = collections.deque()

  def __iter__(self):
    return self

  def __next__(self):
    while len(self._queue) < self._size and self._left != 0:
      self._queue.append(self._put(next(self._it)))
      self._left = None if self._left is None else self._left - 1
    if not self._queue:
      raise StopIteration
    self._taken += 1
    return self._queue.popleft()

  def get_state(self) -> bytes:
    return InputPosition(self._taken).get_state()


# ----------------------------------------------------------------------------------------------
# Checking a dataset (e.g. after copying it to a cluster): python -m ssl_us.input_pipeline DIR


def main(argv=None) -> int:
  """Checks every split of a data_prep dataset: its shards all present, each one's record count
  as dataset_info.json says, every record's CRC and parse; 1 if any fails. A split that passes
  has its index cached anew, so that training (on every host) starts without reading it."""
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m ssl_us.input_pipeline", description=main.__doc__)
  p.add_argument("dataset_dir", help="a data_prep dataset (<output>/<name>/<version>)")
  args = p.parse_args(argv)
  try:
    splits = [s["name"] for s in dataset_info(args.dataset_dir).get("splits", [])]
  except DatasetError as e:
    print(e)
    return 1
  damaged = 0
  for split in splits:
    try:
      index = load_index(args.dataset_dir, split, cache=False)
      _write_cache(_cache_path(args.dataset_dir, split), _cache_key(index.files), index)
      print(f"{split}: {len(index.files)} shards, {index.num_records:,} records of "
            f"{index.num_videos:,} videos, {sum(os.path.getsize(f) for f in index.files):,} "
            "bytes, as written")
    except DatasetError as e:
      damaged += 1
      print(f"{split}: {e}")
  print(f"{args.dataset_dir}: {len(splits) - damaged} splits as written"
        + (f", {damaged} damaged" if damaged else ""))
  return 1 if damaged or not splits else 0


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  sys.exit(main())
