"""data_prep: ultrasound videos (folder or manifest) -> TFRecord shards; see data_prep/cli.py.

``build(input, output, **options) -> report dict`` is the Python API (imported lazily, so that
``from data_prep import schema`` stays light); ``require_complete(dataset_dir)`` checks that a
dataset directory is finished.
"""


def build(input, output, **options):  # pylint: disable=redefined-builtin
  """See data_prep.pipeline.build."""
  from data_prep import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.build(input, output, **options)


def require_complete(dataset_dir: str) -> str:
  """See data_prep.dataset.require_complete."""
  from data_prep import dataset  # pylint: disable=g-import-not-at-top
  return dataset.require_complete(dataset_dir)
