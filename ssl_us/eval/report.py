"""Result files: CSV rows and markdown tables, written to a temporary name and renamed."""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Mapping, Sequence

from data_prep import files as files_lib


def _atomic_write(path: str, text: str):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  files_lib.write_text(path, text, newline="")


def write_csv(path: str, rows: Sequence[Mapping], columns: Sequence[str] | None = None):
  """One row per mapping; columns default to the keys in first-seen order; a missing key is an
  error (no silently empty cells)."""
  if columns is None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(columns)
  for i, r in enumerate(rows):
    missing = [c for c in columns if c not in r]
    if missing:
      raise KeyError(f"{path}: row {i} lacks columns {missing}")
    w.writerow([r[c] for c in columns])
  _atomic_write(path, buf.getvalue())


def _fmt(v, digits: int) -> str:
  if isinstance(v, float):
    return "nan" if math.isnan(v) else f"{v:.{digits}f}"
  return str(v)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str],
                   headers: Sequence[str] | None = None, digits: int = 3) -> str:
  """A GitHub markdown table; a column m given as ``<m>_mean``/``<m>_std`` shows mean ± std."""
  headers = list(headers or columns)
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for r in rows:
    cells = []
    for c in columns:
      if c not in r and f"{c}_mean" in r:
        cells.append(f"{_fmt(r[f'{c}_mean'], digits)} ± {_fmt(r[f'{c}_std'], digits)}")
      else:
        cells.append(_fmt(r[c], digits))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_text(path: str, text: str):
  _atomic_write(path, text)
