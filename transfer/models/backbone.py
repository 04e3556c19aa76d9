"""The backbone + head protocol, written once: every family's module is a `Classifier`.

A family (VGG, ResNet, InceptionV3; a ViT or ConvNeXt next) subclasses `Classifier`, adds its
own fields (stage sizes, widths, variant) and implements `backbone(x, train, example_ids)`: preprocessed
NHWC images -> its features, an NHWC map (N, H, W, C) or a token sequence (N, T, C). The stage
dispatch, the heads and the dtype handling live here:

  * `stage="full"` (default): image -> logits (or the features with `head="none"`);
  * `stage="features"`: image -> the backbone's features, the frozen part of transfer learning;
  * `stage="head"`: features -> logits, so a train step or a feature cache runs the head alone.

`backbone` and `classify` are called inside `__call__`'s compact scope, so their layers sit at
the top level of the params tree under the family's names (`block1_conv1`, `conv2_block1_1_bn`,
`mixed9_branch1x1_conv`, and the ImageNet top's `fc1`/`predictions`); a new head is one module
called `head`. The call interface, `model.apply(variables, x, train=..., stage=...,
example_ids=..., mutable=...)`, is the same for every family.

BatchNorm follows flax's convention: `train=True` normalises with batch statistics and updates
the running ones (apply with `mutable=["batch_stats"]`), `train=False` uses the running ones
(`use_running_average=not train`). Layers named in the `frozen_batch_norm` attribute stay in
inference mode even when training, as a frozen backbone's BatchNorm should (Keras since TF 2,
timm's FrozenBatchNorm): the train step sets it from the optimizer's labels,

    model = model.clone(frozen_batch_norm=optim.frozen_batch_norm(labels))
    logits, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
"""

from __future__ import annotations

from typing import Any, Collection

import flax.linen as nn
import jax.numpy as jnp

from transfer.errors import UserError
from transfer.models import heads

STAGES = ("full", "features", "head")


class Classifier(nn.Module):
  """A backbone and a head by name, with the stage dispatch. Subclasses implement `backbone`.

  Attributes:
    arch: the registry name (`vgg16`, `resnet50`, ...), so weight porters find the spec.
    head: `"imagenet"` (the family's ImageNet top, `imagenet_top`), `"flatten_dense"`, `"gap"`
      or `"none"` (return the backbone's features).
    num_classes: outputs of the head (1 = one sigmoid logit).
    head_hidden / head_dropout: hidden width and dropout of the head, `None` for its default.
    dtype: compute dtype (e.g. bfloat16); logits are always returned in float32.
    param_dtype: parameter dtype (float32 for training, even when computing in bfloat16).
    conv: a concrete choice of the conv layers that run by Winograd (`"xla"`, `"winograd"`,
      `"winograd_from_N"`); `transfer.models.get` resolves a config's `"auto"`. The parameters
      are the same either way.
    batch_norm_axis: the mapped axis over which a training BatchNorm averages its batch
      statistics (`"data"` inside the data-parallel step: global-batch statistics), or None.
    pooling: with `head="none"`, what `stage="full"` returns (`heads.POOLINGS`): None the
      backbone's features as they are, `"avg"` / `"max"` one float32 vector per image (global
      average or max pooling, Keras' `pooling`). `stage="features"` is never pooled.
    frozen_batch_norm: names of the BatchNorm layers that run in inference mode (running
      statistics, never updated) even with `train=True`; a frozenset or tuple
      (`transfer.optim.frozen_batch_norm(labels)`: the layers the optimizer freezes). Empty:
      every BatchNorm layer trains when `train` is True, as in any flax model.
  """

  arch: str = ""
  head: str = "imagenet"
  num_classes: int = 1000
  head_hidden: int | None = None
  head_dropout: float | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv: str = "xla"
  batch_norm_axis: str | None = None
  pooling: str | None = None
  frozen_batch_norm: Collection[str] = ()

  @nn.compact
  def __call__(self, x, train: bool = False, stage: str = "full", example_ids=None):
    """Runs the network (or one stage of it).

    Args:
      x: NHWC images preprocessed for the weights (`transfer.weights.preprocess`), or, for
        `stage="head"`, the backbone's features.
      train: training mode: dropout in the head (needs a `"dropout"` RNG in `apply` when the
        head has dropout), and BatchNorm on batch statistics, updating the running ones
        (`mutable=["batch_stats"]`), except in the `frozen_batch_norm` layers. False (the
        default) is inference everywhere.
      stage: `"full"`, `"features"` or `"head"` (see the module docstring).
      example_ids: (N,) global example indices; when given, dropout masks are keyed per example
        so results do not depend on how the batch is split over devices.

    Returns:
      float32 logits (N, num_classes), or the features for `head="none"`/`stage="features"`.
    """
    if stage not in STAGES:
      raise UserError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")
    self.check()
    if stage != "head":
      x = self.backbone(x.astype(self.dtype), train, example_ids)
      if stage == "features":
        return x
      if self.head == "none":
        return heads.pool(x, self.pooling)
    return self.classify(x, train, example_ids).astype(jnp.float32)

  def check(self) -> None:
    """Raises a UserError for fields the family cannot build (an unknown variant)."""

  def backbone(self, x, train: bool, example_ids=None):
    """Images (already in `dtype`) -> features; `train`: training mode (see `batch_norm_mode`);
    `example_ids`: the global example indices, for per-example randomness in the backbone (a
    ViT's stochastic depth) that must not depend on how the batch is split over devices."""
    raise NotImplementedError

  def batch_norm_mode(self, name: str, train: bool) -> tuple[bool, str | None]:
    """`(use_running_average, axis_name)` of the BatchNorm layer `name`: inference mode unless
    training and the layer is not in `frozen_batch_norm`; a training layer averages its
    statistics over `batch_norm_axis`. Every family's BatchNorm asks here."""
    use_batch = train and name not in self.frozen_batch_norm
    return not use_batch, self.batch_norm_axis if use_batch else None

  def imagenet_top(self, x):
    """The ImageNet top on the features: global average pooling and `predictions` (Keras'
    avg_pool + predictions, torchvision's avgpool + fc). VGG overrides it with its flatten top."""
    x = heads.global_average(x).astype(self.dtype)
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="predictions")(x)

  def classify(self, x, train: bool, example_ids=None):
    """The head on the backbone's features; called inside `__call__`'s compact scope."""
    x = x.astype(self.dtype)
    if self.head == "imagenet":
      return self.imagenet_top(x)
    head = heads.make_head(self.head, num_classes=self.num_classes, hidden=self.head_hidden,
                           dropout=self.head_dropout, dtype=self.dtype,
                           param_dtype=self.param_dtype)
    return head(x, train=train, example_ids=example_ids)
