"""The training loop: the only place where training has side effects.

`train_and_evaluate` reads data, runs the pure steps of `transfer.steps` stage after stage
(`transfer.stages`; one stage unless the config lists several), logs
(`transfer.metrics`), evaluates and checkpoints (`transfer.checkpoint`) at steps chosen by
`_is_due`, and stops cleanly on SIGTERM/SIGINT. What the run is (its data, model, initial
variables, each stage's optimizer, regularisation, parameter average and jitted steps, and the
checks that a checkpoint is this run's) is assembled once by `transfer.assembly`, the same way
`lr_find` and `bench` assemble it.

Python API for research:
    config = transfer.configs.load("quickstart")
    summary = transfer.train.train_and_evaluate(config, "/tmp/run")
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from transfer import assembly, eval_loop, features, logs, metrics as metrics_lib, optim, parallel
from transfer import run_end
from transfer import checkpoint as ckpt_lib
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
  from transfer import configs, platform
  platform.setup()  # first use from Python: before `jax.process_count` starts the backend
  workdir = os.path.abspath(workdir)
  config = workdir_lib.canonical_config(configs.validate(config))
  created = workdir_lib.prepare_workdir(workdir)
  before = set(os.listdir(workdir))
  from transfer import distributed
  with distributed.lock_run_directory(workdir):  # one writer: before anything is read or written
    return _train_locked(config, workdir, created, before, devices)


def _train_locked(config, workdir: str, created: bool, before: set[str],
                  devices) -> dict[str, Any]:
  """`train_and_evaluate` once this process holds the run directory's lock."""
  saved_config = workdir_lib.saved_config(workdir)
  changes = workdir_lib.check_rerun(workdir, config, saved_config)
  progress = {"started": False}
  # Several processes leave SIGTERM to JAX's preemption notifier (see `Preemption`).
  signals = (preemption_lib.sigterm_raises() if jax.process_count() == 1
             else contextlib.nullcontext())
  try:
    with signals, logs.root_unchanged():
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
  is_main = jax.process_index() == 0
  started = time.perf_counter()
  run = assembly.build(config, devices)  # data first: bad input fails before any compilation
  _log(is_main, f"data: {config.dataset}: {run.data.describe()}")
  if not run.data.num_val:
    _log(is_main, "no validation examples: training without evaluation (raise val_fraction or "
                  "add a val/ folder to evaluate)")

  # State: resume > init_from > weights > random.
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                                       keep_best=config.keep_best_checkpoints)
  try:
    resumed = checkpointer.restore_latest(
        run.abstract_state, check_meta=lambda meta: run.check_checkpoint(meta, workdir))
    if resumed is None:
      _log(is_main, f"building model {config.model} ...")
    variables, init_note = run.initial_variables() if resumed is None else (None, "")
  except BaseException:
    checkpointer.close()
    raise
  start_step, state, state_stage = 0, None, -1
  if resumed is not None:
    start_step, state, _ = resumed
    init_note = f"resumed from step {start_step} in {workdir}"
    if start_step >= run.total_steps:
      checkpointer.close()
      return run_end.already_finished(workdir, start_step, run.total_steps, is_main, config)
    state_stage = run.stage_of(start_step).stage.index
  if changes:
    _log(is_main, f"config changes accepted (bookkeeping only, recorded in "
                  f"{workdir_lib.HISTORY_FILE}): {workdir_lib.format_changes(changes)}")
  _log(is_main, f"{config.model} + {config.head} head, {run.outputs} output(s), "
                f"{run.num_classes} classes; {init_note} "
                f"({time.perf_counter() - started:.1f}s)")
  if is_main:
    workdir_lib.record_start(workdir, config, changes, start_step)
  return _loop(run, workdir, checkpointer, start_step, state, state_stage, variables,
               progress_flag)


def _loop(run: assembly.Run, workdir: str, checkpointer, start_step: int, state, state_stage: int,
          variables, progress_flag: dict) -> dict[str, Any]:
  """Trains stage after stage from `start_step`, logging, evaluating and checkpointing at the
  steps `_is_due` picks; whatever fails, the steps already trained are saved first."""
  config, is_main, steps_per_epoch = run.config, jax.process_index() == 0, run.data.steps_per_epoch
  writer = metrics_lib.MetricsWriter(workdir, start_step, is_main)
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
  ckpt_every = (config.checkpoint_every_steps if config.checkpoint_every_steps > 0
                else steps_per_epoch)
  records = metrics_lib.read_metrics(workdir) if is_main else []
  best = max([r["val_accuracy"] for r in records if "val_accuracy" in r], default=None)
  marked = {r.get("stage_index") for r in records if r.get("event") == "stage_start"}
  last_eval: dict[str, Any] = {}
  progress = _progress_bar(is_main, start_step, run.total_steps)
  step = saved_step = start_step
  sync = checkpointer.manager.reached_preemption if jax.process_count() > 1 else None
  with preemption_lib.Preemption(sync) as preemption:
    try:
      for stage in run.plan[max(state_stage, 0):]:
        if stage.index == state_stage and step >= stage.end:
          continue  # resumed at the end of this stage: the next one starts from its state
        parts = run.stage(stage)
        if stage.index != state_stage:
          # A new stage: a fresh optimizer (and step count) for its trainable set, as a new run
          # started from these params would have.
          state = (run.new_state(variables, parts) if state is None
                   else run.restart_state(state, parts))
          state_stage = stage.index
        local = step - stage.start
        if run.staged:
          _log(is_main, stages_lib.describe(stage, len(run.plan)))
          if stage.index not in marked and is_main:
            writer.write({"step": stage.start, "epoch": stage.start / steps_per_epoch,
                          "event": "stage_start", "stage": stage.name,
                          "stage_index": stage.index})
            marked.add(stage.index)
        current = _open_stage(run, parts, state, checkpointer, local, is_main)
        make_meta = current.make_meta
        sums, count = None, 0
        # Speed over train steps only: a stage's first step (it compiles) and the time spent
        # evaluating, checkpointing and logging are left out of `images_per_sec`.
        timed_steps, timed_s, tick = 0, 0.0, None
        while local < stage.steps:
          batch = next(current.batches)
          if tick is None:  # the stage's first step compiles its train step (or loads it)
            _log(is_main, "compiling the train step ...")
            compiling = time.perf_counter()
          state, metrics = current.train_step(state, {"image": batch["image"],
                                                      "label": batch["label"]})
          if tick is None:
            jax.block_until_ready(metrics)  # the compiled first step, finished before timing
            _log(is_main, f"compiled and ran the first step in "
                          f"{time.perf_counter() - compiling:.1f}s")
          else:
            timed_steps, timed_s = timed_steps + 1, timed_s + time.perf_counter() - tick
          step += 1
          local += 1
          progress_flag["started"] = True
          sums = metrics if sums is None else jax.tree_util.tree_map(jnp.add, sums, metrics)
          count += 1
          if _is_due(local, config.log_every_steps, stage.steps):
            _check_finite(state, stage)
            record = _train_record(run, stage, step, local, sums, count, timed_s, timed_steps,
                                   current.schedule)
            writer.write(record)
            if record["images_per_sec"] is not None:
              progress.set_postfix(loss=f"{record['train_loss']:.4f}",
                                   acc=f"{record['train_accuracy']:.3f}",
                                   img_s=f"{record['images_per_sec']:.0f}")
            sums, count, timed_steps, timed_s = None, 0, 0, 0.0
          progress.update(1)
          eval_now = run.data.num_val > 0 and _is_due(local, eval_every, stage.steps)
          stop = preemption.stop_at(step)
          if eval_now:
            _check_finite(state, stage)
            last_eval = eval_loop.evaluate_state(current.eval_step, state, current.val_batches,
                                                 run.mesh)
            writer.write({"step": step, "epoch": step / steps_per_epoch,
                          **{k: v for k, v in last_eval.items() if k != "confusion"}})
            best = (last_eval["val_accuracy"] if best is None
                    else max(best, last_eval["val_accuracy"]))
            _log(is_main, f"step {step}: val_loss {last_eval['val_loss']:.4f} "
                          f"val_accuracy {last_eval['val_accuracy']:.4f}")
          if _is_due(local, ckpt_every, stage.steps) or eval_now or stop:
            _check_finite(state, stage)
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
          tick = time.perf_counter()
        del current  # a stage's feature cache goes with it
    except (preemption_lib.Preempted, NonFiniteLossError):
      raise
    except BaseException:
      # Whatever failed (eval, metrics, a signal handler, the disk), steps already trained are
      # saved first when they can be; the error is then reported as it is.
      if (step > saved_step and state is not None
          and int(jax.device_get(state.nonfinite_step)) < 0):
        try:
          checkpointer.save(step, state, make_meta(step, step - run.plan[state_stage].start))
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
  return run_end.finish(workdir, step, start_step, best, last_eval, is_main)


@dataclasses.dataclass
class _StageInputs:
  """What the loop needs to run one stage: its steps, batches and checkpoint metadata."""
  kind: str
  batches: Any
  val_batches: Any
  train_step: Any
  eval_step: Any
  schedule: Any
  make_meta: Any


def _open_stage(run: assembly.Run, parts: assembly.StageParts, state, checkpointer,
                local: int, is_main: bool) -> _StageInputs:
  """A stage's inputs from its step `local` on, and the steps of the run for them."""
  stage, c = parts.stage, parts.config
  _log(is_main, optim.describe(state.params, parts.param_labels))
  if c.augment != run.config.augment:
    # The previous stage's last checkpoint is finished first: a data source may open files
    # through the same file-system layer Orbax writes with (TFDS' test mocks patch it).
    checkpointer.wait()
  stage_ds = run.stage_data(parts)
  kind, train_iter, val_batches = features.stage_inputs(
      c, parts.param_labels, run.model, state, stage_ds, run.mesh, local,
      log=lambda line: _log(is_main, line))
  from transfer import data as data_lib
  batches = data_lib.prefetch_to_device(train_iter, parallel.batch_sharding(run.mesh),
                                        size=run.config.prefetch)
  stage_meta = {"index": stage.index, "name": stage.name, "start": stage.start,
                "steps": stage.steps}
  run_meta = run.stage_metadata(parts)
  config_json = json.loads(run.config.to_json_best_effort())
  steps_per_epoch = run.data.steps_per_epoch

  def make_meta(step, local):
    return {"run": run_meta, "stage": stage_meta,
            "data_position": features.data_position(stage_ds, local, kind, steps_per_epoch),
            "step": step, "config": config_json}

  return _StageInputs(kind, batches, val_batches, run.train_step(parts, kind),
                      run.eval_step(kind), optim.make_schedule(c, stage.steps), make_meta)


def _check_finite(state, stage: stages_lib.Stage) -> None:
  """Raises `NonFiniteLossError` when the state recorded a NaN/inf loss (one host sync)."""
  bad = int(jax.device_get(state.nonfinite_step))
  if bad >= 0:
    raise NonFiniteLossError(f"loss became NaN/inf at step {stage.start + bad + 1}; "
                             f"stopped without checkpointing (the last good checkpoint "
                             f"is kept). Lower learning_rate or check the data.")


def _train_record(run: assembly.Run, stage, step: int, local: int, sums, count: int,
                  timed_s: float, timed_steps: int, schedule) -> dict[str, Any]:
  """The metrics.jsonl record of a logging window: mean loss and accuracy, speed, rate.

  `images_per_sec` is over the window's timed train steps (`timed_steps` in `timed_s`), None
  when the window holds only a stage's first, compiling step.
  """
  host = eval_loop.host(sums)
  record = {"step": step, "epoch": step / run.data.steps_per_epoch,
            "train_loss": float(host["loss"]) / count,
            "train_accuracy": float(host["accuracy"]) / count,
            "images_per_sec": (timed_steps * run.config.batch_size / max(timed_s, 1e-9)
                               if timed_steps else None),
            "learning_rate": float(schedule(local - 1))}
  if run.staged:
    record["stage"] = stage.name
  return record


def _close_checkpointer(checkpointer, workdir: str) -> None:
  """Closes (waits for) the checkpointer; its own failure is reported only if nothing else is."""
  in_flight = sys.exc_info()[1]
  try:
    checkpointer.close()
  except Exception as error:  # pylint: disable=broad-except
    if in_flight is None:
      raise
    log.warning("closing the checkpointer also failed: %s", str(error).splitlines()[0][:200])


class NonFiniteLossError(UserError):
  """The loss became NaN or inf."""


def _log(enabled: bool, message: str) -> None:
  if enabled:
    logs.console(message)


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
    print(run_end.NEXT_STEPS.format(workdir=workdir), file=sys.stderr)
  return 0

