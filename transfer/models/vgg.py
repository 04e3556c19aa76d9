"""VGG16 and VGG19 (Simonyan & Zisserman, 2014) in Flax linen, laid out like Keras.

Parameter names are the Keras layer names (`block1_conv1` ... `block5_conv3`, `fc1`, `fc2`,
`predictions`) so that weight files port by name and freeze patterns read like Keras code. Input is
NHWC. The stage dispatch and heads are `transfer.models.backbone.Classifier`'s; this module
declares the backbone (conv blocks), the flatten ImageNet top, the layer kinds and the porting
adapter (torchvision's `features.N` / `classifier.N` names).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from transfer.models import heads, winograd
from transfer.models.backbone import Classifier
from transfer.models.spec import CONV, DENSE, Porting

TOP_LAYERS = ("fc1", "fc2", "predictions")


def layer_names(stage_sizes: Sequence[int]) -> tuple[str, ...]:
  """The conv layers in forward order (`block1_conv1` ...)."""
  return tuple(f"block{b}_conv{i}" for b, n in enumerate(stage_sizes, 1) for i in range(1, n + 1))


def layer_kinds(stage_sizes: Sequence[int]) -> dict[str, str]:
  """Every backbone and top layer -> its kind: convs, then the dense ImageNet top."""
  return {**{n: CONV for n in layer_names(stage_sizes)}, **{n: DENSE for n in TOP_LAYERS}}


def porting(stage_sizes: Sequence[int], image_size: int = 224, stride: int = 32) -> Porting:
  """torchvision's names: the `features` Sequential holds Conv, ReLU per conv and one MaxPool
  per block; `classifier` holds fc1, fc2, predictions with ReLU and Dropout between. fc1 reads
  a C,H,W flatten of the block5_pool map."""
  names, index = {}, 0
  for b, n in enumerate(stage_sizes, 1):
    for i in range(1, n + 1):
      names[f"block{b}_conv{i}"] = f"features.{index}"
      index += 2
    index += 1
  names.update({"fc1": "classifier.0", "fc2": "classifier.3", "predictions": "classifier.6"})
  return Porting(torch_names=names, torch_flatten=("fc1", image_size // stride))


class VGG(Classifier):
  """A VGG network: `len(stage_sizes)` blocks of 3x3 convs, each followed by 2x2 max pooling.

  Attributes (besides `Classifier`'s):
    stage_sizes: conv layers per block, e.g. (2, 2, 3, 3, 3) for VGG16.
    widths: output channels per block.
    top_hidden: width of fc1/fc2 in the ImageNet top (4096 for the real network); that top
      flattens the block5_pool map, so it needs 224x224 input.
  """

  stage_sizes: Sequence[int] = (2, 2, 3, 3, 3)
  widths: Sequence[int] = (64, 128, 256, 512, 512)
  top_hidden: int = 4096

  def backbone(self, x, train: bool = False, example_ids=None):
    """Conv blocks -> the block5_pool map; called inside `__call__`'s compact scope."""
    for block, (size, width) in enumerate(zip(self.stage_sizes, self.widths), start=1):
      for i in range(1, size + 1):
        fast = winograd.use_for(self.conv, x.shape[-1])
        x = nn.Conv(width, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype,
                    conv_general_dilated=winograd.conv_general_dilated if fast else None,
                    name=f"block{block}_conv{i}")(x)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return x

  def imagenet_top(self, x):
    """Keras' VGG top: Flatten, fc1, fc2, predictions (`heads.imagenet_top`)."""
    return heads.imagenet_top(x, num_classes=self.num_classes, hidden=self.top_hidden,
                              dtype=self.dtype, param_dtype=self.param_dtype)
