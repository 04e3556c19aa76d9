"""`transfer predict`: classify image files.

    transfer predict --model vgg16 --weights keras:vgg16 [--top 5] [--json] cat.jpg photos/

Both paths, ImageNet classes with pretrained weights and a trained run (`--workdir`), go through
`transfer.predictor.Predictor` (`from_pretrained`, `from_workdir`), which differ only in where the
model, its variables, its eval preprocessing and its class names come from; this module adds the
file walking, the error lines and the printing.

Each image is decoded on its own, a batch at a time: one unreadable file among thousands costs
its own line, not the whole run, and only `batch_size` decoded images are in memory at once.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np

from transfer.errors import UserError

IMAGENET_CLASSES_FILE = os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")
BATCH = 8


class Prediction(NamedTuple):
  """One image's result: its top classes, or why it could not be read (exactly one is set)."""
  image: str
  top: list[dict] | None
  error: str | None = None


class UnreadableImage(UserError):
  """An image file that is missing or does not decode; `reason` is one line."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"cannot read image {path}: {reason}")
    self.path, self.reason = path, reason


def main(images: Sequence[str], workdir: str | None = None, model: str = "vgg16",
         weights: str = "keras:vgg16", top: int = 5, as_json: bool = False,
         batch_size: int = BATCH, checkpoint: str | int | None = None) -> int:
  """Prints the top classes of each image, in input order, as soon as its batch is done.

  An image that cannot be read is reported in its place (text: a `transfer: error:` line on
  stderr; JSON: `{"image", "error"}` on stdout) and the others are still classified.

  Args:
    images: image files and folders (walked recursively, see `expand_images`).
    workdir: a trained run; None = ImageNet classes with `model` and `weights`.
    model: registry name of the ImageNet model (without `workdir`).
    weights: registry id or file with the ImageNet top (without `workdir`).
    top: classes to print per image.
    as_json: one JSON object per image per line instead of a table.
    batch_size: images decoded and classified per forward pass.
    checkpoint: which checkpoint of `workdir`: "latest" (None), "best" or a step.

  Returns:
    The number of images that could not be read.
  """
  paths = expand_images(images)
  if workdir is not None:
    results = _trained_predictions(paths, workdir, top, batch_size, checkpoint)
  elif checkpoint is not None:
    raise UserError("--checkpoint picks a checkpoint of a trained run; add --workdir DIR")
  else:
    results = _imagenet_predictions(paths, model, weights, top, batch_size)
  failed = 0
  for result in results:
    if result.error is None:
      print(format_predictions(result.image, result.top, as_json=as_json), flush=True)
      continue
    failed += 1
    if as_json:
      print(json.dumps({"image": result.image, "error": result.error}), flush=True)
    else:
      print(f"transfer: error: cannot read image {result.image}: {result.error}",
            file=sys.stderr, flush=True)
  return failed


def predict_imagenet(images: Sequence[str], *, model: str = "vgg16", weights: str = "keras:vgg16",
                     top: int = 5, batch_size: int = BATCH) -> list[Prediction]:
  """Top-`top` ImageNet classes of each image.

  Args:
    images: image file paths.
    model: registry name; built with the ImageNet top.
    weights: weights with the ImageNet top; they also decide the preprocessing and the eval
      geometry (squash, or short-side resize and center crop, and the input size and filter:
      `preprocess.eval_geometry`).
    top: classes per image.
    batch_size: images decoded and classified per forward pass.

  Returns:
    One `Prediction` per image in input order: `top` is
    `[{"class": int, "label": str, "prob": float}, ...]`, or None with `error` saying why the
    file could not be read.
  """
  return list(_imagenet_predictions(list(images), model, weights, top, batch_size))


def predict_trained(images: Sequence[str], workdir: str, *, top: int = 5,
                    checkpoint: str | int | None = "latest",
                    batch_size: int = BATCH) -> list[Prediction]:
  """Top classes of each image under a run trained by `transfer train`.

  The model, class names, input size, eval crop and preprocessing come from the checkpoint's
  metadata, so images go through exactly the transform the run was validated with. A run
  trained with `ema_decay` > 0 predicts with its EMA params (`ema.serving_variables`).

  Args:
    images: image file paths.
    workdir: the run directory.
    top: classes per image (capped at the run's class count).
    checkpoint: "latest" (or None), "best" or a step (see `checkpoint.load_trained`).
    batch_size: images decoded and classified per forward pass.

  Returns:
    One `Prediction` per image in input order, as `predict_imagenet`.
  """
  return list(_trained_predictions(list(images), workdir, top, batch_size, checkpoint))


def _imagenet_predictions(paths, model, weights, top, batch_size) -> Iterator[Prediction]:
  """`predict_imagenet`, one result at a time (checks and loading happen before the first)."""
  from transfer.predictor import Predictor
  _check_counts(top, batch_size)
  predictor = Predictor.from_pretrained(model, weights, batch_size=batch_size)
  if predictor.report is not None and predictor.report.fresh:
    print(f"transfer: warning: {predictor.report.summary()}; predictions are meaningless",
          file=sys.stderr)
  return predictor.predictions(paths, top)


def _trained_predictions(paths, workdir, top, batch_size, checkpoint) -> Iterator[Prediction]:
  """`predict_trained`, one result at a time (checks and loading happen before the first)."""
  from transfer.predictor import Predictor
  _check_counts(top, batch_size)
  return Predictor.from_workdir(workdir, checkpoint, batch_size=batch_size,
                                announce="predict").predictions(paths, top)


def _check_counts(top: int, batch_size: int) -> None:
  if top < 1:
    raise UserError(f"--top must be >= 1, got {top}")
  if batch_size < 1:
    raise UserError(f"--batch_size must be >= 1, got {batch_size}")


def expand_images(args: Sequence[str]) -> list[str]:
  """The image files named by IMAGE arguments: files as given, folders walked recursively.

  A folder contributes, in sorted path order, every file under it whose extension Pillow reads,
  skipping hidden files and folders (`.DS_Store`, `.git`, ...). Files given by name are kept
  whatever their extension, missing ones too: they are reported in their place, not here.

  Raises:
    UserError: a folder holds no image files.
  """
  paths = []
  for arg in args:
    if not os.path.isdir(arg):
      paths.append(arg)
      continue
    found = _images_under(arg)
    if not found:
      raise UserError(f"no image files under {arg}; pass image files or a folder holding "
                      f".jpg, .png, ... files")
    paths += found
  return paths


def _images_under(root: str) -> list[str]:
  extensions = image_extensions()
  found = []
  for folder, subfolders, files in os.walk(root):
    subfolders[:] = [d for d in subfolders if not d.startswith(".")]
    found += [os.path.join(folder, f) for f in files
              if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions]
  return sorted(found)


@functools.lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
  """File extensions (`.jpg`, ...) Pillow can open; save-only formats (PDF) are left out."""
  from PIL import Image
  # MPO (multi-picture JPEG) has no opener of its own: the JPEG plugin opens it.
  return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                   if fmt in Image.OPEN or fmt == "MPO")


def make_forward(net) -> Callable:
  """A jitted `(params, images) -> (N, classes) numpy probabilities` for `net`.

  `params` may also be the variables dict of a BatchNorm network. Softmax over the logits; a
  single logit (binary sigmoid head) gives two columns, [P(class 0), P(class 1)]. Built once per
  run so every batch reuses one compilation.
  """
  import jax
  from transfer import losses, train_state

  def probabilities(p, x):
    return losses.probabilities(net.apply(train_state.as_variables(p), x))

  jitted = jax.jit(probabilities)
  return lambda params, x: np.asarray(jitted(params, x), np.float32)


def pad(x: np.ndarray, n: int) -> np.ndarray:
  """`x` with zero images appended up to `n`, so every batch has one shape (one compilation)."""
  if len(x) >= n:
    return x
  return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])


def load_images(paths: Sequence[str], size: int, resize_size: int | None = None,
                interpolation: str = "bilinear") -> np.ndarray:
  """Decodes image files to RGB, `size` x `size`, in one eval geometry (see `load_image`).

  Returns:
    uint8 array of shape (N, size, size, 3).

  Raises:
    UnreadableImage: a file is missing or not a readable image (the message names it).
  """
  return np.stack([load_image(p, size, resize_size, interpolation) for p in paths])


def load_image(path: str, size: int, resize_size: int | None = None,
               interpolation: str = "bilinear", min_side: int = 0) -> np.ndarray:
  """One image file as a (size, size, 3) uint8 RGB array, in the weights' eval geometry.

  `decode_image`, then (`preprocess.eval_image`): `resize_size=None` squashes the whole image
  to `size` x `size` with antialiased bilinear, the geometry of Keras' loaders (whose
  `load_img` defaults to nearest neighbour: we filter, as our training pipeline does); a
  number resizes the short side to it and center-crops, torchvision's eval transform
  (`preprocess.eval_geometry` says which one a weight source was validated with, and its
  filter: `interpolation`, bilinear or timm's bicubic). `transfer.weights.transform` applies
  the same to arrays.

  Args:
    path, size, resize_size, interpolation: as above.
    min_side: as for `decode_image`.

  Raises:
    UnreadableImage: the file is missing or not a readable image; `reason` says which.
  """
  from transfer.weights.preprocess import eval_image
  return eval_image(decode_image(path, min_side), size, resize_size, interpolation)


def decode_image(path: str, min_side: int = 0):
  """An image file as an RGB PIL image, decoded by `transfer.data.images.open_file`, the decode
  training and eval use (EXIF orientation, transparency onto white, 16-bit, CMYK, palette,
  grayscale), so an image is the same picture here as in training.

  Args:
    path: the file.
    min_side: decode JPEGs at the smallest scale at least this large, as the data pipeline
      does for its stored images (`open_file`); 0 (the frameworks' way) decodes in full.

  Raises:
    UnreadableImage: the file is missing or not a readable image; `reason` says which.
  """
  from PIL import Image, UnidentifiedImageError

  from transfer.data import images as image_ops
  try:
    return image_ops.open_file(path, min_side)  # Decodes: a damaged file fails here.
  except FileNotFoundError:
    raise UnreadableImage(path, "no such file") from None
  except IsADirectoryError:
    raise UnreadableImage(path, "is a directory") from None
  except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
          SyntaxError) as e:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UnreadableImage(path, reason) from None


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
