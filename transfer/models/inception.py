"""InceptionV3 (Szegedy et al., 2015) in Flax linen, in the two forms its ImageNet weights exist in.

The network is described once, as data (`STEM`, `BLOCKS`: each conv with its width, kernel,
stride and padding; pools; branches concatenated per block), and that description builds the
Flax module, the layer names, torchvision's state-dict names and the order Keras lists the layers
in. Keras' `InceptionV3` and torchvision's `inception_v3` are the same graph with differences no
weight shape shows:

| | Keras ("keras") | torchvision ("torchvision") |
| --- | --- | --- |
| BatchNorm | no scale (gamma), eps 1e-3 | scale and bias, eps 1e-3 |
| 3x3 average pool of the pool branches | padding not counted (`same`) | padding counted as zeros (`avg_pool2d(3, 1, 1)`, `count_include_pad=True`) |
| BatchNorm momentum (training) | 0.99 | 0.9 (torch's 0.1) |

Convolutions have no bias in either. Layer names (both variants) are readable and stable, since
Keras' own are generated (`conv2d_17`): the stem is `stem_1a` ... `stem_4a` (torchvision's
`Conv2d_1a_3x3` ... `Conv2d_4a_3x3`), the inception blocks are Keras' `mixed0` ... `mixed10`
(torchvision's `Mixed_5b` ... `Mixed_7c`), and a block's convs carry torchvision's branch names:
`mixed9_branch3x3_2a_conv`, `mixed9_branch3x3_2a_bn`. "Everything before mixed9" is then
`^(stem|mixed[0-8])_`, and training the top two blocks is `trainable=["^mixed9_", "^mixed10_",
"^head/"]`. The ImageNet top is global average pooling and `predictions` (Keras' name).

BatchNorm statistics live in `batch_stats`: `train=True` trains every BatchNorm layer not in
`frozen_batch_norm`, `train=False` is inference mode (`Classifier.batch_norm_mode`). The stage
dispatch and heads are `transfer.models.backbone.Classifier`'s; `porting` is this family's
adapter (torchvision's names, Keras' layer order).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from transfer.errors import UserError
from transfer.models import keras_graph, winograd
from transfer.models.backbone import Classifier
from transfer.models.spec import BATCH_NORM, CONV, DENSE, Porting, kinds_by_suffix

VARIANTS = ("keras", "torchvision")
_EPSILON = 1e-3
_MOMENTUM = {"keras": 0.99, "torchvision": 0.9}


@dataclasses.dataclass(frozen=True)
class Conv:
  """A conv + BatchNorm + ReLU unit (Keras' `conv2d_bn`, torchvision's `BasicConv2d`)."""

  name: str
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: str = "SAME"


@dataclasses.dataclass(frozen=True)
class Split:
  """Parallel branches on one input whose outputs are concatenated (InceptionE's 1x3 / 3x1)."""

  branches: tuple[tuple[Any, ...], ...]


AVG_POOL, MAX_POOL = "avg_pool", "max_pool"  # 3x3 stride 1 `same` / 3x3 stride 2 `valid`


def _c(name, features, kernel=1, stride=1, padding="SAME"):
  kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
  return Conv(name, features, kernel, stride, padding)


def _block_a(pool):
  return ((_c("branch1x1", 64),),
          (_c("branch5x5_1", 48), _c("branch5x5_2", 64, 5)),
          (_c("branch3x3dbl_1", 64), _c("branch3x3dbl_2", 96, 3), _c("branch3x3dbl_3", 96, 3)),
          (AVG_POOL, _c("branch_pool", pool)))


def _block_b():
  return ((_c("branch3x3", 384, 3, 2, "VALID"),),
          (_c("branch3x3dbl_1", 64), _c("branch3x3dbl_2", 96, 3),
           _c("branch3x3dbl_3", 96, 3, 2, "VALID")),
          (MAX_POOL,))


def _block_c(c7):
  return ((_c("branch1x1", 192),),
          (_c("branch7x7_1", c7), _c("branch7x7_2", c7, (1, 7)), _c("branch7x7_3", 192, (7, 1))),
          (_c("branch7x7dbl_1", c7), _c("branch7x7dbl_2", c7, (7, 1)),
           _c("branch7x7dbl_3", c7, (1, 7)), _c("branch7x7dbl_4", c7, (7, 1)),
           _c("branch7x7dbl_5", 192, (1, 7))),
          (AVG_POOL, _c("branch_pool", 192)))


def _block_d():
  return ((_c("branch3x3_1", 192), _c("branch3x3_2", 320, 3, 2, "VALID")),
          (_c("branch7x7x3_1", 192), _c("branch7x7x3_2", 192, (1, 7)),
           _c("branch7x7x3_3", 192, (7, 1)), _c("branch7x7x3_4", 192, 3, 2, "VALID")),
          (MAX_POOL,))


def _block_e():
  return ((_c("branch1x1", 320),),
          (_c("branch3x3_1", 384), Split(((_c("branch3x3_2a", 384, (1, 3)),),
                                          (_c("branch3x3_2b", 384, (3, 1)),)))),
          (_c("branch3x3dbl_1", 448), _c("branch3x3dbl_2", 384, 3),
           Split(((_c("branch3x3dbl_3a", 384, (1, 3)),), (_c("branch3x3dbl_3b", 384, (3, 1)),)))),
          (AVG_POOL, _c("branch_pool", 192)))


# The stem: one chain. torchvision: Conv2d_1a_3x3 ... Conv2d_4a_3x3, maxpool1, maxpool2.
STEM = (_c("stem_1a", 32, 3, 2, "VALID"), _c("stem_2a", 32, 3, 1, "VALID"), _c("stem_2b", 64, 3),
        MAX_POOL, _c("stem_3b", 80, 1, 1, "VALID"), _c("stem_4a", 192, 3, 1, "VALID"), MAX_POOL)
_TORCH_STEM = {"stem_1a": "Conv2d_1a_3x3", "stem_2a": "Conv2d_2a_3x3", "stem_2b": "Conv2d_2b_3x3",
               "stem_3b": "Conv2d_3b_1x1", "stem_4a": "Conv2d_4a_3x3"}
# (our block name = Keras' concatenate layer, torchvision's module, branches)
BLOCKS = (("mixed0", "Mixed_5b", _block_a(32)), ("mixed1", "Mixed_5c", _block_a(64)),
          ("mixed2", "Mixed_5d", _block_a(64)), ("mixed3", "Mixed_6a", _block_b()),
          ("mixed4", "Mixed_6b", _block_c(128)), ("mixed5", "Mixed_6c", _block_c(160)),
          ("mixed6", "Mixed_6d", _block_c(160)), ("mixed7", "Mixed_6e", _block_c(192)),
          ("mixed8", "Mixed_7a", _block_d()), ("mixed9", "Mixed_7b", _block_e()),
          ("mixed10", "Mixed_7c", _block_e()))
BLOCK_NAMES = ("stem",) + tuple(name for name, _, _ in BLOCKS)


def _convs(ops) -> Iterable[Conv]:
  """The convs of a branch (or of the stem) in creation order."""
  for op in ops:
    if isinstance(op, Conv):
      yield op
    elif isinstance(op, Split):
      for branch in op.branches:
        yield from _convs(branch)


def _block_convs() -> Iterable[tuple[str, str, Conv]]:
  """(our prefix, torchvision prefix, conv) for every conv in creation order."""
  for conv in _convs(STEM):
    yield conv.name, _TORCH_STEM[conv.name], conv
  for block, torch_block, branches in BLOCKS:
    for branch in branches:
      for conv in _convs(branch):
        yield f"{block}_{conv.name}", f"{torch_block}.{conv.name}", conv


def layer_names() -> tuple[str, ...]:
  """Every conv and BatchNorm layer of the backbone in forward (creation) order."""
  return tuple(f"{prefix}_{kind}" for prefix, _, _ in _block_convs() for kind in ("conv", "bn"))


def layer_kinds() -> dict[str, str]:
  """Every backbone and top layer -> its kind (`*_conv`, `*_bn`, the dense `predictions`)."""
  return {**kinds_by_suffix(layer_names(), {"_conv": CONV, "_bn": BATCH_NORM}),
          "predictions": DENSE}


def porting() -> Porting:
  """The InceptionV3 family's adapter: torchvision's names (its auxiliary classifier ignored),
  and the order Keras lists the layers in, since Keras generates their names."""
  return Porting(torch_names=torch_names(), torch_ignored=("AuxLogits",),
                 keras_order=keras_order())


def torch_names() -> dict[str, str]:
  """Our layer name -> torchvision state-dict prefix (`mixed0_branch1x1_bn` -> `Mixed_5b.branch1x1.bn`)."""
  names = {"predictions": "fc"}
  for ours, theirs, _ in _block_convs():
    names[f"{ours}_conv"] = f"{theirs}.conv"
    names[f"{ours}_bn"] = f"{theirs}.bn"
  return names


def keras_order(include_top: bool = False) -> tuple[str, ...]:
  """Our conv and BatchNorm layer names in the order Keras' `InceptionV3().layers` lists them.

  The Keras graph is rebuilt from `STEM`/`BLOCKS` (each conv a Conv2D, BatchNormalization and
  Activation layer; pools; a concatenate per block and per split) and ordered by
  `keras_graph.layer_order`. The top (avg_pool, predictions) only adds depth above everything.
  """
  nodes: list[tuple[str, tuple[str, ...]]] = [("input", ())]
  count = iter(range(10 ** 6))

  def add(name, inputs):
    nodes.append((name, tuple(inputs)))
    return name

  def chain(ops, x, prefix):
    for op in ops:
      if isinstance(op, Conv):
        x = add(f"{prefix}{op.name}_conv", [x])
        x = add(f"{prefix}{op.name}_bn", [x])
        x = add(f"relu{next(count)}", [x])
      elif isinstance(op, Split):
        x = add(f"concat{next(count)}", [chain(b, x, prefix) for b in op.branches])
      else:
        x = add(f"pool{next(count)}", [x])
    return x

  x = chain(STEM, "input", "")
  for block, _, branches in BLOCKS:
    x = add(block, [chain(branch, x, f"{block}_") for branch in branches])
  if include_top:
    add("predictions", [add("avg_pool", [x])])
  layers = set(layer_names())
  return tuple(n for n in keras_graph.layer_order(nodes) if n in layers)


class InceptionV3(Classifier):
  """InceptionV3 in the Keras or torchvision form (see the module docstring).

  Attributes (besides `Classifier`'s; `"imagenet"` is global average pooling and the 1000-way
  `predictions` layer, on any input size):
    variant: `"keras"` or `"torchvision"`.
    width_divisor: every conv's width is divided by this (1 for the real network; a tiny test
      network keeps the layers and names at a fraction of the cost). BatchNorm statistics stay
      float32; Winograd runs only the stride-1 3x3 `same` convolutions.
  """

  arch: str = "inception_v3"
  variant: str = "keras"
  width_divisor: int = 1

  def check(self) -> None:
    if self.variant not in VARIANTS:
      raise UserError(f"unknown InceptionV3 variant {self.variant!r}; valid: {', '.join(VARIANTS)}")

  def backbone(self, x, train: bool = False, example_ids=None):
    """Stem and mixed0 ... mixed10 -> the mixed10 map; called inside `__call__`'s compact scope."""
    x = self._chain(STEM, x, "", train)
    for block, _, branches in BLOCKS:
      x = jnp.concatenate([self._chain(b, x, f"{block}_", train) for b in branches], axis=-1)
    return x

  def _chain(self, ops: Sequence[Any], x, prefix: str, train: bool):
    for op in ops:
      if isinstance(op, Conv):
        x = self._conv_bn(x, op, prefix + op.name, train)
      elif isinstance(op, Split):
        x = jnp.concatenate([self._chain(b, x, prefix, train) for b in op.branches], axis=-1)
      elif op == MAX_POOL:
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
      else:  # Keras' `same` pool averages the window's real pixels; torch counts the zero padding.
        x = nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                        count_include_pad=self.variant == "torchvision")
    return x

  def _conv_bn(self, x, op: Conv, name: str, train: bool):
    fast = winograd.use_for(self.conv, x.shape[-1])  # applies only where it can (3x3, stride 1)
    x = nn.Conv(max(1, op.features // self.width_divisor), op.kernel,
                strides=(op.stride, op.stride), padding=op.padding, use_bias=False,
                dtype=self.dtype, param_dtype=self.param_dtype, name=f"{name}_conv",
                conv_general_dilated=winograd.conv_general_dilated if fast else None)(x)
    running, axis = self.batch_norm_mode(f"{name}_bn", train)
    x = nn.BatchNorm(use_running_average=running, momentum=_MOMENTUM[self.variant],
                     epsilon=_EPSILON, use_scale=self.variant == "torchvision", dtype=self.dtype,
                     param_dtype=self.param_dtype, axis_name=axis, name=f"{name}_bn")(x)
    return nn.relu(x)
