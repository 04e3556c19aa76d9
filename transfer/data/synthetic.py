"""Generated images that a network can learn, for demos, tests and benchmarks without data files.

Each class is a sinusoidal grating with its own orientation, frequency and colour; every example
adds a random phase, contrast, brightness and pixel noise. Pure noise would make a training demo
meaningless, while these classes are separable by a small convolutional network yet not trivial
from one pixel. Examples are a pure function of (seed, split, index): nothing is stored, and
nothing here imports TensorFlow.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from transfer.data.sources import Source
from transfer.errors import UserError

_GOLDEN = 0.6180339887498949
_STREAM = 7  # Keeps these generators apart from the shuffle and augmentation ones.


def synthetic_sources(num_classes: int, train_size: int, val_size: int, base_size: int,
                      seed: int) -> tuple[Source, Source, list[str]]:
  """The synthetic train and validation splits.

  Args:
    num_classes: at least 2.
    train_size, val_size: number of examples in each split.
    base_size: side the images are drawn at, before resizing to the model's input size.
    seed: the examples are a pure function of it.

  Returns:
    (train, val, class_names) with class names `class_0`, `class_1`, ...
  """
  if num_classes < 2:
    raise UserError(f"synthetic.num_classes must be at least 2, got {num_classes}")
  if train_size < 1 or val_size < 0 or base_size < 8:
    raise UserError("synthetic needs train_size >= 1, val_size >= 0 and base_size >= 8, got "
                    f"{train_size}, {val_size}, {base_size}")
  make = lambda split, n: _source(split, n, num_classes, base_size, seed)
  return make(0, train_size), make(1, val_size), [f"class_{i}" for i in range(num_classes)]


def _source(split: int, n: int, num_classes: int, base_size: int, seed: int) -> Source:
  """One split; labels cycle through the classes so every class has the same share."""
  labels = (np.arange(n) % num_classes).astype(np.int32)

  job = lambda i: (example, (seed, split, int(i), int(labels[i]), num_classes, base_size))
  key = f"synthetic:{seed}:{split}:{n}:{num_classes}:{base_size}"
  names = tuple(f"synthetic/{('train', 'val')[split]}#{i}" for i in range(n))
  return Source(labels=labels, job=job, names=names, key=key, trusted=True)


def example(seed: int, split: int, i: int, label: int, num_classes: int, base_size: int,
            min_side: int = 0) -> Image.Image:
  """Example `i` of `split` (0 train, 1 val), class `label`, as an RGB image."""
  del min_side  # Always drawn at base_size.
  rng = np.random.default_rng((seed, _STREAM, split, i))
  return Image.fromarray(draw(label, num_classes, base_size, rng), "RGB")


def draw(label: int, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
  """One example of class `label`: uint8 (size, size, 3).

  Orientation, frequency and hue are spread with the golden ratio so that neighbouring class ids
  differ in several ways at once, for any number of classes.
  """
  angle = np.pi * ((label * _GOLDEN) % 1.0)
  cycles = 2.0 + 4.0 * ((label * _GOLDEN * 2.0) % 1.0)
  hue = 2.0 * np.pi * label / num_classes
  colour = 0.5 + 0.5 * np.cos(hue + np.array([0.0, 2.0, 4.0]) * np.pi / 3.0)
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
  phase = rng.uniform(0, 2 * np.pi)
  contrast, brightness = rng.uniform(0.6, 1.0), rng.uniform(-0.1, 0.1)
  wave = np.sin(2 * np.pi * cycles * (x * np.cos(angle) + y * np.sin(angle)) + phase)
  # The tint alone separates the classes on average; the grating needs spatial features.
  img = 0.5 + brightness + 0.25 * (colour - 0.5) + 0.4 * contrast * wave[..., None] * colour
  img += rng.normal(0.0, 0.08, img.shape)
  return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
