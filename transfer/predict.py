"""`transfer predict`: classify image files.

    transfer predict --model vgg16 --weights keras:vgg16 [--top 5] [--json] cat.jpg dog.png

The ImageNet path runs a pretrained network with its 1000-class top. The helpers (`load_images`,
`top_k`, `format_predictions`) are shared with the trained-run path (`--workdir`), which only
differs in where the model, its weights and its class names come from.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Sequence

import numpy as np

from transfer.errors import UserError

IMAGENET_CLASSES_FILE = os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")
BATCH = 8


def main(images: Sequence[str], workdir: str | None = None, model: str = "vgg16",
         weights: str = "keras:vgg16", top: int = 5, as_json: bool = False) -> None:
  """Prints the top classes of each image.

  Args:
    images: image file paths (anything Pillow reads).
    workdir: a trained run; None = ImageNet classes with `model` and `weights`.
    model: registry name of the ImageNet model (without `workdir`).
    weights: registry id or file with the ImageNet top (without `workdir`).
    top: classes to print per image.
    as_json: one JSON object per image per line instead of a table.
  """
  if workdir is not None:
    results = predict_trained(images, workdir, top=top)
  else:
    results = predict_imagenet(images, model=model, weights=weights, top=top)
  for path, best in results:
    print(format_predictions(path, best, as_json=as_json), flush=True)


def predict_imagenet(images: Sequence[str], *, model: str = "vgg16", weights: str = "keras:vgg16",
                     top: int = 5) -> list[tuple[str, list[dict]]]:
  """Top-`top` ImageNet classes of each image.

  Args:
    images: image file paths.
    model: registry name; built with the ImageNet top.
    weights: weights with the ImageNet top; they also decide the preprocessing.
    top: classes per image.

  Returns:
    `[(path, [{"class": int, "label": str, "prob": float}, ...]), ...]` in input order.
  """
  from transfer import models
  from transfer import weights as weights_lib

  if top < 1:
    raise UserError(f"--top must be >= 1, got {top}")
  net = models.get(model, include_top=True)
  size = models.spec(model).top_image_size
  pixels = load_images(images, size)  # Before the weights: a bad image fails fast.
  params, report = weights_lib.load(weights, net, image_size=size, return_report=True)
  if report.fresh:
    print(f"transfer: warning: {report.summary()}; predictions are meaningless", file=sys.stderr)
  probs = predict_probs(net, params, weights_lib.preprocess(pixels, weights))
  labels = imagenet_labels() if probs.shape[-1] == 1000 else None
  return list(zip(images, top_k(probs, top, labels)))


def predict_trained(images: Sequence[str], workdir: str, *, top: int = 5,
                    step: int | None = None) -> list[tuple[str, list[dict]]]:
  """Top classes of each image under a run trained by `transfer train`.

  The model, class names, input size, eval crop and preprocessing come from the checkpoint's
  metadata, so images go through exactly the transform the run was validated with.

  Args:
    images: image file paths.
    workdir: the run directory.
    top: classes per image (capped at the run's class count).
    step: a checkpoint step; default the latest.

  Returns:
    `[(path, [{"class": int, "label": str, "prob": float}, ...]), ...]` in input order.
  """
  from transfer import checkpoint, train
  from transfer.data import images as image_ops
  from transfer import weights as weights_lib

  if top < 1:
    raise UserError(f"--top must be >= 1, got {top}")
  params, meta = checkpoint.load_trained(workdir, step)
  run = meta["run"]
  size = run["image_size"]
  stored = image_ops.stored_size(size, float(run["eval_crop"]))
  pixels = image_ops.center_crop(load_images(images, stored), size)
  net = train.model_from_meta(run, dtype="float32")
  probs = predict_probs(net, params, weights_lib.preprocess(pixels, run["preprocessing"]))
  return list(zip(images, top_k(probs, top, run["class_names"])))


def predict_probs(net, params, x: np.ndarray, batch: int = BATCH) -> np.ndarray:
  """Class probabilities of `net` on preprocessed images, in batches of `batch`.

  Softmax over the logits; a single logit (binary sigmoid head) gives two columns,
  [P(class 0), P(class 1)].

  Args:
    net: a model returning logits.
    params: its params.
    x: preprocessed NHWC float images.
    batch: images per forward pass (bounds memory; the last batch is padded to keep one shape).

  Returns:
    (N, classes) float32 numpy probabilities.
  """
  import jax

  def probabilities(p, x):
    logits = net.apply({"params": p}, x)
    if logits.shape[-1] == 1:  # one sigmoid logit: P(class 1) and its complement
      positive = jax.nn.sigmoid(logits)
      return jax.numpy.concatenate([1.0 - positive, positive], axis=-1)
    return jax.nn.softmax(logits, axis=-1)

  forward = jax.jit(probabilities)
  out = []
  for start in range(0, len(x), batch):
    chunk = x[start:start + batch]
    padded = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:],
                                             chunk.dtype)]) if len(x) > batch else chunk
    out.append(np.asarray(forward(params, padded))[:len(chunk)])
  return np.concatenate(out).astype(np.float32)


def load_images(paths: Sequence[str], size: int) -> np.ndarray:
  """Decodes image files to RGB and resizes them to `size` x `size`.

  Args:
    paths: image files; grayscale, palette and RGBA images are converted to RGB.
    size: output side; images of another size are resized (bilinear), without keeping the
      aspect ratio, as Keras' `load_img(target_size=...)` does.

  Returns:
    uint8 array of shape (N, size, size, 3).

  Raises:
    UserError: a file is missing or not a readable image (the message names it).
  """
  return np.stack([_load_image(p, size) for p in paths])


def _load_image(path: str, size: int) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as image:
      image = image.convert("RGB")
      if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
      return np.asarray(image, np.uint8)
  except FileNotFoundError:
    raise UserError(f"no image file {path}") from None
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f"cannot read image {path}: {reason}") from None


def top_k(probs: np.ndarray, k: int, labels: Sequence[str] | None = None) -> list[list[dict]]:
  """The `k` most probable classes of each row, best first.

  Args:
    probs: (N, classes) probabilities.
    k: classes per row (capped at the number of classes).
    labels: class names by index; None labels classes by their index.

  Returns:
    Per row, `[{"class": int, "label": str, "prob": float}, ...]`.
  """
  probs = np.asarray(probs)
  k = min(k, probs.shape[-1])
  # Stable sort on the negated probs: ties keep the lower class index first.
  order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
  return [[{"class": int(c), "label": labels[c] if labels is not None else str(int(c)),
            "prob": float(row[c])} for c in idx] for row, idx in zip(probs, order)]


def format_predictions(path: str, best: list[dict], as_json: bool = False) -> str:
  """One image's predictions: a JSON line, or a header line and one line per class."""
  if as_json:
    return json.dumps({"image": path, "top": best})
  lines = [path]
  lines += [f"  {rank}. {p['prob']:7.2%}  {p['class']:>4}  {p['label']}"
            for rank, p in enumerate(best, 1)]
  return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
  """The 1000 ImageNet class names in model output order (shipped with the package)."""
  with open(IMAGENET_CLASSES_FILE, encoding="utf8") as f:
    labels = tuple(line.rstrip("\n").split("\t", 1)[1] for line in f if line.strip())
  if len(labels) != 1000:
    raise RuntimeError(f"{IMAGENET_CLASSES_FILE} has {len(labels)} classes, expected 1000")
  return labels


def imagenet_wnids() -> tuple[str, ...]:
  """The WordNet ids (`n01440764`, ...) of the 1000 ImageNet classes, in output order."""
  with open(IMAGENET_CLASSES_FILE, encoding="utf8") as f:
    return tuple(line.split("\t", 1)[0] for line in f if line.strip())
