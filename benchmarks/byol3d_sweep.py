r"""BYOL-3D variants on an accelerator, probed against the random 3D encoder (issue 4).

The device machine has JAX but no tensorflow (the shards' parser) and cannot install packages,
so the clips travel as one array: ``export`` decodes a clip-mode dataset once (here, on the CPU)
and aligns a second labelling of the same clips by content. ``train`` (there) runs the committed
pretraining step (ssl_us.train: method, optimizer, schedule, state, the jitted shard_map step) on
batches drawn as successive random permutations of the clips, then writes the frozen features
of the committed evaluation (ssl_us.eval.protocols.features: center view at the pretraining
input size, eval mode) of the online encoder, of the EMA target's encoder (``NAME_target``) and
of three random encoders of the same architecture, float16, one file per feature width. ``probe``
(here) fits the committed linear head (configs/finetune/covid_blues.py:runlocal ``fit_head``)
on 5 patient-grouped folds x 3 head seeds and prints each encoder's paired difference from the
random encoders' mean.

  python -m benchmarks.byol3d_sweep export --a /tmp/h4/blues_clips/covid_blues/1.0.0 \
      --b /tmp/h7/blines_clips/covid_blues/1.0.0 --output .whl/clips.npz
  python -m benchmarks.byol3d_sweep train --clips .whl/clips.npz --output $OUT/feats.npz \
      --deadline 470 base1k_s0:0:1000 long5k_s0:0:5000 \
      w16b64_2k_s0:0:2000:model.encoder_kwargs.num_filters=16,batch_size=64
  python -m benchmarks.byol3d_sweep probe --features feats_d128.npz

A run is NAME:SEED:STEPS[:KEY=VALUE,...] over configs/byol_lung.py:runlocal.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import time

import numpy as np

from data_prep import files as files_lib

LABEL_KEYS = ("label_a", "label_b")


# ----------------------------------------------------------------------------------------------
# Export (CPU, where the shards can be parsed).


def align(images_a: np.ndarray, images_b: np.ndarray) -> np.ndarray:
  """perm with images_b[perm] == images_a: the same clips of two datasets, matched by content."""
  def digests(x, name):
    d = [hashlib.sha256(c.tobytes()).hexdigest() for c in x]
    if len(set(d)) != len(d):
      raise ValueError(f"dataset {name}: two clips are identical; cannot align by content")
    return d
  da, db = digests(images_a, "a"), digests(images_b, "b")
  where = {h: i for i, h in enumerate(db)}
  missing = [i for i, h in enumerate(da) if h not in where]
  if missing or len(da) != len(db):
    raise ValueError(f"datasets a ({len(da)} clips) and b ({len(db)} clips) do not hold the same "
                     f"clips; {len(missing)} clips of a are not in b (first: {missing[:3]})")
  return np.array([where[h] for h in da])


def export(dir_a: str, dir_b: str, output: str):
  from ssl_us.eval import data  # pylint: disable=g-import-not-at-top
  a = data.load_records(dir_a, ("train",))
  b = data.load_records(dir_b, ("train",))
  perm = align(a.images, b.images)
  with files_lib.atomic_path(output, ".npz") as tmp:
    np.savez_compressed(tmp, images=a.images, patient=a.patient, video=a.video,
                        label_a=a.label, names_a=np.array(a.label_names),
                        label_b=b.label[perm], names_b=np.array(b.label_names))
  print(f"{output}: {a.images.shape} clips of {len(np.unique(a.patient))} patients; labels "
        f"{a.label_names} and {b.label_names}")


# ----------------------------------------------------------------------------------------------
# Train (accelerator).


def apply_overrides(config, spec: str):
  """'a.b=1,c=(2,3)' -> config.a.b = 1, config.c = (2, 3); unknown keys are an error."""
  for kv in filter(None, re.split(r",(?=[\w.]+=)", spec)):   # a comma before the next KEY=
    key, sep, value = kv.partition("=")
    if not sep:
      raise ValueError(f"override {kv!r}: expected KEY=VALUE")
    *path, last = key.split(".")
    node = config
    for p in path:
      if p not in node:
        raise ValueError(f"override {kv!r}: config has no {p!r}")
      node = node[p]
    if last not in node:
      raise ValueError(f"override {kv!r}: config has no {key!r}")
    node[last] = ast.literal_eval(value)
  return config


def parse_run(spec: str) -> tuple[str, int, int, str]:
  parts = spec.split(":", 3)
  if len(parts) < 3:
    raise ValueError(f"run {spec!r}: expected NAME:SEED:STEPS[:KEY=VALUE,...]")
  return parts[0], int(parts[1]), int(parts[2]), parts[3] if len(parts) > 3 else ""


class EpochSampler:
  """Batches of clip indices: successive random permutations, cut into batches of ``b``."""

  def __init__(self, n: int, b: int, seed: int):
    self.n, self.b = n, b
    self.rng = np.random.default_rng(seed)
    self.order = np.zeros((0,), np.int64)

  def __call__(self) -> np.ndarray:
    while len(self.order) < self.b:
      self.order = np.concatenate([self.order, self.rng.permutation(self.n)])
    out, self.order = self.order[:self.b], self.order[self.b:]
    return out


def save_features(output: str, meta: dict, feats: dict):
  """float16 features, one file per width (OUTPUT_d<width>.npz), written then renamed."""
  for w in sorted({v.shape[1] for v in feats.values()}):
    part = {k: v.astype(np.float16) for k, v in feats.items() if v.shape[1] == w}
    path = output.replace(".npz", "") + f"_d{w}.npz"
    with files_lib.atomic_path(path, ".npz") as tmp:
      np.savez(tmp, **meta, **part)


def train(clips: str, output: str, deadline: float, runs: list[str]):
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", "/tmp/ssl_us_jax_cache")
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  from configs import byol_lung  # pylint: disable=g-import-not-at-top
  from configs.finetune import covid_blues
  from ssl_us import augment, parallel
  from ssl_us import train as train_lib
  from ssl_us.eval import protocols
  from ssl_us.methods import make_method

  t0 = time.time()
  d = np.load(clips)
  images = d["images"]
  meta = {k: d[k] for k in d.files if k != "images"}
  feats, log = {}, {}
  ev = covid_blues.get_config("runlocal")
  print(jax.devices(), images.shape, flush=True)
  for spec in runs:
    name, seed, steps, over = parse_run(spec)
    if time.time() - t0 > deadline:
      print(f"deadline: {name} not run", flush=True)
      continue
    c = byol_lung.get_config("runlocal")
    c.data.dir = clips
    c.seed, c.num_steps = seed, steps
    apply_overrides(c, over)
    mesh = parallel.make_mesh(None)
    method = make_method(c, axis_name=parallel.DATA)
    schedule = train_lib.make_schedule(c, c.batch_size)
    tx = train_lib.make_optimizer(c, schedule)
    setup = train_lib.Setup(config=c, mesh=mesh, method=method, tx=tx, schedule=schedule,
                            index=None)
    sample = EpochSampler(len(images), c.batch_size, seed)
    b = c.batch_size

    def batch():
      i = sample()
      return dict(clip=images[i], distance=np.zeros((b,), np.int32),
                  label=d["label_a"][i].astype(np.int32), padded=np.zeros((b, 2), np.int32))

    state = train_lib.init_state(setup, c, batch())
    step_fn = train_lib.make_train_step(method, tx, schedule, mesh)
    t_start, t_first, losses, done = time.time(), None, [], 0
    for s in range(steps):
      state, m = step_fn(state, parallel.shard_host_batch(batch(), mesh))
      done = s + 1
      if t_first is None:
        jax.block_until_ready(m)
        t_first = time.time()
      if done % 500 == 0 or done == steps:
        losses.append((done, round(float(m["loss"]), 4)))
      if time.time() - t0 > deadline:
        break
    jax.block_until_ready(state)
    t_train = time.time() - t_first
    module, variables = method.encoder({"params": state.params, **state.variables})
    size = tuple(c.image_size)                  # evaluated at the pretraining input size
    example = np.zeros((1,) + images.shape[1:-3] + size + images.shape[-1:], np.float32)
    a = dict(ev.aug)
    a.update(mean=c.aug.mean, std=c.aug.std)
    aug = augment.AugmentConfig.from_config(a, out_size=size)
    if done < steps:
      name = f"{name}@{done}"                  # stopped by the deadline: say where
    feats[name] = protocols.features(module, variables, images, aug)
    target = state.variables.get("target")    # BYOL's EMA target: its encoder too
    if target is not None:
      tv = {k: target[k]["encoder"] for k in ("params", "batch_stats") if k in target}
      feats[f"{name}_target"] = protocols.features(module, tv, images, aug)
    width = c.model.encoder_kwargs.get("num_filters")
    for r in (0, 1, 2):
      key = f"random_{c.model.encoder}_w{width}_{size[0]}px_{r}"
      if key not in feats:
        rv = protocols.random_encoder_variables(module, example, r)
        feats[key] = protocols.features(module, rv, images, aug)
    log[name] = dict(seed=seed, steps=steps, steps_done=done, overrides=over,
                     compile_s=round(t_first - t_start, 1), train_s=round(t_train, 1),
                     clips_per_s=round((done - 1) * b / max(t_train, 1e-9), 1), losses=losses)
    print(name, json.dumps(log[name]), f"t={time.time() - t0:.0f}s", flush=True)
    save_features(output, meta, feats)
    with open(output.replace(".npz", "") + "_log.json", "w") as f:
      json.dump(log, f, indent=1)


# ----------------------------------------------------------------------------------------------
# Probe (CPU).


def paired(per_fold: np.ndarray, random_per_fold: np.ndarray) -> dict:
  """Mean ± std over folds of an encoder's (acc, auc) minus the random encoders' mean."""
  d = per_fold - random_per_fold
  return dict(acc=per_fold[:, 0].mean(), auc=per_fold[:, 1].mean(), d_acc=d[:, 0].mean(),
              d_acc_std=d[:, 0].std(), d_auc=d[:, 1].mean(), d_auc_std=d[:, 1].std(),
              ahead=int((d[:, 0] > 0).sum()))


def probe(path: str, folds: int = 5, seeds=(0, 1, 2)):
  import jax  # pylint: disable=g-import-not-at-top
  from configs.finetune import covid_blues
  from ssl_us import finetune
  from ssl_us.eval import metrics, protocols, splits
  d = dict(np.load(path))
  keys = [k for k, v in d.items() if v.ndim == 2]
  randoms = [k for k in keys if k.startswith("random")]
  if not randoms:
    raise ValueError(f"{path}: no random_* features to compare with")
  cfg = covid_blues.get_config("runlocal")
  for which in ("a", "b"):
    y, names = d[f"label_{which}"], [str(n) for n in d[f"names_{which}"]]
    split = splits.group_kfold(d["patient"], y, folds, 0)
    per_fold = {}
    for k in keys:
      f = d[k].astype(np.float32)
      ks = [int(k.rsplit("_", 1)[1])] if k in randoms else list(seeds)
      rows = []
      for tr, te in split:
        m = []
        for s in ks:
          model = protocols.Classifier(None, len(names), ())
          head = protocols.Head(len(names), ())
          var = {"params": {"head": head.init(jax.random.key(s), f[:1])["params"]}}
          var, _ = protocols.fit_head(model, var, f[tr], y[tr],
                                      finetune._fit_config(cfg, s, **dict(cfg.fit_head)))
          r = metrics.classification_metrics(y[te], protocols.predict_head(model, var, f[te]),
                                              positive=0)
          m.append((r["accuracy"], r["auc"]))
        rows.append(np.mean(m, axis=0))
      per_fold[k] = np.array(rows)
    rand = np.mean([per_fold[k] for k in randoms], axis=0)
    print(f"label {names[0]} (positive) vs {names[1]}: random mean accuracy "
          f"{rand[:, 0].mean():.3f} AUC {rand[:, 1].mean():.3f}")
    for k in keys:
      if k in randoms:
        continue
      p = paired(per_fold[k], rand)
      print(f"  {k:16s} accuracy {p['acc']:.3f} ({p['d_acc']:+.3f} ± {p['d_acc_std']:.3f}) "
            f"AUC {p['auc']:.3f} ({p['d_auc']:+.3f} ± {p['d_auc_std']:.3f}) "
            f"folds ahead {p['ahead']}/{folds}", flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  e = sub.add_parser("export")
  e.add_argument("--a", required=True, help="clip-mode dataset dir (label_a, its clip order)")
  e.add_argument("--b", required=True, help="the same clips with another label (label_b)")
  e.add_argument("--output", required=True)
  t = sub.add_parser("train")
  t.add_argument("--clips", required=True)
  t.add_argument("--output", required=True)
  t.add_argument("--deadline", type=float, default=470.0, help="seconds; later runs are skipped")
  t.add_argument("runs", nargs="+", help="NAME:SEED:STEPS[:KEY=VALUE,...]")
  q = sub.add_parser("probe")
  q.add_argument("--features", required=True)
  args = p.parse_args(argv)
  if args.cmd == "export":
    export(args.a, args.b, args.output)
  elif args.cmd == "train":
    train(args.clips, args.output, args.deadline, args.runs)
  else:
    probe(args.features)


if __name__ == "__main__":
  main()
