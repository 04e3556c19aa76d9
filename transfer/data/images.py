"""Decoding, resizing and augmenting uint8 RGB images on the host with PIL and numpy.

Everything here works on one image at a time (the caller parallelises over a thread pool; PIL
releases the GIL while it decodes and resizes) and is deterministic given its inputs, so that the
same example always becomes the same pixels whether it comes from a cache or a fresh decode.
Resizing squashes to a square, as Keras' `flow_from_directory(target_size=...)` does: the blog
recipe trains on whole images, not on a centre region.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

_WHITE = (255, 255, 255)
# Only for hints about a folder's layout: any file is decoded, whatever its name.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def is_image_name(name: str) -> bool:
  """Whether a file name has a common image extension (any case)."""
  return name.lower().endswith(IMAGE_EXTENSIONS)


def open_file(path: str, min_side: int = 0) -> Image.Image:
  """Decodes an image file completely into an RGB image: the one decode for train, eval and
  predict (and the images an exported artifact is documented to take), so a file is the same
  picture wherever it is read.

  Args:
    path: any format PIL reads (JPEG, PNG, GIF (first frame), BMP, WebP, TIFF, ...).
    min_side: the side the caller will resize to; JPEGs are decoded at the smallest DCT scale
      that stays at least this large, which is several times faster for big photos.

  Returns:
    An RGB `PIL.Image`, fully loaded (a corrupt or truncated file raises here, not later),
    upright (EXIF orientation applied) and converted by `to_rgb`.
  """
  return _decode(path, min_side)  # By name: PIL's errors name the file.


def open_bytes(data: bytes, min_side: int = 0) -> Image.Image:
  """Like `open_file` for encoded bytes (a TFDS record's image)."""
  return _decode(io.BytesIO(data), min_side)


def _decode(f, min_side: int) -> Image.Image:
  """Opens, fully decodes, applies EXIF orientation and converts to RGB."""
  with Image.open(f) as img:
    if min_side > 0:
      img.draft(None, (min_side, min_side))  # No-op for formats without reduced decoding.
    img.load()
    return to_rgb(ImageOps.exif_transpose(img))


_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(img: Image.Image) -> Image.Image:
  """Converts any PIL mode to 8-bit RGB, the way a viewer shows the image.

  Transparency (an alpha channel, or a palette or colour key marked transparent) is composited
  onto white, not dropped (which would show whatever colour hides under it). 16-bit grayscale
  (`I;16*`, and PNG/TIFF data PIL opens as 32-bit `I`) keeps its top byte; `convert("RGB")`
  would clip everything above 255 to white. CMYK, palette, grayscale and bilevel images
  convert as PIL converts them.
  """
  if img.mode == "RGB" and "transparency" not in img.info:
    return img
  if img.mode.startswith("I"):
    arr = np.clip(np.asarray(img, np.int64), 0, 65535) >> 8
    return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
  if img.mode in _ALPHA_MODES or "transparency" in img.info:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return img.convert("RGB")


def resize(img: Image.Image, size: int) -> np.ndarray:
  """Squashes an RGB image to `size` x `size` (bilinear, antialiased when shrinking).

  Returns:
    uint8 array (size, size, 3).
  """
  if img.size != (size, size):
    img = img.resize((size, size), Image.BILINEAR)
  return np.asarray(img, np.uint8)


def stored_size(image_size: int, crop_fraction: float) -> int:
  """The side an image is resized to before a crop of `crop_fraction` leaves `image_size`."""
  return max(image_size, int(round(image_size / crop_fraction)))


def center_crop(images: np.ndarray, size: int) -> np.ndarray:
  """The central `size` x `size` window of a batch of square images (NHWC)."""
  offset = (images.shape[1] - size) // 2
  return images[:, offset:offset + size, offset:offset + size]


def random_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator,
                     flip: bool) -> np.ndarray:
  """Train-time augmentation of one stored image: a random `size` window, then maybe a mirror.

  The random numbers are drawn in the same order whether or not they are used, so an example's
  augmentation depends only on its generator's seed.

  Args:
    image: uint8 (L, L, 3) with L >= size (L == size: no crop).
    size: output side.
    rng: the example's generator, seeded from (seed, epoch, example id).
    flip: whether horizontal flips are allowed.

  Returns:
    uint8 (size, size, 3).
  """
  margin = image.shape[0] - size
  top, left = rng.integers(0, margin + 1, size=2)
  mirror = rng.random() < 0.5
  out = image[top:top + size, left:left + size]
  return out[:, ::-1] if flip and mirror else out


# Inception / timm RandomResizedCrop defaults.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10


def inception_crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
  """A random-resized-crop window `(top, left, h, w)` as Inception and timm draw it.

  Up to 10 tries: area uniform in `CROP_SCALE` of the image, log aspect ratio uniform in
  `CROP_RATIO`; the first window that fits is taken at a uniform position. When none fits, the
  fallback is the largest centred window with the aspect ratio clamped to `CROP_RATIO` (the whole
  image for a square one).
  """
  area = height * width
  log_lo, log_hi = np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1])
  for _ in range(CROP_ATTEMPTS):
    target = area * rng.uniform(*CROP_SCALE)
    aspect = np.exp(rng.uniform(log_lo, log_hi))
    w = int(round(np.sqrt(target * aspect)))
    h = int(round(np.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < CROP_RATIO[0]:
    w, h = width, int(round(width / CROP_RATIO[0]))
  elif in_ratio > CROP_RATIO[1]:
    h, w = height, int(round(height * CROP_RATIO[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def inception_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                   flip: bool = True) -> np.ndarray:
  """Random-resized crop of one stored image to `size` x `size` (bilinear), then maybe a mirror.

  Args:
    image: uint8 (H, W, 3).
    size: output side.
    rng: the example's generator, seeded from (seed, epoch, example id).
    flip: whether horizontal flips are allowed (the coin is drawn either way).

  Returns:
    uint8 (size, size, 3).
  """
  top, left, h, w = inception_crop_box(image.shape[0], image.shape[1], rng)
  mirror = rng.random() < 0.5
  crop = Image.fromarray(image).resize((size, size), Image.BILINEAR,
                                       box=(left, top, left + w, top + h))
  out = np.asarray(crop, np.uint8)
  return out[:, ::-1] if flip and mirror else out


# RandAugment as timm's `rand-mM-nN`: N ops drawn uniformly with replacement from this set, each
# applied with probability 0.5 at magnitude M on timm's 0-10 scale. Geometric ops fill with the
# ImageNet mean (timm's `img_mean`) and resample bilinearly (timm picks bilinear or bicubic at
# random), and their sign is random.
RANDAUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                   "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                   "ShearY", "TranslateXRel", "TranslateYRel")
RANDAUGMENT_PROB = 0.5
_FILL = (124, 116, 104)  # round(255 * ImageNet mean)
_LEVEL = 10.0            # timm's _LEVEL_DENOM: M=10 is the strongest setting


def randaugment_arg(name: str, magnitude: float) -> float | int | None:
  """An op's argument at `magnitude` (0-10), before any random sign: timm's level mapping.

  Rotate: 30 deg * M/10. ShearX/Y: 0.3 * M/10. TranslateX/YRel: 0.45 * M/10 of the side.
  Posterize: int(4 * M/10) bits kept (8 or more: unchanged). Solarize: threshold
  int(256 * M/10). SolarizeAdd: min(128, int(110 * M/10)) added below 128. Color, Contrast,
  Brightness, Sharpness: enhance factor 0.1 + 1.8 * M/10. AutoContrast, Equalize, Invert: none.
  """
  level = min(max(float(magnitude), 0.0), _LEVEL) / _LEVEL
  return {
      "Rotate": 30.0 * level, "ShearX": 0.3 * level, "ShearY": 0.3 * level,
      "TranslateXRel": 0.45 * level, "TranslateYRel": 0.45 * level,
      "Posterize": int(4 * level), "Solarize": min(256, int(256 * level)),
      "SolarizeAdd": min(128, int(110 * level)),
      "Color": 0.1 + 1.8 * level, "Contrast": 0.1 + 1.8 * level,
      "Brightness": 0.1 + 1.8 * level, "Sharpness": 0.1 + 1.8 * level,
  }.get(name)


_SIGNED = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})


def _apply_op(img: Image.Image, name: str, arg) -> Image.Image:
  """One RandAugment op on an RGB PIL image."""
  from PIL import ImageEnhance
  affine = dict(resample=Image.BILINEAR, fillcolor=_FILL)
  if name == "AutoContrast":
    return ImageOps.autocontrast(img)
  if name == "Equalize":
    return ImageOps.equalize(img)
  if name == "Invert":
    return ImageOps.invert(img)
  if name == "Rotate":
    return img.rotate(arg, **affine)
  if name == "Posterize":
    return img if arg >= 8 else ImageOps.posterize(img, arg)
  if name == "Solarize":
    return ImageOps.solarize(img, arg)
  if name == "SolarizeAdd":
    lut = [min(255, i + arg) if i < 128 else i for i in range(256)]
    return img.point(lut * 3)
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return getattr(ImageEnhance, name)(img).enhance(arg)
  if name == "ShearX":
    return img.transform(img.size, Image.AFFINE, (1, arg, 0, 0, 1, 0), **affine)
  if name == "ShearY":
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, arg, 1, 0), **affine)
  if name == "TranslateXRel":
    return img.transform(img.size, Image.AFFINE, (1, 0, arg * img.size[0], 0, 1, 0), **affine)
  if name == "TranslateYRel":
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, arg * img.size[1]), **affine)
  raise ValueError(f"unknown RandAugment op {name!r}")


def randaugment(image: np.ndarray, rng: np.random.Generator, num_ops: int,
                magnitude: float) -> np.ndarray:
  """timm's RandAugment (`rand-m{magnitude}-n{num_ops}`) on one uint8 image.

  For each of `num_ops` rounds three numbers are drawn whatever happens (op index, apply coin,
  sign coin), so an example's result depends only on its generator's seed.

  Returns:
    uint8 array of the input's shape.
  """
  img = Image.fromarray(image)
  for _ in range(num_ops):
    name = RANDAUGMENT_OPS[int(rng.integers(0, len(RANDAUGMENT_OPS)))]
    apply, negate = rng.random() < RANDAUGMENT_PROB, rng.random() < 0.5
    if not apply:
      continue
    arg = randaugment_arg(name, magnitude)
    if name in _SIGNED and negate:
      arg = -arg
    img = _apply_op(img, name, arg)
  return np.asarray(img, np.uint8)
