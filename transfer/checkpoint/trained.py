"""A trained run's variables and metadata, for eval, predict, export and `init_from`: no
optimizer and no config needed, whatever devices wrote the checkpoint.

These are readers of a run directory that a `train` may be writing at the same time. They open
it read-only (nothing cleaned, deleted or moved) and pin the step they read: its files are
hard-linked into a private folder (`WORKDIR/.readers/HOST-PID-*`, removed afterwards), so the
writer's rotation (`keep_checkpoints`) can delete the step without pulling the files from under
the read. Hard links copy no data. Where they cannot be made (a read-only file system, files of
another user), the step is read in place, and a step that vanishes mid-read is retried with the
newest committed one, a bounded number of times.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sys
import tempfile

from transfer.checkpoint import Checkpointer, _first_line, checkpoint_dir
from transfer.errors import UserError

log = logging.getLogger("transfer")

READERS_DIR = ".readers"  # under the run directory: the pinned copies of readers at work
TRIES = 10  # times a reader starts over when the writer rotated its step away mid-read


def load_trained(workdir: str, checkpoint: str | int | None = "latest"):
  """Params and metadata of a trained run (see `load_trained_variables`)."""
  variables, meta = load_trained_variables(workdir, checkpoint)
  return variables["params"], meta


def load_trained_variables(workdir: str, checkpoint: str | int | None = "latest",
                           announce: str | None = None):
  """Variables and metadata of a trained run, for eval/predict (no optimizer, no config needed).

  Only "latest" falls back past damaged steps: a step the user named (or "best") that does not
  restore is an error naming it, never silently replaced by another step. Nothing in `workdir`
  is changed: damaged steps are skipped, not set aside (only `train` does that).

  Args:
    workdir: a run directory written by `transfer train` (possibly training right now).
    checkpoint: "latest" (the newest that restores; also None), "best" (highest val_accuracy
      among the kept steps) or a step number (int or digit string).
    announce: a command name: print `NAME: checkpoint step S (why)` on stderr once read.

  Returns:
    `(variables, meta)`: `{"params"}` (and `"batch_stats"` for BatchNorm networks) as host
    arrays, and the JSON metadata (`meta["run"]` describes the model).

  Raises:
    UserError: no checkpoints, an unknown step, no val metric for "best", nothing restores, or
      the step asked for was rotated away by a running `train` while it was read.
  """
  if os.path.isfile(workdir):
    raise UserError(f"--workdir {workdir} is a file, not a run directory")
  if not os.path.isdir(checkpoint_dir(workdir)):  # don't let the manager create it
    raise UserError(f"no checkpoint in {checkpoint_dir(workdir)}; train there first "
                    f"(transfer train --workdir {workdir})")
  named = checkpoint not in (None, "latest")
  for _ in range(TRIES):
    reader = Checkpointer(workdir, read_only=True)
    try:
      steps = select_steps(reader, checkpoint)
      skipped = 0
      for s in reversed(steps):
        try:
          variables, meta = _read_pinned(workdir, s)
        except Exception as e:  # pylint: disable=broad-except
          if _moved_on(reader, s, steps):
            break  # the writer rotated it away mid-read: start over from its newest step
          if named:
            raise UserError(f"checkpoint at step {s} in {reader.directory} cannot be restored "
                            f"({type(e).__name__}: {_first_line(e)[:200]})") from None
          log.warning("checkpoint at step %d is damaged (%s: %s); skipped, trying the previous "
                      "one", s, type(e).__name__, _first_line(e)[:200])
          skipped += 1
          continue
        if announce:
          skipped += sum(1 for u in reader.unreadable if u > s)
          why = (str(checkpoint) if named else
                 "latest" if not skipped else f"latest readable; {skipped} newer skipped")
          print(f"{announce}: checkpoint step {s} ({why})", file=sys.stderr, flush=True)
        return variables, meta
      else:
        raise UserError(f"no checkpoint in {checkpoint_dir(workdir)} could be restored")
    finally:
      reader.close()
    if named:
      raise UserError(f"checkpoint {checkpoint} of {workdir} was removed by the run training "
                      f"there (keep_checkpoints) while it was read; use --checkpoint latest")
  raise UserError(f"the checkpoints of {workdir} were rotated away {TRIES} times while being "
                  f"read (a run saving every step there?); try again, or read a copy")


def _moved_on(reader: Checkpointer, step: int, steps: list[int]) -> bool:
  """Whether the writer changed the committed steps since `steps` were listed (so a failed read
  of `step` is a race with its rotation, not damage)."""
  try:
    now = reader.steps()
  except Exception:  # pylint: disable=broad-except
    return True
  return step not in now or now[-1:] != steps[-1:]


def _read_pinned(workdir: str, step: int):
  """`Checkpointer.restore_variables(step)` of a pinned copy of the step (or in place)."""
  with pin(workdir, step) as where:
    reader = Checkpointer(where, read_only=True)
    try:
      return reader.restore_variables(step)
    finally:
      reader.close()


@contextlib.contextmanager
def pin(workdir: str, step: int):
  """Yields a run directory holding `step` that the writer cannot change: a hard-linked copy of
  its files under `WORKDIR/.readers/`, removed on exit, or `workdir` itself where links cannot
  be made there. A copy of a step deleted mid-link is incomplete, and fails to restore."""
  root = os.path.join(os.path.abspath(workdir), READERS_DIR)
  private = _linked_copy(root, os.path.join(checkpoint_dir(workdir), str(step)), step)
  try:
    yield private or workdir
  finally:
    if private:
      shutil.rmtree(private, ignore_errors=True)
      with contextlib.suppress(OSError):
        os.rmdir(root)  # only when no other reader is at work


def _linked_copy(root: str, source: str, step: int) -> str | None:
  """A private run directory under `root` with `source` hard-linked as its step `step`; None
  where links cannot be made (read-only file system, another user's files, another device)."""
  try:
    _remove_dead_pins(root)
    os.makedirs(root, exist_ok=True)
    private = tempfile.mkdtemp(prefix=f"{socket.gethostname()}-{os.getpid()}-", dir=root)
  except OSError:
    return None
  try:
    _link_tree(source, os.path.join(private, "checkpoints", str(step)))
  except FileNotFoundError:
    pass  # rotated away mid-link: the copy is incomplete and its restore fails
  except OSError:
    shutil.rmtree(private, ignore_errors=True)
    return None
  return private


def _link_tree(source: str, target: str) -> None:
  """Hard-links every file under `source` into the same layout under `target`."""
  for dirpath, _, filenames in os.walk(source, onerror=_raise):
    here = os.path.join(target, os.path.relpath(dirpath, source))
    os.makedirs(here, exist_ok=True)
    for name in filenames:
      os.link(os.path.join(dirpath, name), os.path.join(here, name))


def _raise(error: OSError) -> None:
  raise error


def _remove_dead_pins(root: str) -> None:
  """Removes pinned copies left by readers of this host that were killed (their pid is gone)."""
  host = socket.gethostname()
  for name in os.listdir(root) if os.path.isdir(root) else ():
    owner, _, rest = name.removeprefix(host + "-").partition("-")
    if not name.startswith(host + "-") or not owner.isdigit() or not rest:
      continue
    try:
      os.kill(int(owner), 0)
    except ProcessLookupError:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    except PermissionError:
      pass  # alive, another user's


def select_steps(checkpointer: Checkpointer, checkpoint: str | int | None = "latest") -> list[int]:
  """The steps `load_trained` may restore for `checkpoint`, oldest first (one unless "latest").

  Args:
    checkpointer: the run's checkpointer.
    checkpoint: "latest" (or None), "best", or a step number (int or digit string).

  Returns:
    All committed steps for "latest"; otherwise the one step asked for.

  Raises:
    UserError: no checkpoints; a step that does not exist (the message lists those that do);
      "best" when no kept step has a val_accuracy; a value that is none of the above.
  """
  steps = checkpointer.steps()
  if not steps:
    raise UserError(f"no checkpoint in {checkpointer.directory}; train there first "
                    f"(transfer train --workdir {os.path.dirname(checkpointer.directory)})")
  if checkpoint is None or checkpoint == "latest":
    return steps
  available = ", ".join(map(str, steps))
  if checkpoint == "best":
    best = checkpointer.manager.best_step()
    if best is None:
      raise UserError(f"no checkpoint in {checkpointer.directory} has a val_accuracy to pick the "
                      f"best by; use --checkpoint latest or a step ({available})")
    return [best]
  if isinstance(checkpoint, str) and not checkpoint.isdigit():
    raise UserError(f"--checkpoint must be best, latest or a step number, got {checkpoint!r}")
  if int(checkpoint) not in steps:
    raise UserError(f"no checkpoint at step {checkpoint} in {checkpointer.directory}; "
                    f"available steps: {available}")
  return [int(checkpoint)]
