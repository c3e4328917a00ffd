"""What de-identifying paths (data_prep.manifest.Redactor) costs a build at corpus scale.

  python -m benchmarks.redaction_cost [--videos 100000]

A listing as a clinical export names it: three videos per patient, the record number as folder
and in the file name (``covid/MRN1000000/MRN1000000_lung 0.mp4``), found by
``--patient_regex '/(MRN\\d+)/'``. Timed: the entries through ``Redactor.entry`` (what reaches
the records) and the report's per-file rows through ``Redactor.tree``. One JSON line.
"""
from __future__ import annotations

import argparse
import json
import time


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--videos", type=int, default=100_000)
  args = p.parse_args(argv)
  from data_prep import manifest  # pylint: disable=g-import-not-at-top

  entries = []
  for i in range(args.videos):
    mrn = f"MRN{1_000_000 + i // 3}"
    rel = f"covid/{mrn}/{mrn}_lung {i % 3}.mp4"
    entries.append(manifest.Entry(path="/data/" + rel, source=rel, video_id=rel, patient_id=mrn))
  t0 = time.perf_counter()
  redactor = manifest.Redactor.of_entries(
      entries, b"salt", manifest.compile_patient_regex(r"/(MRN\d+)/"), patients=True, uids=True)
  written = [redactor.entry(e) for e in entries]
  t1 = time.perf_counter()
  rows = [{"video_id": e.video_id, "source": e.source, "status": "written", "reason": ""}
          for e in written]
  redactor.tree({"files": rows})
  t2 = time.perf_counter()
  assert not any(e.patient_id in w.source for e, w in zip(entries, written))
  print(json.dumps({"videos": args.videos, "patients": len(redactor.patient_ids),
                    "entries_s": round(t1 - t0, 2), "report_s": round(t2 - t1, 2),
                    "us_per_video": round(1e6 * (t2 - t0) / args.videos, 1),
                    "example": written[0].source}))


if __name__ == "__main__":
  main()
