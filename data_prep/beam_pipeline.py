"""``--runner beam``: the data_prep build as an Apache Beam pipeline.

The steps, each a Beam transform:

  ListInputs    the folder or manifest read (``pipeline.list_inputs``), one element
  PatientTable  usable videos grouped by patient -> each patient's stratum (its most common
                label), combined into the global patient table
  AssignSplits  patient-level, stratified, seeded splits of that table (``splits``); a
                manifest's split column wins, as on the local runner
  Decide        label ids, patient hashes, previews: one job per video (``pipeline.make_jobs``)
  EncodeVideo   the per-video work, spread over the workers: ``worker.encode_video``, the
                function the local worker processes call, writing the video's records
                through ``writer.ShardWriter`` into a file of this attempt; a video that
                raises is a reject. Only (position, audit, file) goes on: the shuffles
                carry a few hundred bytes per video, never the records
  PlanShards    the written videos of each split, in input order, cut into shards of balanced
                size (about --shard_mb, never splitting a video)
  WriteShard    one shard per key: its videos' record files concatenated in input order
                into a folder of its own attempt (a retried bundle writes a new folder:
                nothing is appended twice)
  Finalize      one element, after every shard: the attempts' shards renamed to their TFDS
                names, then ``pipeline.finish``: report, metadata, dataset_info.json last

So the records are the local runner's, byte for byte; only the cut into shards differs (local
shards are concatenated worker pieces). A pipeline that fails or is cancelled leaves no
dataset_info.json, so ``require_complete`` refuses the folder; a re-run starts again (Beam
does not resume; the runner retries failed bundles itself).

Inputs and outputs are local paths (PyAV, pydicom and the writer open files): on a cluster
they must be on a file system every worker mounts at the same path (NFS, a FUSE mount of a
bucket). See data_prep/README.md for Flink and Spark.
"""
from __future__ import annotations

import bisect
import collections
import math
import os
import shlex
import shutil
import time
import uuid

from data_prep import config as config_lib
from data_prep import dataset as dataset_lib
from data_prep import files as files_lib
from data_prep import pipeline
from data_prep import splits as splits_lib
from data_prep import worker as worker_lib
from data_prep import writer as writer_lib

INSTALL = ("--runner beam needs Apache Beam, an optional extra: pip install -e '.[beam]' "
           "(./run.sh test installs it)")
FAILURE = "failure.txt"  # in the work folder: why Finalize refused to finish


def require_beam() -> None:
  """BuildError saying how to install Apache Beam if it is missing."""
  try:
    import apache_beam  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise pipeline.BuildError(f"{INSTALL} ({e})") from None


def pipeline_options(cfg: config_lib.BuildConfig):
  """--beam_options as PipelineOptions; on the DirectRunner --num_workers processes (0: in
  this process) unless the options say otherwise."""
  from apache_beam.options import pipeline_options as po  # pylint: disable=g-import-not-at-top
  flags = shlex.split(cfg.beam_options)
  opts = po.PipelineOptions(flags)
  runner = opts.view_as(po.StandardOptions).runner
  given = {f.split("=")[0] for f in flags}
  if "--default_sdk_harness_log_level" not in given:  # workers: warnings and errors only
    opts.view_as(po.WorkerOptions).default_sdk_harness_log_level = "WARNING"
  if runner in (None, "DirectRunner", "direct"):
    direct = opts.view_as(po.DirectOptions)
    workers = pipeline.resolve_workers(cfg.num_workers)
    if "--direct_running_mode" not in given:
      direct.direct_running_mode = "multi_processing" if workers else "in_memory"
    if "--direct_num_workers" not in given:
      direct.direct_num_workers = max(workers, 1)
  return opts


def balanced_shards(sizes: list[int], shard_bytes: int) -> list[int]:
  """Shard index of each of consecutive items of ``sizes`` bytes: ceil(total / shard_bytes)
  shards of near-equal bytes (an item goes to the shard its middle byte falls in; a shard left
  empty by a big item is dropped)."""
  total = sum(sizes)
  n = max(1, min(len(sizes), math.ceil(total / shard_bytes)))
  raw, cum = [], 0
  for s in sizes:
    raw.append(min(n - 1, int((cum + s / 2) * n / total)) if total else 0)
    cum += s
  renumber = {k: i for i, k in enumerate(sorted(set(raw)))}
  return [renumber[k] for k in raw]


def plan_shards(cfg: config_lib.BuildConfig, rows) -> dict:
  """rows (position, split, bytes, records) of written videos -> split -> shards, each
  {'shard', 'pieces': [shard], 'positions', 'records', 'bytes'}; splits in --splits order."""
  by_split = collections.defaultdict(list)
  for row in sorted(rows):
    by_split[row[1]].append(row)
  plan = {}
  for split in pipeline.split_order(cfg, by_split):
    rows = by_split[split]
    index = balanced_shards([r[2] for r in rows], cfg.shard_bytes)
    count = max(index) + 1
    shards = [{"shard": dataset_lib.shard_name(cfg.name, split, i, count), "positions": [],
               "records": 0, "bytes": 0} for i in range(count)]
    for (pos, _, nbytes, records), i in zip(rows, index):
      shards[i]["positions"].append(pos)
      shards[i]["records"] += records
      shards[i]["bytes"] += nbytes
    for s in shards:
      s["pieces"] = [s["shard"]]  # the report names a video's shard through its 'piece'
    plan[split] = shards
  return plan


# ---------------------------------------------------------------------------- the steps

def _list(_, cfg, salt):
  return pipeline.list_inputs(cfg, salt)


def _stratum(patient_labels):
  patient, labels = patient_labels
  return patient, splits_lib.patient_strata((patient, lab) for lab in labels)[patient]


def _assign(table, cfg):
  return splits_lib.assign_splits(table, splits_lib.parse_fractions(cfg.splits), cfg.seed)


def _split_of(entry, by_patient):
  return entry.video_id, entry.split or by_patient[entry.patient_id]


def _decide(listing, cfg, split_of):
  return pipeline.make_jobs(cfg, listing, dict(split_of))


def _encode(element, wcfg, videos_dir):
  """(position, job) -> (position, split, audit, path): the video's records, framed as in a
  shard, in a file of this attempt (a retried bundle writes a new one); no file for a reject.
  Only this small tuple travels through the runner's shuffle, not the records."""
  from apache_beam.metrics import Metrics  # pylint: disable=g-import-not-at-top
  pos, job = element
  path = os.path.join(videos_dir, f"{pos:07d}.{uuid.uuid4().hex}.tfrecord")
  out = writer_lib.ShardWriter(path)
  audit = worker_lib.encode_video(wcfg, job, out.write)
  Metrics.counter("data_prep", f"videos_{audit['status']}").inc()
  if audit["status"] != "written":
    out.discard()
    return pos, job.split, audit, None
  records, nbytes = out.commit()
  if (records, nbytes) != (audit["records"], audit["bytes"]):  # the audit is what the plan uses
    raise RuntimeError(f"{job.entry.source}: wrote {records} records of {nbytes} bytes, its "
                       f"audit says {audit['records']} of {audit['bytes']}")
  return pos, job.split, audit, path


def _to_shard(result, plan):
  """Key a written video's file by its shard (a split's shards hold consecutive positions)."""
  pos, split, _, path = result
  i = bisect.bisect_right([s["positions"][0] for s in plan[split]], pos) - 1
  assert pos in plan[split][i]["positions"], (pos, split)
  return (split, i), (pos, path)


def _write_shard(keyed, plan, attempts_dir):
  """One shard: its videos' files concatenated in input order into a fresh folder of this
  attempt (fsync'ed, then renamed from a temporary name); its path and size."""
  (split, i), videos = keyed
  want = plan[split][i]
  path = os.path.join(attempts_dir, uuid.uuid4().hex, want["shard"])
  os.makedirs(os.path.dirname(path))
  videos = sorted(videos)
  with open(path + ".tmp", "wb") as out:
    for _, src in videos:
      with open(src, "rb") as f:
        shutil.copyfileobj(f, out, 1 << 22)
    out.flush()
    os.fsync(out.fileno())
  os.replace(path + ".tmp", path)
  return {"shard": want["shard"], "path": path, "positions": [p for p, _ in videos],
          "bytes": os.path.getsize(path)}


def _finalize(_, cfg, t0, workers, prep, audits, written, plan):
  """After every shard: rename them into the dataset, then ``pipeline.finish``. A BuildError
  (--strict, nothing written) is left in the work folder for the driver to raise."""
  work = pipeline.WorkDir(os.path.join(cfg.dataset_dir, pipeline.WORK))
  try:
    audits = dict(audits)
    shard_of = {p: s["shard"] for shards in plan.values() for s in shards for p in s["positions"]}
    final = {}
    for pos, job in enumerate(prep.jobs):
      audit = dict(audits[pos])
      if audit["status"] == "written":
        audit["piece"] = shard_of[pos]
      final[job.entry.video_id] = audit
    if cfg.strict:
      bad = [a for a in final.values() if a["status"] == "rejected"]
      if bad:
        raise pipeline.BuildError(f"--strict: {bad[0]['source']} rejected ({bad[0]['reason']}):"
                                  f" {bad[0]['message']}")
    path_of = {w["shard"]: w for w in written}
    for shards in plan.values():
      for s in shards:
        dest = os.path.join(cfg.dataset_dir, s["shard"])
        got = path_of.get(s["shard"])
        if (got is None or got["positions"] != s["positions"] or got["bytes"] != s["bytes"]):
          raise pipeline.BuildError(
              f"shard {s['shard']}: written {got and len(got['positions'])} videos, "
              f"{got and got['bytes']} bytes; planned {len(s['positions'])} videos, "
              f"{s['bytes']} bytes")
        if os.path.exists(got["path"]):  # else a retried Finalize moved it already
          os.replace(got["path"], dest)
        if os.path.getsize(dest) != s["bytes"]:
          raise pipeline.BuildError(f"{dest}: {os.path.getsize(dest)} bytes, planned "
                                    f"{s['bytes']}")
    counts = collections.Counter()
    for a in final.values():
      counts[a["status"]] += 1
      counts["records"] += a.get("records", 0)
      counts["bytes"] += a.get("bytes", 0)
      counts["input_bytes"] += a.get("input_bytes", 0)
    run = pipeline.run_summary("beam", len(prep.jobs), 0, 0, workers, time.time() - t0, counts)
    pipeline.finish(cfg, prep, final, plan, run, work)
  except pipeline.BuildError as e:
    files_lib.write_text(work.file(FAILURE), str(e))


def build(cfg: config_lib.BuildConfig, work: pipeline.WorkDir, salt: bytes) -> dict:
  """Run the build as a Beam pipeline (see the module docstring); returns the report."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam import pvalue  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  wcfg = worker_lib.WorkerConfig(
      pieces_dir="", journal_dir="", prefix="beam",
      preview_dir=os.path.join(cfg.dataset_dir, pipeline.REPORT, "previews"),
      image_size=cfg.size, sampling=cfg.sampling, min_size=cfg.min_size,
      region_samples=cfg.region_samples, shard_bytes=cfg.shard_bytes,
      buffer_bytes=int(cfg.buffer_mb * 2**20), frame_encoding=cfg.frame_encoding)
  os.makedirs(work.file("videos"), exist_ok=True)
  options = pipeline_options(cfg)
  direct = options.view_as(beam.options.pipeline_options.DirectOptions)
  workers = direct.direct_num_workers if options.view_as(
      beam.options.pipeline_options.StandardOptions).runner in (None, "DirectRunner",
                                                                "direct") else 0
  with beam.Pipeline(options=options) as p:
    listing = (p | "Start" >> beam.Create([None])
               | "ListInputs" >> beam.Map(_list, cfg, salt))
    usable = listing | "Usable" >> beam.FlatMap(
        lambda lst: [e for e in lst.inputs.entries if not e.reject])
    table = (usable
             | "PatientLabel" >> beam.Map(lambda e: (e.patient_id, e.label))
             | "ByPatient" >> beam.GroupByKey()
             | "Stratum" >> beam.Map(_stratum)
             | "PatientTable" >> beam.combiners.ToDict())
    by_patient = table | "AssignSplits" >> beam.Map(_assign, cfg)
    split_of = usable | "SplitOf" >> beam.Map(_split_of, pvalue.AsSingleton(by_patient))
    prep = listing | "Decide" >> beam.Map(_decide, cfg, pvalue.AsList(split_of))
    results = (prep
               | "Jobs" >> beam.FlatMap(lambda pr: list(enumerate(pr.jobs)))
               | "Spread" >> beam.Reshuffle()
               | "EncodeVideo" >> beam.Map(_encode, wcfg, work.file("videos")))
    plan = (results
            | "Sizes" >> beam.FlatMap(lambda r: [(r[0], r[1], r[2]["bytes"], r[2]["records"])]
                                      if r[2]["status"] == "written" else [])
            | "AllSizes" >> beam.combiners.ToList()
            | "PlanShards" >> beam.Map(lambda rows: plan_shards(cfg, rows)))
    written = (results
               | "Written" >> beam.Filter(lambda r: r[2]["status"] == "written")
               | "ToShard" >> beam.Map(_to_shard, pvalue.AsSingleton(plan))
               | "ByShard" >> beam.GroupByKey()
               | "WriteShard" >> beam.Map(_write_shard, pvalue.AsSingleton(plan),
                                          work.file("attempts")))
    audits = results | "Audits" >> beam.Map(lambda r: (r[0], r[2]))
    _ = (p | "AfterAll" >> beam.Create([None])
         | "Finalize" >> beam.Map(_finalize, cfg, t0, workers, pvalue.AsSingleton(prep),
                                  pvalue.AsList(audits), pvalue.AsList(written),
                                  pvalue.AsSingleton(plan)))
  failure = work.file(FAILURE)
  if os.path.exists(failure):
    with open(failure, encoding="utf-8") as f:
      raise pipeline.BuildError(f.read())
  report = pipeline._finished(cfg)  # pylint: disable=protected-access
  if report is None:
    raise pipeline.BuildError(f"the Beam pipeline ended without finishing {cfg.dataset_dir}")
  return report
