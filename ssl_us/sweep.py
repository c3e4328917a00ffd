r"""Sweeps: a grid of config overrides, one pretraining run per point, one evaluation for all.

  python -m ssl_us.sweep --config configs/simclr_muscle.py:runlocal --workdir W \
      --set config.data.dir=DIR [--grid config.loss.temperature=0.1,0.5 \
      --grid config.batch_size=64,128] [--seeds 3] [--only NAME] [--emit commands | --aggregate]

Grid: the config's ``get_sweep(hyper)`` (big_vision style: ``hyper.sweep``, ``product``,
``chainit``, ``zipit``, ``fixed``), or the product of the ``--grid`` flags, times
``config.seed=0..N-1`` with ``--seeds N``; ``--set`` applies to every point. Keys are written
``config.a.b`` as in the configs' sweeps. Every point gets its own workdir ``W/<name>``, named
from its overrides (``loss.temperature=0.1,batch_size=64``), which is a normal pretraining
workdir (config.json, checkpoints, logs) plus ``sweep_point.json``: status (running, done,
failed, stopped), overrides, metrics, error, and the command that reproduces it. The learning
rate follows the batch through ``optim.lr_scaling`` as in a single run.

Before anything runs, every point is checked: a key the config lacks, a value that does not fit
the field's type, or a config ``train.validate_config`` refuses (a batch that does not divide
over the devices) is an error naming the point.

Points run one after the other in this process, or ``--parallel K`` at once, each in its own
process (its ``--only`` command) on a disjoint 1/K of the local GPUs or CPU devices. Re-running
the same command skips the finished points (``finished_point``: finished under this config) and
resumes an interrupted one from its checkpoints; a point that fails is recorded with its error
and the sweep goes on; SIGTERM/SIGINT stops the current point with a checkpoint (see
``train.StopSignal``) and the sweep with it. For a cluster, ``--emit commands`` prints one
self-contained command per point (the same command with ``--only NAME``; given
``--multihost`` and its flags but ``--process_id``, each command carries them for its job's
processes to join), and ``--aggregate`` builds the report from whatever point workdirs exist.
With ``--multihost`` (as ``ssl_us.main``'s) every point runs on all processes' devices: each
process evaluates it alike, process 0 writes the records and the report, and the processes
agree on each point's status. An error that only one process meets inside a point (a host's
disk, memory) can leave the others waiting in the point's collectives; the jobs of
``--emit commands`` run ``ssl_us.main``, whose ``parallel.fail_fast`` ends them all.

Evaluation of every point, after its pretraining, on ``--eval_split`` of the config's dataset
(records with a label, at most ``--eval_max``, the first frame or clip of each): kNN accuracy
(k = 20, cosine) and a linear probe (``demo.linear_probe``), each over 5 patient-grouped folds;
the alignment and uniformity of the normalised projections of two augmented views (Wang and
Isola, 2020); and the run's final loss, contrastive accuracy and views/s.

Report: ``W/sweep.csv`` and ``W/sweep.md`` (every point, its overrides, every metric, status and
command), a heatmap PNG per metric over the first two swept keys (a line plot for one key) with
the best point marked, and ``W/loss_curves.png`` with every point's loss. Where config.seed is
swept beside other keys, the seeds are replicates: ``W/sweep_seeds.csv`` and ``.md`` give every
other setting's mean and sample standard deviation over its finished seeds, and the plots show
that mean (best point by the mean) with the deviation. Keys beyond the two plotted show, per
cell, their best value.
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import functools
import io
import itertools
import json
import math
import os
import shlex
import sys
import time
import traceback
from typing import Any, Sequence

import ml_collections
import numpy as np

from data_prep import files as files_lib

POINT_FILE = "sweep_point.json"
# Metrics of the report; True: higher is better.
METRICS = {"knn_acc": True, "probe_acc": True, "alignment": False, "uniformity": False,
           "final_loss": False, "final_contrastive_acc": True, "views_per_sec": True,
           "mfu": True}   # mfu: on chips with a known bf16 peak (ssl_us/flops.py), else blank
# Replicates: points that differ only in this key are summarised by mean and std over it.
SEED_KEY = "config.seed"


class SweepError(ValueError):
  """A grid that cannot run; the message names the point and the key."""


# ----------------------------------------------------------------------------------------------
# Grids: the configs' get_sweep(hyper), or --grid flags.


class hyper:  # pylint: disable=invalid-name  (the name the configs' get_sweep(hyper) use)
  """Lists of override dicts, composed as big_vision configs compose them."""

  @staticmethod
  def sweep(key: str, values) -> list[dict]:
    return [{key: v} for v in values]

  @staticmethod
  def fixed(key: str, value) -> list[dict]:
    return [{key: value}]

  @staticmethod
  def product(sweeps: Sequence[list[dict]]) -> list[dict]:
    out = [{}]
    for s in sweeps:
      out = [{**a, **b} for a in out for b in s]
    return out

  @staticmethod
  def chainit(sweeps: Sequence[list[dict]]) -> list[dict]:
    return [p for s in sweeps for p in s]

  @staticmethod
  def zipit(sweeps: Sequence[list[dict]]) -> list[dict]:
    lengths = {len(s) for s in sweeps}
    if len(lengths) > 1:
      raise SweepError(f"hyper.zipit needs sweeps of one length, got {sorted(lengths)}")
    return [dict(itertools.chain.from_iterable(d.items() for d in ds)) for ds in zip(*sweeps)]


def _split_top_level(text: str) -> list[str]:
  """'0.1,(1, 2),x' -> ['0.1', '(1, 2)', 'x']: commas outside brackets and quotes."""
  parts, depth, quote, cur = [], 0, None, []
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append("".join(cur))
      cur = []
      continue
    cur.append(ch)
  parts.append("".join(cur))
  return [p.strip() for p in parts]


def parse_value(text: str):
  """A Python literal if it is one ('0.1', '64', 'True', '(64, 64)'), else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_assignment(arg: str, flag: str) -> tuple[str, list]:
  """'config.a.b=v1,v2' -> ('config.a.b', [v1, v2])."""
  key, sep, values = arg.partition("=")
  if not sep or not key.strip() or not values.strip():
    raise SweepError(f"{flag} {arg!r}: expected config.KEY=VALUE[,VALUE...]")
  return key.strip(), [parse_value(v) for v in _split_top_level(values)]


def _key(key: str) -> str:
  return key[len("config."):] if key.startswith("config.") else key


def _fmt(value) -> str:
  """A value as it appears in point names and commands."""
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(_fmt(v) for v in value) + ")"
  return str(value)


@dataclasses.dataclass(frozen=True)
class Point:
  name: str
  overrides: dict          # config key (no 'config.' prefix) -> value


def make_points(grid: list[dict]) -> list[Point]:
  """Named points; a name is its overrides, 'key=value' joined by ','."""
  points, seen = [], set()
  for overrides in grid:
    o = {_key(k): v for k, v in overrides.items()}
    name = ",".join(f"{k}={_fmt(v)}" for k, v in o.items()) or "base"
    name = name.replace("/", "_").replace(" ", "")
    if name in seen:
      continue
    seen.add(name)
    points.append(Point(name, o))
  return points


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict,
                    point: str = "") -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``overrides`` ({'a.b': value}); clear errors naming the key."""
  c = ml_collections.ConfigDict(config.to_dict())
  where = f"point {point}: " if point else ""
  for key, value in overrides.items():
    node, parts = c, key.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise SweepError(f"{where}config has no key 'config.{'.'.join(parts[:i + 1])}' "
                         f"(from 'config.{key}')")
      if i < len(parts) - 1:
        node = node[part]
    old = node[parts[-1]]
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    if isinstance(old, tuple) and not isinstance(value, tuple):
      raise SweepError(f"{where}config.{key}={value!r} is not a tuple like {old!r}")
    try:
      node[parts[-1]] = value
    except TypeError as e:
      raise SweepError(f"{where}config.{key}={value!r} does not fit the field ({old!r}): "
                       f"{e}") from None
  return c


# ----------------------------------------------------------------------------------------------
# The sweep from the command line's pieces.


@dataclasses.dataclass
class Sweep:
  config_arg: str                  # configs/x.py[:variant], as given
  workdir: str
  base: ml_collections.ConfigDict  # with --set applied
  points: list[Point]
  sets: list[str]                  # the --set flags, as given
  grids: list[str]                 # the --grid flags, as given
  eval_split: str = "train"
  eval_max: int = 2000
  monitor_every: int = 0           # the online monitor every N steps (0: off)
  monitor_size: int = 256          # records of --eval_split it evaluates
  seeds: int = 0                   # --seeds N: every grid point run with config.seed 0..N-1
  launch: list[str] = dataclasses.field(default_factory=list)  # e.g. --multihost, for commands

  def config(self, point: Point) -> ml_collections.ConfigDict:
    return apply_overrides(self.base, point.overrides, point.name)

  def command(self, point: Point) -> str:
    """The self-contained command that runs (or resumes) this point and its evaluation."""
    args = [sys.executable, "-m", "ssl_us.sweep", "--config", self.config_arg,
            "--workdir", self.workdir]
    for s in self.sets:
      args += ["--set", s]
    for g in self.grids:
      args += ["--grid", g]
    if self.seeds:
      args += ["--seeds", str(self.seeds)]
    args += ["--eval_split", self.eval_split, "--eval_max", str(self.eval_max)]
    if self.monitor_every:
      args += ["--monitor_every", str(self.monitor_every), "--monitor_size",
               str(self.monitor_size)]
    args += self.launch + ["--only", point.name]
    return shlex.join(args)


def load_config_arg(config_arg: str) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, module) of 'path/to/config.py[:variant]'."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, variant = config_arg.partition(":")
  if not os.path.exists(path):
    raise SweepError(f"--config {config_arg}: no such file {path}")
  spec = importlib.util.spec_from_file_location(
      f"_sweep_config_{abs(hash(os.path.abspath(path)))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant or None), module


def build_sweep(config_arg: str, workdir: str, grids: Sequence[str] = (),
                sets: Sequence[str] = (), eval_split: str = "train", eval_max: int = 2000,
                monitor_every: int = 0, monitor_size: int = 256, seeds: int = 0) -> Sweep:
  """Points from --grid (a product) or the config's get_sweep, times ``seeds`` values of
  config.seed if given; --set applied to the base."""
  base, module = load_config_arg(config_arg)
  for s in sets:
    key, values = parse_assignment(s, "--set")
    if len(values) != 1:
      raise SweepError(f"--set {s!r}: one value (use --grid for several)")
    base = apply_overrides(base, {_key(key): values[0]})
  if grids:
    grid = hyper.product([hyper.sweep(*parse_assignment(g, "--grid")) for g in grids])
  elif hasattr(module, "get_sweep"):
    grid = module.get_sweep(hyper)
  else:
    raise SweepError(f"{config_arg}: no get_sweep(hyper) and no --grid flags")
  if seeds:
    if seeds < 0:
      raise SweepError(f"--seeds {seeds}: expected a positive number of seeds")
    if any(_key(k) == _key(SEED_KEY) for overrides in grid for k in overrides):
      raise SweepError(f"--seeds {seeds}: the grid already sets {SEED_KEY}; use one or the "
                       "other")
    grid = hyper.product([grid, hyper.sweep(SEED_KEY, list(range(seeds)))])
  result = Sweep(config_arg=config_arg, workdir=workdir, base=base, points=make_points(grid),
                 sets=list(sets), grids=list(grids), eval_split=eval_split, eval_max=eval_max,
                 monitor_every=monitor_every, monitor_size=monitor_size, seeds=seeds)
  for p in result.points:   # every key and value checked now, before anything runs
    result.config(p)
  return result


def check_points(sweep: Sweep, num_devices: int, num_processes: int = 1):
  """Every point's config, or a SweepError naming the first point that cannot run."""
  from ssl_us import parallel, train  # pylint: disable=g-import-not-at-top
  try:
    parallel.check_mounted_path(sweep.workdir, "--workdir")
  except ValueError as e:
    raise SweepError(str(e)) from None
  configs = {}
  for p in sweep.points:
    c = sweep.config(p)
    try:
      train.validate_config(c, c.get("num_devices") or num_devices, num_processes)
    except ValueError as e:
      raise SweepError(f"point {p.name}: {e}") from None
    configs[p.name] = c
  return configs


# ----------------------------------------------------------------------------------------------
# Point records.


def _write_json(path: str, obj):
  files_lib.write_json(path, obj)   # insertion order: overrides in the sweep's key order


def read_point(point_dir: str) -> dict | None:
  path = os.path.join(point_dir, POINT_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def finished_point(point_dir: str, config, log=print) -> dict | None:
  """The record of a point finished under ``config`` (but for how it ran: checkpoint.RUN_ONLY),
  to be skipped; None for a point to run. A point finished under another config (a re-run with
  other --set values) runs again: resumed where its checkpoints allow (more steps), else its
  run fails naming the changes (checkpoint.check_resume)."""
  from ssl_us import checkpoint  # pylint: disable=g-import-not-at-top
  done = read_point(point_dir)
  if not done or done.get("status") != "done":
    return None
  name = os.path.basename(point_dir)
  derived = ("num_steps",) if config.get("num_epochs", 0) > 0 else ()  # from the epochs
  changes = checkpoint.config_changes(point_dir, config, ignore=checkpoint.RUN_ONLY + derived)
  if changes:
    log(f"[sweep] {name}: done under another config ("
        + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()) + "), run again")
    return None
  log(f"[sweep] {name}: done, skipped")
  return done


def _record(sweep: Sweep, point: Point, status: str, **fields) -> dict:
  """The point's record, written by process 0 (every process of a multi-host sweep makes the
  same one)."""
  import jax  # pylint: disable=g-import-not-at-top
  record = json.loads(json.dumps(dict(   # as read back: lists, not tuples
      name=point.name, overrides={f"config.{k}": v for k, v in point.overrides.items()},
      status=status, command=sweep.command(point), time=time.strftime("%Y-%m-%d %H:%M:%S"),
      **fields)))
  if jax.process_index() == 0:
    wd = os.path.join(sweep.workdir, point.name)
    os.makedirs(wd, exist_ok=True)
    _write_json(os.path.join(wd, POINT_FILE), record)
  return record


# ----------------------------------------------------------------------------------------------
# Evaluation.


def evaluate_point(workdir: str, split: str = "train", max_records: int = 2000,
                   seed: int = 0) -> dict:
  """kNN and linear-probe accuracy (patient-grouped 5-fold), alignment and uniformity of one
  pretraining workdir's latest checkpoint, on the labelled records of ``split``."""
  import jax  # pylint: disable=g-import-not-at-top
  from ssl_us import checkpoint, demo  # pylint: disable=g-import-not-at-top
  from ssl_us.eval import embeddings, splits  # pylint: disable=g-import-not-at-top
  config, method, variables = checkpoint.load_variables(workdir)
  images, labels, patients = eval_set(config.data.dir, split, max_records, seed)
  if len(np.unique(labels)) < 2 or len(np.unique(patients)) < 5:
    raise ValueError(f"{config.data.dir} split {split!r}: the evaluation needs two labels and "
                     f"five patients, got {len(np.unique(labels))} and "
                     f"{len(np.unique(patients))}")
  module, enc_vars = method.encoder(variables)
  feats = checkpoint.encode(module, enc_vars, np.asarray(method.eval_view(images)))
  knn, _ = embeddings.knn_accuracy_cv(feats, labels, patients, k=20, folds=5, seed=seed)
  probe = float(np.mean([demo.linear_probe(feats[tr], labels[tr], feats[te], labels[te])
                         for tr, te in splits.group_kfold(patients, labels, 5, seed)]))
  z_a, z_b = projections_of_two_views(method, variables, images, jax.random.key(seed))
  return {"knn_acc": float(knn), "probe_acc": probe,
          "alignment": float(embeddings.alignment(z_a, z_b)),
          "uniformity": float(embeddings.uniformity(np.concatenate([z_a, z_b]))),
          "eval_records": int(len(labels))}


def eval_set(dataset_dir: str, split: str, size: int, seed: int = 0):
  """(images, labels, integer patient ids) of up to ``size`` labelled records of ``split``."""
  from ssl_us.eval import data as eval_data  # pylint: disable=g-import-not-at-top
  recs = eval_data.load_records(dataset_dir, (split,))
  keep = np.flatnonzero(recs.label >= 0)
  if len(keep) > size:
    keep = np.sort(np.random.default_rng(seed).choice(keep, size, replace=False))
  recs = recs.subset(keep)
  return recs.images, recs.label, np.unique(recs.patient, return_inverse=True)[1]


def make_monitor(method, images, labels, patients, every: int, k: int = 20, seed: int = 0):
  """train.Monitor: on a fixed small set, with the state's encoder and head (eval mode), the
  leave-patient-out kNN accuracy (k = 20, cosine) and the alignment and uniformity of two
  augmented views' projections; all on device, under one jit."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ssl_us import train  # pylint: disable=g-import-not-at-top
  from ssl_us.eval import embeddings  # pylint: disable=g-import-not-at-top
  others = min(int(np.sum(patients != p)) for p in np.unique(patients))
  k = min(k, others)
  num_classes = int(labels.max()) + 1
  x = jnp.asarray(method.eval_view(images))
  data = (jnp.asarray(images), jnp.asarray(labels), jnp.asarray(patients))
  key = jax.random.key(seed)

  @jax.jit
  def fn(state):
    raw, y, g = data
    variables = {"params": state.params, **state.variables}
    module, enc_vars = method.encoder(variables)
    h = module.apply(enc_vars, x, train=False)
    z_a, z_b = _two_view_projections(method, variables, raw, key)
    return {"monitor/knn_acc": embeddings.knn_accuracy_leave_group_out(h, y, g, k, num_classes),
            "monitor/alignment": embeddings.alignment(z_a, z_b),
            "monitor/uniformity": embeddings.uniformity(jnp.concatenate([z_a, z_b]))}
  return train.Monitor(every=every, fn=fn)


def _two_view_projections(method, variables, images, key):
  """Projections z (eval mode) of two augmented views (keys from ``key``) of uint8 images or
  clips; traceable."""
  import jax  # pylint: disable=g-import-not-at-top
  from ssl_us import augment, augment_video  # pylint: disable=g-import-not-at-top
  if images.ndim == 5:
    aug = functools.partial(augment_video.augment_video_batch, cfg=method.video_aug)
  else:
    aug = functools.partial(augment.augment_batch, cfg=method.aug)
  model_vars = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  k_a, k_b = jax.random.split(key)
  return tuple(method.model.apply(model_vars, aug(k, images), train=False)["z"]
               for k in (k_a, k_b))


def projections_of_two_views(method, variables, images, key, batch_size: int = 256):
  """_two_view_projections in batches (a key per batch), as numpy."""
  import jax  # pylint: disable=g-import-not-at-top
  fn = jax.jit(lambda xb, k: _two_view_projections(method, variables, xb, k))
  parts = [fn(images[i:i + batch_size], jax.random.fold_in(key, i))
           for i in range(0, len(images), batch_size)]
  return tuple(np.concatenate([np.asarray(p[j]) for p in parts]) for j in range(2))


def final_train_metrics(point_dir: str) -> dict:
  """The last logged loss, contrastive accuracy, views/s and MFU (where logged), and the loss
  curve, from the run's TensorBoard logs (every invocation of a resumed run)."""
  curves = read_scalars(os.path.join(point_dir, "logs"))
  out = {"steps": [s for s, _ in curves.get("loss", [])],
         "loss_curve": [v for _, v in curves.get("loss", [])]}
  for name, key in (("final_loss", "loss"), ("final_contrastive_acc", "contrastive_acc"),
                    ("views_per_sec", "views_per_sec"), ("mfu", "mfu")):
    if curves.get(key):
      out[name] = curves[key][-1][1]
  return out


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} from every TensorBoard event file in ``logdir``, by step (a step
  logged again after a resume keeps its last value)."""
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  out: dict[str, dict[int, float]] = {}
  if not os.path.isdir(logdir):
    return {}
  for name in sorted(os.listdir(logdir)):
    if "tfevents" not in name:
      continue
    for event in event_file_loader.EventFileLoader(os.path.join(logdir, name)).Load():
      for v in event.summary.value:
        if v.HasField("tensor"):
          arr = tensor_util.make_ndarray(v.tensor)
          if arr.shape != () or not np.issubdtype(arr.dtype, np.number):
            continue                                    # hparams, text: not a scalar
          value = float(arr)
        elif v.HasField("simple_value"):
          value = float(v.simple_value)
        else:
          continue
        out.setdefault(v.tag, {})[int(event.step)] = value
  return {k: sorted(d.items()) for k, d in out.items()}


# ----------------------------------------------------------------------------------------------
# Running.


def run_point(sweep: Sweep, point: Point, config, log=print) -> dict:
  """Pretrain (or resume) one point, then evaluate it; returns its record. Never raises for a
  failing point: its status is 'failed' with the error. With several processes, all must reach
  the same status (else a ValueError on every process, naming the point)."""
  from ssl_us import parallel, train  # pylint: disable=g-import-not-at-top
  wd = os.path.join(sweep.workdir, point.name)
  done = finished_point(wd, config, log)
  if done:
    return done
  _record(sweep, point, "running")
  log(f"[sweep] {point.name}: pretraining in {wd}")
  try:
    monitor = None
    if sweep.monitor_every:
      from ssl_us.methods import make_method  # pylint: disable=g-import-not-at-top
      monitor = make_monitor(make_method(config),
                             *eval_set(config.data.dir, sweep.eval_split, sweep.monitor_size),
                             every=sweep.monitor_every)
    history = train.train_and_evaluate(config, wd, monitor=monitor)
    if history.get("preempted"):
      record = _record(sweep, point, "stopped", step=history["final_step"])
    else:
      metrics = final_train_metrics(wd)
      metrics.update(evaluate_point(wd, sweep.eval_split, sweep.eval_max))
      import jax  # pylint: disable=g-import-not-at-top
      record = _record(sweep, point, "done", metrics=metrics, devices=jax.device_count())
      log(f"[sweep] {point.name}: " + ", ".join(
          f"{k} {metrics[k]:.4g}" for k in METRICS if k in metrics))
  except Exception as e:  # pylint: disable=broad-except  (the sweep goes on)
    record = _record(sweep, point, "failed", error=f"{type(e).__name__}: {e}",
                     traceback=traceback.format_exc(limit=6))
    log(f"[sweep] {point.name}: FAILED {type(e).__name__}: {e}")
  parallel.check_processes_agree({f"status of point {point.name}": record["status"]})
  return record


def run(sweep: Sweep, only: str | None = None, log=print) -> list[dict]:
  """Checks every point, then runs them in order (or ``only`` one); then the report."""
  import jax  # pylint: disable=g-import-not-at-top
  configs = check_points(sweep, jax.device_count(), jax.process_count())
  points = sweep.points
  if only is not None:
    points = [p for p in points if p.name == only]
    if not points:
      raise SweepError(f"--only {only!r} is not a point of this sweep; points: "
                       f"{[p.name for p in sweep.points]}")
  records = []
  for p in points:
    rec = run_point(sweep, p, configs[p.name], log)
    records.append(rec)
    if rec and rec.get("status") == "stopped":
      log(f"[sweep] stopped by a signal at {p.name}; run the same command to resume")
      break
  if jax.process_index() == 0:
    report(sweep.workdir, [p.name for p in sweep.points])
  return records


def local_devices() -> tuple[str, int]:
  """(platform, local device count), asked of a fresh Python so that this process does not
  initialise (and, on a GPU, reserve the memory of) any device."""
  import subprocess  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend(), "
                        "jax.local_device_count())"], capture_output=True, text=True, check=True)
  platform, count = out.stdout.split()[-2:]
  return platform, int(count)


def device_env(platform: str, devices: Sequence[int], total: int) -> dict:
  """Environment that shows a child process only ``devices`` of the ``total`` local ones."""
  env = dict(os.environ)
  if platform == "gpu":
    visible = env.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(total)]
    env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[i] for i in devices)
  elif platform == "cpu":
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count="
                                         f"{len(devices)}"])
  else:
    raise SweepError(f"--parallel on {platform!r} devices is not supported: run the points of "
                     "--emit commands as separate jobs")
  return env


def run_parallel(sweep: Sweep, parallel: int, log=print) -> list[dict]:
  """The points ``parallel`` at a time, each in a child process (its --only command) on its
  own disjoint share of the local devices; then the report."""
  import subprocess  # pylint: disable=g-import-not-at-top
  platform, total = local_devices()
  if not 1 <= parallel <= total or total % parallel:
    raise SweepError(f"--parallel {parallel} does not split {total} local {platform} devices "
                     "into equal shares")
  per = total // parallel
  check_points(sweep, per)
  queue = list(sweep.points)
  running: dict[int, tuple[Point, Any]] = {}
  records = {}
  while queue or running:
    for slot in range(parallel):
      if slot not in running and queue:
        point = queue.pop(0)
        done = finished_point(os.path.join(sweep.workdir, point.name), sweep.config(point), log)
        if done:
          records[point.name] = done
          continue
        devices = list(range(slot * per, (slot + 1) * per))
        log(f"[sweep] {point.name}: on {platform} devices {devices}")
        running[slot] = (point, subprocess.Popen(
            shlex.split(sweep.command(point)), env=device_env(platform, devices, total),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for slot, (point, proc) in list(running.items()):
      if proc.poll() is None:
        continue
      del running[slot]
      err = proc.stderr.read()
      rec = read_point(os.path.join(sweep.workdir, point.name))
      if proc.returncode not in (0, 1) or rec is None or rec.get("status") == "running":
        _record(sweep, point, "failed", error=f"the point's process ended with exit code "
                f"{proc.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}")
        rec = read_point(os.path.join(sweep.workdir, point.name))
      records[point.name] = rec
      log(f"[sweep] {point.name}: {rec.get('status')}")
    time.sleep(0.5)
  report(sweep.workdir, [p.name for p in sweep.points])
  return [records[p.name] for p in sweep.points]


# ----------------------------------------------------------------------------------------------
# Report.


def collect(workdir: str, names: Sequence[str] | None = None) -> list[dict]:
  """The point records under ``workdir`` (in ``names`` order if given; missing ones as
  'pending'), each with its train metrics re-read from the logs when it has no metrics yet."""
  if names is None:
    names = sorted(d for d in os.listdir(workdir)
                   if os.path.exists(os.path.join(workdir, d, POINT_FILE)))
  out = []
  for name in names:
    rec = read_point(os.path.join(workdir, name)) or {"name": name, "status": "pending",
                                                      "overrides": {}}
    out.append(rec)
  return out


def report(workdir: str, names: Sequence[str] | None = None) -> list[dict]:
  """W/sweep.csv, W/sweep.md, a PNG per metric and W/loss_curves.png; returns the rows.

  When config.seed is swept with other keys, also W/sweep_seeds.csv and .md (``over_seeds``),
  and the metric plots show the mean over seeds with its standard deviation."""
  records = collect(workdir, names)
  keys = []
  for r in records:
    for k in r.get("overrides", {}):
      if k not in keys:
        keys.append(k)
  rows = []
  for r in records:
    m = r.get("metrics", {})
    row = {"name": r["name"], "status": r["status"]}
    row.update({k: r.get("overrides", {}).get(k, "") for k in keys})
    row.update({k: m.get(k, "") for k in METRICS})
    row["error"] = r.get("error", "")
    row["command"] = r.get("command", "")
    rows.append(row)
  fields = ["name", "status", *keys, *METRICS, "error", "command"]
  _write_csv(os.path.join(workdir, "sweep.csv"), fields, rows)
  _write_md(os.path.join(workdir, "sweep.md"), fields, rows, METRICS)
  swept = [k for k in keys if len({_fmt(r[k]) for r in rows}) > 1]
  plot_rows, plot_keys, suffix = rows, swept, ""
  if SEED_KEY in swept and len(swept) > 1:
    others = [k for k in keys if k != SEED_KEY]
    plot_keys = [k for k in swept if k != SEED_KEY]
    plot_rows = over_seeds(rows, others)
    suffix = "_mean"
    stats = [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    sfields = [*others, "seeds", *stats]
    _write_csv(os.path.join(workdir, "sweep_seeds.csv"), sfields, plot_rows)
    _write_md(os.path.join(workdir, "sweep_seeds.md"), sfields, plot_rows, stats)
  for metric, higher in METRICS.items():
    path = os.path.join(workdir, f"sweep_{metric}.png")
    _plot_metric(plot_rows, plot_keys, metric + suffix, higher, path)
  _plot_losses(records, os.path.join(workdir, "loss_curves.png"))
  return rows


def _number(v) -> float:
  return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def over_seeds(rows: list[dict], keys: Sequence[str]) -> list[dict]:
  """One row per setting of ``keys`` (the overrides other than config.seed), in order of first
  appearance: ``seeds`` ('done/all' points of that setting) and, for every metric, the mean and
  the sample standard deviation (n - 1) of its finite values over the done points ('' where
  there are none, and a std only from two values on)."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault(tuple(_fmt(r[k]) for k in keys), []).append(r)
  out = []
  for members in groups.values():
    done = [r for r in members if r["status"] == "done"]
    row = {k: members[0][k] for k in keys}
    row["seeds"] = f"{len(done)}/{len(members)}"
    for metric in METRICS:
      values = [v for v in (_number(r[metric]) for r in done) if math.isfinite(v)]
      row[f"{metric}_mean"] = float(np.mean(values)) if values else ""
      row[f"{metric}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else ""
    out.append(row)
  return out


def _write_csv(path, fields, rows):
  out = io.StringIO()
  w = csv.DictWriter(out, fieldnames=fields)
  w.writeheader()
  for r in rows:
    w.writerow({k: _fmt(v) if isinstance(v, (tuple, list)) else v for k, v in r.items()})
  files_lib.write_text(path, out.getvalue(), newline="")


def _cell(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(_fmt(v) if isinstance(v, (tuple, list)) else v).replace("|", "\\|")


def _write_md(path, fields, rows, numeric):
  lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
  for r in rows:
    cells = [f"`{r[k]}`" if k == "command" and r[k] else
             _cell(r[k]) if k in numeric else _cell(_fmt(r[k])) for k in fields]
    lines.append("| " + " | ".join(cells) + " |")
  files_lib.write_text(path, "\n".join(lines) + "\n")


def _best(values, higher):
  finite = [(v, i) for i, v in enumerate(values) if isinstance(v, float) and math.isfinite(v)]
  if not finite:
    return None
  return (max if higher else min)(finite, key=lambda t: t[0])[1]   # ties: the first point


def _plot_metric(rows, swept, metric, higher, path) -> bool:
  """Heatmap over the first two swept keys (line plot for one); best point marked.

  ``metric`` is a column of ``rows``; for 'X_mean' (``over_seeds`` rows) the column 'X_std'
  gives error bars, and the heatmap cells read mean and +- std."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  values = [_number(r[metric]) for r in rows]
  if not swept or all(math.isnan(v) for v in values):
    return False
  name, replicated = metric.removesuffix("_mean"), metric.endswith("_mean")
  errors = [_number(r[f"{name}_std"]) if replicated else float("nan") for r in rows]
  best = _best(values, higher)
  fig, ax = plt.subplots(figsize=(6, 4.5))
  if len(swept) == 1:
    k = swept[0]
    xs = [_fmt(r[k]) for r in rows]
    ax.errorbar(range(len(xs)), values, yerr=np.nan_to_num(errors), fmt="o-", capsize=4)
    ax.set_xticks(range(len(xs)), xs)
    ax.set_xlabel(k)
    ax.set_ylabel(metric)
    if best is not None:
      ax.plot([best], [values[best]], "r*", markersize=16, label="best")
      ax.legend()
  else:
    kx, ky = swept[0], swept[1]
    xs = list(dict.fromkeys(_fmt(r[kx]) for r in rows))
    ys = list(dict.fromkeys(_fmt(r[ky]) for r in rows))
    grid = np.full((len(ys), len(xs)), np.nan)
    err = np.full_like(grid, np.nan)
    for r, v, e in zip(rows, values, errors):
      yi, xi = ys.index(_fmt(r[ky])), xs.index(_fmt(r[kx]))
      if math.isnan(grid[yi, xi]) or (v > grid[yi, xi]) == higher:  # other keys: best of them
        grid[yi, xi], err[yi, xi] = v, e
    im = ax.imshow(grid, cmap="viridis" if higher else "viridis_r", aspect="auto")
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_xticks(range(len(xs)), xs)
    ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel(kx)
    ax.set_ylabel(ky)
    lo, hi = np.nanmin(grid), np.nanmax(grid)
    for yi in range(len(ys)):
      for xi in range(len(xs)):
        if not math.isnan(grid[yi, xi]):
          bright = (grid[yi, xi] - lo) > 0.5 * (hi - lo) if higher else (
              grid[yi, xi] - lo) < 0.5 * (hi - lo)
          text = f"{grid[yi, xi]:.3g}"
          if not math.isnan(err[yi, xi]):
            text += f"\n±{err[yi, xi]:.2g}"
          ax.text(xi, yi, text, ha="center", va="center", color="k" if bright else "w")
    if best is not None:
      r = rows[best]
      ax.add_patch(plt.Rectangle((xs.index(_fmt(r[kx])) - 0.5, ys.index(_fmt(r[ky])) - 0.5), 1,
                                 1, fill=False, edgecolor="red", linewidth=3))
  what = f"{name}, mean ± std over seeds" if replicated else metric
  ax.set_title(f"{what} ({'higher' if higher else 'lower'} is better; best marked)")
  from ssl_us.eval import plots  # pylint: disable=g-import-not-at-top
  plots._save(fig, path)  # pylint: disable=protected-access
  return True


def _plot_losses(records, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  drawn = 0
  for r in records:
    m = r.get("metrics", {})
    if m.get("loss_curve"):
      ax.plot(m["steps"], m["loss_curve"], label=r["name"])
      drawn += 1
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  if drawn:
    ax.legend(fontsize=7)
  ax.set_title(f"pretraining loss, {drawn} points")
  from ssl_us.eval import plots  # pylint: disable=g-import-not-at-top
  plots._save(fig, path)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------------
# Command line.


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", help="configs/X.py[:variant] (not needed with --aggregate)")
  p.add_argument("--workdir", required=True, help="the sweep's folder; points go below it")
  p.add_argument("--grid", action="append", default=[],
                 help="config.KEY=V1,V2,...; several flags make a product (default: get_sweep)")
  p.add_argument("--set", action="append", default=[], help="config.KEY=VALUE for every point")
  p.add_argument("--seeds", type=int, default=0,
                 help="run every grid point with config.seed 0..N-1; the report adds the mean "
                 "and std over seeds (sweep_seeds.csv/.md, the plots)")
  p.add_argument("--eval_split", default="train", help="labelled split for the evaluation")
  p.add_argument("--eval_max", type=int, default=2000, help="records evaluated at most")
  p.add_argument("--monitor_every", type=int, default=0,
                 help="online monitor (kNN, alignment, uniformity on --monitor_size records of "
                 "--eval_split) every N steps, in TensorBoard; 0: off")
  p.add_argument("--monitor_size", type=int, default=256)
  p.add_argument("--only", help="run this point alone (as --emit commands does)")
  p.add_argument("--parallel", type=int, default=1,
                 help="points at once, each in its own process on 1/K of the local devices")
  p.add_argument("--emit", choices=["commands"], help="print one command per point and exit")
  p.add_argument("--aggregate", action="store_true",
                 help="build the report from the point workdirs that exist and exit")
  p.add_argument("--multihost", action="store_true",
                 help="join the other processes (jax.distributed) first: every point runs on "
                 "all hosts' devices, as with python -m ssl_us.main --multihost")
  p.add_argument("--coordinator_address", help="with --multihost: host:port of process 0 "
                 "(default: found on Cloud TPU, SLURM, Open MPI, Kubernetes)")
  p.add_argument("--num_processes", type=int, help="with --multihost (default: found)")
  p.add_argument("--process_id", type=int, help="with --multihost (default: found)")
  a = p.parse_args(argv)
  try:
    from ssl_us import parallel  # pylint: disable=g-import-not-at-top
    given = parallel.process_flags(a.multihost, a.coordinator_address, a.num_processes,
                                   a.process_id)
    if not a.emit:   # printing the commands needs no other process
      parallel.join_processes(a.multihost, **given)
    elif "process_id" in given:
      raise ValueError("--process_id differs between a job's processes: with --emit commands "
                       "leave it to the cluster (or add it to each process's command)")
  except ValueError as e:
    p.error(str(e))
  # --emit commands: each point's job joins its processes with the same flags.
  launch = ["--multihost"] * a.multihost + [
      arg for k, v in given.items() for arg in (f"--{k}", str(v))]
  if a.multihost and a.parallel > 1:
    p.error("--parallel splits one host's devices; with --multihost every point uses all hosts")
  try:
    if a.aggregate:
      rows = report(a.workdir)
      print(f"[sweep] {len(rows)} points: {a.workdir}/sweep.csv, sweep.md")
      return 0
    if not a.config:
      raise SweepError("--config is required (except with --aggregate)")
    sweep = build_sweep(a.config, a.workdir, a.grid, a.set, a.eval_split, a.eval_max,
                        a.monitor_every, a.monitor_size, a.seeds)
    if a.emit == "commands":
      import jax  # pylint: disable=g-import-not-at-top
      check_points(sweep, jax.device_count(), given.get("num_processes", 1))
      sweep.launch = launch
      for point in sweep.points:
        print(sweep.command(point))
      return 0
    if a.parallel > 1 and not a.only:
      records = run_parallel(sweep, a.parallel)
    else:
      records = run(sweep, a.only)
  except SweepError as e:
    print(f"sweep: {e}", file=sys.stderr)
    return 2
  failed = [r["name"] for r in records if r and r.get("status") == "failed"]
  print(f"[sweep] {len(records)} points run, {len(failed)} failed; report: "
        f"{a.workdir}/sweep.md")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
