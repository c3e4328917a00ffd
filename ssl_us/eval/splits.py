"""Patient-grouped splits, stratified k-fold and label fractions drawn by patient.

Every function works on record-level arrays ``groups`` (patient of each record) and ``labels``
(class id of each record) and returns record indices, so a patient's records always travel
together: no patient is ever on both sides of a split.

Stratification is by the patient's label (the most frequent label among its records, ties to
the smaller id). k-fold: patients of each class are shuffled with ``seed`` and dealt
round-robin, the deal continuing across classes, so every fold gets floor or ceil of (patients
of class c) / k patients of class c and the fold sizes in patients differ by at most one.
Named splits are data_prep's patient assignment (``data_prep.splits.assign_splits``), the one
rule for "patients into named fractions" in this project: split sizes in patients by largest
remainder, each class divided over them so that rows and columns add up exactly.

Label fractions: from the training records, ``round(fraction * n_c)`` patients of each class c
(at least 1) are kept, the first ones of a seeded per-class permutation, so for one seed the
subsets are nested (5% inside 10% inside 30% ...).
"""
from __future__ import annotations

import numpy as np

from data_prep import splits as prep_splits


def _check(groups, labels) -> tuple[np.ndarray, np.ndarray]:
  groups, labels = np.asarray(groups), np.asarray(labels)
  if groups.ndim != 1 or groups.shape != labels.shape:
    raise ValueError(f"groups {groups.shape} and labels {labels.shape} must be equal 1-D arrays")
  if labels.size and labels.min() < 0:
    bad = np.unique(groups[labels < 0])[:5].tolist()
    raise ValueError(f"{int((labels < 0).sum())} records have no label (-1), e.g. patients {bad}; "
                     "select labelled records before splitting")
  return groups, labels


def patient_labels(groups, labels) -> tuple[np.ndarray, np.ndarray]:
  """(unique patients (P,), label of each patient (P,)): the most frequent record label."""
  groups, labels = _check(groups, labels)
  patients, inv = np.unique(groups, return_inverse=True)
  counts = np.zeros((patients.size, int(labels.max()) + 1 if labels.size else 1), np.int64)
  np.add.at(counts, (inv, labels), 1)
  return patients, counts.argmax(axis=1)


def _deal(groups, labels, k: int, seed: int) -> dict:
  """patient -> bucket in [0, k): per-class seeded shuffle, dealt round-robin across classes."""
  patients, plabels = patient_labels(groups, labels)
  if patients.size < k:
    raise ValueError(f"cannot split {patients.size} patients into {k} groups")
  rng = np.random.default_rng(seed)
  bucket, nxt = {}, 0
  for c in np.unique(plabels):
    for p in rng.permutation(patients[plabels == c]):
      bucket[p] = nxt % k
      nxt += 1
  return bucket


def group_kfold(groups, labels, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
  """k (train_idx, test_idx) pairs; each patient is in exactly one test fold."""
  groups, labels = _check(groups, labels)
  if k < 2:
    raise ValueError(f"k-fold needs k >= 2, got {k}")
  bucket = _deal(groups, labels, k, seed)
  fold = np.array([bucket[g] for g in groups])
  return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(k)]


def group_split(groups, labels, fractions: dict[str, float],
                seed: int = 0) -> dict[str, np.ndarray]:
  """Named record-index splits, e.g. {'train': .8, 'val': .1, 'test': .1}, grouped by patient.

  The patients, stratified by their label, go to the splits by
  ``data_prep.splits.assign_splits`` (the rule data_prep's --splits uses): split s gets its
  largest-remainder share of all patients, and each class's share of it.
  """
  groups, labels = _check(groups, labels)
  total = sum(fractions.values())
  if not np.isclose(total, 1.0) or min(fractions.values()) <= 0:
    raise ValueError(f"split fractions must be positive and sum to 1, got {fractions}")
  patients, plabels = patient_labels(groups, labels)
  split_of = prep_splits.assign_splits(
      {str(p): int(c) for p, c in zip(patients, plabels)}, fractions, seed)
  which = np.array([split_of[str(g)] for g in groups])
  out = {}
  for name in fractions:
    out[name] = np.flatnonzero(which == name)
    if out[name].size == 0:
      raise ValueError(f"split {name!r} gets no patients out of {patients.size}")
  return out


def label_fraction(indices, groups, labels, fraction: float, seed: int = 0) -> np.ndarray:
  """The records (subset of ``indices``) of round(fraction * n_c) patients of every class c."""
  if not 0 < fraction <= 1:
    raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
  indices = np.asarray(indices)
  groups, labels = _check(groups, labels)
  g, y = groups[indices], labels[indices]
  patients, plabels = patient_labels(g, y)
  rng = np.random.default_rng(seed)
  keep = []
  for c in np.unique(plabels):
    members = rng.permutation(patients[plabels == c])
    keep.extend(members[:max(1, int(np.floor(fraction * members.size + 0.5)))])
  return indices[np.isin(g, np.asarray(keep))]
