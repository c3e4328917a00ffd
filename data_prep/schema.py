"""The record schema shared by data_prep (writer) and ssl_us.data (reader).

One tf.train.Example per sampled frame (frame modes: ``fps``, ``every``, ``all``) or per clip
(``clip`` mode). Every key below is present in every record; per-frame lists have one entry per
frame of the record (T=1 in frame modes, T=clip_len in clip mode).

| key               | Example type | meaning                                                        |
|-------------------|--------------|----------------------------------------------------------------|
| frames            | bytes[T]     | one frame each, height x width x 1, uint8: lossless grayscale   |
|                   |              | PNG, or with --frame_encoding raw its H*W bytes, row-major      |
| frame_indices     | int64[T]     | index of each frame in the decoded source video                 |
| timestamps        | float[T]     | seconds from the start of the video                             |
| anatomy_coarse    | int64[T]     | per-frame coarse anatomy class id, -1 = no label                |
| anatomy_fine      | int64[T]     | per-frame fine anatomy class id, -1 = no label                  |
| label             | int64        | video-level class id, -1 = no label                             |
| label_name        | bytes        | video-level class name, b"" = no label                          |
| video_id          | bytes        | unique id of the source video (patient ids in it hashed)        |
| patient           | bytes        | salted hash of patient_id (or the raw id with --keep_patient_id)|
| exam              | bytes        | exam time point (e.g. T1), b"" if unknown                       |
| side              | bytes        | body side (e.g. left), b"" if unknown                           |
| source            | bytes        | source file path relative to the input root (ids hashed)        |
| fps               | float        | frame rate of the source video (0 for stills)                   |
| video_num_frames  | int64        | number of decodable frames in the source video                  |
| padded            | int64        | clip mode: frames of this clip that were looped/padded, else 0 |
| metadata          | bytes        | JSON object of the manifest's unknown columns                   |

Class-id -> name vocabularies live in the dataset's tfds metadata (metadata.json):
``label_names``, ``anatomy_coarse_names``, ``anatomy_fine_names``, plus ``mode``, ``image_size``,
``clip_len``, ``frame_encoding`` ('png' or 'raw'; absent in datasets made before it: 'png') and
the data_prep arguments. Raw frames cost about 2.7x the bytes of PNG on ultrasound and decode
with a copy instead of a PNG inflate (benchmarks/RESULTS.md). Shards are named the TFDS way:
``<name>-<split>.tfrecord-00000-of-00016`` in ``<output>/<name>/<version>/``.
"""

FRAMES = "frames"
INT_LIST_KEYS = ("frame_indices", "anatomy_coarse", "anatomy_fine")
FLOAT_LIST_KEYS = ("timestamps",)
INT_KEYS = ("label", "video_num_frames", "padded")
FLOAT_KEYS = ("fps",)
BYTES_KEYS = ("label_name", "video_id", "patient", "exam", "side", "source", "metadata")
ALL_KEYS = (FRAMES,) + INT_LIST_KEYS + FLOAT_LIST_KEYS + INT_KEYS + FLOAT_KEYS + BYTES_KEYS

METADATA_VOCABS = ("label_names", "anatomy_coarse_names", "anatomy_fine_names")
FRAME_ENCODINGS = ("png", "raw")
NO_LABEL = -1


def tfds_features(height: int, width: int, frame_encoding: str = "png"):
  """The tfds FeaturesDict that describes (and can serialize) one record."""
  import tensorflow_datasets as tfds  # heavy import, only where needed
  import numpy as np

  f = tfds.features
  seq_int = f.Sequence(f.Tensor(shape=(), dtype=np.int64))
  return f.FeaturesDict({
      FRAMES: f.Sequence(
          f.Image(shape=(height, width, 1), encoding_format="png") if frame_encoding == "png"
          else f.Tensor(shape=(height, width, 1), dtype=np.uint8, encoding=f.Encoding.BYTES)),
      "frame_indices": seq_int,
      "timestamps": f.Sequence(f.Tensor(shape=(), dtype=np.float32)),
      "anatomy_coarse": seq_int,
      "anatomy_fine": seq_int,
      "label": f.Tensor(shape=(), dtype=np.int64),
      "label_name": f.Text(),
      "video_id": f.Text(),
      "patient": f.Text(),
      "exam": f.Text(),
      "side": f.Text(),
      "source": f.Text(),
      "fps": f.Tensor(shape=(), dtype=np.float32),
      "video_num_frames": f.Tensor(shape=(), dtype=np.int64),
      "padded": f.Tensor(shape=(), dtype=np.int64),
      "metadata": f.Text(),
  })
