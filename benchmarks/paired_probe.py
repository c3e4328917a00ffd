r"""Paired comparison of two downstream runs: protocol A of one runs CSV against B of another.

``ssl_us.finetune`` writes one row per (protocol, fraction, fold, seed, level) to
``downstream_<name>_runs.csv``. Two encoders probed with the same folds and seeds (the splits
depend only on ``eval.split_seed``) are compared run by run: the difference of each metric on
the same test patients and head seed, its mean ± std and how often A is ahead.

  python -m benchmarks.paired_probe --a /tmp/probe/downstream_covid_blues_runs.csv:linear \
      --b /tmp/probe/downstream_covid_blues_runs.csv:random_features
"""
from __future__ import annotations

import argparse
import csv

import numpy as np

KEY = ("fraction", "fold", "seed", "level")


def read_runs(spec: str) -> dict[tuple, dict[str, str]]:
  """``path:protocol`` -> {(fraction, fold, seed, level): row} of that protocol's rows."""
  path, _, protocol = spec.rpartition(":")
  if not path or not protocol:
    raise ValueError(f"{spec!r}: expected PATH:PROTOCOL")
  with open(path, newline="") as f:
    rows = [r for r in csv.DictReader(f) if r["protocol"] == protocol]
  if not rows:
    raise ValueError(f"{path}: no rows of protocol {protocol!r}")
  out = {}
  for r in rows:
    k = tuple(r[c] for c in KEY)
    if k in out:
      raise ValueError(f"{path}: two {protocol} rows for {dict(zip(KEY, k))}")
    out[k] = r
  return out


def compare(a: dict, b: dict, metrics=("accuracy", "auc")) -> list[dict]:
  """Per (fraction, level): n, mean of A and B, mean ± std of A - B, runs with A > B."""
  common = sorted(set(a) & set(b))
  if not common:
    raise ValueError("the two sets of runs share no (fraction, fold, seed, level)")
  groups: dict[tuple, list] = {}
  for k in common:
    groups.setdefault((k[0], k[3]), []).append(k)
  out = []
  for (fraction, level), keys in sorted(groups.items()):
    row = dict(fraction=fraction, level=level, n=len(keys))
    for m in metrics:
      va = np.array([float(a[k][m]) for k in keys])
      vb = np.array([float(b[k][m]) for k in keys])
      d = va - vb
      row.update({f"{m}_a": va.mean(), f"{m}_b": vb.mean(), f"{m}_diff": d.mean(),
                  f"{m}_diff_std": d.std(), f"{m}_ahead": int((d > 0).sum())})
    out.append(row)
  return out


def markdown(rows: list[dict], metrics=("accuracy", "auc")) -> str:
  head = ["fraction", "level", "runs"]
  for m in metrics:
    head += [f"{m} A", f"{m} B", f"A - B {m}", "A ahead"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["fraction"], r["level"], str(r["n"])]
    for m in metrics:
      cells += [f"{r[m + '_a']:.3f}", f"{r[m + '_b']:.3f}",
                f"{r[m + '_diff']:+.3f} ± {r[m + '_diff_std']:.3f}",
                f"{r[m + '_ahead']}/{r['n']}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--a", required=True, help="PATH:PROTOCOL, e.g. runs.csv:linear")
  p.add_argument("--b", required=True, help="PATH:PROTOCOL, e.g. runs.csv:random_features")
  args = p.parse_args(argv)
  print(markdown(compare(read_runs(args.a), read_runs(args.b))))


if __name__ == "__main__":
  main()
