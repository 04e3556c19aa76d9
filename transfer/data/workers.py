"""Decoding and resizing examples on several cores, in threads or in processes, same pixels.

Every source describes example i as a `Job`: a module-level function and small picklable
arguments (a file path, the encoded bytes of a record, a synthetic example's parameters) that
return the decoded RGB image. Threads run the job in this process; PIL releases the GIL while it
decodes and resizes, but the Python around it does not, so threads stop scaling after a few
cores. Processes run the same job on the same arguments, which is why the worker count and kind
change the speed and never the pixels: the image is a pure function of the job.

Worker processes are started with `spawn`, never `fork`: the parent runs JAX's (and maybe
TensorFlow's) threads, and a forked copy of a multithreaded process can deadlock. They import
only this package's PIL/numpy code, never JAX or TensorFlow, start on first use, and exit when
the parent does, however it ends.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import multiprocessing
import os
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from transfer.data import images, pool
from transfer.errors import UserError

KINDS = ("thread", "process")
MAX_DEFAULT = 16  # data_workers=0 means min(MAX_DEFAULT, cpus).
# Jobs in flight per worker in a long pass (checking or caching a whole split): enough to keep
# every worker busy, few enough that a million-example split never holds a million futures.
_IN_FLIGHT_PER_WORKER = 4
_PARENT_POLL_S = 0.5  # How often a worker process checks that its parent still runs.

Job = tuple[Callable[..., Any], tuple]  # (function, args): function(*args, min_side) -> Image


def default_count() -> int:
  """The worker count `data_workers=0` stands for: min(16, this machine's cores)."""
  return min(MAX_DEFAULT, os.cpu_count() or 1)


def decode_resize(job: Job, size: int) -> np.ndarray:
  """Runs one example's job and squashes the image to uint8 (size, size, 3); in any worker."""
  fn, args = job
  return images.resize(fn(*args, size), size)


def _exit_with_parent(parent: int) -> None:
  """Worker start-up: exit once the parent is gone.

  A parent that ends without shutting the pool down (SIGKILL, an OOM kill, `os._exit` after an
  error) would otherwise leave its workers waiting forever on a queue whose write end they hold.
  """
  def watch():
    while os.getppid() == parent:
      time.sleep(_PARENT_POLL_S)
    os._exit(0)  # pylint: disable=protected-access
  threading.Thread(target=watch, daemon=True, name="transfer-watch-parent").start()


def _try_decode_resize(job: Job, size: int):
  """`decode_resize`, or the exception it raised (so one bad file does not end a pass)."""
  try:
    return decode_resize(job, size)
  except Exception as e:  # Any decoder error means "unreadable"; the caller decides.
    return e


class Decoder:
  """A pool of `count` threads or processes that turns jobs into resized uint8 images.

  Attributes:
    kind: "thread" or "process".
    count: the number of workers.
  """

  def __init__(self, kind: str = "thread", count: int = 0):
    if kind not in KINDS:
      raise UserError(f"unknown data_worker_kind {kind!r}; expected one of {KINDS}")
    self.kind, self.count = kind, int(count) or default_count()
    self._executor: concurrent.futures.Executor | None = None
    self._stop = None
    self._broken = False

  def _pool(self) -> concurrent.futures.Executor:
    if self._broken:
      raise self._died()
    if self._executor is None:
      if self.kind == "thread":
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.count, thread_name_prefix="transfer-decode")
      else:
        self._executor = concurrent.futures.ProcessPoolExecutor(
            self.count, mp_context=multiprocessing.get_context("spawn"),
            initializer=_exit_with_parent, initargs=(os.getpid(),))
      # A pool still open at exit is shut down before module teardown, which would otherwise
      # print `Exception ignored in ... weakref_cb` from concurrent.futures; one whose decoder
      # is collected is shut down then.
      self._stop = pool.stop_at_exit(self._executor, owner=self, wait=True)
    return self._executor

  def images(self, jobs: Iterable[Job], size: int) -> list[np.ndarray]:
    """The resized images of `jobs`, in order; raises the first job's error."""
    return list(self._map(decode_resize, jobs, size))

  def try_images(self, jobs: Iterable[Job], size: int) -> Iterator[Any]:
    """For each job in order, its resized image or the exception it raised."""
    return self._map(_try_decode_resize, jobs, size)

  def _map(self, fn, jobs: Iterable[Job], size: int) -> Iterator[Any]:
    """fn(job, size) over `jobs` in order, with a bounded number in flight."""
    try:
      pool, window = self._pool(), self.count * _IN_FLIGHT_PER_WORKER
      pending = collections.deque()
      for job in jobs:
        pending.append(pool.submit(fn, job, size))
        if len(pending) >= window:
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()
    except concurrent.futures.process.BrokenProcessPool:
      raise self._died() from None

  def run(self, fn: Callable[..., Any], *arg_lists: Iterable[Any]) -> list[Any]:
    """`fn(*args)` for each `args` in `zip(*arg_lists)`, in order, on the workers.

    For per-example work after decoding (augmentation) that should scale like decoding does:
    with processes, `fn` must be a module-level function of picklable arguments.
    """
    try:
      return list(self._pool().map(fn, *arg_lists))
    except concurrent.futures.process.BrokenProcessPool:
      raise self._died() from None

  def _died(self) -> UserError:
    # Unusable until `close`: the other threads of this pass fail with the same line instead of
    # starting fresh workers. Shutting the broken pool down (its pending jobs already failed;
    # cancelling them would race other threads' reads of that failure) frees its queues'
    # semaphores, which an exit through `os._exit` would otherwise leave to the resource
    # tracker ("There appear to be N leaked semaphore objects").
    self._broken = True
    executor, stop, self._executor, self._stop = self._executor, self._stop, None, None
    if executor is not None:
      stop.detach()
      executor.shutdown(wait=True)
    return UserError(f"a data worker process died (killed, perhaps for memory) with "
                     f"data_workers={self.count}; rerun to resume, with fewer data_workers or "
                     f"data_worker_kind=thread")

  def close(self) -> None:
    """Stops the workers (a later call starts them again, also after one died)."""
    self._broken = False
    if self._executor is not None:
      self._stop()
      self._executor = self._stop = None
