"""VGG16 and VGG19 (Simonyan & Zisserman, 2014) in Flax linen, laid out like Keras.

Parameter names are the Keras layer names (`block1_conv1` ... `block5_conv3`, `fc1`, `fc2`,
`predictions`) so that weight files port by name and freeze patterns read like Keras code. Input is
NHWC. The module returns logits; probabilities are the caller's business.

One module serves three uses through `stage`:
  * `"full"` (default): image -> logits (or the feature map with `head="none"`);
  * `"features"`: image -> block5_pool feature map, the frozen part of transfer learning;
  * `"head"`: feature map -> logits, so a train step or a feature cache can run the head alone.
"""

from __future__ import annotations

from transfer.errors import UserError

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from transfer.models import heads, winograd

STAGES = ("full", "features", "head")


class VGG(nn.Module):
  """A VGG network: `len(stage_sizes)` blocks of 3x3 convs, each followed by 2x2 max pooling.

  Attributes:
    stage_sizes: conv layers per block, e.g. (2, 2, 3, 3, 3) for VGG16.
    arch: the registry name (`vgg16`, ...), so weight porters can find the layer map.
    widths: output channels per block.
    head: `"imagenet"` (fc1/fc2/predictions, needs 224x224 input), `"flatten_dense"`, `"gap"` or
      `"none"` (return the block5_pool feature map).
    num_classes: outputs of the head (1 = one sigmoid logit).
    head_hidden / head_dropout: hidden width and dropout of the head, `None` for its default.
    top_hidden: width of fc1/fc2 in the ImageNet top (4096 for the real network).
    dtype: compute dtype (e.g. bfloat16); logits are always returned in float32.
    param_dtype: parameter dtype (float32 for training, even when computing in bfloat16).
    conv: a concrete choice of the layers that run by Winograd: `"xla"` (none), `"winograd"`
      (all) or `"winograd_from_N"` (those with at least N input channels); `transfer.models.get`
      resolves a config's `"auto"` to one of them. The parameters are the same either way.
  """

  stage_sizes: Sequence[int]
  arch: str = "vgg"
  widths: Sequence[int] = (64, 128, 256, 512, 512)
  head: str = "imagenet"
  num_classes: int = 1000
  head_hidden: int | None = None
  head_dropout: float | None = None
  top_hidden: int = 4096
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv: str = "xla"

  @nn.compact
  def __call__(self, x, train: bool = False, stage: str = "full", example_ids=None):
    """Runs the network (or one stage of it).

    Args:
      x: NHWC images already preprocessed for the weights (see `transfer.weights.preprocess`),
        or, for `stage="head"`, the block5_pool feature map.
      train: enables dropout in the head; needs a `"dropout"` RNG in `apply`.
      stage: `"full"`, `"features"` or `"head"` (see the module docstring).
      example_ids: (N,) global example indices; when given, dropout masks are keyed per example
        so results do not depend on how the batch is split over devices.

    Returns:
      float32 logits of shape (N, num_classes), or the feature map for `head="none"` /
      `stage="features"`.
    """
    if stage not in STAGES:
      raise UserError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")
    if stage != "head":
      x = self.backbone(x)
      if stage == "features" or self.head == "none":
        return x
    return self.classify(x, train, example_ids).astype(jnp.float32)

  def backbone(self, x):
    """Conv blocks; called from `__call__` inside its compact scope."""
    x = x.astype(self.dtype)
    for block, (size, width) in enumerate(zip(self.stage_sizes, self.widths), start=1):
      for i in range(1, size + 1):
        fast = winograd.use_for(self.conv, x.shape[-1])
        x = nn.Conv(width, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype,
                    conv_general_dilated=winograd.conv_general_dilated if fast else None,
                    name=f"block{block}_conv{i}")(x)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return x

  def classify(self, x, train: bool, example_ids=None):
    """The head on a feature map; called from `__call__` inside its compact scope."""
    x = x.astype(self.dtype)
    if self.head == "imagenet":
      return heads.imagenet_top(x, num_classes=self.num_classes, hidden=self.top_hidden,
                                dtype=self.dtype, param_dtype=self.param_dtype)
    head = heads.make_head(self.head, num_classes=self.num_classes, hidden=self.head_hidden,
                           dropout=self.head_dropout, dtype=self.dtype,
                           param_dtype=self.param_dtype)
    return head(x, train=train, example_ids=example_ids)


def feature_shape(stage_sizes: Sequence[int], widths: Sequence[int], image_size: int):
  """(H, W, C) of the block5_pool output for a square input of `image_size` (floor halving)."""
  side = image_size
  for _ in stage_sizes:
    side //= 2
  return (side, side, widths[-1])
