"""Keras files whose layer names Keras generates (InceptionV3: `conv2d_17`, numbered per process):
their layers are matched to ours by kind and position, as Keras itself loads the official files,
in the order `spec.port.keras_order` lists ours; `order_problem` names the first block that does
not fit. Names play no part. Used by `transfer.weights.port`.
"""

from __future__ import annotations

from typing import Any, Callable

from transfer import models
from transfer.weights.formats import Tensor


# The kinds a Keras file's layers are matched by, in order, where Keras generates their names.
_ORDERED_KINDS = (models.CONV, models.BATCH_NORM)


def _keras_file_kind(params: dict[str, Any]) -> str | None:
  """The kind of a Keras file's layer, from what the file says: a BatchNormalization's arrays
  carry their names (`moving_mean`, ..., read into `mean`, `var` by `port.model_view`), a Conv2D
  holds a 4-D kernel. The model's side of the match reads its declared kinds instead."""
  if params.keys() & {"mean", "var"}:
    return models.BATCH_NORM
  kernel = params.get("kernel")
  return models.CONV if kernel is not None and len(kernel.shape) == 4 else None


def _by_kind(layers, kind_of: Callable[[str], str | None]) -> dict[str, list[str]]:
  """`layers` in their order, grouped by the kinds matched by position."""
  kinds: dict[str, list[str]] = {k: [] for k in _ORDERED_KINDS}
  for layer in layers:
    kind = kind_of(layer)
    if kind in kinds:
      kinds[kind].append(layer)
  return kinds


def names_by_order(view: dict[str, dict[str, Tensor]],
                   spec: models.ModelSpec) -> dict[str, str]:
  """File layer -> our layer for a model whose Keras layer names are generated.

  The file's conv layers, in the file's order (`formats` keeps Keras' `model.layers` order),
  are the model's conv layers in `spec.port.keras_order`, one for one; its BatchNorm layers
  likewise (the model's kinds as declared, the file's as its arrays say).
  Names play no part: `conv2d_1` in a Keras 2 file and `conv2d` in a Keras 3 one are the same
  layer when they stand in the same place. Surplus layers keep their file names (unexpected);
  shapes are checked by the merge, and `order_problem` says which block is out of place.
  """
  ours = _by_kind(spec.port.keras_order, spec.kind)
  theirs = _by_kind(view, lambda layer: _keras_file_kind(view[layer]))
  return {file_layer: our_layer for kind in ours
          for file_layer, our_layer in zip(theirs[kind], ours[kind])}


def order_problem(view_for: Callable[[models.ModelSpec], dict[str, dict[str, Tensor]]],
                  spec: models.ModelSpec,
                  backbone_layers: Callable[[str], dict[str, dict[str, Any]]]) -> str | None:
  """For a model matched by order (`spec.port.keras_order`), the first block whose layers the file
  holds in another order, number or shape, as `"mixed3: ..."`; None when every block fits.

  Blocks are taken in forward order; layers after the first misfit have shifted, so only that
  block is named.
  """
  if spec.port.keras_order is None or not spec.blocks:
    return None
  shapes = backbone_layers(spec.name)
  view = view_for(spec)
  for block in spec.blocks:
    for kind in _ORDERED_KINDS:
      layers = [n for n in spec.port.keras_order if _block(n, spec.blocks) == block
                and spec.kind(n) == kind]
      got = [_signature(view.get(n), kind) for n in layers]
      want = [_signature(shapes[n], kind) for n in layers]
      if got != want:
        what = {models.CONV: "convolution", models.BATCH_NORM: "BatchNorm"}[kind]
        return (f"{block}: the file's {what} layers in that place do not fit the model's "
                f"(file {_shape_list(got)}, model {_shape_list(want)}); Keras generates these "
                f"layers' names, so they are matched by kind and order: is the file for "
                f"another architecture, or written with its layers in another order?")
  return None


def _block(layer: str, blocks: tuple[str, ...]) -> str | None:
  return next((b for b in blocks if layer.startswith(f"{b}_")), None)


def _signature(params: dict[str, Any] | None, kind: str) -> tuple[int, ...] | None:
  """The shape that identifies a layer of `kind`: a conv's kernel, a BatchNorm's mean."""
  if params is None:
    return None
  t = params.get("kernel" if kind == models.CONV else "mean")
  return None if t is None else tuple(t.shape)


def _shape_list(shapes: list[tuple[int, ...] | None]) -> str:
  return "[" + ", ".join("none" if s is None else "x".join(map(str, s)) for s in shapes) + "]"
