"""The jitted train, eval, probability and feature steps: pure device code.

Nothing here reads files, logs or checkpoints; the loop (`transfer.train`) does, at steps it
chooses. Each step is compiled once. Freezing comes from the optimizer's labels (see
`transfer.optim`): the train step differentiates only the trainable parameters, so a frozen conv
base costs a forward pass and no backward pass, and keeps frozen BatchNorm layers in inference
mode (the model's `frozen_batch_norm`).

The train step donates the state only when asked (`donate=True`): donation lets XLA write the
new state into the old one's buffers (half the state's memory), and deletes the state passed in
with every array it shares, e.g. the params a caller built it from (`create_train_state` does
not copy them). The CLI's run asks for it (`assembly.Run.train_step`): nobody else holds its
state. The state is `transfer.train_state`,
the loss `transfer.losses`, smoothing and mixing `transfer.regularisation`, the parameter
average `transfer.ema`; the host-side eval loop is `transfer.eval_loop`. A run builds its steps
through `transfer.assembly`, so train, lr_find and bench compile the same ones.

    tx, param_labels = transfer.optim.make_optimizer(params, config, total_steps)
    state = parallel.replicate(train_state.create_train_state(params, tx, seed), mesh)
    train_step = make_train_step(model, tx, param_labels, mesh)
    state, metrics = train_step(state, {"image": images, "label": labels})
    params["head"]  # still readable: the step does not donate unless donate=True
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from transfer import ema, optim, parallel
from transfer.errors import UserError
from transfer.losses import loss_and_metrics, predictions, probabilities, soft_targets
from transfer.regularisation import Regularisation, flipped_partner, mix_batch, mix_key
from transfer.train_state import TrainState, as_variables


def _split(params, mask):
  """(trainable, frozen) flat dicts of `params` by the bool tree `mask`."""
  flat, flat_mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
  trainable = {k: v for k, v in flat.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
  return trainable, frozen


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, param_labels, mesh,
                    parallel_mode: str = "shard_map", stage: str = "full",
                    regularisation: Regularisation | None = None,
                    ema_decay: float = 0.0, donate: bool = False) -> Callable:
  """Builds the jitted data-parallel `train_step(state, batch) -> (state, metrics)`.

  Gradients are taken only with respect to the trainable parameters (those not labelled
  `frozen`), so JAX never builds the backward pass of a frozen backbone; frozen leaves still go
  through `tx` (as zeros, which `set_to_zero` drops), keeping `optax.partition` the single
  source of truth for what trains. The model runs with `train=True` and its `frozen_batch_norm`
  set from the labels (`optim.frozen_batch_norm`): BatchNorm layers whose params train use
  global-batch statistics and update their running ones, frozen ones stay in inference mode.

  Args:
    model: the Flax module.
    tx: the optimizer from `optim.make_optimizer`: the state's (`state.tx`, which the step
      applies); a state made with another optimizer is refused when the step is traced.
    param_labels: its label tree (which parameters are frozen).
    mesh: the `data` mesh.
    parallel_mode: `"shard_map"` or `"pmap"`.
    stage: `"full"` (batches hold images) or `"head"` (batches hold cached backbone features).
    regularisation: label smoothing and mixup/cutmix (default: none). Mixing draws from the
      step's key (`rng` folded with `step`, then `regularisation.mix_key`) and pairs examples
      across the global batch (`flipped_partner`).
    ema_decay: the parameter average's decay (`ema.decay(config)`); the average is updated when
      the state carries one (`create_train_state(ema=True)`).
    donate: donate the state to the step (see the module docstring): the state passed in, and
      any array it shares with the caller, is deleted. Off by default.

  Returns:
    A function taking the replicated state and a batch `{"image", "label"}` sharded over `data`;
    the returned metrics are device scalars (pull them only when logging).
  """
  mask = optim.trainable_mask(param_labels)
  reg = regularisation or Regularisation()
  if reg.mixes and stage != "full":
    raise UserError("mixup/cutmix mix images; they cannot train on cached features "
                    "(set cache_features=False)")
  partner = flipped_partner(mesh.devices.size)
  frozen_bn = optim.frozen_batch_norm(param_labels)
  bn_train = stage == "full" and bool(set(optim.batch_norm_layers(param_labels)) - frozen_bn)
  # Training BatchNorm averages its statistics over the global batch (the `data` axis).
  model = model.clone(frozen_batch_norm=frozen_bn,
                      **({"batch_norm_axis": parallel.AXIS} if bn_train else {}))

  def per_device(state: TrainState, batch):
    if state.tx != tx:
      raise UserError("the train state was created with another optimizer than this train "
                      "step's; create it with the tx make_optimizer returned with these labels")
    local_batch = batch["label"].shape[0]
    ids = parallel.example_ids(local_batch)
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    trainable, frozen = _split(state.params, mask)
    images, targets = batch["image"], None
    if reg.soft:
      targets = soft_targets(batch["label"], model.num_classes, reg.label_smoothing)
    if reg.mixes:
      images, targets, _ = mix_batch(mix_key(dropout_rng), images,
                                     targets, partner, reg)

    def loss_fn(trainable):
      params = traverse_util.unflatten_dict({**frozen, **trainable})
      variables = as_variables(params, state.batch_stats)
      kwargs = dict(train=True, stage=stage, example_ids=ids, rngs={"dropout": dropout_rng})
      if bn_train:
        logits, updated = model.apply(variables, images, mutable=["batch_stats"], **kwargs)
        batch_stats = updated["batch_stats"]
      else:
        logits, batch_stats = model.apply(variables, images, **kwargs), state.batch_stats
      loss, metrics = loss_and_metrics(logits, batch["label"], targets=targets)
      return loss, (metrics, batch_stats)

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    grads = jax.lax.pmean(grads, parallel.AXIS)
    metrics = jax.lax.pmean(metrics, parallel.AXIS)
    full_grads = traverse_util.unflatten_dict(
        {**{k: jnp.zeros_like(v) for k, v in frozen.items()}, **grads})
    updates, opt_state = state.tx.update(full_grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    ema_params = ema.update(state.ema_params, new_params, ema_decay, mask)

    # A non-finite loss freezes the state at its last good value and records the step.
    ok = jnp.isfinite(jax.lax.pmean(loss, parallel.AXIS)) & (state.nonfinite_step < 0)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        batch_stats=keep(batch_stats, state.batch_stats),
        ema_params=keep(ema_params, state.ema_params),
        nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~ok, state.step,
                                 state.nonfinite_step))
    return new_state, metrics

  return parallel.data_parallel(per_device, mesh, parallel_mode, donate_state=donate)


def tta_probabilities(model: nn.Module, variables, images, stage: str = "full"):
  """Test-time augmentation: the mean of the probabilities of the images and their mirrors."""
  apply = lambda x: probabilities(model.apply(as_variables(variables), x, stage=stage))
  return (apply(images) + apply(images[:, :, ::-1])) / 2


def make_eval_step(model: nn.Module, mesh, num_classes: int, parallel_mode: str = "shard_map",
                   stage: str = "full", tta: bool = False) -> Callable:
  """Builds `eval_step(variables, batch) -> sums` over a padded batch with a `mask`.

  `variables` is the params tree, or `{"params", "batch_stats"}` for BatchNorm networks.

  Returns summed (not averaged) loss, correct count, example count and a confusion matrix
  (rows = true class, columns = predicted), so the loop can add them over batches and every
  example counts exactly once.

  With `tta`, each image and its horizontal mirror are classified, and the prediction is the
  argmax of their mean probabilities; the loss is `-log` of that mean at the true class.
  """
  classes = max(num_classes, 2)

  def per_device(variables, batch):
    mask = batch["mask"].astype(jnp.float32)
    if tta:
      probs = tta_probabilities(model, variables, batch["image"], stage)
      pred = jnp.argmax(probs, -1).astype(jnp.int32)
      true = jnp.take_along_axis(probs, batch["label"][:, None].astype(jnp.int32), -1)[:, 0]
      losses = -jnp.log(jnp.maximum(true, jnp.finfo(jnp.float32).tiny))
      count = mask.sum()
      loss_sum, correct = (losses * mask).sum(), ((pred == batch["label"]) * mask).sum()
    else:
      logits = model.apply(as_variables(variables), batch["image"], stage=stage)
      loss, metrics = loss_and_metrics(logits, batch["label"], batch["mask"])
      count = mask.sum()
      pred = predictions(logits)
      loss_sum, correct = loss * count, metrics["accuracy"] * count
    confusion = jnp.einsum("n,ni,nj->ij", mask, jax.nn.one_hot(batch["label"], classes),
                           jax.nn.one_hot(pred, classes))
    sums = {"loss": loss_sum, "correct": correct, "count": count, "confusion": confusion}
    return jax.lax.psum(sums, parallel.AXIS)

  return parallel.data_parallel(per_device, mesh, parallel_mode, donate_state=False)


def make_probabilities_step(model: nn.Module, mesh, tta: bool = False) -> Callable:
  """Builds `probs(variables, images) -> (N, max(C, 2))` class probabilities, sharded like the
  batch (per-example outputs, e.g. for `transfer eval --top_losses`)."""
  def fn(variables, images):
    if tta:
      return tta_probabilities(model, variables, images)
    return probabilities(model.apply(as_variables(variables), images))
  batch_spec = parallel.batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(parallel.replicated(mesh), batch_spec), out_shardings=batch_spec)


def make_feature_step(model: nn.Module, mesh, parallel_mode: str = "shard_map") -> Callable:
  """Builds `features(variables, batch) -> backbone feature maps`, sharded like the batch."""
  fn = lambda variables, images: model.apply(as_variables(variables), images, stage="features")
  batch_spec = parallel.batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(parallel.replicated(mesh), batch_spec), out_shardings=batch_spec)
