"""The grain input pipeline over shards: index, samplers, process slicing, state, errors."""
import logging
import os
import re

import numpy as np
import pytest

from ssl_us import input_pipeline as ip
from ssl_us.samplers_frames import FrameSampler
from tests import fixtures


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return fixtures.write_dataset(str(tmp_path_factory.mktemp("d")), num_videos=6, frames=4,
                                num_shards=3)


def test_index_accounts_for_every_record(dataset):
  index = ip.load_index(dataset, "train", cache=False)
  assert index.num_records == 24 and index.num_videos == 6
  # Records of one video are consecutive and in frame order.
  for v in range(6):
    rows = np.flatnonzero(index.video == v)
    assert np.all(np.diff(rows) == 1)
    np.testing.assert_array_equal(index.frame_index[rows], [0, 1, 2, 3])
  # Labels as written: class = video number % 2.
  for v, name in enumerate(index.video_ids):
    assert set(index.label[index.video == v]) == {int(name[-3:]) % 2}
  rec = ip.read_record(index, 5)
  assert rec["frames"].shape == (1, 16, 16, 1) and rec["frames"].dtype == np.uint8
  assert rec["video_id"] == index.video_ids[index.video[5]]


def test_index_cache_is_used_and_invalidated(dataset):
  a = ip.load_index(dataset, "train")
  cache = os.path.join(dataset, ".index", "train.npz")
  assert os.path.exists(cache)
  b = ip.load_index(dataset, "train")
  np.testing.assert_array_equal(a.offset, b.offset)
  assert a.video_ids == b.video_ids


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "not a zip"])
def test_a_damaged_index_cache_is_rebuilt(tmp_path, caplog, damage):
  """A cache cut short, changed or overwritten is a cache miss, never a crash or a wrong index,
  and no temporary file stays behind."""
  d = fixtures.write_dataset(str(tmp_path / "d"), num_videos=6, frames=3)
  fresh = ip.load_index(d, "train", cache=False)
  ip.load_index(d, "train")
  cache = os.path.join(d, ".index", "train.npz")
  b = bytearray(open(cache, "rb").read())
  if damage == "truncated":
    b = b[:len(b) // 2]
  elif damage == "flipped byte":
    b[len(b) // 2] ^= 0x10
  else:
    b = bytearray(b"\x00" * 64)
  open(cache, "wb").write(bytes(b))
  with caplog.at_level(logging.WARNING):
    index = ip.load_index(d, "train")
  assert "damaged record index cache" in caplog.text
  for k in ("offset", "video", "patient", "frame_index", "label"):
    np.testing.assert_array_equal(getattr(index, k), getattr(fresh, k))
  assert index.video_ids == fresh.video_ids
  caplog.clear()
  ip.load_index(d, "train")                      # rewritten whole: read without a warning
  assert "damaged" not in caplog.text
  assert os.listdir(os.path.join(d, ".index")) == ["train.npz"]


def _all_batches(index, sampler, n, **kw):
  it = iter(ip.make_dataset(index, sampler, **kw))
  return [next(it) for _ in range(n)]


def test_processes_read_disjoint_parts_of_each_global_batch(dataset):
  index = ip.load_index(dataset, "train")
  # Tag each example with its record id through the frame index + video.
  global_b = _all_batches(index, _TaggingSampler(), 3, global_batch=8, seed=3)
  parts = [_all_batches(index, _TaggingSampler(), 3, global_batch=8, seed=3,
                        process_index=p, process_count=2) for p in range(2)]
  for s in range(3):
    g = global_b[s]["rid"]
    p0, p1 = parts[0][s]["rid"], parts[1][s]["rid"]
    assert len(p0) == len(p1) == 4
    assert not set(p0) & set(p1)
    np.testing.assert_array_equal(np.concatenate([p0, p1]), g)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_position_is_the_same_global_batch_on_any_number_of_processes(dataset, num_workers):
  """make_dataset(start=k) (a resumed run): global batch k and on, across an epoch's end,
  whatever the number of processes and grain workers."""
  index = ip.load_index(dataset, "train")     # 24 records: 3 global batches of 8 an epoch
  whole = _all_batches(index, _TaggingSampler(), 6, global_batch=8, seed=3)
  for count in (1, 2):
    parts = [_all_batches(index, _TaggingSampler(), 2, global_batch=8, seed=3, start=2,
                          process_index=p, process_count=count, num_workers=num_workers)
             for p in range(count)]
    for k in range(2):
      np.testing.assert_array_equal(np.concatenate([part[k]["rid"] for part in parts]),
                                    whole[2 + k]["rid"])


def test_epoch_covers_every_record_once(dataset):
  index = ip.load_index(dataset, "train")
  batches = _all_batches(index, _TaggingSampler(), 3, global_batch=8, seed=0)
  rids = np.concatenate([b["rid"] for b in batches])
  np.testing.assert_array_equal(np.sort(rids), np.arange(24))
  # The next epoch is a different permutation of the same records.
  nxt = _all_batches(index, _TaggingSampler(), 6, global_batch=8, seed=0)[3:]
  rids2 = np.concatenate([b["rid"] for b in nxt])
  np.testing.assert_array_equal(np.sort(rids2), np.arange(24))
  assert not np.array_equal(rids, rids2)


def test_iterator_state_restores_position(dataset):
  index = ip.load_index(dataset, "train")
  it = iter(ip.make_dataset(index, FrameSampler(), global_batch=4, seed=1))
  next(it)
  state = it.get_state()
  expected = [next(it)["image"] for _ in range(3)]
  fresh = iter(ip.make_dataset(index, FrameSampler(), global_batch=4, seed=1))
  fresh.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(fresh)["image"], e)


def test_worker_processes_give_the_same_batches(dataset):
  index = ip.load_index(dataset, "train")
  a = _all_batches(index, FrameSampler(), 2, global_batch=4, seed=2)
  b = _all_batches(index, FrameSampler(), 2, global_batch=4, seed=2, num_workers=2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_incomplete_dataset_is_an_error(tmp_path):
  d = fixtures.write_dataset(str(tmp_path), num_videos=2, frames=2, num_shards=2)
  os.remove(os.path.join(d, "dataset_info.json"))
  with pytest.raises(ip.DatasetError, match="no dataset_info.json"):
    ip.load_index(d, "train")


def test_missing_shard_and_split_are_errors(tmp_path):
  d = fixtures.write_dataset(str(tmp_path), num_videos=2, frames=2, num_shards=2)
  with pytest.raises(ip.DatasetError, match=r"no shards for split 'test'.*\['train'\]"):
    ip.load_index(d, "test")
  os.remove(os.path.join(d, "tiny-train.tfrecord-00001-of-00002"))
  with pytest.raises(ip.DatasetError, match="expects 2 shards, found \\[0\\]"):
    ip.load_index(d, "train", cache=False)


def test_truncated_shard_is_an_error(tmp_path):
  d = fixtures.write_dataset(str(tmp_path), num_videos=2, frames=2, num_shards=1)
  shard = os.path.join(d, "tiny-train.tfrecord-00000-of-00001")
  size = os.path.getsize(shard)
  with open(shard, "r+b") as f:
    f.truncate(size - 10)
  with pytest.raises(ip.DatasetError, match="tiny-train.tfrecord-00000-of-00001: truncated"):
    ip.load_index(d, "train", cache=False)


def test_frame_sampler_rejects_clip_shards(tmp_path):
  d = fixtures.write_dataset(str(tmp_path), num_videos=2, frames=4, num_shards=1, clip_len=2)
  index = ip.load_index(d, "train")
  assert set(index.num_frames) == {2}
  with pytest.raises(ip.DatasetError, match="needs frame-mode shards"):
    ip.make_dataset(index, FrameSampler(), global_batch=2, seed=0)


def test_too_few_records_for_a_batch_is_an_error(dataset):
  index = ip.load_index(dataset, "train")
  with pytest.raises(ip.DatasetError, match="no full global batch of 32"):
    ip.make_dataset(index, FrameSampler(), global_batch=32, seed=0)


class _TaggingSampler(FrameSampler):
  """FrameSampler whose examples carry their record id (video * 4 + frame in the fixture)."""

  def plan(self, index, rng, global_batch):
    self._index = index
    return super().plan(index, rng, global_batch)

  def assemble(self, records):
    (r,) = records
    v = int(r["video_id"][-3:])
    return {"rid": np.int64(v * 4 + int(r["frame_indices"][0]))}


def test_reads_data_prep_output_like_tf_data(tmp_path):
  """synthetic videos -> data_prep.build -> this reader: every record, labels, pixels."""
  import csv  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from data_prep import build, synthetic  # pylint: disable=g-import-not-at-top
  raw = str(tmp_path / "raw")
  manifest = synthetic.generate(raw, num_patients=3, videos_per_patient=1, frames=4, size=64)
  report = build(manifest, str(tmp_path / "out"), size=(32, 32), splits="train=1.0",
                 frame_labels=os.path.join(raw, "frame_labels.csv"), num_workers=0,
                 progress=False)
  index = ip.load_index(report["dataset_dir"], "train")
  assert index.num_records == report["counts"]["records"] == 12
  assert index.num_videos == 3
  names = index.metadata["label_names"]
  with open(manifest) as f:
    labels = {r["video_id"]: r["label"] for r in csv.DictReader(f)}
  with open(os.path.join(raw, "frame_labels.csv")) as f:
    coarse = {(r["video_id"], int(r["frame_index"])): r["anatomy_coarse"]
              for r in csv.DictReader(f)}
  coarse_names = index.metadata["anatomy_coarse_names"]
  for i in range(index.num_records):
    vid = index.video_ids[index.video[i]]
    assert names[index.label[i]] == labels[vid]
    want = coarse.get((vid, int(index.frame_index[i])))
    got = index.anatomy_coarse[i]
    assert (got == -1) if want is None else (coarse_names[got] == want)
  # Pixels equal what tf.data + tf.io decode from the same shards; tf.data reads in file order,
  # the index holds its rows in canonical order, so pair them through (file, offset).
  file_order = np.lexsort((index.offset, index.file_id))
  ds = tf.data.TFRecordDataset(list(index.files))
  n = 0
  for i, raw_rec in zip(file_order, ds):
    ex = tf.io.parse_single_example(raw_rec, {"frames": tf.io.VarLenFeature(tf.string)})
    png = tf.sparse.to_dense(ex["frames"])[0]
    np.testing.assert_array_equal(tf.io.decode_png(png).numpy(),
                                  ip.read_record(index, i)["frames"][0])
    n += 1
  assert n == index.num_records


def test_index_order_does_not_depend_on_shard_order(tmp_path):
  """The same records written in another order (as data_prep's workers may) give the same index
  rows, ids and plans: a seeded run sees the same batches whatever order the build wrote."""
  a = fixtures.write_dataset(str(tmp_path / "a"), num_videos=6, frames=3, num_shards=2)
  b = fixtures.write_dataset(str(tmp_path / "b"), num_videos=6, frames=3, num_shards=3)
  ia, ib = ip.load_index(a, "train"), ip.load_index(b, "train")
  assert ia.video_ids == ib.video_ids == tuple(sorted(ia.video_ids))
  assert ia.patients == ib.patients
  assert not np.array_equal(ia.file_id, ib.file_id)   # different physical layout
  for k in ("video", "patient", "frame_index", "label", "anatomy_fine"):
    np.testing.assert_array_equal(getattr(ia, k), getattr(ib, k))
  keys = [(ia.video_ids[v], f) for v, f in zip(ia.video, ia.frame_index)]
  assert keys == sorted(keys)
  for i in range(ia.num_records):
    np.testing.assert_array_equal(ip.read_record(ia, i)["frames"], ip.read_record(ib, i)["frames"])
  plan = FrameSampler().plan
  np.testing.assert_array_equal(plan(ia, np.random.default_rng(0), 4),
                                plan(ib, np.random.default_rng(0), 4))


def _features(example) -> dict:
  """{key: (kind, list of values)} of a parsed tf.train.Example."""
  out = {}
  for k, f in example.features.feature.items():
    kind = f.WhichOneof("kind")
    out[k] = (kind, list(getattr(f, kind).value) if kind else [])
  return out


def test_example_parser_equals_tensorflows(dataset):
  """Our tf.train.Example class (protobuf, built from the schema without tensorflow) parses
  every record as tensorflow's own does: the same keys, kinds and values, float32 included."""
  from tensorflow.core.example import example_pb2, feature_pb2  # pylint: disable=g-import-not-at-top
  index = ip.load_index(dataset, "train")
  for i in range(index.num_records):
    with open(index.files[index.file_id[i]], "rb") as f:
      f.seek(int(index.offset[i]))
      data = f.read(int(index.length[i]))
    ours, theirs = ip._example_cls().FromString(data), example_pb2.Example.FromString(data)
    assert _features(ours) == _features(theirs)
  # All three kinds, negative and 64-bit ints, and an empty feature.
  ex = example_pb2.Example()
  ex.features.feature["b"].bytes_list.value.extend([b"\x00\xff", b""])
  ex.features.feature["f"].float_list.value.extend([0.1, -3e38, float("inf")])
  ex.features.feature["i"].int64_list.value.extend([-1, 2**62, 0])
  ex.features.feature["e"].CopyFrom(feature_pb2.Feature())
  data = ex.SerializeToString()
  assert _features(ip._example_cls().FromString(data)) == _features(ex)
  assert ip._example_cls().FromString(data).SerializeToString(deterministic=True) == (
      ex.SerializeToString(deterministic=True))


def test_reading_records_does_not_import_tensorflow(dataset):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  script = ("import sys; from ssl_us import input_pipeline as ip, train\n"
            "index = ip.load_index(sys.argv[1], 'train')\n"
            "r = ip.read_record(index, 0); assert r['frames'].dtype.name == 'uint8'\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", script, dataset], cwd=root, capture_output=True,
                       text=True, timeout=300, check=True)
  assert out.stdout.strip() == "[]", out.stdout


@pytest.fixture(scope="module")
def png_and_raw(tmp_path_factory):
  """The same synthetic videos built by data_prep with PNG frames and with raw frames."""
  from data_prep import build, synthetic  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("enc")
  manifest = synthetic.generate(str(root / "raw_videos"), num_patients=3, videos_per_patient=2,
                                frames=4, size=64)
  out = {}
  for enc in ("png", "raw"):
    report = build(manifest, str(root / enc), size=(24, 32), splits="train=1.0", seed=0,
                   salt="s", num_workers=0, progress=False, frame_encoding=enc)
    out[enc] = report["dataset_dir"]
  return out


def test_raw_frames_read_back_equal_to_png_frames(png_and_raw):
  """--frame_encoding raw: the same records, pixels and batches as PNG; bigger shards; tfds
  reads it back through its own features.json."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  png, raw = (ip.load_index(png_and_raw[e], "train") for e in ("png", "raw"))
  assert raw.metadata["frame_encoding"] == "raw" and png.metadata["frame_encoding"] == "png"
  assert raw.num_records == png.num_records == 24 and raw.video_ids == png.video_ids
  for i in range(raw.num_records):
    a, b = ip.read_record(png, i), ip.read_record(raw, i)
    assert b["frames"].shape == (1, 24, 32, 1) and b["frames"].dtype == np.uint8
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  sizes = {e: sum(os.path.getsize(f) for f in ix.files) for e, ix in (("png", png),
                                                                      ("raw", raw))}
  assert sizes["raw"] > 24 * 24 * 32 > sizes["png"] / 2  # every raw frame is H*W bytes
  # One global batch through grain: identical.
  batches = [next(iter(ip.make_dataset(ix, FrameSampler(), global_batch=8, seed=3)))
             for ix in (png, raw)]
  for k in batches[0]:
    np.testing.assert_array_equal(batches[0][k], batches[1][k], err_msg=k)
  # tfds decodes the raw frames by the features.json data_prep wrote.
  ds = tfds.builder_from_directory(png_and_raw["raw"]).as_dataset(split="train")
  got = {(r["video_id"].decode(), int(r["frame_indices"][0])): r["frames"][0]
         for r in ds.as_numpy_iterator()}
  assert len(got) == raw.num_records
  for i in range(raw.num_records):
    key = (raw.video_ids[raw.video[i]], int(raw.frame_index[i]))
    np.testing.assert_array_equal(got[key], ip.read_record(raw, i)["frames"][0])


def test_raw_frames_of_the_wrong_size_name_the_record_and_the_metadata(png_and_raw, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  ddir = str(tmp_path / "raw")
  shutil.copytree(png_and_raw["raw"], ddir)
  meta_path = os.path.join(ddir, "metadata.json")
  with open(meta_path) as f:
    meta = json.load(f)
  meta["image_size"] = [24, 31]
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  index = ip.load_index(ddir, "train", cache=False)
  with pytest.raises(ip.DatasetError, match=r"tfrecord-\d+-of-\d+@\d+: a raw frame of 768 "
                     r"bytes, but metadata.json's image_size 24x31 needs 744"):
    ip.read_record(index, 0)
  meta["frame_encoding"] = "jpeg"
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  with pytest.raises(ip.DatasetError, match=r"metadata.json: frame_encoding 'jpeg' is not one"):
    ip.read_record(ip.load_index(ddir, "train", cache=False), 0)


def _flip_bit(path, byte, bit=3):
  with open(path, "r+b") as f:
    f.seek(byte)
    b = f.read(1)[0]
    f.seek(byte)
    f.write(bytes([b ^ (1 << bit)]))


def test_a_flipped_bit_in_a_record_is_found_not_trained_on(png_and_raw, tmp_path):
  """A raw frame's bit flipped on disk parses as a valid record with another pixel: the record's
  CRC finds it, when indexing and when a cached index (same file sizes) reads it."""
  import shutil  # pylint: disable=g-import-not-at-top
  ddir = str(tmp_path / "raw")
  shutil.copytree(png_and_raw["raw"], ddir)
  index = ip.load_index(ddir, "train")  # cached, keyed by the shards' sizes
  i = 5
  path, off, n = index.files[index.file_id[i]], int(index.offset[i]), int(index.length[i])
  before = ip.read_record(index, i)
  with open(path, "rb") as f:
    f.seek(off)
    pixel = off + f.read(n).index(before["frames"].tobytes()) + 100  # a byte of the frame
  _flip_bit(path, pixel)
  with open(path, "rb") as f:
    f.seek(off)
    damaged = ip.parse_example(f.read(n), **ip.frame_format(index))
  assert (damaged["frames"] != before["frames"]).sum() == 1  # valid, and wrong
  message = f"{path}: the record at byte {off} does not match its CRC"
  with pytest.raises(ip.DatasetError, match=re.escape(message)):
    ip.read_record(ip.load_index(ddir, "train"), i)
  with pytest.raises(ip.DatasetError, match=re.escape(message)):
    ip.load_index(ddir, "train", cache=False)
  _flip_bit(path, pixel)
  np.testing.assert_array_equal(ip.read_record(index, i)["frames"], before["frames"])


def test_a_damaged_record_header_is_named(dataset, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  ddir = str(tmp_path / "d")
  shutil.copytree(dataset, ddir)
  index = ip.load_index(ddir, "train", cache=False)
  path, off = index.files[0], int(index.offset[index.file_id == 0].max())  # its last record
  _flip_bit(path, off - 12 + 1)  # the second byte of its length
  with pytest.raises(ip.DatasetError, match=re.escape(
      f"{path}: the record header at byte {off - 12} does not match its CRC")):
    ip.load_index(ddir, "train", cache=False)


def test_a_shard_cut_at_a_record_boundary_is_incomplete(png_and_raw, tmp_path):
  """One record short, the shard still parses; dataset_info.json's shard lengths find it."""
  import shutil  # pylint: disable=g-import-not-at-top
  ddir = str(tmp_path / "png")
  shutil.copytree(png_and_raw["png"], ddir)
  index = ip.load_index(ddir, "train", cache=False)
  path = index.files[0]
  count = int((index.file_id == 0).sum())
  with open(path, "r+b") as f:
    f.truncate(int(index.offset[index.file_id == 0].max()) - 12)
  with pytest.raises(ip.DatasetError, match=re.escape(
      f"{path}: {count - 1} records, dataset_info.json says {count}")):
    ip.load_index(ddir, "train")


def test_the_dataset_check_command(png_and_raw, tmp_path, capsys):
  """python -m ssl_us.input_pipeline DIR: every split as written (0), else the damage named (1)."""
  import shutil  # pylint: disable=g-import-not-at-top
  ddir = str(tmp_path / "png")
  shutil.copytree(png_and_raw["png"], ddir)
  shutil.rmtree(os.path.join(ddir, ".index"), ignore_errors=True)
  assert ip.main([ddir]) == 0
  assert os.listdir(os.path.join(ddir, ".index")) == ["train.npz"]   # training reads it
  out = capsys.readouterr().out.splitlines()
  assert out == [f"train: 1 shards, 24 records of 6 videos, "
                 f"{os.path.getsize(ip.load_index(ddir, 'train').files[0]):,} bytes, as written",
                 f"{ddir}: 1 splits as written"]
  index = ip.load_index(ddir, "train")
  _flip_bit(index.files[0], int(index.offset[3]) + 5)
  assert ip.main([ddir]) == 1
  out = capsys.readouterr().out.splitlines()
  assert out == [f"train: {index.files[0]}: the record at byte {int(index.offset[3])} does not "
                 "match its CRC: the shard was damaged after data_prep wrote it (disk, copy); "
                 "copy it again or rebuild the dataset", f"{ddir}: 0 splits as written, 1 damaged"]
  os.remove(os.path.join(ddir, "dataset_info.json"))
  assert ip.main([ddir]) == 1
  assert "no dataset_info.json" in capsys.readouterr().out
