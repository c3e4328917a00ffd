r"""COVID-BLUES: COVID-19 vs negative (patient PCR), label fractions x protocols, 5-fold CV.

Paper 001's evaluation (Fig. 3: accuracy and AUC against the fraction of labelled training
data for "SSL feature extractor", "SSL fine-tuned" and "Fully supervised") on the 362 COVID-BLUES
clips of 63 patients: 5-fold cross-validation grouped by patient (no patient in train and test),
labels drawn by patient and stratified, frame- and video-level metrics (the video score is the
mean of its frames' probabilities).

Frames, pretraining, evaluation (``runlocal``: the CPU budget of benchmarks/):

  python -m data_prep --input /work/shared/data/covid_blues --output /tmp/blues64 --fps 2 \
      --size 64 --patient_regex 'patient_(?P<patient>\d+)_' --splits train=1.0
  python -m ssl_us.main --config configs/simclr_muscle.py:runlocal --workdir /tmp/simclr_blues \
      --config.data.dir /tmp/blues64/ultrasound/1.0.0 --config.model.encoder_kwargs.width=16
  python -m ssl_us.finetune --config configs/finetune/covid_blues.py:runlocal \
      --config.init_from=/tmp/simclr_blues --config.data.dir=/tmp/blues64/ultrasound/1.0.0

The PCR label is per patient and not visible in an image. For a per-clip visible finding (B-lines
yes/no from the upstream severity sheet, also A-lines or the severity score 0-3), build the
shards from a manifest and name the positive class:

  python -m benchmarks.covid_blues_labels --data /work/shared/data --label b_lines \
      --output /tmp/blues_blines.csv
  python -m data_prep --input /tmp/blues_blines.csv --output /tmp/blues_blines --fps 2 --size 64 \
      --splits train=1.0
  python -m ssl_us.finetune --config configs/finetune/covid_blues.py:runlocal \
      --config.init_from=/tmp/simclr_blues --config.data.dir=/tmp/blues_blines/ultrasound/1.0.0 \
      --config.eval.positive_label=b_lines
"""
from configs.finetune import base


def get_config(arg: str | None = None):
  c = base.base_config()
  c.name = "covid_blues"
  c.task = "classify"
  c.eval.positive_label = "covid"
  c.eval.protocols = ("linear", "finetune", "supervised")
  c.eval.fractions = (0.05, 0.1, 0.3, 0.5, 1.0)
  c.eval.folds = 5
  c.eval.seeds = (0, 1, 2)
  if arg == "runlocal":
    # 2 shared CPU cores: one seed, 120 steps of 16 frames for every end-to-end run.
    c.eval.seeds = (0,)
    c.fit.update(steps=120, batch_size=16, lr=1e-3, warmup_steps=12)
    c.fit_head.update(steps=300)
    c.compilation_cache = "/tmp/ssl_us_jax_cache"
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; use runlocal or nothing")
  return c
