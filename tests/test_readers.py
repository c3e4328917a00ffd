"""data_prep.readers on the real files in ../shared/data and on files transcoded from real frames.

Real-data tests skip when ../shared/data is absent; the format tests then use synthetic frames.
"""
import csv
import inspect
import os
import pickle

import av
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

from data_prep import readers
from tests.conftest import SHARED_DATA

DATA = SHARED_DATA
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data is absent")
N_FRAMES = 10
SIDE = 86  # even, small


def _manifest():
  with open(os.path.join(DATA, "manifest.csv"), newline="") as f:
    return list(csv.DictReader(f))


def _luma_float(rgb):
  """Reference ITU-R 601 luma in floating point."""
  return np.round(rgb.astype(np.float64) @ [0.299, 0.587, 0.114])


def _assert_close_u8(actual, expected, atol):
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                             atol=atol, rtol=0)


@pytest.fixture(scope="module")
def rgb_frames():
  """N_FRAMES real RGB frames (SIDE x SIDE, from a COVID-BLUES clip), or a synthetic moving
  pattern when the data folder is absent."""
  if os.path.isdir(DATA):
    path = os.path.join(DATA, "covid_blues/covid/patient_12_L1.mp4")
    with av.open(path) as c:
      frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(N_FRAMES), c.decode(video=0))]
    return [np.ascontiguousarray(f[:4 * SIDE:4, :4 * SIDE:4]) for f in frames]
  yy, xx = np.mgrid[0:SIDE, 0:SIDE]
  return [np.repeat(((np.sin(xx / 5 + t) + 1) * 100 + yy).astype(np.uint8)[..., None], 3, 2)
          for t in range(N_FRAMES)]


def _write_video(path, frames, codec="h264", fmt=None, rate=25, options=None,
                 container_options=None):
  with av.open(path, "w", format=fmt, container_options=container_options or {}) as c:
    s = c.add_stream(codec, rate=rate, options=options or {})
    s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
    for f in frames:
      for packet in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        c.mux(packet)
    for packet in s.encode():
      c.mux(packet)


def _frames(path):
  return [f for _, f in readers.iter_frames(path)]


# --------------------------------------------------------------------------- real files

@needs_data
def test_covid_blues_mp4_against_manifest():
  rows = sorted((r for r in _manifest() if r["kind"] == "video"), key=lambda r: int(r["n_frames"]))
  picked = rows[:2] + rows[len(rows) // 2:len(rows) // 2 + 1] + rows[-2:]  # 7 ... 101 frames
  for row in picked:
    path = os.path.join(DATA, row["file"])
    info = readers.probe(path)
    assert (info.kind, info.num_frames, info.height, info.width) == (
        "video", int(row["n_frames"]), int(row["height"]), int(row["width"])), row["file"]
    assert info.fps == pytest.approx(float(row["fps"]))
    assert info.meta["codec"] == row["codec"] and info.meta["decode_errors"] == 0
    indices, shapes = [], set()
    for i, frame in readers.iter_frames(path):
      indices.append(i)
      shapes.add((frame.shape, frame.dtype))
    assert indices == list(range(int(row["n_frames"])))
    assert shapes == {((info.height, info.width), np.dtype(np.uint8))}


@needs_data
def test_video_gray_is_601_luma_of_decoded_rgb():
  path = os.path.join(DATA, "covid_blues/covid/patient_12_L1.mp4")
  with av.open(path) as c:
    rgb = [f.to_ndarray(format="rgb24") for _, f in zip(range(3), c.decode(video=0))]
  for (_, gray), ref in zip(readers.iter_frames(path), rgb):
    _assert_close_u8(gray, _luma_float(ref), atol=1)


@needs_data
@pytest.mark.parametrize("name", ["examples_ybr_color.dcm", "examples_rgb_color.dcm",
                                  "examples_palette.dcm"])
def test_dicom_against_manifest(name):
  row = next(r for r in _manifest() if r["file"] == f"dicom/{name}")
  path = os.path.join(DATA, row["file"])
  info = readers.probe(path)
  assert (info.kind, info.num_frames, info.height, info.width) == (
      "dicom", int(row["n_frames"]), int(row["height"]), int(row["width"]))
  assert info.fps == pytest.approx(float(row["fps"] or 0.0), rel=1e-4)
  frames = _frames(path)
  assert len(frames) == info.num_frames
  assert all(f.shape == (info.height, info.width) and f.dtype == np.uint8 for f in frames)
  # Equivalence with pydicom's own full decode + colour handling + float 601 luma.
  ds = pydicom.dcmread(path)
  arr = ds.pixel_array
  if ds.PhotometricInterpretation == "PALETTE COLOR":
    arr = apply_color_lut(arr, ds) >> 8
  ref = _luma_float(arr.reshape(info.num_frames, info.height, info.width, 3))
  _assert_close_u8(np.stack(frames), ref, atol=1)


@needs_data
def test_dicom_meta_is_technical_and_free_of_identifiers():
  allowed = {"transfer_syntax", "photometric_interpretation", "samples_per_pixel", "bits_stored",
             "container_frames", "fps_source", "modality", "manufacturer", "model",
             "decode_errors"}
  for name in ("examples_ybr_color.dcm", "examples_rgb_color.dcm", "examples_palette.dcm"):
    path = os.path.join(DATA, "dicom", name)
    info = readers.probe(path)
    assert set(info.meta) <= allowed
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    secrets = [str(e.value) for e in ds.iterall()
               if e.keyword and (e.keyword.startswith(("Patient", "Study", "Series", "Accession",
                                                       "Institution", "Station", "Operator",
                                                       "Referring", "DeviceSerial", "Content",
                                                       "Acquisition", "InstanceCreation"))
                                 or e.VR in ("UI", "DA", "DT", "TM", "PN"))
               and e.VR != "SQ" and len(str(e.value).strip()) >= 4]
    assert secrets, name  # the sample files do carry identifiers, so the check is not vacuous
    text = repr(info)
    assert [s for s in secrets if s in text] == [], name


def test_dicom_with_unsupported_photometric_raises(tmp_path):
  path = str(tmp_path / "odd.dcm")
  write_dicom(path, np.zeros((1, 4, 4), np.uint8), photometric="HSV")
  with pytest.raises(readers.ReadError, match="odd.dcm.*HSV"):
    readers.probe(path)


# ------------------------------------------------------------------------ built DICOMs

def write_dicom(path, frames, photometric="MONOCHROME2", bits=8, uid_entropy=None, **tags):
  """A multi-frame ultrasound DICOM with identifiers; ``uid_entropy``: reproducible UIDs."""
  uid = lambda i: generate_uid(entropy_srcs=None if uid_entropy is None else [uid_entropy, i])
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
  meta.MediaStorageSOPInstanceUID = uid("instance")
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.StudyInstanceUID = uid("study")
  ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MRN-778899", "19700305"
  ds.StudyDate, ds.InstitutionName, ds.Modality = "20240117", "Saint Nowhere Hospital", "US"
  ds.Rows, ds.Columns = frames.shape[1], frames.shape[2]
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
  ds.BitsAllocated = 8 if bits <= 8 else 16
  ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
  ds.NumberOfFrames = len(frames)
  for key, value in tags.items():
    setattr(ds, key, value)
  ds.PixelData = frames.astype(np.uint8 if bits <= 8 else np.uint16).tobytes()
  ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def gray_frames(rgb_frames):
  return np.stack([np.round(_luma_float(f)).astype(np.uint8) for f in rgb_frames[:3]])


def test_monochrome2_dicom_built_from_real_frames(tmp_path, gray_frames):
  path = str(tmp_path / "mono2.dcm")
  write_dicom(path, gray_frames, FrameTime=40.0)
  info = readers.probe(path)
  assert (info.kind, info.num_frames, info.height, info.width) == ("dicom", 3, SIDE, SIDE)
  assert info.fps == pytest.approx(25.0)
  assert info.meta["photometric_interpretation"] == "MONOCHROME2"
  assert info.meta["fps_source"] == "FrameTime"
  np.testing.assert_array_equal(np.stack(_frames(path)), gray_frames)
  text = repr(info)
  for secret in ("Doe", "Jane", "MRN-778899", "19700305", "20240117", "Nowhere"):
    assert secret not in text


def test_monochrome1_is_inverted_and_cine_rate_gives_fps(tmp_path, gray_frames):
  path = str(tmp_path / "mono1.dcm")
  write_dicom(path, gray_frames, photometric="MONOCHROME1", CineRate=15)
  info = readers.probe(path)
  assert info.fps == 15.0 and info.meta["fps_source"] == "CineRate"
  np.testing.assert_array_equal(np.stack(_frames(path)), 255 - gray_frames)


def test_12_bit_dicom_keeps_the_high_8_bits_and_single_frame_fps_is_zero(tmp_path, gray_frames):
  path = str(tmp_path / "twelve.dcm")
  stored = gray_frames[:1].astype(np.uint16) * 16 + 9   # 12-bit values whose high byte is known
  write_dicom(path, stored, bits=12)
  info = readers.probe(path)
  assert (info.num_frames, info.fps, info.meta["bits_stored"]) == (1, 0.0, 12)
  np.testing.assert_array_equal(_frames(path)[0], gray_frames[0])


# ------------------------------------------------------------------------ video formats

@pytest.mark.parametrize("name, codec, fmt, container_frames", [
    ("clip.mov", "h264", None, N_FRAMES),
    ("clip.avi", "mpeg4", None, N_FRAMES),
    ("clip.mpeg", "mpeg2video", "mpeg", 0),           # MPEG-PS: no count in the container
    ("clip.mpg", "mpeg2video", "mpeg", 0),
    ("clip.mkv", "h264", None, 0),
    ("clip.m4v", "h264", "mp4", N_FRAMES),
    ("UPPER.MP4", "h264", "mp4", N_FRAMES),
    ("patient 3 (left) + copy.mp4", "h264", None, N_FRAMES),
])
def test_transcoded_videos(tmp_path, rgb_frames, name, codec, fmt, container_frames):
  path = str(tmp_path / name)
  _write_video(path, rgb_frames, codec=codec, fmt=fmt)
  assert readers.is_supported(path)
  info = readers.probe(path)
  assert (info.kind, info.num_frames, info.height, info.width) == ("video", N_FRAMES, SIDE, SIDE)
  assert info.fps == 25.0
  assert info.meta["codec"] == codec and info.meta["container_frames"] == container_frames
  assert info.path == path
  gen = readers.iter_frames(path)
  assert inspect.isgenerator(gen)
  frames = [f for _, f in gen]
  assert len(frames) == N_FRAMES
  for frame, rgb in zip(frames, rgb_frames):   # lossy codecs: close to the source's luma
    assert frame.dtype == np.uint8
    assert np.abs(frame.astype(float) - _luma_float(rgb)).mean() < 6


def test_animated_palette_gif(tmp_path, rgb_frames):
  path = str(tmp_path / "loop.gif")
  small = [np.ascontiguousarray(np.pad(f, ((0, 53), (0, 53), (0, 0)), mode="edge"))
           for f in rgb_frames]                               # 139 x 139, like real small GIFs
  pal = [Image.fromarray(f).quantize(32) for f in small]
  pal[0].save(path, save_all=True, append_images=pal[1:], duration=100, loop=0)
  info = readers.probe(path)
  assert (info.kind, info.num_frames, info.height, info.width) == ("video", N_FRAMES, 139, 139)
  assert info.fps == pytest.approx(10.0)
  with Image.open(path) as im:   # Pillow's own palette expansion of every frame
    expected = []
    for k in range(im.n_frames):
      im.seek(k)
      expected.append(_luma_float(np.asarray(im.convert("RGB"))))
  _assert_close_u8(np.stack(_frames(path)), np.stack(expected), atol=1)


@pytest.fixture()
def intra_mov(tmp_path, rgb_frames):
  """An all-intra h264 .mov with the moov box first, and its packets' (offset, size)."""
  path = str(tmp_path / "intra.mov")
  _write_video(path, rgb_frames, options={"g": "1", "bf": "0"},
               container_options={"movflags": "faststart"})
  with av.open(path) as c:
    packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
  assert len(packets) == N_FRAMES
  return path, packets


def test_container_count_larger_than_decodable_frames(tmp_path, intra_mov):
  path, packets = intra_mov
  full = _frames(path)
  data = open(path, "rb").read()
  cut = str(tmp_path / "cut.mov")
  with open(cut, "wb") as f:           # the container still lists N_FRAMES samples
    f.write(data[:packets[5][0] + packets[5][1]])
  info = readers.probe(cut)
  assert (info.num_frames, info.meta["container_frames"], info.meta["decode_errors"]) == (
      6, N_FRAMES, 0)
  frames = _frames(cut)
  assert len(frames) == 6
  np.testing.assert_array_equal(np.stack(frames), np.stack(full[:6]))
  # Cut inside packet 6: that packet fails to decode, is counted, and the first six survive.
  with open(cut, "wb") as f:
    f.write(data[:packets[6][0] + packets[6][1] // 2])
  info = readers.probe(cut)
  assert (info.num_frames, info.meta["decode_errors"]) == (6, 1)
  assert len(_frames(cut)) == 6


# ----------------------------------------------------------------------------- stills

def test_png_colours_give_hand_computed_luma(tmp_path):
  rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]],
                  [[255, 255, 255], [0, 0, 0], [100, 150, 200]]], np.uint8)
  path = str(tmp_path / "colours.png")
  Image.fromarray(rgb).save(path)
  info = readers.probe(path)
  assert (info.kind, info.num_frames, info.fps, info.height, info.width) == ("image", 1, 0.0, 2, 3)
  # 0.299*255=76.2, 0.587*255=149.7, 0.114*255=29.1; 29.9+88.05+22.8=140.75
  np.testing.assert_array_equal(_frames(path)[0], [[76, 150, 29], [255, 0, 141]])


@pytest.mark.parametrize("name", ["still.png", "STILL.JPG", "still.jpeg", "still.bmp"])
def test_stills_from_a_real_frame(tmp_path, rgb_frames, name):
  path = str(tmp_path / name)
  Image.fromarray(rgb_frames[0]).save(path)
  info = readers.probe(path)
  assert (info.kind, info.num_frames, info.height, info.width) == ("image", 1, SIDE, SIDE)
  [(index, frame)] = list(readers.iter_frames(path))
  with Image.open(path) as im:
    decoded = np.asarray(im.convert("RGB"))
  assert index == 0
  _assert_close_u8(frame, _luma_float(decoded), atol=1)


def test_16_bit_png_and_exif_orientation(tmp_path):
  path = str(tmp_path / "deep.png")
  values = np.arange(6, dtype=np.uint16).reshape(2, 3) * 40
  Image.fromarray(values * 256 + 255).save(path)
  np.testing.assert_array_equal(_frames(path)[0], values)
  tall = str(tmp_path / "rotated.jpg")
  exif = Image.Exif()
  exif[0x0112] = 6                     # stored 20 wide x 10 high, shown rotated by 90 degrees
  Image.fromarray(np.zeros((10, 20), np.uint8)).save(tall, exif=exif)
  info = readers.probe(tall)
  assert (info.height, info.width) == (20, 10)
  assert _frames(tall)[0].shape == (20, 10)


def test_folder_of_frames(tmp_path, gray_frames):
  folder = tmp_path / "clip 7 (frames)"
  folder.mkdir()
  order = [2, 10, 1]                   # numeric, not lexical, order: 1, 2, 10
  for k, number in enumerate(order):
    Image.fromarray(gray_frames[k]).save(folder / f"frame_{number}.png")
  (folder / ".DS_Store").write_bytes(b"\0")
  assert readers.is_supported(folder)
  info = readers.probe(folder)
  assert (info.kind, info.num_frames, info.fps, info.height, info.width) == (
      "frames_dir", 3, 0.0, SIDE, SIDE)
  got = list(readers.iter_frames(folder))
  assert [i for i, _ in got] == [0, 1, 2]
  for (_, frame), k in zip(got, [2, 0, 1]):
    np.testing.assert_array_equal(frame, gray_frames[k])
  Image.fromarray(gray_frames[0][:40]).save(folder / "frame_11.png")
  with pytest.raises(readers.ReadError, match="frame_11.png.*40x86"):
    readers.probe(folder)


def test_folders_that_are_not_frame_sequences(tmp_path, rgb_frames):
  mixed = tmp_path / "mixed"
  mixed.mkdir()
  Image.fromarray(rgb_frames[0]).save(mixed / "frame_1.png")
  Image.fromarray(rgb_frames[1]).save(mixed / "frame_2.png")
  _write_video(str(mixed / "clip.mp4"), rgb_frames[:2])
  stills = tmp_path / "stills"
  stills.mkdir()
  Image.fromarray(rgb_frames[0]).save(stills / "patient_1_left.png")
  Image.fromarray(rgb_frames[1]).save(stills / "patient_2_right.png")
  single = tmp_path / "single"
  single.mkdir()
  Image.fromarray(rgb_frames[0]).save(single / "frame_1.png")
  for folder in (mixed, stills, single, tmp_path / "empty"):
    folder.mkdir(exist_ok=True)
    assert not readers.is_supported(folder), folder
    with pytest.raises(readers.ReadError, match="not a sequence of frames"):
      readers.probe(folder)


# ----------------------------------------------------------------------- bad input

def test_bad_files_raise_read_error_naming_the_file(tmp_path, intra_mov):
  junk = b"this is not media " * 64
  cases = {"empty.mp4": b"", "junk.mov": junk, "junk.dcm": junk, "junk.png": junk,
           "junk.gif": junk, "notes.txt": b"hello"}
  path, packets = intra_mov
  cases["header_only.mov"] = open(path, "rb").read()[:packets[0][0] + 10]
  for name, content in cases.items():
    file = tmp_path / name
    file.write_bytes(content)
    for call in (readers.probe, lambda p: next(readers.iter_frames(p))):
      with pytest.raises(readers.ReadError, match=name.replace(".", r"\.")) as err:
        call(str(file))
      assert err.value.path == str(file)
  with pytest.raises(readers.ReadError, match="no such file"):
    readers.probe(str(tmp_path / "missing.mp4"))
  with pytest.raises(readers.ReadError, match="unsupported file type '.txt'"):
    readers.probe(str(tmp_path / "notes.txt"))
  with pytest.raises(readers.ReadError, match="empty file"):
    readers.probe(str(tmp_path / "empty.mp4"))
  with pytest.raises(readers.ReadError, match="no decodable"):
    readers.probe(str(tmp_path / "header_only.mov"))


def test_read_error_survives_pickling():
  err = pickle.loads(pickle.dumps(readers.ReadError("/x/a b.mp4", "empty file")))
  assert (str(err), err.path, err.problem) == ("/x/a b.mp4: empty file", "/x/a b.mp4", "empty file")


def test_is_supported_by_extension_case_insensitive():
  for ext in (".mp4", ".mov", ".avi", ".mpeg", ".gif", ".dcm", ".png", ".jpg", ".jpeg"):
    assert ext in readers.SUPPORTED_EXTENSIONS
    assert readers.is_supported(f"/nowhere/a b+(1){ext.upper()}")
  for name in ("/nowhere/x.txt", "/nowhere/x.csv", "/nowhere/mp4", "/nowhere/x.mp4.part"):
    assert not readers.is_supported(name)


def test_demuxer_error_still_flushes_buffered_frames(tmp_path, rgb_frames):
  """A demuxer that fails before its final flush packet (as FFmpeg does on a read error other
  than EOF) must not lose the frames the decoder still buffers (h264 with B-frames)."""
  path = str(tmp_path / "bframes.mp4")
  _write_video(path, rgb_frames)

  class FailingDemux:
    def __init__(self, container):
      self.streams = container.streams
      self._container = container

    def demux(self, stream):
      for packet in self._container.demux(stream):
        if packet.size == 0:
          raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")
        yield packet

  errors = []
  with av.open(path) as container:
    frames = [f.to_ndarray(format="gray") for f in readers._decode(FailingDemux(container),
                                                                   errors)]
  assert len(errors) == 1 and errors[0].startswith("demux:")
  np.testing.assert_array_equal(np.stack(frames), np.stack(_frames(path)))


def test_damaged_dicom_tags_fall_back_or_name_the_tag(tmp_path, gray_frames, caplog):
  """Found by tests/test_fuzz_readers.py: a FrameTime of 'Õ00.0' crashed the probe. A timing tag
  that does not parse is logged and the next source gives the rate; a header integer that does
  not parse makes the file unreadable, naming the tag."""
  path = str(tmp_path / "t.dcm")

  def patch(old: bytes, new: bytes):
    data = open(path, "rb").read()
    assert data.count(old) == 1
    open(path, "wb").write(data.replace(old, new))

  write_dicom(path, gray_frames, FrameTime="100.0", CineRate=15)
  patch(b"DS\x06\x00100.0 ", b"DS\x06\x00x00.0 ")             # (0018,1063) FrameTime
  info = readers.probe(path)
  assert info.fps == 15.0 and info.meta["fps_source"] == "CineRate"
  assert "FrameTime = 'x00.0' is not a number; ignored" in caplog.text
  write_dicom(path, gray_frames)
  patch(b"\x28\x00\x08\x00IS\x02\x003 ", b"\x28\x00\x08\x00IS\x02\x00x ")  # NumberOfFrames
  with pytest.raises(readers.ReadError,
                     match=r"t.dcm: malformed DICOM header: NumberOfFrames = 'x'"), \
       pytest.warns(UserWarning, match=r"Invalid value for VR IS: 'x'"):   # pydicom's own
    readers.probe(path)
