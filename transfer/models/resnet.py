"""ResNet50/101/152 (He et al., 2015) in Flax linen, in both of the forms ImageNet weights exist in.

Keras' `keras.applications.ResNet50` and torchvision's `resnet50` are different networks:

| | Keras ("keras", ResNet v1) | torchvision and timm ("torchvision", v1.5) |
| --- | --- | --- |
| stride of a stage's first block | on the first 1x1 convolution | on the 3x3 convolution |
| convolution bias | yes | no |
| BatchNorm epsilon | 1.001e-5 | 1e-5 |

Both variants use the Keras layer names (`conv1_conv`, `conv2_block1_1_conv`, `conv2_block1_0_bn`,
..., `predictions`), so freezing patterns such as `^conv5_` read the same for either; the weight
porter maps torchvision's state-dict names (`layer4.0.conv1`) onto them (`porting`, this family's
adapter). The stage dispatch and heads are `transfer.models.backbone.Classifier`'s.

BatchNorm layers keep their running statistics in the `batch_stats` collection. With `train=True`
they normalise with batch statistics and update the running ones, except the layers in
`frozen_batch_norm` (`Classifier.batch_norm_mode`); with `train=False`, inference mode.
"""

from __future__ import annotations

import re
from typing import Sequence

import flax.linen as nn

from transfer.errors import UserError
from transfer.models import winograd
from transfer.models.backbone import Classifier
from transfer.models.spec import BATCH_NORM, CONV, DENSE, Porting, kinds_by_suffix

VARIANTS = ("keras", "torchvision")
_EPSILON = {"keras": 1.001e-5, "torchvision": 1e-5}
# Flax's momentum weighs the old statistic: Keras' momentum=0.99, torch's momentum=0.1.
_MOMENTUM = {"keras": 0.99, "torchvision": 0.9}


def layer_names(stage_sizes: Sequence[int]) -> tuple[str, ...]:
  """Every conv and BatchNorm layer of the backbone in forward order (Keras names)."""
  names = ["conv1_conv", "conv1_bn"]
  for s, blocks in enumerate(stage_sizes, start=2):
    for b in range(1, blocks + 1):
      prefix = f"conv{s}_block{b}"
      if b == 1:
        names += [f"{prefix}_0_conv", f"{prefix}_0_bn"]
      for k in (1, 2, 3):
        names += [f"{prefix}_{k}_conv", f"{prefix}_{k}_bn"]
  return tuple(names)


def layer_kinds(stage_sizes: Sequence[int]) -> dict[str, str]:
  """Every backbone and top layer -> its kind (`*_conv`, `*_bn`, the dense `predictions`)."""
  kinds = kinds_by_suffix(layer_names(stage_sizes), {"_conv": CONV, "_bn": BATCH_NORM})
  return {**kinds, "predictions": DENSE}


def torch_names(stage_sizes: Sequence[int]) -> dict[str, str]:
  """Our layer name -> torchvision state-dict prefix (`conv2_block1_1_conv` -> `layer1.0.conv1`)."""
  names = {"conv1_conv": "conv1", "conv1_bn": "bn1", "predictions": "fc"}
  for s, blocks in enumerate(stage_sizes, start=2):
    for b in range(1, blocks + 1):
      ours, theirs = f"conv{s}_block{b}", f"layer{s - 1}.{b - 1}"
      names[f"{ours}_0_conv"] = f"{theirs}.downsample.0"
      names[f"{ours}_0_bn"] = f"{theirs}.downsample.1"
      for k in (1, 2, 3):
        names[f"{ours}_{k}_conv"] = f"{theirs}.conv{k}"
        names[f"{ours}_{k}_bn"] = f"{theirs}.bn{k}"
  return names


# timm's ResNet-D family (`resnet50d`, `resnet101d`, ...: `stem_type='deep'`, `avg_down=True`)
# replaces the 7x7 stem by three 3x3 convs (`conv1.0`, `conv1.1` BN, `conv1.3`, ...) and puts an
# average pool before each shortcut conv (`downsample.0` pool, `.1` conv, `.2` BN). Their keys
# overlap torchvision's enough that the strict merge would list dozens of names instead of
# saying what the file is.
_DEEP_STEM = re.compile(r"^conv1\.\d+$")
_AVG_DOWN = re.compile(r"^layer\d+\.\d+\.downsample\.2$")


def unsupported_structure(torch_layers: Sequence[str]) -> str | None:
  """Why a torch state dict (its module prefixes) is a ResNet form we do not build (timm's
  ResNet-D), or None; a phrase for the error."""
  deep_stem = any(_DEEP_STEM.match(layer) for layer in torch_layers)
  avg_down = any(_AVG_DOWN.match(layer) for layer in torch_layers)
  if not (deep_stem or avg_down):
    return None
  what = " and ".join(part for part, present in (
      ("a three-conv stem (conv1.0, conv1.3, ...)", deep_stem),
      ("average-pool shortcuts (downsample.1 conv, downsample.2 BN)", avg_down)) if present)
  kind = "deep-stem ResNet-D" if deep_stem else "average-pool-shortcut ResNet-D"
  return (f"{kind} is not supported; the file has {what}, as timm's resnet50d/101d/152d; use "
          f"plain ResNet weights (torchvision's, or timm's resnet50/101/152.* tags such as "
          f"timm:resnet50.a1_in1k)")


def porting(stage_sizes: Sequence[int]) -> Porting:
  """The ResNet family's adapter: Keras names its layers as we do; torchvision by `torch_names`;
  timm's ResNet-D files are refused with the reason."""
  return Porting(torch_names=torch_names(stage_sizes), unsupported=unsupported_structure)


class ResNet(Classifier):
  """A bottleneck ResNet (50, 101, 152 layers) in the Keras (v1) or torchvision (v1.5) form.

  Attributes (besides `Classifier`'s; `"imagenet"` is global average pooling and the 1000-way
  `predictions` layer):
    stage_sizes: bottleneck blocks per stage, e.g. (3, 4, 6, 3) for ResNet50.
    variant: `"keras"` or `"torchvision"` (see the module docstring).
    width: channels of the stem and of the first stage's bottleneck (64 in the real networks);
      stage s uses width * 2**s inside its blocks and 4x that at its output. BatchNorm
      statistics stay float32; Winograd runs only the stride-1 3x3 convolutions.
  """

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  variant: str = "torchvision"
  width: int = 64

  def check(self) -> None:
    if self.variant not in VARIANTS:
      raise UserError(f"unknown ResNet variant {self.variant!r}; valid: {', '.join(VARIANTS)}")

  def _conv(self, x, features: int, size: int, stride: int, name: str):
    if size == 3 and stride == 1:
      padding = "SAME"
      fast = winograd.use_for(self.conv, x.shape[-1])
    else:  # torch's symmetric padding (XLA's SAME pads a strided 3x3 on one side only)
      padding = [((size - 1) // 2, (size - 1) // 2)] * 2
      fast = False
    return nn.Conv(features, (size, size), strides=(stride, stride), padding=padding,
                   use_bias=self.variant == "keras", dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name,
                   conv_general_dilated=winograd.conv_general_dilated if fast else None)(x)

  def _bn(self, x, name: str, train: bool):
    # A training layer's variance is the mean of squared deviations from the global-batch mean
    # (two cross-device means), not Flax's default E[x^2] - E[x]^2 in one: that difference
    # cancels most of its digits when a channel's mean is large against its spread, and the
    # lost digits differ with the device count. The centered form is what Keras
    # (`tf.nn.moments`) and torch compute, and keeps 1, 2 and 4 devices within 1e-5 of each
    # other (tests/test_batchnorm.py). Inference-mode layers compute no statistics: the frozen
    # path is unchanged.
    running, axis = self.batch_norm_mode(name, train)
    return nn.BatchNorm(use_running_average=running, momentum=_MOMENTUM[self.variant],
                        epsilon=_EPSILON[self.variant], dtype=self.dtype,
                        param_dtype=self.param_dtype, use_fast_variance=False,
                        axis_name=axis, name=name)(x)

  def backbone(self, x, train: bool = False, example_ids=None):
    """Stem and bottleneck stages -> the conv5 map; called inside `__call__`'s compact scope."""
    x = self._conv(x, self.width, 7, 2, "conv1_conv")
    x = nn.relu(self._bn(x, "conv1_bn", train))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for s, blocks in enumerate(self.stage_sizes):
      inner = self.width * 2 ** s
      for b in range(blocks):
        stride = 2 if s > 0 and b == 0 else 1
        x = self._bottleneck(x, inner, stride, f"conv{s + 2}_block{b + 1}", b == 0, train)
    return x

  def _bottleneck(self, x, inner: int, stride: int, prefix: str, project: bool,
                  train: bool):
    v1 = self.variant == "keras"
    shortcut = x
    if project:
      shortcut = self._conv(x, 4 * inner, 1, stride, f"{prefix}_0_conv")
      shortcut = self._bn(shortcut, f"{prefix}_0_bn", train)
    y = self._conv(x, inner, 1, stride if v1 else 1, f"{prefix}_1_conv")
    y = nn.relu(self._bn(y, f"{prefix}_1_bn", train))
    y = self._conv(y, inner, 3, 1 if v1 else stride, f"{prefix}_2_conv")
    y = nn.relu(self._bn(y, f"{prefix}_2_bn", train))
    y = self._conv(y, 4 * inner, 1, 1, f"{prefix}_3_conv")
    y = self._bn(y, f"{prefix}_3_bn", train)
    return nn.relu(shortcut + y)
