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

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from transfer import optim, parallel
from transfer.errors import UserError

# Folded into a step's key to give the mixup/cutmix key. Dropout folds in example ids, which are
# below the batch size, so this value keeps the two streams apart for any batch under 2**31 - 1.
_MIX_STREAM = 2**31 - 1


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
    ema_params: exponential moving average of `params` (`ema_decay` > 0), else `{}`. It covers
      every param, frozen ones too: a frozen param's average is never updated, so it stays equal
      to the param, and a later stage that unfreezes it starts its average from the right value.
      One more copy of the params buys one code path for every stage (see `update_ema`).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_step: jax.Array
  batch_stats: Any = flax.struct.field(default_factory=dict)
  ema_params: Any = flax.struct.field(default_factory=dict)

  @property
  def variables(self) -> dict[str, Any]:
    """The model's variables: what `model.apply` takes."""
    return as_variables(self.params, self.batch_stats)

  @property
  def ema_variables(self) -> dict[str, Any] | None:
    """The variables with the averaged params (raw BatchNorm statistics); None without EMA."""
    if not self.ema_params:
      return None
    return as_variables(self.ema_params, self.batch_stats)


@dataclasses.dataclass(frozen=True)
class Regularisation:
  """What the train step does besides plain cross-entropy on the batch (all off by default).

  Attributes:
    label_smoothing: softmax targets `y*(1-ls) + ls/C`; the one-logit sigmoid head's target
      `y*(1-ls) + ls/2` (two classes, so the same rule with C = 2).
    mixup_alpha: > 0: mixup with lambda ~ Beta(alpha, alpha), one lambda per global batch.
    cutmix_alpha: > 0: cutmix with lambda ~ Beta(alpha, alpha), one box per global batch, lambda
      corrected to the box's real area (timm's `correct_lam`).
    switch_prob: with both alphas > 0, the probability that a batch gets cutmix rather than
      mixup (timm's `switch_prob`, 0.5). Every batch is mixed (timm's `mix_prob` = 1).
    ema_decay: parameter EMA decay; used when the state carries `ema_params`.
  """

  label_smoothing: float = 0.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  switch_prob: float = 0.5
  ema_decay: float = 0.0

  @classmethod
  def from_config(cls, config) -> "Regularisation":
    """The run's regularisation from its config (keys absent from older configs mean off)."""
    get = lambda key: float(config.get(key, 0.0))
    return cls(label_smoothing=get("label_smoothing"), mixup_alpha=get("mixup_alpha"),
               cutmix_alpha=get("cutmix_alpha"), ema_decay=get("ema_decay"))

  @property
  def mixes(self) -> bool:
    """Whether batches are mixed (mixup or cutmix)."""
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0

  @property
  def soft(self) -> bool:
    """Whether the loss takes soft targets (smoothing or mixing)."""
    return self.mixes or self.label_smoothing > 0


def create_train_state(params, tx: optax.GradientTransformation, seed: int,
                       batch_stats=None, ema: bool = False) -> TrainState:
  """A fresh train state at step 0 for `params` (and BatchNorm `batch_stats`) and optimizer `tx`.

  `ema=True` (a run with `ema_decay` > 0) starts the parameter average at the params.
  """
  ema_params = jax.tree_util.tree_map(jnp.array, params) if ema else {}
  return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.PRNGKey(seed)),
                    nonfinite_step=jnp.asarray(-1, jnp.int32), batch_stats=batch_stats or {},
                    ema_params=ema_params)


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


def cutmix_box(rng, lam, height: int, width: int):
  """timm's `rand_bbox` + `correct_lam`: a box of area about (1 - lam) of the image.

  The box's sides are `floor(side * sqrt(1 - lam))`, its centre uniform over the image, clipped
  at the borders; the returned lambda is the share of the image outside the clipped box.

  Returns:
    `(top, bottom, left, right, lam)`: rows [top, bottom) and columns [left, right) come from
    the partner image; `lam` is the weight of the example's own target.
  """
  ky, kx = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  area = ((bottom - top) * (right - left)).astype(jnp.float32)
  return top, bottom, left, right, 1.0 - area / (height * width)


def mix_batch(rng, images, targets, partner: Callable, reg: Regularisation):
  """Mixup or cutmix of a batch with its partner examples (timm's `Mixup`, mode "batch").

  Args:
    rng: the step's mixing key (the same on every device).
    images: (N, H, W, C) this device's images.
    targets: soft targets, (N, C) or (N,) (`soft_targets`).
    partner: maps a per-example array to the partner of each example (`flipped_partner`).
    reg: the alphas and switch probability.

  Returns:
    `(images, targets, lam)`: mixed images and targets, and the weight of each example's own
    target (after cutmix's area correction).
  """
  k_switch, k_mixup, k_cutmix, k_box = jax.random.split(rng, 4)
  other_images, other_targets = partner(images), partner(targets)
  height, width = images.shape[1], images.shape[2]

  def mixup():
    lam = jax.random.beta(k_mixup, reg.mixup_alpha, reg.mixup_alpha)
    return lam * images + (1.0 - lam) * other_images, lam

  def cutmix():
    lam = jax.random.beta(k_cutmix, reg.cutmix_alpha, reg.cutmix_alpha)
    top, bottom, left, right, lam = cutmix_box(k_box, lam, height, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return jnp.where(inside[None, :, :, None], other_images, images), lam

  if reg.mixup_alpha > 0 and reg.cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < reg.switch_prob
    (mixed_a, lam_a), (mixed_b, lam_b) = cutmix(), mixup()
    mixed, lam = jnp.where(use_cutmix, mixed_a, mixed_b), jnp.where(use_cutmix, lam_a, lam_b)
  elif reg.cutmix_alpha > 0:
    mixed, lam = cutmix()
  else:
    mixed, lam = mixup()
  lam = lam.astype(jnp.float32)
  return mixed.astype(images.dtype), lam * targets + (1.0 - lam) * other_targets, lam


def flipped_partner(num_devices: int) -> Callable:
  """Per-device code: each example's partner in the global batch flipped end to end.

  Global example g pairs with example B-1-g (timm pairs with `x.flip(0)`). Device d's partners
  are device (n-1-d)'s examples in reverse order, so one `ppermute` gives them, and the pairs
  (hence the mixed batch) are the same whatever the number of devices.
  """
  def partner(x):
    if num_devices > 1:
      x = jax.lax.ppermute(x, parallel.AXIS,
                           perm=[(d, num_devices - 1 - d) for d in range(num_devices)])
    return x[::-1]
  return partner


def update_ema(ema_params, params, decay: float, mask):
  """`decay * ema + (1 - decay) * params` for trainable leaves; frozen leaves keep their average.

  A frozen leaf's average started at the param and neither has changed, so it stays bit-equal
  to the param (the formula would round it).
  """
  return jax.tree_util.tree_map(
      lambda e, p, trains: decay * e + (1.0 - decay) * p if trains else e,
      ema_params, params, mask)


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
                    parallel_mode: str = "shard_map", stage: str = "full",
                    regularisation: Regularisation | None = None) -> Callable:
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
    regularisation: label smoothing, mixup/cutmix and the EMA decay (default: none). Mixing
      draws from the step's key (`rng` folded with `step`, then with `_MIX_STREAM`) and pairs
      examples across the global batch (`flipped_partner`). The EMA is updated when the state
      carries one (`create_train_state(ema=True)`).

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
  bn_train = training_batch_norm(param_labels) if stage == "full" else frozenset()
  if bn_train:  # batch statistics over the global batch: mean over the `data` axis
    model = model.clone(batch_norm_axis=parallel.AXIS)

  def per_device(state: TrainState, batch):
    local_batch = batch["label"].shape[0]
    ids = parallel.example_ids(local_batch)
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    trainable, frozen = _split(state.params, mask)
    images, targets = batch["image"], None
    if reg.soft:
      targets = soft_targets(batch["label"], model.num_classes, reg.label_smoothing)
    if reg.mixes:
      images, targets, _ = mix_batch(jax.random.fold_in(dropout_rng, _MIX_STREAM), images,
                                     targets, partner, reg)

    def loss_fn(trainable):
      params = traverse_util.unflatten_dict({**frozen, **trainable})
      variables = as_variables(params, state.batch_stats)
      kwargs = dict(train=True, stage=stage, example_ids=ids, rngs={"dropout": dropout_rng})
      if bn_train:
        logits, updated = model.apply(variables, images, batch_norm_train=bn_train,
                                      mutable=["batch_stats"], **kwargs)
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
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    ema_params = (update_ema(state.ema_params, new_params, reg.ema_decay, mask)
                  if state.ema_params else state.ema_params)

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

  return parallel.data_parallel(per_device, mesh, parallel_mode)


def probabilities(logits):
  """Class probabilities, (N, max(C, 2)): softmax, or [1 - p, p] for one sigmoid logit."""
  if logits.shape[-1] == 1:
    positive = jax.nn.sigmoid(logits)
    return jnp.concatenate([1.0 - positive, positive], axis=-1)
  return jax.nn.softmax(logits, axis=-1)


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



def host(tree):
  """A pytree of device arrays as numpy arrays on the host."""
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def evaluate_state(eval_step, state: TrainState, make_batches: Callable, mesh) -> dict[str, Any]:
  """`evaluate` of the state's params, plus `ema_val_loss`/`ema_val_accuracy` when it has EMA.

  Args:
    make_batches: a function returning one fresh pass over the validation batches.
  """
  metrics = evaluate(eval_step, state.variables, make_batches(), mesh)
  if state.ema_params:
    ema = evaluate(eval_step, state.ema_variables, make_batches(), mesh)
    metrics.update({f"ema_{k}": ema[k] for k in ("val_loss", "val_accuracy")})
  return metrics


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
