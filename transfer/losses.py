"""Losses, soft targets and the model's outputs read as predictions or probabilities.

Pure functions of logits, shared by the train and eval steps, predict and export.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def soft_targets(labels, outputs: int, label_smoothing: float = 0.0):
  """Smoothed targets for `labels`: what `loss_and_metrics(targets=...)` takes.

  Args:
    labels: (N,) int class ids.
    outputs: the model's outputs (1: one sigmoid logit for two classes).
    label_smoothing: `ls` in [0, 1).

  Returns:
    (N, outputs) float32 `onehot*(1-ls) + ls/outputs` for softmax; for one logit, (N,) the
    probability of class 1, `y*(1-ls) + ls/2`.
  """
  if outputs == 1:
    return labels.astype(jnp.float32) * (1.0 - label_smoothing) + label_smoothing / 2
  return optax.smooth_labels(jax.nn.one_hot(labels, outputs, dtype=jnp.float32), label_smoothing)


def loss_and_metrics(logits, labels, mask=None, targets=None):
  """Mean loss and accuracy; one logit = sigmoid cross-entropy, else softmax cross-entropy.

  Args:
    logits: (N, C) float32.
    labels: (N,) int class ids.
    mask: optional (N,) bool; masked-out (padding) examples count for nothing.
    targets: optional soft targets (`soft_targets`, maybe mixed): (N, C), or (N,) for one
      logit. The loss is then cross-entropy against them, and accuracy counts a prediction right
      when it is the class with the largest target weight.

  Returns:
    `(loss, {"loss", "accuracy"})`, means over unmasked examples.
  """
  if targets is not None:
    return _soft_loss_and_metrics(logits, targets, mask)
  labels = labels.astype(jnp.int32)
  if logits.shape[-1] == 1:
    logit = logits[:, 0]
    losses = optax.sigmoid_binary_cross_entropy(logit, labels.astype(jnp.float32))
    correct = (logit > 0).astype(jnp.int32) == labels
  else:
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
  weights = jnp.ones_like(losses) if mask is None else mask.astype(jnp.float32)
  count = jnp.maximum(weights.sum(), 1.0)
  loss = (losses * weights).sum() / count
  return loss, {"loss": loss, "accuracy": (correct * weights).sum() / count}


def _soft_loss_and_metrics(logits, targets, mask=None):
  """`loss_and_metrics` against soft targets."""
  if logits.shape[-1] == 1:
    logit = logits[:, 0]
    losses = optax.sigmoid_binary_cross_entropy(logit, targets)
    correct = (logit > 0) == (targets > 0.5)
  else:
    losses = optax.softmax_cross_entropy(logits, targets)
    correct = jnp.argmax(logits, -1) == jnp.argmax(targets, -1)
  weights = jnp.ones_like(losses) if mask is None else mask.astype(jnp.float32)
  count = jnp.maximum(weights.sum(), 1.0)
  loss = (losses * weights).sum() / count
  return loss, {"loss": loss, "accuracy": (correct * weights).sum() / count}


def predictions(logits):
  """Predicted class ids from logits (one logit: positive = class 1)."""
  if logits.shape[-1] == 1:
    return (logits[:, 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, -1).astype(jnp.int32)


def probabilities(logits):
  """Class probabilities, (N, max(C, 2)): softmax, or [1 - p, p] for one sigmoid logit."""
  if logits.shape[-1] == 1:
    positive = jax.nn.sigmoid(logits)
    return jnp.concatenate([1.0 - positive, positive], axis=-1)
  return jax.nn.softmax(logits, axis=-1)
