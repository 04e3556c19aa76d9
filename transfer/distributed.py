"""Joining JAX's multi-controller runtime (`jax.distributed`) when running as one of several
processes.

Explicit flags or `TRANSFER_COORDINATOR` / `TRANSFER_NUM_PROCESSES` / `TRANSFER_PROCESS_ID` win;
otherwise a cluster JAX knows how to detect (a TPU pod slice, a SLURM or Open MPI job of several
tasks) is joined with `jax.distributed.initialize()` and no arguments. A plain single-process run
does nothing here.

Once joined, every process runs the same program: it reads its own shard of the data, and the
jitted step sees global arrays spanning every process's devices. The coordination service
watches heartbeats, so a process that dies takes the others down within `heartbeat_timeout()`
seconds (instead of leaving them blocked forever in a collective); rerunning every process resumes from
the last committed checkpoint.
"""

from __future__ import annotations

import glob
import os
import sys

import jax

from transfer.errors import UserError

_ENV = {"coordinator_address": "TRANSFER_COORDINATOR", "num_processes": "TRANSFER_NUM_PROCESSES",
        "process_id": "TRANSFER_PROCESS_ID"}
# Seconds without a heartbeat before the coordination service declares a process dead and stops
# the rest. Shorter than JAX's default (100 s) so a crash is noticed within about a minute; the
# heartbeats come from a background thread, so long steps or checkpoint writes do not trip it.
HEARTBEAT_TIMEOUT_S = 60
_HEARTBEAT_ENV = "TRANSFER_HEARTBEAT_TIMEOUT"
_GOOGLE_PCI_VENDOR = "0x1ae0"


def _from_env(name: str, value):
  if value is not None:
    return value
  raw = os.environ.get(_ENV[name])
  if raw is None:
    return None
  return raw if name == "coordinator_address" else int(raw)


def _cluster_detected() -> bool:
  """A multi-process launch that `jax.distributed.initialize()` can configure by itself.

  SLURM and Open MPI say so in the environment; a TPU pod slice on GKE lists its workers there,
  and a Cloud TPU VM (found by its TPU chips on the PCI bus) answers the rest from the metadata
  server, which JAX queries (a single-host VM then simply joins as the only process).
  `TRANSFER_DISTRIBUTED=auto` forces the attempt anywhere JAX knows how to detect.
  """
  if os.environ.get("TRANSFER_DISTRIBUTED") == "auto":
    return True
  for count in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(os.environ.get(count, "1") or 1) > 1:
      return True
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in tpu_hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
    return True
  return _on_cloud_tpu_vm()


def _on_cloud_tpu_vm() -> bool:
  """TPU chips on the PCI bus (Google's vendor id), without touching a JAX backend."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def heartbeat_timeout() -> int:
  """Seconds of silence after which a process counts as dead (env `TRANSFER_HEARTBEAT_TIMEOUT`)."""
  raw = os.environ.get(_HEARTBEAT_ENV)
  if raw is None:
    return HEARTBEAT_TIMEOUT_S
  try:
    seconds = int(raw)
  except ValueError:
    seconds = 0
  if seconds < 1:
    raise UserError(f"{_HEARTBEAT_ENV}={raw!r}: expected a whole number of seconds >= 1")
  return seconds


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> bool:
  """Initialises `jax.distributed` if this is a multi-process run; returns whether it did.

  Must run before anything touches a JAX backend (device lists, arrays, compilation).

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
  timeouts = dict(initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout(),
                  shutdown_timeout_seconds=heartbeat_timeout())
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise UserError("multi-process runs need all of --coordinator_address, --num_processes "
                      "and --process_id (or none, where JAX detects the cluster)")
    if num_processes == 1:
      return False
    if not 0 <= process_id < num_processes:
      raise UserError(f"--process_id={process_id} is outside 0..{num_processes - 1}")
    # CPU devices need a collectives backend across processes; GPUs/TPUs ignore this setting.
    # (Checking the backend here would initialise it, which must come after this call.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id, **timeouts)
  elif _cluster_detected():
    jax.distributed.initialize(**timeouts)
  else:
    return False
  _announce(timeouts["heartbeat_timeout_seconds"])
  return True


def lock_run_directory(workdir: str):
  """The run directory's writer lock (`workdir.lock_run`), taken once, by process 0.

  Every process of a multi-host run writes to the same directory, as one writer: process 0
  holds the lock for all of them, and when it is refused every process stops with it (they
  learn it through a broadcast, before anything is written).

  Returns:
    The `workdir.RunLock` (unheld on processes other than 0).

  Raises:
    UserError: another `train` holds the directory.
  """
  from transfer import workdir as workdir_lib
  lock, refusal = workdir_lib.RunLock(None), None
  if jax.process_index() == 0:
    try:
      lock = workdir_lib.lock_run(workdir)
    except UserError as e:
      refusal = e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)))
    if refused and refusal is None:
      refusal = UserError(f"{workdir} is in use by another train (process 0 says which); "
                          "nothing was changed there")
  if refusal is not None:
    raise refusal
  return lock


def _announce(heartbeat_s: int) -> None:
  """One line from process 0: the run's shape, and how a lost process will show up."""
  if jax.process_index() != 0:
    return
  print(f"transfer: {jax.process_count()} processes, {jax.device_count()} devices "
        f"({jax.local_device_count()} here); if a process dies the others stop within "
        f"~{heartbeat_s}s (rerun all processes to resume)", file=sys.stderr, flush=True)
