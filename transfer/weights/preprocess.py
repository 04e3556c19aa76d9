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


# ------------------------------------------------------------------ data config and transform


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything that turns an image into a model's eval input, resolved once (timm's
  `resolve_data_config`): the geometry, then the normalisation.

  Attributes:
    input_size: the model's input side (the centre crop).
    resize_size: the short side an image is resized to before the centre crop (torchvision's
      and timm's eval), or None to squash the whole image (see `squash_size`).
    interpolation: the resize filter, one of `INTERPOLATIONS`.
    mode: the normalisation, one of `MODES` (`preprocess`).
    squash_size: with `resize_size` None, the square side the whole image is squashed to before
      the centre `input_size` crop: `input_size` for Keras' weights (no crop), larger for a run
      trained with `eval_crop` < 1 (`run_data_config`).
    decode_min_side: JPEG files are decoded at the smallest scale at least this large (the
      data pipeline's reduced decoding, for trained runs); 0 decodes in full (the frameworks').
  """

  input_size: int
  resize_size: int | None
  interpolation: str
  mode: str
  squash_size: int | None = None
  decode_min_side: int = 0

  @property
  def crop_pct(self) -> float:
    """The fraction of the resized side the crop keeps (timm's `crop_pct`)."""
    side = self.resize_size or self.squash_size or self.input_size
    return self.input_size / side

  @property
  def mean(self) -> tuple[float, ...]:
    """Per RGB channel, in [0, 1] units: the model sees `(x / 255 - mean) / std`."""
    if self.mode == "torch":
      return TORCH_MEAN
    if self.mode == "caffe":
      return tuple(m / 255.0 for m in CAFFE_BGR_MEAN[::-1])
    return (0.5, 0.5, 0.5)

  @property
  def std(self) -> tuple[float, ...]:
    """Per RGB channel, in [0, 1] units (caffe: 1/255, pixels stay in 0-255)."""
    if self.mode == "torch":
      return TORCH_STD
    if self.mode == "caffe":
      return (1 / 255.0,) * 3
    return (0.5, 0.5, 0.5)

  @property
  def channel_order(self) -> str:
    """`"BGR"` for caffe (Keras' VGG and ResNet), else `"RGB"`."""
    return "BGR" if self.mode == "caffe" else "RGB"


def resolve_data_config(source, image_size: int | None = None) -> DataConfig:
  """The eval preprocessing of the weights `source`, what `transfer predict --weights` applies.

  Args:
    source: as for `mode_for` (a registry id, a weight file, a `ParsedSource`, a mode, None).
    image_size: the model's input side; None = the source's own (`eval_geometry`).

  Returns:
    A `DataConfig` (decoded in full, as the frameworks decode).
  """
  p = parsed(source)
  geometry = eval_geometry(p, image_size)
  return DataConfig(input_size=geometry.size, resize_size=geometry.resize,
                    interpolation=geometry.interpolation, mode=p.preprocess,
                    squash_size=geometry.size if geometry.resize is None else None)


def run_data_config(run: dict) -> DataConfig:
  """The eval preprocessing of a trained run from its checkpoint metadata (`runs.run_metadata`):
  squashed to the stored side `eval_crop` implies, the centre `image_size` cropped, normalised
  as its weights were, decoded as the eval pipeline decodes a stored image."""
  from transfer.data import images as image_ops  # Deferred: PIL.
  size = run["image_size"]
  stored = image_ops.stored_size(size, float(run["eval_crop"]))
  return DataConfig(input_size=size, resize_size=None, interpolation="bilinear",
                    mode=run["preprocessing"], squash_size=stored, decode_min_side=stored)


class Transform:
  """Uint8 RGB images -> the model's float input, one `DataConfig` applied (timm's
  `create_transform`). See `transform`.

  Attributes:
    config: the `DataConfig` applied.
  """

  def __init__(self, config: DataConfig):
    self.config = config

  def __repr__(self) -> str:
    return f"Transform({self.config})"

  def geometry(self, images) -> np.ndarray:
    """Resized and cropped, still uint8: one image ((H, W, 3) or a PIL image) -> (S, S, 3);
    a (N, H, W, 3) batch or a list of images of any sizes -> (N, S, S, 3)."""
    if isinstance(images, np.ndarray) and images.ndim == 3 or hasattr(images, "getbands"):
      return self._one(images)
    return np.stack([self._one(image) for image in images])

  def __call__(self, images, dtype=None) -> np.ndarray:
    """`geometry`, then `preprocess` in the config's mode: float32 unless `dtype` is given."""
    return preprocess(self.geometry(images), self.config.mode, dtype)

  def _one(self, image) -> np.ndarray:
    from PIL import Image  # Deferred: only image work needs PIL.
    from transfer.data import images as image_ops
    if not isinstance(image, Image.Image):
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise UserError(f"an image must be uint8 RGB (H, W, 3), got {image.dtype} "
                        f"{image.shape}")
      image = Image.fromarray(image)
    c = self.config
    if c.resize_size is not None:
      return eval_image(image, c.input_size, c.resize_size, c.interpolation)
    x = eval_image(image, c.squash_size or c.input_size, None, c.interpolation)
    return image_ops.center_crop(x[None], c.input_size)[0]


def transform(source, image_size: int | None = None) -> Transform:
  """The weights' own eval preprocessing on uint8 images: resize, centre crop, normalise.

      prep = transfer.weights.transform("torchvision:resnet50")  # 232 short side, 224 crop
      x = prep(np.asarray(Image.open("cat.jpg").convert("RGB")))  # (224, 224, 3) float32
      prep.config  # DataConfig(input_size=224, resize_size=232, ...)

  What `transfer predict --weights` applies to each image, from the one decision of each
  source's geometry (`eval_geometry`) and normalisation (`mode_for`).

  Args:
    source: a registry id, a weight file, a `ParsedSource`, a `DataConfig` (e.g. a trained
      run's, `run_data_config`), a mode name, or None (random init: [-1, 1], squashed).
    image_size: the model's input side; None = the source's own.

  Returns:
    A `Transform`: call it on a (H, W, 3) uint8 image, a (N, H, W, 3) batch or a list of
    images of any sizes; `.geometry` stops before the normalisation; `.config` says what it does.
  """
  if isinstance(source, DataConfig):
    return Transform(source)
  return Transform(resolve_data_config(source, image_size))
