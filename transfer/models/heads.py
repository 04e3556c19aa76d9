"""Classifier heads that sit on a backbone's features: an NHWC map or a token sequence.

A backbone returns (N, H, W, C) (a CNN) or (N, T, C) (a transformer's tokens); every head takes
either: `gap` averages over all axes between the batch and the channels, `flatten_dense` flattens
them.

A head is chosen by name (`config.head`) so that a run's head is data, stored in checkpoints and
reproducible from the name alone. All heads return logits in float32; the loss decides between
softmax (num_classes > 1) and sigmoid (num_classes == 1).
"""

from __future__ import annotations

from transfer.errors import UserError

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

HEADS = ("imagenet", "flatten_dense", "gap", "none")
# How a model without a classifier (`head="none"`) returns its features: the unpooled map (or
# token sequence), or one vector per image (Keras' `pooling`, timm's `global_pool`).
POOLINGS = (None, "avg", "max")


class ExampleDropout(nn.Module):
  """Dropout whose mask for each example depends only on the RNG and that example's id.

  Flax's `nn.Dropout` draws one mask for the whole (local) batch, so the mask an example gets
  depends on how the batch is split over devices and processes. Keying each example's mask by its
  global index makes training on 1, 2 or 4 devices (or hosts) produce the same result.
  """

  rate: float

  @nn.compact
  def __call__(self, x, train: bool, example_ids=None):
    if not train or self.rate == 0.0:
      return x
    key = self.make_rng("dropout")
    keep = 1.0 - self.rate
    if example_ids is None:
      mask = jax.random.bernoulli(key, keep, x.shape)
    else:
      keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids)
      mask = jax.vmap(lambda k: jax.random.bernoulli(k, keep, x.shape[1:]))(keys)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def imagenet_top(x, *, num_classes: int = 1000, hidden: int = 4096, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32):
  """The original VGG classifier: Flatten -> fc1 4096 relu -> fc2 4096 relu -> predictions.

  A plain function called inside the parent's `nn.compact` scope, so the layers get the Keras names
  (`fc1`, `fc2`, `predictions`) at the top level of the params tree, as in
  `keras.applications.VGG16`; the official files then map one to one. Keras' top has no dropout.
  """
  x = x.reshape((x.shape[0], -1))
  dense = lambda n, name: nn.Dense(n, dtype=dtype, param_dtype=param_dtype, name=name)
  x = nn.relu(dense(hidden, "fc1")(x))
  x = nn.relu(dense(hidden, "fc2")(x))
  return dense(num_classes, "predictions")(x)


def global_average(x):
  """(N, ..., C) -> (N, C) in float32: the mean over every axis between batch and channels (the
  pixels of a map, the tokens of a sequence); float32 so a bfloat16 map sums without loss."""
  return jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, x.ndim - 1)))


def global_max(x):
  """(N, ..., C) -> (N, C) in float32: the maximum over every axis between batch and channels."""
  return jnp.max(x, axis=tuple(range(1, x.ndim - 1))).astype(jnp.float32)


def pool(x, pooling: str | None):
  """Features pooled as `pooling` says (`POOLINGS`): None returns `x` as it is."""
  if pooling is None:
    return x
  if pooling == "avg":
    return global_average(x)
  if pooling == "max":
    return global_max(x)
  raise UserError(f"unknown pooling {pooling!r}; valid: None, 'avg', 'max'")


class FlattenDense(nn.Module):
  """The classic transfer-learning head: Flatten -> Dense(hidden) relu -> Dropout -> Dense.

  With hidden=256, dropout=0.6 and num_classes=1 this is the head of the Keras blog recipe.
  """

  num_classes: int
  hidden: int = 256
  dropout: float = 0.6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, example_ids=None):
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="hidden")(x)
    x = nn.relu(x)
    x = ExampleDropout(self.dropout, name="dropout")(x, train, example_ids)
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="logits")(x)


class GlobalAveragePool(nn.Module):
  """GlobalAveragePooling -> Dropout -> Dense: the usual head for multi-class fine-tuning."""

  num_classes: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, example_ids=None):
    x = global_average(x).astype(self.dtype)
    x = ExampleDropout(self.dropout, name="dropout")(x, train, example_ids)
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="logits")(x)


def make_head(name: str, *, num_classes: int, hidden: int | None, dropout: float | None,
              dtype: Any, param_dtype: Any) -> nn.Module | None:
  """Builds the head called `name`; `None` for `"none"` (the model returns its feature map).

  The ImageNet top is not built here: its layers live at the top level of the model.
  """
  if name == "flatten_dense":
    return FlattenDense(num_classes=num_classes, hidden=hidden or 256,
                        dropout=0.6 if dropout is None else dropout,
                        dtype=dtype, param_dtype=param_dtype, name="head")
  if name == "gap":
    return GlobalAveragePool(num_classes=num_classes, dropout=dropout or 0.0,
                             dtype=dtype, param_dtype=param_dtype, name="head")
  if name == "none":
    return None
  raise UserError(f"unknown head {name!r}; valid heads: {', '.join(HEADS)}")
