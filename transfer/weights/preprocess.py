"""Input preprocessing that belongs to each weight source.

Pretrained weights only compute what they computed in their framework when the pixels are
normalised the same way, so the normalisation is a property of the weights, not of the data:
  * `caffe` (Keras VGG16/VGG19): RGB -> BGR, subtract the ImageNet BGR mean, 0-255 scale.
  * `torch` (torchvision): scale to [0, 1], subtract mean and divide by std per RGB channel.
  * `unit` (random initialisation): scale to [-1, 1].
Works on numpy arrays (host pipelines) and jax arrays (on-device augmentation) alike.
"""

from __future__ import annotations

from transfer.errors import UserError

import os

import numpy as np

MODES = ("caffe", "torch", "unit")
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)

_EXTENSION_MODES = {".h5": "caffe", ".hdf5": "caffe", ".keras": "caffe",
                    ".pth": "torch", ".pt": "torch", ".safetensors": "torch"}


def mode_for(source: str | None) -> str:
  """The preprocessing mode of a weight source.

  Args:
    source: a registry id (`keras:vgg16`, `torchvision:vgg16`), a weight file path (by format:
      `.h5` = Keras, `.pth`/`.safetensors` = torchvision), a mode name itself, or `None`/`"none"`
      for random initialisation.

  Returns:
    One of `MODES`.
  """
  if source is None or source == "none":
    return "unit"
  if source in MODES:
    return source
  prefix = source.split(":", 1)[0] if ":" in source and not os.path.exists(source) else None
  if prefix == "keras":
    return "caffe"
  if prefix == "torchvision":
    return "torch"
  for ext, mode in _EXTENSION_MODES.items():
    if source.lower().endswith(ext):
      return mode
  raise UserError(f"cannot tell the preprocessing of weights {source!r}: use a registry id "
                   f"(keras:..., torchvision:...), a .h5/.pth/.safetensors file, or one of {MODES}")


def preprocess(images, source: str | None, dtype=None):
  """Normalises uint8 RGB images (NHWC, any leading dims) for the weights `source`.

  Args:
    images: uint8 (or float 0-255) RGB array, numpy or jax, channels last.
    source: weight source or mode name, see `mode_for`.
    dtype: output dtype; float32 by default.

  Returns:
    An array of the same kind as `images`, float32 unless `dtype` is given.
  """
  xp = np if isinstance(images, np.ndarray) else _jnp()
  x = images.astype(xp.float32)
  mode = mode_for(source)
  if mode == "caffe":
    x = x[..., ::-1] - xp.asarray(CAFFE_BGR_MEAN, xp.float32)
  elif mode == "torch":
    x = (x / 255.0 - xp.asarray(TORCH_MEAN, xp.float32)) / xp.asarray(TORCH_STD, xp.float32)
  else:
    x = x / 127.5 - 1.0
  return x if dtype is None else x.astype(dtype)


def _jnp():
  import jax.numpy as jnp  # Deferred: host pipelines need only numpy.
  return jnp
