r"""A quick look at any checkpoint: kNN accuracy (patient-grouped folds) and a t-SNE plot of the
frozen features coloured by label (paper 002 Fig. 5). The features themselves, one row per
labelled record with its video, patient, first frame and label, go to
<output>/downstream_embeddings_features.npz for analyses elsewhere (embed.save_features=False:
not written).

  python -m ssl_us.finetune --config configs/finetune/embeddings.py \
      --config.init_from=WORKDIR --config.data.dir=/path/to/dataset/1.0.0
  (--config.embed.color_by=anatomy_fine colours by the per-frame anatomy instead)
"""
from configs.finetune import base


def get_config(arg: str | None = None):
  c = base.base_config()
  c.name = "embeddings"
  c.task = "embed"
  if arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; this config has none")
  return c
