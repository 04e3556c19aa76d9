"""A run directory's record of what the run is: its original config (`config.json`, written once),
the changes accepted on reruns (`config_history.jsonl`), and the checks that keep a rerun from
mixing two runs or losing one.

A run's identity is every config value that changes its math or the structure of its state.
Rerunning a workdir with a different identity is refused before anything in it is touched;
values that only change bookkeeping (how long, how often to log/evaluate/checkpoint, workers,
caches) are accepted, logged and appended to the history. Which is which is each key's role in
`transfer/configs/_schema.py`, the one place it is declared. A start that fails before its first
step is undone; a full or read-only disk is one line naming the checkpoint that is kept.

One writer per run directory: `train` holds an exclusive lock on `WORKDIR/train.lock` for its
lifetime (`lock_run`), so a second `train` there is refused before it touches anything.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
from typing import Any

from transfer import configs
from transfer.errors import UserError

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
LOCK_FILE = "train.lock"
# flock's errors on a file system that cannot lock (some NFS mounts, FUSE file systems).
_NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


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
    if config.init_from:
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


def identity_changes(changes: dict[str, tuple[Any, Any]], schedule: str,
                     staged: bool = False) -> dict:
  """The changes that make a different run.

  Each key's role is declared once, in `transfer/configs/_schema.py` (`ROLES`), and read here at
  every call: bookkeeping keys change neither the math of a step nor the state's structure;
  every other key, and any key without a role, is the run's identity. In a staged run
  (`stages`, itself part of the identity) or under a schedule other than constant, the length
  keys (`num_epochs`/`num_steps`) place the stage boundaries or shape the schedule, so they are
  part of it too.
  """
  length_matters = schedule != "constant" or staged
  accepted = configs.keys_with(configs.BOOKKEEPING) if length_matters else \
      configs.keys_with(configs.BOOKKEEPING, configs.LENGTH)
  return {k: v for k, v in changes.items() if k not in accepted and not _moved_folder(k, v)}


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
  staged = bool(saved.get("stages"))
  different = identity_changes(changes, str(saved.get("schedule", "constant")), staged)
  if different:
    length = [k for k in different if k in configs.keys_with(configs.LENGTH)]
    what = "the stages" if staged else f"the {saved.get('schedule')} schedule"
    why = f" ({', '.join(length)} sets the length of {what})" if length else ""
    raise UserError(f"{workdir} holds a different run: {format_changes(different)}{why}; "
                    f"nothing was changed there. Use another --workdir, or "
                    f"--config.init_from={workdir} to start a new run from its params")
  return changes


def record_start(workdir: str, config, changes: dict[str, tuple], step: int) -> None:
  """Writes `config.json` on a run's first start; appends accepted changes to the history.

  The accepted changes are `check_rerun`'s: keys whose declared role is bookkeeping (and the
  lengths, where they are bookkeeping), so the history holds no change of the run's identity.

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
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
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
  reason = disk_reason(error)
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


def disk_reason(error: BaseException) -> str | None:
  """The OS's words for a failed write (no space, read-only, forbidden) somewhere in `error`'s
  chain, else None.

  Python's writes raise `OSError`; TensorStore (Orbax) and TensorFlow raise their own types,
  whose text carries the OS error code or the OS's own words for it.
  """
  seen, cause = set(), error
  while cause is not None and id(cause) not in seen:
    seen.add(id(cause))
    if isinstance(cause, OSError) and cause.errno in _DISK_ERRNOS:
      return cause.strerror or str(cause)
    text = str(cause)
    code = re.search(r"os_error_code='?(\d+)", text)
    if code and int(code.group(1)) in _DISK_ERRNOS:
      return os.strerror(int(code.group(1)))
    for number in _DISK_ERRNOS:
      if os.strerror(number) in text:
        return os.strerror(number)
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
  """Undoes a start that failed before its first step: what it created goes, nothing else.

  Called while the lock is held; a lock file this start created goes last, so a `train` that
  locks a new one meanwhile finds the directory as it was.
  """
  if created:
    shutil.rmtree(workdir, ignore_errors=True)
    return
  new = set(os.listdir(workdir)) - before if os.path.isdir(workdir) else set()
  for name in sorted(new, key=lambda n: n == LOCK_FILE):
    target = os.path.join(workdir, name)
    if os.path.isdir(target) and not os.path.islink(target):
      shutil.rmtree(target, ignore_errors=True)
    else:
      try:
        os.remove(target)
      except OSError:
        pass


class RunLock:
  """The exclusive lock of one run directory, held by its only writer (`train`).

  An `fcntl.flock` on `WORKDIR/train.lock`: the kernel drops it when the process ends, however
  it ends, so a killed run leaves no stale lock (the file stays; its contents only say who held
  it last). `held` is False where the file system cannot lock (then nothing is enforced).
  """

  def __init__(self, fd: int | None):
    self._fd = fd

  @property
  def held(self) -> bool:
    return self._fd is not None

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the last descriptor drops the flock
      self._fd = None

  def __enter__(self) -> "RunLock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def lock_run(workdir: str) -> RunLock:
  """Takes the run directory's writer lock, or refuses: one `train` per directory.

  On success the holder (host, pid, start time) is written into the lock file, for the message
  a refused `train` prints. Where the file system cannot lock files (flock fails with ENOLCK or
  EOPNOTSUPP), says so on stderr and returns an unheld lock: the run goes on unguarded.

  Raises:
    UserError: another process holds the lock (the message names it); nothing was written.
  """
  path = os.path.join(workdir, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  except OSError as e:
    raise UserError(f"cannot open the run lock {path}: {e.strerror or e}; give a directory you "
                    "can write to") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    holder = _read_holder(fd)
    os.close(fd)
    if e.errno in _NO_LOCKING:
      print(f"transfer: warning: the file system of {workdir} cannot lock files "
            f"({e.strerror}); nothing stops a second train there: run one at a time",
            file=sys.stderr, flush=True)
      return RunLock(None)
    if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
      raise UserError(f"{workdir} is in use by another train ({holder}); nothing was changed "
                      "there. Wait for it to end (or stop it), or use another --workdir") from None
    raise
  holder = {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
  except OSError:
    pass  # the lock holds without its label (a full disk shows up at the first real write)
  return RunLock(fd)


def _read_holder(fd: int) -> str:
  """`host H, pid P, since T` from a lock file's contents ("holder unknown" if unreadable)."""
  try:
    holder = json.loads(os.pread(fd, 4096, 0).decode())
    return f"host {holder['host']}, pid {holder['pid']}, since {holder['since']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "holder unknown"
