"""``python -m data_prep --input PATH --output DIR [options]`` (also ``./run.sh prep ...``).

Turns a folder of ultrasound videos (or a manifest CSV) into a TFDS-compatible dataset of
sharded TFRecord files of tf.train.Example (see data_prep/schema.py), split by patient, with an
audit report. A thin wrapper of ``data_prep.build``: every flag is a keyword argument of it.

Examples:
  # COVID-BLUES by folder: labels from the class folders, patients from the file names
  python -m data_prep --input /work/shared/data/covid_blues --output /tmp/ds --fps 3 \\
      --patient_regex 'patient_(?P<patient>\\d+)_'
  # the same from the manifest (its 'file' column is the path, relative to the manifest)
  python -m data_prep --input /work/shared/data/manifest.csv --output /tmp/ds --clip_len 16
  # as an Apache Beam pipeline (pip install -e '.[beam]'): DirectRunner on this machine ...
  python -m data_prep --input /work/shared/data/covid_blues --output /tmp/ds --runner beam
  # ... or a cluster, by Beam's own pipeline options (see data_prep/README.md)
  python -m data_prep ... --salt S --runner beam --beam_options "--runner=FlinkRunner \
      --flink_master=host:8081 --environment_type=PROCESS ..."

Exit status: 0 all inputs written; 3 finished, but some inputs were rejected (the summary lists
them); 1 the build failed or stopped (--strict, a bad option or input: the message says why);
2 bad command line.
"""
from __future__ import annotations

import argparse
import sys

from data_prep import pipeline
from data_prep import config as config_lib
from data_prep import report as report_lib

EXIT_OK, EXIT_FAILED, EXIT_REJECTS = 0, 1, 3
RETIRED_FLAGS = ("--task_index", "--num_tasks", "--merge")


def parser() -> argparse.ArgumentParser:
  """The argument parser; its defaults are BuildConfig's."""
  d = config_lib.BuildConfig
  p = argparse.ArgumentParser(
      prog="python -m data_prep", description=__doc__.split("\n\n")[1],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="\n\n".join(__doc__.split("\n\n")[2:]))
  g = p.add_argument_group("input")
  g.add_argument("--input", required=True,
                 help="a folder (searched recursively for videos, DICOM, images and folders of "
                 "frames) or a manifest .csv")
  g.add_argument("--root", default=d.root,
                 help="folder that manifest paths are relative to (default: the manifest's)")
  g.add_argument("--path_column", default=d.path_column,
                 help="manifest column with the paths (default: 'path', else 'file')")
  g.add_argument("--patient_column", default=d.patient_column,
                 help="manifest column with patient ids (default: 'patient_id')")
  g.add_argument("--frame_labels", default=d.frame_labels,
                 help="CSV video_id,frame_index,anatomy_coarse,anatomy_fine of per-frame labels")
  g.add_argument("--label_rule", default=d.label_rule, choices=("top", "parent", "none"),
                 help="label from folder names where the manifest gives none: 'top' = the first "
                 "folder under the input root (root/<label>/.../file; default for a folder "
                 "input), 'parent' = the folder holding the file, 'none' (default for a "
                 "manifest)")
  g.add_argument("--patient_regex", default=d.patient_regex,
                 help="regex searched in each path relative to the root; group 'patient' (or "
                 "group 1) is the patient id, optional groups 'exam' and 'side' fill those; "
                 "fills what the manifest leaves empty. Without patient ids every video is its "
                 "own patient. E.g. 'patient_(?P<patient>\\d+)_'")
  g.add_argument("--drop_columns", default="",
                 help="comma-separated manifest columns not to keep in the records' metadata "
                 "(identifier-like columns are dropped anyway, see the report)")
  g = p.add_argument_group("sampling (at most one of --fps, --every, --clip_len; none: all "
                           "frames)")
  g.add_argument("--fps", type=float, default=d.fps,
                 help="frames at this rate (one record per frame)")
  g.add_argument("--every", type=int, default=d.every,
                 help="every N-th frame (one record per frame)")
  g.add_argument("--clip_len", type=int, default=d.clip_len,
                 help="clips of this many frames (one record per clip)")
  g.add_argument("--clip_stride", type=int, default=d.clip_stride,
                 help="frames between the frames of a clip")
  g.add_argument("--clip_hop", type=int, default=d.clip_hop,
                 help="frames between clip starts (default 0 = one clip span: no overlap)")
  g.add_argument("--short_clips", default=d.short_clips, choices=("loop", "pad", "reject"),
                 help="a video shorter than one clip: loop it, repeat its last frame, or reject "
                 "it; looped/padded frames are counted in the record's 'padded'")
  g = p.add_argument_group("frames")
  g.add_argument("--size", type=int, nargs="+", default=list(d.size), metavar="N",
                 help="output frame size: N (square) or H W (default 128 128); grayscale")
  g.add_argument("--frame_encoding", default=d.frame_encoding, choices=("png", "raw"),
                 help="how frames are stored: 'png' (lossless, about 2.7x smaller) or 'raw' "
                 "uint8 bytes (no decoding when training reads them; for input-bound "
                 "accelerator hosts)")
  g.add_argument("--min_size", type=int, default=d.min_size,
                 help="reject sources (and scan areas) smaller than this many pixels")
  g.add_argument("--region_samples", type=int, default=d.region_samples,
                 help="frames per video used to find the scan area")
  g = p.add_argument_group("splits and privacy")
  g.add_argument("--splits", default=d.splits,
                 help="name=fraction,... by patient, stratified by label (ignored when the "
                 "manifest has a 'split' column)")
  g.add_argument("--seed", type=int, default=d.seed, help="seed of the splits and previews")
  g.add_argument("--salt", default=d.salt,
                 help="secret salt of the patient hash (HMAC-SHA256); default: a random salt "
                 "made per build and deleted when it finishes (hashes then differ between "
                 "builds)")
  g.add_argument("--keep_patient_id", action="store_true",
                 help="store raw patient ids instead of salted hashes, and leave their text in "
                 "paths (video_id, source, the report) as it is")
  g.add_argument("--id_key", default=d.id_key, metavar="CSV",
                 help="also write, outside --output, a CSV from each video_id as written to "
                 "the file it was read from and its patient field: the key that re-identifies "
                 "the dataset, for the site that keeps the data (on a finished build: only "
                 "with the --salt it was built with)")
  g.add_argument("--keep_uids", action="store_true",
                 help="keep file/folder names shaped like DICOM UIDs (default: replaced by "
                 "'uid-<salted hash>' in video_id, source, metadata and the report)")
  g = p.add_argument_group("output")
  g.add_argument("--output", required=True,
                 help="output folder; the dataset is <output>/<name>/<version>/")
  g.add_argument("--name", default=d.name, help="dataset name (shard prefix)")
  g.add_argument("--version", default=d.version, help="dataset version folder")
  g.add_argument("--shard_mb", type=float, default=d.shard_mb, help="target shard size, MB")
  g.add_argument("--previews", type=int, default=d.previews,
                 help="before/after crop previews of the first N videos (report/previews)")
  g.add_argument("--random_previews", type=int, default=d.random_previews,
                 help="... and of N more videos picked at random")
  g.add_argument("--overwrite", action="store_true",
                 help="delete <output>/<name>/<version> first (finished or not)")
  g = p.add_argument_group("running")
  g.add_argument("--num_workers", type=int, default=d.num_workers,
                 help="worker processes (default -1: one per CPU core; 0: in this process)")
  g.add_argument("--video_timeout", type=float, default=d.video_timeout,
                 help="seconds one video may take in a worker process before the worker is "
                 "stopped and the video rejected ('timeout'); 0: no limit; not applied with "
                 "--num_workers 0")
  g.add_argument("--runner", default=d.runner, choices=config_lib.RUNNERS,
                 help="'local': worker processes on this machine (default; resumable); "
                 "'beam': an Apache Beam pipeline (needs the [beam] extra), on the "
                 "DirectRunner with --num_workers processes unless --beam_options names "
                 "another runner")
  g.add_argument("--beam_options", default=d.beam_options,
                 help="Beam pipeline options as one string, e.g. \"--runner=FlinkRunner "
                 "--flink_master=host:8081\" (see data_prep/README.md)")
  for flag in RETIRED_FLAGS:  # the scheme --runner beam replaced: a clear error, not 'unknown'
    g.add_argument(flag, nargs="?", const="", default=None, help=argparse.SUPPRESS)
  g.add_argument("--buffer_mb", type=float, default=d.buffer_mb,
                 help="per worker: a video whose needed frames fit is decoded once, a bigger "
                 "one twice")
  g.add_argument("--strict", action="store_true",
                 help="stop at the first rejected input (default: reject, report, go on)")
  g.add_argument("--no_progress", action="store_true", help="no progress bar")
  return p


def parse(argv=None) -> tuple[str, str, dict]:
  """(input, output, the keyword arguments of ``build``) from a command line."""
  p = parser()
  args = vars(p.parse_args(argv))
  retired = [f for f in RETIRED_FLAGS if args.pop(f[2:]) is not None]
  if retired:
    p.error(f"{', '.join(retired)}: removed; to spread a build over machines, run it as a Beam "
            "pipeline: --runner beam --beam_options '--runner=FlinkRunner ...' (see "
            "data_prep/README.md)")
  args["progress"] = not args.pop("no_progress")
  return args.pop("input"), args.pop("output"), args


def main(argv=None) -> int:
  """Run the CLI; returns the exit status."""
  input_path, output, args = parse(argv)
  try:
    report = pipeline.build(input_path, output, **args)
  except (ValueError, pipeline.BuildError) as e:
    print(f"data_prep: error: {e}", file=sys.stderr)
    return EXIT_FAILED
  print(report_lib.summary_text(report), end="")
  return EXIT_REJECTS if report["counts"]["rejected"] else EXIT_OK

