"""Readers under fuzzing: 1,020 mutated and truncated files through data_prep, seeded.

Six small valid files (h264 mp4, mpeg4 avi, palette gif, DICOM multi-frame, PNG, JPEG; plus the
real JPEG-cine DICOM from ../shared/data when present) are mutated: truncated at a random
length, bytes flipped, a random range overwritten or zeroed, a chunk duplicated, the header cut
off. The whole folder then goes through `python -m data_prep` with 2 worker processes. Each file
must be read or rejected with a reason in the report; the build must finish (a hang fails the
subprocess timeout, a crash its exit code); every record in the shards must be complete and
belong to a written video, with exactly the records its audit counts.
"""
import collections
import io
import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image
from tests import test_readers
from tests.conftest import SHARED_DATA
from tests.test_data_prep_pipeline import read_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_DICOM = os.path.join(SHARED_DATA, "dicom", "examples_ybr_color.dcm")
MUTANTS_PER_BASE = 170     # x 6 synthetic bases = 1,020 (+170 of the real DICOM when present)
H, W, T = 40, 48, 6


def _frames(rng):
  """T frames: a bright noisy scan area on black, moving a little."""
  out = []
  for t in range(T):
    img = np.zeros((H, W), np.uint8)
    img[5 + t % 2:H - 5, 6:W - 6] = rng.integers(60, 250, (H - 10 - t % 2, W - 12))
    out.append(img)
  return out


def _video(frames, fmt, codec):
  buf = io.BytesIO()
  with av.open(buf, "w", format=fmt) as c:
    s = c.add_stream(codec, rate=10)
    s.width, s.height, s.pix_fmt = W, H, "yuv420p"
    for f in frames:
      rgb = np.repeat(f[..., None], 3, 2)
      for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  return buf.getvalue()


def _gif(frames):
  buf = io.BytesIO()
  ims = [Image.fromarray(f).convert("P") for f in frames]
  ims[0].save(buf, format="GIF", save_all=True, append_images=ims[1:], duration=100, loop=0)
  return buf.getvalue()


def _dicom(frames, tmp):
  path = os.path.join(tmp, "base.dcm")
  test_readers.write_dicom(path, np.stack(frames), uid_entropy="fuzz", FrameTime=100.0)
  with open(path, "rb") as f:
    return f.read()


def _still(frame, fmt):
  buf = io.BytesIO()
  Image.fromarray(frame).save(buf, format=fmt)
  return buf.getvalue()


def base_files(rng, tmp) -> dict[str, bytes]:
  frames = _frames(rng)
  files = {"mp4": _video(frames, "mp4", "h264"), "avi": _video(frames, "avi", "mpeg4"),
           "gif": _gif(frames), "dcm": _dicom(frames, tmp), "png": _still(frames[0], "PNG"),
           "jpg": _still(frames[0], "JPEG")}
  if os.path.exists(REAL_DICOM):
    with open(REAL_DICOM, "rb") as f:
      files["real.dcm"] = f.read()
  return files


def mutate(data: bytes, rng) -> tuple[bytes, str]:
  """One seeded mutation: (mutated bytes, what was done)."""
  b = bytearray(data)
  n = len(b)
  kind = rng.integers(6)
  if kind == 0:
    cut = int(rng.integers(1, n))
    return bytes(b[:cut]), f"truncated to {cut} of {n} bytes"
  if kind == 1:
    k = int(rng.integers(1, 33))
    for i in rng.integers(0, n, k):
      b[i] ^= int(rng.integers(1, 256))
    return bytes(b), f"{k} bytes flipped"
  lo = int(rng.integers(0, n))
  hi = min(n, lo + int(rng.integers(1, max(2, n // 8))))
  if kind == 2:
    b[lo:hi] = rng.integers(0, 256, hi - lo, np.uint8).tobytes()
    return bytes(b), f"bytes {lo}:{hi} random"
  if kind == 3:
    b[lo:hi] = bytes(hi - lo)
    return bytes(b), f"bytes {lo}:{hi} zeroed"
  if kind == 4:
    return bytes(b[:hi] + b[lo:]), f"bytes {lo}:{hi} duplicated"
  cut = int(rng.integers(1, min(n, 512)))
  return bytes(b[cut:]), f"first {cut} bytes cut off"


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
  rng = np.random.default_rng(20261206)
  src = tmp_path_factory.mktemp("fuzz")
  made = {}
  # Ten label folders, each holding every format (a folder of stills alone would be read as
  # one frame sequence).
  for g in range(10):
    (src / f"g{g}").mkdir()
  for name, data in base_files(rng, str(tmp_path_factory.mktemp("base"))).items():
    ext = name.split(".")[-1]
    for i in range(MUTANTS_PER_BASE):
      mutant, what = mutate(data, rng)
      rel = f"g{i % 10}/{name.replace('.', '_')}_m{i:03d}.{ext}"
      (src / rel).write_bytes(mutant)
      made[rel] = what
  out = tmp_path_factory.mktemp("out")
  proc = subprocess.run(
      [sys.executable, "-m", "data_prep", "--input", str(src), "--output", str(out),
       "--every", "2", "--size", "32", "--min_size", "8", "--num_workers", "2",
       "--no_progress", "--previews", "0", "--random_previews", "0"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  return made, proc, os.path.join(str(out), "ultrasound", "1.0.0")


def test_every_fuzzed_file_is_read_or_rejected_with_a_reason(fuzzed):
  made, proc, ddir = fuzzed
  assert len(made) >= 1020
  assert proc.returncode in (0, 3), proc.stderr[-4000:]      # finished (3: with rejects)
  report = json.load(open(os.path.join(ddir, "report", "report.json")))
  files = {f["source"]: f for f in report["files"]}
  assert set(files) == set(made)
  counts = report["counts"]
  assert counts["inputs"] == len(made) == counts["written"] + counts["rejected"]
  for source, f in files.items():
    assert f["status"] in ("written", "rejected"), (source, f)
    if f["status"] == "rejected":
      assert source in f["message"], (source, f["message"])          # names the file
      # A reader's own diagnosis, never an unexpected exception ('error') or a dead worker
      # ('crash'): the first run of this test found PyAV raising UnicodeDecodeError on
      # undecodable metadata tags.
      assert f["reason"] in ("unreadable", "too_small", "zero_frames", "decode_error"), (
          source, made[source], f)
  # Mutations do not all break the files: some are still read, most formats reject some.
  by_format = collections.defaultdict(collections.Counter)
  for source, f in files.items():
    by_format[source.split("/")[1].rsplit("_m", 1)[0]][f["status"]] += 1
  assert all(c["rejected"] > 0 for c in by_format.values()), by_format
  assert sum(c["written"] for c in by_format.values()) > 0, by_format


def test_no_partial_record_reaches_a_shard(fuzzed):
  made, _, ddir = fuzzed
  report = json.load(open(os.path.join(ddir, "report", "report.json")))
  files = {f["source"]: f for f in report["files"]}
  per_source = collections.Counter()
  for _, _, r in read_records(ddir):   # tf.data: record CRCs checked, every PNG decoded
    assert files[r["source"]]["status"] == "written", r["source"]
    assert len(r["frames"]) == 1 and r["frames"][0].shape == (32, 32, 1)
    per_source[r["source"]] += 1
  for source, f in files.items():
    expected = f.get("records", 0) if f["status"] == "written" else 0
    assert per_source[source] == expected, (source, made[source], f)
