"""What a run is: its model and initial params built from a config, the metadata stored with every
checkpoint, and the workdir's record of the run (its original config and the changes made on
reruns), with the checks that keep a rerun from mixing two runs.

Train, eval, predict and bench build a run's model here (`build_model`, `initial_params`,
`model_from_meta`), so the rules (two classes train one sigmoid logit, `weights=none` is random
init, `?` means use-if-cached) are written once.

A run's identity is every config value that changes its math or the structure of its state.
Rerunning a workdir with a different identity is refused before anything in it is touched;
values that only change bookkeeping (how long, how often to log/evaluate/checkpoint, workers,
caches) are accepted, logged and appended to `config_history.jsonl`. `config.json` is written
once, by the run's first start, and never rewritten: it stays the record of what the run was.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import shutil
from typing import Any

from transfer import models
from transfer.errors import UserError

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"

# Keys that change neither the math of a step nor the state's structure. Everything else is the
# run's identity. `num_epochs`/`num_steps` join the identity when the schedule depends on the
# total length (see `identity_changes`).
BOOKKEEPING = frozenset({
    "num_epochs", "num_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
    "keep_checkpoints", "keep_best_checkpoints", "data_workers", "prefetch", "cache_images",
    "cache_dir", "strict_data", "data_dir", "parallel", "conv",
    # Only read when a run starts from step 0; a resumed run's params come from its checkpoint.
    "init_from",
})
_LENGTH_KEYS = ("num_epochs", "num_steps")


def canonical_config(config):
  """A copy of `config` whose folder dataset and `init_from` are absolute, resolved paths.

  The run's record then names the same folder from any working directory and however the path
  was spelled (`data/x`, `./data/x`, `~/data/x`).
  """
  config = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") \
      else config
  kind, _, path = str(config.dataset).partition(":")
  with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
    if kind == "folder" and path:
      config.dataset = "folder:" + os.path.realpath(os.path.expanduser(path))
    if config.get("init_from"):
      config.init_from = os.path.realpath(os.path.expanduser(config.init_from))
  return config


def flat_config(config) -> dict[str, Any]:
  """`{"key": value, "synthetic.base_size": value, ...}`: a ConfigDict or dict as JSON values."""
  if hasattr(config, "to_json_best_effort"):
    config = json.loads(config.to_json_best_effort())
  flat = {}

  def visit(prefix: str, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, dict) and key != "lr_mults":
        visit(name + ".", value)
      else:
        flat[name] = value

  visit("", config)
  return flat


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """`{key: (old, new)}` for each key whose value differs.

  A key the saved config lacks (a key added to `transfer` after the run started) counts as
  unchanged: the run was made with that key's default behaviour.
  """
  return {k: (saved[k], v) for k, v in current.items() if k in saved and saved[k] != v}


def identity_changes(changes: dict[str, tuple[Any, Any]], schedule: str) -> dict:
  """The changes that make a different run (see `BOOKKEEPING`)."""
  length_matters = schedule != "constant"
  return {k: v for k, v in changes.items()
          if (k not in BOOKKEEPING or (length_matters and k in _LENGTH_KEYS))
          and not _moved_folder(k, v)}


def _moved_folder(key: str, change: tuple[Any, Any]) -> bool:
  """A folder dataset at another path: the same run if its files are the same, which the split
  fingerprint decides when the checkpoint is read (`transfer.data.check_same_data`)."""
  return key == "dataset" and all(str(v).startswith("folder:") for v in change)


def _relevant(flat: dict[str, Any], dataset: str) -> dict[str, Any]:
  """Drops keys that the run's dataset never reads (synthetic.* for a folder run)."""
  if dataset == "synthetic":
    return flat
  return {k: v for k, v in flat.items() if not k.startswith("synthetic.")}


def format_changes(changes: dict[str, tuple[Any, Any]]) -> str:
  return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changes.items()))


def read_config(workdir: str) -> dict[str, Any] | None:
  """The run's original config (`config.json`) as JSON, or None when the workdir has none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({e}); it is this run's record: restore it, or use "
                    "another --workdir") from None


def check_rerun(workdir: str, config, saved: dict[str, Any] | None) -> dict[str, tuple]:
  """Refuses a rerun whose config makes a different run; returns the bookkeeping changes.

  Args:
    workdir: the run directory (for the message).
    config: the config of this start.
    saved: the run's original config as JSON (`read_config`), or None for a new run.

  Returns:
    `{key: (old, new)}` of accepted changes (empty for a new run or an unchanged rerun).

  Raises:
    UserError: one line listing every changed identity key, old -> new, and the ways forward.
  """
  if saved is None:
    return {}
  dataset = str(saved.get("dataset", ""))
  changes = config_changes(_relevant(flat_config(saved), dataset),
                           _relevant(flat_config(config), dataset))
  different = identity_changes(changes, str(saved.get("schedule", "constant")))
  if different:
    length = [k for k in different if k in _LENGTH_KEYS]
    why = (f" ({', '.join(length)} sets the length of the {saved.get('schedule')} schedule)"
           if length else "")
    raise UserError(f"{workdir} holds a different run: {format_changes(different)}{why}; "
                    f"nothing was changed there. Use another --workdir, or "
                    f"--config.init_from={workdir} to start a new run from its params")
  return changes


def record_start(workdir: str, config, changes: dict[str, tuple], step: int) -> None:
  """Writes `config.json` on a run's first start; appends accepted changes to the history.

  Each history record holds the whole difference from `config.json` at that start, so the last
  one says what the run's config is now (`recorded_config`); a start that changes nothing since
  the last record writes none.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    _write_atomic(path, config.to_json_best_effort(indent=2) + "\n")
  diff = {k: [old, new] for k, (old, new) in sorted(changes.items())}
  history = read_history(workdir)
  if diff == (history[-1]["changes"] if history else {}):
    return
  record = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "step": step,
            "changes": diff}
  _write_atomic(os.path.join(workdir, HISTORY_FILE),
                "".join(json.dumps(r) + "\n" for r in [*history, record]))


def read_history(workdir: str) -> list[dict[str, Any]]:
  """The records of `config_history.jsonl`, oldest first (none for a run never changed)."""
  path = os.path.join(workdir, HISTORY_FILE)
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def recorded_config(workdir: str):
  """The run's config as of its last start: `config.json` with the last recorded changes.

  What `transfer train --workdir W` without `--config` continues with.
  """
  from transfer import configs
  config = configs.load(os.path.join(workdir, CONFIG_FILE))
  history = read_history(workdir)
  for key, (_, new) in (history[-1]["changes"] if history else {}).items():
    node, leaf = config, key
    for part in key.split(".")[:-1] if key != "lr_mults" else ():
      node, leaf = node[part], key.split(".")[-1]
    with node.unlocked():
      node[leaf] = new
  return config


def _write_atomic(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def saved_config(workdir: str) -> dict[str, Any] | None:
  """The run's original config: `config.json`, else the latest checkpoint's copy of it."""
  from transfer import checkpoint as ckpt_lib
  saved = read_config(workdir)
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


_DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO)


def disk_error(error: BaseException, workdir: str) -> UserError | None:
  """A `UserError` for a failed write to the workdir (disk full, read-only), else None.

  Python's own writes raise `OSError`; Orbax's writer (TensorStore) raises a `ValueError` whose
  text carries the OS error code, so both are recognised.
  """
  reason = _disk_reason(error)
  if reason is None:
    return None
  from transfer import checkpoint as ckpt_lib
  directory = ckpt_lib.checkpoint_dir(workdir)
  committed = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) \
      if os.path.isdir(directory) else []
  where = (f"the last good checkpoint (step {committed[-1]}) is intact" if committed
           else "no checkpoint was written")
  return UserError(f"cannot write to {workdir}: {reason}; {where}. Free space or fix "
                   f"permissions, then rerun the same command to resume")


def _disk_reason(error: BaseException) -> str | None:
  """The OS's words for a failed write somewhere in `error`'s chain, else None."""
  seen, cause = set(), error
  while cause is not None and id(cause) not in seen:
    seen.add(id(cause))
    if isinstance(cause, OSError) and cause.errno in _DISK_ERRNOS:
      return cause.strerror or str(cause)
    code = re.search(r"os_error_code='?(\d+)", str(cause))
    if code and int(code.group(1)) in _DISK_ERRNOS:
      return os.strerror(int(code.group(1)))
    cause = cause.__cause__ or cause.__context__
  return None


def prepare_workdir(workdir: str) -> bool:
  """Makes sure `workdir` can hold a run; returns whether this call created it.

  Raises:
    UserError: the path is a file, or the directory cannot be created or written.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} is a file, not a directory; give a directory path")
  created = not os.path.exists(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create --workdir {workdir}: {e.strerror or e}") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UserError(f"--workdir {workdir} is not writable; give a directory you can write to")
  return created


def remove_failed_start(workdir: str, created: bool, before: set[str]) -> None:
  """Undoes a start that failed before its first step: what it created goes, nothing else."""
  if created:
    shutil.rmtree(workdir, ignore_errors=True)
    return
  for name in set(os.listdir(workdir)) - before if os.path.isdir(workdir) else ():
    target = os.path.join(workdir, name)
    if os.path.isdir(target) and not os.path.islink(target):
      shutil.rmtree(target, ignore_errors=True)
    else:
      try:
        os.remove(target)
      except OSError:
        pass


# ----------------------------------------------------------------------------- model and params


def weights_source(weights: str) -> str | None:
  """The weight source without the `?` (use-if-cached) marker; None for random init."""
  from transfer.weights import sources
  return sources.parse(weights)[0]


def output_count(config, num_classes: int) -> int:
  """Model outputs: one sigmoid logit for two classes (`binary_sigmoid`), else one per class."""
  if num_classes == 2 and config.binary_sigmoid and config.head != "imagenet":
    return 1
  return num_classes


def model_variant(config) -> str | None:
  """The architecture variant to build (ResNet: `keras` v1 or `torchvision` v1.5), else None.

  `variant=auto` builds what the run's params need: the variant of the `init_from` run, or the
  one the weight file was made for, or the model's default for random initialisation.
  """
  spec = models.spec(config.model)
  if not spec.variants:
    return None
  chosen = config.get("variant", "auto")
  if chosen != "auto":
    return chosen
  if config.get("init_from"):
    recorded = _recorded_run(config.init_from).get("variant")
    if recorded:
      return recorded
  source = weights_source(config.weights)
  if source:
    from transfer import weights as weights_lib
    needed = weights_lib.variant_for(source, spec.name)
    if needed:
      return needed
  return spec.variants[0]


def _recorded_run(workdir: str) -> dict[str, Any]:
  """The run metadata of another run's latest checkpoint ({} when it has none)."""
  from transfer import checkpoint as ckpt_lib
  if not os.path.isdir(ckpt_lib.checkpoint_dir(workdir)):
    return {}
  checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
  try:
    step = checkpointer.latest_step()
    return checkpointer.restore_meta(step).get("run", {}) if step is not None else {}
  finally:
    checkpointer.close()


def build_model(config, num_classes: int, dtype: str | None = None):
  """The run's model for a dataset of `num_classes` classes.

  Args:
    config: the run config (model, head, head_hidden, head_dropout, image_size, dtype, conv).
    num_classes: classes in the data.
    dtype: compute dtype override (default: `config.dtype`, resolved for this backend).

  Returns:
    `(model, outputs)`: the unbound Flax module and its number of outputs.
  """
  outputs = output_count(config, num_classes)
  models.check_image_size(config.model, config.head, config.image_size)
  model = models.get(config.model, head=config.head, num_classes=outputs,
                     head_hidden=config.head_hidden, head_dropout=config.head_dropout,
                     dtype=dtype or models.resolve_dtype(config.dtype), conv=config.conv,
                     variant=model_variant(config))
  return model, outputs


def initial_params(config, model, shapes=None, data_identity=None):
  """`initial_variables`' params (for networks without BatchNorm, all there is)."""
  variables, note = initial_variables(config, model, shapes, data_identity)
  return variables["params"], note


def initial_variables(config, model, shapes=None, data_identity=None):
  """Variables before training: another run's (`init_from`), pretrained weights, or random.

  Args:
    config: the run config (init_from, weights, image_size, seed).
    model: the module from `build_model`.
    shapes: its params tree of `jax.ShapeDtypeStruct`s (computed when not given).
    data_identity: this run's `Dataset.identity()`, checked against an `init_from` run's.

  Returns:
    `(variables, note)`: `{"params"}` (and `"batch_stats"` for BatchNorm networks) and one line
    saying where they came from.
  """
  import jax
  if config.init_from:
    if shapes is None:
      shapes = jax.eval_shape(lambda: models.init_params(model, config.image_size, config.seed))
    variables = variables_from_workdir(config.init_from, shapes, data_identity)
    return variables, f"params from run {config.init_from} (init_from)"
  source = weights_source(config.weights)
  if source is None:
    return (models.init_variables(model, config.image_size, config.seed),
            "random initialisation (weights=none)")
  from transfer import weights as weights_lib
  if models.spec(config.model).batch_norm:
    variables, report = weights_lib.load_variables(
        config.weights, model, image_size=config.image_size, rng=config.seed, return_report=True)
    return dict(variables), report.summary()
  params, report = weights_lib.load(config.weights, model, image_size=config.image_size,
                                    rng=config.seed, return_report=True)
  return {"params": params}, report.summary()


def variables_from_workdir(other: str, shapes, data_identity=None):
  """The latest variables of another run, its params merged strictly into the tree described by
  `shapes` (its BatchNorm statistics come with their layers).

  When the other run trained on the same dataset, its split must be this run's split: a
  different hold-out would put its validation images into this run's training data.
  """
  import jax
  import jax.numpy as jnp
  from flax import traverse_util
  from transfer import checkpoint as ckpt_lib
  if not os.path.isdir(ckpt_lib.checkpoint_dir(other)):
    raise UserError(f"init_from={other}: no checkpoint there; train that run first")
  checkpointer = ckpt_lib.Checkpointer(other, async_save=False)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise UserError(f"init_from={other}: no checkpoint there; train that run first")
    meta = checkpointer.restore_meta(step)
    theirs_data = meta["run"].get("data") or {}
    if data_identity and theirs_data.get("dataset") == data_identity.get("dataset"):
      check_same_data(theirs_data, data_identity, f"init_from={other}")
    their_variables, _ = checkpointer.restore_variables(step)
  finally:
    checkpointer.close()
  theirs = their_variables["params"]
  fresh_flat, their_flat = traverse_util.flatten_dict(shapes), traverse_util.flatten_dict(theirs)
  problems = [("/".join(k), v.shape, their_flat[k].shape) for k, v in fresh_flat.items()
              if k in their_flat and tuple(their_flat[k].shape) != tuple(v.shape)]
  missing = ["/".join(k) for k in fresh_flat if k not in their_flat]
  if problems or missing:
    raise UserError(f"init_from={other} (model {meta['run']['model']}, head {meta['run']['head']}) "
                    f"does not fit this model: missing {missing[:5]}, mis-shaped {problems[:5]}")
  variables = {"params": traverse_util.unflatten_dict(
      {k: jnp.asarray(their_flat[k]) for k in fresh_flat})}
  if "batch_stats" in their_variables:
    variables["batch_stats"] = jax.tree_util.tree_map(jnp.asarray,
                                                      their_variables["batch_stats"])
  return variables


# ----------------------------------------------------------------------------- checkpoint metadata


def run_metadata(config, class_names: list[str], outputs: int,
                 data: dict[str, Any] | None = None, *, conv: str,
                 variant: str | None = None) -> dict[str, Any]:
  """The JSON metadata, stored with every checkpoint, that rebuilds the model without the config.

  `data` is the dataset's identity (`Dataset.identity()`: absolute root and split fingerprint),
  which resume, `init_from` and eval compare against the data they are given. `conv` is the
  concrete conv choice the run's model compiled with (`build_model(...)[0].conv`), on record
  only: `model_from_meta` resolves `auto` again for the machine that evaluates.
  """
  from transfer.weights.preprocess import mode_for
  return {"model": config.model, "head": config.head, "head_hidden": config.head_hidden,
          "head_dropout": config.head_dropout, "outputs": outputs,
          "class_names": list(class_names), "weights": config.weights,
          "preprocessing": mode_for(weights_source(config.weights)),
          "image_size": config.image_size, "eval_crop": config.eval_crop,
          "dtype": models.resolve_dtype(config.dtype), "conv": conv, "variant": variant,
          "dataset": config.dataset, "optimizer": config.optimizer,
          # The optimizer's state structure follows these, so resuming needs them unchanged.
          "trainable": list(config.trainable), "lr_mults": dict(config.lr_mults),
          "data": data}


def model_from_meta(meta: dict[str, Any], dtype: str | None = None):
  """Rebuilds the trained model from checkpoint metadata (`run_metadata`).

  The conv choice is resolved again (`auto`) for this machine: it changes speed and float32
  rounding, not the params.
  """
  return models.get(meta["model"], head=meta["head"], num_classes=meta["outputs"],
                    head_hidden=meta["head_hidden"], head_dropout=meta["head_dropout"],
                    dtype=dtype or meta["dtype"], variant=meta.get("variant"))


def check_same_run(saved: dict[str, Any], current: dict[str, Any], workdir: str) -> None:
  """Refuses to resume a checkpoint whose model, head, classes or optimizer structure differ.

  `check_rerun` compares configs first; this reads the checkpoint's own record, so it also holds
  for a workdir whose config.json was lost.
  """
  keys = ("model", "variant", "head", "head_hidden", "outputs", "class_names", "image_size",
          "optimizer", "trainable", "lr_mults", "preprocessing")
  changed = {k: (saved[k], current.get(k)) for k in keys
             if k in saved and saved[k] != current.get(k)}
  if changed:
    raise UserError(f"{workdir} holds a different run: {format_changes(changed)}; nothing "
                    f"was changed there. Use another --workdir, or --config.init_from={workdir} "
                    "to start a new run from its params")


def check_same_data(saved: dict[str, Any] | None, current: dict[str, Any] | None,
                    what: str) -> None:
  """Refuses data whose split differs from the one a checkpoint was trained on."""
  if not saved or not current:
    return
  from transfer import data as data_lib
  data_lib.check_same_data(saved, current, what)
