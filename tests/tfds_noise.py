"""A small TFDS image classification dataset generated on the spot, for the random-access tests.

`prepare(data_dir, file_format)` writes `transfer_noise` (train and validation) in TFRecord or
ArrayRecord format. Its images are PNGs of random noise, which PNG cannot compress, so the
encoded size is known and large: `NUM_TRAIN * (SIDE * SIDE * 3)` bytes give or take headers.
Once prepared, the dataset loads by name and data_dir in any process, without this module (TFDS
reads the metadata it wrote).
"""

import numpy as np
import tensorflow_datasets as tfds

NAME = "transfer_noise"
NUM_TRAIN, NUM_VAL, SIDE, CLASSES = 3000, 200, 160, ("a", "b", "c")


class TransferNoise(tfds.core.GeneratorBasedBuilder):
  """Random-noise PNGs with labels i % 3 (the labels only need to be known, not learnable)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=list(CLASSES))}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, NUM_TRAIN),
            "validation": self._generate_examples(1, NUM_VAL)}

  def _generate_examples(self, split, n):
    for i in range(n):
      rng = np.random.default_rng((split, i))
      yield i, {"image": rng.integers(0, 256, (SIDE, SIDE, 3), np.uint8),
                "label": i % len(CLASSES)}


def prepare(data_dir: str, file_format: str = "array_record") -> str:
  """Generates the dataset into `data_dir` in `file_format`; returns the version directory."""
  builder = TransferNoise(data_dir=data_dir, file_format=file_format)
  builder.download_and_prepare()
  return str(builder.data_dir)
