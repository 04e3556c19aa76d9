"""Porting a weight file onto a model: names, layouts, and a strict merge.

Two steps, both pure apart from reading the file:
  1. `model_view` renames a `WeightFile`'s layers to our layer names and converts layouts, lazily:
     Keras already stores HWIO conv kernels and (in, out) dense kernels, as Flax does; torch stores
     OIHW and (out, in), and the first classifier layer of a flatten top (VGG) expects torch's
     C,H,W flatten order, so its input rows are permuted to our H,W,C order. A torch BatchNorm's
     `weight`, `bias`, `running_mean`, `running_var` become Flax's `scale`, `bias` (params) and
     `mean`, `var` (batch_stats); its `num_batches_tracked` counter is dropped.
  2. `plan_merge` compares that view with the model's parameter shapes and decides, layer by layer,
     what is loaded, what stays freshly initialised (only an explicitly fresh head), what is
     ignored (the file's ImageNet top when the model has another head) and what is wrong. Anything
     wrong becomes one `UserError` naming every problem and the likely cause.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from transfer import models
from transfer.errors import UserError
from transfer.weights.formats import Tensor, WeightFile

_TORCH_FORMATS = ("torch_pth", "safetensors")
# torch parameter/buffer names -> ours. A torch module is a BatchNorm when it has running
# statistics; its `bias` stays `bias` (params) while `mean` and `var` belong in `batch_stats`.
_TORCH_PARAMS = {"weight": "kernel", "bias": "bias"}
_TORCH_BATCH_NORM = {"weight": "scale", "bias": "bias", "running_mean": "mean",
                     "running_var": "var"}
# A step counter torch keeps for momentum=None; nothing in Flax uses it, and a file may lack it.
_TORCH_DROPPED = ("num_batches_tracked",)


def model_view(wf: WeightFile, spec: models.ModelSpec) -> dict[str, dict[str, Tensor]]:
  """The file's layers under our names, each as param name -> `Tensor`.

  Param names are Flax's: `kernel`, `bias` for convs and dense layers; `scale`, `bias`, `mean`,
  `var` for BatchNorm, where `mean` and `var` belong in the `batch_stats` collection.

  Args:
    wf: an open weight file.
    spec: the model spec whose naming (Keras names, torchvision prefixes) to apply.

  Returns:
    Our layer name -> param -> a `Tensor` whose shape and data are in our layout. File layers with
    no counterpart keep their file name, so they show up as unexpected.
  """
  if wf.format in _TORCH_FORMATS:
    return _torch_view(wf, spec)
  return {layer: _keras_params(tensors) for layer, tensors in wf.layers.items()}


def _keras_params(tensors: list[Tensor]) -> dict[str, Tensor]:
  """Kernel and bias by rank, since dataset names differ between Keras versions."""
  kernels = [t for t in tensors if len(t.shape) >= 2]
  biases = [t for t in tensors if len(t.shape) == 1]
  if len(kernels) <= 1 and len(biases) <= 1 and len(kernels) + len(biases) == len(tensors):
    return {**{"kernel": t for t in kernels}, **{"bias": t for t in biases}}
  return {t.name.rsplit("/", 1)[-1].split(":")[0]: t for t in tensors}


def _torch_view(wf: WeightFile, spec: models.ModelSpec) -> dict[str, dict[str, Tensor]]:
  """A torch state dict's modules under our names, in our layouts (see `model_view`)."""
  ours = {prefix: name for name, prefix in spec.torch_names.items()}
  # Only a flatten top (VGG) reads torch's C,H,W flatten order; after global pooling (ResNet)
  # the fc's input rows are just channels, in the same order as ours.
  first_fc = spec.top_layers[0] if spec.top_layers and spec.top_fixed_size else None
  side = spec.top_image_size // spec.feature_stride
  view = {}
  for prefix, tensors in wf.layers.items():
    layer = ours.get(prefix, prefix)
    by_kind = {t.name.rsplit(".", 1)[-1]: t for t in tensors}
    by_kind = {k: t for k, t in by_kind.items() if k not in _TORCH_DROPPED}
    if not by_kind:
      continue
    names = _TORCH_BATCH_NORM if "running_mean" in by_kind else _TORCH_PARAMS
    view[layer] = {names.get(kind, kind): _torch_tensor(
        t, flatten_side=side if layer == first_fc else None) for kind, t in by_kind.items()}
  return view


def _torch_tensor(t: Tensor, flatten_side: int | None) -> Tensor:
  """`t` converted to our layout: OIHW -> HWIO, (out, in) -> (in, out), C,H,W rows -> H,W,C."""
  if len(t.shape) == 4:
    o, i, h, w = t.shape
    return Tensor(t.name, (h, w, i, o), lambda: np.transpose(t.read(), (2, 3, 1, 0)))
  if len(t.shape) == 2:
    out, inp = t.shape
    if flatten_side and inp % (flatten_side * flatten_side) == 0:
      return Tensor(t.name, (inp, out), lambda: _chw_to_hwc_rows(t.read(), flatten_side))
    return Tensor(t.name, (inp, out), lambda: np.ascontiguousarray(t.read().T))
  return t


def _chw_to_hwc_rows(weight: np.ndarray, side: int) -> np.ndarray:
  """A torch Linear weight fed by a C,H,W flatten -> our (in, out) kernel fed by H,W,C."""
  out, inp = weight.shape
  channels = inp // (side * side)
  w = weight.reshape(out, channels, side, side).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(w.reshape(out, inp).T)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a merge does with each layer; the file fits when `problems` is False."""

  loaded: tuple[str, ...]
  fresh: tuple[str, ...]
  ignored: tuple[str, ...]
  missing: tuple[str, ...]
  unexpected: tuple[str, ...]
  misshaped: tuple[str, ...]

  @property
  def problems(self) -> bool:
    return bool(self.missing or self.unexpected or self.misshaped)


def param_shapes(model, image_size: int) -> dict[str, Any]:
  """The model's params as a tree of `jax.ShapeDtypeStruct`, without allocating anything."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)["params"]


def head_layers(shapes: dict[str, Any], spec: models.ModelSpec) -> tuple[str, ...]:
  """Top-level layers of the model that are not backbone convs: its head."""
  return tuple(name for name in shapes if name not in spec.conv_layers)


def plan_merge(shapes: dict[str, Any], view: dict[str, dict[str, Tensor]], *,
               fresh: tuple[str, ...] = (), ignorable: tuple[str, ...] = ()) -> Plan:
  """Decides layer by layer how `view` (a file under our names) fills `shapes`.

  Args:
    shapes: the model's param shapes (`param_shapes`).
    view: `model_view` of the file.
    fresh: model layers to keep freshly initialised (a new head); a copy in the file is ignored.
    ignorable: file layers the model may lack without error (the file's ImageNet top when the
      model has another head).

  Returns:
    A `Plan`; a layer is loaded only when every one of its params is present with its shape.
  """
  loaded, fresh_out, ignored, missing, unexpected, misshaped = [], [], [], [], [], []
  for layer, params in shapes.items():
    if layer in fresh:
      fresh_out.append(layer)
      continue
    if layer not in view:
      missing.append(layer)
      continue
    flat = _flatten(params)
    problems = len(missing) + len(misshaped) + len(unexpected)
    for name, want in flat.items():
      got = view[layer].get(name)
      if got is None:
        missing.append(f"{layer}/{name}")
      elif tuple(got.shape) != tuple(want.shape):
        misshaped.append(f"{layer}/{name} file {tuple(got.shape)} vs model {tuple(want.shape)}")
    unexpected.extend(f"{layer}/{name}" for name in view[layer] if name not in flat)
    if problems == len(missing) + len(misshaped) + len(unexpected):
      loaded.append(layer)
  for layer in view:
    if layer in shapes:
      if layer in fresh:
        ignored.append(layer)
    elif layer in ignorable:
      ignored.append(layer)
    else:
      unexpected.append(layer)
  return Plan(tuple(loaded), tuple(fresh_out), tuple(ignored), tuple(missing),
              tuple(unexpected), tuple(misshaped))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flatten(value, f"{prefix}/{key}" if prefix else key))
  return out


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def read_layers(view: dict[str, dict[str, Tensor]], shapes: dict[str, Any],
                layers: tuple[str, ...]) -> dict[str, Any]:
  """Reads `layers` from the file into arrays of the model's dtypes, nested like the params."""
  out = {}
  for layer in layers:
    flat = _flatten(shapes[layer])
    out[layer] = _unflatten({name: jnp.asarray(view[layer][name].read(), dtype=want.dtype)
                             for name, want in flat.items()})
  return out


def mismatch_error(plan: Plan, *, source: str, arch: str, cause: str | None) -> UserError:
  """One error naming every missing, unexpected and mis-shaped name, and the likely cause."""
  parts = [f"weights {source} do not fit model {arch}"]
  if cause:
    parts.append(f"likely cause: {cause}")
  for label, items in (("missing", plan.missing), ("unexpected", plan.unexpected),
                       ("mis-shaped", plan.misshaped)):
    if items:
      parts.append(f"{label} ({len(items)}): {', '.join(items)}")
  return UserError("; ".join(parts))


def likely_cause(view_for: Callable[[models.ModelSpec], dict[str, dict[str, Tensor]]],
                 plan: Plan, spec: models.ModelSpec, head: str) -> str | None:
  """A best guess at why a file does not fit, for the error message.

  Args:
    view_for: spec -> the file under that spec's names (torch prefixes differ per architecture).
    plan: the failed plan for the model.
    spec: the model's spec.
    head: the model's head name.

  Returns:
    A short phrase, or None when nothing stands out.
  """
  guess = guess_arch(view_for)
  if guess and guess != spec.name:
    return f"this is a {guess} file, model is {spec.name}"
  view = view_for(spec)
  top_missing = [t for t in spec.top_layers if t in plan.missing]
  if head == "imagenet" and top_missing and not any(t in view for t in spec.top_layers):
    return ("the file has no ImageNet top (a _notop file): pick a model with a new head "
            "(e.g. head='flatten_dense') or pass fresh_head=True")
  if head == "imagenet" and any(m.startswith("predictions/") for m in plan.misshaped):
    return "the file's top has another number of classes: pass fresh_head=True for a new top"
  if not any(layer in view for layer in spec.conv_layers):
    return f"the file holds none of {spec.name}'s layers (is it a VGG weight file?)"
  return None


def guess_arch(view_for: Callable[[models.ModelSpec], dict[str, dict[str, Tensor]]]) -> str | None:
  """The registered architecture whose backbone the file matches exactly, if exactly one does."""
  matches = []
  for name in models.names():
    spec = models.spec(name)
    view = view_for(spec)
    if set(view) - set(spec.top_layers) != set(spec.conv_layers):
      continue
    shapes = _backbone_shapes(name)
    if all(p in view[layer] and tuple(view[layer][p].shape) == tuple(s.shape)
           for layer in shapes for p, s in _flatten(shapes[layer]).items()):
      matches.append(name)
  return matches[0] if len(matches) == 1 else None


@functools.lru_cache(maxsize=None)
def _backbone_shapes(name: str) -> dict[str, Any]:
  return param_shapes(models.get(name, head="none"), models.spec(name).min_image_size)
