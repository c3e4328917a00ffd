"""Encoders and heads in Flax linen (flax examples/imagenet style).

Conventions shared by every module here and by the 3D encoders:
- ``conv`` and ``norm`` come in as functools.partial; BatchNorm carries ``axis_name`` so its
  statistics are global across devices when called inside shard_map (None on one device).
- ``dtype`` is the compute dtype (e.g. jnp.bfloat16); parameters stay float32.
- ``spatial_dims`` = 2 for images (N, H, W, C), 3 for clips (N, T, H, W, C); blocks are shared.
- Encoders return the representation h (N, features); heads map h to z.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssl_us import ops

ModuleDef = Any


def _k(size: int, dims: int):
  return (size,) * dims


DTYPES = ("auto", "float32", "bfloat16")


def compute_dtype(name: str, backend: str | None = None):
  """The compute dtype of ``config.model.dtype``: 'auto' is bfloat16 on accelerators (GPU, TPU)
  and float32 on CPU (``backend``: jax.default_backend() unless given). Parameters, BatchNorm
  statistics and the encoders' and heads' outputs stay float32 whatever it is (``out_dtype``)."""
  if name not in DTYPES:
    raise ValueError(f"config.model.dtype={name!r}; use one of {DTYPES}")
  if name == "auto":
    name = "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def out_dtype(dtype):
  """Encoders' and heads' outputs: float32 for bfloat16 or float32 compute, float64 for float64
  (the tests compare kernels in float64, where rounding does not hide a difference)."""
  return jnp.promote_types(dtype, jnp.float32)


def batch_norm(train: bool, axis_name: str | None, dtype, momentum=0.9, epsilon=1e-5):
  return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=momentum,
                           epsilon=epsilon, dtype=dtype, axis_name=axis_name if train else None)


def rematerialized(block_cls, remat: bool):
  """``block_cls``, or with ``remat`` the same block under ``nn.remat`` (jax.checkpoint): the
  backward pass recomputes the block's activations from its input instead of keeping them, so a
  step keeps each block's input plus one block's activations at a time, for one more forward
  pass of the blocks. The same parameters (callers name the blocks as flax would) and the same
  mathematics: unlike gradient caching, BatchNorm still sees the whole batch. The saving needs
  XLA to keep jax's optimization barriers, which its GPU and TPU pipelines do and its CPU
  pipeline does not (README, Large batches; benchmarks/remat_memory.py)."""
  return nn.remat(block_cls) if remat else block_cls


def global_avg_pool(x, spatial_dims):
  return jnp.mean(x, axis=tuple(range(1, 1 + spatial_dims)))


class ResNetBlock(nn.Module):
  """Basic residual block (ResNet-18/34), 2D or 3D."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: Sequence[int] | int = 1
  spatial_dims: int = 2

  @nn.compact
  def __call__(self, x):
    d = self.spatial_dims
    strides = _k(self.strides, d) if isinstance(self.strides, int) else tuple(self.strides)
    residual = x
    y = self.conv(self.filters, _k(3, d), strides)(x)
    y = self.act(self.norm()(y))
    y = self.conv(self.filters, _k(3, d))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, _k(1, d), strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class BottleneckResNetBlock(nn.Module):
  """Bottleneck residual block (ResNet-50+), 2D or 3D."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: Sequence[int] | int = 1
  spatial_dims: int = 2

  @nn.compact
  def __call__(self, x):
    d = self.spatial_dims
    strides = _k(self.strides, d) if isinstance(self.strides, int) else tuple(self.strides)
    residual = x
    y = self.act(self.norm()(self.conv(self.filters, _k(1, d))(x)))
    y = self.act(self.norm()(self.conv(self.filters, _k(3, d), strides)(y)))
    y = self.conv(self.filters * 4, _k(1, d))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, _k(1, d), strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  """ResNet v1 trunk; returns globally pooled features (N, width * 2**(stages-1) [*4])."""
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_filters: int = 64
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  conv: ModuleDef = nn.Conv
  spatial_dims: int = 2
  axis_name: str | None = None
  # A 7x7/2 stem plus 3x3/2 max-pool (ImageNet); small inputs may prefer a 3x3/1 stem, no pool.
  small_stem: bool = False
  # Same mathematics and parameters either way: "fast" computes convolutions and max-pooling
  # with ssl_us.ops (fast on XLA's CPU backend), "xla" with flax's nn.Conv / nn.max_pool alone
  # (XLA's own kernels: cuDNN, TPU); "auto": "fast" on CPU, "xla" elsewhere (ops.resolve_impl).
  conv_impl: str = "auto"
  # Recompute each residual block's activations in the backward pass (``rematerialized``).
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool = True):
    d = self.spatial_dims
    conv = functools.partial(ops.select_conv(self.conv, self.conv_impl, d), use_bias=False,
                             dtype=self.dtype)
    max_pool = ops.select_max_pool(self.conv_impl)
    norm = batch_norm(train, self.axis_name, self.dtype)
    x = x.astype(self.dtype)
    if self.small_stem:
      x = conv(self.num_filters, _k(3, d), name="conv_init")(x)
      x = self.act(norm(name="bn_init")(x))
    else:
      x = conv(self.num_filters, _k(7, d), _k(2, d), padding=[(3, 3)] * d, name="conv_init")(x)
      x = self.act(norm(name="bn_init")(x))
      x = max_pool(x, _k(3, d), strides=_k(2, d), padding="SAME")
    block = rematerialized(self.block_cls, self.remat)
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = 2 if i > 0 and j == 0 else 1
        name = f"{self.block_cls.__name__}_{sum(self.stage_sizes[:i]) + j}"
        x = block(self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=self.act,
                  spatial_dims=d, name=name)(x)
    return global_avg_pool(x, d).astype(out_dtype(self.dtype))


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=ResNetBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckResNetBlock)


class ConvNet4(nn.Module):
  """Paper 000 encoder: four 3x3 conv layers with BatchNorm and ReLU, two 2x2 max-pools.

  conv(w) - conv(w) - pool - conv(2w) - conv(2w) - pool - dropout - flatten. The paper gives
  neither widths nor the pooling of the output; we use w=32 and flatten (Keras style, as the
  paper's TensorFlow 2.7 model), so a 64x64 input gives a 16*16*64 = 16384-d representation.
  """
  width: int = 32
  dropout_rate: float = 0.2
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  axis_name: str | None = None
  pool: str = "flatten"  # or "avg"
  conv_impl: str = "auto"  # as ResNet.conv_impl

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(ops.select_conv(self.conv, self.conv_impl), kernel_size=(3, 3),
                             use_bias=False, dtype=self.dtype)
    max_pool = ops.select_max_pool(self.conv_impl)
    norm = batch_norm(train, self.axis_name, self.dtype)
    x = x.astype(self.dtype)
    for i, w in enumerate((self.width, self.width, 2 * self.width, 2 * self.width)):
      x = nn.relu(norm()(conv(w)(x)))
      if i % 2 == 1:
        x = max_pool(x, (2, 2), strides=(2, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = x.reshape(x.shape[0], -1) if self.pool == "flatten" else jnp.mean(x, axis=(1, 2))
    return x.astype(out_dtype(self.dtype))


class MLPHead(nn.Module):
  """Projection / prediction MLP: [Dense - BatchNorm - ReLU] * len(hidden) - Dense [- BN]."""
  hidden: Sequence[int]
  out_dim: int
  dtype: Any = jnp.float32
  axis_name: str | None = None
  bn_last: bool = False

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = batch_norm(train, self.axis_name, self.dtype)
    x = x.astype(self.dtype)
    for h in self.hidden:
      x = nn.relu(norm()(nn.Dense(h, use_bias=False, dtype=self.dtype)(x)))
    x = nn.Dense(self.out_dim, use_bias=not self.bn_last, dtype=self.dtype)(x)
    if self.bn_last:
      x = norm(use_scale=False, use_bias=False)(x)
    return x.astype(out_dtype(self.dtype))


class ContrastiveModel(nn.Module):
  """encoder -> projection head; ``variables['params']['encoder']`` is the encoder alone.

  __call__ returns {'h': representation, 'z': projection}; ``method=ContrastiveModel.encode``
  gives h only (no head parameters needed).
  """
  encoder: nn.Module
  head: nn.Module

  def __call__(self, x, train: bool = True):
    h = self.encoder(x, train=train)
    return {"h": h, "z": self.head(h, train=train)}

  def encode(self, x, train: bool = False):
    return self.encoder(x, train=train)


ENCODERS = {
    "convnet4": ConvNet4,
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
}


def register_encoder(name: str, ctor):
  """Lets other modules (e.g. the 3D encoders) add named encoders to ``make_encoder``."""
  ENCODERS[name] = ctor


def make_encoder(name: str, *, dtype=jnp.float32, axis_name=None, **kwargs) -> nn.Module:
  """The encoder ``name`` with ``kwargs`` (config.model.encoder_kwargs) set on its fields."""
  if name not in ENCODERS:
    raise ValueError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
  ctor = ENCODERS[name]
  cls = ctor.func if isinstance(ctor, functools.partial) else ctor
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "dtype", "axis_name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"config.model.encoder_kwargs: encoder {name!r} has no field "
                     f"{', '.join(map(repr, unknown))}; its fields: {sorted(fields)}")
  return ctor(dtype=dtype, axis_name=axis_name, **kwargs)
