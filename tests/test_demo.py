"""ssl_us.demo's probe features: the flattened ConvNet4 output, or its map averaged over positions."""
import jax
import ml_collections
import numpy as np
import pytest

from configs import simclr_muscle
from ssl_us import checkpoint, demo, input_pipeline, models
from ssl_us.methods import make_method
from tests import fixtures


def _method_and_index(tmp_path):
  ds = fixtures.write_dataset(str(tmp_path), num_videos=4, frames=2, size=(16, 16))
  c = simclr_muscle.get_config("runlocal")
  c.image_size = (16, 16)
  c.batch_size = 2
  c.model.encoder_kwargs = ml_collections.ConfigDict(dict(width=3, dropout_rate=0.2))
  method = make_method(c)
  batch = {"image": np.zeros((2, 16, 16, 1), np.uint8)}
  variables = method.init(jax.random.key(0), batch)
  return method, variables, input_pipeline.load_index(ds, "train")


def test_avg_features_equal_the_avg_pooled_encoder(tmp_path):
  method, variables, index = _method_and_index(tmp_path)
  flat = demo.features(method, variables, index)
  avg = demo.features(method, variables, index, pool="avg")
  assert flat.shape == (8, 4 * 4 * 6) and avg.shape == (8, 6)
  module, enc_vars = method.encoder(variables)
  pooled = models.ConvNet4(width=3, dropout_rate=0.2, pool="avg")
  reader = input_pipeline.RecordReader(index)
  x = np.asarray(method.eval_view(np.stack([reader.read(i)["frames"][0] for i in range(8)])))
  np.testing.assert_allclose(avg, checkpoint.encode(pooled, enc_vars, x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(avg, flat.reshape(8, 16, 6).mean(1), rtol=1e-6)
  with pytest.raises(ValueError, match="unknown pool"):
    demo.features(method, variables, index, pool="max")
