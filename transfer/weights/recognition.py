"""What a weight file is, from its contents: the one recognition `transfer weights info` shows
and `sources.resolve` decides a file's preprocessing by (architecture, variant, top, publisher,
trained size), and `info`, the file's layers beside ours. Shapes and names only: no array is
read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from transfer import models
from transfer.weights import formats, port, sources
from transfer.weights.pretrained import check_cached, resolve


@dataclasses.dataclass(frozen=True)
class Recognised:
  """What a weight file's contents say it is (shapes and names only, no arrays read).

  Attributes:
    format: the file format (`formats.FORMATS`).
    arch: the registered architecture whose backbone the file matches, or None.
    variant: the form of `arch` the file needs (None for single-form models).
    include_top: whether it holds that architecture's top layers (None without an arch).
    publisher: who wrote it, where a family's files say so by their names (a ViT: `timm`,
      `torchvision`, `dinov2`, `dinov2_reg`, `big_vision`; `spec.port.dialect`), else None.
    trained_size: the input side it was trained at, where its arrays say so (a ViT's
      position grid), else None.
  """

  format: str
  arch: str | None = None
  variant: str | None = None
  include_top: bool | None = None
  publisher: str | None = None
  trained_size: int | None = None


def recognise(path: str) -> Recognised:
  """A weight file's format, architecture, variant, top, publisher and trained size, from its
  contents (shapes only).

  The one recognition `info` shows and `sources.resolve` decides preprocessing by.

  Raises:
    UserError: no such file, or not a readable weight file.
  """
  path, _ = resolve(path)
  with formats.open_weights(path) as wf:
    return of_file(wf)


def of_file(wf: formats.WeightFile) -> Recognised:
  """The `Recognised` of an open weight file."""
  arch = port.guess_arch(lambda s: port.model_view(wf, s))
  if arch is None:
    return Recognised(wf.format)
  spec = models.spec(arch)
  view = port.model_view(wf, spec)
  size = spec.port.trained_size(view) if spec.port.trained_size else None
  return Recognised(wf.format, arch, port.file_variant(wf.format, spec),
                    set(spec.top_layers) <= set(view), port.dialect(wf, spec), size)


def info(source: str, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
  """What a weight file holds, without reading its arrays.

  Args:
    source: a path or a registry id (downloaded if not cached).
    cache_dir: the download cache.

  Returns:
    `{"source", "path", "format", "preprocess", "arch", "variant", "num_params", "layers":
    [{"name", "model_name", "weights": [{"name", "shape"}]}]}`; `arch` is the registered
    architecture whose backbone the file matches (None if none), `variant` the form of it the
    file needs (None for single-form models), `model_name` our name for the layer under it.
  """
  name = sources.parse(source)[0] or source
  if sources.is_id(name):  # `info` is where one looks when a file misbehaves: check it first.
    cached = sources.cached_path(sources.get(name), cache_dir)
    if os.path.isfile(cached):
      check_cached(sources.get(name), cached)
  path, entry = resolve(name, cache_dir)
  with formats.open_weights(path) as wf:
    found = of_file(wf)
    arch, file_variant = found.arch, found.variant
    names = port.model_names(wf, models.spec(arch)) if arch else {}
    layers = [{"name": layer, "model_name": names.get(layer, layer),
               "weights": [{"name": t.name, "shape": list(t.shape)} for t in tensors]}
              for layer, tensors in wf.layers.items()]
    if arch:  # Model order reads better than a state dict's alphabetical keys.
      order = models.spec(arch).conv_layers + models.spec(arch).top_layers
      layers.sort(key=lambda l: order.index(l["model_name"]) if l["model_name"] in order
                  else len(order))
    fmt = wf.format
  num_params = sum(_size(w["shape"]) for layer in layers for w in layer["weights"])
  parsed = (sources.from_entry(entry) if entry
            else sources.for_file(path, found))
  variant = parsed.variant
  if variant is None and arch:
    variant = file_variant
  return {"source": source, "path": path, "format": fmt, "preprocess": parsed.preprocess,
          "arch": arch,
          "variant": variant, "num_params": num_params, "layers": layers}


def _size(shape) -> int:
  n = 1
  for d in shape:
    n *= d
  return n
