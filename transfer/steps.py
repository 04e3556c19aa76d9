"""The pure parts of training: the train state, the loss, and the jitted train/eval/feature steps.

Nothing here reads files, logs or checkpoints; the loop (`transfer.train`) does, at steps it
chooses. Each step is compiled once, with the state donated. Freezing comes from the optimizer's
labels (see `transfer.optim`): the train step differentiates only the trainable parameters, so a
frozen conv base costs a forward pass and no backward pass.

    tx, param_labels = transfer.optim.make_optimizer(config, params, total_steps)
    state = parallel.replicate(create_train_state(params, tx, seed), mesh)
    train_step = make_train_step(model, tx, param_labels, mesh)
    state, metrics = train_step(state, {"image": images, "label": labels})
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from transfer import optim, parallel


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree (checkpointed whole).

  Attributes:
    step: number of optimizer steps taken.
    params: model parameters (float32).
    opt_state: optimizer state (no entries for frozen parameters).
    rng: base PRNG key (raw uint32 key data); per-step keys are folded from it and `step`.
    nonfinite_step: -1, or the first step whose loss was NaN/inf (updates stop from then on, and
      the loop refuses to checkpoint), so a blow-up is caught without a host sync every step.
    batch_stats: BatchNorm running statistics (float32), `{}` for networks without BatchNorm.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_step: jax.Array
  batch_stats: Any = flax.struct.field(default_factory=dict)

  @property
  def variables(self) -> dict[str, Any]:
    """The model's variables: what `model.apply` takes."""
    return as_variables(self.params, self.batch_stats)


def create_train_state(params, tx: optax.GradientTransformation, seed: int,
                       batch_stats=None) -> TrainState:
  """A fresh train state at step 0 for `params` (and BatchNorm `batch_stats`) and optimizer `tx`."""
  return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.PRNGKey(seed)),
                    nonfinite_step=jnp.asarray(-1, jnp.int32), batch_stats=batch_stats or {})


def as_variables(params_or_variables, batch_stats=None) -> dict[str, Any]:
  """`{"params": ..., "batch_stats": ...}` from a params tree or a variables dict.

  Eval and feature steps take either, so a network without BatchNorm keeps being called with its
  params alone. A params tree never has a top-level layer called `params`.
  """
  if "params" in params_or_variables:
    return dict(params_or_variables)
  variables = {"params": params_or_variables}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return variables


def training_batch_norm(param_labels) -> frozenset[str]:
  """The BatchNorm layers a train step runs on batch statistics: those whose bias (and scale,
  where there is one) trains.

  A frozen BatchNorm layer normalises with its running statistics and never updates them (Keras'
  behaviour since TF 2, timm's FrozenBatchNorm), so a frozen backbone trains as VGG's does.
  """
  return frozenset(name for name in optim.batch_norm_layers(param_labels)
                   if param_labels[name]["bias"] != optim.FROZEN)


def loss_and_metrics(logits, labels, mask=None):
  """Mean loss and accuracy; one logit = sigmoid cross-entropy, else softmax cross-entropy.

  Args:
    logits: (N, C) float32.
    labels: (N,) int class ids.
    mask: optional (N,) bool; masked-out (padding) examples count for nothing.

  Returns:
    `(loss, {"loss", "accuracy"})`, means over unmasked examples.
  """
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


def predictions(logits):
  """Predicted class ids from logits (one logit: positive = class 1)."""
  if logits.shape[-1] == 1:
    return (logits[:, 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, -1).astype(jnp.int32)


def _split(params, mask):
  """(trainable, frozen) flat dicts of `params` by the bool tree `mask`."""
  flat, flat_mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
  trainable = {k: v for k, v in flat.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
  return trainable, frozen


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, param_labels, mesh,
                    parallel_mode: str = "shard_map", stage: str = "full") -> Callable:
  """Builds the jitted data-parallel `train_step(state, batch) -> (state, metrics)`.

  Gradients are taken only with respect to the trainable parameters (those not labelled
  `frozen`), so JAX never builds the backward pass of a frozen backbone; frozen leaves still go
  through `tx` (as zeros, which `set_to_zero` drops), keeping `optax.partition` the single
  source of truth for what trains.

  Args:
    model: the Flax module.
    tx: the optimizer from `optim.make_optimizer`.
    param_labels: its label tree (which parameters are frozen).
    mesh: the `data` mesh.
    parallel_mode: `"shard_map"` or `"pmap"`.
    stage: `"full"` (batches hold images) or `"head"` (batches hold cached backbone features).

  Returns:
    A function taking the replicated state and a batch `{"image", "label"}` sharded over `data`;
    the returned metrics are device scalars (pull them only when logging).
  """
  mask = optim.trainable_mask(param_labels)
  bn_train = training_batch_norm(param_labels) if stage == "full" else frozenset()
  if bn_train:  # batch statistics over the global batch: mean over the `data` axis
    model = model.clone(batch_norm_axis=parallel.AXIS)

  def per_device(state: TrainState, batch):
    local_batch = batch["label"].shape[0]
    ids = parallel.example_ids(local_batch)
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    trainable, frozen = _split(state.params, mask)

    def loss_fn(trainable):
      params = traverse_util.unflatten_dict({**frozen, **trainable})
      variables = as_variables(params, state.batch_stats)
      kwargs = dict(train=True, stage=stage, example_ids=ids, rngs={"dropout": dropout_rng})
      if bn_train:
        logits, updated = model.apply(variables, batch["image"], batch_norm_train=bn_train,
                                      mutable=["batch_stats"], **kwargs)
        batch_stats = updated["batch_stats"]
      else:
        logits, batch_stats = model.apply(variables, batch["image"], **kwargs), state.batch_stats
      loss, metrics = loss_and_metrics(logits, batch["label"])
      return loss, (metrics, batch_stats)

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    grads = jax.lax.pmean(grads, parallel.AXIS)
    metrics = jax.lax.pmean(metrics, parallel.AXIS)
    full_grads = traverse_util.unflatten_dict(
        {**{k: jnp.zeros_like(v) for k, v in frozen.items()}, **grads})
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    # A non-finite loss freezes the state at its last good value and records the step.
    ok = jnp.isfinite(jax.lax.pmean(loss, parallel.AXIS)) & (state.nonfinite_step < 0)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        batch_stats=keep(batch_stats, state.batch_stats),
        nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~ok, state.step,
                                 state.nonfinite_step))
    return new_state, metrics

  return parallel.data_parallel(per_device, mesh, parallel_mode)


def make_eval_step(model: nn.Module, mesh, num_classes: int, parallel_mode: str = "shard_map",
                   stage: str = "full") -> Callable:
  """Builds `eval_step(variables, batch) -> sums` over a padded batch with a `mask`.

  `variables` is the params tree, or `{"params", "batch_stats"}` for BatchNorm networks.

  Returns summed (not averaged) loss, correct count, example count and a confusion matrix
  (rows = true class, columns = predicted), so the loop can add them over batches and every
  example counts exactly once.
  """
  classes = max(num_classes, 2)

  def per_device(variables, batch):
    logits = model.apply(as_variables(variables), batch["image"], stage=stage)
    mask = batch["mask"].astype(jnp.float32)
    loss, metrics = loss_and_metrics(logits, batch["label"], batch["mask"])
    count = mask.sum()
    pred = predictions(logits)
    confusion = jnp.einsum("n,ni,nj->ij", mask, jax.nn.one_hot(batch["label"], classes),
                           jax.nn.one_hot(pred, classes))
    sums = {"loss": loss * count, "correct": metrics["accuracy"] * count, "count": count,
            "confusion": confusion}
    return jax.lax.psum(sums, parallel.AXIS)

  return parallel.data_parallel(per_device, mesh, parallel_mode, donate_state=False)


def make_feature_step(model: nn.Module, mesh, parallel_mode: str = "shard_map") -> Callable:
  """Builds `features(variables, batch) -> backbone feature maps`, sharded like the batch."""
  fn = lambda variables, images: model.apply(as_variables(variables), images, stage="features")
  batch_spec = parallel.batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(parallel.replicated(mesh), batch_spec), out_shardings=batch_spec)



def host(tree):
  """A pytree of device arrays as numpy arrays on the host."""
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def evaluate(eval_step, params, batches, mesh) -> dict[str, Any]:
  """Validation metrics and confusion matrix of `eval_step` over padded, masked batches.

  Returns:
    `{"val_loss", "val_accuracy", "val_count", "confusion"}` (host values).
  """
  from transfer.data import prefetch_to_device
  total = None
  for batch in prefetch_to_device(batches, parallel.batch_sharding(mesh)):
    sums = eval_step(params, {k: batch[k] for k in ("image", "label", "mask")})
    total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
  total = host(total)
  count = max(float(total["count"]), 1.0)
  return {"val_loss": float(total["loss"]) / count, "val_accuracy": float(total["correct"]) / count,
          "val_count": int(total["count"]), "confusion": total["confusion"].astype(int).tolist()}
