"""What the rest of the package knows about an architecture: its `ModelSpec` and layer kinds.

A spec is generic: a builder, the backbone's layers in forward order with the kind of each
(`CONV`, `DENSE`, `BATCH_NORM`, `LAYER_NORM`, `EMBEDDING`), the ImageNet top's layers, input
sizes, variants. Everything that treats layers by kind reads the declaration here, never the
shapes of the arrays: porting (`transfer.weights.port`), `train_bn` and the BatchNorm mode
(`transfer.optim.batch_norm_layers`), export. A LayerNorm has a `scale` and a `bias` like a
BatchNorm; only its declared kind tells them apart.

How a framework's weight files name and order the layers is the family's `Porting` adapter
(built in the family's module: `vgg.porting`, `resnet.porting`, `inception.porting`), carried by
the spec as `spec.port` and read by the porting code without knowing the family.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn

# Layer kinds. A kind says which arrays a layer holds and how frameworks store them:
CONV = "conv"              # kernel (H, W, in, out) [+ bias]
DENSE = "dense"            # kernel (in, out) [+ bias]
BATCH_NORM = "batch_norm"  # scale, bias (params) + mean, var (batch_stats)
LAYER_NORM = "layer_norm"  # scale, bias (params); no statistics
EMBEDDING = "embedding"    # a table or a learned tensor (class token, position embeddings)
KINDS = (CONV, DENSE, BATCH_NORM, LAYER_NORM, EMBEDDING)


@dataclasses.dataclass(frozen=True)
class Porting:
  """How one architecture family's weight files in other frameworks name and order its layers.

  Attributes:
    torch_names: our layer name -> torch state-dict prefix (`block5_conv3` -> `features.28`).
    torch_ignored: torch state-dict prefixes of parts the model leaves out by design
      (InceptionV3's auxiliary classifier `AuxLogits`): ignored, and reported.
    torch_flatten: `(layer, side)`: the dense layer fed by a flatten of a side x side feature
      map (VGG's `fc1`), whose input rows torch orders C,H,W and we H,W,C; None when none is.
    keras_order: where Keras generates the layer names (InceptionV3's `conv2d_17`), our layer
      names in the order Keras lists its layers, matched by kind and position; None when Keras
      files name the layers as we do.
    unsupported: torch state-dict prefixes -> why the file is a form of the family this
      package does not build (timm's ResNet-D), or None.
    resample: `(layer, param, file shape, model shape, dialect)` -> a function that turns the
      file's array into the model's shape (a ViT's position embeddings, interpolated over the
      patch grid for another image size, as the file's publisher does it), or None where it
      does not apply; None: no resampling.
    convert: `(format, tensors by full key)` -> the same tensors under the family's torch
      names (`torch_names`' right-hand side) and torch layouts, for families whose publishers
      name their files differently (a ViT: torchvision's, DINOv2's, Google's `.npz`, renamed to
      timm's); None: torch files are read as they are, other formats are not converted.
    dialect: `(format, keys)` -> who wrote the file (`"timm"`, `"torchvision"`, ...), for
      `resample` and for the publisher's preprocessing of a file given by path; None when
      the family has one publisher's layout.
    trained_size: a file's view under our names -> the input side it was trained at (a ViT's
      position grid times its patch), or None; None: the file does not say.
    torch_params: our `embedding` layer -> the torch parameter name under its module prefix
      (a ViT's layer scale `block0_ls1` -> `gamma`: `blocks.0.ls1.gamma`), for writing torch
      state dicts; an embedding layer not listed is a bare tensor (`cls_token`).
  """

  torch_names: Mapping[str, str]
  torch_ignored: tuple[str, ...] = ()
  torch_flatten: tuple[str, int] | None = None
  keras_order: tuple[str, ...] | None = None
  unsupported: Callable[[Sequence[str]], str | None] = lambda layers: None
  resample: Callable[[str, str, tuple, tuple, str | None], Callable | None] | None = None
  convert: Callable[[str, Mapping[str, Any]], dict[str, Any]] | None = None
  dialect: Callable[[str, Sequence[str]], str | None] | None = None
  trained_size: Callable[[Mapping[str, Any]], int | None] | None = None
  torch_params: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the rest of the package needs to know about one architecture.

  Attributes:
    name: registry name.
    build: keyword arguments -> module.
    conv_layers: the backbone's layer names in forward order (the frozen part; BatchNorm
      layers included).
    top_layers: ImageNet-top layer names in forward order.
    layer_kinds: every backbone and top layer -> its kind (`CONV`, `BATCH_NORM`, ...).
    port: the family's `Porting` adapter (framework names and order).
    family: the architecture family (`vgg`, `resnet`, `inception_v3`).
    top_image_size: the input size the ImageNet top was trained for.
    min_image_size: smallest input the backbone accepts.
    feature_stride: input side / feature-map side.
    top_fixed_size: whether the ImageNet top takes only `top_image_size` (VGG's flatten) or any
      size (a global average pool).
    variants: the architecture variants weight files need (ResNet: `keras`, `torchvision`);
      empty when there is one. The first is the default.
    blocks: name prefixes of the backbone's blocks in forward order (`stem`, `mixed0`, ...), so
      an error can say which block of a file does not fit; empty when layer names say it.
    variant_traits: variant -> what a file of that variant is, in words, for the error when a
      file needs the other variant.
    options: the family's own build options `transfer.models.get` passes on (a ViT's
      `token_pool`, `drop_path_rate`, `attention`); empty for the CNNs.
    size_multiple: the input side must be a multiple of it (a ViT's patch); 1: any side.
    layer_depth: layer name -> the depth it sits at, for layer-wise learning-rate decay
      (`transfer.optim`, `layer_decay`): 0 the embeddings, i + 1 block i, the largest value
      the top (any other name, e.g. the new `head`, gets that largest value too); None for a
      model without such a depth (the CNNs).
  """

  name: str
  build: Callable[..., nn.Module]
  conv_layers: tuple[str, ...]
  top_layers: tuple[str, ...]
  layer_kinds: Mapping[str, str]
  port: Porting
  family: str = ""
  top_image_size: int = 224
  min_image_size: int = 32
  feature_stride: int = 32
  top_fixed_size: bool = True
  variants: tuple[str, ...] = ()
  blocks: tuple[str, ...] = ()
  variant_traits: Mapping[str, str] = dataclasses.field(default_factory=dict)
  options: tuple[str, ...] = ()
  size_multiple: int = 1
  layer_depth: Callable[[str], int] | None = None

  def __post_init__(self):
    undeclared = [n for n in self.conv_layers + self.top_layers if n not in self.layer_kinds]
    unknown = sorted({k for k in self.layer_kinds.values() if k not in KINDS})
    if undeclared or unknown:
      raise ValueError(f"{self.name}: layers without a kind {undeclared[:5]}, "
                       f"unknown kinds {unknown}")

  @property
  def batch_norm(self) -> bool:
    """Whether the network has BatchNorm layers (a `batch_stats` collection)."""
    return BATCH_NORM in self.layer_kinds.values()

  # The framework names as they were read before they moved to the family's adapter.
  @property
  def torch_names(self) -> Mapping[str, str]:
    return self.port.torch_names

  @property
  def keras_order(self) -> tuple[str, ...] | None:
    return self.port.keras_order

  @property
  def torch_ignored(self) -> tuple[str, ...]:
    return self.port.torch_ignored

  def kind(self, layer: str) -> str | None:
    """The declared kind of a top-level layer (None for the head module and unknown names)."""
    return self.layer_kinds.get(layer)

  def is_head(self, path: str) -> bool:
    """Whether a param path (`head/logits/kernel`, `fc1/kernel`) is classifier, not backbone.

    Cached features, freezing reports and the like ask the spec, so a new backbone states its
    own top layers instead of every caller knowing VGG's.
    """
    first = path.split("/")[0]
    return first == "head" or first in self.top_layers


def kinds_by_suffix(layers: Sequence[str], suffixes: Mapping[str, str]) -> dict[str, str]:
  """`{layer: kind}` for layer names whose kind their suffix says (`_conv`, `_bn`)."""
  out = {}
  for layer in layers:
    kind = next((k for s, k in suffixes.items() if layer.endswith(s)), None)
    if kind is None:
      raise ValueError(f"no kind for layer {layer!r} (suffixes: {', '.join(suffixes)})")
    out[layer] = kind
  return out
