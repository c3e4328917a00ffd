"""The options of a data_prep build (the CLI flags and the keyword arguments of ``build``)."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

from data_prep import manifest
from data_prep import schema
from data_prep import sampling
from data_prep import splits as splits_lib

# Options that do not change what is written: a resumed run may change them.
RUN_ONLY = ("num_workers", "strict", "overwrite", "progress", "salt", "id_key", "previews",
            "random_previews", "buffer_mb", "video_timeout", "runner", "beam_options")
# Options of earlier versions (the --task_index/--num_tasks/--merge scheme, replaced by
# --runner beam), still found in the metadata of datasets they made.
RETIRED = ("task_index", "num_tasks", "merge")
RUNNERS = ("local", "beam")


@dataclasses.dataclass(frozen=True)
class BuildConfig:
  """All build options; see ``data_prep.cli`` for what each one does."""
  input: str
  output: str
  name: str = "ultrasound"
  version: str = "1.0.0"
  root: str = ""
  path_column: str = ""
  patient_column: str = ""
  frame_labels: str = ""
  label_rule: str = ""                      # '' = 'top' for a folder, 'none' for a manifest
  patient_regex: str = ""
  drop_columns: tuple[str, ...] = ()
  fps: float = 0.0
  every: int = 0
  clip_len: int = 0
  clip_stride: int = 1
  clip_hop: int = 0
  short_clips: str = "loop"
  size: tuple[int, int] = (128, 128)
  frame_encoding: str = "png"               # 'png' (lossless, small) | 'raw' (cheap to decode)
  min_size: int = 32
  splits: str = splits_lib.DEFAULT_SPLITS
  seed: int = 0
  salt: str = ""
  keep_patient_id: bool = False
  keep_uids: bool = False
  id_key: str = ""                          # CSV: each video_id as written -> the file read
  num_workers: int = -1                     # -1 = one per CPU core; 0 = in this process
  video_timeout: float = 1800.0             # s per video in a worker process; 0 = no limit
  runner: str = "local"                     # 'local' (worker processes) | 'beam'
  beam_options: str = ""                    # Beam pipeline options, e.g. '--runner=FlinkRunner'
  shard_mb: float = 200.0
  region_samples: int = 16
  buffer_mb: float = 256.0
  previews: int = 4
  random_previews: int = 4
  strict: bool = False
  overwrite: bool = False
  progress: bool = True

  @classmethod
  def create(cls, input_path, output, **options) -> "BuildConfig":
    """Checked config from ``build``'s arguments; unknown options are an error."""
    names = {f.name for f in dataclasses.fields(cls)} - {"input", "output"}
    unknown = sorted(set(options) - names)
    if unknown:
      raise TypeError(f"unknown data_prep option(s) {unknown}; known: {sorted(names)}")
    if "size" in options:
      options["size"] = normalize_size(options["size"])
    if "drop_columns" in options:
      dc = options["drop_columns"]
      options["drop_columns"] = tuple(c.strip() for c in (dc.split(",") if isinstance(dc, str)
                                                          else dc) if c.strip())
    cfg = cls(input=os.path.abspath(os.fspath(input_path)), output=os.path.abspath(
        os.fspath(output)), **options)
    cfg.check()
    return cfg

  def check(self) -> None:
    """ValueError naming the option for any inconsistent or out-of-range value."""
    if not os.path.exists(self.input):
      raise ValueError(f"--input {self.input}: no such file or folder")
    if os.path.isfile(self.input) and not self.input.lower().endswith(".csv"):
      raise ValueError(f"--input {self.input}: a file input must be a manifest .csv")
    if os.path.isdir(self.input) and os.path.commonpath([self.input, self.dataset_dir]) == (
        self.input):
      raise ValueError(f"--output {self.output} is inside --input {self.input}: the output "
                       "would be read as input; pick an output folder outside it")
    if self.id_key:
      key = os.path.abspath(self.id_key)
      if os.path.commonpath([self.output, key]) == self.output:
        raise ValueError(f"--id_key {self.id_key} is inside --output {self.output}: the key "
                         "would travel with the dataset; keep it apart")
      if not os.path.isdir(os.path.dirname(key)):
        raise ValueError(f"--id_key {self.id_key}: no folder {os.path.dirname(key)}")
    if self.root and not os.path.isdir(self.root):
      raise ValueError(f"--root {self.root}: not a folder")
    if self.frame_labels and not os.path.isfile(self.frame_labels):
      raise ValueError(f"--frame_labels {self.frame_labels}: no such file")
    if self.label_rule and self.label_rule not in manifest.LABEL_RULES:
      raise ValueError(f"--label_rule {self.label_rule!r} is not one of {manifest.LABEL_RULES}")
    for flag in ("name", "version"):
      value = getattr(self, flag)
      if not value or "/" in value or value.startswith("."):
        raise ValueError(f"--{flag} {value!r}: must be a plain folder name")
    if not all(c.isalnum() or c == "_" for c in self.name):
      raise ValueError(f"--name {self.name!r}: letters, digits and '_' only (TFDS names)")
    if min(self.size) < 1:
      raise ValueError(f"--size {self.size}: must be positive")
    if self.frame_encoding not in schema.FRAME_ENCODINGS:
      raise ValueError(f"--frame_encoding {self.frame_encoding!r} is not one of "
                       f"{schema.FRAME_ENCODINGS}")
    if self.min_size < 1:
      raise ValueError(f"--min_size must be >= 1, got {self.min_size}")
    if self.runner not in RUNNERS:
      raise ValueError(f"--runner {self.runner!r} is not one of {RUNNERS}")
    if self.beam_options and self.runner != "beam":
      raise ValueError("--beam_options is for --runner beam")
    if not self.shard_mb > 0 or not self.buffer_mb > 0:
      raise ValueError("--shard_mb and --buffer_mb must be > 0")
    if not self.video_timeout >= 0:
      raise ValueError(f"--video_timeout must be >= 0 seconds, got {self.video_timeout}")
    if self.region_samples < 1:
      raise ValueError(f"--region_samples must be >= 1, got {self.region_samples}")
    if self.previews < 0 or self.random_previews < 0:
      raise ValueError("--previews and --random_previews must be >= 0")
    splits_lib.parse_fractions(self.splits)
    self.sampling  # validates the sampling flags

  @property
  def input_kind(self) -> str:
    return "manifest" if os.path.isfile(self.input) else "folder"

  @property
  def sampling(self) -> sampling.Sampling:
    """The sampling mode from --fps / --every / --clip_len (at most one)."""
    given = [flag for flag, v in (("--fps", self.fps), ("--every", self.every),
                                  ("--clip_len", self.clip_len)) if v]
    if len(given) > 1:
      raise ValueError(f"{' and '.join(given)} are mutually exclusive: pick one sampling mode")
    if self.fps:
      return sampling.Sampling(mode="fps", fps=self.fps)
    if self.every:
      return sampling.Sampling(mode="every", every=self.every)
    if self.clip_len:
      return sampling.Sampling(mode="clip", clip_len=self.clip_len, clip_stride=self.clip_stride,
                               clip_hop=self.clip_hop, short_clips=self.short_clips)
    return sampling.Sampling(mode="all")

  @property
  def dataset_dir(self) -> str:
    return os.path.join(self.output, self.name, self.version)

  @property
  def shard_bytes(self) -> int:
    return int(self.shard_mb * 2**20)

  @property
  def resolved_label_rule(self) -> str:
    return self.label_rule or ("top" if self.input_kind == "folder" else "none")

  def public_args(self) -> dict[str, Any]:
    """The options as stored in metadata.json and the report: never the salt itself."""
    args = dataclasses.asdict(self)
    args["size"] = list(self.size)
    args["drop_columns"] = list(self.drop_columns)
    args["salt"] = "given" if self.salt else "random, not stored"
    args["id_key"] = "written apart" if self.id_key else ""
    args["label_rule"] = self.resolved_label_rule
    return args

  def fingerprint(self) -> dict[str, Any]:
    """The options that decide the content: a resumed run must repeat them."""
    args = self.public_args()
    for k in RUN_ONLY:
      args.pop(k)
    args.pop("output")
    return args


def recorded_fingerprint(args: dict[str, Any]) -> dict[str, Any]:
  """The fingerprint in options a build recorded (metadata.json's args, or an unfinished
  build's work config), whatever data_prep version wrote them: run-only and retired options
  dropped, options added since filled with their defaults (a new option's default keeps the
  earlier behaviour, e.g. --frame_encoding png)."""
  out = {k: v for k, v in args.items() if k not in RUN_ONLY + RETIRED and k != "output"}
  for f in dataclasses.fields(BuildConfig):
    if f.name not in out and f.name not in RUN_ONLY + ("input", "output"):
      out[f.name] = f.default
  return out


def normalize_size(size) -> tuple[int, int]:
  """--size N or (H, W) -> (H, W)."""
  if isinstance(size, int):
    return (size, size)
  size = tuple(int(s) for s in size)
  if len(size) == 1:
    return (size[0], size[0])
  if len(size) != 2:
    raise ValueError(f"--size takes N or H W, got {size}")
  return size


def salt_digest(salt: bytes) -> str:
  """A check value that tells whether two runs used the same salt (kept in the work folder, and
  for a given --salt in the report)."""
  return hashlib.sha256(b"data_prep salt check:" + salt).hexdigest()[:16]
