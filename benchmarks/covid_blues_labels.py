r"""A data_prep manifest of the COVID-BLUES clips labelled by a per-clip finding.

COVID-BLUES's folder names carry the patient's PCR result, one label for all of a patient's
clips and not something an image shows (the negatives are symptomatic patients). The upstream
severity sheet (``LICENSES/covid_blues_severity.csv`` in ../shared/data) scores every clip:
B-lines yes/no, A-lines yes/no, a severity score 0-3. Those are visible findings of one clip,
the kind of label paper 001 evaluates (lung consolidation per video), and they vary within a
patient. This writes a manifest with ``label`` = the chosen finding; the PCR result, the other
findings and the score are kept as metadata columns.

  python -m benchmarks.covid_blues_labels --data ../shared/data --label b_lines \
      --output /tmp/blues_blines.csv
  python -m data_prep --input /tmp/blues_blines.csv --output /tmp/blues_blines --name covid_blues \
      --clip_len 8 --clip_stride 2 --size 64 --splits train=1.0

Values are compared after stripping spaces and lower-casing ('yes ' occurs in the sheet); any
other value, a clip missing from the sheet, a sheet row without a clip, or a missing file is an
error naming the file and the row.
"""
from __future__ import annotations

import argparse
import csv
import io
import os

from data_prep import files as files_lib

SEVERITY = os.path.join("LICENSES", "covid_blues_severity.csv")
FINDINGS = {"b_lines": "B-lines", "a_lines": "A-lines"}
LABELS = tuple(FINDINGS) + ("severity",)


def _yes_no(value: str, where: str) -> bool:
  v = value.strip().lower()
  if v not in ("yes", "no"):
    raise ValueError(f"{where}: expected yes or no, found {value!r}")
  return v == "yes"


def read_severity(path: str) -> dict[str, dict[str, str]]:
  """video stem -> {'b_lines': 'yes'|'no', 'a_lines': ..., 'severity': '0'..'3'}."""
  out = {}
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = {"video_file", "Severity Score", *FINDINGS.values()} - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f"{path}: missing columns {sorted(missing)}")
    for line, row in enumerate(reader, start=2):
      where = f"{path} line {line}"
      stem = row["video_file"].strip()
      if stem in out:
        raise ValueError(f"{where}: clip {stem!r} listed twice")
      rec = {k: "yes" if _yes_no(row[c], f"{where} column {c!r}") else "no"
             for k, c in FINDINGS.items()}
      try:
        score = float(row["Severity Score"])
      except ValueError:
        raise ValueError(f"{where}: severity {row['Severity Score']!r} is not a number") from None
      if score not in (0.0, 1.0, 2.0, 3.0):
        raise ValueError(f"{where}: severity {score} is not one of 0, 1, 2, 3")
      rec["severity"] = str(int(score))
      out[stem] = rec
  return out


def label_name(rec: dict[str, str], label: str) -> str:
  if label == "severity":
    return f"severity_{rec['severity']}"
  return label if rec[label] == "yes" else f"no_{label}"


def build_rows(data_dir: str, label: str) -> list[dict[str, str]]:
  """One manifest row per clip of ``data_dir/manifest.csv``'s covid_blues rows."""
  if label not in LABELS:
    raise ValueError(f"label {label!r} is not one of {LABELS}")
  severity = read_severity(os.path.join(data_dir, SEVERITY))
  manifest = os.path.join(data_dir, "manifest.csv")
  rows, seen = [], set()
  with open(manifest, newline="") as f:
    for line, row in enumerate(csv.DictReader(f), start=2):
      if row.get("dataset") != "covid_blues":
        continue
      path = os.path.join(data_dir, row["file"])
      stem = os.path.splitext(os.path.basename(row["file"]))[0]
      if stem not in severity:
        raise ValueError(f"{manifest} line {line}: {row['file']} has no row in {SEVERITY}")
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{manifest} line {line}: {path} does not exist")
      rec = severity[stem]
      seen.add(stem)
      rows.append(dict(path=os.path.abspath(path), video_id=stem, patient_id=row["patient_id"],
                       label=label_name(rec, label), pcr=row["label"], b_lines=rec["b_lines"],
                       a_lines=rec["a_lines"], severity=rec["severity"]))
  extra = sorted(set(severity) - seen)
  if extra:
    raise ValueError(f"{os.path.join(data_dir, SEVERITY)}: {len(extra)} clips not in {manifest}, "
                     f"e.g. {extra[:3]}")
  return rows


def write_manifest(rows: list[dict[str, str]], output: str) -> None:
  out = io.StringIO()
  w = csv.DictWriter(out, fieldnames=list(rows[0]))
  w.writeheader()
  w.writerows(rows)
  files_lib.write_text(output, out.getvalue(), newline="")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", default=os.path.join("..", "shared", "data"))
  p.add_argument("--label", default="b_lines", choices=LABELS)
  p.add_argument("--output", required=True)
  a = p.parse_args(argv)
  rows = build_rows(a.data, a.label)
  write_manifest(rows, a.output)
  counts: dict[str, int] = {}
  for r in rows:
    counts[r["label"]] = counts.get(r["label"], 0) + 1
  print(f"{a.output}: {len(rows)} clips, {len({r['patient_id'] for r in rows})} patients, "
        f"labels {dict(sorted(counts.items()))}")


if __name__ == "__main__":
  main()
