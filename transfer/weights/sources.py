"""Known pretrained weight files: where they live, how to verify them, what they hold.

One `WeightSource` per published file, in the spirit of a pretrained-config record: the URL, the
hash that proves a download is the real file, the architecture it fits, whether it carries the
ImageNet top, and the input preprocessing it was trained with. Everything else in
`transfer.weights` reads these records instead of special-casing names.

A config's `weights` string is parsed once, by `resolve`, into a `ParsedSource` (format,
framework, architecture, variant, preprocessing, eval geometry, the record when there is one),
which a run or command passes down instead of the string.

The records themselves: the CNNs' below, the Vision Transformers' in
`transfer.weights.vit_sources`; the record type is `transfer.weights.record.WeightSource`.

Downloads go to a cache, `$TRANSFER_HOME/weights/<filename>` (default `~/.cache/transfer`). Setting
`TRANSFER_WEIGHTS_URL_BASE` replaces the directory part of every URL (a mirror, or a local server
in tests), which serves each file under its cached name: the official one, except for the
Hugging Face Hub's files, all called `model.safetensors`, cached (and mirrored) as
`<tag>.safetensors`.
"""

from __future__ import annotations

import dataclasses
import math
import os

from transfer import home
from transfer.errors import UserError
from transfer.weights import vit_sources
from transfer.weights.record import TORCHVISION_URL, WeightSource

URL_BASE_ENV = "TRANSFER_WEIGHTS_URL_BASE"
OPTIONAL_SUFFIX = "?"

_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications"
_TORCHVISION = TORCHVISION_URL


def _keras(name: str, arch: str, include_top: bool, md5: str, folder: str | None = None,
           variant: str | None = None, preprocess: str = "caffe",
           input_size: int = 224) -> WeightSource:
  suffix = "" if include_top else "_notop"
  url = f"{_KERAS}/{folder or arch}/{arch}_weights_tf_dim_ordering_tf_kernels{suffix}.h5"
  return WeightSource(id=f"keras:{name}", arch=arch, url=url, hash_kind="md5", hash=md5,
                      format="keras_h5", include_top=include_top, preprocess=preprocess,
                      variant=variant, input_size=input_size)


def _keras_resnet(arch: str, md5_top: str, md5_notop: str) -> tuple[WeightSource, ...]:
  """Both files of one Keras ResNet (v1, caffe input), which all live under `resnet/`."""
  return (_keras(arch, arch, True, md5_top, folder="resnet", variant="keras"),
          _keras(f"{arch}_notop", arch, False, md5_notop, folder="resnet", variant="keras"))


def _torchvision(arch: str, sha256_prefix: str, name: str | None = None, resize_size: int = 256,
                 variant: str | None = None, file: str | None = None, preprocess: str = "torch",
                 input_size: int = 224) -> WeightSource:
  """The torchvision file `<file>-<sha256_prefix>.pth` (`file` defaults to `arch`; torch.hub
  checks that prefix), id `torchvision:<name>` (default `arch`)."""
  url = f"{_TORCHVISION}/{file or arch}-{sha256_prefix}.pth"
  return WeightSource(id=f"torchvision:{name or arch}", arch=arch, url=url,
                      hash_kind="sha256_prefix", hash=sha256_prefix, format="torch_pth",
                      include_top=True, preprocess=preprocess, variant=variant,
                      resize_size=resize_size, input_size=input_size)


# md5 digests as published by keras.applications (keras/src/applications/vgg16.py, vgg19.py,
# resnet.py: WEIGHTS_HASHES, top then notop; inception_v3.py: the `file_hash` of WEIGHTS_PATH and
# WEIGHTS_PATH_NO_TOP). torchvision files and eval resize sizes as in
# torchvision/models/{vgg,resnet,inception}.py (0.29): plain ResNet ids are its current default
# weights (IMAGENET1K_V2, resize 232), `_v1` the originals; InceptionV3 has one
# (IMAGENET1K_V1, `inception_v3_google`, ImageClassification(crop_size=299, resize_size=342)).
# Both InceptionV3 files take [-1, 1] input ("tf"; see `transfer.weights.preprocess`) at 299
# (Keras' `InceptionV3` default `input_shape`, squashed by its loaders; torchvision's crop).
_SOURCES: dict[str, WeightSource] = {s.id: s for s in (
    _keras("vgg16", "vgg16", True, "64373286793e3c8b2b4e3219cbf3544b"),
    _keras("vgg16_notop", "vgg16", False, "6d6bbae143d832006294945121d1f1fc"),
    _keras("vgg19", "vgg19", True, "cbe5617147190e668d6c5d5026f83318"),
    _keras("vgg19_notop", "vgg19", False, "253f8cb515780f3b799900260a226db6"),
    *_keras_resnet("resnet50", "2cb95161c43110f7111970584f804107",
                   "4d473c1dd8becc155b73f8504c6f6626"),
    *_keras_resnet("resnet101", "f1aeb4b969a6efcfb50fad2f0c20cfc5",
                   "88cf7a10940856eca736dc7b7e228a21"),
    *_keras_resnet("resnet152", "100835be76be38e30d865e96f2aaae62",
                   "ee4c566cf9a93f14d82f913c2dc6dd0c"),
    _keras("inception_v3", "inception_v3", True, "9a0d58056eeedaa3f26cb7ebd46da564",
           variant="keras", preprocess="tf", input_size=299),
    _keras("inception_v3_notop", "inception_v3", False, "bcbd6486424b2319ff4ef7d526e38f63",
           variant="keras", preprocess="tf", input_size=299),
    _torchvision("vgg16", "397923af"),
    _torchvision("vgg19", "dcbb9e9d"),
    _torchvision("resnet50", "11ad3fa6", "resnet50", 232, "torchvision"),
    _torchvision("resnet50", "0676ba61", "resnet50_v1", 256, "torchvision"),
    _torchvision("resnet101", "cd907fc2", "resnet101", 232, "torchvision"),
    _torchvision("resnet101", "63fe2227", "resnet101_v1", 256, "torchvision"),
    _torchvision("resnet152", "f82ba261", "resnet152", 232, "torchvision"),
    _torchvision("resnet152", "394f9c45", "resnet152_v1", 256, "torchvision"),
    _torchvision("inception_v3", "0cc3c7bd", resize_size=342, variant="torchvision",
                 file="inception_v3_google", preprocess="tf", input_size=299),
)}


# timm (huggingface/pytorch-image-models `timm/models/resnet.py` `default_cfgs`, read at
# aa4b5850). Plain `resnet50/101/152` weights use torchvision's key names and the v1.5 structure,
# so they load into variant `torchvision`. `url` is the cfg's legacy `url` (a GitHub release or
# download.pytorch.org), whose file name carries the first hex digits of the file's sha256 in
# torch.hub's `<name>-<sha256 prefix>.pth` convention: that prefix is the check (timm itself
# skips it by default, `_CHECK_HASH = False`). timm now loads `hf_hub_id='timm/'` + tag from the
# Hugging Face Hub instead (`hub_url`, a `model.safetensors` with the same tensors); no hash of
# that file is published anywhere in timm's sources, so it is recorded but not downloaded.
# Eval geometry: timm's `validate.py` evaluates at `test_input_size` / `test_crop_pct`
# (`use_test_size=not args.use_train_size`), short side `floor(size / crop_pct)`, center crop,
# with the cfg's interpolation; mean/std are IMAGENET_DEFAULT_MEAN/STD, torchvision's.
_TIMM_HUB = "https://huggingface.co/timm"
_TIMM_RSB = "https://github.com/{owner}/pytorch-image-models/releases/download/v0.1-rsb-weights"


def _timm(tag: str, url: str, test_size: int, test_crop_pct: float,
          interpolation: str) -> WeightSource:
  """timm's `<arch>.<tag>` weights (id `timm:<arch>.<tag>`) from its legacy `url`."""
  return WeightSource(id=f"timm:{tag}", arch=tag.split(".")[0], url=url,
                      hash_kind="sha256_prefix", hash=url.rsplit("-", 1)[1].split(".")[0],
                      format="torch_pth", include_top=True, preprocess="torch",
                      variant="torchvision", resize_size=math.floor(test_size / test_crop_pct),
                      input_size=test_size, interpolation=interpolation,
                      hub_url=f"{_TIMM_HUB}/{tag}/resolve/main/model.safetensors")


_SOURCES.update({s.id: s for s in (
    # ResNet Strikes Back recipe A1 (`_rcfg`: test 288, test_crop_pct 1.0, bicubic); timm's
    # default `resnet50` weights.
    _timm("resnet50.a1_in1k", f"{_TIMM_RSB.format(owner='rwightman')}/resnet50_a1_0-14fe96d1.pth",
          288, 1.0, "bicubic"),
    # A1 with heavier augmentation, trained at 176 (`test_input_size=224`, `test_crop_pct=1.0`).
    _timm("resnet50.a1h_in1k",
          f"{_TIMM_RSB.format(owner='huggingface')}/resnet50_a1h2_176-001a1197.pth",
          224, 1.0, "bicubic"),
    # torchvision's IMAGENET1K_V2 file under timm's cfg (`test_crop_pct=0.965`: floor(224 / 0.965)
    # = 232, torchvision's own resize), bilinear.
    _timm("resnet50.tv2_in1k", f"{_TORCHVISION}/resnet50-11ad3fa6.pth", 224, 0.965, "bilinear"),
    _timm("resnet101.a1h_in1k",
          f"{_TIMM_RSB.format(owner='rwightman')}/resnet101_a1h-36d3f2aa.pth", 288, 1.0, "bicubic"),
    _timm("resnet152.a1h_in1k",
          f"{_TIMM_RSB.format(owner='rwightman')}/resnet152_a1h-dc400468.pth", 288, 1.0, "bicubic"),
)})


_SOURCES.update({s.id: s for s in vit_sources.SOURCES})


def ids() -> list[str]:
  """Registered weight ids, sorted."""
  return sorted(_SOURCES)


def is_id(source: str) -> bool:
  """Whether `source` is meant as a registry id (`<framework>:<name>[?]`) rather than a path.

  Unknown names with a known framework prefix count as ids, so `keras:vgg17` gets an "unknown id"
  error listing the valid ones instead of "no such file". A path that exists always wins.
  """
  if os.path.exists(source):
    return False
  frameworks = {i.split(":", 1)[0] for i in _SOURCES}
  return ":" in source and source.split(":", 1)[0] in frameworks


def parse(weights: str | None) -> tuple[str | None, bool]:
  """A config's `weights` as `(source, optional)`: the one place `none` and `?` are read.

  `""` or `"none"` is random initialisation, `(None, False)`; a trailing `?` marks a registry id
  used only if it is already cached (`optional`), and is stripped from `source`.
  """
  if not weights or weights == "none":
    return None, False
  optional = weights.endswith(OPTIONAL_SUFFIX)
  return weights.rstrip(OPTIONAL_SUFFIX), optional


def get(source_id: str) -> WeightSource:
  """The entry for `source_id` (a trailing `?` is ignored); one-line error listing valid ids."""
  key = source_id.rstrip(OPTIONAL_SUFFIX)
  try:
    return _SOURCES[key]
  except KeyError:
    raise UserError(f"unknown weights id {key!r}; valid ids: {', '.join(ids())} "
                     f"(or a path to a .h5/.pth/.safetensors/.npz file)") from None


def cache_dir(override: str | os.PathLike | None = None) -> str:
  """The directory downloaded weights live in: `override`, else `$TRANSFER_HOME/weights`."""
  if override is not None:
    return os.fspath(override)
  return os.path.join(home.path(), "weights")


def cached_path(entry: WeightSource, cache: str | os.PathLike | None = None) -> str:
  """Where `entry` is (or would be) cached."""
  return os.path.join(cache_dir(cache), entry.filename)


def url_for(entry: WeightSource, url_base: str | None = None) -> str:
  """The URL to fetch `entry` from, honouring `url_base` or `$TRANSFER_WEIGHTS_URL_BASE`."""
  base = url_base or os.environ.get(URL_BASE_ENV)
  if not base:
    return entry.url
  return f"{base.rstrip('/')}/{entry.filename}"


# ------------------------------------------------------------------------ a source, parsed once

# Who wrote a file of each format, and the registry prefixes of that framework's own files
# (timm's recipes are not what an arbitrary torch file was made for).
# A `.npz` is a JAX/Flax program's checkpoint (Google's vision_transformer, big_vision).
FRAMEWORKS = {"keras_h5": "keras", "keras3_h5": "keras", "torch_pth": "torch",
              "safetensors": "torch", "npz": "jax"}
_FRAMEWORK_IDS = {"keras": ("keras",), "torch": ("torchvision", "dinov2"), "jax": ("augreg",)}
# A framework's defaults when no record of the architecture says more: Keras' caffe scaling,
# squashed; torchvision's mean/std, short side 256 then the center 224; Google's ViT pipeline's
# [-1, 1], squashed.
_FRAMEWORK_DEFAULTS = {"keras": ("caffe", None), "torch": ("torch", 256), "jax": ("tf", None)}
# Test-sized models (`inception_v3_tiny`) have their full model's layers at a fraction of the
# width: their files take that model's preprocessing.
_TINY = "_tiny"


@dataclasses.dataclass(frozen=True)
class ParsedSource:
  """A config's `weights`, read once per run or command and passed down.

  Preprocessing and eval geometry follow what the weights are (their registry record, or the
  architecture recognised in a file and the framework that wrote it), never a file's extension:
  a Keras InceptionV3 `.h5` of any name takes [-1, 1] input at 299, like `keras:inception_v3`.

  Attributes:
    weights: as given (`keras:vgg16?`, a path, `none`).
    source: the registry id or path without the `?`; None for random initialisation.
    optional: whether a `?` marked it use-if-cached.
    preprocess: the `transfer.weights.preprocess` mode (`unit` for random initialisation).
    entry: the registry record: of an id, or of a file given by its official file name.
    format: the file format (`transfer.weights.formats.FORMATS`); None for random init.
    framework: `keras`, `torch` or `jax` (a `.npz`), who wrote the weights; None for random
      init.
    arch: the architecture (the record's, or recognised in the file); None when unknown.
    variant: the variant of `arch` the weights need (ResNet, InceptionV3), else None.
    resize_size, input_size, interpolation: the eval geometry, as in `WeightSource`.
    include_top: whether the weights hold the ImageNet top (the record's; a file's, from its
      layers); None for random init or a file of no registered architecture.
  """

  weights: str
  source: str | None
  optional: bool
  preprocess: str
  entry: WeightSource | None = None
  format: str | None = None
  framework: str | None = None
  arch: str | None = None
  variant: str | None = None
  resize_size: int | None = None
  input_size: int = 224
  interpolation: str = "bilinear"
  include_top: bool | None = None


def resolve(weights: str | None) -> ParsedSource:
  """Parses a config's `weights` once: the one place a weight source's properties are decided.

  A registry id (with or without `?`) is its record; nothing is downloaded or read. A path
  whose file name is an official one (`resnet50-11ad3fa6.pth`) is that record too. Any other
  path is opened (shapes only, no arrays) and its architecture recognised by structure, as
  `transfer weights info` shows it (`recognition.recognise`); its framework comes from the
  file's format (Keras HDF5 or a torch state dict).

  Args:
    weights: a registry id, a path to a weight file, or `""`/`"none"`/None (random init).

  Returns:
    A `ParsedSource`.

  Raises:
    UserError: an unknown registry id, or a path that is no readable weight file.
  """
  source, optional = parse(weights)
  given = weights or "none"
  if source is None:
    return ParsedSource(weights=given, source=None, optional=False, preprocess="unit")
  entry = get(source) if is_id(source) else official_file(source)
  if entry is not None:
    return from_entry(entry, weights=given, source=source, optional=optional)
  from transfer.weights import recognition  # Deferred: recognising a file needs the models.
  return for_file(source, recognition.recognise(source), weights=given, optional=optional)


def from_entry(entry: WeightSource, *, weights: str | None = None, source: str | None = None,
               optional: bool = False) -> ParsedSource:
  """The `ParsedSource` of a registry record (given by id, or as its official file's path)."""
  return ParsedSource(weights=weights or entry.id, source=source or entry.id, optional=optional,
                      preprocess=entry.preprocess, entry=entry, format=entry.format,
                      framework=FRAMEWORKS[entry.format], arch=entry.arch,
                      variant=entry.variant, resize_size=entry.resize_size,
                      input_size=entry.input_size, interpolation=entry.interpolation,
                      include_top=entry.include_top)


def for_file(path: str, found, *, weights: str | None = None,
             optional: bool = False) -> ParsedSource:
  """The `ParsedSource` of a weight file whose contents were recognised (`found`: a
  `recognition.Recognised`: format, architecture, variant, top, publisher, trained size).

  An official file name is its record. Otherwise the preprocessing and geometry are those of
  the publisher's own published files of the architecture, where they agree: the publisher a
  file's names reveal (a ViT written by timm, torchvision, DINOv2 or Google: timm's AugReg
  [-1, 1] at 248/224 bicubic, torchvision's mean/std), else the framework's (a torch
  InceptionV3 file: `tf` at 342/299, as `torchvision:inception_v3`). Records of the size the
  file was trained at (a ViT's position grid) decide first (an AugReg file at 384 evaluates as
  timm's 384 tags). Where they disagree, the framework's defaults (Keras: caffe, squashed to
  224; torch: mean/std, 256/224; jax: [-1, 1], squashed), at the trained size when known.
  """
  entry = official_file(path)
  if entry is not None:
    return from_entry(entry, weights=weights or path, source=path, optional=optional)
  framework = FRAMEWORKS[found.format]
  mode, resize = _FRAMEWORK_DEFAULTS[framework]
  size, interpolation = found.trained_size or 224, "bilinear"
  own = _publisher_records(found.arch, framework, found.publisher)
  if len({e.preprocess for e in own}) == 1:
    mode = own[0].preprocess
  at_size = [e for e in own if e.input_size == found.trained_size] or own
  geometries = {(e.resize_size, e.input_size, e.interpolation) for e in at_size}
  if len(geometries) == 1:
    resize, size, interpolation = geometries.pop()
  return ParsedSource(weights=weights or path, source=path, optional=optional, preprocess=mode,
                      format=found.format, framework=framework, arch=found.arch,
                      variant=found.variant, resize_size=resize, input_size=size,
                      interpolation=interpolation, include_top=found.include_top)


def official_file(path: str) -> WeightSource | None:
  """The registry record whose official file name `path` has (a file downloaded by hand).

  A name shared by several records is one file listed under several ids (timm's
  `resnet50.tv2_in1k` is torchvision's `resnet50-11ad3fa6.pth`); the Hugging Face Hub's
  `model.safetensors`, every timm tag's, is no record's name (they are `<tag>.safetensors`), so
  such a file is recognised by its contents.
  """
  name = os.path.basename(path)
  return next((s for s in _SOURCES.values() if s.filename == name), None)


# A family's publisher, as its files' names reveal it (`recognition.Recognised.publisher`), ->
# the registry ids of that publisher's own files.
_PUBLISHER_IDS = {"timm": ("timm",), "torchvision": ("torchvision",), "dinov2": ("dinov2",),
                  "dinov2_reg": ("dinov2",), "big_vision": ("augreg",)}


def _publisher_records(arch: str | None, framework: str,
                       publisher: str | None = None) -> list[WeightSource]:
  """The registry records of `arch` (or the full model of a tiny one) from `publisher`, or,
  where the file does not say, from `framework`'s publishers."""
  if arch is None:
    return []
  if arch.endswith(_TINY) and not any(s.arch == arch for s in _SOURCES.values()):
    arch = arch[:-len(_TINY)]
  prefixes = tuple(f"{p}:" for p in _PUBLISHER_IDS.get(publisher) or _FRAMEWORK_IDS[framework])
  return [s for s in _SOURCES.values() if s.arch == arch and s.id.startswith(prefixes)]
