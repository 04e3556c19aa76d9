"""Training: the train state, pure train/eval steps, and the loop.

The loop (`train_and_evaluate`) is the only place with side effects: it reads data, logs, evaluates
and checkpoints at steps chosen by `_is_due`. The steps are pure functions, compiled once, with the
state donated. Freezing comes from the optimizer's labels (see `transfer.optim`); the step also
uses them to differentiate only the trainable parameters, so a frozen conv base costs a forward
pass and no backward pass.

Python API for research:
    config = transfer.configs.load("quickstart")
    summary = transfer.train.train_and_evaluate(config, "/tmp/run")
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from transfer import checkpoint as ckpt_lib
from transfer import models, optim, parallel, runs
from transfer.errors import UserError

log = logging.getLogger("transfer")


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
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_step: jax.Array


def create_train_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """A fresh train state at step 0 for `params` and optimizer `tx`."""
  return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.PRNGKey(seed)),
                    nonfinite_step=jnp.asarray(-1, jnp.int32))


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


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, labels, mesh,
                    parallel_mode: str = "shard_map", stage: str = "full") -> Callable:
  """Builds the jitted data-parallel `train_step(state, batch) -> (state, metrics)`.

  Gradients are taken only with respect to the trainable parameters (those not labelled
  `frozen`), so JAX never builds the backward pass of a frozen backbone; frozen leaves still go
  through `tx` (as zeros, which `set_to_zero` drops), keeping `optax.multi_transform` the single
  source of truth for what trains.

  Args:
    model: the Flax module.
    tx: the optimizer from `optim.make_optimizer`.
    labels: its label tree.
    mesh: the `data` mesh.
    parallel_mode: `"shard_map"` or `"pmap"`.
    stage: `"full"` (batches hold images) or `"head"` (batches hold cached backbone features).

  Returns:
    A function taking the replicated state and a batch `{"image", "label"}` sharded over `data`;
    the returned metrics are device scalars (pull them only when logging).
  """
  mask = optim.trainable_mask(labels)

  def per_device(state: TrainState, batch):
    local_batch = batch["label"].shape[0]
    ids = parallel.example_ids(local_batch)
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    trainable, frozen = _split(state.params, mask)

    def loss_fn(trainable):
      params = traverse_util.unflatten_dict({**frozen, **trainable})
      logits = model.apply({"params": params}, batch["image"], train=True, stage=stage,
                           example_ids=ids, rngs={"dropout": dropout_rng})
      return loss_and_metrics(logits, batch["label"])

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
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
        nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~ok, state.step,
                                 state.nonfinite_step))
    return new_state, metrics

  return parallel.data_parallel(per_device, mesh, parallel_mode)


def make_eval_step(model: nn.Module, mesh, num_classes: int, parallel_mode: str = "shard_map",
                   stage: str = "full") -> Callable:
  """Builds `eval_step(params, batch) -> sums` over a padded batch with a `mask`.

  Returns summed (not averaged) loss, correct count, example count and a confusion matrix
  (rows = true class, columns = predicted), so the loop can add them over batches and every
  example counts exactly once.
  """
  classes = max(num_classes, 2)

  def per_device(params, batch):
    logits = model.apply({"params": params}, batch["image"], stage=stage)
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
  """Builds `features(params, batch) -> backbone feature maps`, sharded like the batch."""
  fn = lambda params, images: model.apply({"params": params}, images, stage="features")
  batch_spec = parallel.batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(parallel.replicated(mesh), batch_spec), out_shardings=batch_spec)


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class RunSetup:
  """What the loop derives from the config before training (kept for eval/predict too)."""

  model: nn.Module
  num_classes: int       # classes in the data
  outputs: int           # model outputs (1 for binary sigmoid)
  class_names: list[str]
  meta: dict[str, Any]   # JSON-able run metadata stored with every checkpoint


def run_metadata(config, class_names: list[str], outputs: int,
                 data: dict[str, Any] | None = None) -> dict[str, Any]:
  """The JSON metadata that rebuilds the model for eval/predict without the config.

  `data` is the dataset's identity (`Dataset.identity()`: absolute root and split fingerprint),
  which resume, `init_from` and eval compare against the data they are given.
  """
  from transfer.weights.preprocess import mode_for
  return {"model": config.model, "head": config.head, "head_hidden": config.head_hidden,
          "head_dropout": config.head_dropout, "outputs": outputs,
          "class_names": list(class_names), "weights": config.weights,
          "preprocessing": mode_for(_weights_source(config.weights)),
          "image_size": config.image_size, "eval_crop": config.eval_crop,
          "dtype": models.resolve_dtype(config.dtype),
          "dataset": config.dataset, "optimizer": config.optimizer,
          # The optimizer's state structure follows these, so resuming needs them unchanged.
          "trainable": list(config.trainable), "lr_mults": dict(config.lr_mults),
          "data": data}


def model_from_meta(meta: dict[str, Any], dtype: str | None = None) -> nn.Module:
  """Rebuilds the trained model from checkpoint metadata."""
  return models.get(meta["model"], head=meta["head"], num_classes=meta["outputs"],
                    head_hidden=meta["head_hidden"], head_dropout=meta["head_dropout"],
                    dtype=dtype or meta["dtype"])


def _weights_source(weights: str) -> str | None:
  """The weight source without the `?` (use-if-cached) marker; None for random init."""
  if not weights or weights == "none":
    return None
  return weights.rstrip("?")


def _total_steps(config, steps_per_epoch: int) -> int:
  if config.num_steps > 0:
    return config.num_steps
  return config.num_epochs * steps_per_epoch


def _is_due(step: int, every: int, total: int) -> bool:
  """Whether a periodic action (log/eval/checkpoint) happens after `step` (1-based)."""
  return step == total or (every > 0 and step % every == 0)


def _initial_params(config, model, shapes, data_identity=None):
  """Params before training: another run's (`init_from`), pretrained weights, or random.

  `shapes` is the model's params tree of `jax.ShapeDtypeStruct`s, the structure to fill.
  """
  image_size = config.image_size
  if config.init_from:
    params = _params_from_workdir(config.init_from, shapes, data_identity)
    return params, f"params from run {config.init_from} (init_from)"
  source = config.weights
  if not source or source == "none":
    return models.init_params(model, image_size, config.seed), "random initialisation (weights=none)"
  from transfer import weights as weights_lib
  params, report = weights_lib.load(source, model, image_size=image_size, rng=config.seed,
                                    return_report=True)
  return params, report.summary()


def _params_from_workdir(other: str, shapes, data_identity=None):
  """The latest params of another run, merged strictly into the tree described by `shapes`.

  When the other run trained on the same dataset, its split must be this run's split: a
  different hold-out would put its validation images into this run's training data.
  """
  checkpointer = ckpt_lib.Checkpointer(other, async_save=False)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise UserError(f"init_from={other}: no checkpoint there; train that run first")
    meta = checkpointer.restore_meta(step)
    theirs_data = meta["run"].get("data") or {}
    if data_identity and theirs_data.get("dataset") == data_identity.get("dataset"):
      _check_same_data(theirs_data, data_identity, f"init_from={other}")
    restored = checkpointer.manager.restore(step, args=ckpt_lib.ocp.args.Composite(**{
        ckpt_lib.STATE: ckpt_lib.ocp.args.StandardRestore(checkpointer.local_target(step))}))[
            ckpt_lib.STATE]
  finally:
    checkpointer.close()
  theirs = restored["params"]
  fresh_flat, their_flat = traverse_util.flatten_dict(shapes), traverse_util.flatten_dict(theirs)
  problems = [("/".join(k), v.shape, their_flat[k].shape) for k, v in fresh_flat.items()
              if k in their_flat and tuple(their_flat[k].shape) != tuple(v.shape)]
  missing = ["/".join(k) for k in fresh_flat if k not in their_flat]
  if problems or missing:
    raise UserError(f"init_from={other} (model {meta['run']['model']}, head {meta['run']['head']}) "
                    f"does not fit this model: missing {missing[:5]}, mis-shaped {problems[:5]}")
  return traverse_util.unflatten_dict({k: jnp.asarray(their_flat[k]) for k in fresh_flat})


class _Preemption:
  """Turns SIGTERM/SIGINT into a stop the loop checks after each step (then saves and exits).

  With several processes every one must save at the same step, or the collective save waits
  forever. There `sync` is Orbax's `reached_preemption`: SIGTERM is left to JAX's preemption
  notifier, which agrees on a step with the other processes, and SIGINT is passed on to it.
  """

  def __init__(self, sync: Callable[[int], bool] | None = None):
    self.signal: int | None = None
    self._sync = sync
    self._previous = {}

  def __enter__(self):
    signals = (signal.SIGINT,) if self._sync else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None:  # a second signal: stop now
      raise KeyboardInterrupt
    self.signal = signum
    if self._sync:  # JAX's notifier (installed by jax.distributed) owns SIGTERM
      os.kill(os.getpid(), signal.SIGTERM)

  def stop_at(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step` (call once per step, on every process)."""
    if self._sync is None:
      return self.signal is not None
    if not self._sync(step):
      return False
    self.signal = self.signal or signal.SIGTERM
    return True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


class MetricsWriter:
  """Appends one JSON object per event to `metrics.jsonl` (process 0 only), and TensorBoard."""

  def __init__(self, workdir: str, resume_step: int, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not enabled:
      return
    _truncate_after(self.path, resume_step)
    try:
      from tensorboardX import SummaryWriter  # optional
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      pass

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for k, v in record.items():
        if k not in ("step", "epoch") and isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, record["step"])

  def close(self):
    if self.tb is not None:
      self.tb.close()


def _truncate_after(path: str, step: int) -> None:
  """Drops records past `step`: they were logged after the checkpoint a resume starts from."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
  with open(path, "w") as f:
    f.writelines(keep)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of `WORKDIR/metrics.jsonl`."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _cache_features_reason(config, labels) -> str | None:
  """None if features can be cached, else why not (logged)."""
  if not config.cache_features:
    return "cache_features=False"
  if config.augment != "none":
    return f"augment={config.augment!r} changes the backbone's input every epoch"
  paths = optim.param_paths(labels)
  trained_backbone = [p for p, l in zip(paths, jax.tree_util.tree_leaves(labels))
                      if l != optim.FROZEN and not _is_head_param(p)]
  if trained_backbone:
    return f"backbone layers are trainable ({trained_backbone[0]}, ...)"
  if jax.process_count() > 1:
    return "multi-process runs stream images"
  return None


def _is_head_param(path: str) -> bool:
  return path.startswith("head/") or path.split("/")[0] in ("fc1", "fc2", "predictions")


def _compute_features(feature_fn, params, batches, mesh) -> tuple[np.ndarray, np.ndarray]:
  """Runs the frozen backbone once over `batches`; returns (features, labels) of real examples."""
  from transfer.data import prefetch_to_device
  feats, labels = [], []
  for batch in prefetch_to_device(batches, parallel.batch_sharding(mesh)):
    keep = np.asarray(batch["mask"]).astype(bool)
    feats.append(np.asarray(feature_fn(params, batch["image"]))[keep])
    labels.append(np.asarray(batch["label"])[keep])
  return np.concatenate(feats), np.concatenate(labels)


def feature_batches(features, labels, batch_size: int, seed: int, start_step: int) -> Iterator:
  """Batches of cached features in exactly the order the image pipeline would give (same
  per-epoch permutation), so a cached run trains on the same batches as a streaming one."""
  from transfer.data.pipeline import permutation
  n = len(features)
  steps_per_epoch = n // batch_size
  step = start_step
  while True:
    epoch, index = divmod(step, steps_per_epoch)
    rows = permutation(seed, epoch, n)[index * batch_size:(index + 1) * batch_size]
    yield {"image": features[rows], "label": labels[rows]}
    step += 1


def _feature_eval_batches(features, labels, batch_size: int) -> Iterator:
  """Ordered, padded batches of cached features with a `mask`."""
  for start in range(0, len(features), batch_size):
    rows = np.arange(start, min(start + batch_size, len(features)))
    pad = batch_size - len(rows)
    idx = np.concatenate([rows, np.zeros(pad, np.int64)])
    yield {"image": features[idx], "label": labels[idx],
           "mask": np.arange(batch_size) < len(rows)}


def _host(tree):
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def _evaluate(eval_step, params, batches, mesh) -> dict[str, Any]:
  """Validation metrics and confusion matrix over padded, masked batches."""
  from transfer.data import prefetch_to_device
  total = None
  for batch in prefetch_to_device(batches, parallel.batch_sharding(mesh)):
    sums = eval_step(params, {k: batch[k] for k in ("image", "label", "mask")})
    total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
  total = _host(total)
  count = max(float(total["count"]), 1.0)
  return {"val_loss": float(total["loss"]) / count, "val_accuracy": float(total["correct"]) / count,
          "val_count": int(total["count"]), "confusion": total["confusion"].astype(int).tolist()}


def default_workdir(config_name: str) -> str:
  """`workdirs/<config>-<time>`; a run's own record (`W/config.json`) gives W's name."""
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  path = os.path.normpath(config_name.partition(":")[0])
  name = os.path.basename(path).removesuffix(".py").removesuffix(".json")
  if path.endswith(".json") and name == "config":
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) or name
  return os.path.join("workdirs", f"{name}-{stamp}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices=None) -> dict[str, Any]:
  """Trains (or resumes) a run in `workdir` and evaluates it.

  Resume order: the workdir's latest good checkpoint > `config.init_from` > `config.weights`.
  A rerun must be the same run (`transfer.runs`): a config that changes the run's math or state
  is refused before anything in the workdir is touched. A start that fails before its first
  step leaves the workdir as it found it.

  Args:
    config: a config from `transfer.configs` (see `configs/default.py` for the keys).
    workdir: the run directory (checkpoints, metrics.jsonl, config.json, plots).
    devices: the devices to train on; default all of them (every process's).

  Returns:
    A summary dict: `step`, `best_val_accuracy` (None without a validation split), `final`
    (last eval metrics), `workdir`, `trained_steps` (steps taken by this call).

  Raises:
    UserError: bad config or data; `NonFiniteLossError` when the loss becomes NaN/inf.
    Preempted: a signal stopped training after a checkpoint was saved.
  """
  from transfer import configs
  workdir = os.path.abspath(workdir)
  config = runs.canonical_config(configs.validate(config))
  created = runs.prepare_workdir(workdir)
  before = set(os.listdir(workdir))
  saved_config = _saved_config(workdir)
  changes = runs.check_rerun(workdir, config, saved_config)
  progress = {"started": False}
  try:
    return _train(config, workdir, devices, changes, progress)
  except BaseException as error:
    if not progress["started"] and saved_config is None:
      runs.remove_failed_start(workdir, created, before)
    disk = _disk_error(error, workdir)
    if disk is not None:
      raise disk from None
    raise


def _saved_config(workdir: str) -> dict[str, Any] | None:
  """The run's original config: `config.json`, else the latest checkpoint's copy of it."""
  saved = runs.read_config(workdir)
  if saved is not None or not os.path.isdir(ckpt_lib.checkpoint_dir(workdir)):
    return saved
  checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
  try:
    for step in reversed(checkpointer.steps()):
      try:
        return checkpointer.restore_meta(step).get("config")
      except Exception:  # pylint: disable=broad-except  (damage is handled at restore)
        continue
    return None
  finally:
    checkpointer.close()


def _train(config, workdir: str, devices, changes: dict, progress_flag: dict) -> dict[str, Any]:
  """`train_and_evaluate` once the workdir is known to hold this run (or none)."""
  from transfer import data as data_lib

  is_main = jax.process_index() == 0
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(config.batch_size, mesh)
  if config.parallel not in parallel.MODES:
    raise UserError(f"unknown parallel mode {config.parallel!r}; valid: {', '.join(parallel.MODES)}")

  # Data first: bad input fails before any compilation.
  weights_source = _weights_source(config.weights)
  ds = data_lib.create(config, preprocess_source=weights_source or "none")
  _log(is_main, f"data: {config.dataset}: {ds.describe()}")
  num_classes = config.num_classes if config.num_classes > 0 else ds.num_classes
  if num_classes != ds.num_classes:
    raise UserError(f"num_classes={num_classes} but the dataset has {ds.num_classes} classes "
                    f"({', '.join(ds.class_names[:10])}); use num_classes=-1")
  outputs = 1 if num_classes == 2 and config.binary_sigmoid and config.head != "imagenet" \
      else num_classes
  models.check_image_size(config.model, config.head, config.image_size)
  model = models.get(config.model, head=config.head, num_classes=outputs,
                     head_hidden=config.head_hidden, head_dropout=config.head_dropout,
                     dtype=models.resolve_dtype(config.dtype), conv=config.conv)
  data_identity = ds.identity()
  meta_run = run_metadata(config, ds.class_names, outputs, data_identity)
  has_val = ds.num_val > 0
  if not has_val:
    _log(is_main, "no validation examples: training without evaluation (raise val_fraction or "
                  "add a val/ folder to evaluate)")

  total_steps = _total_steps(config, ds.steps_per_epoch)
  steps_per_epoch = ds.steps_per_epoch
  if total_steps <= 0 or steps_per_epoch <= 0:
    raise UserError(f"nothing to train: {ds.num_train} training examples, batch_size="
                    f"{config.batch_size}; lower batch_size or add data")

  # State: resume > init_from > weights > random.
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                                       keep_best=config.keep_best_checkpoints)
  try:
    # Shapes only: a resumed run never initialises, a fresh one initialises once below.
    shapes = jax.eval_shape(lambda: models.init_params(model, config.image_size, config.seed))
    tx, labels = optim.make_optimizer(config, shapes, total_steps)
    abstract = jax.eval_shape(lambda p: create_train_state(p, tx, config.seed), shapes)
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(mesh)),
        abstract)

    def check_meta(meta):
      _check_same_run(meta["run"], meta_run, workdir)
      _check_same_data(meta["run"].get("data"), data_identity, f"resuming {workdir}")

    resumed = checkpointer.restore_latest(abstract, check_meta=check_meta)
  except BaseException:
    checkpointer.close()
    raise
  if resumed is not None:
    start_step, state, meta = resumed
    init_note = f"resumed from step {start_step} in {workdir}"
    if start_step >= total_steps:
      checkpointer.close()
      return _already_finished(workdir, start_step, total_steps, is_main)
  else:
    start_step = 0
    try:
      params, init_note = _initial_params(config, model, shapes, data_identity)
    except BaseException:
      checkpointer.close()
      raise
    state = parallel.replicate(create_train_state(params, tx, config.seed), mesh)
  if changes:
    _log(is_main, f"config changes accepted (bookkeeping only, recorded in "
                  f"{runs.HISTORY_FILE}): {runs.format_changes(changes)}")
  _log(is_main, f"{config.model} + {config.head} head, {outputs} output(s), "
                f"{num_classes} classes; {init_note}")
  _log(is_main, optim.describe(state.params, labels))

  # Input: images, or backbone features computed once.
  no_cache_reason = _cache_features_reason(config, labels)
  stage = "full" if no_cache_reason else "head"
  if stage == "head":
    _log(is_main, "cache_features: running the frozen backbone once over train and val")
    feature_fn = make_feature_step(model, mesh)
    train_x, train_y = _compute_features(feature_fn, state.params,
                                         ds.eval_batches("train", config.batch_size), mesh)
    val_x, val_y = _compute_features(feature_fn, state.params,
                                     ds.eval_batches("val", config.batch_size), mesh)
    _log(is_main, f"cache_features: {len(train_x)} train / {len(val_x)} val feature maps "
                  f"{train_x.shape[1:]} in host memory ({(train_x.nbytes + val_x.nbytes) / 2**20:.0f} MiB)")
    train_iter = feature_batches(train_x, train_y, config.batch_size, config.seed, start_step)
    val_batches = lambda: _feature_eval_batches(val_x, val_y, config.batch_size)
  else:
    if config.cache_features:
      _log(is_main, f"cache_features not used: {no_cache_reason}")
    train_iter = ds.train_batches(start_step)
    val_batches = lambda: ds.eval_batches("val", config.batch_size)
  batches = data_lib.prefetch_to_device(train_iter, parallel.batch_sharding(mesh),
                                        size=config.prefetch)

  train_step = make_train_step(model, tx, labels, mesh, config.parallel, stage)
  eval_step = make_eval_step(model, mesh, num_classes, config.parallel, stage)
  schedule = optim.make_schedule(config, total_steps)

  if is_main:
    runs.record_start(workdir, config, changes, start_step)
  writer = MetricsWriter(workdir, start_step, is_main)
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  ckpt_every = (config.checkpoint_every_steps if config.checkpoint_every_steps > 0
                else steps_per_epoch)
  best = max([r["val_accuracy"] for r in read_metrics(workdir) if "val_accuracy" in r],
             default=None) if is_main else None
  last_eval: dict[str, Any] = {}

  def make_meta(step):
    return {"run": meta_run, "data_position": _position(ds, step, stage, steps_per_epoch),
            "step": step, "config": json.loads(config.to_json_best_effort())}

  def check_finite():
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
      raise NonFiniteLossError(f"loss became NaN/inf at step {bad + 1}; stopped without "
                               f"checkpointing (the last good checkpoint is kept). Lower "
                               f"learning_rate or check the data.")

  progress = _progress_bar(is_main, start_step, total_steps)
  sums, count, window_start, window_time = None, 0, start_step, time.perf_counter()
  step = saved_step = start_step
  sync = checkpointer.manager.reached_preemption if jax.process_count() > 1 else None
  with _Preemption(sync) as preemption:
    try:
      while step < total_steps:
        batch = next(batches)
        state, metrics = train_step(state, {"image": batch["image"], "label": batch["label"]})
        step += 1
        progress_flag["started"] = True
        sums = metrics if sums is None else jax.tree_util.tree_map(jnp.add, sums, metrics)
        count += 1
        if _is_due(step, config.log_every_steps, total_steps):
          check_finite()
          host = _host(sums)
          elapsed = time.perf_counter() - window_time
          record = {"step": step, "epoch": step / steps_per_epoch,
                    "train_loss": float(host["loss"]) / count,
                    "train_accuracy": float(host["accuracy"]) / count,
                    "images_per_sec": (step - window_start) * config.batch_size / max(elapsed, 1e-9),
                    "learning_rate": float(schedule(step - 1))}
          writer.write(record)
          progress.set_postfix(loss=f"{record['train_loss']:.4f}",
                               acc=f"{record['train_accuracy']:.3f}",
                               img_s=f"{record['images_per_sec']:.0f}")
          sums, count, window_start, window_time = None, 0, step, time.perf_counter()
        progress.update(1)
        eval_now = has_val and _is_due(step, eval_every, total_steps)
        stop = preemption.stop_at(step)
        if eval_now:
          check_finite()
          last_eval = _evaluate(eval_step, state.params, val_batches(), mesh)
          writer.write({"step": step, "epoch": step / steps_per_epoch,
                        **{k: v for k, v in last_eval.items() if k != "confusion"}})
          best = last_eval["val_accuracy"] if best is None else max(best, last_eval["val_accuracy"])
          if is_main:
            progress.write(f"step {step}: val_loss {last_eval['val_loss']:.4f} "
                           f"val_accuracy {last_eval['val_accuracy']:.4f}")
        if _is_due(step, ckpt_every, total_steps) or eval_now or stop:
          check_finite()
          checkpointer.save(step, state, make_meta(step),
                            val_accuracy=last_eval.get("val_accuracy") if eval_now else None)
          saved_step = step
        if stop:
          checkpointer.wait()  # a pending save's error surfaces here
          progress.close()
          name = signal.Signals(preemption.signal).name
          _log(is_main, f"{name}: saved a checkpoint at step {step} in {workdir}; rerun the same "
                        f"command to resume (exit status {128 + preemption.signal})")
          raise Preempted(step, preemption.signal)
    except (Preempted, NonFiniteLossError):
      raise
    except BaseException as error:
      # Whatever failed (eval, metrics, a signal handler, the disk), steps already trained are
      # saved first when they can be; the error is then reported as it is.
      if step > saved_step and int(jax.device_get(state.nonfinite_step)) < 0:
        try:
          checkpointer.save(step, state, make_meta(step))
          checkpointer.wait()
          saved_step = step
          _log(is_main, f"saved a checkpoint at step {step} before stopping")
        except Exception:  # pylint: disable=broad-except  (the first error is the one to report)
          pass
      raise
    finally:
      progress.close()
      writer.close()
      _close_checkpointer(checkpointer, workdir)

  summary = {"step": step, "best_val_accuracy": best, "final": last_eval, "workdir": workdir,
             "trained_steps": step - start_step}
  if is_main:
    try:
      _plot_curves(workdir)
    except (OSError, RuntimeError, ValueError) as e:
      _log(True, f"warning: could not write {os.path.join(workdir, 'curves.png')}: {e}")
    _log(True, f"done: {step} steps, {_result_line(best, last_eval)}; workdir {workdir}")
  return summary


def _close_checkpointer(checkpointer, workdir: str) -> None:
  """Closes (waits for) the checkpointer; its own failure is reported only if nothing else is."""
  in_flight = sys.exc_info()[1]
  try:
    checkpointer.close()
  except Exception as error:  # pylint: disable=broad-except
    if in_flight is None:
      raise
    log.warning("closing the checkpointer also failed: %s", str(error).splitlines()[0][:200])


def _result_line(best: float | None, last_eval: dict[str, Any]) -> str:
  if best is None:
    return "no validation split"
  last = last_eval.get("val_accuracy")
  return f"best val_accuracy {best:.4f}" + (f", last {last:.4f}" if last is not None else "")


def _already_finished(workdir: str, step: int, total_steps: int, is_main: bool) -> dict[str, Any]:
  """A rerun of a finished run: report its final metrics, train nothing."""
  records = read_metrics(workdir) if is_main else []
  evals = [r for r in records if "val_accuracy" in r]
  best = max((r["val_accuracy"] for r in evals), default=None)
  last_eval = dict(evals[-1]) if evals else {}
  _log(is_main, f"already finished: step {step} of {total_steps}, {_result_line(best, last_eval)}"
                f"; nothing to train (raise num_epochs or num_steps to train further); "
                f"workdir {workdir}")
  return {"step": step, "best_val_accuracy": best, "final": last_eval, "workdir": workdir,
          "trained_steps": 0}


_DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO)


def _disk_error(error: BaseException, workdir: str) -> UserError | None:
  """A `UserError` for a failed write to the workdir (disk full, read-only), else None."""
  seen, cause = set(), error
  while cause is not None and id(cause) not in seen:
    seen.add(id(cause))
    if isinstance(cause, OSError) and cause.errno in _DISK_ERRNOS:
      break
    cause = cause.__cause__ or cause.__context__
  else:
    return None
  directory = ckpt_lib.checkpoint_dir(workdir)
  committed = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) \
      if os.path.isdir(directory) else []
  where = (f"the last good checkpoint (step {committed[-1]}) is intact" if committed
           else "no checkpoint was written")
  return UserError(f"cannot write to {workdir}: {cause.strerror or cause}; {where}. Free space "
                   f"or fix permissions, then rerun the same command to resume")


def _position(ds, step: int, stage: str, steps_per_epoch: int) -> dict[str, int]:
  if stage == "full" and hasattr(ds, "position"):
    return dict(ds.position(step))
  epoch, index = divmod(step, steps_per_epoch)
  return {"epoch": epoch, "index": index}


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], workdir: str) -> None:
  """Refuses to resume a checkpoint whose model, head, classes or optimizer structure differ.

  The config check (`runs.check_rerun`) comes first; this one reads the checkpoint's own record,
  so it also holds for a workdir whose config.json was lost.
  """
  keys = ("model", "head", "head_hidden", "outputs", "class_names", "image_size", "optimizer",
          "trainable", "lr_mults", "preprocessing")
  changed = {k: (saved[k], current.get(k)) for k in keys
             if k in saved and saved[k] != current.get(k)}
  if changed:
    raise UserError(f"{workdir} holds a different run: {runs.format_changes(changed)}; nothing "
                    f"was changed there. Use another --workdir, or --config.init_from={workdir} "
                    "to start a new run from its params")


def _check_same_data(saved: dict[str, Any] | None, current: dict[str, Any] | None,
                     what: str) -> None:
  """Refuses data whose split differs from the one a checkpoint was trained on."""
  if not saved or not current:
    return
  from transfer import data as data_lib
  data_lib.check_same_data(saved, current, what)


class NonFiniteLossError(UserError):
  """The loss became NaN or inf."""


class Preempted(Exception):
  """Raised after a signal-triggered checkpoint; the CLI exits with 128 + the signal number."""

  def __init__(self, step: int, signum: int = signal.SIGTERM):
    super().__init__(f"preempted at step {step}")
    self.step = step
    self.signum = int(signum)
    self.exit_status = 128 + self.signum


def _log(enabled: bool, message: str) -> None:
  if enabled:
    print(message, file=sys.stderr, flush=True)


def _progress_bar(enabled: bool, start: int, total: int):
  from tqdm import tqdm
  return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
              file=sys.stderr, mininterval=1.0)


def _plot_curves(workdir: str) -> str | None:
  """Writes `curves.png` (loss and accuracy, train and val) from metrics.jsonl."""
  records = read_metrics(workdir)
  if not records:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, metric in zip(axes, ("loss", "accuracy")):
    for split in ("train", "val"):
      points = [(r["step"], r[f"{split}_{metric}"]) for r in records if f"{split}_{metric}" in r]
      if points:
        ax.plot(*zip(*points), marker="." if split == "val" else None, label=split)
    ax.set_xlabel("step")
    ax.set_title(metric)
    ax.legend()
  path = os.path.join(workdir, "curves.png")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def main(config, workdir: str | None, config_name: str, distributed: dict[str, Any]) -> int:
  """CLI entry: set up the distributed runtime, then train.

  Returns:
    The exit status: 0 when training finished (or had finished), 128 + the signal number when a
    signal stopped it after saving a checkpoint (143 for SIGTERM, 130 for Ctrl-C).
  """
  from transfer import distributed as dist
  dist.initialize(**distributed)
  workdir = workdir or default_workdir(config_name)
  try:
    summary = train_and_evaluate(config, workdir)
  except Preempted as stopped:
    return stopped.exit_status
  demo = config_name == "quickstart" and config.dataset == "synthetic"
  if demo and summary["trained_steps"] and jax.process_index() == 0:
    print(_NEXT_STEPS.format(workdir=workdir), file=sys.stderr)
  return 0


_NEXT_STEPS = """
That was the offline demo (synthetic images). Look at it, then run the real recipe:
  transfer eval --workdir {workdir}
  transfer weights download keras:vgg16_notop        # ImageNet conv weights, 58 MB
  pip install -e '.[tfds]'                           # TensorFlow Datasets for cats_vs_dogs
  transfer train --config cats_vs_dogs --workdir workdirs/cats_vs_dogs"""
