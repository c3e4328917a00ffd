"""Rematerialized residual blocks (``config.model.remat``): the same parameters and
mathematics, and only each block's input kept for the backward pass.

What is kept is read before XLA: the residuals of ``jax.vjp`` and the optimization barriers
of the lowered step. XLA's CPU pipeline removes those barriers before its common-subexpression
elimination, then merges part of the recomputation back and schedules the rest freely, so on
CPU the compiled step keeps no less than without remat; GPU and TPU remove them only after
their last CSE (benchmarks/RESULTS.md).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.remat_memory import main as remat_memory_main
from benchmarks.remat_memory import residual_bytes
from ssl_us import models, models3d, parallel
from tests.fixtures import (ENCODER_RTOL, assert_close, encoder_value_and_grads,
                            sharded_encoder_value_and_grads, unit_scales_f64)

CLIP = (2, 4, 16, 16, 1)     # (N, T, H, W, C)

ENCODERS = [
    ("resnet18", dict(num_filters=8), (4, 32, 32, 1)),
    ("resnet50", dict(num_filters=4), (4, 32, 32, 1)),
    ("darknet53_3d", dict(num_filters=2, stage_sizes=(1, 2, 1), temporal_strides=(1, 1, 2)), CLIP),
    ("r2plus1d18", dict(num_filters=4), CLIP),
]


@pytest.mark.parametrize("name,kwargs,shape", ENCODERS)
def test_remat_keeps_parameters_and_mathematics(name, kwargs, shape):
  """Parameters (names and values), train-mode output, BatchNorm statistics and gradients
  equal without and with remat (float64, as tests/test_ops.py compares kernels)."""
  x = np.random.default_rng(0).normal(size=shape)
  out = {}
  for remat in (False, True):
    enc = models.make_encoder(name, remat=remat, **kwargs)
    v = enc.init(jax.random.key(0), x.astype(np.float32))
    with jax.enable_x64(True):
      enc64 = models.make_encoder(name, remat=remat, dtype=jnp.float64, **kwargs)
      out[remat] = v, jax.device_get(encoder_value_and_grads(
          enc64, unit_scales_f64(v), jnp.asarray(x, jnp.float64)))
  (v, ((loss, stats), grads)), (v_r, ((loss_r, stats_r), grads_r)) = out[False], out[True]
  assert jax.tree.structure(v) == jax.tree.structure(v_r)
  assert_close(v, v_r, 0.0)
  assert loss.dtype == np.float64
  np.testing.assert_allclose(loss_r, loss, rtol=ENCODER_RTOL)
  assert_close(stats, stats_r, ENCODER_RTOL)
  assert_close(grads, grads_r, ENCODER_RTOL)


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("conv_impl", ["xla", "fast"])
def test_an_added_resnet_block_keeps_its_input_and_parameters_only(remat, conv_impl):
  """A second stage-1 block (8 channels at 8x8) adds, with remat, exactly its input and its
  parameters to what the backward pass keeps; without, its activations inside too."""
  n, c, hw = 4, 8, 8
  x = jnp.zeros((n, 32, 32, 1))

  def resnet(first_stage):
    return models.ResNet(stage_sizes=(first_stage, 1), block_cls=models.ResNetBlock,
                         num_filters=c, remat=remat, conv_impl=conv_impl)
  added = residual_bytes(resnet(2), x) - residual_bytes(resnet(1), x)
  block_input = n * hw * hw * c * 4                       # float32
  block_params = (2 * 3 * 3 * c * c + 2 * 2 * c) * 4       # two 3x3 convs, two BN scale+bias
  if remat:
    assert added == block_input + block_params
  else:
    assert added > block_input + block_params + 3 * block_input


def test_an_added_darknet_block_keeps_its_input_and_parameters_only():
  n, t, hw, c = CLIP[0], CLIP[1], CLIP[2] // 2, 4      # stage 0: 2 * num_filters channels

  def darknet(first_stage, remat):
    return models3d.Darknet53_3D(stage_sizes=(first_stage, 1), temporal_strides=(1, 1),
                                 num_filters=2, remat=remat, conv_impl="xla")
  x = jnp.zeros(CLIP)
  added = {remat: residual_bytes(darknet(2, remat), x) - residual_bytes(darknet(1, remat), x)
           for remat in (False, True)}
  block_input = n * t * hw * hw * c * 4
  block_params = (c * (c // 2) + 27 * (c // 2) * c + 2 * (c // 2) + 2 * c) * 4
  assert added[True] == block_input + block_params
  assert added[False] > block_input + block_params + 3 * block_input


def test_the_lowered_gradient_holds_one_barrier_per_block(capsys):
  """What GPU and TPU compilers keep to the end (and XLA:CPU drops): an optimization barrier
  on each rematerialized block's recomputation; benchmarks/remat_memory.py reports it."""
  assert remat_memory_main(["--encoder", "resnet18", "--width", "4", "--size", "32",
                            "--batch", "2", "--conv_impl", "xla"]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(r["remat"], r["barriers"]) for r in rows] == [(False, 0), (True, 8)]  # 8 blocks
  assert rows[1]["residual_mib"] < rows[0]["residual_mib"]
  assert all(r["ms"] > 0 and r["xla_temp_mib"] >= 0 for r in rows)


def test_remat_inside_shard_map_keeps_global_batchnorm():
  """2 devices, BatchNorm statistics over both (their pmean recomputed in the backward pass):
  the same loss and gradient as without remat (float64)."""
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 1))
  v = models.ResNet18(num_filters=4).init(jax.random.key(0), x[:1].astype(np.float32))
  out = {}
  with jax.enable_x64(True):
    v = unit_scales_f64(v)
    for remat in (False, True):
      enc = models.ResNet18(num_filters=4, remat=remat, axis_name=parallel.DATA,
                            dtype=jnp.float64)
      out[remat] = sharded_encoder_value_and_grads(enc, v, x)
  np.testing.assert_allclose(out[True][0], out[False][0], rtol=ENCODER_RTOL)
  assert_close(out[False][1], out[True][1], ENCODER_RTOL)


def test_an_unknown_encoder_field_is_a_clear_error():
  with pytest.raises(ValueError, match=r"encoder 'convnet4' has no field 'remat'; its fields"):
    models.make_encoder("convnet4", remat=True)
  with pytest.raises(ValueError, match=r"'darknet53_3d' has no field 'num_filter'"):
    models.make_encoder("darknet53_3d", num_filter=8)


def test_config_model_remat_reaches_the_encoder():
  """``config.model.remat`` (declared in every config, so settable from the command line)."""
  from configs import common, simclr_muscle  # pylint: disable=g-import-not-at-top
  from ssl_us.methods.simclr import build_model  # pylint: disable=g-import-not-at-top
  c = common.base_config()
  assert c.model.remat is False and build_model(c, None).encoder.remat is False
  c.model.remat = True
  assert build_model(c, None).encoder.remat is True
  c = simclr_muscle.get_config()           # ConvNet4: no residual blocks
  c.model.remat = True
  with pytest.raises(ValueError, match=r"encoder 'convnet4' has no field 'remat'"):
    build_model(c, None)
