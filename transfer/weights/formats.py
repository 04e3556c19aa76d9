"""Reading weight files as they are stored: layer name -> tensors, with shapes before data.

Every reader yields the same `WeightFile`: the file's own layer names in file order, each with its
tensors (name, shape, and a `read()` that loads the data only when asked). Shapes are known without
reading the data, so `info` and the strict shape check are cheap even for a 550 MB file. Nothing
here knows about our models; `transfer.weights.port` maps these names onto a model.

Formats:
  * `keras_h5`: the legacy Keras HDF5 layout of the official application files. The root (or a
    `model_weights` group) has the attribute `layer_names`; each layer group has `weight_names`,
    the dataset paths inside it. Keras 1 named them `block1_conv1_W_1:0`, Keras 2
    `block1_conv1/kernel:0`; both are read through the attributes, never guessed.
  * `keras3_h5`: Keras 3's `.weights.h5`: `layers/<key>/vars/<0,1,...>`, the layer name in the
    `name` attribute of `vars` (older Keras 3 used the layer name as the key). A whole-model
    `.keras` archive holds the same file as its `model.weights.h5` member. Variables are stored
    by position only, in the layer's own order (trainable, then non-trainable). For a
    BatchNormalization layer that order is gamma, beta, moving_mean, moving_variance: four 1-D
    arrays nothing else tells apart, so the reader names them (`BATCH_NORM_VARS`) when the key is
    Keras' class-derived `batch_normalization[_N]`, or, for older files keyed by layer name, when
    a layer holds exactly four (or, without gamma, three) 1-D arrays. Other layers keep their
    positions (`0`, `1`) as names.
  * `torch_pth`: a torch state dict (`features.0.weight`, ...), read with `weights_only=True`.
  * `safetensors`: the same keys in a safetensors file, read with numpy (no torch needed).
  * `npz`: numpy's `.npz`, the checkpoints of Google's vision_transformer and big_vision (the
    AugReg files): a zip whose members are all `.npy` arrays, told apart by that from a Keras 3
    `.keras` archive (a zip holding `model.weights.h5`) and a torch `.pth` (a zip of pickles).
    Tensors keep their full names (`Transformer/encoderblock_0/LayerNorm_0/scale`), grouped into
    layers by the part before the last `/`. Read with `allow_pickle=False`: an array of Python
    objects is refused, never unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import zipfile
from typing import Callable, Iterator

import numpy as np

from transfer.errors import UserError

FORMATS = ("keras_h5", "keras3_h5", "torch_pth", "safetensors", "npz")
# A Keras BatchNormalization layer's variables in the order Keras creates and stores them.
BATCH_NORM_VARS = ("gamma", "beta", "moving_mean", "moving_variance")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"
_KERAS_ARCHIVE_WEIGHTS = "model.weights.h5"
_NPY = ".npy"
# A zip's local file header: fixed fields, then the member's name (its length at offset 26).
_ZIP_HEADER = 30


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One stored array: its name in the file, its shape, and a loader for its data.

  A tensor a family's adapter derives from the file's (renamed, relaid out, or stacked from
  several: a ViT's query, key and value) carries the file keys it came from in `sources`, so
  `transfer weights info` can say which of our layers each of the file's layers fills.
  """

  name: str
  shape: tuple[int, ...]
  read: Callable[[], np.ndarray]
  sources: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class WeightFile:
  """A weight file's contents by layer, valid inside its `open_weights` block.

  Attributes:
    path: the file.
    format: one of `FORMATS`.
    layers: file layer name -> its tensors in stored order (layers without weights are left out).
  """

  path: str
  format: str
  layers: dict[str, list[Tensor]]


@contextlib.contextmanager
def open_weights(path: str | os.PathLike) -> Iterator[WeightFile]:
  """Opens a weight file of any supported format; arrays can be read until the block ends.

  Args:
    path: a `.h5`/`.weights.h5`/`.keras`, `.pth`/`.pt`, `.safetensors` or `.npz` file (told
      apart by their contents, not their names).

  Yields:
    A `WeightFile`.

  Raises:
    UserError: no such file, unknown format, truncated or corrupt file, or `.pth` without torch installed.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UserError(f"no weight file {path}")
  kind = detect_format(path)
  opener = {"keras_h5": _open_h5, "keras3_h5": _open_h5, "torch_pth": _open_torch,
            "safetensors": _open_safetensors, "npz": _open_npz}[kind]
  with opener(path) as wf:
    yield wf


def detect_format(path: str) -> str:
  """The format of `path`, from its leading bytes (its HDF5 layout, a zip's members), not only
  its name."""
  with open(path, "rb") as f:
    head = f.read(16)
  if head.startswith(_HDF5_MAGIC):
    return _h5_layout(path)
  if path.lower().endswith(".safetensors") or _looks_like_safetensors(head):
    return "safetensors"
  if head.startswith(_ZIP_MAGIC):
    return _zip_format(path)
  if path.lower().endswith((".pth", ".pt", ".bin")):
    return "torch_pth"  # torch's legacy (pre-1.6) pickle format is no zip.
  raise UserError(f"cannot tell the format of {path}: expected a Keras .h5, a torch .pth, a "
                   f".safetensors or a numpy .npz file")


def _zip_format(path: str) -> str:
  """What a zip holds: a Keras 3 archive, numpy arrays (`.npz`) or a torch state dict.

  A zip cut short has no readable member list; its first member's name, at the start of the
  file, still says whether it is an `.npz`, so the reader's error names the right format.
  """
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
  except zipfile.BadZipFile:
    names = [_first_zip_member(path)]
  if _KERAS_ARCHIVE_WEIGHTS in names:
    return "keras3_h5"
  if names and all(name.endswith(_NPY) for name in names):
    return "npz"
  return "torch_pth"


def _first_zip_member(path: str) -> str:
  """The name in a zip's first local file header (`""` if there is none to read)."""
  with open(path, "rb") as f:
    header = f.read(_ZIP_HEADER)
    if len(header) < _ZIP_HEADER:
      return ""
    name = f.read(int.from_bytes(header[26:28], "little"))
  return name.decode("utf8", "replace")


def _looks_like_safetensors(head: bytes) -> bool:
  # A little-endian u64 header size, then the JSON header itself.
  return len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30


def _h5_layout(path: str) -> str:
  with _h5_file(path) as f:
    layout = _h5_layout_of(f)
  if layout is None:
    raise UserError(f"{path} is an HDF5 file without Keras weights (no 'layer_names' attribute "
                     f"and no 'layers' group)")
  return layout


def _h5_layout_of(f) -> str | None:
  root = f["model_weights"] if "model_weights" in f else f
  if "layer_names" in root.attrs:
    return "keras_h5"
  return "keras3_h5" if "layers" in f else None


@contextlib.contextmanager
def _h5_file(path: str):
  import h5py  # Deferred: only .h5 files need it.
  with contextlib.ExitStack() as stack:
    source = path
    if zipfile.is_zipfile(path):  # A `.keras` archive: h5py reads the member in place.
      source = stack.enter_context(stack.enter_context(zipfile.ZipFile(path)).open(
          _KERAS_ARCHIVE_WEIGHTS))
    try:
      f = h5py.File(source, "r")
    except OSError as e:
      raise UserError(f"cannot read {path}: truncated or corrupt HDF5 file "
                       f"({_first_line(e)})") from None
    with f:
      yield f


@contextlib.contextmanager
def _open_h5(path: str):
  with _h5_file(path) as f:
    fmt = _h5_layout_of(f)
    try:
      layers = _keras_legacy_layers(f) if fmt == "keras_h5" else _keras3_layers(f["layers"])
    except (KeyError, OSError, ValueError) as e:
      raise UserError(f"cannot read {path}: damaged Keras weight file ({_first_line(e)})") \
          from None
    yield WeightFile(path=path, format=fmt, layers=_guard_reads(layers, path))


def _keras_legacy_layers(f) -> dict[str, list[Tensor]]:
  """Layers of the legacy layout, read through `layer_names` and each `weight_names`."""
  root = f["model_weights"] if "model_weights" in f else f
  layers = {}
  for layer in map(_text, root.attrs["layer_names"]):
    group = root[layer]
    tensors = [_h5_tensor(group[name], name) for name in map(_text, group.attrs["weight_names"])]
    if tensors:
      layers[layer] = tensors
  return layers


def _keras3_layers(group, prefix: str = "") -> dict[str, list[Tensor]]:
  """Layers of a Keras 3 `.weights.h5`, recursing into nested models.

  Keys are `<class>_<index>` in Keras' `model.layers` order within each class (`conv2d`,
  `conv2d_1`, ... `conv2d_10`; HDF5 lists them alphabetically), so layers are taken in that
  order: for networks whose layer names Keras generates, position is what identifies a layer.
  """
  layers = {}
  for key in sorted(group, key=_container_position):
    sub = group[key]
    if "vars" in sub and len(sub["vars"]):
      name = prefix + _text(sub["vars"].attrs.get("name", key))
      order = sorted(sub["vars"], key=lambda k: int(k) if k.isdigit() else k)
      tensors = [_h5_tensor(sub["vars"][k], k) for k in order]
      layers[name] = _name_batch_norm(key, "name" in sub["vars"].attrs, tensors)
    if "layers" in sub:
      layers.update(_keras3_layers(sub["layers"], prefix))
  return layers


def _container_position(key: str) -> tuple[str, int]:
  """`batch_normalization_12` -> ("batch_normalization", 12); `conv2d` -> ("conv2d", 0)."""
  match = re.fullmatch(r"(.*?)_(\d+)", key)
  return (match.group(1), int(match.group(2))) if match else (key, 0)


def _name_batch_norm(key: str, keyed_by_class: bool, tensors: list[Tensor]) -> list[Tensor]:
  """A Keras 3 BatchNormalization layer's positional variables under Keras' own names.

  Files whose `vars` carry a `name` attribute key layers by class (`batch_normalization_3`), which
  says what the layer is; older ones key them by layer name, and there four 1-D arrays are taken
  to be a BatchNormalization (the only Keras applications layer that stores that). Three arrays
  are a BatchNormalization built with `scale=False` (InceptionV3): beta, moving_mean,
  moving_variance (no Keras application builds one with `center=False`).
  """
  vectors = all(len(t.shape) == 1 for t in tensors)
  names = {4: BATCH_NORM_VARS, 3: BATCH_NORM_VARS[1:]}.get(len(tensors)) if vectors else None
  is_bn = re.fullmatch(r"batch_normalization(_\d+)?", key) if keyed_by_class else True
  if not (names and is_bn):
    return tensors
  return [Tensor(name, t.shape, t.read) for name, t in zip(names, tensors)]


def _h5_tensor(dataset, name: str) -> Tensor:
  return Tensor(name=name, shape=tuple(dataset.shape), read=lambda: np.asarray(dataset[()]))


@contextlib.contextmanager
def _open_torch(path: str):
  try:
    import torch  # Optional dependency: only .pth files need it.
  except ImportError:
    raise UserError(f"reading {path} needs torch: pip install torch (or convert it to "
                     f".safetensors, which needs no torch)") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises RuntimeError, pickle errors, EOFError... for bad files.
    raise UserError(f"cannot read {path} as a torch state dict: truncated, corrupt or not a "
                     f"plain state dict ({_first_line(e)})") from None
  if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise UserError(f"{path} holds a {type(state).__name__}, not a state dict")
  tensors = {k: Tensor(k, tuple(v.shape), _torch_reader(v)) for k, v in state.items()
             if isinstance(v, torch.Tensor)}
  yield WeightFile(path=path, format="torch_pth", layers=by_prefix(tensors))


def _torch_reader(tensor) -> Callable[[], np.ndarray]:
  """numpy has no bfloat16: floating tensors are read as float32."""
  import torch
  if tensor.is_floating_point():
    return lambda: tensor.detach().to(torch.float32).numpy()
  return lambda: tensor.detach().numpy()


@contextlib.contextmanager
def _open_safetensors(path: str):
  from safetensors import SafetensorError, safe_open
  try:
    handle = safe_open(path, framework="numpy")
  except (SafetensorError, OSError, ValueError) as e:
    raise UserError(f"cannot read {path}: truncated or corrupt safetensors file "
                     f"({_first_line(e)})") from None
  with handle as f:
    tensors = {k: Tensor(k, tuple(f.get_slice(k).get_shape()), lambda k=k: f.get_tensor(k))
               for k in f.keys()}
    yield WeightFile(path=path, format="safetensors",
                     layers=_guard_reads(by_prefix(tensors), path))


@contextlib.contextmanager
def _open_npz(path: str):
  """An `.npz`'s arrays; shapes from each member's `.npy` header, data only when read."""
  try:
    npz = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise UserError(f"cannot read {path}: truncated or corrupt .npz file ({_first_line(e)})") \
        from None
  with npz:
    try:
      tensors = {k: Tensor(k, _npy_shape(npz.zip, k + _NPY), lambda k=k: npz[k])
                 for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      raise UserError(f"cannot read {path}: truncated or corrupt .npz file "
                       f"({_first_line(e)})") from None
    yield WeightFile(path=path, format="npz",
                     layers=_guard_reads(by_prefix(tensors, "/"), path))


def _npy_shape(archive: zipfile.ZipFile, member: str) -> tuple[int, ...]:
  """The shape in an `.npy` member's header, without reading its data."""
  with archive.open(member) as f:
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, _, _ = read_header(f)
  return tuple(shape)


def by_prefix(tensors: dict[str, Tensor], sep: str = ".") -> dict[str, list[Tensor]]:
  """Groups keys by the part before their last `sep`, keeping order: a state dict's
  `features.0.weight` under `features.0`, an `.npz`'s `Transformer/encoder_norm/scale` under
  `Transformer/encoder_norm`."""
  layers: dict[str, list[Tensor]] = {}
  for key, tensor in tensors.items():
    layers.setdefault(key.rsplit(sep, 1)[0] if sep in key else key, []).append(tensor)
  return layers


def _guard_reads(layers: dict[str, list[Tensor]], path: str) -> dict[str, list[Tensor]]:
  """Turns a failure while reading data (a file cut after its header) into a UserError."""

  def guarded(t: Tensor) -> Tensor:
    def read():
      try:
        return t.read()
      except Exception as e:  # h5py and safetensors raise OSError/RuntimeError/their own types.
        raise UserError(f"cannot read {t.name} from {path}: truncated or corrupt file "
                         f"({_first_line(e)})") from None
    return Tensor(t.name, t.shape, read)

  return {layer: [guarded(t) for t in ts] for layer, ts in layers.items()}


def _text(value) -> str:
  return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]
