"""Patient-level train/val/test splits: disjoint by patient, stratified by label, seeded.

Every patient goes to exactly one split, so no patient's videos are in two splits. The number of
patients per split follows the fractions (largest-remainder rounding; every split with a
fraction > 0 gets at least one patient when there are enough patients). Patients are grouped
into strata by their label (the most common non-empty label of their videos; ties go to the
alphabetically first), and each stratum is divided in proportion to the split sizes, so label
proportions match across splits as closely as whole patients allow. Inside a stratum patients
are shuffled by ``seed``: the same patients, labels, fractions and seed give the same splits.
Splits are decided before any video is decoded (every worker, local or Beam, reads them), so
a patient whose videos all turn out unreadable still takes its place in a split. The
evaluations' named splits (``ssl_us.eval.splits.group_split``) use the same assignment.
"""
from __future__ import annotations

import collections
import re
from typing import Iterable, Mapping

import numpy as np

DEFAULT_SPLITS = "train=0.8,val=0.1,test=0.1"
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def check_split_name(name: str, where: str) -> str:
  """The split name, if usable in TFDS shard names (letters, digits, '_'); else ValueError."""
  if not _SPLIT_NAME.match(name):
    raise ValueError(f"{where}: split name {name!r} must be letters, digits or '_'")
  return name


def parse_fractions(spec: str) -> dict[str, float]:
  """'train=0.8,val=0.1,test=0.1' -> {'train': 0.8, ...}; fractions > 0 that sum to 1."""
  out: dict[str, float] = {}
  for part in spec.split(","):
    name, sep, value = part.partition("=")
    name = name.strip()
    if not sep or not name:
      raise ValueError(f"--splits {spec!r}: expected name=fraction pairs, got {part!r}")
    check_split_name(name, f"--splits {spec!r}")
    if name in out:
      raise ValueError(f"--splits {spec!r}: split {name!r} given twice")
    try:
      frac = float(value)
    except ValueError:
      raise ValueError(f"--splits {spec!r}: fraction {value!r} of {name!r} is not a "
                       "number") from None
    if not frac > 0:
      raise ValueError(f"--splits {spec!r}: fraction of {name!r} must be > 0 (omit the split "
                       "instead)")
    out[name] = frac
  if abs(sum(out.values()) - 1.0) > 1e-6:
    raise ValueError(f"--splits {spec!r}: fractions sum to {sum(out.values()):g}, not 1")
  return out


def apportion(total: int, weights: list[float]) -> list[int]:
  """Integers proportional to weights that sum to total (largest remainder; ties: first)."""
  s = float(sum(weights))
  ideal = [total * w / s for w in weights]
  counts = [int(np.floor(x)) for x in ideal]
  order = sorted(range(len(weights)), key=lambda i: (-(ideal[i] - counts[i]), i))
  for i in order[:total - sum(counts)]:
    counts[i] += 1
  return counts


def split_sizes(num_patients: int, fractions: list[float]) -> list[int]:
  """Patients per split; every split gets >= 1 while there are at least as many patients."""
  counts = apportion(num_patients, fractions)
  if num_patients >= len(fractions):
    for i in range(len(counts)):
      if counts[i] == 0:
        donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
        counts[donor] -= 1
        counts[i] = 1
  return counts


def stratum_counts(strata_sizes: list[int], totals: list[int]) -> list[list[int]]:
  """Split each stratum's size over the splits so that rows and columns add up exactly.

  Row c sums to strata_sizes[c], column s to totals[s]. Each cell starts at the floor of its
  proportional share; the leftover units go to the largest remainders whose column still has
  room, one per cell and pass (further passes only when a pass could not place them all).
  """
  n = sum(strata_sizes)
  if sum(totals) != n:
    raise ValueError(f"split totals {totals} do not add up to {n} patients")
  ideal = [[size * t / n if n else 0.0 for t in totals] for size in strata_sizes]
  cells = [[int(np.floor(x)) for x in row] for row in ideal]
  need = [size - sum(row) for size, row in zip(strata_sizes, cells)]
  room = [t - sum(row[s] for row in cells) for s, t in enumerate(totals)]
  order = sorted(((c, s) for c in range(len(cells)) for s in range(len(totals))),
                 key=lambda cs: (-(ideal[cs[0]][cs[1]] - cells[cs[0]][cs[1]]), cs))
  while any(need):
    for c, s in order:
      if need[c] > 0 and room[s] > 0:
        cells[c][s] += 1
        need[c] -= 1
        room[s] -= 1
  return cells


def patient_strata(videos: Iterable[tuple[str, str]]) -> dict[str, str]:
  """(patient, label) per video -> each patient's most common non-empty label ('' if none)."""
  votes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for patient, label in videos:
    votes[patient][label] += 0 if label == "" else 1
  return {p: min(c, key=lambda lab: (-c[lab], lab == "", lab)) for p, c in votes.items()}


def assign_splits(strata: Mapping[str, str | int], fractions: Mapping[str, float],
                  seed: int) -> dict[str, str]:
  """patient -> split name, patient-disjoint, stratified by ``strata`` (patient -> label).

  The one rule for patients into named fractions: data_prep's --splits and the evaluations'
  ``ssl_us.eval.splits.group_split`` both use it. Labels may be str or int (not mixed).
  """
  names = list(fractions)
  totals = split_sizes(len(strata), [fractions[k] for k in names])
  by_stratum: dict[str, list[str]] = collections.defaultdict(list)
  for patient in sorted(strata):
    by_stratum[strata[patient]].append(patient)
  keys = sorted(by_stratum)
  cells = stratum_counts([len(by_stratum[k]) for k in keys], totals)
  rng = np.random.default_rng(seed)
  out: dict[str, str] = {}
  for key, row in zip(keys, cells):
    patients = by_stratum[key]
    order = rng.permutation(len(patients))
    pos = 0
    for name, count in zip(names, row):
      for i in order[pos:pos + count]:
        out[patients[i]] = name
      pos += count
  return out


def check_patient_disjoint(rows: Iterable[tuple[str, str, str]]) -> None:
  """(patient, split, where) rows: ValueError naming a patient found in two splits."""
  seen: dict[str, tuple[str, str]] = {}
  for patient, split, where in rows:
    if patient in seen and seen[patient][0] != split:
      first_split, first_where = seen[patient]
      raise ValueError(f"patient {patient!r} is in two splits: {first_where} is in "
                       f"{first_split!r} but {where} is in {split!r}")
    seen.setdefault(patient, (split, where))
