r"""How much of a frame dataset's classes simple statistics and random encoders already get.

  python -m benchmarks.synthetic_difficulty --dataset demo_out/shards/synthetic_lung/1.0.0
  python -m benchmarks.synthetic_difficulty --dataset DIR --workdir demo_out/simclr_workdir
  python -m benchmarks.synthetic_difficulty --dataset DIR --workdir W --random_seeds 3 --probe sweep

For data_prep issue point 11 (synthetic classes "a good encoder can learn and a random one
cannot"): the same linear probe as the demo (ssl_us.demo.linear_probe: standardised features,
logistic regression, fit on the 'train' split, accuracy on 'test') on
- 'global stats': per frame mean, std, mean |d/dx| and mean |d/dy| of the [0, 1] image;
- 'depth bands': mean and mean |d/dx| of each of 8 horizontal bands (depth profile);
- 'pixels': the raw frame;
- a randomly initialised ConvNet4 (the demo's config; init seed 12345 as in the demo, and with
  ``--random_seeds N`` the next N - 1 seeds too), on its flattened output and averaged over
  positions; with ``--workdir``, also the pretrained encoder of that pretraining run;
- with ``--supervised_steps N`` (``--supervised_seeds K`` runs), the ceiling: the same ConvNet4
  (random init) and a linear layer trained end to end with the labels of 'train'
  (ssl_us.eval.protocols 'supervised': AdamW 1e-3, batch 64, the fine-tuning augmentation of
  configs/finetune/base.py), accuracy on 'test'.
A dataset whose classes the statistics rows already separate is one a random network separates
too. ``--probe sweep`` asks whether a conclusion depends on the probe's regularisation: each
feature set is probed at every C of ``PROBE_CS`` (test accuracy per C; the largest of them is an
optimistic, test-selected bound) and at the C that patient-grouped 4-fold cross-validation on
'train' selects (the fair figure: no test label chooses anything). Prints one markdown table (and
the chance level: the largest class share of 'test').
"""
from __future__ import annotations

import argparse

import numpy as np

DEMO_C = 0.1  # ssl_us.demo.linear_probe's default inverse regularisation
PROBE_CS = (1e-3, 1e-2, DEMO_C, 1.0, 10.0)
RANDOM_SEED = 12345  # ssl_us.demo's random-init baseline


def frames(dataset_dir: str, split: str):
  """(index, uint8 first frames (N, H, W, 1)) of ``split``."""
  from ssl_us import input_pipeline  # pylint: disable=g-import-not-at-top
  index = input_pipeline.load_index(dataset_dir, split)
  reader = input_pipeline.RecordReader(index)
  return index, np.stack([reader.read(i)["frames"][0] for i in range(index.num_records)])


def statistics(x: np.ndarray, bands: int = 8) -> dict:
  """Hand-made features of frames (N, H, W) in [0, 1]."""
  gx, gy = np.abs(np.diff(x, axis=2)), np.abs(np.diff(x, axis=1))
  edges = np.linspace(0, x.shape[1], bands + 1).astype(int)
  band = [(x[:, a:b].mean((1, 2)), gx[:, a:b].mean((1, 2))) for a, b in zip(edges, edges[1:])]
  return {
      "global stats (4)": np.stack([x.mean((1, 2)), x.std((1, 2)), gx.mean((1, 2)),
                                    gy.mean((1, 2))], 1),
      f"depth bands ({2 * bands})": np.stack([m for m, _ in band] + [g for _, g in band], 1),
      "pixels": x.reshape(len(x), -1),
  }


def select_c(cv_scores: dict) -> float:
  """The C of the best mean cross-validation accuracy; on a tie the smallest (most regularised)."""
  best = max(cv_scores.values())
  return min(c for c, score in cv_scores.items() if score == best)


def probe_sweep(xtr, ytr, groups, xte, yte, cs=PROBE_CS, folds: int = 4):
  """({C: test accuracy}, C selected by grouped CV on train, its test accuracy).

  The cross-validation folds never split a group (a patient) between fit and validation, so the
  selection rewards what carries over to unseen patients, as the test split asks."""
  from sklearn.model_selection import GroupKFold  # pylint: disable=g-import-not-at-top
  from ssl_us import demo  # pylint: disable=g-import-not-at-top
  if len(np.unique(groups)) < folds:
    raise ValueError(f"probe sweep: {len(np.unique(groups))} patients in 'train', need >= {folds} "
                     "for grouped cross-validation")
  test, cv = {}, {}
  for c in cs:
    test[c] = demo.linear_probe(xtr, ytr, xte, yte, c)
    cv[c] = float(np.mean([demo.linear_probe(xtr[a], ytr[a], xtr[b], ytr[b], c)
                           for a, b in GroupKFold(folds).split(xtr, ytr, groups)]))
  chosen = select_c(cv)
  return test, chosen, test[chosen]


def supervised_accuracy(tr, xtr, te, xte, steps: int, seed: int = 0) -> float:
  """Test accuracy of ConvNet4 + linear layer trained with the 'train' labels (the ceiling)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import simclr_muscle  # pylint: disable=g-import-not-at-top
  from configs.finetune import base  # pylint: disable=g-import-not-at-top
  from ssl_us import augment, models  # pylint: disable=g-import-not-at-top
  from ssl_us.eval import protocols  # pylint: disable=g-import-not-at-top

  model_cfg = simclr_muscle.get_config("runlocal").model
  encoder = models.make_encoder(model_cfg.encoder, **dict(model_cfg.encoder_kwargs))
  image_size = tuple(xtr.shape[1:3])
  num_classes = int(max(tr.label.max(), te.label.max())) + 1
  model = protocols.Classifier(encoder, num_classes)
  example = jnp.zeros((1, *image_size, 1))
  enc_vars = protocols.random_encoder_variables(encoder, example, seed)
  variables = protocols.init_variables(model, enc_vars, example, jax.random.key(seed + 1))
  aug = augment.AugmentConfig.from_config(dict(base.base_config().aug), out_size=image_size)
  cfg = protocols.FitConfig(steps=steps, batch_size=64, lr=1e-3, weight_decay=1e-4,
                            warmup_steps=min(20, steps // 10), seed=seed)
  variables, _ = protocols.fit(model, variables, xtr, tr.label,
                               protocols.get_protocol("supervised"), cfg, aug,
                               protocols.encoder_blocks(encoder, enc_vars, example))
  probs = protocols.predict(model, variables, xte, aug)
  return float(np.mean(probs.argmax(1) == te.label))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dataset", required=True, help="data_prep dataset dir with train and test")
  p.add_argument("--workdir", help="a pretraining workdir: also probe its encoder")
  p.add_argument("--random_seeds", type=int, default=1,
                 help=f"random-init ConvNet4s to probe (seeds {RANDOM_SEED}, {RANDOM_SEED + 1}, "
                      "...)")
  p.add_argument("--probe", choices=("demo", "sweep"), default="demo",
                 help=f"demo: the demo's probe (C={DEMO_C}); sweep: every C of {PROBE_CS} and the "
                      "C chosen by patient-grouped cross-validation on train")
  p.add_argument("--supervised_steps", type=int, default=0,
                 help="also train ConvNet4 with the labels for this many steps (0: skip)")
  p.add_argument("--supervised_seeds", type=int, default=1,
                 help="supervised runs (seeds 0, 1, ...: init, batches and augmentation)")
  a = p.parse_args(argv)
  for flag in ("random_seeds", "supervised_seeds"):
    if getattr(a, flag) < 1:
      p.error(f"--{flag} must be >= 1, got {getattr(a, flag)}")
  import jax  # pylint: disable=g-import-not-at-top
  from configs import simclr_muscle  # pylint: disable=g-import-not-at-top
  from ssl_us import checkpoint, demo  # pylint: disable=g-import-not-at-top
  from ssl_us.methods import make_method  # pylint: disable=g-import-not-at-top
  tr, xtr = frames(a.dataset, "train")
  te, xte = frames(a.dataset, "test")
  feats = []  # (name, train features, test features)
  ftr, fte = (statistics(x[..., 0].astype(np.float32) / 255.0) for x in (xtr, xte))
  feats += [(name, ftr[name], fte[name]) for name in ftr]
  config = simclr_muscle.get_config("runlocal")
  config.image_size = tuple(xtr.shape[1:3])
  method = make_method(config)
  dummy = {"image": np.zeros((2, *xtr.shape[1:3], 1), np.uint8)}
  encoders = []
  for i in range(a.random_seeds):
    seed = RANDOM_SEED + i
    name = "random ConvNet4" + (f" (init seed {seed})" if a.random_seeds > 1 else "")
    encoders.append((name, method, method.init(jax.random.key(seed), dummy)))
  if a.workdir:
    _, pre_method, pre_vars = checkpoint.load_variables(a.workdir)
    encoders.append((f"pretrained ({a.workdir})", pre_method, pre_vars))
  for name, m, variables in encoders:
    for pool in ("none", "avg"):
      feats.append((f"{name}, {'flattened' if pool == 'none' else 'averaged'}",
                    demo.features(m, variables, tr, pool), demo.features(m, variables, te, pool)))
  supervised = []
  for seed in range(a.supervised_seeds if a.supervised_steps > 0 else 0):
    supervised.append((f"supervised ConvNet4 + linear layer, {a.supervised_steps} steps (ceiling)"
                       + (f", seed {seed}" if a.supervised_seeds > 1 else ""),
                       supervised_accuracy(tr, xtr, te, xte, a.supervised_steps, seed)))
  chance = np.bincount(te.label).max() / len(te.label)
  head = f"features ({tr.num_records} train / {te.num_records} test frames)"
  if a.probe == "demo":
    print(f"| {head} | test accuracy |")
    print("|---|---|")
    for name, f_tr, f_te in feats:
      print(f"| {name} | {demo.linear_probe(f_tr, tr.label, f_te, te.label):.3f} |")
    for name, acc in supervised:
      print(f"| {name} | {acc:.3f} |")
    print(f"| chance | {chance:.3f} |")
    return 0
  print(f"| {head} | " + " | ".join(f"C={c:g}" for c in PROBE_CS) + " | C by grouped CV |")
  print("|---|" + "---|" * (len(PROBE_CS) + 1))
  for name, f_tr, f_te in feats:
    test, chosen, acc = probe_sweep(f_tr, tr.label, tr.patient, f_te, te.label)
    print(f"| {name} | " + " | ".join(f"{test[c]:.3f}" for c in PROBE_CS)
          + f" | {acc:.3f} (C={chosen:g}) |", flush=True)
  blank = " | ".join("" for _ in PROBE_CS)
  for name, acc in supervised:
    print(f"| {name} | {blank} | {acc:.3f} |")
  print(f"| chance | {blank} | {chance:.3f} |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
