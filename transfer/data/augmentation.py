"""The train-time augmentation policy: which stored size each policy crops from, and what it does
to one example.

Each example's augmentation is a pure function of its stored pixels and a key (seed, stream,
epoch, example id), so a batch is the same whether its examples are augmented in this process's
threads or in decode worker processes, and a resumed run augments exactly as an uninterrupted one.
The pixel operations themselves live in `transfer.data.images`.
"""

from __future__ import annotations

import numpy as np

from transfer.data import images

AUGMENTS = ("none", "flip", "crop_flip", "inception_crop", "randaugment")
# Augmentations that crop a larger stored image (`train_crop` sets how much larger).
CROPPING = ("crop_flip", "inception_crop", "randaugment")


def stored_train_size(image_size: int, augment: str, train_crop: float) -> int:
  """Side of the stored training images: larger than the output only when crops are random."""
  return images.stored_size(image_size, train_crop) if augment in CROPPING else image_size


def augment_example(image: np.ndarray, augment: str, size: int, key: tuple[int, ...],
                    randaugment: tuple[int, float]) -> np.ndarray:
  """`augment_one` with the example's generator seeded from `key` (seed, stream, epoch, id): a
  module-level function of picklable arguments, so a worker process can run it."""
  return augment_one(image, augment, size, np.random.default_rng(key), randaugment)


def augment_one(image: np.ndarray, augment: str, size: int, rng: np.random.Generator,
                randaugment: tuple[int, float] = (2, 9.0)) -> np.ndarray:
  """Train-time augmentation of one stored uint8 image to `size` x `size`.

  Args:
    image: the stored image (`stored_train_size`).
    augment: one of `AUGMENTS`: none (a centred window when the image is larger), flip,
      crop_flip (random window, flip), inception_crop (random-resized crop, flip), randaugment
      (inception_crop, then timm's RandAugment with `randaugment` = (N ops, magnitude M)).
    size: output side.
    rng: the example's generator, seeded from (seed, epoch, example id).

  Returns:
    uint8 (size, size, 3).
  """
  if augment in ("inception_crop", "randaugment"):
    out = images.inception_crop(image, size, rng)
    if augment == "randaugment":
      out = images.randaugment(out, rng, *randaugment)
    return out
  return images.random_crop_flip(image, size, rng, flip=augment != "none")
