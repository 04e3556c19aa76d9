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
  """Images per second this process's host pipeline delivers (decode, augment, preprocess).

  The first batch is taken before timing, so thread start-up is not counted; caches are built by
  `create`, before this is called.

  Args:
    ds: a `transfer.data.Dataset`.
    num_batches: training batches to time.

  Returns:
    Process-local images per second.
  """
  batches = ds.train_batches()
  next(batches)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  elapsed = time.perf_counter() - start
  batches.close()
  return num_batches * ds.local_batch_size / elapsed
