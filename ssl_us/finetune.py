r"""Downstream evaluation: from a pretraining checkpoint to the papers' clinical evaluations.

  python -m ssl_us.finetune --config configs/finetune/<task>.py --config.init_from=WORKDIR
  ./run.sh finetune --config configs/finetune/<task>.py --config.init_from=WORKDIR

``config.task`` picks the evaluation:
- ``classify``: label-fraction x protocol x patient-grouped k-fold (papers 001, 002, 003);
  frame- and video-level metrics, a CSV of every run, a summary CSV, a markdown table and the
  label-fraction curve (paper 001 Fig. 3).
- ``retrieval``: view retrieval across exams (paper 000): NCC, supervised siamese, pair
  classifier on frozen features; one table, ROC curves.
- ``saliency``: occlusion saliency of a trained classifier and its weighted IoU with pathology
  boxes (paper 001), overlays.
- ``segment``: U-Net decoder on the encoder, fine-tuned end to end (paper 002 Task III),
  against the same model from a random init; GAA, MA, mIoU, overlays.
- ``embed``: kNN accuracy (patient-grouped folds) and a t-SNE plot of frozen features.

The encoder comes from ``ssl_us.checkpoint.load_encoder(init_from, step)`` (the online encoder
for BYOL; heads dropped). ``config.encoder.name`` (optional with a checkpoint) must match the
checkpoint's architecture, else a ValueError lists the differences. ``init_from="random"``
builds ``config.encoder`` with a random init and runs everything else unchanged.

Outputs go to ``config.output_dir`` (default ``<init_from>/downstream``) as
``<output_prefix>*.{csv,md,png}``; every file is written to a temporary name and renamed.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from data_prep import files as files_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Downstream config file.",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])

RANDOM = "random"
CLASSIFY_KEYS = ("accuracy", "sensitivity", "specificity", "precision", "recall", "f1", "auc")


# ----------------------------------------------------------------------------------------------
# Encoder.


def _param_shapes(tree) -> dict[str, tuple]:
  import jax  # pylint: disable=g-import-not-at-top
  return {jax.tree_util.keystr(p): tuple(v.shape)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_architecture(source: str, params, expected_params, expected: str):
  """ValueError naming ``source`` when two parameter trees differ in names or shapes."""
  got, want = _param_shapes(params), _param_shapes(expected_params)
  diffs = [f"{k}: checkpoint {got.get(k, 'missing')} vs config {want.get(k, 'missing')}"
           for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
  if diffs:
    raise ValueError(f"{source}: the encoder does not match config.encoder ({expected}); "
                     f"{len(diffs)} parameter differences, e.g. " + "; ".join(diffs[:4]))


def load_encoder(config, example):
  """(module, variables {'params', 'batch_stats'}, description) of the configured encoder.

  ``example`` is one model-unit input (1, ...) used for shapes only.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from ssl_us import checkpoint, models, models3d  # noqa: F401 (registers 3D encoders)
  from ssl_us.eval import protocols
  enc = config.encoder
  expected = None
  if enc.name:
    expected = models.make_encoder(enc.name, **dict(enc.kwargs))
  if config.init_from == RANDOM:
    if expected is None:
      raise ValueError("init_from='random' needs config.encoder.name (and .kwargs)")
    variables = protocols.random_encoder_variables(expected, example, config.seed)
    return expected, variables, f"random init ({enc.name} {dict(enc.kwargs)})"
  if not config.init_from:
    raise ValueError("set --config.init_from=WORKDIR (a pretraining workdir) or 'random'")
  step = None if config.step < 0 else config.step
  module, variables = checkpoint.load_encoder(config.init_from, step)
  if expected is not None:
    shapes = jax.eval_shape(lambda: expected.init(
        {"params": jax.random.key(0), "dropout": jax.random.key(0)}, example, train=False))
    check_architecture(config.init_from, variables["params"], shapes["params"],
                       f"{enc.name} {dict(enc.kwargs)}")
  pre = checkpoint.load_config(config.init_from)
  steps = "latest" if step is None else step
  return module, variables, (f"{pre.method} {pre.model.encoder} {dict(pre.model.encoder_kwargs)}"
                             f" from {config.init_from} (step {steps})")


# ----------------------------------------------------------------------------------------------
# Helpers.


def _out_paths(config):
  out = config.output_dir or (os.path.join(config.init_from, "downstream")
                              if config.init_from and config.init_from != RANDOM else "")
  if not out:
    raise ValueError("set --config.output_dir (init_from='random' has no workdir to write to)")
  prefix = config.output_prefix or f"downstream_{config.name}"
  return lambda suffix: os.path.join(out, prefix + suffix)


def _aug(config):
  """Fine-tuning augmentation; normalisation (mean, std) as the checkpoint's pretraining."""
  from ssl_us import augment, checkpoint  # pylint: disable=g-import-not-at-top
  aug = dict(config.aug)
  if config.init_from and config.init_from != RANDOM:
    pre = checkpoint.load_config(config.init_from).aug
    aug.update(mean=pre.mean, std=pre.std)
  return augment.AugmentConfig.from_config(aug, out_size=tuple(config.image_size))


def _example(images, image_size):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.zeros((1,) + images.shape[1:-3] + tuple(image_size) + images.shape[-1:])


def _fit_config(config, seed, **over):
  from ssl_us.eval import protocols  # pylint: disable=g-import-not-at-top
  f = dict(config.fit)
  f.update(over)
  f["head_hidden"] = tuple(f["head_hidden"])
  return protocols.FitConfig(seed=seed, **f)


def _header(config, description, extra=""):
  """Markdown heading: task, encoder, the command line when run as the entry point."""
  lines = [f"# {config.name}: {config.task}\n", f"Encoder: {description}\n"]
  if sys.argv and os.path.basename(sys.argv[0]) == "finetune.py":
    args = [shlex.quote(a) for a in sys.argv[1:] if not a.startswith("--config.notes")]
    lines.append("Command: `python -m ssl_us.finetune " + " ".join(args) + "`\n")
  if config.notes:
    lines.append(config.notes.strip() + "\n")
  return "\n".join(lines) + "\n" + extra


def _label_index(names, wanted: str, default: int) -> int:
  if not wanted:
    return default
  if wanted not in names:
    raise ValueError(f"label {wanted!r} is not in the dataset's label names {list(names)}")
  return list(names).index(wanted)


# ----------------------------------------------------------------------------------------------
# classify


def run_classify(config) -> dict:
  """Label fractions x protocols x patient-grouped folds x seeds; returns the output paths."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ssl_us.eval import data, metrics, plots, protocols, report, splits
  recs = data.load_records(config.data.dir, tuple(config.data.splits))
  labelled = np.flatnonzero(recs.label >= 0)
  if labelled.size < recs.label.size:
    logging.warning("%d of %d records have no label and are left out of classification",
                    recs.label.size - labelled.size, recs.label.size)
  recs = recs.subset(labelled)
  if recs.label_names and recs.label.max() >= len(recs.label_names):
    raise ValueError(f"{config.data.dir}: label id {recs.label.max()} but only "
                     f"{len(recs.label_names)} label names {list(recs.label_names)}")
  names = recs.label_names or tuple(str(c) for c in range(int(recs.label.max()) + 1))
  num_classes = len(names)
  positive = _label_index(names, config.eval.positive_label, 1)
  aug = _aug(config)
  example = _example(recs.images, config.image_size)
  encoder, pre_vars, description = load_encoder(config, example)
  blocks = protocols.encoder_blocks(encoder, pre_vars, example)
  model = protocols.Classifier(encoder, num_classes, tuple(config.fit.head_hidden))
  folds = splits.group_kfold(recs.patient, recs.label, config.eval.folds, config.eval.split_seed)
  path = _out_paths(config)
  feats_cache: dict = {}
  random_vars: dict = {}

  def encoder_for(protocol, seed):
    if protocol.pretrained:
      return "pretrained", pre_vars
    if seed not in random_vars:
      random_vars[seed] = protocols.random_encoder_variables(encoder, example, seed)
    return f"random{seed}", random_vars[seed]

  rows = []
  runs = [(s, f, fr, p) for s in config.eval.seeds for f in range(len(folds))
          for fr in config.eval.fractions for p in config.eval.protocols]
  for i, (seed, fold, fraction, pname) in enumerate(runs):
    t0 = time.time()
    protocol = protocols.get_protocol(pname)
    train_idx, test_idx = folds[fold]
    sub = splits.label_fraction(train_idx, recs.patient, recs.label, fraction, seed)
    key, enc_vars = encoder_for(protocol, seed)
    variables = protocols.init_variables(model, enc_vars, example, jax.random.key(seed))
    head_only = protocol.train == "head"
    if head_only:
      cfg = _fit_config(config, seed, **dict(config.fit_head))
      if key not in feats_cache:
        feats_cache[key] = protocols.features(encoder, enc_vars, recs.images, aug)
      variables, _ = protocols.fit_head(model, variables, feats_cache[key][sub], recs.label[sub],
                                        cfg)
      probs = protocols.predict_head(model, variables, feats_cache[key][test_idx])
    else:
      cfg = _fit_config(config, seed)
      variables, _ = protocols.fit(model, variables, recs.images[sub], recs.label[sub], protocol,
                                   cfg, aug, blocks)
      probs = protocols.predict(model, variables, recs.images[test_idx], aug)
    trainable = protocols.trainable_encoder_names(blocks, protocol, cfg.last_k)
    common = dict(protocol=pname, fraction=fraction, fold=fold, seed=seed,
                  train_patients=int(np.unique(recs.patient[sub]).size),
                  train_records=int(sub.size),
                  trainable_params=protocols.count_trainable(variables["params"], trainable),
                  seconds=round(time.time() - t0, 1))
    y = recs.label[test_idx]
    levels = {"frame": (y, probs)}
    _, vprobs, vy = metrics.aggregate_by_group(recs.video[test_idx], probs, y)
    levels["video"] = (vy, vprobs)
    for level in config.eval.levels:
      ly, lp = levels[level]
      m = metrics.classification_metrics(ly, lp, positive=positive)
      rows.append(dict(common, level=level, n_test=m["n"],
                       **{k: m[k] for k in CLASSIFY_KEYS},
                       confusion=json.dumps(m["confusion"])))
    logging.info("[%d/%d] %s fraction=%g fold=%d seed=%d: %s (%.0fs)", i + 1, len(runs), pname,
                 fraction, fold, seed, {k: round(rows[-1][k], 3) for k in ("accuracy", "auc")},
                 time.time() - t0)
    report.write_csv(path("_runs.csv"), rows)
  summary = metrics.summarize(rows, CLASSIFY_KEYS, by=("level", "protocol", "fraction"))
  for r in summary:
    r["label"] = protocols.get_protocol(r["protocol"]).label
  report.write_csv(path("_summary.csv"), summary)
  md = [_header(config, description,
                f"Classes: {list(names)} (positive: {names[positive]}); {len(recs)} records, "
                f"{np.unique(recs.video).size} videos, {np.unique(recs.patient).size} patients; "
                f"{config.eval.folds}-fold patient-grouped CV, seeds {list(config.eval.seeds)}; "
                "mean ± std over folds and seeds.\n\n")]
  out = {"runs": path("_runs.csv"), "summary": path("_summary.csv"), "markdown": path(".md")}
  for level in config.eval.levels:
    lrows = [r for r in summary if r["level"] == level]
    md.append(f"## {level}-level\n\n" + report.markdown_table(
        lrows, ["label", "fraction", "n", "accuracy", "sensitivity", "specificity", "f1", "auc"],
        ["protocol", "labels", "runs", "accuracy", "sensitivity", "specificity", "F1 (macro)",
         "AUC"]) + "\n")
    png = path(".png" if level == "video" else f"_{level}.png")
    plots.label_fraction_curve(lrows, ("accuracy", "auc"), png,
                               {p: protocols.get_protocol(p).label for p in protocols.PROTOCOLS},
                               title=f"{config.name}, {level}-level")
    out[f"plot_{level}"] = png
  report.write_text(path(".md"), "".join(md))
  return out


# ----------------------------------------------------------------------------------------------
# retrieval


def run_retrieval(config) -> dict:
  """NCC, supervised siamese and the pair classifier on the same patient-grouped test pairs."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ssl_us.eval import data, plots, protocols, report, retrieval, splits
  rc = config.retrieval
  recs = data.load_records(config.data.dir, tuple(config.data.splits))
  aug = _aug(config)
  example = _example(recs.images, config.image_size)
  encoder, pre_vars, description = load_encoder(config, example)
  strata = np.maximum(recs.label, 0)
  parts = splits.group_split(recs.patient, strata, dict(rc.split), config.eval.split_seed)

  def pairs_of(idx, seed):
    p = retrieval.make_pairs(recs.patient[idx], recs.side[idx], recs.exam[idx],
                             recs.anatomy_fine[idx], recs.video[idx], rc.ref_exam,
                             rc.max_per_reference, seed)
    return retrieval.Pairs(idx[p.ref], idx[p.cand], p.label, p.video)

  train, test = pairs_of(parts["train"], 0), pairs_of(parts["test"], 1)
  logging.info("retrieval pairs: %d train (%d positive), %d test (%d positive)", len(train),
               train.label.sum(), len(test), test.label.sum())
  feats = protocols.features(encoder, pre_vars, recs.images, aug)
  clf_cfg = retrieval.PairFitConfig(**dict(rc.classifier), seed=config.seed)
  model, params = retrieval.fit_pair_classifier(feats, train, clf_cfg)
  scores = {"SSL encoder + pair classifier": retrieval.score_pair_classifier(model, params, feats,
                                                                              test)}
  sia_cfg = retrieval.PairFitConfig(**dict(rc.siamese), seed=config.seed)
  smodel, svars = retrieval.fit_siamese(encoder, recs.images, train, sia_cfg, aug)
  scores["Supervised siamese"] = retrieval.score_siamese(smodel, svars, recs.images, test, aug)
  views = lambda idx: np.asarray(recs.images[idx], np.float64)
  ncc_train = retrieval.ncc(views(train.ref), views(train.cand))
  scores["Normalised cross-correlation"] = retrieval.ncc(views(test.ref), views(test.cand))
  thresholds = {"Normalised cross-correlation": retrieval.best_f1_threshold(train.label,
                                                                           ncc_train)}
  rows = []
  for name in ("Normalised cross-correlation", "Supervised siamese",
               "SSL encoder + pair classifier"):
    m = retrieval.pair_metrics(test.label, scores[name], thresholds.get(name, 0.5))
    rows.append(dict(model=name, **m, top1_retrieval=retrieval.retrieval_accuracy(test,
                                                                                   scores[name]),
                     test_pairs=len(test)))
  path = _out_paths(config)
  report.write_csv(path(".csv"), rows)
  report.write_text(path(".md"), _header(config, description,
                                          f"{len(train)} training and {len(test)} test pairs "
                                          "(patient-grouped).\n\n") + report.markdown_table(
      rows, ["model", "auc", "precision", "recall", "f1", "top1_retrieval"],
      ["model", "AUC", "precision", "recall", "F1", "top-1 retrieval"]))
  plots.roc_curves({k: (test.label, v) for k, v in scores.items()}, path(".png"),
                   title=f"{config.name}: view retrieval")
  return {"csv": path(".csv"), "markdown": path(".md"), "plot": path(".png")}


# ----------------------------------------------------------------------------------------------
# saliency


def run_saliency(config) -> dict:
  """Classifier per protocol on dense frames; occlusion wIoU on test frames with target boxes."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ssl_us import augment
  from ssl_us.eval import data, metrics, plots, protocols, report, saliency, splits
  sc = config.saliency
  dense = data.load_dense(config.data.dense_dir, tuple(config.image_size), config.data.frame_step)
  target = _label_index(dense.label_names, sc.target_label, 1)
  aug = _aug(config)
  example = _example(dense.images, config.image_size)
  encoder, pre_vars, description = load_encoder(config, example)
  blocks = protocols.encoder_blocks(encoder, pre_vars, example)
  num_classes = len(dense.label_names)
  model = protocols.Classifier(encoder, num_classes, tuple(config.fit.head_hidden))
  parts = splits.group_split(dense.patient, dense.label, dict(sc.split), config.eval.split_seed)
  tr, te = parts["train"], parts["test"]
  chosen = [i for i in te if dense.label[i] == target
            and any(b[0] in sc.box_classes for b in dense.boxes[i])][:sc.max_images]
  if not chosen:
    raise ValueError(f"{config.data.dense_dir}: no test frame of class {sc.target_label!r} has "
                     f"boxes of {list(sc.box_classes)}")
  fill = (0.0 - aug.mean) / aug.std      # occlude with black, in model units
  path = _out_paths(config)
  rows, out = [], {}
  for pname in sc.protocols:
    protocol = protocols.get_protocol(pname)
    enc_vars = pre_vars if protocol.pretrained else protocols.random_encoder_variables(
        encoder, example, config.seed)
    variables = protocols.init_variables(model, enc_vars, example, jax.random.key(config.seed))
    over = dict(config.fit_head) if protocol.train == "head" else {}
    variables, _ = protocols.fit(model, variables, dense.images[tr], dense.label[tr], protocol,
                                 _fit_config(config, config.seed, **over), aug, blocks)
    probs = protocols.predict(model, variables, dense.images[te], aug)
    acc = metrics.classification_metrics(dense.label[te], probs, positive=target)["accuracy"]
    score = saliency.class_score_fn(lambda x: model.apply(variables, x, train=False), target)
    maps, results = [], []
    for i in chosen:
      x = augment.center_view(dense.images[i], aug)
      s = saliency.occlusion_map(score, x, sc.patch, sc.stride, fill)
      gt = [b[1:] for b in dense.boxes[i] if b[0] in sc.box_classes]
      results.append(saliency.evaluate(s, gt, sc.fraction))
      maps.append((s, gt))
    wiou = np.array([r["wiou"] for r in results])
    rows.append(dict(protocol=pname, label=protocol.label, test_accuracy=acc,
                     wiou_mean=float(wiou.mean()), wiou_std=float(wiou.std()),
                     images=len(chosen)))
    k = min(sc.num_overlays, len(chosen))
    png = path(f"_{pname}.png")
    plots.saliency_overlays([dense.images[i] for i in chosen[:k]], [m[0] for m in maps[:k]],
                            [r["boxes"] for r in results[:k]], [m[1] for m in maps[:k]], png,
                            [f"{protocol.label}: wIoU {r['wiou']:.2f}" for r in results[:k]])
    out[f"overlay_{pname}"] = png
    logging.info("saliency %s: accuracy %.3f, wIoU %.3f", pname, acc, wiou.mean())
  report.write_csv(path(".csv"), rows)
  report.write_text(path(".md"), _header(
      config, description, f"Occlusion patch {sc.patch}, stride {sc.stride}; top "
      f"{sc.fraction:.0%} of pixels; {len(chosen)} test frames of class "
      f"{sc.target_label!r} with {list(sc.box_classes)} boxes.\n\n") + report.markdown_table(
          rows, ["label", "test_accuracy", "wiou", "images"],
          ["protocol", "test accuracy", "weighted IoU", "frames"]))
  return dict(out, csv=path(".csv"), markdown=path(".md"))


# ----------------------------------------------------------------------------------------------
# segment


def run_segment(config) -> dict:
  """U-Net on the pretrained encoder and on a random init, fine-tuned end to end."""
  import jax  # pylint: disable=g-import-not-at-top
  from ssl_us.eval import data, plots, protocols, report, segmentation, splits
  sg = config.segment
  dense = data.load_dense(config.data.dense_dir, tuple(config.image_size), config.data.frame_step)
  aug = _aug(config)
  example = _example(dense.images, config.image_size)
  encoder, pre_vars, description = load_encoder(config, example)
  num_classes = len(dense.mask_names)
  parts = splits.group_split(dense.patient, dense.label, dict(sg.split), config.eval.split_seed)
  tr, te = parts["train"], parts["test"]
  model = segmentation.SegmentationModel(encoder, num_classes)
  path = _out_paths(config)
  rows, out = [], {}
  for init in sg.inits:
    enc_vars = pre_vars if init == "pretrained" else protocols.random_encoder_variables(
        encoder, example, config.seed)
    variables = segmentation.init_variables(model, enc_vars, example, jax.random.key(config.seed))
    variables, _ = segmentation.fit(model, variables, dense.images[tr], dense.masks[tr],
                                    _fit_config(config, config.seed, **dict(sg.fit)), aug)
    pred = segmentation.predict(model, variables, dense.images[te], aug)
    m = segmentation.evaluate(pred, dense.masks[te], num_classes)
    rows.append(dict(init=init, global_accuracy=m["global_accuracy"],
                     mean_accuracy=m["mean_accuracy"], miou=m["miou"], test_frames=len(te)))
    k = min(sg.num_overlays, len(te))
    png = path(f"_{init}.png")
    plots.segmentation_overlays(dense.images[te[:k]], dense.masks[te[:k]], pred[:k], num_classes,
                                png)
    out[f"overlay_{init}"] = png
    logging.info("segmentation %s: %s", init, {k: round(v, 3) for k, v in rows[-1].items()
                                               if isinstance(v, float)})
  report.write_csv(path(".csv"), rows)
  report.write_text(path(".md"), _header(
      config, description, f"Classes {list(dense.mask_names)}; {len(tr)} training and "
      f"{len(te)} test frames (patient-grouped).\n\n") + report.markdown_table(
          rows, ["init", "global_accuracy", "mean_accuracy", "miou"],
          ["encoder init", "GAA", "MA", "mIoU"]))
  return dict(out, csv=path(".csv"), markdown=path(".md"))


# ----------------------------------------------------------------------------------------------
# embed


def run_embed(config) -> dict:
  """kNN accuracy over patient-grouped folds and a t-SNE plot of frozen features."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ssl_us.eval import data, embeddings, plots, protocols, report
  ec = config.embed
  recs = data.load_records(config.data.dir, tuple(config.data.splits))
  aug = _aug(config)
  example = _example(recs.images, config.image_size)
  encoder, pre_vars, description = load_encoder(config, example)
  if ec.color_by == "label":
    y, names = recs.label, recs.label_names
  elif ec.color_by == "anatomy_fine":
    y, names = recs.anatomy_fine, recs.anatomy_fine_names
  else:
    raise ValueError(f"embed.color_by must be 'label' or 'anatomy_fine', got {ec.color_by!r}")
  keep = np.flatnonzero(y >= 0)
  if keep.size == 0:
    raise ValueError(f"{config.data.dir}: no record has a {ec.color_by} label")
  feats = protocols.features(encoder, pre_vars, recs.images[keep], aug)
  y, groups = y[keep], recs.patient[keep]
  mean, std = embeddings.knn_accuracy_cv(feats, y, groups, ec.knn_k, ec.folds,
                                         config.eval.split_seed)
  rng = np.random.default_rng(config.seed)
  show = np.sort(rng.permutation(len(y))[:ec.max_points])
  xy = embeddings.tsne(feats[show], seed=config.seed)
  path = _out_paths(config)
  plots.embedding_scatter(xy, y[show], names, path(".png"),
                          title=f"{config.name}: t-SNE of frozen features")
  row = dict(color_by=ec.color_by, knn_k=ec.knn_k, folds=ec.folds, knn_accuracy_mean=mean,
             knn_accuracy_std=std, records=int(len(y)), feature_dim=int(feats.shape[1]))
  report.write_csv(path(".csv"), [row])
  report.write_text(path(".md"), _header(config, description) + report.markdown_table(
      [row], ["color_by", "knn_k", "knn_accuracy", "records", "feature_dim"],
      ["labels", "k", "kNN accuracy", "records", "feature dim"]))
  out = {"csv": path(".csv"), "markdown": path(".md"), "plot": path(".png")}
  if ec.get("save_features", True):  # the features the kNN accuracy was computed from
    out["features"] = path("_features.npz")
    with files_lib.atomic_path(out["features"], ".npz") as tmp:
      np.savez(tmp, features=np.asarray(feats, np.float32), label=y, label_names=np.array(names),
               video=recs.video[keep], patient=groups, frame_index=recs.frame_index[keep])
  return out


TASKS = {"classify": run_classify, "retrieval": run_retrieval, "saliency": run_saliency,
         "segment": run_segment, "embed": run_embed}


def run(config) -> dict:
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r}; known: {sorted(TASKS)}")
  if config.compilation_cache:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_compilation_cache_dir", config.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return TASKS[config.task](config)


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  out = run(_CONFIG.value)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)
