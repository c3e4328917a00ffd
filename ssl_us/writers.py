"""The training loop's metric writer: clu's, or TensorBoard's own where tensorflow is absent.

clu's default writer logs every scalar and writes TensorBoard summaries through
``tf.summary``; its package (``clu.metric_writers``) imports tensorflow on import. Training
otherwise needs no tensorflow (records are parsed with protobuf alone), so on a GPU or TPU
host image without the 600 MB wheel ``create_writer`` falls back to ``TensorBoardWriter``:
the same scalars and hyperparameters, to event files written by the ``tensorboard`` package's
framework-free ``EventFileWriter`` (the one PyTorch's SummaryWriter uses), and the same log
lines. TensorBoard and ``sweep.read_scalars`` read both alike.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Mapping

_logged_choice = False


def create_writer(logdir: str, *, just_logging: bool = False):
  """clu's asynchronous default writer (console log + TensorBoard) where tensorflow can be
  imported, else ``TensorBoardWriter``; ``just_logging`` (processes other than the first):
  the log lines only."""
  global _logged_choice
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    if getattr(e, "name", None) != "tensorflow":
      raise
    if not _logged_choice:
      logging.warning("metrics: tensorflow is not installed, so clu's summary writer cannot be "
                      "imported; writing TensorBoard events with tensorboard's EventFileWriter")
      _logged_choice = True
    return TensorBoardWriter(None if just_logging else logdir)
  return metric_writers.create_default_writer(logdir, just_logging=just_logging,
                                              asynchronous=True)


class TensorBoardWriter:
  """The part of clu's MetricWriter that training uses (scalars, hparams, flush, close),
  without tensorflow: scalars as TensorBoard ``simple_value`` events, hyperparameters as the
  HParams plugin's summary, each scalar line logged as clu's LoggingWriter does. With
  ``logdir`` None it only logs."""

  def __init__(self, logdir: str | None):
    self._events = None
    if logdir is not None:
      from tensorboard.summary.writer import event_file_writer  # pylint: disable=g-import-not-at-top
      self._events = event_file_writer.EventFileWriter(logdir)

  def _add(self, step: int, summary):
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}"
                                            for k, v in sorted(scalars.items())))
    if self._events is not None:
      from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
      self._add(step, summary_pb2.Summary(value=[
          summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]))

  def write_hparams(self, hparams: Mapping[str, Any]):
    logging.info("[Hyperparameters] %s", hparams)
    if self._events is not None:
      from tensorboard.plugins.hparams import summary_v2  # pylint: disable=g-import-not-at-top
      self._add(0, summary_v2.hparams_pb(dict(hparams)))

  def flush(self):
    if self._events is not None:
      self._events.flush()

  def close(self):
    if self._events is not None:
      self._events.close()
