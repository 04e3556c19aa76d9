"""The strict merge of a weight file's layers into a model's variables, by layer.

`plan_merge` compares a file's view under our names (`port.model_view`) with the model's shapes
and decides, layer by layer, what is loaded, what stays freshly initialised (only an explicitly
fresh head), what is ignored and what is wrong; `mismatch_error` turns a failed plan into one
error. The unit is the layer, not the collection: `by_layer` puts a BatchNorm's running
statistics beside its scale and bias, as weight files store them, and `by_collection` splits
the result back into `params`/`batch_stats`. `fit_view` first lets the family's adapter
resample arrays to the model's shapes. Nothing here knows an architecture or a framework.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from transfer.errors import UserError
from transfer.weights.formats import Tensor


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
  return variable_shapes(model, image_size)["params"]


def variable_shapes(model, image_size: int) -> dict[str, Any]:
  """All of the model's collections (`params`, and `batch_stats` for BatchNorm networks) as
  `jax.ShapeDtypeStruct` trees, without allocating anything."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return dict(jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x))


def by_layer(collections: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """`{"params": {layer: ...}, "batch_stats": {layer: ...}}` -> `{layer: {scale, bias, mean,
  var}}`, in the model's layer order: the unit a weight file stores and the merge checks.

  Raises:
    ValueError: two collections use the same name in one layer (they could not be told apart).
  """
  layers: dict[str, dict[str, Any]] = {}
  for collection, tree in collections.items():
    for layer, leaves in tree.items():
      merged = layers.setdefault(layer, {})
      clash = set(merged) & set(leaves)
      if clash:
        raise ValueError(f"{layer} has {sorted(clash)} in {collection} and another collection")
      merged.update(leaves)
  return layers


def by_collection(layers: dict[str, dict[str, Any]], like: dict[str, Any]) -> dict[str, Any]:
  """The inverse of `by_layer`: per-layer arrays back into the collections of `like`."""
  return {collection: {layer: {name: layers[layer][name] for name in leaves}
                       for layer, leaves in tree.items()}
          for collection, tree in like.items()}


def plan_merge(shapes: dict[str, Any], view: dict[str, dict[str, Tensor]], *,
               fresh: tuple[str, ...] = (), ignorable: tuple[str, ...] = ()) -> Plan:
  """Decides layer by layer how `view` (a file under our names) fills `shapes`.

  Args:
    shapes: the model's shapes by layer (`by_layer(variable_shapes(...))`; `param_shapes` for a
      model without BatchNorm).
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
    flat = flatten(params)
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


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(flatten(value, f"{prefix}/{key}" if prefix else key))
  return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
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
  """Reads `layers` from the file into arrays of the model's dtypes, nested like `shapes`
  (`by_collection` splits a BatchNorm layer's statistics off into `batch_stats`)."""
  out = {}
  for layer in layers:
    flat = flatten(shapes[layer])
    out[layer] = unflatten({name: jnp.asarray(view[layer][name].read(), dtype=want.dtype)
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


def fit_view(view: dict[str, dict[str, Tensor]], shapes: dict[str, Any],
             spec: Any, dialect: str | None = None) -> dict[str, dict[str, Tensor]]:
  """`view` with the arrays the family's adapter resamples (`spec.port.resample`: a ViT's
  position embeddings for another image size) brought to the model's shapes, lazily; every
  other array as it was, so the merge still reports a real misfit.

  Args:
    view: `model_view` of a file.
    shapes: the model's shapes by layer (`by_layer(variable_shapes(...))`).
    spec: the model's spec.
    dialect: who wrote the file (`spec.port.dialect`), whose resampling the adapter follows;
      None where only the shapes matter (recognising a file).
  """
  resample = spec.port.resample
  if resample is None:
    return view
  out = {}
  for layer, params in view.items():
    want = flatten(shapes.get(layer, {}))
    out[layer] = {name: _resampled(resample, layer, name, t, tuple(want[name].shape), dialect)
                  if name in want and tuple(t.shape) != tuple(want[name].shape) else t
                  for name, t in params.items()}
  return out


def _resampled(resample, layer: str, name: str, t: Tensor, shape: tuple[int, ...],
               dialect: str | None) -> Tensor:
  convert = resample(layer, name, tuple(t.shape), shape, dialect)
  if convert is None:
    return t
  return Tensor(t.name, shape, lambda: np.asarray(convert(t.read())))
