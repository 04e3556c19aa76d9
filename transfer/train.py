"""The training loop: the only place where training has side effects.

`train_and_evaluate` reads data, runs the pure steps of `transfer.steps` stage after stage
(`transfer.stages`; one stage unless the config lists several), logs
(`transfer.metrics`), evaluates and checkpoints (`transfer.checkpoint`) at steps chosen by
`_is_due`, and stops cleanly on SIGTERM/SIGINT. What the run is (its model, initial params, and
the checks that a rerun is the same run) comes from `transfer.runs`.

Python API for research:
    config = transfer.configs.load("quickstart")
    summary = transfer.train.train_and_evaluate(config, "/tmp/run")
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from transfer import checkpoint as ckpt_lib
from transfer import ema as ema_lib, eval_loop, features, metrics as metrics_lib, models, optim
from transfer import parallel, regularisation, runs, steps, train_state
from transfer import preemption as preemption_lib
from transfer import stages as stages_lib
from transfer import workdir as workdir_lib
from transfer.errors import UserError

log = logging.getLogger("transfer")


def _is_due(step: int, every: int, total: int) -> bool:
  """Whether a periodic action (log/eval/checkpoint) happens after `step` (1-based)."""
  return step == total or (every > 0 and step % every == 0)


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
    preemption.Preempted: a signal stopped training after a checkpoint was saved.
  """
  from transfer import configs
  workdir = os.path.abspath(workdir)
  config = workdir_lib.canonical_config(configs.validate(config))
  created = workdir_lib.prepare_workdir(workdir)
  before = set(os.listdir(workdir))
  saved_config = workdir_lib.saved_config(workdir)
  changes = workdir_lib.check_rerun(workdir, config, saved_config)
  progress = {"started": False}
  # Several processes leave SIGTERM to JAX's preemption notifier (see `Preemption`).
  signals = (preemption_lib.sigterm_raises() if jax.process_count() == 1
             else contextlib.nullcontext())
  try:
    with signals:
      return _train(config, workdir, devices, changes, progress)
  except BaseException as error:
    if not progress["started"] and saved_config is None:
      workdir_lib.remove_failed_start(workdir, created, before)
    disk = workdir_lib.disk_error(error, workdir)
    if disk is not None:
      raise disk from None
    raise


def _train(config, workdir: str, devices, changes: dict, progress_flag: dict) -> dict[str, Any]:
  """`train_and_evaluate` once the workdir is known to hold this run (or none)."""
  from transfer import data as data_lib

  is_main = jax.process_index() == 0
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(config.batch_size, mesh)

  # Data first: bad input fails before any compilation.
  weights_source = runs.weights_source(config.weights)
  ds = data_lib.create(config, preprocess_source=weights_source or "none")
  _log(is_main, f"data: {config.dataset}: {ds.describe()}")
  num_classes = config.num_classes if config.num_classes > 0 else ds.num_classes
  if num_classes != ds.num_classes:
    raise UserError(f"num_classes={num_classes} but the dataset has {ds.num_classes} classes "
                    f"({', '.join(ds.class_names[:10])}); use num_classes=-1")
  model, outputs = runs.build_model(config, num_classes)
  data_identity = ds.identity()
  meta_run = runs.run_metadata(config, ds.class_names, outputs, data_identity, conv=model.conv,
                               variant=getattr(model, "variant", None))
  has_val = ds.num_val > 0
  if not has_val:
    _log(is_main, "no validation examples: training without evaluation (raise val_fraction or "
                  "add a val/ folder to evaluate)")

  steps_per_epoch = ds.steps_per_epoch
  plan = stages_lib.plan(config, steps_per_epoch) if steps_per_epoch > 0 else []
  total_steps = stages_lib.total_steps(plan)
  if total_steps <= 0 or steps_per_epoch <= 0 or min(s.steps for s in plan) <= 0:
    raise UserError(f"nothing to train: {ds.num_train} training examples, batch_size="
                    f"{config.batch_size}; lower batch_size or add data")
  staged = stages_lib.is_staged(config)

  # State: resume > init_from > weights > random.
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                                       keep_best=config.keep_best_checkpoints)
  try:
    # Shapes only: a resumed run never initialises, a fresh one initialises once below.
    variable_shapes = jax.eval_shape(
        lambda: models.init_variables(model, config.image_size, config.seed))
    shapes = variable_shapes["params"]
    optimizers = _StageOptimizers(shapes)
    ema = ema_lib.enabled(config)
    for stage in plan:  # every stage's patterns are checked before anything runs
      optimizers.get(stage)

    def abstract_for(step):
      """The restore target of a checkpoint at `step`: the state of its stage's optimizer."""
      tx, _ = optimizers.get(stages_lib.stage_of(plan, step))
      abstract = jax.eval_shape(
          lambda v: train_state.create_train_state(v["params"], tx, config.seed, v.get("batch_stats"),
                                             ema=ema),
          variable_shapes)
      return jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(mesh)),
          abstract)

    def check_meta(meta):
      stage = stages_lib.stage_of(plan, int(meta.get("step", 0)))
      runs.check_same_run(meta["run"], _stage_run(meta_run, stage), workdir)
      runs.check_same_data(meta["run"].get("data"), data_identity, f"resuming {workdir}")
      saved = meta.get("stage")
      if saved and (saved.get("index"), saved.get("start")) != (stage.index, stage.start):
        raise UserError(f"{workdir} holds a different run: its checkpoint at step {meta['step']} "
                        f"is in stage {saved.get('index', 0) + 1} (from step {saved.get('start')})"
                        f", this config puts it in stage {stage.index + 1} (from step "
                        f"{stage.start}); nothing was changed there. Use another --workdir")

    resumed = checkpointer.restore_latest(abstract_for, check_meta=check_meta)
    if resumed is None:
      variables, init_note = runs.initial_variables(config, model, shapes, data_identity)
  except BaseException:
    checkpointer.close()
    raise
  if resumed is not None:
    start_step, state, meta = resumed
    init_note = f"resumed from step {start_step} in {workdir}"
    if start_step >= total_steps:
      checkpointer.close()
      return _already_finished(workdir, start_step, total_steps, is_main)
    state_stage = stages_lib.stage_of(plan, start_step).index
  else:
    start_step, state, state_stage = 0, None, -1
  if changes:
    _log(is_main, f"config changes accepted (bookkeeping only, recorded in "
                  f"{workdir_lib.HISTORY_FILE}): {workdir_lib.format_changes(changes)}")
  _log(is_main, f"{config.model} + {config.head} head, {outputs} output(s), "
                f"{num_classes} classes; {init_note}")

  if is_main:
    workdir_lib.record_start(workdir, config, changes, start_step)
  writer = metrics_lib.MetricsWriter(workdir, start_step, is_main)
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  ckpt_every = (config.checkpoint_every_steps if config.checkpoint_every_steps > 0
                else steps_per_epoch)
  records = metrics_lib.read_metrics(workdir) if is_main else []
  best = max([r["val_accuracy"] for r in records if "val_accuracy" in r], default=None)
  marked = {r.get("stage_index") for r in records if r.get("event") == "stage_start"}
  last_eval: dict[str, Any] = {}
  progress = _progress_bar(is_main, start_step, total_steps)
  step = saved_step = start_step
  sync = checkpointer.manager.reached_preemption if jax.process_count() > 1 else None
  with preemption_lib.Preemption(sync) as preemption:
    try:
      for stage in plan[max(state_stage, 0):]:
        c = stage.config
        if stage.index == state_stage and step >= stage.end:
          continue  # resumed at the end of this stage: the next one starts from its state
        tx, param_labels = optimizers.get(stage)
        if stage.index != state_stage:
          # A new stage: a fresh optimizer (and step count) for its trainable set, as a new run
          # started from these params would have.
          state = (parallel.replicate(train_state.create_train_state(
              variables["params"], tx, config.seed, variables.get("batch_stats"), ema=ema), mesh)
                   if state is None else _restart_state(state, tx, config.seed, mesh, ema))
          state_stage = stage.index
        local = step - stage.start
        if staged:
          _log(is_main, stages_lib.describe(stage, len(plan)))
          if stage.index not in marked and is_main:
            writer.write({"step": stage.start, "epoch": stage.start / steps_per_epoch,
                          "event": "stage_start", "stage": stage.name,
                          "stage_index": stage.index})
            marked.add(stage.index)
        _log(is_main, optim.describe(state.params, param_labels))
        if c.augment == config.augment:
          stage_ds = ds
        else:
          # The previous stage's last checkpoint is finished first: a data source may open files
          # through the same file-system layer Orbax writes with (TFDS' test mocks patch it).
          checkpointer.wait()
          stage_ds = data_lib.create(c, preprocess_source=weights_source or "none")
        kind, train_iter, val_batches = _inputs(c, param_labels, model, state, stage_ds, mesh,
                                                local, is_main)
        batches = data_lib.prefetch_to_device(train_iter, parallel.batch_sharding(mesh),
                                              size=config.prefetch)
        train_step = steps.make_train_step(model, tx, param_labels, mesh, config.parallel, kind,
                                           regularisation.Regularisation.from_config(c),
                                           ema_lib.decay(c))
        eval_step = steps.make_eval_step(model, mesh, num_classes, config.parallel, kind)
        schedule = optim.make_schedule(c, stage.steps)
        stage_meta = {"index": stage.index, "name": stage.name, "start": stage.start,
                      "steps": stage.steps}
        run_meta = _stage_run(meta_run, stage)

        def make_meta(step, local, kind=kind, stage_ds=stage_ds, stage_meta=stage_meta,
                      run_meta=run_meta):
          return {"run": run_meta, "stage": stage_meta,
                  "data_position": _position(stage_ds, local, kind, steps_per_epoch),
                  "step": step, "config": json.loads(config.to_json_best_effort())}

        def check_finite(stage=stage):
          bad = int(jax.device_get(state.nonfinite_step))
          if bad >= 0:
            raise NonFiniteLossError(f"loss became NaN/inf at step {stage.start + bad + 1}; "
                                     f"stopped without checkpointing (the last good checkpoint "
                                     f"is kept). Lower learning_rate or check the data.")

        sums, count, window_start, window_time = None, 0, step, time.perf_counter()
        while local < stage.steps:
          batch = next(batches)
          state, metrics = train_step(state, {"image": batch["image"], "label": batch["label"]})
          step += 1
          local += 1
          progress_flag["started"] = True
          sums = metrics if sums is None else jax.tree_util.tree_map(jnp.add, sums, metrics)
          count += 1
          if _is_due(local, config.log_every_steps, stage.steps):
            check_finite()
            host = eval_loop.host(sums)
            elapsed = time.perf_counter() - window_time
            record = {"step": step, "epoch": step / steps_per_epoch,
                      "train_loss": float(host["loss"]) / count,
                      "train_accuracy": float(host["accuracy"]) / count,
                      "images_per_sec": (step - window_start) * config.batch_size
                                        / max(elapsed, 1e-9),
                      "learning_rate": float(schedule(local - 1))}
            if staged:
              record["stage"] = stage.name
            writer.write(record)
            progress.set_postfix(loss=f"{record['train_loss']:.4f}",
                                 acc=f"{record['train_accuracy']:.3f}",
                                 img_s=f"{record['images_per_sec']:.0f}")
            sums, count, window_start, window_time = None, 0, step, time.perf_counter()
          progress.update(1)
          eval_now = has_val and _is_due(local, eval_every, stage.steps)
          stop = preemption.stop_at(step)
          if eval_now:
            check_finite()
            last_eval = eval_loop.evaluate_state(eval_step, state, val_batches, mesh)
            writer.write({"step": step, "epoch": step / steps_per_epoch,
                          **{k: v for k, v in last_eval.items() if k != "confusion"}})
            best = (last_eval["val_accuracy"] if best is None
                    else max(best, last_eval["val_accuracy"]))
            if is_main:
              progress.write(f"step {step}: val_loss {last_eval['val_loss']:.4f} "
                             f"val_accuracy {last_eval['val_accuracy']:.4f}")
          if _is_due(local, ckpt_every, stage.steps) or eval_now or stop:
            check_finite()
            checkpointer.save(step, state, make_meta(step, local),
                              val_accuracy=last_eval.get("val_accuracy") if eval_now else None)
            saved_step = step
          if stop:
            checkpointer.wait()  # a pending save's error surfaces here
            progress.close()
            name = signal.Signals(preemption.signal).name
            _log(is_main, f"{name}: saved a checkpoint at step {step} in {workdir}; rerun the "
                          f"same command to resume (exit status {128 + preemption.signal})")
            raise preemption_lib.Preempted(step, preemption.signal)
        del batches, train_iter, val_batches  # a stage's feature cache goes with it
    except (preemption_lib.Preempted, NonFiniteLossError):
      raise
    except BaseException:
      # Whatever failed (eval, metrics, a signal handler, the disk), steps already trained are
      # saved first when they can be; the error is then reported as it is.
      if (step > saved_step and state is not None
          and int(jax.device_get(state.nonfinite_step)) < 0):
        try:
          checkpointer.save(step, state, make_meta(step, step - plan[state_stage].start))
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
      metrics_lib.plot_curves(workdir)
    except (OSError, RuntimeError, ValueError) as e:
      _log(True, f"warning: could not write {os.path.join(workdir, 'curves.png')}: {e}")
    _log(True, f"done: {step} steps, {_result_line(best, last_eval)}; workdir {workdir}")
  return summary


def _inputs(config, param_labels, model, state, ds, mesh, start: int, is_main: bool):
  """A stage's input: `(kind, train batches from its step `start`, val batches function)`.

  `kind` is `head` when the stage trains on backbone features computed once (`cache_features`
  with a frozen backbone and no augmentation), else `full` (images).
  """
  no_cache_reason = features.cache_features_reason(config, param_labels)
  if no_cache_reason is None:
    _log(is_main, "cache_features: running the frozen backbone once over train and val")
    train_iter, val_batches, note = features.cached_inputs(
        model, state.variables, ds, mesh, config.batch_size, config.seed, start)
    _log(is_main, f"cache_features: {note}")
    return "head", train_iter, val_batches
  if config.cache_features:
    _log(is_main, f"cache_features not used: {no_cache_reason}")
  return "full", ds.train_batches(start), lambda: ds.eval_batches("val", config.batch_size)


class _StageOptimizers:
  """Each stage's `(tx, param_labels)`, built once (resume and the loop ask for the same ones)."""

  def __init__(self, shapes):
    self.shapes, self.built = shapes, {}

  def get(self, stage: stages_lib.Stage):
    if stage.index not in self.built:
      self.built[stage.index] = optim.make_optimizer(stage.config, self.shapes, stage.steps)
    return self.built[stage.index]


def _stage_run(meta_run: dict[str, Any], stage: stages_lib.Stage) -> dict[str, Any]:
  """The run metadata of a checkpoint in `stage`: its optimizer and trainable set."""
  c = stage.config
  return dict(meta_run, optimizer=c.optimizer, trainable=list(c.trainable),
              lr_mults=dict(c.lr_mults))


def _restart_state(state, tx, seed: int, mesh, ema: bool):
  """The state a new stage starts from: these params and BatchNorm statistics, a fresh optimizer
  state for `tx` (none for frozen params), step 0. Jitted so it works on arrays that span
  processes; params pass through bit for bit. The parameter average (`ema_decay`) restarts at
  the params too, as in a run started with `init_from`."""
  restart = lambda params, batch_stats: train_state.create_train_state(params, tx, seed, batch_stats,
                                                                 ema=ema)
  return jax.jit(restart, out_shardings=parallel.replicated(mesh))(state.params,
                                                                   state.batch_stats)


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
  records = metrics_lib.read_metrics(workdir) if is_main else []
  evals = [r for r in records if "val_accuracy" in r]
  best = max((r["val_accuracy"] for r in evals), default=None)
  last_eval = dict(evals[-1]) if evals else {}
  _log(is_main, f"already finished: step {step} of {total_steps}, {_result_line(best, last_eval)}"
                f"; nothing to train (raise num_epochs or num_steps to train further); "
                f"workdir {workdir}")
  return {"step": step, "best_val_accuracy": best, "final": last_eval, "workdir": workdir,
          "trained_steps": 0}


def _position(ds, step: int, stage: str, steps_per_epoch: int) -> dict[str, int]:
  if stage == "full" and hasattr(ds, "position"):
    return dict(ds.position(step))
  epoch, index = divmod(step, steps_per_epoch)
  return {"epoch": epoch, "index": index}


class NonFiniteLossError(UserError):
  """The loss became NaN or inf."""


def _log(enabled: bool, message: str) -> None:
  if enabled:
    print(message, file=sys.stderr, flush=True)


def _progress_bar(enabled: bool, start: int, total: int):
  from tqdm import tqdm
  return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
              file=sys.stderr, mininterval=1.0)


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
  except preemption_lib.Preempted as stopped:
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
