"""Known pretrained weight files: where they live, how to verify them, what they hold.

One `WeightSource` per published file, in the spirit of a pretrained-config record: the URL, the
hash that proves a download is the real file, the architecture it fits, whether it carries the
ImageNet top, and the input preprocessing it was trained with. Everything else in
`transfer.weights` reads these records instead of special-casing names.

Downloads go to a cache, `$TRANSFER_HOME/weights/<filename>` (default `~/.cache/transfer`). Setting
`TRANSFER_WEIGHTS_URL_BASE` replaces the directory part of every URL (a mirror, or a local server
in tests); the file names stay the official ones.
"""

from __future__ import annotations

import dataclasses
import os

from transfer.errors import UserError

URL_BASE_ENV = "TRANSFER_WEIGHTS_URL_BASE"
HOME_ENV = "TRANSFER_HOME"
OPTIONAL_SUFFIX = "?"

_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications"
_TORCHVISION = "https://download.pytorch.org/models"


@dataclasses.dataclass(frozen=True)
class WeightSource:
  """One published weight file.

  Attributes:
    id: registry id, `<framework>:<name>` (`keras:vgg16_notop`).
    arch: the `transfer.models` name the file fits.
    url: official download URL; its last part is the cached file name.
    hash_kind: `"md5"` (Keras publishes full md5 digests) or `"sha256_prefix"` (torchvision puts
      the first hex digits of the sha256 in the file name).
    hash: the expected digest (or digest prefix).
    format: `"keras_h5"` or `"torch_pth"`, the reader `transfer.weights.formats` uses.
    include_top: whether the file holds the ImageNet top (fc1, fc2, predictions).
    preprocess: the `transfer.weights.preprocess` mode the weights expect.
    variant: the `transfer.models` variant the file fits (ResNet: `keras` or `torchvision`), or
      None for architectures with one form.
    resize_size: the eval geometry the weights were validated with. None: squash the whole image
      to the input size (Keras' loaders); a number: resize the short side to it, then center-crop
      the 224 input (torchvision's `ImageClassification`; 256, or 232 for the V2 ResNets). See
      `transfer.weights.preprocess.eval_resize`.
    crop_size: the input side `resize_size` goes with (299 for InceptionV3, else 224).
  """

  id: str
  arch: str
  url: str
  hash_kind: str
  hash: str
  format: str
  include_top: bool
  preprocess: str
  variant: str | None = None
  resize_size: int | None = None
  crop_size: int = 224

  @property
  def filename(self) -> str:
    return self.url.rsplit("/", 1)[-1]


def _keras(name: str, arch: str, include_top: bool, md5: str, folder: str | None = None,
           variant: str | None = None, preprocess: str = "caffe") -> WeightSource:
  suffix = "" if include_top else "_notop"
  url = f"{_KERAS}/{folder or arch}/{arch}_weights_tf_dim_ordering_tf_kernels{suffix}.h5"
  return WeightSource(id=f"keras:{name}", arch=arch, url=url, hash_kind="md5", hash=md5,
                      format="keras_h5", include_top=include_top, preprocess=preprocess,
                      variant=variant)


def _keras_resnet(arch: str, md5_top: str, md5_notop: str) -> tuple[WeightSource, ...]:
  """Both files of one Keras ResNet (v1, caffe input), which all live under `resnet/`."""
  return (_keras(arch, arch, True, md5_top, folder="resnet", variant="keras"),
          _keras(f"{arch}_notop", arch, False, md5_notop, folder="resnet", variant="keras"))


def _torchvision(arch: str, sha256_prefix: str, name: str | None = None, resize_size: int = 256,
                 variant: str | None = None, file: str | None = None, preprocess: str = "torch",
                 crop_size: int = 224) -> WeightSource:
  """The torchvision file `<file>-<sha256_prefix>.pth` (`file` defaults to `arch`; torch.hub
  checks that prefix), id `torchvision:<name>` (default `arch`)."""
  url = f"{_TORCHVISION}/{file or arch}-{sha256_prefix}.pth"
  return WeightSource(id=f"torchvision:{name or arch}", arch=arch, url=url,
                      hash_kind="sha256_prefix", hash=sha256_prefix, format="torch_pth",
                      include_top=True, preprocess=preprocess, variant=variant,
                      resize_size=resize_size, crop_size=crop_size)


# md5 digests as published by keras.applications (keras/src/applications/vgg16.py, vgg19.py,
# resnet.py: WEIGHTS_HASHES, top then notop; inception_v3.py: the `file_hash` of WEIGHTS_PATH and
# WEIGHTS_PATH_NO_TOP). torchvision files and eval resize sizes as in
# torchvision/models/{vgg,resnet,inception}.py (0.29): plain ResNet ids are its current default
# weights (IMAGENET1K_V2, resize 232), `_v1` the originals; InceptionV3 has one
# (IMAGENET1K_V1, `inception_v3_google`, ImageClassification(crop_size=299, resize_size=342)).
# Both InceptionV3 files take [-1, 1] input ("tf"; see `transfer.weights.preprocess`).
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
           variant="keras", preprocess="tf"),
    _keras("inception_v3_notop", "inception_v3", False, "bcbd6486424b2319ff4ef7d526e38f63",
           variant="keras", preprocess="tf"),
    _torchvision("vgg16", "397923af"),
    _torchvision("vgg19", "dcbb9e9d"),
    _torchvision("resnet50", "11ad3fa6", "resnet50", 232, "torchvision"),
    _torchvision("resnet50", "0676ba61", "resnet50_v1", 256, "torchvision"),
    _torchvision("resnet101", "cd907fc2", "resnet101", 232, "torchvision"),
    _torchvision("resnet101", "63fe2227", "resnet101_v1", 256, "torchvision"),
    _torchvision("resnet152", "f82ba261", "resnet152", 232, "torchvision"),
    _torchvision("resnet152", "394f9c45", "resnet152_v1", 256, "torchvision"),
    _torchvision("inception_v3", "0cc3c7bd", resize_size=342, variant="torchvision",
                 file="inception_v3_google", preprocess="tf", crop_size=299),
)}


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
                     f"(or a path to a .h5/.pth/.safetensors file)") from None


def cache_dir(override: str | os.PathLike | None = None) -> str:
  """The directory downloaded weights live in: `override`, else `$TRANSFER_HOME/weights`."""
  if override is not None:
    return os.fspath(override)
  home = os.environ.get(HOME_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "transfer")
  return os.path.join(home, "weights")


def cached_path(entry: WeightSource, cache: str | os.PathLike | None = None) -> str:
  """Where `entry` is (or would be) cached."""
  return os.path.join(cache_dir(cache), entry.filename)


def url_for(entry: WeightSource, url_base: str | None = None) -> str:
  """The URL to fetch `entry` from, honouring `url_base` or `$TRANSFER_WEIGHTS_URL_BASE`."""
  base = url_base or os.environ.get(URL_BASE_ENV)
  if not base:
    return entry.url
  return f"{base.rstrip('/')}/{entry.filename}"
