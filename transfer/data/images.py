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
  """Decodes an image file completely into an RGB image.

  Args:
    path: any format PIL reads (JPEG, PNG, GIF (first frame), BMP, WebP, ...).
    min_side: the side the caller will resize to; JPEGs are decoded at the smallest DCT scale
      that stays at least this large, which is several times faster for big photos.

  Returns:
    An RGB `PIL.Image`, fully loaded (a corrupt or truncated file raises here, not later).
  """
  with open(path, "rb") as f:
    return _decode(f, min_side)


def open_bytes(data: bytes, min_side: int = 0) -> Image.Image:
  """Like `open_file` for encoded bytes (a TFDS record's image)."""
  return _decode(io.BytesIO(data), min_side)


def _decode(f, min_side: int) -> Image.Image:
  """Opens, fully decodes, applies EXIF orientation and converts to RGB."""
  img = Image.open(f)
  if min_side > 0:
    img.draft(None, (min_side, min_side))  # No-op for formats without reduced decoding.
  img.load()
  img = ImageOps.exif_transpose(img)
  return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
  """Converts any PIL mode to RGB; transparent pixels become white rather than undefined colour."""
  if img.mode == "RGB":
    return img
  if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")
  if img.mode.startswith("I;16"):
    # 16-bit grayscale: keep the top byte (convert("RGB") would clip everything above 255).
    arr = (np.asarray(img, np.uint16) >> 8).astype(np.uint8)
    return Image.fromarray(arr, "L").convert("RGB")
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
