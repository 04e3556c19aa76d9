"""Joining JAX's multi-controller runtime (`jax.distributed`) when running as one of many processes.

Explicit flags or `TRANSFER_COORDINATOR` / `TRANSFER_NUM_PROCESSES` / `TRANSFER_PROCESS_ID` win;
otherwise a cluster JAX knows how to detect (a TPU pod slice, a SLURM job of several tasks) is
joined with `jax.distributed.initialize()` and no arguments. A plain single-process run does
nothing here.
"""

from __future__ import annotations

import os

import jax

from transfer.errors import UserError

_ENV = {"coordinator_address": "TRANSFER_COORDINATOR", "num_processes": "TRANSFER_NUM_PROCESSES",
        "process_id": "TRANSFER_PROCESS_ID"}


def _from_env(name: str, value):
  if value is not None:
    return value
  raw = os.environ.get(_ENV[name])
  if raw is None:
    return None
  return raw if name == "coordinator_address" else int(raw)


def _cluster_detected() -> bool:
  """A multi-process launch that `jax.distributed.initialize()` can configure by itself."""
  slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return slurm_tasks > 1 or "," in tpu_hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> bool:
  """Initialises `jax.distributed` if this is a multi-process run; returns whether it did.

  Args:
    coordinator_address: `host:port` of process 0.
    num_processes: total processes.
    process_id: this process's index.
    timeout_s: how long to wait for the other processes at start-up before failing.
  """
  coordinator_address = _from_env("coordinator_address", coordinator_address)
  num_processes = _from_env("num_processes", num_processes)
  process_id = _from_env("process_id", process_id)
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise UserError("multi-process runs need all of --coordinator_address, --num_processes "
                      "and --process_id (or none, where JAX detects the cluster)")
    if num_processes == 1:
      return False
    # CPU devices need a collectives backend across processes; GPUs/TPUs ignore this setting.
    # (Checking the backend here would initialise it, which must come after this call.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s)
    return True
  if _cluster_detected():
    jax.distributed.initialize()
    return True
  return False
