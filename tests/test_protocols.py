"""Protocols: blocks, masks, frozen parameters and statistics unchanged, trainable ones changed;
encoders loaded from every pretraining method."""
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_us import augment, models
from ssl_us.eval import protocols as P

HW = 16
AUG = augment.AugmentConfig(out_size=(HW, HW), crop_scale=(0.5, 1.0), color_prob=0.0)


def _toy(n=24, seed=0):
  """Class 1: bright square in the upper half; class 0: in the lower half (uint8 images)."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 40, (n, HW, HW, 1)).astype(np.uint8)
  y = np.arange(n) % 2
  for i in range(n):
    r = 2 if y[i] else 10
    x[i, r:r + 4, 6:10] = 230
  return x, y


def _resnet():
  """A 3-stage, one-block-per-stage ResNet (stem + 3 blocks): ResNet-18's code, faster jit."""
  return models.ResNet(stage_sizes=(1, 1, 1), block_cls=models.ResNetBlock, num_filters=4,
                       small_stem=True)


def fake_init(encoder, example, seed):
  """Encoder variables from shapes alone, numpy-random (XLA-compiling flax init is slow on CPU).

  Kernels ~ N(0, 1 / fan_in), BatchNorm scale 1, biases 0, running mean 0 and variance 1.
  """
  shapes = jax.eval_shape(lambda: encoder.init(jax.random.key(0), example, train=False))
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      return jnp.asarray(rng.normal(0, 1 / np.sqrt(np.prod(s.shape[:-1])), s.shape), s.dtype)
    return jnp.full(s.shape, 1.0 if name in ("scale", "var") else 0.0, s.dtype)
  v = jax.tree_util.tree_map_with_path(leaf, shapes)
  return {k: v[k] for k in ("params", "batch_stats") if k in v}


def _setup(encoder, seed=0, head_hidden=()):
  x, y = _toy()
  example = jnp.zeros((1, HW, HW, 1))
  enc_vars = fake_init(encoder, example, seed)
  model = P.Classifier(encoder, num_classes=2, head_hidden=head_hidden)
  variables = P.init_variables(model, enc_vars, example, jax.random.key(seed + 1))
  blocks = P.encoder_blocks(encoder, enc_vars, example)
  return model, variables, blocks, x, y


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_encoder_blocks_resnet_and_convnet():
  _, _, blocks, _, _ = _setup(_resnet())
  assert blocks == [("conv_init", "bn_init")] + [(f"ResNetBlock_{i}",) for i in range(3)]
  r18 = models.make_encoder("resnet18", num_filters=2, small_stem=True)
  r18_vars = fake_init(r18, jnp.zeros((1, 8, 8, 1)), 0)
  assert P.encoder_blocks(r18, r18_vars, jnp.zeros((1, 8, 8, 1))) == (
      [("conv_init", "bn_init")] + [(f"ResNetBlock_{i}",) for i in range(8)])
  _, _, blocks, _, _ = _setup(models.make_encoder("convnet4", width=4))
  assert blocks == [("Conv_0", "BatchNorm_0"), ("Conv_1", "BatchNorm_1"),
                    ("Conv_2", "BatchNorm_2"), ("Conv_3", "BatchNorm_3", "Dropout_0")]


def test_trainable_names_per_protocol():
  blocks = [("stem", "bn"), ("b0",), ("b1",), ("b2",)]
  assert P.trainable_encoder_names(blocks, P.get_protocol("linear"), 3) == frozenset()
  assert P.trainable_encoder_names(blocks, P.get_protocol("random_features"), 3) == frozenset()
  assert P.trainable_encoder_names(blocks, P.get_protocol("last_k"), 3) == {"b0", "b1", "b2"}
  assert P.trainable_encoder_names(blocks, P.get_protocol("last_k"), 4) == {"stem", "bn", "b0",
                                                                           "b1", "b2"}
  assert P.trainable_encoder_names(blocks, P.get_protocol("finetune"), 1) == {"stem", "bn", "b0",
                                                                             "b1", "b2"}
  with pytest.raises(ValueError, match="last_k=5 but the encoder has 4 blocks"):
    P.trainable_encoder_names(blocks, P.get_protocol("last_k"), 5)
  with pytest.raises(ValueError, match="unknown protocol"):
    P.get_protocol("probe")


def test_count_trainable_linear_head_is_d_times_c_plus_c():
  model, variables, blocks, _, _ = _setup(_resnet())
  d = 4 * 4   # width 4, three stages -> 16 features
  assert P.count_trainable(variables["params"], frozenset()) == d * 2 + 2
  everything = sum(np.size(v) for v in jax.tree.leaves(variables["params"]))
  all_names = frozenset(n for b in blocks for n in b)
  assert P.count_trainable(variables["params"], all_names) == everything


def test_freeze_interceptor_makes_training_mode_equal_evaluation_mode():
  model, variables, blocks, x, _ = _setup(_resnet())
  # Non-trivial running statistics, so that batch and running statistics differ.
  variables = dict(variables, batch_stats=jax.tree.map(lambda s: s + 0.3,
                                                       variables["batch_stats"]))
  xf = augment.center_view(jnp.asarray(x[:8]), AUG)
  all_names = frozenset(n for b in blocks for n in b)
  eval_logits = model.apply(variables, xf, train=False)
  train_logits, _ = model.apply(variables, xf, train=True, mutable=["batch_stats"])
  assert not np.allclose(eval_logits, train_logits, atol=1e-4)
  with nn.intercept_methods(P.freeze_interceptor(all_names)):
    frozen_logits, new = model.apply(variables, xf, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(frozen_logits, eval_logits, rtol=1e-5, atol=1e-5)
  for k, v in _leaves(new["batch_stats"]).items():
    np.testing.assert_array_equal(v, _leaves(variables["batch_stats"])[k])


def test_linear_probe_leaves_encoder_unchanged_and_equals_head_on_features():
  model, variables, blocks, x, y = _setup(_resnet())
  cfg = P.FitConfig(steps=30, batch_size=8, lr=1e-2)
  new, losses = P.fit(model, variables, x, y, P.get_protocol("linear"), cfg, AUG, blocks)
  before, after = _leaves(variables), _leaves(new)
  assert before.keys() == after.keys()
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed and all("'head'" in k for k in changed)
  assert losses.shape == (30,) and losses[-5:].mean() < losses[:5].mean()
  # The probe trained on precomputed features is the full model in evaluation mode.
  feats = P.features(model.encoder, {k: v["encoder"] for k, v in new.items()}, x, AUG)
  head = P.Head(2)
  probs_from_feats = jax.nn.softmax(head.apply({"params": new["params"]["head"]}, feats))
  np.testing.assert_allclose(P.predict(model, new, x, AUG), probs_from_feats, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("protocol,k", [("last_k", 2), ("finetune", 0)])
def test_only_the_trainable_blocks_change(protocol, k):
  """last_k: the last k blocks' parameters and statistics change, nothing else; finetune: all."""
  model, variables, blocks, x, y = _setup(_resnet())
  cfg = P.FitConfig(steps=2, batch_size=8, lr=1e-2, last_k=k)
  new, _ = P.fit(model, variables, x, y, P.get_protocol(protocol), cfg, AUG, blocks)
  trainable = {n for b in (blocks[-k:] if k else blocks) for n in b}
  for coll in ("params", "batch_stats"):
    before, after = _leaves(variables[coll]), _leaves(new[coll])
    for key, v in before.items():
      top, sub = key.split("'")[1], key.split("'")[3]
      same = np.array_equal(v, after[key])
      if top == "encoder" and sub not in trainable:
        assert same, f"frozen {coll}{key} changed"
      elif key.endswith("['kernel']") or coll == "batch_stats":
        assert not same, f"trainable {coll}{key} did not change"


def test_supervised_convnet_learns_the_toy_task():
  model, variables, blocks, x, y = _setup(models.make_encoder("convnet4", width=4,
                                                              dropout_rate=0.1))
  aug = augment.AugmentConfig(out_size=(HW, HW), crop_prob=0.0, flip_prob=0.0, color_prob=0.0)
  cfg = P.FitConfig(steps=60, batch_size=12, lr=3e-3)
  new, _ = P.fit(model, variables, x, y, P.get_protocol("supervised"), cfg, aug, blocks)
  xt, yt = _toy(n=16, seed=1)
  acc = np.mean(P.predict(model, new, xt, aug).argmax(1) == yt)
  assert acc == 1.0


def test_class_weights_and_batches():
  np.testing.assert_allclose(P.class_weights(np.array([0, 0, 0, 1]), 3, True),
                             [4 / 9, 4 / 3, 0])
  np.testing.assert_allclose(P.class_weights(np.array([0, 1]), 2, False), [1, 1])
  it = P.batch_indices(5, 4, np.random.default_rng(0))
  stream = np.concatenate([next(it) for _ in range(5)])    # 20 = 4 epochs of 5
  for e in range(4):
    np.testing.assert_array_equal(np.sort(stream[5 * e:5 * e + 5]), np.arange(5))


def test_weighted_xent_hand_computed():
  logits = jnp.array([[0., 0.], [jnp.log(3.), 0.]])
  # CE: log 2 and log(4/3) for label 0; weights 2 (class 0) and 1 (class 1).
  got = jax.jit(P.weighted_xent)(logits, jnp.array([0, 1]), jnp.array([2., 1.]))
  np.testing.assert_allclose(got, (2 * np.log(2) + np.log(4)) / 3, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Loading encoders from pretraining workdirs (ssl_us.finetune.load_encoder).

import ml_collections  # noqa: E402

from configs.finetune import base as finetune_base  # noqa: E402
from ssl_us import checkpoint, finetune, parallel, train  # noqa: E402
from tests import fixtures  # noqa: E402

_TINY_CONVNET = {"width": 4, "dropout_rate": 0.0, "pool": "avg"}


def _pretrain_config(method, data_dir):
  """One step of ``method`` from its own config file, shrunk to a 4-wide encoder on 16x16."""
  from configs import awcl_fetal, byol_lung, simclr_muscle, uscl
  c = {"simclr": lambda: simclr_muscle.get_config("runlocal"), "awcl": awcl_fetal.get_config,
       "uscl": uscl.get_config, "byol": lambda: byol_lung.get_config("runlocal")}[method]()
  c.data.dir = data_dir
  c.data.num_workers = 0
  c.image_size = (16, 16)
  c.batch_size = 4
  c.num_steps = 1
  c.num_epochs = 0
  c.ckpt_every = 1
  c.log_every = 1
  c.progress_bar = False
  c.model.head_hidden = (8,)
  c.model.head_out = 8
  if method == "byol":
    c.model.encoder = "r3d18"
    c.model.encoder_kwargs = ml_collections.ConfigDict(dict(
        num_filters=2, stage_sizes=(1, 1), temporal_strides=(1, 2), small_stem=True))
    c.byol.predictor_hidden = (8,)
    c.clips.update(clip_len=4)
  else:
    c.model.encoder = "convnet4"
    c.model.encoder_kwargs = ml_collections.ConfigDict(_TINY_CONVNET)
  if method == "uscl":
    c.uscl.num_classes = 2
  return c


def _save_initial_checkpoint(config, workdir):
  """A pretraining workdir as train_and_evaluate writes it, holding the initial state (no
  training step, so no train-step compile), with every parameter shifted by 0.5 so that the
  parameters differ from the init-time copies (BYOL's EMA target)."""
  from ssl_us import input_pipeline
  setup = train.build(config, parallel.make_mesh(1))
  os.makedirs(workdir)
  checkpoint.save_config(workdir, setup.config)
  sample = next(iter(input_pipeline.make_dataset(
      setup.index, setup.method.sampler, global_batch=config.batch_size, seed=config.seed,
      process_index=0, process_count=1, num_workers=0)))
  checkpoint.save_batch_spec(workdir, sample)
  state = train.init_state(setup, setup.config, sample)
  state = state.replace(params=jax.tree.map(lambda p: p + 0.5, state.params))
  manager = checkpoint.make_manager(workdir, setup.config)
  checkpoint.save(manager, 1, state, input_pipeline.InputPosition(0))
  manager.wait_until_finished()
  manager.close()


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """One pretraining workdir per method (frames for the 2D methods, clips for BYOL)."""
  root = tmp_path_factory.mktemp("pretrain")
  frames = fixtures.write_dataset(str(root / "frames"), num_videos=8, frames=4)
  clips = fixtures.write_dataset(str(root / "clips"), num_videos=8, frames=8, clip_len=4)
  out = {}
  for method in ("simclr", "awcl", "uscl", "byol"):
    out[method] = str(root / method)
    _save_initial_checkpoint(_pretrain_config(method, clips if method == "byol" else frames),
                             out[method])
  return out


def _ft_config(init_from, name="", kwargs=None):
  c = finetune_base.base_config()
  c.init_from = init_from
  c.encoder.name = name
  c.encoder.kwargs = ml_collections.ConfigDict(kwargs or {})
  return c


@pytest.mark.parametrize("method", ["simclr", "awcl", "uscl", "byol"])
def test_load_encoder_from_each_method(workdirs, method):
  wd = workdirs[method]
  example = jnp.zeros((1, 4, 16, 16, 1) if method == "byol" else (1, 16, 16, 1))
  module, variables, description = finetune.load_encoder(_ft_config(wd), example)
  assert method in description and wd in description
  _, _, full = checkpoint.load_variables(wd)
  for k, v in _leaves(full["params"]["encoder"]).items():   # heads dropped, encoder kept
    np.testing.assert_array_equal(_leaves(variables["params"])[k], v)
  if method == "byol":   # the online encoder, not the EMA target
    target = _leaves(full["target"]["params"]["encoder"])
    assert any(not np.array_equal(target[k], v) for k, v in _leaves(variables["params"]).items())
  # The loaded encoder runs and feeds a classifier (blocks found, features finite).
  blocks = P.encoder_blocks(module, variables, example)
  assert len(blocks) >= 3
  h = module.apply(variables, example, train=False)
  assert h.ndim == 2 and np.all(np.isfinite(h))


def test_architecture_mismatch_is_a_clear_error(workdirs):
  wd = workdirs["simclr"]
  example = jnp.zeros((1, 16, 16, 1))
  # The same architecture named in the config passes.
  finetune.load_encoder(_ft_config(wd, "convnet4", _TINY_CONVNET), example)
  with pytest.raises(ValueError, match=r"does not match config.encoder .* 12 parameter diff"):
    finetune.load_encoder(_ft_config(wd, "convnet4", dict(_TINY_CONVNET, width=8)), example)
  with pytest.raises(ValueError, match="does not match"):
    finetune.load_encoder(_ft_config(wd, "resnet18", {"num_filters": 4}), example)
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 5"):
    c = _ft_config(wd)
    c.step = 5
    finetune.load_encoder(c, example)


def test_random_init_is_the_same_code_path(workdirs):
  example = jnp.zeros((1, 16, 16, 1))
  module, variables, description = finetune.load_encoder(
      _ft_config("random", "convnet4", _TINY_CONVNET), example)
  assert description.startswith("random init")
  _, pre_vars, _ = finetune.load_encoder(_ft_config(workdirs["simclr"]), example)
  assert jax.tree.structure(variables) == jax.tree.structure(pre_vars)
  assert P.encoder_blocks(module, variables, example) == [
      ("Conv_0", "BatchNorm_0"), ("Conv_1", "BatchNorm_1"), ("Conv_2", "BatchNorm_2"),
      ("Conv_3", "BatchNorm_3", "Dropout_0")]
  with pytest.raises(ValueError, match="needs config.encoder.name"):
    finetune.load_encoder(_ft_config("random"), example)


def test_embed_writes_the_features_its_knn_accuracy_comes_from(workdirs, tmp_path, caplog):
  """The embed task's features file: one row per labelled record, in the records' order, with
  its video, patient, first frame and label; the kNN accuracy it reports is that of these
  features. embed.save_features=False writes none. Asked-for splits the dataset lacks are
  named."""
  import csv

  from configs.finetune import embeddings as embed_config
  from ssl_us.eval import data, embeddings
  wd = workdirs["simclr"]
  c = embed_config.get_config()
  c.init_from = wd
  c.data.dir = checkpoint.load_config(wd).data.dir
  c.image_size = (16, 16)
  c.embed.update(knn_k=3, folds=2, max_points=20)
  c.output_dir = str(tmp_path / "a")
  with caplog.at_level(logging.WARNING):
    out = finetune.run(c)
  assert "no shards for the splits ['val', 'test']; using ['train']" in caplog.text
  z = np.load(out["features"])
  recs = data.load_records(c.data.dir, tuple(c.data.splits))
  keep = recs.label >= 0
  assert keep.sum() == 32 and z["features"].shape == (32, 8) and z["features"].dtype == np.float32
  assert np.isfinite(z["features"]).all() and z["features"].std(axis=0).min() > 0
  for k in ("video", "patient", "frame_index", "label"):
    np.testing.assert_array_equal(z[k], getattr(recs, k)[keep])
  assert list(z["label_names"]) == list(recs.label_names)
  with open(out["csv"]) as f:
    row = next(csv.DictReader(f))
  mean, std = embeddings.knn_accuracy_cv(z["features"], z["label"], z["patient"], 3, 2,
                                         c.eval.split_seed)
  assert (float(row["knn_accuracy_mean"]), float(row["knn_accuracy_std"])) == pytest.approx(
      (mean, std), abs=1e-6)
  c.embed.save_features = False
  c.output_dir = str(tmp_path / "b")
  assert "features" not in finetune.run(c)
  assert not [f for f in os.listdir(tmp_path / "b") if "features" in f]


@pytest.mark.parametrize("hidden", [(), (5,)])
def test_folded_standardization_equals_the_head_on_standardized_features(hidden):
  rng = np.random.default_rng(0)
  h = rng.normal(300.0, 50.0, (7, 6)).astype(np.float32)
  h[:, 2] = 4.0                                          # a constant feature: sigma -> 1
  mu, sigma = P.standardizer(h)
  assert sigma[2] == 1.0
  head = P.Head(3, hidden)
  params = head.init(jax.random.key(0), jnp.zeros((1, 6)))["params"]
  folded = P.fold_standardization(params, jnp.asarray(mu), jnp.asarray(sigma))
  np.testing.assert_allclose(head.apply({"params": folded}, h),
                             head.apply({"params": params}, (h - mu) / sigma), rtol=1e-4,
                             atol=1e-4)
