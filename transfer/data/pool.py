"""Host threads of the input pipeline: batches assembled ahead of use, and a lazily started pool
that augments a batch's examples side by side.

Both keep results in submission order and run jobs that are pure functions of their step or
example, so the thread counts change the speed, never the batches. Decoding has its own workers
(`transfer.data.workers`), which may be processes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import weakref
from typing import Callable, Iterable, Iterator


class LazyThreadPool:
  """A thread pool started on first use and stopped by `close` (a later use restarts it).

  Safe to use from several threads: batches are assembled on the `run_ahead` threads.
  """

  def __init__(self, threads: int, name: str):
    self._threads, self._name = max(1, threads), name
    self._pool = None
    self._lock = threading.Lock()

  def map(self, fn: Callable, *iterables: Iterable) -> list:
    """[fn(*args) for args in zip(*iterables)], computed on the pool's threads, in order."""
    return list(self._executor().map(fn, *iterables))

  def close(self) -> None:
    """Stops the threads without waiting for queued work."""
    with self._lock:
      if self._pool is not None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

  def _executor(self) -> concurrent.futures.Executor:
    with self._lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads,
                                                           thread_name_prefix=self._name)
      return self._pool


def run_ahead(make_jobs: Callable[[], Iterator[Callable]], ahead: int) -> Iterator:
  """Runs zero-argument jobs on `ahead` background threads, keeping `ahead` of them in flight.

  One thread per batch in flight: assembling a batch (feeding the decode workers, augmenting,
  preprocessing to float32, stacking) is itself a core's worth of work at GPU rates, so
  consecutive batches are assembled side by side. Each job is a pure function of its step and
  results are yielded in submission order, so the batches do not depend on the thread count.
  """
  executor = concurrent.futures.ThreadPoolExecutor(ahead, thread_name_prefix="transfer-batches")
  stop = stop_at_exit(executor, owner=executor)
  try:
    jobs = make_jobs()
    pending = collections.deque(executor.submit(job) for job in take(jobs, ahead))
    while pending:
      batch = pending.popleft().result()
      pending.extend(executor.submit(job) for job in take(jobs, 1))
      yield batch
  finally:
    stop()


def stop_at_exit(executor: concurrent.futures.Executor, owner: object,
                 wait: bool = False) -> weakref.finalize:
  """A once-only `executor.shutdown(cancel_futures=True)`, called when `owner` is collected or
  at interpreter exit, whichever comes first (or earlier, by calling it).

  An iterator or pool left open when the program ends is otherwise closed during module
  teardown, when the `concurrent.futures` globals its shutdown needs are already gone
  (`Exception ignored ... 'NoneType' object has no attribute 'Empty'`). `weakref.finalize`
  runs the call from an atexit hook, before that teardown, and makes later calls no-ops.
  """
  return weakref.finalize(owner, executor.shutdown, wait=wait, cancel_futures=True)


def take(iterator: Iterator, n: int) -> list:
  """Up to `n` items from `iterator`."""
  out = []
  for item in iterator:
    out.append(item)
    if len(out) == n:
      break
  return out
