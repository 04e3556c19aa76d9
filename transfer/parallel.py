"""Data parallelism: a 1-D `data` mesh over every device, and two ways to run per-device code.

Both give pmap semantics (each device runs the step on its slice of the global batch, gradients
are averaged with `lax.pmean` over the `data` axis) and both take and return the same global,
replicated train state, so the loop does not care which one runs:
  * `shard_map` (default): `jax.jit(jax.shard_map(step))`, the form JAX now recommends.
  * `pmap`: `jax.pmap(step)`, for users who ask for it by name.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from transfer.errors import UserError

AXIS = "data"

MODES = ("shard_map", "pmap")


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named `data` over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same value on every device."""
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh | None = None, *,
                     process_count: int | None = None, local_devices: int | None = None) -> int:
  """Per-device batch size; a one-line error unless `batch_size` splits evenly.

  The global batch must split over the processes and each process's share over its devices.
  Every check of a batch size (the train loop, bench, the data pipeline) comes here.

  Args:
    batch_size: the global batch size.
    mesh: the devices the batch is split over; or, before a mesh exists (the data pipeline, and
      tests that simulate hosts), `process_count` and `local_devices` (devices per process).

  Returns:
    The examples each device gets.
  """
  if mesh is not None:
    process_count = len({d.process_index for d in mesh.devices.flat})
    local_devices = mesh.devices.size // process_count
  total = process_count * local_devices
  if batch_size < 1 or batch_size % process_count:
    raise UserError(f"batch_size {batch_size} does not divide evenly over {process_count} "
                    f"processes; use a multiple of {total}")
  if (batch_size // process_count) % local_devices:
    raise UserError(f"batch_size {batch_size} gives {batch_size // process_count} examples per "
                    f"process, which does not divide over {local_devices} local devices; use a "
                    f"multiple of {total}")
  return batch_size // total


def replicate(tree, mesh: Mesh):
  """Places a pytree of host or device arrays replicated on every device of `mesh`."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def example_ids(local_batch: int):
  """Global indices of this device's examples inside the global batch (per-device code only)."""
  return jax.lax.axis_index(AXIS) * local_batch + jnp.arange(local_batch)


def data_parallel(per_device: Callable, mesh: Mesh, mode: str = "shard_map",
                  donate_state: bool = False) -> Callable:
  """Wraps `per_device(state, batch) -> (state, out)` to run data-parallel over `mesh`.

  Inside `per_device`, the batch is this device's slice and `lax.pmean(x, "data")` averages over
  all devices. `state` and `out` must be the same on every device (reduce before returning).

  Args:
    per_device: the per-device step.
    mesh: the `data` mesh.
    mode: `"shard_map"` or `"pmap"`.
    donate_state: donate the state's buffers to the step: XLA writes the new state into them,
      and the state passed in (and any array it shares, e.g. params it was built from) is
      deleted. Off by default; the CLI's train step turns it on for its own state.

  Returns:
    `fn(state, batch) -> (state, out)` taking the replicated state and a batch sharded over `data`.
  """
  donate = (0,) if donate_state else ()
  if mode == "shard_map":
    # check_vma=False keeps pmap's semantics: per-device gradients of the replicated params,
    # averaged explicitly with lax.pmean. With varying-manual-axes checking on, JAX would already
    # psum the gradient of an unvarying input, and the explicit pmean would then be wrong.
    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(),
                           check_vma=False)
    return jax.jit(mapped, donate_argnums=donate)
  if mode == "pmap":
    if jax.process_count() > 1:
      raise UserError("parallel='pmap' runs on one process here; use parallel='shard_map' "
                      "for multi-process training")
    n = mesh.devices.size
    pmapped = jax.pmap(per_device, axis_name=AXIS, in_axes=(None, 0), out_axes=None,
                       devices=list(mesh.devices.flat), donate_argnums=donate)

    def run(state, batch):
      split = jax.tree_util.tree_map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]),
                                     batch)
      return pmapped(state, split)

    return run
  raise UserError(f"unknown parallel mode {mode!r}; valid: {', '.join(MODES)}")
