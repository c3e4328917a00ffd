"""Inputs: a folder tree or a manifest CSV -> one ``Entry`` per video, plus frame labels.

Folder input: every supported file (``readers.is_supported``) below the folder is one video, and
so is every sub-folder that ``readers.is_supported`` calls a folder of frames (it is not searched
further). Other files are listed as ignored in the report. Files are taken in sorted path order.

Manifest input (a .csv file): one row per video. Columns:

- ``path`` (or ``file``, or the column named by ``path_column``): the video, relative to ``root``
  (default: the manifest's folder) unless absolute. Required.
- ``video_id``: unique id (default: the path relative to ``root``).
- ``patient_id`` (or the column named by ``patient_column``), ``label``, ``exam``, ``side``,
  ``split``: optional.
- any other column is kept, per video, in the record's ``metadata`` JSON, except columns that
  look like personal identifiers (by name: patient name, birth date, study date, UIDs, MRN,
  address, ...; or because a row's value repeats that row's patient id) and ``drop_columns``;
  the report lists every dropped column and why.

Rules that fill what the manifest leaves empty (and all of it for a folder):

- ``patient_regex`` is searched in the path relative to the root ('/' separators). Its group
  ``patient`` (or, without named groups, group 1) is the patient id; optional groups ``exam``
  and ``side`` fill those fields. E.g. COVID-BLUES: ``patient_(?P<patient>\\d+)_``.
  A video the regex does not match is rejected (reason ``no_patient``).
- without a patient id (no column, no regex) a video is its own patient; the report warns.
- ``label_rule`` names the label after a folder: ``top``, the first folder below the root
  (``root/<label>/.../video.mp4``, the ImageFolder convention; the default for folder input),
  ``parent``, the folder that holds the file, or ``none`` (the default for a manifest). A file
  directly in the root gets no label.

Privacy (``Redactor``): patient ids are hashed (``hash_patient``) unless asked otherwise, and so
is their text in what is written (video_id, source, label, exam, side, metadata values, the
report: a folder or file named after a record number); file or folder names shaped like DICOM
UIDs are replaced by a salted hash (``redact_uids``) unless ``keep_uids``.

Frame labels (a CSV with ``video_id, frame_index, anatomy_coarse, anatomy_fine``; an empty cell
is no label) give per-frame anatomy classes; their ids index the sorted name vocabularies.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import hmac
import os
import re
from typing import Callable, Iterable

import numpy as np

from data_prep import splits as splits_lib

KNOWN_COLUMNS = ("path", "video_id", "patient_id", "label", "exam", "side", "split")
LABEL_RULES = ("top", "parent", "none")
# Column names that hold personal identifiers: distinctive words anywhere, short ones as tokens.
_IDENTIFIER_WORDS = re.compile(
    r"birth|accession|surname|medical_?record|social_?security|e_?mail|phone|address|physician|"
    r"institution|patient_?name|person_?name|studydate|seriesdate|acquisitiondate|contentdate|"
    r"studytime|instanceuid|sop_?uid")
_IDENTIFIER_TOKENS = re.compile(
    r"(^|_)(name|dob|mrn|ssn|uid|first_?name|last_?name|given_?name|family_?name|full_?name|"
    r"study_?date|series_?date|acquisition_?date|content_?date|study_?time|operator)(_|$)")
_UID = re.compile(r"(?<![\w.])[0-2](?:\.\d+){4,}(?=$|[^\w.]|\.[A-Za-z])")
FRAME_LABEL_COLUMNS = ("video_id", "frame_index")
ANATOMY_COLUMNS = ("anatomy_coarse", "anatomy_fine")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One input video and what is known about it before reading it."""
  path: str                 # absolute path of the file or frames folder
  source: str               # path relative to the input root, '/' separators
  video_id: str
  patient_id: str           # raw id; only its salted hash reaches the records by default
  label: str = ""
  exam: str = ""
  side: str = ""
  split: str = ""           # from the manifest; assigned later when empty
  metadata: tuple[tuple[str, str], ...] = ()  # kept manifest columns, in column order
  where: str = ""           # for messages: 'manifest.csv line 7' or the relative path
  patient_given: bool = True  # False: no patient id was found, the video is its own patient
  reject: str = ""          # audit reason code when the entry cannot be used at all
  reject_message: str = ""


@dataclasses.dataclass
class Inputs:
  """Everything read from the input before any video is decoded."""
  root: str
  kind: str                                   # 'folder' | 'manifest'
  entries: list[Entry]
  ignored: list[dict]                         # {'source', 'reason'} for unused folder files
  dropped_columns: dict[str, str]             # column -> why it is not kept
  warnings: list[str]


@dataclasses.dataclass(frozen=True)
class FrameLabels:
  """Per-video frame labels as arrays of (sorted) frame indices and class ids."""
  coarse_names: tuple[str, ...]
  fine_names: tuple[str, ...]
  by_video: dict                              # video_id -> (frame_idx, coarse_id, fine_id)
  source: str = ""

  def of_video(self, video_id: str) -> tuple | None:
    """(frame_idx, coarse_id, fine_id) arrays of one video, None if it has no frame labels."""
    return self.by_video.get(video_id)


def label_ids(labels: tuple | None, indices) -> tuple[list[int], list[int]]:
  """(coarse ids, fine ids) of the given frames from ``FrameLabels.of_video``; -1 = none."""
  n = len(indices)
  if labels is None:
    return [-1] * n, [-1] * n
  frames, coarse, fine = labels
  idx = np.asarray(indices, np.int64)
  pos = np.minimum(np.searchsorted(frames, idx), len(frames) - 1)
  hit = frames[pos] == idx
  return np.where(hit, coarse[pos], -1).tolist(), np.where(hit, fine[pos], -1).tolist()



def hash_patient(patient_id: str, salt: bytes) -> str:
  """Salted, keyed hash of a patient id: 16 hex chars of HMAC-SHA256(salt, id)."""
  return hmac.new(salt, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def redact_uids(text: str, salt: bytes) -> str:
  """``text`` with every DICOM-UID-shaped part (>= 5 dot-separated numbers, the first 0, 1 or
  2, >= 10 characters; e.g. a file named by its SOPInstanceUID) replaced by 'uid-<hash>'."""
  def sub(m):
    uid = m.group(0)
    return f"uid-{hash_patient(uid, salt)}" if len(uid) >= 10 else uid
  return _UID.sub(sub, text)


PATIENT_TOKEN = re.compile(r"(?:patient|uid)-[0-9a-f]{16}")  # what the Redactor writes
LONG_ID = 5  # patient ids of this many characters or more are replaced wherever they occur


@dataclasses.dataclass(frozen=True)
class Redactor:
  """De-identifies every string data_prep writes (records, report, preview names).

  - Patient ids of the input become 'patient-<hash>', the hash the records' ``patient`` field
    holds: an id of ``LONG_ID`` or more characters wherever it occurs (e.g. a record number in
    a folder and a file name); a shorter one (a study number such as COVID-BLUES's 1-63, which
    would also match version numbers and zones) where the patient regex finds it.
  - DICOM-UID-shaped parts become 'uid-<hash>' (``redact_uids``).

  Tokens already written are left alone, so a string can go through twice.
  """
  salt: bytes
  patient_ids: frozenset = frozenset()   # raw ids, as read (before UID redaction)
  regex: re.Pattern | None = None        # --patient_regex
  uids: bool = True
  patients: bool = True                  # False: --keep_patient_id

  @classmethod
  def of_entries(cls, entries: Iterable[Entry], salt: bytes, regex: re.Pattern | None,
                 patients: bool, uids: bool) -> Redactor:
    """For these entries: their given patient ids if ``patients``, UIDs if ``uids``."""
    ids = frozenset(e.patient_id for e in entries if e.patient_given and e.patient_id)
    return cls(salt=salt, patient_ids=ids if patients else frozenset(), regex=regex, uids=uids,
               patients=patients)

  def patient(self, patient_id: str) -> str:
    """A patient id as the records' ``patient`` field holds it: its salted hash (of the id
    without UIDs), or with ``patients`` off the id itself."""
    patient_id = redact_uids(patient_id, self.salt) if self.uids else patient_id
    return hash_patient(patient_id, self.salt) if self.patients else patient_id

  def text(self, text: str) -> str:
    if self.patient_ids:
      spans = self._patient_spans(text)
      for start, end in reversed(spans):
        text = f"{text[:start]}patient-{self.patient(text[start:end])}{text[end:]}"
    return redact_uids(text, self.salt) if self.uids else text

  def entry(self, entry: Entry) -> Entry:
    """The entry with every field that reaches the records de-identified; its patient id only
    loses UIDs (it is hashed on its way out), its path stays as it is (it is read), and the
    report, which holds the rest, goes through ``tree``."""
    uid_only = redact_uids(entry.patient_id, self.salt) if self.uids else entry.patient_id
    return dataclasses.replace(
        entry, video_id=self.text(entry.video_id), source=self.text(entry.source),
        patient_id=uid_only, label=self.text(entry.label), exam=self.text(entry.exam),
        side=self.text(entry.side), metadata=tuple((k, self.text(v)) for k, v in entry.metadata))

  def tree(self, obj):
    """Every string in a JSON-like tree (dict keys included) through ``text``."""
    if isinstance(obj, str):
      return self.text(obj)
    if isinstance(obj, dict):
      return {self.tree(k): self.tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
      return [self.tree(v) for v in obj]
    return obj

  @functools.cached_property
  def _long_lengths(self) -> list[int]:
    return sorted({len(p) for p in self.patient_ids if len(p) >= LONG_ID}, reverse=True)

  def _patient_spans(self, text: str) -> list[tuple[int, int]]:
    """Non-overlapping (start, end) of the patient ids in ``text``, in order."""
    taken = [m.span() for m in PATIENT_TOKEN.finditer(text)]
    found = []
    if self.regex is not None:
      group = "patient" if "patient" in self.regex.groupindex else 1
      found += [m.span(group) for m in self.regex.finditer(text)
                if m.group(group) in self.patient_ids]
    for i in range(len(text)):
      for n in self._long_lengths:
        if text[i:i + n] in self.patient_ids:
          found.append((i, i + n))
          break
    spans, end = [], 0
    for s in sorted(found, key=lambda s: (s[0], -s[1])):  # leftmost, then longest
      if s[0] >= end and not any(t[0] < s[1] and s[0] < t[1] for t in taken):
        spans.append(s)
        end = s[1]
    return spans


def label_from_folder(source: str, rule: str) -> str:
  """The label a folder rule gives to a path relative to the root ('' for none)."""
  parts = source.split("/")
  if rule == "none" or len(parts) < 2:
    return ""
  return parts[0] if rule == "top" else parts[-2]


def compile_patient_regex(pattern: str) -> re.Pattern | None:
  """The --patient_regex, checked to have a 'patient' group or at least one group."""
  if not pattern:
    return None
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"--patient_regex {pattern!r}: {e}") from None
  if "patient" not in rx.groupindex and rx.groups < 1:
    raise ValueError(f"--patient_regex {pattern!r}: needs a group (?P<patient>...) or (...) "
                     "that captures the patient id")
  return rx


def regex_fields(rx: re.Pattern | None, source: str) -> dict[str, str] | None:
  """{'patient', 'exam', 'side'} from the regex on a relative path; None if it does not match."""
  if rx is None:
    return {}
  m = rx.search(source)
  if m is None:
    return None
  groups = m.groupdict()
  out = {k: groups.get(k) or "" for k in ("exam", "side")}
  out["patient"] = groups["patient"] if "patient" in rx.groupindex else m.group(1)
  out["patient"] = out["patient"] or ""
  return out


def scan_folder(root: str, is_supported: Callable[[str], bool]) -> tuple[list[str], list[dict]]:
  """Videos (relative paths, sorted) and ignored files ({'source', 'reason'}) below root."""
  videos, ignored = [], []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    rel_dir = os.path.relpath(dirpath, root)
    keep = []
    for d in dirnames:
      full = os.path.join(dirpath, d)
      if is_supported(full):
        videos.append(_rel(rel_dir, d))
      else:
        keep.append(d)
    dirnames[:] = keep
    for f in sorted(filenames):
      (videos if is_supported(os.path.join(dirpath, f)) else ignored).append(_rel(rel_dir, f))
  ignored = [{"source": s, "reason": "unsupported file type"} for s in sorted(ignored)]
  return sorted(videos), ignored


def _rel(rel_dir: str, name: str) -> str:
  return name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"


def read_csv(path: str) -> tuple[list[str], list[dict]]:
  """(header, rows) of a CSV file; each row carries its line number as '_line'."""
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      header = list(reader.fieldnames or [])
      dupes = sorted({c for c in header if header.count(c) > 1})
      if dupes:
        raise ValueError(f"{path}: column(s) {dupes} appear more than once")
      rows = []
      for row in reader:
        if None in row:
          raise ValueError(f"{path} line {reader.line_num}: more cells than columns")
        row["_line"] = reader.line_num
        rows.append(row)
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e})") from None
  return header, rows


def path_column_of(path: str, header: list[str], path_column: str = "") -> str:
  """The manifest's path column: path_column, else 'path', else its alias 'file'."""
  column = path_column or ("path" if "path" in header else "file")
  if column not in header:
    raise ValueError(f"{path}: no {column!r} column (found {header}); the manifest needs "
                     "'path' (or 'file', or --path_column NAME)")
  return column


def identifier_columns(header: list[str], rows: list[dict], patient_column: str,
                       known: Iterable[str]) -> dict[str, str]:
  """Unknown columns that look like personal identifiers -> why they are dropped."""
  out = {}
  for col in header:
    if col in known:
      continue
    norm = re.sub(r"[^a-z0-9]+", "_", col.lower()).strip("_")
    if _IDENTIFIER_WORDS.search(norm) or _IDENTIFIER_TOKENS.search(norm):
      out[col] = "name looks like a personal identifier"
    elif patient_column in header and any(
        (r.get(patient_column) or "").strip() and
        (r.get(col) or "").strip() == (r.get(patient_column) or "").strip() for r in rows):
      out[col] = f"values repeat {patient_column!r}"
  return out


def _fill(entry_fields: dict, source: str, rx, label_rule: str) -> tuple[dict, str]:
  """Fill empty patient/exam/side from the regex and an empty label from the folder rule."""
  fields = dict(entry_fields)
  found = regex_fields(rx, source)
  if found is None and not fields["patient_id"]:
    return fields, "no_patient"
  for k, v in (found or {}).items():
    key = "patient_id" if k == "patient" else k
    fields[key] = fields[key] or v
  fields["label"] = fields["label"] or label_from_folder(source, label_rule)
  return fields, ""


def _rel_source(root: str, path: str) -> str:
  rel = os.path.relpath(path, root)
  return rel.replace(os.sep, "/") if not rel.startswith("..") else path.replace(os.sep, "/")


def _make_entry(path, source, fields, metadata, where, rx, label_rule, exists) -> Entry:
  fields, reject = _fill(fields, source, rx, label_rule)
  message = ""
  if reject:
    message = f"{where}: --patient_regex does not match {source!r}"
  elif not exists(path):
    reject, message = "missing_file", f"{where}: {path} does not exist"
  return Entry(path=path, source=source, metadata=metadata, where=where, reject=reject,
               reject_message=message, **fields)


def folder_inputs(root: str, is_supported, rx, label_rule: str) -> Inputs:
  """Inputs of a folder tree."""
  videos, ignored = scan_folder(root, is_supported)
  entries = []
  for source in videos:
    fields = dict(video_id=source, patient_id="", label="", exam="", side="", split="")
    entries.append(_make_entry(os.path.join(root, *source.split("/")), source, fields, (),
                               source, rx, label_rule, os.path.exists))
  return Inputs(root=root, kind="folder", entries=entries, ignored=ignored, dropped_columns={},
                warnings=[])


def manifest_inputs(manifest: str, root: str, is_supported, rx, label_rule: str, *,
                    path_column: str = "", patient_column: str = "",
                    drop_columns: Iterable[str] = ()) -> Inputs:
  """Inputs of a manifest CSV (see the module docstring for the columns)."""
  header, rows = read_csv(manifest)
  pcol = path_column_of(manifest, header, path_column)
  patient_column = patient_column or "patient_id"
  if patient_column != "patient_id" and patient_column not in header:
    raise ValueError(f"{manifest}: --patient_column {patient_column!r} is not a column "
                     f"({header})")
  known = {pcol, patient_column} | set(KNOWN_COLUMNS)
  dropped = identifier_columns(header, rows, patient_column, known)
  for col in drop_columns:
    if col not in header:
      raise ValueError(f"{manifest}: --drop_columns names {col!r}, not a column ({header})")
    dropped[col] = "--drop_columns"
  kept = [c for c in header if c not in known and c not in dropped]
  name = os.path.basename(manifest)
  entries = []
  for row in rows:
    where = f"{name} line {row['_line']}"
    raw = (row.get(pcol) or "").strip()
    if not raw:
      raise ValueError(f"{where}: empty {pcol!r}")
    path = os.path.normpath(raw if os.path.isabs(raw) else os.path.join(root, raw))
    source = _rel_source(root, path)
    split = (row.get("split") or "").strip()
    if split:
      splits_lib.check_split_name(split, where)
    fields = dict(video_id=(row.get("video_id") or "").strip() or source,
                  patient_id=(row.get(patient_column) or "").strip(),
                  label=(row.get("label") or "").strip(), exam=(row.get("exam") or "").strip(),
                  side=(row.get("side") or "").strip(), split=split)
    metadata = tuple((c, row.get(c) or "") for c in kept)
    entry = _make_entry(path, source, fields, metadata, where, rx, label_rule, os.path.exists)
    if not entry.reject and not is_supported(path):
      entry = dataclasses.replace(entry, reject="unsupported",
                                  reject_message=f"{where}: {source!r} is not a supported "
                                  "video, image, DICOM file or folder of frames")
    entries.append(entry)
  split_col = "split" in header
  if split_col and any(not e.split for e in entries):
    empty = [e.where for e in entries if not e.split]
    raise ValueError(f"{manifest}: the split column is empty in {len(empty)} rows (e.g. "
                     f"{empty[0]}); fill it for every row or remove the column")
  return Inputs(root=root, kind="manifest", entries=entries, ignored=[],
                dropped_columns=dropped, warnings=[])


def finalize_entries(inputs: Inputs) -> None:
  """Give patient-less videos their own id as patient (with a warning), then check the input:
  unique video ids, and no patient in two of the manifest's splits."""
  no_patient = sum(not e.patient_id for e in inputs.entries if not e.reject)
  if no_patient:
    inputs.warnings.append(
        f"{no_patient} videos have no patient id (no patient column or --patient_regex): each is "
        "its own patient, so splits are by video")
  inputs.entries = [e if e.patient_id else
                    dataclasses.replace(e, patient_id=e.video_id, patient_given=False)
                    for e in inputs.entries]
  seen: dict[str, str] = {}
  for e in inputs.entries:
    if e.video_id in seen:
      raise ValueError(f"video_id {e.video_id!r} is used twice: {seen[e.video_id]} and {e.where}")
    seen[e.video_id] = e.where
  splits_lib.check_patient_disjoint((e.patient_id, e.split, e.where) for e in inputs.entries
                                    if e.split and not e.reject)


def read_frame_labels(path: str) -> FrameLabels:
  """The frame-label CSV -> FrameLabels (ids index the sorted anatomy name vocabularies)."""
  header, rows = read_csv(path)
  missing = [c for c in FRAME_LABEL_COLUMNS if c not in header]
  present = [c for c in ANATOMY_COLUMNS if c in header]
  if missing or not present:
    raise ValueError(f"{path}: needs columns video_id, frame_index and anatomy_coarse and/or "
                     f"anatomy_fine; found {header}")
  per_video: dict[str, dict[int, tuple[str, str]]] = {}
  for row in rows:
    where = f"{path} line {row['_line']}"
    vid = (row["video_id"] or "").strip()
    if not vid:
      raise ValueError(f"{where}: empty video_id")
    try:
      idx = int(row["frame_index"])
    except (TypeError, ValueError):
      raise ValueError(f"{where}: frame_index {row['frame_index']!r} is not an integer") from None
    if idx < 0:
      raise ValueError(f"{where}: frame_index {idx} is negative")
    names = tuple((row.get(c) or "").strip() for c in ANATOMY_COLUMNS)
    frames = per_video.setdefault(vid, {})
    if idx in frames and frames[idx] != names:
      raise ValueError(f"{where}: frame {idx} of {vid!r} is labelled twice, differently")
    frames[idx] = names
  coarse = tuple(sorted({v[0] for f in per_video.values() for v in f.values()} - {""}))
  fine = tuple(sorted({v[1] for f in per_video.values() for v in f.values()} - {""}))
  cid = {n: i for i, n in enumerate(coarse)} | {"": -1}
  fid = {n: i for i, n in enumerate(fine)} | {"": -1}
  by_video = {}
  for vid, frames in per_video.items():
    order = sorted(frames)
    by_video[vid] = (np.asarray(order, np.int64),
                     np.asarray([cid[frames[i][0]] for i in order], np.int64),
                     np.asarray([fid[frames[i][1]] for i in order], np.int64))
  return FrameLabels(coarse_names=coarse, fine_names=fine, by_video=by_video, source=path)


def check_frame_labels(labels: FrameLabels, entries: list[Entry]) -> None:
  """ValueError if frame labels name videos that are not in the input."""
  ids = {e.video_id for e in entries}
  unknown = sorted(set(labels.by_video) - ids)
  if unknown:
    raise ValueError(f"{labels.source}: {len(unknown)} video_id(s) are not in the input, e.g. "
                     f"{unknown[:3]} (input video ids look like {sorted(ids)[:2]})")
