"""Pretrained weights for a model: resolve a source, port it, merge strictly, report.

`load("keras:vgg16_notop", model)` is the one call the rest of the package makes; a BatchNorm
network (ResNet) also needs its running statistics: `load_variables` gives `params` and
`batch_stats` together. A source is a registry id (downloaded into the cache on first use), an id
with a `?` suffix (use it only if it is already cached, otherwise say so and start from random
weights: never download, never pretend), or a local file in any format `transfer.weights.formats`
reads. `variant_for` says which variant of a multi-variant model (ResNet) a source fits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp

from transfer import models
from transfer.errors import UserError
from transfer.weights import downloader
from transfer.weights import formats, port, sources


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What `load` did, layer by layer.

  Attributes:
    source: the source as given (registry id or path).
    format: file format (`keras_h5`, `keras3_h5`, `torch_pth`, `safetensors`), or `"none"` when
      an optional id was not cached and nothing was read.
    loaded: model layers whose params came from the file.
    fresh: model layers freshly initialised (a new head, or everything when nothing was read).
    ignored: file layers not used (the ImageNet top under a new head).
    left_out: file layers of parts the model leaves out by design (torchvision InceptionV3's
      auxiliary classifier `AuxLogits.*`), not used.
    path: the file read, or None.
    note: anything else the user should know (e.g. why nothing was loaded).
  """

  source: str
  format: str
  loaded: tuple[str, ...]
  fresh: tuple[str, ...]
  ignored: tuple[str, ...] = ()
  path: str | None = None
  left_out: tuple[str, ...] = ()
  note: str = ""

  def summary(self) -> str:
    """One line for logs: counts, fresh and ignored layers."""
    where = f" ({self.format}, {self.path})" if self.path else f" ({self.format})"
    text = f"weights {self.source}{where}: loaded {len(self.loaded)} layers"
    if self.fresh:
      text += f", fresh: {_names(self.fresh)}"
    if self.ignored:
      text += f", ignored for the new head: {_names(self.ignored)}"
    if self.left_out:
      text += f", ignored (not part of the model): {_names(self.left_out)}"
    return f"{text}; {self.note}" if self.note else text


def _names(layers, limit: int = 4) -> str:
  """Layer names for a log line: all of a few, or the first and last of many."""
  if len(layers) <= limit:
    return ", ".join(layers)
  return f"{len(layers)} layers ({layers[0]} ... {layers[-1]})"


def load(source: str, model, *, image_size: int | None = None, rng: jax.Array | int = 0,
         fresh_head: bool | None = None, cache_dir: str | os.PathLike | None = None,
         return_report: bool = False):
  """Params for `model` from pretrained weights, merged strictly into a fresh tree.

  For a BatchNorm model (ResNet) this is the `params` collection only; its running statistics
  are checked and read all the same (a file without them does not fit) but dropped here. Use
  `load_variables` to get them: without them the network normalises with fresh statistics
  (mean 0, variance 1) and computes something else than the pretrained network.

  Args:
    source: registry id (`keras:vgg16`, `torchvision:vgg19`, ...; see `transfer.weights.ids()`), the same
      with a `?` suffix (only if cached, else random init and a report saying so), or a path to a
      `.h5`, `.weights.h5`, `.pth` or `.safetensors` file.
    model: a module from `transfer.models.get` (its `arch`, `head`, `num_classes` are read).
    image_size: input side the params are built for (the head's shapes may depend on it);
      defaults to the size the ImageNet top was trained for (224).
    rng: PRNG key or seed for the layers that are freshly initialised.
    fresh_head: None = keep the head fresh exactly when the model's head is not the ImageNet top;
      True = always start the head fresh (the file's top is ignored); False = the head must come
      from the file too.
    cache_dir: where downloads are cached (default `$TRANSFER_HOME/weights`).
    return_report: also return a `LoadReport`.

  Returns:
    The params tree (the structure of `transfer.models.init_params(model, image_size)`), or
    `(params, report)` when `return_report`.

  Raises:
    UserError: unknown id, unreadable file, a download that failed, a file for another variant
      of the model, or a file that does not fit the model (one message naming every missing,
      unexpected and mis-shaped name).
  """
  variables, report = load_variables(source, model, image_size=image_size, rng=rng,
                                     fresh_head=fresh_head, cache_dir=cache_dir,
                                     return_report=True)
  return (variables["params"], report) if return_report else variables["params"]


def load_variables(source: str, model, *, image_size: int | None = None,
                   rng: jax.Array | int = 0, fresh_head: bool | None = None,
                   cache_dir: str | os.PathLike | None = None, return_report: bool = False,
                   variant_option: str = "variant"):
  """All of `model`'s variables from pretrained weights, merged strictly into fresh trees.

  As `load`, with the BatchNorm running statistics: a BatchNorm layer's `moving_mean` and
  `moving_variance` (Keras) or `running_mean` and `running_var` (torch) belong to that layer,
  so a file lacking them, or holding them mis-shaped, does not fit, and a report's `loaded`
  counts the layer once.

  Args:
    source, model, image_size, rng, fresh_head, cache_dir, return_report: as for `load`.
    variant_option: how a variant mismatch error names the setting to change: `variant` (this
      API, `models.get(..., variant=...)`) or `--config.variant` (a run's config).

  Returns:
    `{"params": ...}`, plus `"batch_stats"` for a BatchNorm model (the structure of
    `transfer.models.init_variables(model, image_size)`), or `(variables, report)` when
    `return_report`.

  Raises:
    UserError: as for `load`.
  """
  spec = models.spec(model.arch)
  image_size = image_size or spec.top_image_size
  models.check_image_size(model.arch, model.head, image_size)
  shapes = port.variable_shapes(model, image_size)
  order = spec.conv_layers + spec.top_layers  # Reports list layers forward, not alphabetically.
  layers = dict(sorted(port.by_layer(shapes).items(),
                       key=lambda item: order.index(item[0]) if item[0] in order else len(order)))
  if fresh_head is None:
    fresh_head = model.head != "imagenet"
  fresh = port.head_layers(layers, spec) if fresh_head else ()
  ignorable = spec.top_layers if fresh_head or model.head != "imagenet" else ()

  if sources.is_id(source) and sources.get(source).arch != spec.name:
    raise UserError(f"weights {source} are for {sources.get(source).arch}, model is {spec.name}")
  if spec.variants and (sources.is_id(source) or os.path.isfile(source)):
    port.check_variant(source, spec, getattr(model, "variant", None),
                       variant_for(source, spec.name), variant_option)
  path, entry = resolve(source, cache_dir)
  if path is None:
    variables = models.init_variables(model, image_size, rng)
    report = LoadReport(source=source, format="none", loaded=(), fresh=tuple(layers),
                        note=f"not in the cache ({sources.cached_path(entry, cache_dir)}): "
                             f"random initialisation; run `transfer weights download "
                             f"{entry.id}` to use the pretrained weights")
    return (variables, report) if return_report else variables

  with _open_cached(path, entry) as wf:
    unsupported = port.unsupported_structure(wf)
    if unsupported:
      raise UserError(f"weights {source}: {unsupported}")
    view = port.fit_view(port.model_view(wf, spec), layers, spec, port.dialect(wf, spec))
    left_out = port.ignored_parts(view, spec)
    plan = port.plan_merge(layers, view, fresh=fresh, ignorable=ignorable + left_out)
    if plan.problems:
      cause = port.likely_cause(lambda s: port.model_view(wf, s), plan, spec, model.head,
                                wf.format)
      raise port.mismatch_error(plan, source=source, arch=spec.name, cause=cause)
    arrays = port.read_layers(view, layers, plan.loaded)
    fmt = wf.format
  arrays.update(fresh_layers(model, shapes, image_size, rng, plan.fresh))
  variables = port.by_collection(arrays, shapes)  # The model's own layer order.
  report = LoadReport(source=source, format=fmt, loaded=plan.loaded, fresh=plan.fresh,
                      ignored=tuple(l for l in plan.ignored if l not in left_out), path=path,
                      left_out=left_out)
  return (variables, report) if return_report else variables


def variant_for(source, arch: str) -> str | None:
  """The variant of `arch` that the weights `source` fit, so a run builds the model they need.

  Keras publishes ResNet v1 and torchvision ResNet v1.5 (`transfer.models.resnet`); a file fits
  the variant of its framework only. Nothing is downloaded, nor any array read.

  Args:
    source: a `sources.ParsedSource`, or what `sources.resolve` parses (a registry id with or
      without `?`, a path to a weight file, or `""`/`"none"`).
    arch: the model name (`resnet50`, ...).

  Returns:
    `"keras"` or `"torchvision"` (one of `transfer.models.spec(arch).variants`), or None when
    `arch` has one form or `source` is none (the model's default variant then applies).

  Raises:
    UserError: unknown model or registry id, or a path that is no weight file.
  """
  spec = models.spec(arch)
  if not spec.variants:
    return None
  parsed = source if isinstance(source, sources.ParsedSource) else sources.resolve(source)
  if parsed.source is None:
    return None
  if parsed.entry is not None:
    variant = parsed.entry.variant or port.file_variant(parsed.entry.format, spec)
    return variant if variant in spec.variants else None
  return port.file_variant(parsed.format, spec)


def fresh_layers(model, shapes: dict[str, Any], image_size: int, rng: jax.Array | int,
                 layers: tuple[str, ...]) -> dict[str, Any]:
  """Freshly initialised variables of the head `layers` only, by layer (`port.by_layer`).

  Initialising just the head on a feature-map-shaped input (`stage="head"`) gives the same values
  as a full `init_variables` (Flax derives each layer's key from its name) without compiling the
  backbone, which costs seconds on CPU. Falls back to the full init for anything else.

  Args:
    model: the module.
    shapes: its variable shapes (`port.variable_shapes`).
    image_size: input side.
    rng: PRNG key or seed.
    layers: the layers to initialise.

  Returns:
    Layer name -> its variables from every collection.
  """
  if not layers:
    return {}
  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  feats = jax.eval_shape(lambda v, x: model.apply(v, x, stage="features"), shapes, x)
  head = jax.jit(lambda r: model.init(r, jnp.zeros(feats.shape, feats.dtype), stage="head"))(rng)
  head = port.by_layer(dict(head))
  if set(head) == set(layers):
    return head
  full = port.by_layer(models.init_variables(model, image_size, rng))
  return {layer: full[layer] for layer in layers}


def resolve(source: str, cache_dir: str | os.PathLike | None = None,
            ) -> tuple[str | None, sources.WeightSource | None]:
  """The file behind `source`, downloading a registry id if needed.

  Args:
    source: registry id (with optional `?`) or path.
    cache_dir: the download cache.

  Returns:
    `(path, entry)`: entry is the registry record (None for a path); path is None only for an
    optional id that is not cached.
  """
  if not sources.is_id(source):
    if not os.path.isfile(source):
      raise UserError(f"no weight file {source} (and not a registry id: "
                       f"{', '.join(sources.ids())})")
    return source, None
  entry = sources.get(source)
  path = sources.cached_path(entry, cache_dir)
  if os.path.isfile(path):
    if not entry.published_hash:  # Only its recorded sha256 vouches for it: checked every use.
      check_cached(entry, path)
    return path, entry
  if sources.parse(source)[1]:
    return None, entry
  return download(entry.id, cache_dir=cache_dir), entry


def download(source_id: str, cache_dir: str | os.PathLike | None = None, *,
             url_base: str | None = None, progress: bool = True) -> str:
  """Puts the file of a registry id into the cache, verified, unless a good copy is there.

  A file already in the cache is hash-checked first: a good one (also one placed by hand) is
  used as is; a bad one (cut short, or the wrong file) is downloaded again and replaced, with one
  line on stderr saying so.

  Args:
    source_id: e.g. `keras:vgg16_notop`.
    cache_dir: cache directory (default `$TRANSFER_HOME/weights`).
    url_base: replaces the directory part of the official URL (default:
      `$TRANSFER_WEIGHTS_URL_BASE`, else the official location).
    progress: show a progress bar on stderr.

  Returns:
    The cached file's path.
  """
  entry = sources.get(source_id)
  path = sources.cached_path(entry, cache_dir)
  if os.path.isfile(path):
    problem = downloader.hash_mismatch(path, hash_kind=entry.hash_kind, expected=entry.hash)
    if problem is None:
      return path
    print(f"transfer: cached file {path} {problem}; downloading it again", file=sys.stderr)
  return downloader.fetch(sources.url_for(entry, url_base), path, hash_kind=entry.hash_kind,
                            expected=entry.hash, progress=progress)


def check_cached(entry: sources.WeightSource, path: str) -> None:
  """Raises a one-line UserError when the cached file of `entry` fails its hash check.

  Args:
    entry: the registry record.
    path: its cached file.
  """
  problem = downloader.hash_mismatch(path, hash_kind=entry.hash_kind, expected=entry.hash)
  if problem:
    raise UserError(f"cached file {path} {problem}; run transfer weights download {entry.id}")


@contextlib.contextmanager
def _open_cached(path: str, entry: sources.WeightSource | None):
  """`formats.open_weights`, but a cached registry file that cannot be read is hash-checked.

  Loading does not hash every file on every run (hundreds of MB); only when reading fails (at
  open, or later for a file cut short) is the hash checked, so the error says to download the
  file again rather than only "corrupt".
  """
  try:
    with formats.open_weights(path) as wf:
      yield wf
  except UserError:
    if entry is not None:
      check_cached(entry, path)
    raise
