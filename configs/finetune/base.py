"""Defaults shared by every downstream config; each task's config overrides what it needs."""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "downstream"
  c.task = "classify"             # classify | retrieval | saliency | segment | embed
  c.init_from = ""                # pretraining workdir, or "random" (then encoder.name is needed)
  c.step = -1                     # checkpoint step, -1 = latest
  c.seed = 0
  # Optional with a checkpoint (then checked against it), required with init_from="random".
  c.encoder = ml_collections.ConfigDict(dict(name="", kwargs=ml_collections.ConfigDict()))
  c.data = ml_collections.ConfigDict(dict(
      dir="",                            # data_prep dataset (<output>/<name>/<version>)
      splits=("train", "val", "test"),   # pooled; the evaluation makes its own patient splits
      dense_dir="",                      # data_prep.synthetic output (segment, saliency)
      frame_step=4))                     # dense: every frame_step-th frame of each video
  c.image_size = (64, 64)         # network input; records are resized (center view)
  # Fine-tuning augmentation (ssl_us.augment fields); mean/std come from the checkpoint.
  c.aug = ml_collections.ConfigDict(dict(
      crop_prob=1.0, crop_scale=(0.6, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_prob=0.5,
      affine_prob=0.0, rotate_deg=0.0, scale=0.0, translate=0.0, color_prob=0.5,
      brightness=0.2, contrast=0.2, noise_prob=0.0, noise_std=0.0, erase_prob=0.0,
      erase_area=(0.02, 0.1), erase_ratio=(0.3, 3.3), mean=0.5, std=0.25))
  # End-to-end training (finetune, last_k, supervised): AdamW, warmup + cosine decay.
  c.fit = ml_collections.ConfigDict(dict(
      steps=300, batch_size=32, lr=1e-3, weight_decay=1e-4, warmup_steps=20, head_hidden=(),
      last_k=3, class_balanced=True))
  # Head-only training (linear, random_features) on frozen features: overrides of c.fit.
  c.fit_head = ml_collections.ConfigDict(dict(steps=500, lr=1e-2, weight_decay=0.0,
                                              warmup_steps=0))
  c.eval = ml_collections.ConfigDict(dict(
      protocols=("linear", "finetune", "supervised"),
      fractions=(0.05, 0.1, 0.3, 0.5, 1.0),
      folds=5, seeds=(0,), levels=("frame", "video"),
      positive_label="",          # binary tasks: the disease class name ("" = class id 1)
      split_seed=0))
  c.retrieval = ml_collections.ConfigDict(dict(
      ref_exam="T1", max_per_reference=20,
      split=ml_collections.ConfigDict(dict(train=0.8, test=0.2)),
      classifier=ml_collections.ConfigDict(dict(steps=1000, batch_size=42, lr=1e-4)),
      siamese=ml_collections.ConfigDict(dict(steps=1000, batch_size=40, lr=1e-5))))
  c.saliency = ml_collections.ConfigDict(dict(
      protocols=("linear", "finetune", "supervised", "random_features"),
      target_label="consolidation", box_classes=("consolidation",),
      patch=8, stride=4, fraction=0.1, max_images=32, num_overlays=4,
      split=ml_collections.ConfigDict(dict(train=0.8, test=0.2))))
  c.segment = ml_collections.ConfigDict(dict(
      inits=("pretrained", "random"),
      fit=ml_collections.ConfigDict(dict(steps=500, lr=1e-3, batch_size=16)),
      split=ml_collections.ConfigDict(dict(train=0.8, test=0.2)), num_overlays=4))
  c.embed = ml_collections.ConfigDict(dict(color_by="label", knn_k=20, folds=5,
                                           max_points=2000,
                                           save_features=True))  # <prefix>_features.npz
  c.output_dir = ""               # default <init_from>/downstream
  c.output_prefix = ""            # default downstream_<name>
  c.compilation_cache = ""        # a folder enables JAX's persistent compilation cache
  c.notes = ""                    # free text for the markdown report (e.g. how the data was made)
  return c
