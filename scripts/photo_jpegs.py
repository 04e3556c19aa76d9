"""Writes photo-like JPEGs for timing the input pipeline: `python scripts/photo_jpegs.py DIR [N]`.

Each image is 500x375 (a typical web photo, cats_vs_dogs' median size), JPEG quality 90: a smooth
colour field (a random 8x6 grid upsampled bicubically), a few hard-edged shapes, and pixel noise,
which gives file sizes and decode costs like real photos (about 65 KB each), unlike flat
colours (tiny, fast) or pure noise (huge, slow). N images (default 512) in DIR/a and DIR/b.
"""

import os
import sys

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT, QUALITY = 500, 375, 90


def photo(rng: np.random.Generator) -> Image.Image:
  """One photo-like RGB image."""
  field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), np.uint8)).resize(
      (WIDTH, HEIGHT), Image.BICUBIC)
  draw = ImageDraw.Draw(field)
  for _ in range(6):
    x, y = rng.integers(0, WIDTH), rng.integers(0, HEIGHT)
    w, h = rng.integers(20, 160, size=2)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=colour)
  pixels = np.asarray(field, np.float32) + rng.normal(0, 10, (HEIGHT, WIDTH, 3))
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def main(folder: str, n: int = 512) -> None:
  rng = np.random.default_rng(0)
  for i in range(n):
    sub = os.path.join(folder, "ab"[i % 2])
    os.makedirs(sub, exist_ok=True)
    photo(rng).save(os.path.join(sub, f"{i}.jpg"), quality=QUALITY)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 512)
