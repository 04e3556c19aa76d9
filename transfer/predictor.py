"""`Predictor`: class probabilities of images from Python, the path `transfer predict` takes.

    predictor = transfer.Predictor.from_workdir("workdirs/cats_vs_dogs", checkpoint="best")
    probs = predictor.predict(["cat.jpg", "dog.jpg"])          # (2, classes) float32
    best = predictor.top(np.asarray(Image.open("cat.jpg")), k=1)  # [[{"class", "label", "prob"}]]
    imagenet = transfer.Predictor.from_pretrained("vgg16", weights="keras:vgg16")

A predictor holds a model, the variables it serves with, its eval preprocessing (a
`transfer.weights.DataConfig`: the run's recorded one for a workdir, the weights' own for
pretrained weights) and the class names. `transfer predict` is this class plus printing, so the
numbers are the same. Images are classified `batch_size` at a time, each batch padded to one
shape, so a predictor compiles once for all its calls.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np

from transfer import predict as predict_lib
from transfer.errors import UserError


class Predictor:
  """Images -> class probabilities for one model (see the module docstring).

  Attributes:
    model: the unbound linen module (float32 compute).
    variables: what it serves with (a run's EMA params when it kept them).
    transform: the eval preprocessing (`transfer.weights.Transform`); `transform.config` says
      what it does.
    class_names: the name of each output class, or None (classes named by index).
    batch_size: images decoded and classified per forward pass.
    report: the `weights.LoadReport` of pretrained weights (None for a workdir).
    workdir, step: the run and checkpoint step a workdir predictor serves (else None).
  """

  def __init__(self, model, variables, data_config, class_names: Sequence[str] | None = None,
               *, batch_size: int = predict_lib.BATCH):
    from transfer import weights as weights_lib
    if batch_size < 1:
      raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    self.model, self.variables = model, variables
    self.transform = weights_lib.transform(data_config)
    self.class_names = tuple(class_names) if class_names is not None else None
    self.batch_size = batch_size
    self.report = None
    self.workdir = self.step = None
    self._forward = predict_lib.make_forward(model)

  @classmethod
  def from_workdir(cls, workdir: str, checkpoint: str | int | None = "latest", *,
                   batch_size: int = predict_lib.BATCH,
                   announce: str | None = None) -> "Predictor":
    """A run trained by `transfer train`, rebuilt from one checkpoint (`assembly.Run`).

    The model, class names, input size, eval crop and preprocessing come from the checkpoint's
    metadata, so images go through exactly the transform the run was validated with; a run
    trained with `ema_decay` > 0 predicts with its EMA params.

    Args:
      workdir: the run directory.
      checkpoint: "latest" (or None), "best" or a step number.
      batch_size: images per forward pass.
      announce: a command name: print which step was read on stderr (`predict: checkpoint
        step 94 (latest)`).

    Raises:
      UserError: no checkpoint there that restores, or an unknown step.
    """
    from transfer import assembly, ema
    from transfer.weights.preprocess import run_data_config
    run = assembly.Run.from_checkpoint(workdir, checkpoint, dtype="float32", announce=announce)
    predictor = cls(run.model, ema.serving_variables(run.variables),
                    run_data_config(run.metadata), run.metadata["class_names"],
                    batch_size=batch_size)
    predictor.workdir, predictor.step = workdir, run.step
    return predictor

  @classmethod
  def from_pretrained(cls, name: str, weights: str, *,
                      batch_size: int = predict_lib.BATCH) -> "Predictor":
    """A pretrained network with its ImageNet top, at the weights' own eval geometry (their
    input size where the top takes any: timm's A1 ResNets 288, InceptionV3 299).

    Args:
      name: the registered model (`vgg16`, `resnet50`, ...).
      weights: a registry id or file holding the ImageNet top.
      batch_size: images per forward pass.

    Raises:
      UserError: unknown model or id, weights without the top or of another architecture.
    """
    from transfer import models
    from transfer.factory import IMAGENET_CLASSES, create_model
    from transfer.weights import sources
    from transfer.weights.preprocess import resolve_data_config
    spec = models.spec(name)
    source = sources.resolve(weights)  # parsed once: geometry, variant, preprocessing
    if source.source is None:
      raise UserError("predicting ImageNet classes needs pretrained weights; pass --weights")
    config = resolve_data_config(
        source, spec.top_image_size if spec.top_fixed_size else None)
    if source.include_top is False:
      raise UserError(f"weights {source.source} hold no ImageNet top, so they cannot predict "
                      f"ImageNet classes; use weights with the top (e.g. without _notop)")
    model, variables, report = create_model(name, weights, include_top=True,
                                            image_size=config.input_size, return_report=True)
    labels = predict_lib.imagenet_labels() if model.num_classes == IMAGENET_CLASSES else None
    predictor = cls(model, variables, config, labels, batch_size=batch_size)
    predictor.report = report
    return predictor

  def predict(self, images) -> np.ndarray:
    """Class probabilities of each image.

    Args:
      images: image file paths, uint8 RGB arrays (one (H, W, 3), a (N, H, W, 3) batch, or a
        list of any sizes) or PIL images; each is resized and cropped as `transform` says.

    Returns:
      float32 (N, classes): softmax, or [P(class 0), P(class 1)] for a one-logit head.

    Raises:
      UnreadableImage (a UserError): a file that is missing or does not decode.
    """
    items = self._items(images)
    width = min(self.batch_size, len(items))
    out = [self._classify(np.stack([self._decode(i) for i in items[s:s + self.batch_size]]),
                          width) for s in range(0, len(items), self.batch_size)]
    return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)

  __call__ = predict

  def top(self, images, k: int = 5) -> list[list[dict]]:
    """The `k` most probable classes of each image: `[{"class", "label", "prob"}, ...]`."""
    return predict_lib.top_k(self.predict(images), k, self.class_names)

  def predictions(self, paths: Sequence[str], top: int = 5) -> Iterator[predict_lib.Prediction]:
    """One `Prediction` per file, in order, a batch at a time; an unreadable file carries why
    (its `error`) and the others are still classified: what `transfer predict` prints."""
    if top < 1:
      raise UserError(f"--top must be >= 1, got {top}")
    paths = list(paths)
    width = min(self.batch_size, len(paths))
    for start in range(0, len(paths), self.batch_size):
      chunk = paths[start:start + self.batch_size]
      decoded, errors = [], []
      for path in chunk:
        try:
          decoded.append(self._decode(path))
          errors.append(None)
        except predict_lib.UnreadableImage as e:
          errors.append(e.reason)
      best = iter(())
      if decoded:
        best = iter(predict_lib.top_k(self._classify(np.stack(decoded), width), top,
                                      self.class_names))
      for path, error in zip(chunk, errors):
        yield (predict_lib.Prediction(path, None, error) if error is not None
               else predict_lib.Prediction(path, next(best)))

  @property
  def num_classes(self) -> int:
    """Columns of `predict` (2 for a one-logit sigmoid head)."""
    return max(self.model.num_classes, 2)

  def _items(self, images) -> list[Any]:
    single = (isinstance(images, (str, os.PathLike)) or hasattr(images, "getbands")
              or isinstance(images, np.ndarray) and images.ndim == 3)
    return [images] if single else list(images)

  def _decode(self, item) -> np.ndarray:
    """One image (a path, an array or a PIL image) as uint8 model input, before normalising."""
    if isinstance(item, (str, os.PathLike)):
      item = predict_lib.decode_image(os.fspath(item), self.transform.config.decode_min_side)
    return self.transform.geometry(item)

  def _classify(self, x: np.ndarray, width: int) -> np.ndarray:
    """Probabilities of a uint8 batch, padded to `width` rows so every batch has one shape."""
    from transfer import weights as weights_lib
    x = weights_lib.preprocess(x, self.transform.config.mode)
    return self._forward(self.variables, predict_lib.pad(x, width))[:len(x)]
