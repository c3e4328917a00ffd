"""The finished dataset directory: TFDS metadata files, written so that completion is atomic.

``<output>/<name>/<version>/`` holds the shards (``<name>-<split>.tfrecord-00000-of-00004``),
``features.json`` (tfds's own, from ``schema.tfds_features``), ``metadata.json`` (a tfds
MetadataDict: label_names, anatomy_coarse_names, anatomy_fine_names, mode, image_size,
clip_len, args) and, written last through a temporary name, ``dataset_info.json`` with the
splits and their shard lengths. A directory without dataset_info.json is not finished:
``require_complete`` says so clearly; ``tfds.builder_from_directory`` opens a finished one.
"""
from __future__ import annotations

import os
import shutil

DATASET_INFO = "dataset_info.json"


class IncompleteDatasetError(ValueError):
  """A dataset directory whose build has not finished."""


def shard_name(name: str, split: str, index: int, count: int) -> str:
  """The TFDS shard file name."""
  return f"{name}-{split}.tfrecord-{index:05d}-of-{count:05d}"


def require_complete(dataset_dir: str) -> str:
  """dataset_dir if its build finished; IncompleteDatasetError naming it and the fix if not."""
  if not os.path.isdir(dataset_dir):
    raise IncompleteDatasetError(f"{dataset_dir}: no such dataset directory")
  if not os.path.isfile(os.path.join(dataset_dir, DATASET_INFO)):
    raise IncompleteDatasetError(
        f"{dataset_dir}: incomplete dataset (no {DATASET_INFO}): data_prep was interrupted or is "
        "still running; re-run the same data_prep command to finish it")
  return dataset_dir


def write_metadata(dataset_dir: str, staging_dir: str, *, name: str, version: str,
                   image_size: tuple[int, int], frame_encoding: str = "png",
                   splits: dict[str, tuple[list[int], int]],
                   metadata: dict, description: str) -> None:
  """Write features.json, metadata.json and, last, dataset_info.json into dataset_dir.

  ``splits``: split -> (records per shard, total bytes); the shards must already be in place
  under their final names. tfds writes the files into ``staging_dir`` first; they are then
  moved in, dataset_info.json last, each move a rename.
  """
  import tensorflow_datasets as tfds  # heavy import, only where needed
  from etils import epath
  from tensorflow_datasets.core import dataset_info as info_lib
  from tensorflow_datasets.core import file_adapters, naming, splits as split_lib, utils

  from data_prep import schema

  identity = info_lib.DatasetIdentity(name=name, version=utils.Version(version),
                                      data_dir=dataset_dir, module_name="")
  info = info_lib.DatasetInfo(builder=identity, description=description,
                              features=schema.tfds_features(*image_size, frame_encoding),
                              metadata=tfds.core.MetadataDict(metadata))
  info.set_file_format(file_adapters.FileFormat.TFRECORD)
  template = naming.ShardedFileTemplate(
      data_dir=epath.Path(dataset_dir), template=naming.DEFAULT_FILENAME_TEMPLATE,
      dataset_name=name, filetype_suffix="tfrecord")
  info.set_splits(split_lib.SplitDict([
      split_lib.SplitInfo(name=split, shard_lengths=list(lengths), num_bytes=nbytes,
                          filename_template=template.replace(split=split))
      for split, (lengths, nbytes) in splits.items()]))
  if os.path.isdir(staging_dir):
    shutil.rmtree(staging_dir)
  os.makedirs(staging_dir)
  info.write_to_directory(staging_dir)
  names = sorted(os.listdir(staging_dir), key=lambda f: f == DATASET_INFO)
  for f in names:
    os.replace(os.path.join(staging_dir, f), os.path.join(dataset_dir, f))
  os.rmdir(staging_dir)
