"""A trained run's variables and metadata, for eval, predict, export and `init_from`: no
optimizer and no config needed, whatever devices wrote the checkpoint."""

from __future__ import annotations

import logging
import os

from transfer.checkpoint import Checkpointer, _first_line, checkpoint_dir
from transfer.errors import UserError

log = logging.getLogger("transfer")


def load_trained(workdir: str, checkpoint: str | int | None = "latest"):
  """Params and metadata of a trained run (see `load_trained_variables`)."""
  variables, meta = load_trained_variables(workdir, checkpoint)
  return variables["params"], meta


def load_trained_variables(workdir: str, checkpoint: str | int | None = "latest"):
  """Variables and metadata of a trained run, for eval/predict (no optimizer, no config needed).

  Only "latest" falls back past damaged steps: a step the user named (or "best") that does not
  restore is an error naming it, never silently replaced by another step.

  Args:
    workdir: a run directory written by `transfer train`.
    checkpoint: "latest" (the newest that restores; also None), "best" (highest val_accuracy
      among the kept steps) or a step number (int or digit string).

  Returns:
    `(variables, meta)`: `{"params"}` (and `"batch_stats"` for BatchNorm networks) as host
    arrays, and the JSON metadata (`meta["run"]` describes the model).

  Raises:
    UserError: no checkpoints, an unknown step, no val metric for "best", or nothing restores.
  """
  if os.path.isfile(workdir):
    raise UserError(f"--workdir {workdir} is a file, not a run directory")
  if not os.path.isdir(checkpoint_dir(workdir)):  # don't let the manager create it
    raise UserError(f"no checkpoint in {checkpoint_dir(workdir)}; train there first "
                    f"(transfer train --workdir {workdir})")
  checkpointer = Checkpointer(workdir, async_save=False)
  try:
    steps = select_steps(checkpointer, checkpoint)
    for s in reversed(steps):
      try:
        return checkpointer.restore_variables(s)
      except Exception as e:  # pylint: disable=broad-except
        if checkpoint not in (None, "latest"):
          raise UserError(f"checkpoint at step {s} in {checkpointer.directory} cannot be restored "
                          f"({type(e).__name__}: {_first_line(e)[:200]})") from None
        log.warning("checkpoint at step %d is damaged (%s); trying the previous one", s,
                    type(e).__name__)
  finally:
    checkpointer.close()
  raise UserError(f"no checkpoint in {checkpoint_dir(workdir)} could be restored")


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
