"""Orbax's and TensorStore's noise, kept from the user: notices of what is meant, each background
thread's report of one failed write, and a late callback's closed event loop. The failure itself
still reaches the training loop, which stops with one line (`workdir.disk_error`);
`TRANSFER_DEBUG=1` shows everything. Installed once, when `transfer.checkpoint` is imported.
"""

from __future__ import annotations

import logging
import os
import sys


class _ExpectedNotices(logging.Filter):
  """Drops Orbax's notices of what is meant: a step saved without a val metric (saves between
  evaluations have none; BestN then keeps them only as latest), and a reader's manager being
  read-only."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(notice in message for notice in (
        "did not provide metrics", "is read only",
        "Failed to json parse Metadata"))  # a damaged record: `Checkpointer` says it in one line


class _DiskFailures(logging.Filter):
  """Drops Orbax's reports of a write that failed for lack of space or permission.

  Each of a save's background threads logs its own traceback of the same full or read-only
  disk (dozens per failed save); the error also reaches the training loop, which stops with one
  line naming the checkpoint that is kept (`workdir.disk_error`). `TRANSFER_DEBUG=1` keeps them.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or os.environ.get("TRANSFER_DEBUG"):
      return True
    from transfer import workdir  # the one judge of what a disk failure is
    error = record.exc_info[1] if record.exc_info else None
    return (error is None or workdir.disk_reason(error) is None) and \
        workdir.disk_reason(Exception(record.getMessage())) is None


logging.getLogger("absl").addFilter(_ExpectedNotices())
logging.getLogger("absl").addFilter(_DiskFailures())


def _quiet_closed_loop(previous):
  """`sys.unraisablehook` that drops a late TensorStore callback's `Event loop is closed`.

  When a save fails (a full disk), Orbax closes the save's event loop while TensorStore still
  holds futures on it; their done callbacks then fail in a C++ thread, which can only report the
  error as unraisable: a bare traceback above the one line the loop stops with
  (`workdir.disk_error`). Everything else (and this with `TRANSFER_DEBUG=1`) goes to the hook
  that was there before.
  """
  def hook(unraisable):
    if (unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == "Event loop is closed"
        and not os.environ.get("TRANSFER_DEBUG")):
      return
    previous(unraisable)
  hook.quiet_closed_loop = True
  return hook


if not getattr(sys.unraisablehook, "quiet_closed_loop", False):
  sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
