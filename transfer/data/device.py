"""Moving host batches onto the devices ahead of use, and timing the host pipeline.

`jax.make_array_from_process_local_data` turns each process's rows into one global `jax.Array`
laid out by the sharding, on one process or many alike, so the training step never sees which
process read what. Transfers are issued `size` batches early: dispatch is asynchronous, so the copy
of batch k+1 overlaps the step on batch k.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Iterable, Iterator, Mapping


def prefetch_to_device(iterator: Iterable[Mapping[str, Any]], sharding,
                       size: int = 2) -> Iterator[dict[str, Any]]:
  """Yields the batches of `iterator` as global jax.Arrays, keeping `size` transfers in flight.

  Args:
    iterator: host batches, dicts of numpy arrays holding this process's rows (leading axis).
    sharding: a `jax.sharding.Sharding` for every key (e.g. `NamedSharding(mesh, P("data"))`),
      or a dict of them keyed like the batch.
    size: how many batches to transfer ahead (at least 1).

  Yields:
    dicts with the same keys, each value a global `jax.Array` whose leading axis is the global
    batch (process-local rows times the number of processes).
  """
  import jax  # Deferred: the host pipeline itself does not need jax.

  def put(batch):
    pick = (lambda k: sharding[k]) if isinstance(sharding, Mapping) else (lambda k: sharding)
    return {k: jax.make_array_from_process_local_data(pick(k), v) for k, v in batch.items()}

  iterator = iter(iterator)
  queue = collections.deque()

  def enqueue(n):
    for _ in range(n):
      batch = next(iterator, None)
      if batch is None:
        return
      queue.append(put(batch))

  enqueue(max(1, size))
  while queue:
    batch = queue.popleft()
    enqueue(1)
    yield batch


def input_throughput(ds, num_batches: int) -> float:
  """Images per second this process's host pipeline delivers (see `input_rates`)."""
  return input_rates(ds, num_batches)[0]


def input_rates(ds, num_batches: int) -> tuple[float, float]:
  """Wall-clock and CPU-time rates of this process's host pipeline (decode, augment, preprocess).

  The first batch is taken before timing, so thread start-up is not counted; caches are built by
  `create`, before this is called. The CPU-time rate (images per second of process CPU time,
  over all threads) is the rate per fully used core: on a busy or small machine it says what
  each core of a dedicated host would deliver, where the wall-clock rate says what this one did.

  Args:
    ds: a `transfer.data.Dataset`.
    num_batches: training batches to time.

  Returns:
    `(images_per_sec, images_per_cpu_sec)`, process-local.
  """
  batches = ds.train_batches()
  next(batches)
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next(batches)
  elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  batches.close()
  images = num_batches * ds.local_batch_size
  return images / elapsed, images / max(cpu, 1e-9)
