"""Input preprocessing that belongs to each weight source.

Pretrained weights only compute what they computed in their framework when the pixels are
normalised the same way, so the normalisation is a property of the weights, not of the data:
  * `caffe` (Keras VGG16/VGG19): RGB -> BGR, subtract the ImageNet BGR mean, 0-255 scale.
  * `torch` (torchvision): scale to [0, 1], subtract mean and divide by std per RGB channel.
  * `tf` (InceptionV3, Keras' and torchvision's): RGB scaled to [-1, 1], `x / 127.5 - 1`.
    That is Keras' "tf" mode exactly. torchvision's pretrained InceptionV3 normalises with the
    ImageNet mean and std and then undoes it in `transform_input` (channel c:
    `x * std_c / 0.5 + (mean_c - 0.5) / 0.5`), which is `x / 127.5 - 1` up to float32 rounding
    (below 1e-6); we compute the one-step form.
  * `unit` (random initialisation): scale to [-1, 1], the same numbers as `tf`.
Works on numpy arrays (host pipelines) and jax arrays (on-device augmentation) alike.

The eval geometry is a property of the weights too (`eval_geometry`, `eval_image`): Keras'
loaders squash the whole image to the input size (299 for InceptionV3); torchvision resizes the short side (256, or 232
for its V2 ResNet weights) and center-crops 224 (InceptionV3: 342, then 299), bilinear; timm's
recipes evaluate at their own test size and crop fraction, mostly bicubic (288 from a short side
of 288 for the A1 ResNets). Evaluating one family's weights through another's geometry shifts
their probabilities and costs accuracy.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from transfer.errors import UserError

from transfer.weights import sources

MODES = ("caffe", "torch", "tf", "unit")
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)

# torchvision's `ImageClassification` crops 224 out of a short side of 256 unless the weights
# say otherwise (its V1 weights; timm's default crop fraction 0.875 gives the same).
EVAL_CROP = 224
TORCH_RESIZE = 256

INTERPOLATIONS = ("bilinear", "bicubic")


def parsed(source) -> sources.ParsedSource:
  """`source` as a `sources.ParsedSource`: as is, a mode name's own (a `torch` mode evaluates
  as torchvision does by default, the others squash), else `sources.resolve(source)`."""
  if isinstance(source, sources.ParsedSource):
    return source
  if source in MODES:
    return sources.ParsedSource(weights=source, source=None, optional=False, preprocess=source,
                                resize_size=TORCH_RESIZE if source == "torch" else None)
  return sources.resolve(source)


def mode_for(source) -> str:
  """The preprocessing mode of a weight source.

  Args:
    source: a `sources.ParsedSource` (its `preprocess`), a mode name itself, or what
      `sources.resolve` parses: a registry id (`keras:vgg16`; timm's mean/std are
      torchvision's), a weight file path (its registry record when it has an official file
      name, else by the architecture recognised in it and the framework that wrote it: a Keras
      InceptionV3 `.h5` is `tf`, a Keras VGG16 one `caffe`), or `None`/`"none"` for random
      initialisation.

  Returns:
    One of `MODES`.
  """
  if source is None or source == "none":
    return "unit"
  return parsed(source).preprocess


def preprocess(images, source, dtype=None):
  """Normalises uint8 RGB images (NHWC, any leading dims) for the weights `source`.

  Args:
    images: uint8 (or float 0-255) RGB array, numpy or jax, channels last.
    source: a mode name or a `sources.ParsedSource` (a lookup: what per-batch callers pass),
      or a weight source string, parsed on every call (see `mode_for`).
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
  else:  # tf, unit
    x = x / 127.5 - 1.0
  return x if dtype is None else x.astype(dtype)


def _jnp():
  import jax.numpy as jnp  # Deferred: host pipelines need only numpy.
  return jnp


@dataclasses.dataclass(frozen=True)
class EvalGeometry:
  """How an image becomes a weight source's eval input (see `eval_image`).

  Attributes:
    size: the input side (the center crop).
    resize: the short side before the crop, or None to squash the whole image to `size`.
    interpolation: the resize filter, one of `INTERPOLATIONS`.
  """

  size: int
  resize: int | None
  interpolation: str = "bilinear"


def eval_geometry(source, size: int | None = None) -> EvalGeometry:
  """The eval geometry the weights `source` were validated with.

  Args:
    source: as for `mode_for`. Its `ParsedSource` carries the geometry: a registry record's own
      (`WeightSource.resize_size`, `input_size`, `interpolation`); a file's from its
      architecture and framework (`sources.for_file`: a torch InceptionV3 file 342/299, a
      Keras one squashed to 299, other torch files torchvision's 256/224); random
      initialisation and modes other than `torch` squash.
    size: the model's input side; None = the source's own (`input_size`). Another size keeps
      the source's crop fraction: `round(resize * size / input_size)`.

  Returns:
    An `EvalGeometry`.
  """
  p = parsed(source)
  resize, native = p.resize_size, p.input_size
  size = size or native
  scaled = None if resize is None else int(round(resize * size / native))
  return EvalGeometry(size=size, resize=scaled, interpolation=p.interpolation)


def eval_resize(source, size: int | None = None) -> int | None:
  """The short side an eval image is resized to before its center crop; None = squash.

  `eval_geometry(source, size).resize`: e.g. 232 for `torchvision:resnet50`, 342 for
  `torchvision:inception_v3` (at its own 299), 256 for a torch VGG file, None for Keras
  weights; the recorded sizes keep their crop fraction at other sizes.
  """
  return eval_geometry(source, size).resize


def eval_image(image, size: int, resize_size: int | None, interpolation: str = "bilinear"):
  """An RGB PIL image as the (size, size, 3) uint8 eval input, in the weights' geometry.

  `resize_size=None` squashes the whole image to `size` x `size` with PIL's bilinear filter, which
  PIL widens when shrinking (antialiasing). Keras' `load_img` squashes too, but with nearest
  neighbour by default, and `image_dataset_from_directory` with bilinear without antialiasing.
  We use antialiased bilinear, as our training pipeline does (`transfer.data.images.resize`), so
  a prediction sees what training saw, and shrinking a large photo does not alias.

  A number follows torchvision's `ImageClassification`: the short side becomes `resize_size`, the
  long side `int(resize_size * long / short)`, both with PIL's bilinear filter (`reducing_gap`
  None, so the full filter, antialiased when shrinking), then the center `size` x `size` window at
  offset `int(round((side - size) / 2))`. Given a PIL image torchvision itself calls this same
  PIL resize, so the result is identical to its pipeline on PIL images. On tensors (e.g. images
  decoded with `torchvision.io`) it runs torch's `antialias=True` bilinear instead, the same
  filter computed in float without PIL's rounding to uint8 between passes: close (a level or so
  per pixel), not bit-identical. timm's eval transform is the same torchvision `Resize` (short
  side `floor(size / crop_pct)`) and `CenterCrop`, with its cfg's filter: `"bicubic"` is PIL's
  bicubic, as torchvision calls it on PIL images.

  Args:
    image: an RGB `PIL.Image.Image`.
    size: the model's input side.
    resize_size: the short side before the crop (`eval_geometry`), or None to squash.
    interpolation: `"bilinear"` or `"bicubic"` (`EvalGeometry.interpolation`).

  Returns:
    uint8 numpy array (size, size, 3).
  """
  from PIL import Image  # Deferred: only image decoding needs PIL.
  if interpolation not in INTERPOLATIONS:
    raise UserError(f"unknown interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
  resample = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
  if resize_size is None:
    if image.size != (size, size):
      image = image.resize((size, size), resample, reducing_gap=None)
    return np.asarray(image, np.uint8)
  if resize_size < size:
    raise UserError(f"eval resize {resize_size} is smaller than the {size} crop; use a resize "
                    f"size >= {size}")
  width, height = image.size
  short, long = min(width, height), max(width, height)
  new_long = int(resize_size * long / short)
  new = (resize_size, new_long) if width <= height else (new_long, resize_size)
  if new != image.size:
    image = image.resize(new, resample, reducing_gap=None)
  top = int(round((new[1] - size) / 2.0))
  left = int(round((new[0] - size) / 2.0))
  return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)
