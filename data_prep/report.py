"""The audit report: every input file with its outcome, per-split totals, and a short summary.

``report.json`` (in ``<dataset_dir>/report/``) holds ``counts`` (inputs, written, rejected,
ignored, records, bytes), ``rejected_by_reason``, ``splits`` (videos, patients, records, shards,
bytes, videos per label), ``files`` (one row per input in input order: written with its shard,
record count, frames, bytes, scan-area box, or rejected with reason and message), ``ignored``
(folder files that are not videos), ``dropped_columns``, ``warnings``, ``tasks`` (the run that
finished the build: its runner, videos per minute and MB/s), ``args`` and ``salt_check`` (for
a given --salt, ``config.salt_digest``; else null). ``summary.txt`` is
the human version; ``python -m data_prep`` prints it.
"""
from __future__ import annotations

import collections
import os

from data_prep import manifest

_MB = 2**20
_MAX_LISTED = 20


def _file_row(entry, audit: dict | None, shard_of: dict[str, str]) -> dict:
  """The report row of one input: its audit, with the final shard instead of the piece."""
  if audit is None:
    return {"video_id": entry.video_id, "source": entry.source, "split": "",
            "status": "rejected", "reason": entry.reject, "message": entry.reject_message}
  row = dict(audit)
  if "piece" in row:
    row["shard"] = shard_of[row.pop("piece")]
  return row


def split_totals(prep, final: dict, plan: dict) -> dict:
  """split -> videos, patients, records, shards, bytes and videos per label (written only)."""
  out = {}
  for split, shards in plan.items():
    jobs = [j for j in prep.jobs if j.split == split
            and final[j.entry.video_id]["status"] == "written"]
    labels = collections.Counter(j.entry.label or "(none)" for j in jobs)
    out[split] = {"videos": len(jobs), "patients": len({j.patient for j in jobs}),
                  "records": sum(s["records"] for s in shards), "shards": len(shards),
                  "bytes": sum(s["bytes"] for s in shards), "labels": dict(sorted(labels.items()))}
  return out


def make_report(cfg, prep, final: dict, plan: dict, tasks: list[dict]) -> dict:
  """The report dict of a finished merge (see the module docstring)."""
  shard_of = {p: s["shard"] for shards in plan.values() for s in shards for p in s["pieces"]}
  files = [_file_row(e, None if e.reject else final[e.video_id], shard_of)
           for e in prep.inputs.entries]
  written = [f for f in files if f["status"] == "written"]
  rejected = [f for f in files if f["status"] == "rejected"]
  warnings = list(prep.inputs.warnings)
  for col, why in prep.inputs.dropped_columns.items():
    warnings.append(f"manifest column {col!r} not kept in metadata: {why}")
  out_of_range = sum(f.get("labelled_frames_out_of_range", 0) for f in written)
  if out_of_range:
    warnings.append(f"{out_of_range} frame labels point past the end of their video")
  expected = {j.split for j in prep.jobs}
  if not any(j.entry.split for j in prep.jobs):
    expected |= {s.split("=")[0].strip() for s in cfg.splits.split(",")}
  for split in sorted(expected):
    if split not in plan:
      warnings.append(f"split {split!r} is empty (no written videos): it is not in the dataset")
  return {
      "dataset_dir": cfg.dataset_dir,
      "complete": bool(plan),
      "input": cfg.input,
      "input_kind": cfg.input_kind,
      "mode": cfg.sampling.mode,
      "image_size": list(cfg.size),
      "counts": {"inputs": len(files), "written": len(written), "rejected": len(rejected),
                 "ignored": len(prep.inputs.ignored),
                 "records": sum(f["records"] for f in written),
                 "frames": sum(f["frames"] for f in written),
                 "bytes": sum(f["bytes"] for f in written)},
      "rejected_by_reason": dict(sorted(collections.Counter(f["reason"]
                                                            for f in rejected).items())),
      "splits": split_totals(prep, final, plan),
      "label_names": list(prep.label_names),
      "warnings": warnings,
      "dropped_columns": prep.inputs.dropped_columns,
      "previews": sorted(j.preview for j in prep.jobs
                         if j.preview and final[j.entry.video_id]["status"] == "written"),
      "tasks": tasks,
      "args": cfg.public_args(),
      "files": files,
      "ignored": prep.inputs.ignored,
  }


def summary_text(report: dict) -> str:
  """A short human summary of a report."""
  c = report["counts"]
  lines = [f"data_prep: {report['dataset_dir']}" + ("" if report["complete"] else
                                                     "  (NOT complete: nothing written)"),
           f"inputs: {c['inputs']} ({report['input_kind']} {report['input']}); ignored "
           f"non-video files: {c['ignored']}",
           f"written: {c['written']} videos -> {c['records']} records ({report['mode']} mode, "
           f"{c['frames']} frames, {c['bytes'] / _MB:.1f} MB)",
           f"rejected: {c['rejected']}" + (" (" + ", ".join(
               f"{k}: {v}" for k, v in report["rejected_by_reason"].items()) + ")"
                                            if c["rejected"] else "")]
  rejected = [f for f in report["files"] if f["status"] == "rejected"]
  for f in rejected[:_MAX_LISTED]:
    lines.append(f"  {f['source']}: {f['reason']}: {f['message']}")
  if len(rejected) > _MAX_LISTED:
    lines.append(f"  ... {len(rejected) - _MAX_LISTED} more in report.json")
  if any(manifest.PATIENT_TOKEN.search(f["source"]) for f in rejected):
    lines.append("  (paths de-identified: " + (
        "the --id_key file leads to the files read)" if report["args"].get("id_key") else
        "--id_key FILE writes the key to the files read; on a finished build, with the "
        "--salt it was built with)"))
  for split, s in report["splits"].items():
    labels = ", ".join(f"{k} {v}" for k, v in s["labels"].items())
    lines.append(f"split {split}: {s['patients']} patients, {s['videos']} videos, "
                 f"{s['records']} records, {s['shards']} shards, {s['bytes'] / _MB:.1f} MB "
                 f"[{labels}]")
  for w in report["warnings"]:
    lines.append(f"warning: {w}")
  if report["previews"]:
    lines.append(f"previews: {os.path.join(report['dataset_dir'], 'report', 'previews')} "
                 f"({len(report['previews'])})")
  for t in report["tasks"]:
    r = t["run"]
    lines.append(f"last run ({t.get('runner', 'local')}): {r['videos']} videos in "
                 f"{r['seconds']:.1f} s: {r['videos_per_minute']:.1f} videos/min, "
                 f"{r['input_mb_per_s']:.2f} MB/s in, {r['output_mb_per_s']:.2f} MB/s out")
  return "\n".join(lines) + "\n"
