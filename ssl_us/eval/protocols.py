"""Downstream classification protocols: which encoder weights to start from and which to train.

| protocol          | paper name                  | encoder init | trainable                     |
|-------------------|-----------------------------|--------------|-------------------------------|
| linear            | SSL feature extractor (001) | pretrained   | head                          |
| last_k            | last-k fine-tuning (003)    | pretrained   | last k encoder blocks + head  |
| finetune          | SSL fine-tuned (001)        | pretrained   | everything                    |
| supervised        | fully supervised (001)      | random       | everything                    |
| random_features   | random feature extractor    | random       | head                          |

Model: ``Classifier`` = encoder -> [Dense - ReLU] * len(head_hidden) -> Dense(num_classes), so
``params = {'encoder': ..., 'head': ...}`` and ``batch_stats = {'encoder': ...}``.

Encoder blocks (for last_k): the encoder's top-level submodules in the order they run; a
normalisation layer, or a submodule without parameters (dropout), joins the block before it. So
ResNet-18 = [stem conv + BN, 8 residual blocks], ConvNet4 = 4 x [conv + BN], Darknet53_3D =
[stem, down_i + bn_down_i, stage blocks ...].

Frozen means frozen: a frozen block's parameters get zero updates (optax.multi_transform with
``set_to_zero``), and its BatchNorm layers run on their running statistics (which therefore do
not change) and its dropout is off, through a flax method interceptor; trainable blocks run in
training mode. Frozen-encoder protocols (linear, random_features) train the head on features
computed once in evaluation mode (the deterministic center view), which is the same model.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssl_us import augment

ENCODER = "encoder"
HEAD = "head"
_NORMS = (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclasses.dataclass(frozen=True)
class Protocol:
  name: str
  label: str            # the papers' name, for tables and plots
  pretrained: bool      # start from the checkpoint's encoder (else a random init)
  train: str            # 'head', 'last_k' or 'all'


PROTOCOLS = {p.name: p for p in (
    Protocol("linear", "SSL feature extractor", True, "head"),
    Protocol("last_k", "SSL last-k fine-tuned", True, "last_k"),
    Protocol("finetune", "SSL fine-tuned", True, "all"),
    Protocol("supervised", "Fully supervised", False, "all"),
    Protocol("random_features", "Random feature extractor", False, "head"),
)}


def get_protocol(name: str) -> Protocol:
  if name not in PROTOCOLS:
    raise ValueError(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)}")
  return PROTOCOLS[name]


class Classifier(nn.Module):
  """encoder -> MLP head; logits (N, num_classes)."""
  encoder: nn.Module
  num_classes: int
  head_hidden: Sequence[int] = ()

  def setup(self):
    self.head = Head(self.num_classes, tuple(self.head_hidden))

  def __call__(self, x, train: bool = True):
    return self.head(self.encoder(x, train=train))


class Head(nn.Module):
  """[Dense - ReLU] * len(hidden) - Dense(num_classes) on features (N, D)."""
  num_classes: int
  hidden: Sequence[int] = ()

  @nn.compact
  def __call__(self, h):
    for w in self.hidden:
      h = nn.relu(nn.Dense(w)(h))
    return nn.Dense(self.num_classes)(h)


# ----------------------------------------------------------------------------------------------
# Blocks and masks.


def encoder_blocks(encoder: nn.Module, variables, example) -> list[tuple[str, ...]]:
  """The encoder's top-level submodule names grouped into blocks, in execution order."""
  calls: list[tuple[str, nn.Module]] = []

  def record(next_fun, args, kwargs, context):
    path = context.module.path
    if context.method_name == "__call__" and len(path) == 1 and path[0] not in dict(calls):
      calls.append((path[0], context.module))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: encoder.apply(v, x, train=False), variables, example)
  params = variables["params"]
  blocks: list[list[str]] = []
  for name, module in calls:
    joins = isinstance(module, _NORMS) or name not in params
    if joins and blocks:
      blocks[-1].append(name)
    else:
      blocks.append([name])
  missing = sorted(set(params) - {n for b in blocks for n in b})
  if missing:
    raise ValueError(f"encoder parameters {missing} belong to no submodule that runs")
  return [tuple(b) for b in blocks]


def trainable_encoder_names(blocks: Sequence[tuple[str, ...]], protocol: Protocol,
                            last_k: int) -> frozenset[str]:
  """Top-level encoder submodules that train under ``protocol``."""
  if protocol.train == "head":
    return frozenset()
  if protocol.train == "all":
    return frozenset(n for b in blocks for n in b)
  if not 1 <= last_k <= len(blocks):
    raise ValueError(f"last_k={last_k} but the encoder has {len(blocks)} blocks: {list(blocks)}")
  return frozenset(n for b in blocks[len(blocks) - last_k:] for n in b)


def trainable_mask(params, trainable: frozenset[str]):
  """Pytree of bools like ``params``: the head and the ``trainable`` encoder submodules."""
  def label(path, _):
    top = path[0].key
    return top != ENCODER or path[1].key in trainable
  return jax.tree_util.tree_map_with_path(label, params)


def masked_optimizer(tx: optax.GradientTransformation,
                     mask_fn: Callable) -> optax.GradientTransformation:
  """``tx`` on the leaves where ``mask_fn(params)`` is True, zero updates elsewhere."""
  def labels(params):
    return jax.tree.map(lambda m: "train" if m else "frozen", mask_fn(params))
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def freeze_interceptor(frozen: frozenset[str], root: str = ENCODER):
  """Flax interceptor: BatchNorm of frozen submodules uses running stats; their dropout is off.

  The encoders fix ``use_running_average`` / ``deterministic`` at construction, so a frozen
  BatchNorm is re-applied as an unbound clone in evaluation mode on the same variables (its
  scale and bias stay differentiable; the zero updates come from the optimizer mask).
  """
  def intercept(next_fun, args, kwargs, context):
    module, path = context.module, context.module.path
    if not (context.method_name == "__call__" and len(path) >= 2 and path[0] == root
            and path[1] in frozen):
      return next_fun(*args, **kwargs)
    if isinstance(module, nn.BatchNorm):
      bn = module.clone(parent=None, use_running_average=True, axis_name=None)
      return bn.apply({k: module.variables[k] for k in ("params", "batch_stats")
                       if k in module.variables}, *args, **kwargs)
    if isinstance(module, nn.Dropout):
      return args[0] if args else kwargs["inputs"]
    return next_fun(*args, **kwargs)
  return intercept


# ----------------------------------------------------------------------------------------------
# Training and prediction.


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """Optimisation of one downstream run (AdamW, cosine decay after linear warmup)."""
  steps: int = 500
  batch_size: int = 32
  lr: float = 1e-3
  weight_decay: float = 0.0
  warmup_steps: int = 0
  head_hidden: tuple[int, ...] = ()
  last_k: int = 3
  class_balanced: bool = True   # loss weights 1 / class frequency (normalised to mean 1)
  seed: int = 0


def make_tx(cfg: FitConfig) -> optax.GradientTransformation:
  """AdamW; lr rises linearly over warmup_steps, then cosine decay to 0 at ``steps``."""
  if cfg.warmup_steps > 0:
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps,
                                                  max(cfg.steps, cfg.warmup_steps + 1))
  else:
    schedule = optax.cosine_decay_schedule(cfg.lr, max(cfg.steps, 1))
  return optax.adamw(schedule, weight_decay=cfg.weight_decay)


def class_weights(labels: np.ndarray, num_classes: int, balanced: bool) -> np.ndarray:
  """w_c = N / (C n_c) (classes absent from the labels get 0), or all ones."""
  if not balanced:
    return np.ones(num_classes, np.float32)
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  w = np.divide(labels.size, num_classes * counts, out=np.zeros(num_classes), where=counts > 0)
  return w.astype(np.float32)


def weighted_xent(logits, labels, weights):
  """sum_i w_{y_i} CE_i / sum_i w_{y_i}."""
  w = weights[labels]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-12)


def batch_indices(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
  """Endless fixed-size batches: consecutive random permutations of range(n), concatenated."""
  if n == 0:
    raise ValueError("no training examples")
  buf = np.zeros(0, np.int64)
  while True:
    while buf.size < batch_size:
      buf = np.concatenate([buf, rng.permutation(n)])
    yield buf[:batch_size]
    buf = buf[batch_size:]


def feature_dim(encoder: nn.Module, encoder_variables, example) -> int:
  """D of the encoder's features h (N, D), by shape inference (nothing is computed)."""
  out = jax.eval_shape(lambda v, x: encoder.apply(v, x, train=False), encoder_variables, example)
  return int(out.shape[-1])


def init_variables(model: Classifier, encoder_variables, example, key):
  """Classifier variables: the given encoder variables and a freshly initialised head."""
  d = feature_dim(model.encoder, encoder_variables, example)
  head = Head(model.num_classes, tuple(model.head_hidden))
  variables = {"params": {ENCODER: encoder_variables["params"],
                          HEAD: head.init(key, jnp.zeros((1, d)))["params"]}}
  if "batch_stats" in encoder_variables:
    variables["batch_stats"] = {ENCODER: encoder_variables["batch_stats"]}
  return variables


def _step_key(cfg: FitConfig) -> FitConfig:
  """The part of a FitConfig a compiled step depends on (not the seed)."""
  return dataclasses.replace(cfg, seed=0)


@functools.lru_cache(maxsize=16)
def _head_step(head: Head, cfg: FitConfig):
  """(tx, jitted step) for the head alone; cached so that folds and seeds reuse the compile."""
  tx = make_tx(cfg)

  @jax.jit
  def step(p, s, x, y, weights):
    loss, g = jax.value_and_grad(lambda p: weighted_xent(head.apply({"params": p}, x), y,
                                                         weights))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  return tx, step


def standardizer(feats) -> tuple[np.ndarray, np.ndarray]:
  """Per-feature mean and std of (N, D) features; std 1 where a feature is constant."""
  feats = np.asarray(feats, np.float64)
  mu, sigma = feats.mean(0), feats.std(0)
  return mu.astype(np.float32), np.where(sigma > 1e-8, sigma, 1.0).astype(np.float32)


def fold_standardization(head_params, mu, sigma):
  """Head parameters on raw h equal to ``head_params`` on (h - mu) / sigma.

  The first Dense layer absorbs it: W' = W / sigma[:, None], b' = b - (mu / sigma) W.
  """
  first = head_params["Dense_0"]
  kernel = first["kernel"] / sigma[:, None]
  bias = first["bias"] - (mu / sigma) @ first["kernel"]
  return dict(head_params, Dense_0=dict(first, kernel=kernel, bias=bias))


def fit_head(model: Classifier, variables, feats, labels, cfg: FitConfig):
  """AdamW on the head alone over precomputed features (N, D); encoder variables untouched.

  The head trains on features standardised with the training set's per-feature mean and std
  (raw encoder features can be large, and saturated softmax scores would tie), and the
  standardisation is then folded into its first layer, so the returned head takes raw h.
  Returns (variables, per-step losses).
  """
  labels = np.asarray(labels, np.int32)
  weights = jnp.asarray(class_weights(labels, model.num_classes, cfg.class_balanced))
  mu, sigma = standardizer(feats)
  feats = (np.asarray(feats, np.float32) - mu) / sigma
  tx, step = _head_step(Head(model.num_classes, tuple(model.head_hidden)), _step_key(cfg))
  head_params = variables["params"][HEAD]
  opt_state = tx.init(head_params)
  rng = np.random.default_rng(cfg.seed)
  losses = []
  for _, idx in zip(range(cfg.steps), batch_indices(len(feats), cfg.batch_size, rng)):
    head_params, opt_state, loss = step(head_params, opt_state, feats[idx], labels[idx],
                                        weights)
    losses.append(loss)
  head_params = fold_standardization(head_params, jnp.asarray(mu), jnp.asarray(sigma))
  params = dict(variables["params"], **{HEAD: head_params})
  return dict(variables, params=params), np.asarray(jax.device_get(losses))


@functools.lru_cache(maxsize=16)
def _end_to_end_step(model: Classifier, cfg: FitConfig, aug: augment.AugmentConfig,
                     trainable: frozenset[str], frozen: frozenset[str]):
  """(tx, jitted step): masked AdamW, on-device augmentation, frozen BatchNorm; cached."""
  tx = masked_optimizer(make_tx(cfg), functools.partial(trainable_mask, trainable=trainable))
  interceptor = freeze_interceptor(frozen)

  @jax.jit
  def step(params, batch_stats, opt_state, x, y, weights, key):
    k_aug, k_drop = jax.random.split(key)
    x = augment.augment_batch(k_aug, x, aug)

    def loss_fn(p):
      with nn.intercept_methods(interceptor):
        logits, new = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"], rngs={"dropout": k_drop})
      return weighted_xent(logits, y, weights), new.get("batch_stats", {})

    (loss, new_stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    u, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, u), new_stats, opt_state, loss

  return tx, step


def fit(model: Classifier, variables, images, labels, protocol: Protocol, cfg: FitConfig,
        aug: augment.AugmentConfig, blocks: Sequence[tuple[str, ...]]):
  """Train ``variables`` (from ``init_variables``) on uint8 images/clips and labels.

  Returns (variables, per-step losses). ``blocks`` = ``encoder_blocks`` of the encoder.
  """
  trainable = trainable_encoder_names(blocks, protocol, cfg.last_k)
  if not trainable:
    feats = features(model.encoder, encoder_variables(variables), images, aug, cfg.batch_size)
    return fit_head(model, variables, feats, labels, cfg)
  labels = np.asarray(labels, np.int32)
  weights = jnp.asarray(class_weights(labels, model.num_classes, cfg.class_balanced))
  frozen = frozenset(n for b in blocks for n in b) - trainable
  tx, step = _end_to_end_step(model, _step_key(cfg), aug, trainable, frozen)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  opt_state = tx.init(params)
  rng = np.random.default_rng(cfg.seed)
  key = jax.random.key(cfg.seed)
  losses = []
  for i, idx in zip(range(cfg.steps), batch_indices(len(images), cfg.batch_size, rng)):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, images[idx],
                                                labels[idx], weights, jax.random.fold_in(key, i))
    losses.append(loss)
  out = {"params": params}
  if batch_stats:
    out["batch_stats"] = batch_stats
  return out, np.asarray(jax.device_get(losses))


def encoder_variables(variables):
  """The encoder's part of classifier variables: {'params': ..., 'batch_stats': ...}."""
  return {k: v[ENCODER] for k, v in variables.items() if ENCODER in v}


def batched_apply(fn: Callable, x: np.ndarray, batch_size: int) -> np.ndarray:
  """fn over fixed-size batches of x (the last one padded by repetition), concatenated."""
  n = len(x)
  if n == 0:
    raise ValueError("no examples to evaluate")
  out = []
  for i in range(0, n, batch_size):
    xb = x[i:i + batch_size]
    pad = batch_size - len(xb)
    if pad:
      xb = np.concatenate([xb, np.repeat(xb[-1:], pad, axis=0)])
    out.append(np.asarray(fn(xb))[:batch_size - pad])
  return np.concatenate(out)


def features(encoder: nn.Module, encoder_variables, images, aug: augment.AugmentConfig,
             batch_size: int = 64) -> np.ndarray:
  """Frozen features (N, D) of uint8 images/clips: center view, evaluation mode."""
  fn = _apply_fn(encoder, aug, softmax=False)
  return batched_apply(functools.partial(fn, encoder_variables), np.asarray(images), batch_size)


@functools.lru_cache(maxsize=16)
def _apply_fn(module: nn.Module, aug: augment.AugmentConfig, softmax: bool):
  """Jitted (variables, uint8 x) -> module output on the center view [softmax]; cached."""
  def fn(v, x):
    out = module.apply(v, augment.center_view(x, aug), train=False)
    return jax.nn.softmax(out) if softmax else out
  return jax.jit(fn)


def predict_head(model: Classifier, variables, feats) -> np.ndarray:
  """Class probabilities (N, C) from precomputed features (N, D)."""
  head = Head(model.num_classes, tuple(model.head_hidden))
  return np.asarray(jax.nn.softmax(head.apply({"params": variables["params"][HEAD]},
                                              jnp.asarray(feats))))


def predict(model: Classifier, variables, images, aug: augment.AugmentConfig,
            batch_size: int = 64) -> np.ndarray:
  """Class probabilities (N, C) of uint8 images/clips (center view, evaluation mode)."""
  fn = _apply_fn(model, aug, softmax=True)
  return batched_apply(functools.partial(fn, variables), np.asarray(images), batch_size)


def count_trainable(params, trainable: frozenset[str]) -> int:
  """Number of trainable scalars (paper 001 Table 3 reports them)."""
  mask = trainable_mask(params, trainable)
  return int(sum(np.size(p) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))
                 if m))


def random_encoder_variables(encoder: nn.Module, example, seed: int):
  """A fresh encoder init (the 'random' protocols), same architecture as the pretrained one."""
  v = _init_fn(encoder)(jax.random.key(seed), example)
  return {k: v[k] for k in ("params", "batch_stats") if k in v}


@functools.lru_cache(maxsize=16)
def _init_fn(module: nn.Module):
  return jax.jit(lambda k, x: module.init({"params": k, "dropout": k}, x, train=False))

