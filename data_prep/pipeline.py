"""``build(input, output, **options)``: the data_prep pipeline, resumable, on two runners.

Steps: read the input (``manifest``), decide every video's split (``splits``), patient hash,
label id and frame labels; write each video's records (``worker.encode_video``), then the
TFDS shards, the report and the metadata, dataset_info.json last.

``runner='local'`` (default): worker processes on this machine write the records into shard
*pieces* under ``<dataset_dir>/.data_prep_work/``; then *merge*: account for every input,
turn the pieces into the final shards (renamed, or concatenated when small: TFRecord files
concatenate), and ``finish``. A worker process that dies (a decoder crash) has its video
rejected (reason ``crash``); the videos it had not committed yet are redone.

Resume (local): the work folder keeps the options (``config.json``) and one journal per worker
and run. A re-run with the same options skips every video already committed to a piece, deletes
leftover partial pieces and finishes; a re-run of a finished build returns its report.

``runner='beam'``: the same steps as an Apache Beam pipeline (``data_prep.beam_pipeline``),
for builds beyond one machine; it calls the same per-video function, writer and ``finish``.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import json
import multiprocessing as mp
from multiprocessing import connection as mp_connection
import os
import re
import secrets
import shutil
import time

import numpy as np

from data_prep import config as config_lib
from data_prep import dataset as dataset_lib
from data_prep import files as files_lib
from data_prep import manifest
from data_prep import readers
from data_prep import report as report_lib
from data_prep import splits as splits_lib
from data_prep import worker as worker_lib

WORK = ".data_prep_work"
REPORT = "report"
_PIECE = re.compile(r"^(?P<split>\w+)\.t(?P<task>\d{5})-a(?P<attempt>\d{3})-w\d{3}-\d{5}"
                    r"\.tfrecord(\.tmp)?$")
_JOURNAL = re.compile(r"^t(?P<task>\d{5})-a(?P<attempt>\d{3})-(w\d{3}|main)\.jsonl$")


class BuildError(RuntimeError):
  """The build cannot finish (the message says why and what to do)."""


@dataclasses.dataclass
class Prepared:
  """The input, read and decided: one job per usable video, in input order."""
  inputs: manifest.Inputs
  redactor: manifest.Redactor
  jobs: list[worker_lib.Job]
  label_names: tuple[str, ...]
  coarse_names: tuple[str, ...]
  fine_names: tuple[str, ...]
  digest: str                                   # identifies the input's videos and decisions


@dataclasses.dataclass(frozen=True)
class WorkDir:
  """The paths of the work folder of one dataset directory."""
  root: str

  @property
  def pieces(self):
    return os.path.join(self.root, "pieces")

  @property
  def journals(self):
    return os.path.join(self.root, "journals")

  def file(self, name: str) -> str:
    return os.path.join(self.root, name)

  def make(self) -> None:
    for d in (self.pieces, self.journals):
      os.makedirs(d, exist_ok=True)


# ------------------------------------------------------------------------------------ input

def read_inputs(cfg: config_lib.BuildConfig) -> manifest.Inputs:
  """The input folder or manifest as entries (checked, patients filled in)."""
  rx = manifest.compile_patient_regex(cfg.patient_regex)
  if cfg.input_kind == "folder":
    inputs = manifest.folder_inputs(cfg.input, readers.is_supported, rx, cfg.resolved_label_rule)
  else:
    root = os.path.abspath(cfg.root) if cfg.root else os.path.dirname(cfg.input)
    inputs = manifest.manifest_inputs(
        cfg.input, root, readers.is_supported, rx, cfg.resolved_label_rule,
        path_column=cfg.path_column, patient_column=cfg.patient_column,
        drop_columns=cfg.drop_columns)
  manifest.finalize_entries(inputs)
  if not inputs.entries:
    raise ValueError(f"--input {cfg.input}: no videos found (supported: "
                     f"{', '.join(readers.SUPPORTED_EXTENSIONS)} and folders of frames)")
  return inputs


def decide_splits(cfg: config_lib.BuildConfig, entries: list[manifest.Entry]) -> dict[str, str]:
  """video_id -> split for usable entries: the manifest's, else patient-level and stratified."""
  usable = [e for e in entries if not e.reject]
  if usable and usable[0].split:
    return {e.video_id: e.split for e in usable}  # a manifest split column, checked disjoint
  strata = splits_lib.patient_strata((e.patient_id, e.label) for e in usable)
  by_patient = splits_lib.assign_splits(strata, splits_lib.parse_fractions(cfg.splits), cfg.seed)
  return {e.video_id: by_patient[e.patient_id] for e in usable}


def preview_positions(num: int, first: int, random: int, seed: int) -> set[int]:
  """Positions of the videos that get a preview: the first ``first`` and ``random`` others."""
  rest = np.arange(first, num)
  rng = np.random.default_rng(seed)
  picked = rng.choice(rest, size=min(random, len(rest)), replace=False) if len(rest) else []
  return set(range(min(first, num))) | {int(i) for i in picked}


@dataclasses.dataclass
class Listing:
  """The input as read: entries (de-identified by ``redactor``) and their frame labels."""
  inputs: manifest.Inputs
  redactor: manifest.Redactor
  labels_of: list                               # per entry: frame-label arrays or None
  coarse_names: tuple[str, ...]
  fine_names: tuple[str, ...]


def list_inputs(cfg: config_lib.BuildConfig, salt: bytes) -> Listing:
  """Read the input folder or manifest and the frame labels (the first step of every runner)."""
  inputs = read_inputs(cfg)
  frame_labels = manifest.read_frame_labels(cfg.frame_labels) if cfg.frame_labels else None
  if frame_labels is not None:
    manifest.check_frame_labels(frame_labels, inputs.entries)
  labels_of = [frame_labels.of_video(e.video_id) if frame_labels else None
               for e in inputs.entries]  # by the ids the frame-label CSV uses
  redactor = manifest.Redactor.of_entries(
      inputs.entries, salt, manifest.compile_patient_regex(cfg.patient_regex),
      patients=not cfg.keep_patient_id, uids=not cfg.keep_uids)
  inputs.entries = [redactor.entry(e) for e in inputs.entries]
  return Listing(inputs=inputs, redactor=redactor, labels_of=labels_of,
                 coarse_names=frame_labels.coarse_names if frame_labels else (),
                 fine_names=frame_labels.fine_names if frame_labels else ())


def make_jobs(cfg: config_lib.BuildConfig, listing: Listing,
              split_of: dict[str, str]) -> Prepared:
  """One job per usable entry, given each one's split (``decide_splits``): label ids, patient
  field and previews decided."""
  inputs = listing.inputs
  label_names = tuple(sorted({e.label for e in inputs.entries} - {""}))
  label_id = {n: i for i, n in enumerate(label_names)}
  if any(e.split for e in inputs.entries) and cfg.splits != splits_lib.DEFAULT_SPLITS:
    inputs.warnings.append(f"--splits {cfg.splits} not used: the manifest has a split column")
  usable = [(e, fl) for e, fl in zip(inputs.entries, listing.labels_of) if not e.reject]
  previews = preview_positions(len(usable), cfg.previews, cfg.random_previews, cfg.seed)
  jobs = []
  for pos, (e, fl) in enumerate(usable):
    jobs.append(worker_lib.Job(
        entry=e, split=split_of[e.video_id],
        patient=listing.redactor.patient(e.patient_id),
        label_id=label_id.get(e.label, -1), frame_labels=fl,
        preview=worker_lib.preview_name(pos, e.video_id) if pos in previews else ""))
  h = hashlib.sha256()
  for e in inputs.entries:
    h.update(json.dumps([e.video_id, e.path, e.reject, split_of.get(e.video_id, ""),
                         e.label]).encode())
  return Prepared(inputs=inputs, redactor=listing.redactor, jobs=jobs, label_names=label_names,
                  coarse_names=listing.coarse_names, fine_names=listing.fine_names,
                  digest=h.hexdigest())


def prepare(cfg: config_lib.BuildConfig, salt: bytes) -> Prepared:
  """Read the input and decide each video's split, patient field, label id and frame labels."""
  listing = list_inputs(cfg, salt)
  return make_jobs(cfg, listing, decide_splits(cfg, listing.inputs.entries))


# -------------------------------------------------------------------------------- work dir

def resolve_salt(cfg: config_lib.BuildConfig, work: WorkDir) -> bytes:
  """--salt, or the random salt of this build (made once, kept in the work folder only)."""
  if cfg.salt:
    return cfg.salt.encode("utf-8")
  path = work.file("salt")
  if not os.path.exists(path):
    files_lib.write_text(path, secrets.token_hex(32), mode=0o600)
  with open(path, encoding="utf-8") as f:
    return f.read().strip().encode("utf-8")


def start_work(cfg: config_lib.BuildConfig, work: WorkDir, salt: bytes, digest: str | None,
               runner: str) -> None:
  """Record the options in the work folder, or check that they match the unfinished build.

  A local run resumes an unfinished local build. A Beam run, or a local run over an unfinished
  Beam run, starts again (keeping the build's salt): a Beam pipeline does not resume, and its
  leftovers (shards renamed before it was stopped) are deleted, not trusted. ``digest`` (the
  input's videos and decisions) is known before a local run only; None for Beam.
  """
  want = {"fingerprint": cfg.fingerprint(), "input_digest": digest,
          "salt_check": config_lib.salt_digest(salt), "runner": runner}
  path = work.file("config.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      have = json.load(f)
    have.setdefault("runner", "local")  # work folders of earlier versions
    have_fp = config_lib.recorded_fingerprint(have["fingerprint"])
    diff = sorted(k for k in set(have_fp) | set(want["fingerprint"])
                  if have_fp.get(k) != want["fingerprint"].get(k))
    if None not in (digest, have["input_digest"]) and have["input_digest"] != digest:
      diff.append("the input's videos")
    if have["salt_check"] != want["salt_check"]:
      diff.append("--salt")
    if diff:
      raise BuildError(f"{cfg.dataset_dir} holds an unfinished build with other options "
                       f"(differ: {', '.join(diff)}): re-run it with its options to finish it, "
                       "or pass --overwrite to start again")
    if "beam" not in (runner, have["runner"]):
      return
    for name in os.listdir(cfg.dataset_dir):
      if name != WORK:
        _remove(os.path.join(cfg.dataset_dir, name))
    for name in os.listdir(work.root):
      if name != "salt":
        _remove(work.file(name))
  work.make()
  files_lib.write_json(path, want)


def _remove(path: str) -> None:
  if os.path.isdir(path):
    shutil.rmtree(path)
  else:
    os.remove(path)


def read_events(work: WorkDir) -> list[tuple[str, dict]]:
  """(journal file, event) of all journals, in file order."""
  out = []
  for name in sorted(os.listdir(work.journals)):
    m = _JOURNAL.match(name)
    if m:
      out.extend((name, ev) for ev in worker_lib.read_journal(os.path.join(work.journals, name)))
  return out


def outcomes(events) -> tuple[dict[str, dict], list[dict]]:
  """(video_id -> final audit, committed pieces). Written beats rejected (a later run may
  succeed); a video written twice is an error."""
  final: dict[str, dict] = {}
  pieces = []
  for name, ev in events:
    if ev["event"] == "piece":
      pieces.append(ev)
      for audit in ev["videos"]:
        old = final.get(audit["video_id"])
        if old is not None and old["status"] == "written":
          raise BuildError(f"video {audit['video_id']!r} was committed twice (pieces "
                           f"{old['piece']} and {audit['piece']}): the work folder is corrupt; "
                           "re-run with --overwrite")
        final[audit["video_id"]] = audit
    elif ev["event"] == "rejected":
      old = final.get(ev["video"]["video_id"])
      if old is None or old["status"] != "written":
        final[ev["video"]["video_id"]] = ev["video"]
  return final, pieces


def clean_leftovers(work: WorkDir, committed: set[str]) -> list[str]:
  """Delete partial pieces (.tmp, or never committed); returns their names."""
  removed = []
  for name in sorted(os.listdir(work.pieces)):
    m = _PIECE.match(name)
    if m and (name.endswith(".tmp") or name not in committed):
      os.remove(os.path.join(work.pieces, name))
      removed.append(name)
  return removed


def next_attempt(work: WorkDir) -> int:
  """1 + the highest attempt number of the journals."""
  attempts = [int(m.group("attempt")) for n in os.listdir(work.journals)
              if (m := _JOURNAL.match(n))]
  return max(attempts, default=0) + 1


# ----------------------------------------------------------------------------------- tasks

class Tracker:
  """Counts finished videos for the progress bar, the run statistics and --strict."""

  def __init__(self, total: int, done: int, progress: bool, strict: bool):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self.bar = tqdm(total=total, initial=done, unit="video", disable=None if progress else True,
                    desc="data_prep")
    self.strict = strict
    self.counts = collections.Counter()
    self.failure = ""

  def audit(self, audit: dict, sign: int = 1) -> None:
    """Count a finished video (sign=-1: un-count one that must be redone)."""
    self.counts[audit["status"]] += sign
    if audit["status"] == "written":
      self.counts["bytes"] += sign * audit["bytes"]
      self.counts["records"] += sign * audit["records"]
    self.counts["input_bytes"] += sign * audit.get("input_bytes", 0)
    self.bar.update(sign)
    if sign < 0:
      return
    self.bar.set_postfix(rejected=self.counts["rejected"], refresh=False)
    if self.strict and audit["status"] == "rejected" and not self.failure:
      self.failure = f"--strict: {audit['source']} rejected ({audit['reason']}): {audit['message']}"

  def close(self) -> None:
    self.bar.close()


def resolve_workers(num_workers: int) -> int:
  """--num_workers: -1 = one per CPU core, 0 = in this process."""
  return (os.cpu_count() or 1) if num_workers < 0 else num_workers


def run_in_process(wcfg: worker_lib.WorkerConfig, jobs, tracker: Tracker) -> None:
  """All jobs in this process (--num_workers 0)."""
  def emit(msg):
    if msg["msg"] == "done":
      tracker.audit(msg["audit"])

  w = worker_lib.Worker(wcfg, 0, emit)
  for job in jobs:
    w.run(job)
    if tracker.failure:
      break
  w.close()


@dataclasses.dataclass
class _Proc:
  proc: object
  jobs: object                                             # Connection, main -> worker
  results: object                                          # Connection, worker -> main
  sent: list = dataclasses.field(default_factory=list)     # video ids, in sending order
  done: dict = dataclasses.field(default_factory=dict)     # video id -> audit
  exited: bool = False
  closing: bool = False
  busy_since: float | None = None                # when its current video began ('start')
  timed_out: bool = False


def run_in_workers(wcfg: worker_lib.WorkerConfig, jobs, num_workers: int, tracker: Tracker,
                   target=worker_lib.worker_process, video_timeout: float = 0.0) -> None:
  """Jobs over worker processes (spawned: no forked decoder or TF state); see module doc.

  Each worker has its own pair of pipes (jobs in, messages out; at most two jobs outstanding),
  so a worker that dies cannot block the others, and its pipe's end of file says it died after
  every message it sent. ``target(cfg, index, jobs, results)`` is the worker's entry point (a
  picklable module-level function; see ``worker.worker_process``). A worker still on one video
  ``video_timeout`` seconds after its 'start' message for it (0: no limit) is killed: that
  video is rejected ('timeout') and the worker's uncommitted videos are redone by a new one, as
  after a crash. The clock starts when the worker begins the video, so a worker's own start-up
  (spawning, imports; seconds on a loaded host) counts against no video.
  """
  ctx = mp.get_context("spawn")
  pending = collections.deque(jobs)
  by_id = {j.entry.video_id: j for j in jobs}
  procs: dict[int, _Proc] = {}
  main_journal = worker_lib.Journal(os.path.join(wcfg.journal_dir, f"{wcfg.prefix}-main.jsonl"))

  def start(index):
    jobs_out, jobs_in = ctx.Pipe(duplex=False)
    results_out, results_in = ctx.Pipe(duplex=False)
    p = ctx.Process(target=target, args=(wcfg, index, jobs_out, results_in), daemon=True)
    p.start()
    jobs_out.close()  # the child's ends: closing ours makes its death an end of file here
    results_in.close()
    procs[index] = _Proc(p, jobs_in, results_out)

  def feed():
    for w in procs.values():
      if w.exited or w.closing:
        continue
      try:
        while pending and len(w.sent) - len(w.done) < 2:
          job = pending.popleft()
          w.sent.append(job.entry.video_id)
          w.jobs.send(job)
        if not pending:
          w.jobs.send(None)
          w.closing = True
      except BrokenPipeError:  # it died; its end of file comes next
        w.closing = True

  def died(index):
    """A worker that ended without 'exit': blame its current video, redo its uncommitted."""
    w = procs[index]
    w.exited = True
    w.proc.join()
    path = os.path.join(wcfg.journal_dir, f"{wcfg.prefix}-w{index:03d}.jsonl")
    events = worker_lib.read_journal(path) if os.path.exists(path) else []
    committed, _ = outcomes([("", ev) for ev in events])
    starts = [ev["video_id"] for ev in events if ev["event"] == "start"]
    if not starts:
      # It never began a video: its start-up failed (an import, the environment), which a new
      # worker would repeat forever.
      raise BuildError(f"worker {index} exited with code {w.proc.exitcode} before it began a "
                       f"video: its start-up failed. Run with --num_workers 0 to see the error "
                       f"in this process; the same command resumes")
    culprit = starts[-1] if starts[-1] not in w.done else ""
    for vid in w.sent:
      if vid in committed:
        continue
      if vid == culprit:
        e = by_id[vid].entry
        audit = {"video_id": vid, "source": e.source, "split": by_id[vid].split,
                 "status": "rejected", "reason": "crash",
                 "message": f"{e.path}: the worker reading it died (exit code "
                            f"{w.proc.exitcode})"}
        if w.timed_out:
          audit.update(reason="timeout", message=f"{e.path}: still being read after "
                       f"{video_timeout:g} s (--video_timeout); the worker was stopped")
        main_journal.append({"event": "rejected", "video": audit})
        tracker.audit(audit)
      else:
        pending.append(by_id[vid])
        if vid in w.done:
          tracker.audit(w.done[vid], sign=-1)
    if pending:
      start(max(procs) + 1)

  def handle(index, msg):
    w = procs[index]
    if msg["msg"] == "start":      # the worker began a video (not: was sent it, or started)
      w.busy_since = time.monotonic()
    elif msg["msg"] == "done":
      w.done[msg["audit"]["video_id"]] = msg["audit"]
      w.busy_since = None
      tracker.audit(msg["audit"])
    elif msg["msg"] == "exit":
      w.exited = True
      w.proc.join()
    elif msg["msg"] == "fatal":
      raise BuildError(f"worker {index} failed:\n{msg['error']}")

  def stop_stuck():
    now = time.monotonic()
    for w in procs.values():
      if (video_timeout > 0 and not w.exited and not w.timed_out and w.busy_since is not None
          and now - w.busy_since > video_timeout):
        w.timed_out = True
        w.proc.kill()  # its pipe's end of file follows: died() rejects the video

  for i in range(num_workers):
    start(i)
  try:
    while any(not w.exited for w in procs.values()) and not tracker.failure:
      feed()
      stop_stuck()
      live = {w.results: i for i, w in procs.items() if not w.exited}
      for conn in mp_connection.wait(list(live), timeout=1.0):
        try:
          msg = conn.recv()
        except EOFError:
          died(live[conn])
          continue
        handle(live[conn], msg)
  finally:
    main_journal.close()
    for w in procs.values():
      if w.proc.is_alive():
        w.proc.terminate()
      w.proc.join()
      w.jobs.close()
      w.results.close()


def run_local(cfg: config_lib.BuildConfig, prep: Prepared, work: WorkDir) -> dict:
  """Write the videos not yet committed (resuming) with local worker processes; returns the
  run summary."""
  t0 = time.time()
  jobs = prep.jobs
  final, pieces = outcomes(read_events(work))
  committed = {p["piece"] for p in pieces}
  removed = clean_leftovers(work, committed)
  todo = [j for j in jobs if final.get(j.entry.video_id, {}).get("status") != "written"]
  attempt = next_attempt(work)
  wcfg = worker_lib.WorkerConfig(
      pieces_dir=work.pieces, journal_dir=work.journals,
      preview_dir=os.path.join(cfg.dataset_dir, REPORT, "previews"),
      prefix=f"t00000-a{attempt:03d}", image_size=cfg.size, sampling=cfg.sampling,
      min_size=cfg.min_size, region_samples=cfg.region_samples, shard_bytes=cfg.shard_bytes,
      buffer_bytes=int(cfg.buffer_mb * 2**20), frame_encoding=cfg.frame_encoding)
  os.makedirs(wcfg.preview_dir, exist_ok=True)
  tracker = Tracker(len(jobs), len(jobs) - len(todo), cfg.progress, cfg.strict)
  num_workers = min(resolve_workers(cfg.num_workers), len(todo))
  try:
    if todo and num_workers == 0:
      run_in_process(wcfg, todo, tracker)
    elif todo:
      run_in_workers(wcfg, todo, num_workers, tracker, video_timeout=cfg.video_timeout)
  finally:
    tracker.close()
  if tracker.failure:
    raise BuildError(tracker.failure)
  final, _ = outcomes(read_events(work))
  missing = [j.entry.source for j in jobs if j.entry.video_id not in final]
  if missing:
    raise BuildError(f"{len(missing)} videos were not finished (e.g. "
                     f"{missing[0]}) after a worker crash; re-run the same command to resume")
  seconds = max(time.time() - t0, 1e-9)
  c = tracker.counts
  return run_summary("local", len(jobs), len(jobs) - len(todo), len(removed), num_workers,
                     seconds, c)


def run_summary(runner: str, videos: int, resumed_from: int, leftovers: int, workers: int,
                seconds: float, c) -> dict:
  """The report's record of the run that finished a build: its throughput."""
  ran = videos - resumed_from
  seconds = max(seconds, 1e-9)
  return {"runner": runner, "videos": videos, "resumed_from": resumed_from,
          "leftover_pieces_removed": leftovers,
          "run": {"videos": ran, "seconds": round(seconds, 3), "workers": workers,
                  "written": c["written"], "rejected": c["rejected"], "records": c["records"],
                  "output_bytes": c["bytes"], "input_bytes": c["input_bytes"],
                  "videos_per_minute": round(60 * ran / seconds, 2),
                  "input_mb_per_s": round(c["input_bytes"] / 2**20 / seconds, 3),
                  "output_mb_per_s": round(c["bytes"] / 2**20 / seconds, 3)}}


# ----------------------------------------------------------------------------------- merge

def plan_shards(pieces: list[dict], shard_bytes: int) -> list[list[dict]]:
  """Consecutive pieces grouped into shards of at most shard_bytes (a bigger piece alone)."""
  groups, current, size = [], [], 0
  for p in pieces:
    if current and size + p["bytes"] > shard_bytes:
      groups.append(current)
      current, size = [], 0
    current.append(p)
    size += p["bytes"]
  if current:
    groups.append(current)
  return groups


def split_order(cfg: config_lib.BuildConfig, splits) -> list[str]:
  """The splits in --splits order; others (a manifest's) after, sorted."""
  order = list(splits_lib.parse_fractions(cfg.splits))
  return sorted(splits, key=lambda s: (order.index(s) if s in order else len(order), s))


def make_merge_plan(cfg: config_lib.BuildConfig, pieces: list[dict]) -> dict:
  """split -> list of {'shard', 'pieces', 'records', 'bytes'}; splits in --splits order (others
  after, sorted), pieces sorted by name (run, worker, sequence)."""
  by_split = collections.defaultdict(list)
  for p in sorted(pieces, key=lambda p: p["piece"]):
    by_split[p["split"]].append(p)
  plan = {}
  for split in split_order(cfg, by_split):
    groups = plan_shards(by_split[split], cfg.shard_bytes)
    plan[split] = [{"shard": dataset_lib.shard_name(cfg.name, split, i, len(groups)),
                    "pieces": [p["piece"] for p in g],
                    "records": sum(p["records"] for p in g),
                    "bytes": sum(p["bytes"] for p in g)} for i, g in enumerate(groups)]
  return plan


def execute_merge_plan(plan: dict, work: WorkDir, dataset_dir: str) -> None:
  """Make every planned shard (idempotent: a shard already there is skipped)."""
  for shards in plan.values():
    for s in shards:
      dest = os.path.join(dataset_dir, s["shard"])
      sources = [os.path.join(work.pieces, p) for p in s["pieces"]]
      if not os.path.exists(dest):
        if len(sources) == 1:
          os.replace(sources[0], dest)
        else:
          with open(dest + ".tmp", "wb") as out:
            for src in sources:
              with open(src, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
            out.flush()
            os.fsync(out.fileno())
          os.replace(dest + ".tmp", dest)
      if os.path.getsize(dest) != s["bytes"]:
        raise BuildError(f"{dest}: {os.path.getsize(dest)} bytes, the journal says {s['bytes']}")
      for src in sources:
        if os.path.exists(src):
          os.remove(src)


def merge(cfg: config_lib.BuildConfig, prep: Prepared, work: WorkDir, run: dict) -> dict:
  """Check that every input is accounted for, turn the pieces into shards, finish."""
  final, pieces = outcomes(read_events(work))
  wanted = {j.entry.video_id for j in prep.jobs}
  stray = sorted(set(final) - wanted)
  lost = sorted(wanted - set(final))
  if stray or lost:
    raise BuildError(f"cannot merge: the work folder does not match the input ({len(lost)} "
                     f"videos without a result, e.g. {lost[:2]}; {len(stray)} unknown, e.g. "
                     f"{stray[:2]}); re-run, or --overwrite")
  plan_path = work.file("merge_plan.json")
  if os.path.exists(plan_path):
    with open(plan_path, encoding="utf-8") as f:
      plan = json.load(f)
  else:
    plan = make_merge_plan(cfg, pieces)
    files_lib.write_json(plan_path, plan)
  execute_merge_plan(plan, work, cfg.dataset_dir)
  return finish(cfg, prep, final, plan, run, work)


def write_id_key(cfg: config_lib.BuildConfig, listed: Listing | Prepared) -> None:
  """--id_key: every input's video_id and patient as written, and the file it was read from;
  readable by its owner only (mode 600), as it re-identifies the dataset."""
  out = io.StringIO()
  w = csv.writer(out, lineterminator="\n")
  w.writerow(["video_id", "patient", "path"])
  for e in listed.inputs.entries:
    w.writerow([e.video_id, listed.redactor.patient(e.patient_id), e.path])
  files_lib.write_text(os.path.abspath(cfg.id_key), out.getvalue(), mode=0o600)


def write_id_key_of_finished(cfg: config_lib.BuildConfig, report: dict) -> None:
  """--id_key given on a re-run of a finished build: the key, from the input listed again with
  the build's salt. BuildError where it cannot be the build's key: without the salt the build
  used (checked against the report's ``salt_check``), the hashes would not be the records';
  an input that lists other videos now is not the dataset's."""
  where = f"--id_key: {cfg.dataset_dir} is a finished build"
  salt = cfg.salt.encode("utf-8")
  if not (cfg.keep_patient_id and cfg.keep_uids):  # else the salt changes nothing written
    if report["args"].get("salt") != "given":
      raise BuildError(f"{where} made with a random salt, deleted when it finished, so its key "
                       "cannot be written now: give --id_key to the build itself (--overwrite "
                       "builds it again; add --salt to keep the hashes comparable)")
    if "salt_check" not in report:
      raise BuildError(f"{where} whose report predates the salt check, so this --salt cannot "
                       "be told to be the build's: give --id_key to the build itself "
                       "(--overwrite builds it again)")
    if config_lib.salt_digest(salt) != report["salt_check"]:
      raise BuildError(f"{where}; its key needs the --salt it was built with" +
                       (", and this one differs" if cfg.salt else "") +
                       " (else the patient hashes would not be the records')")
  listing = list_inputs(cfg, salt)
  now = {e.video_id for e in listing.inputs.entries}
  then = {f["video_id"] for f in report["files"]}
  if now != then:
    added, gone = sorted(now - then), sorted(then - now)
    raise BuildError(f"{where}, but its input {cfg.input} lists other videos now ({len(added)} "
                     f"new, e.g. {added[:2]}; {len(gone)} gone, e.g. {gone[:2]}): the key "
                     "would not be the dataset's")
  write_id_key(cfg, listing)


def finish(cfg: config_lib.BuildConfig, prep: Prepared, final: dict, plan: dict, run: dict,
           work: WorkDir) -> dict:
  """With every shard of ``plan`` in place: the report, the metadata, dataset_info.json last;
  then delete the work folder. The same for every runner."""
  if cfg.id_key:
    write_id_key(cfg, prep)
  report = prep.redactor.tree(report_lib.make_report(cfg, prep, final, plan, [run]))
  # a later --id_key run can then tell whether it holds the build's salt; a random one is deleted
  report["salt_check"] = config_lib.salt_digest(prep.redactor.salt) if cfg.salt else None
  report_dir = os.path.join(cfg.dataset_dir, REPORT)
  os.makedirs(report_dir, exist_ok=True)
  files_lib.write_json(os.path.join(report_dir, "report.json"), report)
  files_lib.write_text(os.path.join(report_dir, "summary.txt"),
                               report_lib.summary_text(report))
  if not plan:
    raise BuildError(f"no records written: all {len(prep.inputs.entries)} inputs were rejected; "
                     f"see {report_dir}/summary.txt")
  metadata = {"label_names": list(prep.label_names),
              "anatomy_coarse_names": list(prep.coarse_names),
              "anatomy_fine_names": list(prep.fine_names),
              "mode": cfg.sampling.mode, "image_size": list(cfg.size),
              "clip_len": cfg.sampling.record_len if cfg.sampling.mode == "clip" else 0,
              "frame_encoding": cfg.frame_encoding, "args": cfg.public_args()}
  dataset_lib.write_metadata(
      cfg.dataset_dir, work.file("staging"), name=cfg.name, version=cfg.version,
      image_size=cfg.size, frame_encoding=cfg.frame_encoding, metadata=metadata,
      splits={s: ([g["records"] for g in shards], sum(g["bytes"] for g in shards))
              for s, shards in plan.items()},
      description=f"Ultrasound records ({cfg.sampling.mode} mode) made by data_prep.")
  shutil.rmtree(work.root)
  return _as_returned(cfg, report)


def _as_returned(cfg: config_lib.BuildConfig, report: dict) -> dict:
  """The report as ``build`` returns it: as written, but where the dataset is even if a patient
  id in the output path was redacted in the written copy."""
  return {**report, "dataset_dir": cfg.dataset_dir}


# ----------------------------------------------------------------------------------- build

def _finished(cfg: config_lib.BuildConfig) -> dict | None:
  """The report of an already finished build with these options; BuildError if it differs."""
  if not os.path.exists(os.path.join(cfg.dataset_dir, dataset_lib.DATASET_INFO)):
    return None
  with open(os.path.join(cfg.dataset_dir, "metadata.json"), encoding="utf-8") as f:
    args = json.load(f).get("args", {})
  if config_lib.recorded_fingerprint(args) != cfg.fingerprint():
    raise BuildError(f"{cfg.dataset_dir} is a finished dataset made with other options: pass "
                     "--overwrite to replace it, or choose another --output/--name/--version")
  work = os.path.join(cfg.dataset_dir, WORK)
  if os.path.isdir(work):  # the merge was stopped after finishing, before cleaning up
    shutil.rmtree(work)
  with open(os.path.join(cfg.dataset_dir, REPORT, "report.json"), encoding="utf-8") as f:
    return _as_returned(cfg, json.load(f))


def build(input, output, **options) -> dict:  # pylint: disable=redefined-builtin
  """Build (or resume) a dataset; returns the report dict.

  Args:
    input: a folder of videos or a manifest CSV.
    output: the output folder; the dataset goes to ``<output>/<name>/<version>/``.
    **options: the CLI options by name (see ``python -m data_prep --help``), e.g.
      ``fps=3``, ``size=(128, 128)``, ``splits="train=0.8,val=0.2"``, ``num_workers=0``,
      ``runner="beam"``.

  Raises ValueError for bad options or input and BuildError when the build cannot finish
  (including --strict rejections).
  """
  cfg = config_lib.BuildConfig.create(input, output, **options)
  if cfg.runner == "beam":
    from data_prep import beam_pipeline  # pylint: disable=g-import-not-at-top
    beam_pipeline.require_beam()  # before touching the output
  if cfg.overwrite and os.path.isdir(cfg.dataset_dir):
    shutil.rmtree(cfg.dataset_dir)
  report = _finished(cfg)
  if report is not None:
    if cfg.id_key:
      write_id_key_of_finished(cfg, report)
    return report
  if os.path.isdir(cfg.dataset_dir) and os.listdir(cfg.dataset_dir) and not os.path.isdir(
      os.path.join(cfg.dataset_dir, WORK)):
    raise BuildError(f"{cfg.dataset_dir} exists and is not a data_prep build: pass --overwrite "
                     "to replace it, or choose another --output/--name/--version")
  work = WorkDir(os.path.join(cfg.dataset_dir, WORK))
  work.make()
  salt = resolve_salt(cfg, work)
  if cfg.runner == "beam":
    start_work(cfg, work, salt, None, "beam")
    return beam_pipeline.build(cfg, work, salt)
  prep = prepare(cfg, salt)
  start_work(cfg, work, salt, prep.digest, "local")
  return merge(cfg, prep, work, run_local(cfg, prep, work))
