"""benchmarks.covid_blues_labels: per-clip findings from the upstream severity sheet."""
import csv
import os

import pytest

from benchmarks import covid_blues_labels as cbl
from tests.conftest import SHARED_DATA

HAVE_BLUES = os.path.isfile(os.path.join(SHARED_DATA, cbl.SEVERITY))


def _sheet(tmp_path, rows):
  os.makedirs(tmp_path / "LICENSES", exist_ok=True)
  path = tmp_path / cbl.SEVERITY
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["video_file", "Severity Score", "A-lines", "B-lines", "comments"])
    w.writerows(rows)
  return str(path)


def test_sheet_values_are_normalised(tmp_path):
  path = _sheet(tmp_path, [["patient_1_L1", "2.0", "yes ", "No", "x"],
                           ["patient_1_R1", "0", "no", "yes", ""]])
  got = cbl.read_severity(path)
  assert got == {"patient_1_L1": {"a_lines": "yes", "b_lines": "no", "severity": "2"},
                 "patient_1_R1": {"a_lines": "no", "b_lines": "yes", "severity": "0"}}
  assert cbl.label_name(got["patient_1_L1"], "b_lines") == "no_b_lines"
  assert cbl.label_name(got["patient_1_R1"], "b_lines") == "b_lines"
  assert cbl.label_name(got["patient_1_L1"], "severity") == "severity_2"


@pytest.mark.parametrize("row, message", [
    (["patient_1_L1", "1.0", "maybe", "yes", ""], "line 2 column 'A-lines'"),
    (["patient_1_L1", "1.5", "yes", "yes", ""], "severity 1.5"),
    (["patient_1_L1", "high", "yes", "yes", ""], "'high' is not a number"),
])
def test_bad_sheet_values_name_the_line(tmp_path, row, message):
  path = _sheet(tmp_path, [row])
  with pytest.raises(ValueError, match=message):
    cbl.read_severity(path)


def test_duplicate_clip_is_an_error(tmp_path):
  path = _sheet(tmp_path, [["patient_1_L1", "1", "yes", "no", ""]] * 2)
  with pytest.raises(ValueError, match="line 3: clip 'patient_1_L1' listed twice"):
    cbl.read_severity(path)


@pytest.mark.skipif(not HAVE_BLUES, reason="shared COVID-BLUES data not present")
def test_real_sheet_gives_every_clip_its_finding(tmp_path):
  rows = cbl.build_rows(SHARED_DATA, "b_lines")
  # The upstream sheet: 235 clips with B-lines ('yes' and 'yes '), 127 without, of 63 patients.
  assert len(rows) == 362
  assert sum(r["label"] == "b_lines" for r in rows) == 235
  assert len({r["patient_id"] for r in rows}) == 63
  # The finding varies within patients: it is a property of the clip, not of the patient.
  by_patient = {}
  for r in rows:
    by_patient.setdefault(r["patient_id"], set()).add(r["label"])
  assert sum(len(v) == 2 for v in by_patient.values()) > 10
  out = str(tmp_path / "m.csv")
  cbl.write_manifest(rows, out)
  back = list(csv.DictReader(open(out)))
  assert [r["video_id"] for r in back] == [r["video_id"] for r in rows]
  assert all(os.path.isfile(r["path"]) for r in back)
  assert [f for f in os.listdir(tmp_path) if ".tmp" in f] == []
