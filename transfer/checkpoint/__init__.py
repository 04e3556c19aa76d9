"""Orbax checkpoints under `WORKDIR/checkpoints`: the train state plus what is needed to resume.

Each checkpoint step holds two items:
  * `state`: the whole `TrainState` pytree (step, params, optimizer state, RNG), saved
    asynchronously and restored onto whatever mesh the current run has (elastic restore);
  * `meta`: JSON with the data position and the run metadata (model, head, classes, weight source,
    preprocessing, image size) so eval/predict can rebuild the model without the original config.

Orbax writes each step into a temporary directory and renames it only once complete, so a crash
mid-save never replaces a committed checkpoint. A checkpoint that is damaged anyway (a file
truncated or deleted) fails to restore; `restore_latest` reports it in one line and falls back to
the previous step.

A run directory has one writer (`train`, which holds its lock) and any number of readers (eval,
predict, export, `init_from`). Readers open it with `read_only=True`: they never clean Orbax's
temporary folders (the writer's save in progress) nor set damaged steps aside; they skip what
they cannot read. How a reader keeps its step from being rotated away under it is
`transfer.checkpoint.trained`'s job.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax

from transfer import logs

with logs.root_unchanged():  # absl, logging as Orbax imports, would configure the root logger
  import orbax.checkpoint as ocp
  from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
from etils import epath

from transfer import ema
from transfer.checkpoint import quiet  # noqa: F401  (installs its filters on import)
from transfer.errors import UserError

log = logging.getLogger("transfer")


STATE, META = "state", "meta"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """Saves and restores train states for one workdir.

  Args:
    workdir: the run directory.
    keep: latest checkpoints to keep.
    keep_best: best checkpoints (by `val_accuracy`) to keep in addition.
    async_save: write in a background thread while training continues.
    read_only: a reader's view (eval, predict, export, `init_from`): nothing in the directory is
      created, cleaned, deleted or moved; `save` is refused, a damaged step is only skipped.
  """

  def __init__(self, workdir: str, keep: int = 2, keep_best: int = 1, async_save: bool = True,
               read_only: bool = False):
    # best_fn makes Orbax write each step's metrics to disk: without it BestN forgets them on
    # resume (and drops the best step), and `best_step()` is just the latest.
    common = dict(best_fn=lambda m: m["val_accuracy"], best_mode="max")
    if read_only:
      # Nothing is created, deleted or cleaned: the writer's in-progress save (a temporary
      # folder) and its rotation are its own business.
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                             enable_async_checkpointing=False, **common)
    else:
      policies = [pp.LatestN(n=max(1, keep))]
      if keep_best > 0:
        policies.append(pp.BestN(get_metric_fn=lambda m: m["val_accuracy"], n=keep_best,
                                 keep_checkpoints_without_metrics=False))
      options = ocp.CheckpointManagerOptions(
          preservation_policy=pp.AnyPreservationPolicy(policies),
          enable_async_checkpointing=async_save, cleanup_tmp_directories=True, **common)
    self.read_only = read_only
    self.directory = checkpoint_dir(workdir)
    self.manager = None
    # Steps whose commit record is damaged: the writer sets them aside, a reader skips them.
    self.unreadable = self._unreadable_records()
    for step, error in sorted(self.unreadable.items()):
      self._report_damaged(step, error)
    if not read_only:
      self.unreadable = {}  # set aside: a step saved again under that number is a new one
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=(STATE, META))

  def _unreadable_records(self) -> dict[int, Exception]:
    """`{step: error}` for steps whose commit record (`_CHECKPOINT_METADATA`) is not JSON.

    Orbax reads every step's record when a manager opens (for the metrics of BestN) and fails
    outright on one damaged file; such a step is unusable anyway.
    """
    unreadable = {}
    if not os.path.isdir(self.directory):
      return unreadable
    for name in sorted(os.listdir(self.directory)):
      record = os.path.join(self.directory, name, "_CHECKPOINT_METADATA")
      if not name.isdigit() or not os.path.isfile(record):
        continue
      try:
        with open(record) as f:
          json.load(f)
      except FileNotFoundError:
        continue  # rotated away while listed
      except (OSError, ValueError) as e:
        unreadable[int(name)] = e
    return unreadable

  def steps(self) -> list[int]:
    """Committed steps, oldest first (a reader leaves out those with a damaged record)."""
    self.manager.reload()
    return sorted(s for s in self.manager.all_steps() if s not in self.unreadable)

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state, meta: dict[str, Any], val_accuracy: float | None = None,
           force: bool = True) -> None:
    """Starts saving `state` and `meta` at `step` (returns before the write finishes)."""
    if self.read_only:
      raise RuntimeError(f"{self.directory} was opened read-only; only `train` saves there")
    metrics = None if val_accuracy is None else {"val_accuracy": float(val_accuracy)}
    self.manager.save(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}),
        metrics=metrics, force=force)

  def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
    """Restores `step` onto the shardings of `abstract_state` (a tree of ShapeDtypeStruct).

    Raises:
      CheckpointMismatch: the saved state's structure or shapes differ from `abstract_state`
        (a config change, not damage); nothing is read or moved.
    """
    problems = self.fit_problems(step, abstract_state)
    if problems:
      raise CheckpointMismatch(f"checkpoint {step} in {self.directory} does not fit this "
                               f"config's model/optimizer: {'; '.join(problems)}")
    return self._read(step, abstract_state)

  def _read(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
    """`restore` once the saved arrays are known to fit `abstract_state`."""
    target, fill = _saved_structure(abstract_state, self._saved_keys(step))
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(target), META: ocp.args.JsonRestore()}))
    except ValueError as e:
      if "structures do not match" in str(e):  # the layout differs: not damage
        raise CheckpointMismatch(f"checkpoint {step} in {self.directory} does not fit this "
                                 f"config's state: {_first_line(e)[:200]}") from None
      raise
    return fill(restored[STATE]), dict(restored[META])

  def _saved_tree(self, step: int):
    """Orbax's metadata tree of the state saved at `step` (shapes and dtypes, no array data)."""
    path = epath.Path(self.directory) / str(step) / STATE
    saved = ocp.StandardCheckpointHandler().metadata(path)
    return saved.tree if hasattr(saved, "tree") else saved

  def _saved_keys(self, step: int) -> set[str] | None:
    """The top-level names of the state saved at `step` (None when unknown)."""
    tree = self._saved_tree(step)
    return set(tree) if isinstance(tree, dict) else None

  def saved_shapes(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """`{"params.head.logits.bias": (shape, dtype), ...}` of the state saved at `step`.

    Reads only Orbax's tree metadata, so it works on a checkpoint whose array data is damaged.
    """
    leaves = jax.tree_util.tree_flatten_with_path(self._saved_tree(step))[0]
    return {_dotted(p): (tuple(m.shape), str(m.dtype)) for p, m in leaves}

  def fit_problems(self, step: int, abstract_state) -> list[str]:
    """What differs between the state saved at `step` and `abstract_state` (empty: it fits)."""
    saved = self.saved_shapes(step)
    wanted = {_dotted(p): (tuple(x.shape), str(x.dtype))
              for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    reshaped = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    problems = []
    for what, keys in (("missing", missing), ("not in this model", extra)):
      if keys:
        problems.append(f"{len(keys)} saved array(s) {what}, e.g. {_short(keys)}")
    if reshaped:
      k = reshaped[0]
      problems.append(f"{len(reshaped)} of another shape, e.g. {k}: saved {saved[k][0]}, "
                      f"this config {wanted[k][0]}")
    return problems

  def restore_meta(self, step: int) -> dict[str, Any]:
    """Only the JSON metadata of `step`."""
    restored = self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    return dict(restored[META])

  def restore_latest(self, abstract_state, check_meta=None) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest checkpoint that restores, falling back past damaged ones; None if none.

    Only unreadable data counts as damage (set aside in `checkpoints_damaged/`). A checkpoint
    that belongs to another run, or does not fit `abstract_state`, raises and nothing is moved.
    A workdir whose every checkpoint was unreadable is refused rather than restarted at step 0.

    Args:
      abstract_state: restore target (shapes, dtypes, shardings), or a function of the step
        giving it (a staged run's state has its stage's optimizer state).
      check_meta: called with each candidate's metadata before its state is read; it raises
        (e.g. `UserError`) when the checkpoint belongs to a different run. That error
        propagates: a different run is not a damaged checkpoint.

    Raises:
      CheckpointMismatch, UserError: see above.
    """
    target_for = abstract_state if callable(abstract_state) else lambda _: abstract_state
    for step in reversed(self.steps()):
      abstract_state = target_for(step)
      try:
        meta = self.restore_meta(step)
        problems = self.fit_problems(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        self._report_damaged(step, e)
        continue
      if check_meta is not None:
        check_meta(meta)
      if problems:
        raise CheckpointMismatch(f"checkpoint {step} in {self.directory} does not fit this "
                                 f"config's model/optimizer: {'; '.join(problems)}")
      try:
        state, meta = self._read(step, abstract_state)  # its fit was checked above
        return step, state, meta
      except CheckpointMismatch:
        raise
      except Exception as e:  # pylint: disable=broad-except
        # Orbax raises many types for damaged files; any of them means "not usable".
        self._report_damaged(step, e)
    damaged = self.damaged_steps()
    if damaged:
      raise UserError(f"no checkpoint in {self.directory} could be read ({len(damaged)} set aside "
                      f"in {self.damaged_directory}); refusing to start over from step 0. Move "
                      f"{self.damaged_directory} away to train from scratch here, or use "
                      "another --workdir")
    return None

  @property
  def damaged_directory(self) -> str:
    return os.path.join(os.path.dirname(self.directory), "checkpoints_damaged")

  def damaged_steps(self) -> list[str]:
    """Names of the checkpoints set aside as unreadable (`STEP-TIME`)."""
    if not os.path.isdir(self.damaged_directory):
      return []
    return sorted(os.listdir(self.damaged_directory))

  def _report_damaged(self, step: int, error: Exception) -> None:
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    if self.read_only:  # only the writer moves things
      log.warning("checkpoint at step %d is damaged (%s: %s); skipped, trying the previous one",
                  step, type(error).__name__, first[:200])
      return
    moved = self._set_aside(step)
    log.warning("checkpoint at step %d is damaged (%s: %s); moved to %s, trying the previous one",
                step, type(error).__name__, first[:200], moved)

  def _set_aside(self, step: int) -> str:
    """Moves a damaged step out of the manager's way (kept for inspection, never deleted)."""
    target = os.path.join(self.damaged_directory, f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"transfer_set_aside_{step}")
    if self.manager is not None:
      self.manager.reload()
    return target

  def restore_variables(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model variables (`params`, and `batch_stats` when the network has BatchNorm, and
    `ema_params` when the run kept a parameter EMA) and the metadata of `step`, whole on this
    process's first device.

    For `init_from`, eval, predict and export: it works whatever devices or processes wrote the
    checkpoint, and needs no optimizer or config to describe the state.
    """
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(self.local_target(step)),
        META: ocp.args.JsonRestore()}))
    state = restored[STATE]
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
      variables["batch_stats"] = state["batch_stats"]
    if state.get(ema.FIELD):  # runs with ema_decay > 0 (`ema.serving_variables` picks)
      variables[ema.FIELD] = state[ema.FIELD]
    return variables, dict(restored[META])

  def local_target(self, step: int):
    """The saved state's shapes and dtypes, placed whole on this process's first device.

    A restore target that does not depend on the devices or processes that wrote the checkpoint
    (without one, Orbax reuses the saved sharding, whose devices may not exist here).
    """
    path = epath.Path(self.directory) / str(step) / STATE
    saved = ocp.StandardCheckpointHandler().metadata(path)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _saved_structure(abstract_state, saved_keys: set[str] | None):
  """The restore target for a checkpoint that lacks empty fields of `abstract_state`.

  A state field added later (`batch_stats`, empty for networks without BatchNorm) is absent
  from checkpoints written before it existed; it holds no arrays, so such a checkpoint fits.
  Returns the target to restore into and a function that puts the restored tree back into the
  form of `abstract_state`.
  """
  unchanged = abstract_state, lambda restored: restored
  if saved_keys is None or not dataclasses.is_dataclass(abstract_state):
    return unchanged
  # The saved fields only: flax's static ones (a TrainState's `apply_fn`, `tx`) hold no arrays.
  fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)
            if f.metadata.get("pytree_node", True)}
  missing = {k for k, v in fields.items()
             if k not in saved_keys and not jax.tree_util.tree_leaves(v)}
  if not missing:
    return unchanged
  target = {k: v for k, v in fields.items() if k not in missing}
  return target, lambda restored: abstract_state.replace(
      **dict(restored), **{k: fields[k] for k in missing})


class CheckpointMismatch(UserError):
  """A checkpoint that is readable but was written by a differently configured run."""


def _dotted(path) -> str:
  """`params.head.logits.bias` for a key path (dict keys, attributes, sequence indices)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return ".".join(parts)


def _short(keys: list[str], n: int = 3) -> str:
  more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
  return ", ".join(keys[:n]) + more


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) describing `tree`, as a restore target."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


# What eval, predict and export read of a trained run (kept in its own file).
from transfer.checkpoint.trained import load_trained, load_trained_variables, select_steps  # noqa: E402,F401
