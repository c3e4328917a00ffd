"""One video -> records in a shard piece; the loop a worker process runs.

Per video: ``readers.probe`` (unreadable -> rejected), size check, the sampling plan, then the
frames: a sample of ``region_samples`` frames spread over the whole video gives the scan area
(``region.find_region``); every written frame is ``region.apply_region``'ed and PNG-encoded.
A video whose needed frames fit in ``buffer_bytes`` is decoded once (its needed frames are kept
until the region is known); a bigger one is decoded twice (samples first, then streamed), so
memory stays bounded. Processed frames are cached only until the last record that uses them
is written.

A worker owns one open *piece* (a shard file under construction) per split. Before each video
the piece is marked; a video that fails half-way is rolled back, so all records of a video are
consecutive, in frame order, in one piece. A piece is committed (fsync, rename, one line in the
worker's journal listing its videos) once it reaches ``shard_bytes``, and when the worker ends.
Rejected videos get a journal line at once. The journal is the ground truth for resuming:
a video is done when its journal line exists, and pieces without a line are leftovers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import traceback
from typing import Callable, Iterable, Iterator

import numpy as np

from data_prep import readers
from data_prep import region as region_lib
from data_prep import sampling
from data_prep import writer as writer_lib
from data_prep import manifest


class VideoError(Exception):
  """A video that cannot be written; ``reason`` is the audit code."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
  """What every worker of one task run shares."""
  pieces_dir: str
  journal_dir: str
  preview_dir: str
  prefix: str                      # 't00000-a001': task and attempt, unique per run
  image_size: tuple[int, int]
  sampling: sampling.Sampling
  min_size: int
  region_samples: int
  shard_bytes: int
  buffer_bytes: int
  frame_encoding: str = "png"      # schema.FRAME_ENCODINGS


@dataclasses.dataclass(frozen=True)
class Job:
  """One video to write, with everything decided before decoding."""
  entry: manifest.Entry
  split: str
  patient: str                     # the value of the record's 'patient' field
  label_id: int
  frame_labels: tuple | None       # (frame_idx, coarse_id, fine_id) arrays, or None
  preview: str = ""                # file name of the before/after preview, '' for none


class Journal:
  """Append-only JSON lines, each flushed and fsync'ed: a line that is there is committed."""

  def __init__(self, path: str):
    self.path = path
    self._f = open(path, "a", encoding="utf-8")

  def append(self, event: dict, sync: bool = True) -> None:
    """Add one event; ``sync=False`` survives a crash of this process but not of the OS."""
    self._f.write(json.dumps(event, ensure_ascii=False) + "\n")
    self._f.flush()
    if sync:
      os.fsync(self._f.fileno())

  def close(self) -> None:
    self._f.close()


def read_journal(path: str) -> list[dict]:
  """Events of one journal; a torn last line (killed mid-write) is not an event."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  events = []
  for i, line in enumerate(lines):
    if not line:
      continue
    try:
      events.append(json.loads(line))
    except json.JSONDecodeError:
      if i == len(lines) - 1:  # no newline after it: the write never finished
        break
      raise ValueError(f"{path} line {i + 1}: corrupt journal line") from None
  return events


def sample_indices(num_frames: int, k: int) -> list[int]:
  """Up to k frame indices spread evenly from the first to the last frame."""
  return sorted(set(np.linspace(0, num_frames - 1, min(k, num_frames)).round().astype(int)))


def _collect(path: str, keep: set[int], num_frames: int) -> dict[int, np.ndarray]:
  """Decode up to the last index in ``keep``; the frames at those indices."""
  last_needed = max(keep)
  got: dict[int, np.ndarray] = {}
  last = -1
  with contextlib.closing(readers.iter_frames(path)) as frames:
    for idx, frame in frames:
      last = idx
      if idx in keep:
        got[idx] = frame
      if idx >= last_needed:
        break
  if len(got) != len(keep):
    raise VideoError("decode_error", f"{path}: decoding stopped after frame {last} but probe "
                     f"counted {num_frames} frames")
  return got


def emit_groups(groups: list[sampling.Group], frames: Iterable[tuple[int, np.ndarray]],
                process: Callable[[np.ndarray], bytes]) -> Iterator[tuple[sampling.Group, list]]:
  """(group, processed frames) in plan order, from frames streamed in index order.

  A frame is processed once, when it arrives, and kept only until the last group using it is
  out. Raises VideoError if the stream ends before a group's frames arrived.
  """
  last_use = {}
  for gi, g in enumerate(groups):
    for i in g.indices:
      last_use[i] = gi
  ready = [max(g.indices) for g in groups]
  cache: dict[int, bytes] = {}
  nxt, idx = 0, -1
  for idx, frame in frames:
    if idx in last_use:
      cache[idx] = process(frame)
    while nxt < len(groups) and ready[nxt] <= idx:
      g = groups[nxt]
      yield g, [cache[i] for i in g.indices]
      for i in set(g.indices):
        if last_use[i] == nxt:
          del cache[i]
      nxt += 1
  if nxt < len(groups):
    raise VideoError("decode_error", f"decoding stopped after frame {idx}, before frame "
                     f"{ready[nxt]} that record {nxt} needs")


def source_bytes(path: str) -> int:
  """Size of a file, or of the files directly in a frames folder."""
  if os.path.isdir(path):
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
  return os.path.getsize(path)


def preview_name(position: int, video_id: str) -> str:
  """A safe file name for a video's preview."""
  return f"{position:05d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', video_id)[-80:]}.png"


@functools.lru_cache(maxsize=8)
def _encoder(height: int, width: int, frame_encoding: str) -> writer_lib.RecordEncoder:
  return writer_lib.RecordEncoder(height, width, frame_encoding)


def _probe(cfg: WorkerConfig, path: str) -> readers.VideoInfo:
  info = readers.probe(path)
  if info.num_frames < 1:
    raise VideoError("zero_frames", f"{path}: no decodable frames")
  if min(info.height, info.width) < cfg.min_size:
    raise VideoError("too_small", f"{path}: {info.height}x{info.width} frames are smaller "
                     f"than --min_size {cfg.min_size}")
  return info


def _region(cfg: WorkerConfig, path: str, info, needed: list[int]):
  """(region, sample frames, frames iterator) for one video; see the module docstring."""
  samples = sample_indices(info.num_frames, cfg.region_samples)
  keep = set(needed) | set(samples)
  if len(keep) * info.height * info.width <= cfg.buffer_bytes:
    got = _collect(path, keep, info.num_frames)
    frames = ((i, got[i]) for i in needed)
  else:
    got = _collect(path, set(samples), info.num_frames)
    needed_set = set(needed)
    frames = ((i, f) for i, f in readers.iter_frames(path) if i in needed_set)
  sample = [got[i] for i in samples]
  for i, f in zip(samples, sample):
    if f.shape != (info.height, info.width):
      raise VideoError("decode_error", f"{path}: frame {i} is {f.shape}, probe said "
                       f"{info.height}x{info.width}")
  region = region_lib.find_region(np.stack(sample))
  rh, rw = region.y1 - region.y0, region.x1 - region.x0
  if min(rh, rw) < cfg.min_size:
    raise VideoError("too_small", f"{path}: scan area {rh}x{rw} is smaller than --min_size "
                     f"{cfg.min_size}")
  return region, sample, frames


def _write(cfg: WorkerConfig, job: Job, info, groups, write: Callable[[bytes], None]) -> dict:
  """Encode the records of one video through ``write``; the audit fields of a written video."""
  e = job.entry
  needed = sorted({i for g in groups for i in g.indices})
  region, sample, frames = _region(cfg, e.path, info, needed)
  size = cfg.image_size
  encoder = _encoder(*size, cfg.frame_encoding)

  def process(frame):
    if frame.shape != (info.height, info.width):
      raise VideoError("decode_error", f"{e.path}: a frame is {frame.shape}, probe said "
                       f"{info.height}x{info.width}")
    return writer_lib.encode_frame(region_lib.apply_region(frame, region, size),
                                   cfg.frame_encoding)

  fields = writer_lib.video_fields(
      label=job.label_id, label_name=e.label, video_id=e.video_id, patient=job.patient,
      exam=e.exam, side=e.side, source=e.source, fps=info.fps, num_frames=info.num_frames,
      metadata=dict(e.metadata))
  records = padded = nbytes = 0
  for g, encoded in emit_groups(groups, frames, process):
    coarse, fine = manifest.label_ids(job.frame_labels, g.indices)
    fps = info.fps
    record = encoder.serialize(
        frames=encoded, frame_indices=list(g.indices),
        timestamps=[i / fps if fps > 0 else 0.0 for i in g.indices],
        anatomy_coarse=coarse, anatomy_fine=fine, video=fields, padded=g.padded)
    write(record)
    records += 1
    nbytes += writer_lib.framed_size(record)
    padded += g.padded > 0
  if job.preview:  # save_preview writes to a temporary name and renames
    os.makedirs(cfg.preview_dir, exist_ok=True)
    region_lib.save_preview(sample[len(sample) // 2], region, size,
                            os.path.join(cfg.preview_dir, job.preview))
  out = dict(status="written", reason="", records=records, frames=len(needed),
             padded_records=padded, bytes=nbytes,
             region=[region.y0, region.x0, region.y1, region.x1], region_kind=region.kind)
  if job.frame_labels is not None:
    out["labelled_frames_out_of_range"] = int((job.frame_labels[0] >= info.num_frames).sum())
  return out


def encode_video(cfg: WorkerConfig, job: Job, write: Callable[[bytes], None]) -> dict:
  """The per-video work of every runner: one video -> its serialized records, in frame order.

  Each record goes to ``write`` as it is made. Returns the video's audit: status 'written'
  (records, frames, bytes as framed in a TFRecord file, scan-area box), or 'rejected' with
  the reason code and message, for a video that cannot be read or that raised anything
  (reason 'error', with the traceback): a bad video never stops the build. After a rejection
  the caller drops whatever ``write`` got for this video.
  """
  e = job.entry
  audit = {"video_id": e.video_id, "source": e.source, "split": job.split}
  try:
    info = _probe(cfg, e.path)
    audit.update(kind=info.kind, fps=info.fps, num_frames=info.num_frames,
                 height=info.height, width=info.width, input_bytes=source_bytes(e.path))
    groups = sampling.plan(cfg.sampling, info.num_frames, info.fps)
    audit.update(_write(cfg, job, info, groups, write))
  except (VideoError, sampling.SamplingError, readers.ReadError) as err:
    reason = getattr(err, "reason", "unreadable")
    audit.update(status="rejected", reason=reason, message=str(err))
  except Exception as err:  # a decoder or region bug must not stop the other videos
    audit.update(status="rejected", reason="error",
                 message=f"{e.path}: {type(err).__name__}: {err}",
                 traceback=traceback.format_exc(limit=4))
  return audit


class Worker:
  """Writes jobs into its pieces and journal; ``emit`` gets progress messages (dicts)."""

  def __init__(self, cfg: WorkerConfig, index: int, emit: Callable[[dict], None]):
    self.cfg = cfg
    self.index = index
    self.emit = emit
    self.name = f"{cfg.prefix}-w{index:03d}"
    self.journal = Journal(os.path.join(cfg.journal_dir, self.name + ".jsonl"))
    # The record encoder's one-time set-up (tfds's serializer), before any video's clock.
    _encoder(*cfg.image_size, cfg.frame_encoding)
    self._pieces: dict[str, writer_lib.ShardWriter] = {}
    self._piece_videos: dict[str, list[dict]] = {}
    self._seq = 0

  def begin(self, video_id: str) -> None:
    """Journals that this worker is on ``video_id`` (its death is then blamed on it) and emits
    'start': --video_timeout counts from here, not from the process's start-up."""
    self.journal.append({"event": "start", "video_id": video_id}, sync=False)
    self.emit({"msg": "start", "worker": self.index, "video_id": video_id})

  def run(self, job: Job) -> dict:
    """Process one video into this worker's piece of its split; returns its audit (also
    emitted as a 'done' message)."""
    self.begin(job.entry.video_id)
    piece = self._piece(job.split)
    piece.mark()
    audit = encode_video(self.cfg, job, piece.write)
    if audit["status"] == "rejected":
      piece.rollback()
      self.journal.append({"event": "rejected", "video": audit})
    else:
      audit["piece"] = os.path.basename(piece.path)
      self._piece_videos[job.split].append(audit)
      if piece.num_bytes >= self.cfg.shard_bytes:
        self._commit(job.split)
    self.emit({"msg": "done", "worker": self.index, "audit": audit})
    return audit

  def close(self) -> None:
    """Commit every open piece; then the journal is final."""
    for split in list(self._pieces):
      self._commit(split)
    self.journal.close()

  def _piece(self, split: str) -> writer_lib.ShardWriter:
    if split not in self._pieces:
      path = os.path.join(self.cfg.pieces_dir, f"{split}.{self.name}-{self._seq:05d}.tfrecord")
      self._seq += 1
      self._pieces[split] = writer_lib.ShardWriter(path)
      self._piece_videos[split] = []
    return self._pieces[split]

  def _commit(self, split: str) -> None:
    piece = self._pieces.pop(split)
    videos = self._piece_videos.pop(split)
    if not videos:
      piece.discard()
      return
    records, nbytes = piece.commit()
    self.journal.append({"event": "piece", "piece": os.path.basename(piece.path), "split": split,
                         "records": records, "bytes": nbytes, "videos": videos})


def worker_process(cfg: WorkerConfig, index: int, jobs, results) -> None:
  """Entry point of a worker process: Job objects from the ``jobs`` connection until None,
  messages (dicts) to the ``results`` connection; the last one is 'exit' or 'fatal'."""
  try:
    worker = Worker(cfg, index, results.send)
    while (job := jobs.recv()) is not None:
      worker.run(job)
    worker.close()
    results.send({"msg": "exit", "worker": index})
  except BaseException:  # report anything that stops the worker, then die
    results.send({"msg": "fatal", "worker": index, "error": traceback.format_exc()})
    raise
