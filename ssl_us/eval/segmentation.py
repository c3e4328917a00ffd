"""Segmentation transfer (paper 002 Task III): a U-Net style decoder on a pretrained 2D encoder.

Skip features come from the encoder itself, unchanged: while the encoder runs, a flax method
interceptor records the output of each of its top-level submodules; the last output at each
spatial resolution is that resolution's skip (ResNet: stem, then the last block of every stage;
ConvNet4: the BatchNorm before each pool and the final dropout). So any 2D encoder of
ssl_us.models works and its parameters keep their names under ``params['encoder']``.

Decoder: from the coarsest skip, repeat [bilinear upsample to the next skip's size, concatenate
the skip, two (3x3 conv - BatchNorm - ReLU) of the skip's width]; if the finest skip is coarser
than the input, a last upsample to the input size and one 3x3 conv block; then a 1x1 conv to
``num_classes`` logits (N, H, W, K). The whole model is fine-tuned end to end with pixel
cross-entropy (optionally class-balanced, weights N / (K n_k)); spatial augmentation is a
horizontal flip applied to image and mask together.

Metrics (``metrics.segmentation_metrics``) from the pixel confusion matrix summed over the test
images: global accuracy, mean per-class accuracy and mIoU.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssl_us import augment, models
from ssl_us.eval import metrics
from ssl_us.eval.protocols import (FitConfig, batch_indices, batched_apply, class_weights,
                                   make_tx)


def select_skips(outputs: Sequence[jax.Array]) -> list[jax.Array]:
  """The last (N, H, W, C) output at each spatial size, finest first."""
  last: dict[tuple[int, int], jax.Array] = {}
  for y in outputs:
    if not isinstance(y, jax.Array) or y.ndim != 4:
      raise ValueError("segmentation needs a 2D encoder whose blocks output (N, H, W, C); got "
                       f"{getattr(y, 'shape', type(y))}")
    last[tuple(y.shape[1:3])] = y
  return [last[k] for k in sorted(last, key=lambda hw: -hw[0] * hw[1])]


def encoder_skips(encoder: nn.Module, encoder_path: tuple[str, ...], x, train: bool):
  """Run ``encoder`` on x; return (pooled features, skips finest first)."""
  outputs = []
  depth = len(encoder_path) + 1

  def grab(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    path = context.module.path
    if (context.method_name == "__call__" and len(path) == depth
        and tuple(path[:-1]) == encoder_path):
      outputs.append(y)
    return y

  with nn.intercept_methods(grab):
    h = encoder(x, train=train)
  return h, select_skips(outputs)


class UNetDecoder(nn.Module):
  """Skips (finest first) -> logits (N, out_h, out_w, num_classes)."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, skips: Sequence[jax.Array], out_hw: tuple[int, int], train: bool = True):
    norm = models.batch_norm(train, None, self.dtype)

    def block(x, width):
      x = nn.Conv(width, (3, 3), use_bias=False, dtype=self.dtype)(x)
      return nn.relu(norm()(x))

    x = skips[-1].astype(self.dtype)
    for skip in reversed(skips[:-1]):
      x = jax.image.resize(x, x.shape[:1] + skip.shape[1:3] + x.shape[3:], "bilinear")
      x = jnp.concatenate([x, skip.astype(self.dtype)], axis=-1)
      x = block(block(x, skip.shape[-1]), skip.shape[-1])
    if tuple(x.shape[1:3]) != tuple(out_hw):
      x = jax.image.resize(x, x.shape[:1] + tuple(out_hw) + x.shape[3:], "bilinear")
      x = block(x, skips[0].shape[-1])
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype)(x).astype(jnp.float32)


class SegmentationModel(nn.Module):
  """encoder (params['encoder']) + UNetDecoder (params['decoder'])."""
  encoder: nn.Module
  num_classes: int

  def setup(self):
    self.decoder = UNetDecoder(self.num_classes)

  def __call__(self, x, train: bool = True):
    _, skips = encoder_skips(self.encoder, self.path + ("encoder",), x, train)
    return self.decoder(skips, x.shape[1:3], train)


def init_variables(model: SegmentationModel, encoder_variables, example, key):
  """Model variables: the given encoder variables and a freshly initialised decoder (only the
  decoder is initialised; the skips' shapes come from shape inference)."""
  enc = model.encoder
  skips = jax.eval_shape(lambda v, x: enc.apply(
      v, x, train=False, method=lambda m, x, train: encoder_skips(m, (), x, train)[1]),
                         encoder_variables, example)
  decoder = UNetDecoder(model.num_classes)
  out_hw = tuple(example.shape[1:3])
  fresh = jax.jit(lambda k, s: decoder.init(k, s, out_hw, train=False))(
      key, [jnp.zeros(s.shape, s.dtype) for s in skips])
  out = {}
  for coll in set(fresh) | set(encoder_variables):
    out[coll] = {}
    if coll in fresh:
      out[coll]["decoder"] = fresh[coll]
    if coll in encoder_variables:
      out[coll]["encoder"] = encoder_variables[coll]
  return out


def pixel_xent(logits, masks, weights):
  """sum_p w_{y_p} CE_p / sum_p w_{y_p} over every pixel of (N, H, W, K) logits."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, masks)
  w = weights[masks]
  return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-12)


def _flip(key, x, m):
  """Per example, flip image (N, H, W, C) and mask (N, H, W) left-right together (p = 0.5)."""
  flip = jax.random.bernoulli(key, 0.5, (x.shape[0],))
  x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
  return x, jnp.where(flip[:, None, None], m[:, :, ::-1], m)


def fit(model: SegmentationModel, variables, images, masks, cfg: FitConfig,
        aug: augment.AugmentConfig):
  """AdamW on everything; uint8 images (N, H, W, 1) and int masks (N, H, W) at ``aug.out_size``.

  Returns (variables, per-step losses).
  """
  images, masks = np.asarray(images), np.asarray(masks, np.int32)
  if images.shape[1:3] != masks.shape[1:3] or tuple(masks.shape[1:3]) != tuple(aug.out_size):
    raise ValueError(f"images {images.shape[1:3]}, masks {masks.shape[1:3]} and out_size "
                     f"{aug.out_size} must agree")
  if masks.min() < 0 or masks.max() >= model.num_classes:
    raise ValueError(f"mask ids must lie in [0, {model.num_classes}); got {masks.min()}.."
                     f"{masks.max()}")
  weights = jnp.asarray(class_weights(masks.ravel(), model.num_classes, cfg.class_balanced))
  tx = make_tx(cfg)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, x, m, weights, key):
    k_flip, k_drop = jax.random.split(key)
    x, m = _flip(k_flip, augment.center_view(x, aug), m)

    def loss_fn(p):
      logits, new = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"], rngs={"dropout": k_drop})
      return pixel_xent(logits, m, weights), new["batch_stats"]

    (loss, new_stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    u, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, u), new_stats, opt_state, loss

  rng = np.random.default_rng(cfg.seed)
  key = jax.random.key(cfg.seed)
  losses = []
  for i, idx in zip(range(cfg.steps), batch_indices(len(images), cfg.batch_size, rng)):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, images[idx],
                                                masks[idx], weights, jax.random.fold_in(key, i))
    losses.append(loss)
  return ({"params": params, "batch_stats": batch_stats},
          np.asarray(jax.device_get(losses)))


def predict(model: SegmentationModel, variables, images, aug: augment.AugmentConfig,
            batch_size: int = 32) -> np.ndarray:
  """Predicted class ids (N, H, W) of uint8 images (center view, evaluation mode)."""
  fn = jax.jit(lambda v, x: jnp.argmax(model.apply(v, augment.center_view(x, aug),
                                                   train=False), axis=-1))
  return batched_apply(functools.partial(fn, variables), np.asarray(images), batch_size)


def evaluate(pred, masks, num_classes: int) -> dict[str, Any]:
  """Segmentation metrics of predicted vs true class ids (N, H, W), and the confusion matrix."""
  conf = metrics.confusion_matrix(np.asarray(masks).ravel(), np.asarray(pred).ravel(),
                                  num_classes)
  return dict(metrics.segmentation_metrics(conf), confusion=conf.tolist())
