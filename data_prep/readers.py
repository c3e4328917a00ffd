"""Readers: every supported source -> (frame_index, uint8 (H, W) grayscale frame), streamed.

Sources (``kind``):

- ``video``: mp4/m4v/mov/avi/mpeg/mpg/mkv and animated gif, through PyAV (FFmpeg). Frames are the
  decoder's luma converted to full range (``to_ndarray(format="gray")``): for BT.601 sources this
  is the ITU-R 601 luma of the decoded RGB (within one level); palette GIFs go through FFmpeg's
  palette expansion first. The frame count is always found by decoding (demux + decode, no
  pixel conversion): containers without a count (MPEG-PS, Matroska) and containers whose count
  is wrong (a truncated .mov) both get the number of frames that actually decode. A packet the
  decoder rejects is skipped, a demuxer error ends the stream (the decoder is still flushed);
  both are counted in ``meta["decode_errors"]`` and logged, never silent.
- ``dicom``: single- and multi-frame DICOM through pydicom (``iter_pixels``, one frame at a time;
  JPEG and JPEG-LS cines via pylibjpeg-libjpeg, JPEG 2000 via Pillow, RLE and uncompressed by
  pydicom). MONOCHROME2 as stored, MONOCHROME1 inverted, YBR_* converted to RGB by pydicom,
  PALETTE COLOR through the palette LUT; colour -> luma Y = 0.299 R + 0.587 G + 0.114 B
  (ITU-R 601), rounded. More than 8 stored bits are mapped linearly from the stored range to
  0..255 (VOI windows are not applied). fps = 1000 / FrameTime (ms), else CineRate, else
  RecommendedDisplayFrameRate, else 1000 / mean(FrameTimeVector[1:]), else 0. A decoder error
  ends the stream after the frames decoded so far (counted in ``meta["decode_errors"]``, logged).
- ``image``: png/jpg/jpeg/bmp stills through Pillow (EXIF orientation applied, alpha ignored,
  16-bit grey mapped to 8 bits by dropping the low byte); one frame, fps 0.
- ``frames_dir``: a folder of at least two stills whose names differ only in their last number
  (``frame_001.png``, ``frame_002.png``, ...; hidden and OS thumbnail files ignored), ordered
  by that number; every frame must have the first frame's size; fps 0 (unknown).

Privacy: ``VideoInfo.meta`` holds only technical fields from a whitelist (codec, container,
photometric interpretation, bit depth, frame counts, modality, manufacturer and model). No
patient name, birth date, study date, UID, accession number, institution, station, serial number
or any other identifier is read into what this module returns.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Iterator

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mpeg", ".mpg", ".mkv", ".gif")
DICOM_EXTENSIONS = (".dcm", ".dicom")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
SUPPORTED_EXTENSIONS = VIDEO_EXTENSIONS + DICOM_EXTENSIONS + IMAGE_EXTENSIONS

# Entries of a frames folder that are not frames and do not disqualify it.
_SYSTEM_FILES = ("thumbs.db", "desktop.ini")
_LAST_NUMBER = re.compile(r"(\d+)(?=\D*$)")
_DICOM_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT",
                      "YBR_RCT", "PALETTE COLOR")

log = logging.getLogger(__name__)


class ReadError(Exception):
  """A source that cannot be read; the message is ``"<path>: <problem>"``."""

  def __init__(self, path: str, problem: str):
    super().__init__(f"{path}: {problem}")
    self.path = path
    self.problem = problem

  def __reduce__(self):  # picklable across worker processes despite the two-argument __init__
    return ReadError, (self.path, self.problem)


@dataclasses.dataclass
class VideoInfo:
  """What ``probe`` finds: ``num_frames`` frames of ``height`` x ``width``, ``fps`` (0 = still or
  unknown); ``meta`` holds whitelisted technical fields only (never identifiers)."""
  path: str
  kind: str
  fps: float
  num_frames: int
  height: int
  width: int
  meta: dict[str, Any]


def is_supported(path) -> bool:
  """A file with a supported extension (case-insensitive), or a folder of frames."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return _frame_files(path) is not None
  return os.path.splitext(path)[1].lower() in SUPPORTED_EXTENSIONS


def probe(path) -> VideoInfo:
  """Kind, fps, decodable frame count, size and technical metadata; raises ReadError."""
  path, kind = _classify(path)
  if kind == "video":
    return _probe_video(path)
  if kind == "dicom":
    return _probe_dicom(path)
  if kind == "image":
    frame, meta = _read_still(path)
    return VideoInfo(path, kind, 0.0, 1, frame.shape[0], frame.shape[1], meta)
  return _probe_frames_dir(path)


def iter_frames(path) -> Iterator[tuple[int, np.ndarray]]:
  """Yields (frame_index, uint8 (H, W) frame) in order, one decoded frame at a time."""
  path, kind = _classify(path)
  if kind == "video":
    yield from _iter_video(path)
  elif kind == "dicom":
    yield from _iter_dicom(path)
  elif kind == "image":
    yield 0, _read_still(path)[0]
  else:
    yield from _iter_frames_dir(path)


def luma(rgb: np.ndarray) -> np.ndarray:
  """ITU-R 601 luma of uint8 RGB (..., 3): round(0.299 R + 0.587 G + 0.114 B) as uint8."""
  w = np.array([299, 587, 114], np.uint32)
  return ((rgb.astype(np.uint32) @ w + 500) // 1000).astype(np.uint8)


def _classify(path) -> tuple[str, str]:
  path = os.fspath(path)
  if os.path.isdir(path):
    if _frame_files(path) is None:
      raise ReadError(path, "folder is not a sequence of frames (needs >= 2 stills named alike "
                      "except for their last number, and nothing else)")
    return path, "frames_dir"
  if not os.path.exists(path):
    raise ReadError(path, "no such file")
  ext = os.path.splitext(path)[1].lower()
  if ext not in SUPPORTED_EXTENSIONS:
    raise ReadError(path, f"unsupported file type {ext or '(no extension)'!r}; supported: "
                    f"{', '.join(SUPPORTED_EXTENSIONS)}")
  if os.path.getsize(path) == 0:
    raise ReadError(path, "empty file")
  if ext in VIDEO_EXTENSIONS:
    return path, "video"
  return path, "dicom" if ext in DICOM_EXTENSIONS else "image"


# ------------------------------------------------------------------------------------- video

def _open_video(path: str):
  import av
  try:
    # Tags are never read (privacy), so undecodable ones must not make a file unreadable.
    container = av.open(path, metadata_errors="replace")
  except (av.error.FFmpegError, OSError) as e:
    raise ReadError(path, f"cannot open as video ({e})") from e
  if not container.streams.video:
    container.close()
    raise ReadError(path, "no video stream")
  return container


def _decode(container, errors: list[str]) -> Iterator[Any]:
  """Decoded av.VideoFrames of the first video stream in order. A packet the decoder rejects is
  skipped; a demuxer error (other than end of file) ends the stream; both append to ``errors``. The
  decoder is always flushed, so frames it still buffers are not lost."""
  import av
  stream = container.streams.video[0]
  packets = container.demux(stream)
  flushed = False
  while True:
    try:
      packet = next(packets)
    except StopIteration:
      break
    except av.error.FFmpegError as e:
      errors.append(f"demux: {e}")
      break
    flushed = packet.size == 0
    try:
      frames = packet.decode()
    except av.error.FFmpegError as e:
      errors.append(f"decode: {e}")
      continue
    yield from frames
  if not flushed:
    try:
      yield from stream.codec_context.decode(None)
    except av.error.FFmpegError as e:
      errors.append(f"flush: {e}")


def _video_fps(stream) -> float:
  for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
    if rate:
      return float(rate)
  return 0.0


def _summary(errors: list[str]) -> str:
  """Distinct errors in order of first appearance, repeats counted: 'decode: X (x6); flush: Y'."""
  counts = dict.fromkeys(errors, 0)
  for e in errors:
    counts[e] += 1
  return "; ".join(e if n == 1 else f"{e} (x{n})" for e, n in counts.items())


def _check_size(path: str, index: int, shape: tuple[int, int], first: tuple[int, int]) -> None:
  if shape != first:
    raise ReadError(path, f"frame {index} is {shape[0]}x{shape[1]} but frame 0 is "
                    f"{first[0]}x{first[1]} (size changes are not supported)")


def _probe_video(path: str) -> VideoInfo:
  errors: list[str] = []
  with _open_video(path) as container:
    stream = container.streams.video[0]
    n, first = 0, None
    for frame in _decode(container, errors):
      shape = (frame.height, frame.width)
      first = first or shape
      _check_size(path, n, shape, first)
      n += 1
    if n == 0:
      raise ReadError(path, f"no decodable video frames ({_summary(errors) or 'empty stream'})")
    meta = {"container": container.format.name, "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt, "container_frames": int(stream.frames),
            "decode_errors": len(errors)}
    fps = _video_fps(stream)
  if errors:
    log.warning("%s: %d frames decodable; skipped: %s", path, n, "; ".join(errors))
  return VideoInfo(path, "video", fps, n, first[0], first[1], meta)


def _iter_video(path: str) -> Iterator[tuple[int, np.ndarray]]:
  errors: list[str] = []
  with _open_video(path) as container:
    first = None
    for i, frame in enumerate(_decode(container, errors)):
      gray = frame.to_ndarray(format="gray")
      first = first or gray.shape
      _check_size(path, i, gray.shape, first)
      yield i, gray
  if first is None:
    raise ReadError(path, f"no decodable video frames ({_summary(errors) or 'empty stream'})")
  if errors:
    log.warning("%s: skipped while decoding: %s", path, "; ".join(errors))


# ------------------------------------------------------------------------------------- dicom

def _dicom_header(path: str):
  """The dataset without pixel data (palette LUTs and image module come before it)."""
  import pydicom
  try:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
  except Exception as e:  # pydicom raises many types for bad files; all mean "not readable"
    raise ReadError(path, f"not a readable DICOM file ({type(e).__name__}: {e})") from e
  pi = str(ds.get("PhotometricInterpretation", "")).strip()
  if pi not in _DICOM_PHOTOMETRIC:
    raise ReadError(path, f"unsupported PhotometricInterpretation {pi!r}")
  if "Rows" not in ds or "Columns" not in ds:
    raise ReadError(path, "no image (Rows/Columns missing)")
  for keyword in _DICOM_INT_KEYWORDS:
    value = ds.get(keyword)
    try:
      int(value or 0)
    except (TypeError, ValueError, OverflowError):
      raise ReadError(path, f"malformed DICOM header: {keyword} = {value!r}") from None
  return ds


# Header integers the readers use; a value that does not parse makes the file unreadable.
_DICOM_INT_KEYWORDS = ("Rows", "Columns", "SamplesPerPixel", "BitsStored", "PixelRepresentation",
                       "NumberOfFrames")


def _dicom_number(ds, keyword: str) -> float:
  """A timing tag as a float; 0.0 if absent or if it does not parse (logged: a damaged tag
  leaves the frame rate to the next source, never to a crash)."""
  value = ds.get(keyword)
  try:
    return float(value or 0)
  except (TypeError, ValueError, OverflowError):
    log.warning("%s: %s = %r is not a number; ignored", getattr(ds, "filename", "DICOM"),
                keyword, value)
    return 0.0


def _dicom_fps(ds) -> tuple[float, str]:
  """(frames per second, the keyword it came from); (0.0, "") when the file gives no rate."""
  frame_time = _dicom_number(ds, "FrameTime")
  if frame_time > 0:
    return 1000.0 / frame_time, "FrameTime"
  for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
    rate = _dicom_number(ds, keyword)
    if rate > 0:
      return rate, keyword
  vector = ds.get("FrameTimeVector")
  try:
    mean_ms = float(np.mean([float(v) for v in vector[1:]])) if len(vector or ()) > 1 else 0.0
  except (TypeError, ValueError, OverflowError):
    log.warning("%s: FrameTimeVector is not numeric; ignored", getattr(ds, "filename", "DICOM"))
    mean_ms = 0.0
  if mean_ms > 0 and np.isfinite(mean_ms):
    return 1000.0 / mean_ms, "FrameTimeVector"
  return 0.0, ""


def _dicom_gray(arr: np.ndarray, ds) -> np.ndarray:
  """One decoded frame (RGB already for YBR_*) -> uint8 (H, W) grayscale."""
  pi = str(ds.PhotometricInterpretation).strip()
  if pi == "PALETTE COLOR":
    from pydicom.pixels import apply_color_lut
    rgb = apply_color_lut(arr, ds)
    lut_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    return luma(rgb >> (lut_bits - 8) if lut_bits > 8 else rgb)
  bits = int(ds.get("BitsStored") or 8)
  x = arr.astype(np.int64)
  if int(ds.get("PixelRepresentation") or 0) == 1:
    x = x + (1 << (bits - 1))
  if bits > 8:
    x = x >> (bits - 8)
  x = np.clip(x, 0, 255).astype(np.uint8)
  if x.ndim == 3:
    return luma(x)
  return 255 - x if pi == "MONOCHROME1" else x


def _dicom_meta(ds, errors: list[str]) -> dict[str, Any]:
  ts = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
  return {
      "transfer_syntax": ts.name if ts is not None else "",
      "photometric_interpretation": str(ds.PhotometricInterpretation).strip(),
      "samples_per_pixel": int(ds.get("SamplesPerPixel") or 1),
      "bits_stored": int(ds.get("BitsStored") or 8),
      "container_frames": int(ds.get("NumberOfFrames") or 1),
      "fps_source": _dicom_fps(ds)[1],
      "modality": str(ds.get("Modality", "")),
      "manufacturer": str(ds.get("Manufacturer", "")),
      "model": str(ds.get("ManufacturerModelName", "")),
      "decode_errors": len(errors),
  }


def _dicom_pixels(path: str, errors: list[str]) -> Iterator[np.ndarray]:
  """Decoded frames from the file, one at a time; a decoder error ends the stream and is
  appended to ``errors``."""
  from pydicom.pixels import iter_pixels
  frames = iter_pixels(path)
  while True:
    try:
      arr = next(frames)
    except StopIteration:
      return
    except Exception as e:  # decoder plugins raise their own types
      errors.append(f"{type(e).__name__}: {e}")
      return
    yield arr


def _probe_dicom(path: str) -> VideoInfo:
  ds = _dicom_header(path)
  errors: list[str] = []
  n = sum(1 for _ in _dicom_pixels(path, errors))
  if n == 0:
    raise ReadError(path, f"no decodable frames ({_summary(errors) or 'no pixel data'})")
  if errors:
    log.warning("%s: %d frames decodable; %s", path, n, "; ".join(errors))
  return VideoInfo(path, "dicom", _dicom_fps(ds)[0], n, int(ds.Rows), int(ds.Columns),
                   _dicom_meta(ds, errors))


def _iter_dicom(path: str) -> Iterator[tuple[int, np.ndarray]]:
  ds = _dicom_header(path)
  errors: list[str] = []
  n = 0
  for n, arr in enumerate(_dicom_pixels(path, errors), start=1):
    try:
      gray = _dicom_gray(arr, ds)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
      raise ReadError(path, f"frame {n - 1} cannot be converted to grey "
                      f"({type(e).__name__}: {e})") from e
    yield n - 1, gray
  if n == 0:
    raise ReadError(path, f"no decodable frames ({_summary(errors) or 'no pixel data'})")
  if errors:
    log.warning("%s: stopped after %d frames; %s", path, n, "; ".join(errors))


# ------------------------------------------------------------------------------------ stills

def _pil_gray(im) -> np.ndarray:
  """A loaded PIL image -> uint8 (H, W): grey as is, 16-bit grey >> 8, anything else RGB luma."""
  if im.mode == "L":
    return np.asarray(im, np.uint8).copy()
  if im.mode.startswith("I"):
    return (np.clip(np.asarray(im, np.int64), 0, 65535) >> 8).astype(np.uint8)
  if im.mode == "F":
    raise ValueError("floating-point images are not supported")
  return luma(np.asarray(im.convert("RGB"), np.uint8))


def _read_still(path: str) -> tuple[np.ndarray, dict[str, Any]]:
  from PIL import Image, ImageOps
  try:
    with Image.open(path) as im:
      frames = getattr(im, "n_frames", 1)
      if frames > 1:
        raise ReadError(path, f"animated image with {frames} frames (use .gif or a video)")
      meta = {"format": im.format, "mode": im.mode}
      gray = _pil_gray(ImageOps.exif_transpose(im))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ReadError(path, f"cannot decode image ({e})") from e
  return gray, meta


def _frame_files(folder: str) -> list[str] | None:
  """The frame paths of a frames folder in frame order, or None if ``folder`` is not one."""
  try:
    names = os.listdir(folder)
  except OSError:
    return None
  numbered = []
  templates = set()
  for name in names:
    if name.startswith(".") or name.lower() in _SYSTEM_FILES:
      continue
    full = os.path.join(folder, name)
    stem, ext = os.path.splitext(name)
    match = _LAST_NUMBER.search(stem)
    if not os.path.isfile(full) or ext.lower() not in IMAGE_EXTENSIONS or match is None:
      return None
    templates.add((stem[:match.start()], stem[match.end():], ext.lower()))
    numbered.append((int(match.group(1)), name, full))
  if len(numbered) < 2 or len(templates) != 1:
    return None
  return [full for _, _, full in sorted(numbered)]


def _iter_frames_dir(folder: str) -> Iterator[tuple[int, np.ndarray]]:
  first = None
  for i, file in enumerate(_frame_files(folder) or ()):
    gray = _read_still(file)[0]
    first = first or gray.shape
    _check_size(file, i, gray.shape, first)
    yield i, gray


def _probe_frames_dir(folder: str) -> VideoInfo:
  files = _frame_files(folder)
  first, meta = _read_still(files[0])
  for i, file in enumerate(files[1:], start=1):
    _check_size(file, i, _read_still(file)[0].shape, first.shape)
  return VideoInfo(folder, "frames_dir", 0.0, len(files), first.shape[0], first.shape[1],
                   {"format": meta["format"], "frame_files": len(files)})
