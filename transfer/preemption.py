"""Stopping a run cleanly on SIGTERM (preemption) or Ctrl-C: finish the step, save, exit.

The loop asks `Preemption.stop_at(step)` after every step; when it says stop, the loop saves a
checkpoint and raises `Preempted`, which the CLI turns into exit status 128 + the signal number, so
`transfer train ... && transfer eval ...` does not carry on as if training had finished.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable, Iterator


class Preemption:
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


class Preempted(Exception):
  """Raised after a signal-triggered checkpoint; the CLI exits with 128 + the signal number."""

  def __init__(self, step: int, signum: int = signal.SIGTERM):
    super().__init__(f"preempted at step {step}")
    self.step = step
    self.signum = int(signum)
    self.exit_status = 128 + self.signum


class Terminated(BaseException):
  """SIGTERM before the loop took over signals: nothing to save, so the start is undone.

  A BaseException, like KeyboardInterrupt, so no `except Exception` on the way swallows it.
  """

  def __init__(self, signum: int = signal.SIGTERM):
    super().__init__(f"terminated by {signal.Signals(signum).name} before training started")
    self.exit_status = 128 + int(signum)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
  """SIGTERM raises `Terminated` in the main thread (set-up and compilation are not a step the
  loop can finish, so the run stops at once and undoes its start). The loop's `Preemption`
  replaces this handler while it runs and restores it afterwards."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handle(signum, frame):
    del frame
    raise Terminated(signum)

  previous = signal.signal(signal.SIGTERM, handle)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
