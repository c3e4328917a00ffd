"""View retrieval across exams (paper 000): pairs, the pair classifier and its two baselines.

Pairs (paper 000 Sec. 3, Fig. 3): every frame carries a view annotation ``view`` (class id, -1 =
not annotated). A reference is an annotated frame of the reference exam (T1); its candidates
are the annotated frames of the same patient and side at every later exam (T2, T3, ...); the
pair is positive when the two frames show the same view (``view_ref == view_cand``).

Three scorers of a pair, all giving P(positive) or a similarity:
- ``ncc``: normalised cross-correlation of the two images, sum((a - mean a)(b - mean b)) /
  sqrt(sum (a - mean a)^2 sum (b - mean b)^2), in [-1, 1] (0 if either image is constant);
  thresholded at the value that maximises F1 on the training pairs.
- ``PairClassifier`` (the paper's model): concat(h_ref, h_cand) of the *frozen* pretrained
  encoder -> Dense 2024 - 1024 - 512 with ReLU and dropout 0.2 -> Dense 2 (softmax).
- ``Siamese`` (the supervised baseline): the same encoder architecture, randomly initialised
  and trained end to end on the pairs, concat(h_ref, h_cand) -> one Dense 2 (softmax).

Retrieval (paper 000 Sec. 2.1): for a reference and one later exam video, the retrieved frame
is the candidate with the highest score; a hit when that frame is a positive.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssl_us import augment
from ssl_us.eval import metrics
from ssl_us.eval.protocols import batch_indices, batched_apply


def _natural_key(s: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


@dataclasses.dataclass(frozen=True)
class Pairs:
  ref: np.ndarray     # (P,) record index of the reference frame
  cand: np.ndarray    # (P,) record index of the candidate frame
  label: np.ndarray   # (P,) 1 = same view
  video: np.ndarray   # (P,) index of the candidate's video (for retrieval)

  def __len__(self):
    return int(self.ref.size)

  def subset(self, keep) -> "Pairs":
    return Pairs(self.ref[keep], self.cand[keep], self.label[keep], self.video[keep])


def make_pairs(patient, side, exam, view, video, ref_exam: str = "T1",
               max_per_reference: int = 0, seed: int = 0) -> Pairs:
  """All (reference at ``ref_exam``, annotated candidate at a later exam) pairs, same patient+side.

  Exams are ordered naturally (T1 < T2 < T10). With ``max_per_reference`` > 0, each reference
  keeps at most that many positive and that many negative candidates, drawn with ``seed``.
  """
  patient, side, exam, view, video = (np.asarray(a) for a in (patient, side, exam, view, video))
  n = patient.shape[0]
  if not all(a.shape == (n,) for a in (side, exam, view, video)):
    raise ValueError("make_pairs: patient, side, exam, view and video must be equal 1-D arrays")
  exams = sorted(set(exam.tolist()), key=_natural_key)
  if ref_exam not in exams:
    raise ValueError(f"reference exam {ref_exam!r} not in the data; exams: {exams}")
  rank = {e: i for i, e in enumerate(exams)}
  exam_rank = np.array([rank[e] for e in exam.tolist()])
  annotated = view >= 0
  rng = np.random.default_rng(seed)
  refs, cands, labels = [], [], []
  for r in np.flatnonzero(annotated & (exam == ref_exam)):
    c = np.flatnonzero(annotated & (patient == patient[r]) & (side == side[r])
                       & (exam_rank > rank[ref_exam]))
    y = (view[c] == view[r]).astype(np.int32)
    if max_per_reference > 0:
      pos, neg = c[y == 1], c[y == 0]
      pick = lambda a: rng.permutation(a)[:max_per_reference]
      c = np.concatenate([pick(pos), pick(neg)])
      y = (view[c] == view[r]).astype(np.int32)
    refs.append(np.full(c.size, r))
    cands.append(c)
    labels.append(y)
  if not refs:
    raise ValueError(f"no annotated reference frames at exam {ref_exam!r}")
  cand = np.concatenate(cands).astype(np.int64)
  return Pairs(np.concatenate(refs).astype(np.int64), cand, np.concatenate(labels),
               video[cand])


def ncc(a, b) -> np.ndarray:
  """Zero-mean normalised cross-correlation of image pairs a, b (P, ...) -> (P,) in [-1, 1]."""
  a = np.asarray(a, np.float64).reshape(len(a), -1)
  b = np.asarray(b, np.float64).reshape(len(b), -1)
  a = a - a.mean(1, keepdims=True)
  b = b - b.mean(1, keepdims=True)
  den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
  return np.divide((a * b).sum(1), den, out=np.zeros(len(a)), where=den > 0)


def best_f1_threshold(labels, scores) -> float:
  """The score threshold t (predict positive when score >= t) with the highest F1."""
  labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, np.float64)
  order = np.argsort(-scores, kind="stable")
  s, y = scores[order], labels[order]
  tp = np.cumsum(y)
  k = np.arange(1, y.size + 1)
  last = np.r_[s[1:] != s[:-1], True]       # thresholds only between distinct scores
  f1 = 2 * tp / (k + y.sum())
  i = int(np.argmax(np.where(last, f1, -1)))
  return float(s[i])


def pair_metrics(labels, scores, threshold: float) -> dict[str, float]:
  """AUC of the scores; precision, recall, F1 of (score >= threshold) for the positive class."""
  labels = np.asarray(labels).astype(bool)
  pred = np.asarray(scores) >= threshold
  tp, fp, fn = np.sum(pred & labels), np.sum(pred & ~labels), np.sum(~pred & labels)
  p = tp / (tp + fp) if tp + fp else 0.0
  r = tp / (tp + fn) if tp + fn else 0.0
  return dict(auc=metrics.roc_auc(labels, scores), precision=float(p), recall=float(r),
              f1=float(2 * p * r / (p + r)) if p + r else 0.0, threshold=float(threshold))


def retrieval_accuracy(pairs: Pairs, scores) -> float:
  """Fraction of (reference, later video) groups with a positive whose top-scored frame is one."""
  scores = np.asarray(scores)
  hits, total = 0, 0
  keys = np.stack([pairs.ref, pairs.video], 1)
  _, group = np.unique(keys, axis=0, return_inverse=True)
  for g in range(group.max() + 1):
    m = np.flatnonzero(group.ravel() == g)
    if pairs.label[m].any():
      total += 1
      hits += int(pairs.label[m[np.argmax(scores[m])]] == 1)
  if total == 0:
    raise ValueError("no (reference, video) group holds a positive candidate")
  return hits / total


class PairClassifier(nn.Module):
  """Paper 000 Fig. 2c on concat(h_ref, h_cand): Dense 2024-1024-512 (ReLU, dropout), Dense 2."""
  hidden: Sequence[int] = (2024, 1024, 512)
  dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, h_ref, h_cand, train: bool = False):
    x = jnp.concatenate([h_ref, h_cand], axis=-1)
    for w in self.hidden:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(nn.Dense(w)(x)))
    return nn.Dense(2)(x)


class Siamese(nn.Module):
  """Supervised baseline: shared encoder, concat(h_ref, h_cand) -> Dense 2."""
  encoder: nn.Module

  @nn.compact
  def __call__(self, x_ref, x_cand, train: bool = False):
    n = x_ref.shape[0]
    h = self.encoder(jnp.concatenate([x_ref, x_cand]), train=train)
    return nn.Dense(2, name="head")(jnp.concatenate([h[:n], h[n:]], axis=-1))


@dataclasses.dataclass(frozen=True)
class PairFitConfig:
  """Paper 000: Adam, lr 1e-4, batch 42 (classifier); lr 1e-5, batch 40 (supervised)."""
  steps: int = 1000
  batch_size: int = 42
  lr: float = 1e-4
  seed: int = 0


def _balanced_weights(labels):
  counts = np.bincount(labels, minlength=2).astype(np.float32)
  return jnp.asarray(np.divide(labels.size, 2 * counts, out=np.zeros(2, np.float32),
                               where=counts > 0))


def _xent(logits, y, w):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.sum(w[y] * ce) / jnp.maximum(jnp.sum(w[y]), 1e-12)


def fit_pair_classifier(feats, pairs: Pairs, cfg: PairFitConfig):
  """Train ``PairClassifier`` on frozen features (N, D) of the records; class-balanced CE."""
  model = PairClassifier()
  feats = jnp.asarray(feats)
  key = jax.random.key(cfg.seed)
  params = jax.jit(lambda k: model.init(k, feats[:1], feats[:1]))(key)["params"]
  tx = optax.adam(cfg.lr)
  opt_state = tx.init(params)
  w = _balanced_weights(pairs.label)

  @jax.jit
  def step(params, opt_state, feats, r, c, y, w, k):
    def loss_fn(p):
      logits = model.apply({"params": p}, feats[r], feats[c], train=True, rngs={"dropout": k})
      return _xent(logits, y, w)
    loss, g = jax.value_and_grad(loss_fn)(params)
    u, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, u), opt_state, loss

  rng = np.random.default_rng(cfg.seed)
  for i, idx in zip(range(cfg.steps), batch_indices(len(pairs), cfg.batch_size, rng)):
    params, opt_state, _ = step(params, opt_state, feats, pairs.ref[idx], pairs.cand[idx],
                                pairs.label[idx], w, jax.random.fold_in(key, i))
  return model, params


def score_pair_classifier(model, params, feats, pairs: Pairs, batch_size: int = 1024):
  """P(positive) of every pair (P,)."""
  feats = jnp.asarray(feats)
  fn = jax.jit(lambda p, f, r, c: jax.nn.softmax(model.apply({"params": p}, f[r], f[c]))[:, 1])
  idx = np.stack([pairs.ref, pairs.cand], 1)
  return batched_apply(lambda rc: fn(params, feats, rc[:, 0], rc[:, 1]), idx, batch_size)


def fit_siamese(encoder: nn.Module, images, pairs: Pairs, cfg: PairFitConfig,
                aug: augment.AugmentConfig):
  """Train ``Siamese`` (random init) end to end on uint8 images (N, H, W, 1) of the records."""
  model = Siamese(encoder)
  key = jax.random.key(cfg.seed)
  x0 = augment.center_view(jnp.asarray(images[:1]), aug)
  v = jax.jit(lambda k: model.init({"params": k, "dropout": k}, x0, x0, train=False))(key)
  params, batch_stats = v["params"], v.get("batch_stats", {})
  tx = optax.adam(cfg.lr)
  opt_state = tx.init(params)
  w = _balanced_weights(pairs.label)

  @jax.jit
  def step(params, batch_stats, opt_state, xr, xc, y, w, k):
    k1, k2, k3 = jax.random.split(k, 3)
    xr, xc = augment.augment_batch(k1, xr, aug), augment.augment_batch(k2, xc, aug)

    def loss_fn(p):
      logits, new = model.apply({"params": p, "batch_stats": batch_stats}, xr, xc, train=True,
                                mutable=["batch_stats"], rngs={"dropout": k3})
      return _xent(logits, y, w), new.get("batch_stats", {})

    (loss, new_stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    u, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, u), new_stats, opt_state, loss

  rng = np.random.default_rng(cfg.seed)
  for i, idx in zip(range(cfg.steps), batch_indices(len(pairs), cfg.batch_size, rng)):
    params, batch_stats, opt_state, _ = step(
        params, batch_stats, opt_state, images[pairs.ref[idx]], images[pairs.cand[idx]],
        pairs.label[idx], w, jax.random.fold_in(key, i))
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return model, variables


def score_siamese(model, variables, images, pairs: Pairs, aug: augment.AugmentConfig,
                  batch_size: int = 256):
  """P(positive) of every pair (P,), center views, evaluation mode."""
  fn = jax.jit(lambda v, a, b: jax.nn.softmax(model.apply(
      v, augment.center_view(a, aug), augment.center_view(b, aug), train=False))[:, 1])
  idx = np.stack([pairs.ref, pairs.cand], 1)
  return batched_apply(lambda rc: fn(variables, images[rc[:, 0]], images[rc[:, 1]]), idx,
                       batch_size)
