"""3D (spatio-temporal) encoders in Flax linen for clips (N, T, H, W, C).

Same conventions as ssl_us.models: ``dtype`` is the compute dtype (parameters stay float32),
BatchNorm comes from ``models.batch_norm`` with ``axis_name`` (global statistics inside
shard_map), and every encoder returns the globally pooled representation h (N, features) in
float32, pooled over time, height and width.

- ``Darknet53_3D``: the paper's modified backbone (Chen et al., paper 001, Sec. 3.2): Darknet-53
  (YOLOv3) with every convolution made 3D. A 3x3x3 stem, then five stages; each stage starts with
  a strided 3x3x3 convolution that doubles the width and halves height and width, followed by
  residual blocks x + [3x3x3 conv(c) <- 1x1x1 conv(c/2)], each conv followed by BatchNorm and
  LeakyReLU(0.1). Stage sizes (1, 2, 8, 8, 4): 1 + 5 + 2 * 23 = 52 convolutions (+ the linear
  layer of a classifier = 53). Time is downsampled only by the stage-opening convolutions, with
  temporal stride ``temporal_strides[i]`` (default (1, 1, 2, 2, 2): the first two stages keep
  full frame rate so that short motion such as lung sliding is seen, the last three halve it, so
  T=16 -> 2 and T=8 -> 1 before the global average pool; a size-1 axis stays 1).
  The paper's model has 133,880 parameters in all (its Table 3), far below Darknet-53 at width 32
  (about 115M in 3D): the width is ``num_filters`` and the depth ``stage_sizes``, both free.
- ``ResNet3D``: R3D-18 (Tran et al. 2018) built from ``models.ResNetBlock`` with spatial_dims=3:
  a 3x7x7 stem with stride (1, 2, 2) and no max-pool (or a 3x3x3 stride-1 ``small_stem``), four
  stages of basic blocks, stages 2-4 open with stride (temporal_strides[i], 2, 2). With
  ``factorized=True`` every 3x3x3 convolution is a (2+1)D pair (R(2+1)D-18): a 1xkxk spatial
  convolution to M channels, BatchNorm, ReLU, then a kx1x1 temporal one; M matches the
  parameter count of the full 3D kernel, M = floor(t k^2 c_in c_out / (k^2 c_in + t c_out)).

``conv_impl`` (ops.select_conv): 'fast' computes every 3D convolution as one 2D convolution with
time folded into channels (``ops.conv3d_general_dilated``; XLA's CPU backend runs 3D
convolutions 4-12x slower); 'xla' uses lax's native 3D convolution (cuDNN, TPU); 'auto'
(default) is 'fast' on CPU and 'xla' elsewhere. Parameters and results are the same.

Registered with ``models.make_encoder`` as 'darknet53_3d', 'r3d18' and 'r2plus1d18'.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ssl_us import models, ops

ModuleDef = Any


def _triple(v) -> tuple[int, int, int]:
  return (v,) * 3 if isinstance(v, int) else tuple(v)


def leaky_relu(x):
  """LeakyReLU with Darknet's negative slope 0.1."""
  return nn.leaky_relu(x, negative_slope=0.1)


def _check_clip(x, name):
  if x.ndim != 5:
    raise ValueError(f"{name} expects clips (N, T, H, W, C); got shape {x.shape}")


def _check_strides(temporal_strides, num_stages, name):
  if len(temporal_strides) != num_stages:
    raise ValueError(f"{name}: temporal_strides has {len(temporal_strides)} entries for "
                     f"{num_stages} stages")


class Conv2Plus1D(nn.Module):
  """(2+1)D factorised convolution with the call signature of nn.Conv(features, k, strides).

  kt x kh x kw -> [1 x kh x kw conv to M, BatchNorm, act] then [kt x 1 x 1 conv to features];
  strides (st, sh, sw) split the same way. Kernels with kt == 1 or kh*kw == 1 are a single
  nn.Conv (nothing to factorise), so 1x1x1 projections stay plain.
  """
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] | int = 1
  norm: ModuleDef | None = None
  act: Callable = nn.relu
  use_bias: bool = False
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x):
    kt, kh, kw = _triple(self.kernel_size)
    st, sh, sw = _triple(self.strides)
    conv = functools.partial(self.conv, use_bias=self.use_bias, dtype=self.dtype)
    if kt == 1 or kh * kw == 1:
      return conv(self.features, (kt, kh, kw), (st, sh, sw))(x)
    c_in = x.shape[-1]
    mid = (kt * kh * kw * c_in * self.features) // (kh * kw * c_in + kt * self.features)
    x = conv(max(mid, 1), (1, kh, kw), (1, sh, sw), name="spatial")(x)
    x = self.act(self.norm(name="norm_mid")(x))
    return conv(self.features, (kt, 1, 1), (st, 1, 1), name="temporal")(x)


class DarknetBlock3D(nn.Module):
  """Darknet residual block: x + act(BN(conv3x3x3_c(act(BN(conv1x1x1_{c/2}(x))))))."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable

  @nn.compact
  def __call__(self, x):
    y = self.act(self.norm()(self.conv(max(self.filters // 2, 1), (1, 1, 1))(x)))
    y = self.act(self.norm()(self.conv(self.filters, (3, 3, 3))(y)))
    return x + y


class Darknet53_3D(nn.Module):
  """Darknet-53 with 3D convolutions; returns h (N, num_filters * 2**len(stage_sizes))."""
  stage_sizes: Sequence[int] = (1, 2, 8, 8, 4)
  num_filters: int = 32
  temporal_strides: Sequence[int] = (1, 1, 2, 2, 2)
  dtype: Any = jnp.float32
  act: Callable = leaky_relu
  axis_name: str | None = None
  conv_impl: str = "auto"   # ops.select_conv: same parameters and mathematics either way
  remat: bool = False       # models.rematerialized: recompute each block in the backward pass

  @nn.compact
  def __call__(self, x, train: bool = True):
    _check_clip(x, "Darknet53_3D")
    _check_strides(self.temporal_strides, len(self.stage_sizes), "Darknet53_3D")
    conv = functools.partial(ops.select_conv(nn.Conv, self.conv_impl, spatial_dims=3),
                             use_bias=False, dtype=self.dtype)
    norm = models.batch_norm(train, self.axis_name, self.dtype)
    block = models.rematerialized(DarknetBlock3D, self.remat)
    x = x.astype(self.dtype)
    x = self.act(norm(name="bn_init")(conv(self.num_filters, (3, 3, 3), name="conv_init")(x)))
    for i, (n_blocks, ts) in enumerate(zip(self.stage_sizes, self.temporal_strides)):
      filters = self.num_filters * 2 ** (i + 1)
      x = conv(filters, (3, 3, 3), (ts, 2, 2), name=f"down{i}")(x)
      x = self.act(norm(name=f"bn_down{i}")(x))
      for j in range(n_blocks):
        x = block(filters, conv=conv, norm=norm, act=self.act, name=f"stage{i}_block{j}")(x)
    return models.global_avg_pool(x, 3).astype(models.out_dtype(self.dtype))


class ResNet3D(nn.Module):
  """R3D / R(2+1)D trunk from models.ResNetBlock (spatial_dims=3); h (N, num_filters * 8)."""
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  num_filters: int = 64
  temporal_strides: Sequence[int] = (1, 2, 2, 2)
  factorized: bool = False
  small_stem: bool = False
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  axis_name: str | None = None
  conv_impl: str = "auto"   # ops.select_conv
  remat: bool = False       # models.rematerialized

  @nn.compact
  def __call__(self, x, train: bool = True):
    _check_clip(x, "ResNet3D")
    _check_strides(self.temporal_strides, len(self.stage_sizes), "ResNet3D")
    norm = models.batch_norm(train, self.axis_name, self.dtype)
    base = ops.select_conv(nn.Conv, self.conv_impl, spatial_dims=3)
    if self.factorized:
      conv = functools.partial(Conv2Plus1D, norm=norm, act=self.act, use_bias=False,
                               dtype=self.dtype, conv=base)
    else:
      conv = functools.partial(base, use_bias=False, dtype=self.dtype)
    x = x.astype(self.dtype)
    if self.small_stem:
      x = conv(self.num_filters, (3, 3, 3), name="conv_init")(x)
    else:
      x = conv(self.num_filters, (3, 7, 7), (1, 2, 2), name="conv_init")(x)
    x = self.act(norm(name="bn_init")(x))
    block = models.rematerialized(models.ResNetBlock, self.remat)
    for i, (n_blocks, ts) in enumerate(zip(self.stage_sizes, self.temporal_strides)):
      for j in range(n_blocks):
        strides = (ts, 2, 2) if i > 0 and j == 0 else (1, 1, 1)
        x = block(self.num_filters * 2**i, conv=conv, norm=norm, act=self.act, strides=strides,
                  spatial_dims=3, name=f"ResNetBlock_{sum(self.stage_sizes[:i]) + j}")(x)
    return models.global_avg_pool(x, 3).astype(models.out_dtype(self.dtype))


R3D18 = functools.partial(ResNet3D, stage_sizes=(2, 2, 2, 2), factorized=False)
R2Plus1D18 = functools.partial(ResNet3D, stage_sizes=(2, 2, 2, 2), factorized=True)

models.register_encoder("darknet53_3d", Darknet53_3D)
models.register_encoder("r3d18", R3D18)
models.register_encoder("r2plus1d18", R2Plus1D18)
