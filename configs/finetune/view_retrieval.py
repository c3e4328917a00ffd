r"""View retrieval across exams (paper 000): NCC vs supervised siamese vs SSL pair classifier.

Pairs: a T1 frame with an annotated view (anatomy_fine) against the annotated frames of the same
patient and side at later exams, positive when the views agree. Paper 000's settings: pair
classifier Adam lr 1e-4, batch 42; supervised baseline Adam lr 1e-5, batch 40; 64x64 input.

  python -m data_prep.synthetic --output /tmp/syn --num_patients 24 --videos_per_patient 6
  python -m data_prep --input /tmp/syn/manifest.csv --output /tmp/syn_ds --fps 10 --size 64 \
      --frame_labels /tmp/syn/frame_labels.csv
  python -m ssl_us.main --config configs/simclr_muscle.py:runlocal --workdir /tmp/simclr_syn \
      --config.data.dir /tmp/syn_ds/ultrasound/1.0.0
  python -m ssl_us.finetune --config configs/finetune/view_retrieval.py \
      --config.init_from=/tmp/simclr_syn --config.data.dir=/tmp/syn_ds/ultrasound/1.0.0
"""
from configs.finetune import base


def get_config(arg: str | None = None):
  c = base.base_config()
  c.name = "view_retrieval"
  c.task = "retrieval"
  c.image_size = (64, 64)
  if arg == "runlocal":
    c.retrieval.classifier.steps = 300
    c.retrieval.siamese.update(steps=300, lr=1e-4)
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; use runlocal or nothing")
  return c
