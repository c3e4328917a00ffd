r"""The main job of ``./run.sh``: synthetic ultrasound -> shards -> SimCLR -> linear probe.

  python -m ssl_us.demo [--out demo_out] [--steps N] [--fresh]

1. Generate synthetic lung-ultrasound videos (data_prep.synthetic): 3 classes (normal, B-lines,
   consolidation) whose evidence is structural, patients, exams.
2. Build TFRecord shards with data_prep (every frame, 64x64, split by patient).
3. Pretrain SimCLR (configs/simclr_muscle.py:runlocal, 250 steps) on the train split, no labels.
4. Fit a linear classifier (logistic regression) on frozen features of the pretrained encoder and
   of a randomly initialised one (same architecture), on the train split's labels, and report
   frame-level accuracy on the held-out patients of the test split.

Every stage reuses its output when it is already complete (``--fresh`` starts over).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np


def log(msg):
  print(f"[demo] {msg}", flush=True)


def make_data(out: str, args) -> str:
  from data_prep import build, synthetic  # pylint: disable=g-import-not-at-top
  raw = os.path.join(out, "synthetic")
  manifest = os.path.join(raw, "manifest.csv")
  if not os.path.exists(manifest):
    log(f"generating synthetic videos in {raw}")
    synthetic.generate(raw, num_patients=args.patients, videos_per_patient=3,
                       frames=args.frames, size=128, seed=0)
  log("building shards with data_prep")
  report = build(manifest, os.path.join(out, "shards"), name="synthetic_lung", size=(64, 64),
                 frame_labels=os.path.join(raw, "frame_labels.csv"),
                 splits="train=0.7,test=0.3", num_workers=2, progress=False,
                 salt="ssl_us-demo")  # synthetic patients: a fixed salt keeps runs reproducible
  from data_prep import report as report_lib  # pylint: disable=g-import-not-at-top
  for line in report_lib.summary_text(report).splitlines():
    log(line)
  return report["dataset_dir"]


def pretrain(dataset_dir: str, workdir: str, steps: int | None):
  from configs import simclr_muscle  # pylint: disable=g-import-not-at-top
  from ssl_us import train  # pylint: disable=g-import-not-at-top
  config = simclr_muscle.get_config("runlocal")
  config.data.dir = dataset_dir
  if steps:
    config.num_steps = steps
  log(f"pretraining SimCLR ({config.model.encoder}, {config.num_steps} steps, batch "
      f"{config.batch_size}) in {workdir}")
  t0 = time.time()
  history = train.train_and_evaluate(config, workdir, log_fn=log)
  if history.get("loss"):
    log(f"pretraining done in {(time.time() - t0) / 60:.1f} min, final loss "
        f"{history['loss'][-1]:.3f}")
  else:
    log(f"the checkpoint in {workdir} is already at step {config.num_steps}; reusing it")
  return config


def features(method, variables, index, pool: str = "none"):
  """Frozen encoder features of every record's first frame; ``pool='avg'`` averages a
  flattened square feature map (ConvNet4's (S*S*C,) output) over its S*S positions."""
  from ssl_us import checkpoint, input_pipeline  # pylint: disable=g-import-not-at-top
  reader = input_pipeline.RecordReader(index)
  frames = np.stack([reader.read(i)["frames"][0] for i in range(index.num_records)])
  module, enc_vars = method.encoder(variables)
  x = np.asarray(method.eval_view(frames))
  f = checkpoint.encode(module, enc_vars, x)
  if pool == "avg":
    channels = 2 * getattr(module, "width", 0)
    if not channels or f.shape[1] % channels:
      raise ValueError(f"--features avg needs a ConvNet4 with flattened output, got {module!r}")
    f = f.reshape(len(f), -1, channels).mean(axis=1)
  elif pool != "none":
    raise ValueError(f"unknown pool {pool!r}; use none or avg")
  return f


def linear_probe(train_x, train_y, test_x, test_y, c: float = 0.1) -> float:
  """Test accuracy of a logistic regression (inverse regularisation c) on standardised features."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.pipeline import make_pipeline  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top
  clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=c))
  clf.fit(train_x, train_y)
  return float(clf.score(test_x, test_y))


def evaluate(dataset_dir: str, workdir: str, pool: str = "none"):
  import jax  # pylint: disable=g-import-not-at-top
  from ssl_us import checkpoint, input_pipeline  # pylint: disable=g-import-not-at-top
  _, method, trained = checkpoint.load_variables(workdir)
  batch = checkpoint.dummy_batch(workdir)
  random_vars = method.init(jax.random.key(12345), batch)
  tr = input_pipeline.load_index(dataset_dir, "train")
  te = input_pipeline.load_index(dataset_dir, "test")
  results = {}
  for name, variables in (("pretrained", trained), ("random init", random_vars)):
    acc = linear_probe(features(method, variables, tr, pool), tr.label,
                       features(method, variables, te, pool), te.label)
    results[name] = acc
  chance = np.bincount(te.label).max() / len(te.label)
  return results, float(chance), tr, te


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="demo_out", help="folder for data, shards and the workdir")
  p.add_argument("--steps", type=int, default=250,
                 help="pretraining steps (the runlocal config has 300; 250 gives the same probe "
                      "accuracy and keeps the demo under 15 minutes on 2 slow cores; 0 = config)")
  p.add_argument("--patients", type=int, default=40)
  p.add_argument("--frames", type=int, default=16)
  p.add_argument("--fresh", action="store_true", help="delete --out first")
  p.add_argument("--features", choices=("none", "avg"), default="none",
                 help="probe the encoder's own output (none) or its map averaged over "
                      "positions (avg: a stricter test of the random baseline)")
  args = p.parse_args(argv)
  if args.fresh:
    shutil.rmtree(args.out, ignore_errors=True)
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  dataset_dir = make_data(args.out, args)
  workdir = os.path.join(args.out, "simclr_workdir")
  pretrain(dataset_dir, workdir, args.steps)
  results, chance, tr, te = evaluate(dataset_dir, workdir, args.features)
  print()
  print(f"Linear probe on frozen features, synthetic lung ultrasound, 3 classes "
        f"({tr.num_records} train frames / {te.num_records} test frames, test patients unseen)")
  print(f"  {'encoder':<14}{'test accuracy':>14}")
  for name, acc in results.items():
    print(f"  {name:<14}{acc:>14.3f}")
  print(f"  {'chance':<14}{chance:>14.3f}")
  print(f"checkpoints: {os.path.join(workdir, 'checkpoints')}")
  print(f"logs (TensorBoard): {os.path.join(workdir, 'logs')}")
  print(f"data_prep report and crop previews: {os.path.join(dataset_dir, 'report')}")
  print(f"total time: {(time.time() - t0) / 60:.1f} min")
  margin = results["pretrained"] - results["random init"]
  if margin <= 0.05:
    print(f"WARNING: the pretrained encoder beats the random one by only {margin:+.3f}")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
