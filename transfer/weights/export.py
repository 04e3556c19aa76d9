"""Writing params in the reference frameworks' layouts: the inverse of `port`.

Uses: converting a file once (`scripts/convert_weights.py`, e.g. a torch `.pth` to `.safetensors`
so that torch is not needed at load time), sharing fine-tuned weights with Keras or torch users,
and building small fixture files for tests in exactly the layout of the official files.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Sequence

import numpy as np

from transfer import models

# Keras' BatchNormalization variables in its order, and ours for each (params, then batch_stats).
_BATCH_NORM = ("gamma", "beta", "moving_mean", "moving_variance")
_OURS = ("scale", "bias", "mean", "var")


def write_keras_h5(path: str | os.PathLike, layers: Mapping[str, Sequence[np.ndarray]], *,
                   naming: str = "keras1") -> None:
  """Writes weights in the legacy Keras HDF5 layout of the official application files.

  Args:
    path: output `.h5` file.
    layers: layer name -> its arrays (kernel, bias; a BatchNormalization's gamma, beta,
      moving_mean, moving_variance) in Keras layout, in model order; layers without weights
      (input, pooling, flatten) may be given with an empty list, as the official files list them.
    naming: dataset names: `"keras1"` (`block1_conv1_W_1:0`, `block1_conv1_b_1:0`, as in the
      official VGG files) or `"keras2"` (`block1_conv1/kernel:0`, `conv1_bn/gamma:0`, as
      tf_keras writes them and the official ResNet files hold them).
  """
  import h5py  # Deferred: only .h5 export needs it.
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = np.array([n.encode("utf8") for n in layers], dtype="S")
    f.attrs["backend"] = b"tensorflow"
    f.attrs["keras_version"] = b"2.2.4"
    for layer, arrays in layers.items():
      group = f.create_group(layer)
      names = [_keras_weight_name(layer, i, len(arrays), naming) for i in range(len(arrays))]
      group.attrs["weight_names"] = np.array([n.encode("utf8") for n in names], dtype="S")
      for name, array in zip(names, arrays):
        group.create_dataset(name, data=np.asarray(array, np.float32))


def _keras_weight_name(layer: str, index: int, count: int, naming: str) -> str:
  kinds = {2: ("W", "b"), 3: _BATCH_NORM[1:], 4: _BATCH_NORM}.get(
      count, tuple(str(i) for i in range(count)))  # 3: a BatchNormalization without gamma
  if naming == "keras1":
    return f"{layer}_{kinds[index]}_1:0"
  if naming == "keras2":
    return f"{layer}/{('kernel', 'bias')[index] if count == 2 else kinds[index]}:0"
  raise ValueError(f"unknown naming {naming!r}; use 'keras1' or 'keras2'")


# Where a ResNet block's layers sit in a Keras model's `layers` (topological order, by depth from
# the output): the shortcut (`_0_`) is built first but is as deep as the block's last conv, so it
# comes between the second and third. Keras and tf_keras load a legacy file by that position, not
# by name: written in our own order, a file loads the shortcut's kernel into `_1_conv`.
_RESNET_BLOCK = re.compile(r"^(conv\d+_block\d+)_(\d)_(conv|bn)$")
_RESNET_POSITION = {("1", "conv"): 0, ("1", "bn"): 1, ("2", "conv"): 2, ("2", "bn"): 3,
                    ("0", "conv"): 4, ("3", "conv"): 5, ("0", "bn"): 6, ("3", "bn"): 7}


def keras_file_order(names: Sequence[str]) -> list[str]:
  """`names` in the order Keras' model lists them (ResNet blocks reordered, see above)."""
  def key(item):
    index, name = item
    match = _RESNET_BLOCK.match(name)
    if not match:
      return (index, 0)
    first = next(i for i, n in enumerate(names) if n.startswith(match.group(1) + "_"))
    return (first, _RESNET_POSITION[match.group(2), match.group(3)])
  return [name for _, name in sorted(enumerate(names), key=key)]


def keras_layers(params: Mapping, spec: models.ModelSpec,
                 batch_stats: Mapping | None = None) -> dict[str, list[np.ndarray]]:
  """Our params (conv layers and, if present, the ImageNet top) as Keras layer arrays.

  Args:
    params: the `params` collection.
    spec: the model's spec (its layer order; written in Keras' model order, `keras_file_order`,
      since Keras loads a legacy file by position).
    batch_stats: a BatchNorm model's running statistics; BatchNorm layers then get Keras' arrays
      (gamma, beta, moving_mean, moving_variance; no gamma where the model has no scale).
  """
  order = spec.port.keras_order or keras_file_order(spec.conv_layers)
  names = [n for n in list(order) + list(spec.top_layers) if n in params]
  layers = {}
  for n in names:
    if spec.kind(n) == models.BATCH_NORM:
      both = {**params[n], **(batch_stats or {}).get(n, {})}
      layers[n] = [np.asarray(both[k]) for k in _OURS if k in both]
    else:
      layers[n] = [np.asarray(params[n][k]) for k in ("kernel", "bias") if k in params[n]]
  return layers


def torch_state_dict(params: Mapping, spec: models.ModelSpec,
                     batch_stats: Mapping | None = None) -> dict[str, np.ndarray]:
  """Our params as a torchvision-keyed state dict of numpy arrays (OIHW, (out, in), C,H,W rows).

  A LayerNorm becomes `weight` and `bias`, a learned tensor (a ViT's class token, position
  embeddings, layer scale) its bare key or its module's parameter (`spec.port.torch_params`).
  A BatchNorm layer becomes torch's `BatchNorm2d` entries: `weight` (our scale), `bias`,
  `running_mean`, `running_var` (from `batch_stats`) and `num_batches_tracked` (0: we do not
  count steps, and torch reads the counter only with `momentum=None`). Convolutions without a
  bias (the torchvision ResNet) get no `bias` entry, as in torchvision's files.

  Args:
    params: the `params` collection.
    spec: the model's spec (its layer order and torch names).
    batch_stats: a BatchNorm model's running statistics; required when `params` has BatchNorm
      layers, since a file without them would not load (nor compute what the model computes).

  Raises:
    ValueError: BatchNorm layers without their statistics.
  """
  flatten, side = spec.port.torch_flatten or (None, None)
  state = {}
  for layer in spec.conv_layers + spec.top_layers:
    if layer not in params:
      continue
    prefix = spec.port.torch_names[layer]
    if spec.kind(layer) == models.BATCH_NORM:
      stats = (batch_stats or {}).get(layer)
      if stats is None:
        raise ValueError(f"{layer} is a BatchNorm layer: pass batch_stats")
      for theirs, value in (("weight", params[layer]["scale"]), ("bias", params[layer]["bias"]),
                            ("running_mean", stats["mean"]), ("running_var", stats["var"])):
        state[f"{prefix}.{theirs}"] = np.asarray(value, np.float32)
      state[f"{prefix}.num_batches_tracked"] = np.asarray(0, np.int64)
      continue
    if spec.kind(layer) == models.LAYER_NORM:
      state[f"{prefix}.weight"] = np.asarray(params[layer]["scale"], np.float32)
      state[f"{prefix}.bias"] = np.asarray(params[layer]["bias"], np.float32)
      continue
    if spec.kind(layer) == models.EMBEDDING:  # a bare tensor, or a module's one parameter
      name = spec.port.torch_params.get(layer)
      state[f"{prefix}.{name}" if name else prefix] = np.asarray(
          params[layer]["embedding"], np.float32)
      continue
    kernel = np.asarray(params[layer]["kernel"], np.float32)
    if kernel.ndim == 4:
      weight = kernel.transpose(3, 2, 0, 1)
    elif layer == flatten:
      inp, out = kernel.shape
      channels = inp // (side * side)
      weight = kernel.T.reshape(out, side, side, channels).transpose(0, 3, 1, 2).reshape(out, inp)
    else:  # a dense layer after global pooling (ResNet's fc) reads channels, not C,H,W rows
      weight = kernel.T
    state[f"{prefix}.weight"] = np.ascontiguousarray(weight)
    if "bias" in params[layer]:
      state[f"{prefix}.bias"] = np.asarray(params[layer]["bias"], np.float32)
  return state


def write_safetensors(path: str | os.PathLike, state: Mapping[str, np.ndarray]) -> None:
  """Saves a state dict of numpy arrays as `.safetensors` (no torch needed)."""
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, os.fspath(path))
