"""A quick look at frozen features: kNN accuracy (patient-grouped folds), the alignment and
uniformity of projections, and a t-SNE embedding.

kNN: cosine similarity between L2-normalised features; each test example takes the majority
label of its k most similar training examples (ties go to the smaller class id).

Alignment and uniformity (Wang and Isola, ICML 2020), on L2-normalised projections:
  alignment  = mean_i |z_a[i] - z_b[i]|^alpha                  (alpha = 2; positive pairs)
  uniformity = log mean_{i != j} exp(-t |z[i] - z[j]|^2)       (t = 2; all distinct pairs)
Lower is better for both: aligned views, and embeddings spread over the sphere.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ssl_us.eval import splits


def _normalise(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predict(train_feats, train_labels, test_feats, k: int, num_classes: int) -> np.ndarray:
  """Majority label of the k nearest (cosine) training examples, for every test example."""
  train_labels = np.asarray(train_labels)
  if not 1 <= k <= len(train_labels):
    raise ValueError(f"k={k} but there are {len(train_labels)} training examples")
  sim = _normalise(test_feats) @ _normalise(train_feats).T          # (N_test, N_train)
  nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  votes = np.zeros((sim.shape[0], num_classes), np.int64)
  np.add.at(votes, (np.arange(sim.shape[0])[:, None], train_labels[nearest]), 1)
  return votes.argmax(axis=1)


def knn_accuracy_cv(feats, labels, groups, k: int = 20, folds: int = 5,
                    seed: int = 0) -> tuple[float, float]:
  """Mean and std over patient-grouped folds of the kNN accuracy."""
  labels = np.asarray(labels)
  num_classes = int(labels.max()) + 1
  accs = []
  for tr, te in splits.group_kfold(groups, labels, folds, seed):
    pred = knn_predict(feats[tr], labels[tr], feats[te], min(k, len(tr)), num_classes)
    accs.append(np.mean(pred == labels[te]))
  return float(np.mean(accs)), float(np.std(accs))


# The next three are jax.numpy, so that the online monitor computes them on device under jit;
# on numpy input they run on the default device.


def _jnormalise(x):
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def alignment(z_a, z_b, alpha: float = 2.0):
  """Mean |z_a - z_b|^alpha over positive pairs (rows), after L2 normalisation."""
  d = jnp.linalg.norm(_jnormalise(z_a) - _jnormalise(z_b), axis=-1)
  return jnp.mean(d ** alpha)


def uniformity(z, t: float = 2.0):
  """log of the mean of exp(-t |z_i - z_j|^2) over pairs i != j, after L2 normalisation."""
  n = z.shape[0]
  if n < 2:
    raise ValueError(f"uniformity needs at least 2 embeddings, got {n}")
  z = _jnormalise(z)
  sq = jnp.maximum(2.0 - 2.0 * (z @ z.T), 0.0)             # |z_i - z_j|^2 on the sphere
  off = ~jnp.eye(n, dtype=bool)
  return jax.nn.logsumexp(jnp.where(off, -t * sq, -jnp.inf)) - jnp.log(n * (n - 1))


def knn_accuracy_leave_group_out(feats, labels, groups, k: int, num_classes: int):
  """kNN accuracy where each example's k nearest (cosine) come from other groups (patients)
  only; ties go to the smaller class id. ``groups``: integer ids."""
  f = _jnormalise(feats)
  sim = jnp.where(groups[:, None] == groups[None, :], -jnp.inf, f @ f.T)
  _, nearest = jax.lax.top_k(sim, k)
  votes = jax.nn.one_hot(labels[nearest], num_classes).sum(axis=1)
  return jnp.mean(jnp.argmax(votes, axis=-1) == labels)


def tsne(feats, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
  """2-D t-SNE of features (N, D) (sklearn; perplexity capped at (N - 1) / 3)."""
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  feats = np.asarray(feats, np.float64)
  if len(feats) < 4:
    raise ValueError(f"t-SNE needs at least 4 examples, got {len(feats)}")
  p = min(perplexity, (len(feats) - 1) / 3)
  return TSNE(2, perplexity=p, init="pca", random_state=seed).fit_transform(_normalise(feats))
