"""`WeightSource`: the record of one published weight file, shared by the registry modules.

Its own module so that the registry's parts (`transfer.weights.sources` for the CNNs,
`transfer.weights.vit_sources` for the Vision Transformers) can build records without importing
each other.
"""

from __future__ import annotations

import dataclasses

# Where torchvision publishes its files (`<name>-<sha256 prefix>.pth`).
TORCHVISION_URL = "https://download.pytorch.org/models"
# Hash kinds (`transfer.weights.downloader`): Keras' full md5, torch.hub's sha256 prefix in the
# file name, or none published (the Hugging Face Hub, DINOv2's and Google's AugReg files).
NO_HASH = "none"
HASH_KINDS = ("md5", "sha256_prefix", NO_HASH)


@dataclasses.dataclass(frozen=True)
class WeightSource:
  """One published weight file.

  Attributes:
    id: registry id, `<framework>:<name>` (`keras:vgg16_notop`).
    arch: the `transfer.models` name the file fits.
    url: official download URL; its last part is the cached file name unless `file` says
      otherwise.
    hash_kind: `"md5"` (Keras publishes full md5 digests), `"sha256_prefix"` (torchvision puts
      the first hex digits of the sha256 in the file name) or `"none"` (nothing published: the
      download checks the size the server announces and records the file's sha256 beside it,
      `<file>.sha256`, which every later use of the cached file is checked against).
    hash: the expected digest (or digest prefix); `""` when `hash_kind` is `"none"`.
    format: the reader `transfer.weights.formats` uses (`formats.FORMATS`).
    include_top: whether the file holds the ImageNet top (fc1, fc2, predictions; a ViT's head).
    preprocess: the `transfer.weights.preprocess` mode the weights expect.
    variant: the `transfer.models` variant the file fits (ResNet: `keras` or `torchvision`), or
      None for architectures with one form.
    resize_size: the eval geometry the weights were validated with. None: squash the whole image
      to the input size (Keras' loaders, Google's ViT input pipeline); a number: resize the short
      side to it, then center-crop `input_size` (torchvision's `ImageClassification`: 256, or 232
      for the V2 ResNets; timm's `floor(test_input_size / test_crop_pct)`). See
      `transfer.weights.preprocess.eval_geometry`.
    input_size: the input side that geometry crops (224; 299 for InceptionV3; timm's
      `test_input_size`, e.g. 288).
    interpolation: the resize filter of that geometry, `"bilinear"` or `"bicubic"` (timm's
      recipes).
    hub_url: where the publisher's own library loads the weights from today, when that is
      another file than `url` (timm: the Hugging Face Hub `model.safetensors`, the same tensors
      as `url`'s `.pth`). Shown for reference, never downloaded: no published hash verifies it.
    file: the cached (and official) file name when the URL's last part is not unique: every
      Hugging Face Hub file is `model.safetensors`, so timm's are cached as `<tag>.safetensors`.
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
  input_size: int = 224
  interpolation: str = "bilinear"
  hub_url: str | None = None
  file: str | None = None

  @property
  def filename(self) -> str:
    """The cached file's name: `file`, else the URL's last part."""
    return self.file or self.url.rsplit("/", 1)[-1]

  @property
  def published_hash(self) -> bool:
    """Whether the publisher gives a hash to check the file against."""
    return self.hash_kind != NO_HASH
