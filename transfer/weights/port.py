"""Porting a weight file onto a model: names, layouts, and a strict merge.

Two steps, both pure apart from reading the file:
  1. `model_view` renames a `WeightFile`'s layers to our layer names and converts layouts, lazily:
     Keras already stores HWIO conv kernels and (in, out) dense kernels, as Flax does; torch stores
     OIHW and (out, in), and the first classifier layer of a flatten top (VGG) expects torch's
     C,H,W flatten order, so its input rows are permuted to our H,W,C order. A BatchNorm layer's
     four arrays become `scale`, `bias` (Flax `params`) and `mean`, `var` (Flax `batch_stats`);
     torch's `num_batches_tracked` counter is dropped.
  2. `plan_merge` (`transfer.weights.merge`) compares that view with the model's shapes and
     decides, layer by layer, what is loaded, what stays freshly initialised (only an explicitly
     fresh head), what is ignored (the file's ImageNet top when the model has another head) and
     what is wrong. Anything wrong becomes one `UserError` naming every problem and the likely
     cause.

The merge works on layers, not collections: `by_layer` puts a BatchNorm's running statistics
beside its scale and bias, as every weight file stores them, so a file without the statistics is
missing part of that layer; `by_collection` splits the result back into `params`/`batch_stats`.

Architectures built in several variants (ResNet: Keras v1, torchvision v1.5; InceptionV3) take
a file only in the variant of the file's framework; `check_variant` says which one, since shapes
cannot show it.

What differs between architecture families is data, read from the spec: each layer's declared
kind (`spec.layer_kinds`: a torch `weight` is a conv or dense `kernel`, a BatchNorm or LayerNorm
`scale`, an embedding's table) and the family's porting adapter (`spec.port`: torch names, parts
the model leaves out, the layer a C,H,W flatten feeds, and for Keras files with generated names
(InceptionV3: `conv2d_17`, numbered per process) the order Keras lists the layers in, matched by
kind and position as Keras itself loads the official files (`keras_order`, whose `order_problem`
names the first block that does not fit). Nothing here names a model or a family.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import numpy as np

from transfer import models
from transfer.errors import UserError
from transfer.weights import formats, keras_order
from transfer.weights.formats import Tensor, WeightFile
# The merge is its own module; its names stay importable from here, where callers found them.
from transfer.weights.merge import (Plan, by_collection, by_layer, fit_view,  # noqa: F401
                                    flatten, mismatch_error, param_shapes, plan_merge,
                                    read_layers, variable_shapes)

_TORCH_FORMATS = ("torch_pth", "safetensors")
# Formats read only through a family's converter (`spec.port.convert`) into its torch names:
# Google's `.npz` ViTs (Flax paths and layouts).
_CONVERTED_FORMATS = ("npz",)
# Keras' BatchNormalization variables -> ours (Flax: params scale/bias, batch_stats mean/var).
_KERAS_BATCH_NORM = {"gamma": "scale", "beta": "bias", "moving_mean": "mean",
                     "moving_variance": "var"}
# The variable's name at the end of a dataset name: `conv1_bn/gamma:0` (Keras 2, tf_keras),
# `conv1_bn/gamma` (Keras 3's legacy writer), `bn_conv1_gamma_1:0` (Keras 1), `gamma` (our
# reading of Keras 3's positional `.weights.h5`, see `formats`).
_KERAS_BATCH_NORM_NAME = re.compile(r"(?:^|[/_])(gamma|beta|moving_mean|moving_variance)"
                                    r"(?:_\d+)?(?::\d+)?$")
# Which variant of a multi-variant architecture a file's framework publishes.
_FORMAT_VARIANT = {"keras_h5": "keras", "keras3_h5": "keras", "torch_pth": "torchvision",
                   "safetensors": "torchvision"}
# torch parameter/buffer names -> ours, by the layer's declared kind. A BatchNorm's `bias` stays
# `bias` (params) while `mean` and `var` belong in `batch_stats`.
_TORCH_PARAMS = {"weight": "kernel", "bias": "bias"}
_TORCH_BATCH_NORM = {"weight": "scale", "bias": "bias", "running_mean": "mean",
                     "running_var": "var"}
_TORCH_BY_KIND = {models.CONV: _TORCH_PARAMS, models.DENSE: _TORCH_PARAMS,
                  models.BATCH_NORM: _TORCH_BATCH_NORM,
                  models.LAYER_NORM: {"weight": "scale", "bias": "bias"},
                  models.EMBEDDING: {"weight": "embedding"}}
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
  if wf.format in _TORCH_FORMATS + _CONVERTED_FORMATS:
    return _torch_view(torch_layers(wf, spec), spec)
  view = {layer: _keras_params(tensors) for layer, tensors in wf.layers.items()}
  if spec.port.keras_order is None:
    return view
  names = keras_order.names_by_order(view, spec)
  return {names.get(layer, layer): params for layer, params in view.items()}


def model_names(wf: WeightFile, spec: models.ModelSpec) -> dict[str, str]:
  """File layer -> our layer name under `spec` (a layer it does not rename keeps its name)."""
  if wf.format in _TORCH_FORMATS + _CONVERTED_FORMATS:
    ours = {prefix: name for name, prefix in spec.port.torch_names.items()}
    file_layer = {t.name: layer for layer, tensors in wf.layers.items() for t in tensors}
    names = {}
    for prefix, tensors in torch_layers(wf, spec).items():
      for t in tensors:  # a converted tensor names the file keys it came from
        for key in t.sources or (t.name,):
          names.setdefault(file_layer.get(key, key), ours.get(prefix, prefix))
    return {layer: names.get(layer, layer) for layer in wf.layers}
  names = {}
  if spec.port.keras_order is not None:
    view = {layer: _keras_params(tensors) for layer, tensors in wf.layers.items()}
    names = keras_order.names_by_order(view, spec)
  return {layer: names.get(layer, layer) for layer in wf.layers}


def ignored_parts(view: dict[str, dict[str, Tensor]], spec: models.ModelSpec) -> tuple[str, ...]:
  """File layers of parts the model leaves out by design (`spec.port.torch_ignored`, e.g.
  torchvision's auxiliary classifier `AuxLogits.*`): ignored, never an error."""
  return tuple(layer for layer in view
               if any(layer == p or layer.startswith(f"{p}.") for p in spec.port.torch_ignored))


def _keras_params(tensors: list[Tensor]) -> dict[str, Tensor]:
  """Kernel and bias by rank, since dataset names differ between Keras versions.

  A BatchNormalization layer holds four 1-D arrays that rank cannot tell apart (and that must not
  be confused: a swapped mean and variance still has the right shapes), so its arrays are taken
  by their names (`gamma`, `beta`, `moving_mean`, `moving_variance`), never by position or rank.
  """
  names = [_KERAS_BATCH_NORM_NAME.search(t.name) for t in tensors]
  if any(names):
    return {_KERAS_BATCH_NORM[m.group(1)] if m else _last_name(t): t
            for m, t in zip(names, tensors)}
  kernels = [t for t in tensors if len(t.shape) >= 2]
  biases = [t for t in tensors if len(t.shape) == 1]
  if len(kernels) <= 1 and len(biases) <= 1 and len(kernels) + len(biases) == len(tensors):
    return {**{"kernel": t for t in kernels}, **{"bias": t for t in biases}}
  return {_last_name(t): t for t in tensors}


def _last_name(t: Tensor) -> str:
  """`block1_conv1/kernel:0` -> `kernel`: how an unrecognised array shows up as unexpected."""
  return t.name.rsplit("/", 1)[-1].split(":")[0]


def torch_layers(wf: WeightFile, spec: models.ModelSpec) -> dict[str, list[Tensor]]:
  """A torch (or converted) file's modules under the family's torch names: the file's own for
  families that read torch files as they are, else renamed by the family's adapter
  (`spec.port.convert`: torchvision's, DINOv2's or Google's ViT files under timm's names)."""
  if spec.port.convert is None:
    return wf.layers if wf.format in _TORCH_FORMATS else {}
  flat = {t.name: t for tensors in wf.layers.values() for t in tensors}
  return formats.by_prefix(spec.port.convert(wf.format, flat))


def dialect(wf: WeightFile, spec: models.ModelSpec) -> str | None:
  """Who wrote a file of `spec`'s family (`spec.port.dialect`), or None."""
  if spec.port.dialect is None:
    return None
  return spec.port.dialect(wf.format, [t.name for ts in wf.layers.values() for t in ts])


def _torch_view(layers: dict[str, list[Tensor]],
                spec: models.ModelSpec) -> dict[str, dict[str, Tensor]]:
  """A torch state dict's modules under our names, in our layouts (see `model_view`).

  A layer's arrays are renamed by its declared kind (`spec.layer_kinds`); a module the model
  does not declare (it shows up as unexpected) is named by what torch stores: running
  statistics make it a BatchNorm.
  """
  ours = {prefix: name for name, prefix in spec.port.torch_names.items()}
  # Only a layer fed by a flatten (VGG's fc1) reads torch's C,H,W flatten order; after global
  # pooling (ResNet) the fc's input rows are just channels, in the same order as ours.
  first_fc, side = spec.port.torch_flatten or (None, None)
  view = {}
  for prefix, tensors in layers.items():
    layer = ours.get(prefix, prefix)
    by_kind = {t.name.rsplit(".", 1)[-1]: t for t in tensors}
    by_kind = {k: t for k, t in by_kind.items() if k not in _TORCH_DROPPED}
    if not by_kind:
      continue
    kind = spec.kind(layer) or (models.BATCH_NORM if "running_mean" in by_kind else models.CONV)
    if kind == models.EMBEDDING and len(by_kind) == 1:  # a bare tensor (`cls_token`, `pos_embed`)
      names = dict.fromkeys(by_kind, "embedding")
    else:
      names = _TORCH_BY_KIND[kind]
    relayout = kind in (models.CONV, models.DENSE)  # norms and embeddings keep torch's layout
    view[layer] = {names.get(name, name): _torch_tensor(
        t, flatten_side=side if layer == first_fc else None) if relayout else t
        for name, t in by_kind.items()}
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


def file_variant(fmt: str, spec: models.ModelSpec) -> str | None:
  """The variant of `spec` a file of format `fmt` fits, or None when the model has one form."""
  variant = _FORMAT_VARIANT.get(fmt)
  return variant if variant in spec.variants else None


def check_variant(source: str, spec: models.ModelSpec, have: str | None,
                  need: str | None, option: str = "variant") -> None:
  """Raises one UserError when a file needs another variant of the model than the one built.

  Variants differ in ways no shape shows (ResNet: where a stage's stride sits, the BatchNorm
  epsilon; InceptionV3: how its average pools count padding), or that shapes show only as a
  hundred missing or unexpected names instead of the one fix; `spec.variant_traits` says what
  a file of each variant is.

  Args:
    source, spec: the weights and the model's spec.
    have, need: the variant built and the one the file needs.
    option: how the caller names the setting, so the fix reads as the user would type it:
      `variant` (Python: `variant='keras'`) or a flag (`--config.variant`: `--config.variant=keras`).
  """
  if need is None or have is None or have == need:
    return
  what = spec.variant_traits.get(need, f"for the {need!r} variant of {spec.name}")
  flag = option.startswith("--")
  spell = lambda v: f"{option}={v}" if flag else f"{option}={v!r}"
  hint = " (or auto, which follows the weights)" if flag else ""
  raise UserError(f"{source} is {what}; the model is {spell(have)}: build it with "
                  f"{spell(need)}{hint}")


def head_layers(shapes: dict[str, Any], spec: models.ModelSpec) -> tuple[str, ...]:
  """Top-level layers of the model that are not backbone convs: its head."""
  return tuple(name for name in shapes if name not in spec.conv_layers)


def likely_cause(view_for: Callable[[models.ModelSpec], dict[str, dict[str, Tensor]]],
                 plan: Plan, spec: models.ModelSpec, head: str,
                 fmt: str | None = None) -> str | None:
  """A best guess at why a file does not fit, for the error message.

  Args:
    view_for: spec -> the file under that spec's names (torch prefixes differ per architecture).
    plan: the failed plan for the model.
    spec: the model's spec.
    head: the model's head name.
    fmt: the file's format; a Keras file of a model matched by order (`spec.port.keras_order`) is
      checked block by block (`order_problem`).

  Returns:
    A short phrase, or None when nothing stands out.
  """
  guess = guess_arch(view_for)
  if guess and guess != spec.name:
    return f"this is a {guess} file, model is {spec.name}"
  misplaced = (keras_order.order_problem(view_for, spec, _backbone_layers)
               if fmt not in _TORCH_FORMATS else None)
  if misplaced:
    return misplaced
  view = view_for(spec)
  top_missing = [t for t in spec.top_layers if t in plan.missing]
  if head == "imagenet" and top_missing and not any(t in view for t in spec.top_layers):
    return ("the file has no ImageNet top (a _notop file): pick a model with a new head "
            "(e.g. head='flatten_dense') or pass fresh_head=True")
  if head == "imagenet" and any(m.startswith("predictions/") for m in plan.misshaped):
    return "the file's top has another number of classes: pass fresh_head=True for a new top"
  if not any(layer in view for layer in spec.conv_layers):
    return (f"the file holds none of {spec.name}'s layers (is it a weight file of another "
            f"architecture? `transfer weights info FILE` says what it holds)")
  return None


def guess_arch(view_for: Callable[[models.ModelSpec], dict[str, dict[str, Tensor]]]) -> str | None:
  """The registered architecture whose backbone the file matches exactly, if exactly one does."""
  matches = []
  for name in models.names():
    spec = models.spec(name)
    view = view_for(spec)
    if set(view) - set(spec.top_layers) - set(ignored_parts(view, spec)) != set(spec.conv_layers):
      continue
    shapes = _backbone_shapes(name)
    view = fit_view(view, shapes, spec)  # a ViT's position embeddings for any grid
    if all(p in view[layer] and tuple(view[layer][p].shape) == tuple(s.shape)
           for layer in shapes for p, s in flatten(shapes[layer]).items()):
      matches.append(name)
  return matches[0] if len(matches) == 1 else None


@functools.lru_cache(maxsize=None)
def _backbone_shapes(name: str) -> dict[str, Any]:
  return by_layer(variable_shapes(models.get(name, head="none"), models.spec(name).min_image_size))


def _backbone_layers(name: str) -> dict[str, dict[str, Any]]:
  """The backbone's layers with their shapes flattened (`{"kernel": ShapeDtypeStruct}`)."""
  return {layer: flatten(params) for layer, params in _backbone_shapes(name).items()}


def unsupported_structure(wf: WeightFile) -> str | None:
  """Why a torch state dict is a form of a registered family this package does not build
  (timm's ResNet-D: `spec.port.unsupported`), or None.

  Returns:
    A phrase for the error, e.g. `"deep-stem ResNet-D is not supported; ..."`.
  """
  if wf.format not in _TORCH_FORMATS + _CONVERTED_FORMATS:
    return None
  layers = tuple(wf.layers)
  for check in dict.fromkeys(models.spec(name).port.unsupported for name in models.names()):
    why = check(layers)
    if why:
      return why
  return None
