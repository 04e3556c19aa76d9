"""Multi-process training on one machine: two `transfer train` processes on 127.0.0.1, each with
two fake CPU devices (gloo collectives), against one process with all four.

One launch is killed part-way (the survivor must stop with an error, quickly), then both are
rerun: they resume from the last checkpoint and end with the parameters a single process gets
for the same steps and global batch. Two launches in all keep the file near a minute.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from transfer import checkpoint, configs, distributed, train
from transfer.errors import UserError

# vgg16_tiny on 32x32 synthetic images; a checkpoint every 2 steps so the kill lands after one.
TINY = {"model": "vgg16_tiny", "weights": "none", "image_size": 32, "batch_size": 8,
        "synthetic.train_size": 48, "synthetic.val_size": 16, "augment": "flip",
        "learning_rate": 1e-3, "log_every_steps": 1, "eval_every_steps": 6,
        "checkpoint_every_steps": 2}
HEARTBEAT_S = 10  # the survivor of a kill must stop within this (plus start-up slack)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, logdir, num_steps: int, processes: int = 2, devices: int = 2):
  """Starts `processes` copies of `transfer train` joined through a local coordinator."""
  address = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             TRANSFER_HEARTBEAT_TIMEOUT=str(HEARTBEAT_S))
  overrides = [f"--config.{k}={v}" for k, v in {**TINY, "num_steps": num_steps}.items()]
  procs = []
  for i in range(processes):
    args = [sys.executable, "-m", "transfer.main", "train", "--workdir", str(workdir),
            "--config", "default", *overrides, "--coordinator_address", address,
            "--num_processes", str(processes), "--process_id", str(i)]
    log = open(os.path.join(logdir, f"process{i}.log"), "w")
    procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _log(logdir, i: int) -> str:
  with open(os.path.join(logdir, f"process{i}.log")) as f:
    return f.read()


def _wait_all(procs, timeout: float) -> list[int]:
  deadline = time.time() + timeout
  try:
    return [p.wait(timeout=max(1.0, deadline - time.time())) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _config(num_steps: int):
  c = configs.load("default")
  for key, value in {**TINY, "num_steps": num_steps}.items():
    node, _, leaf = key.rpartition(".")
    (c[node] if node else c)[leaf] = value
  return c


def _kill_one(workdir, logdir) -> tuple[int, float]:
  """Starts a long two-process run, SIGKILLs process 1 once a checkpoint is committed, and
  returns process 0's exit status and how long it took to stop."""
  procs = _launch(workdir, logdir, num_steps=1000)
  first = os.path.join(workdir, "checkpoints", "2")
  deadline = time.time() + 150
  while not os.path.isdir(first):
    if any(p.poll() is not None for p in procs) or time.time() > deadline:
      _wait_all(procs, 1)
      pytest.fail(f"no checkpoint before the kill:\n{_log(logdir, 0)[-3000:]}")
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  rc = _wait_all(procs[:1], timeout=HEARTBEAT_S + 80)[0]
  procs[1].wait()
  return rc, time.time() - killed_at


def test_kill_fails_fast_then_rerun_resumes_and_matches_one_process(tmp_path):
  """Kill, rerun and compare in one test: each launch costs tens of seconds of start-up and
  compilation, and a fixture shared by several tests would run once per xdist worker."""
  workdir, logdir = tmp_path / "multi", tmp_path / "logs"
  logdir.mkdir()

  # A process dies: the survivor stops with JAX's error within the heartbeat timeout.
  rc, seconds = _kill_one(workdir, logdir)
  out = _log(logdir, 0)
  assert rc != 0, out[-3000:]
  assert re.search(r"another task died|stopped sending heartbeats", out), out[-3000:]
  assert seconds < HEARTBEAT_S + 50, f"the survivor took {seconds:.0f}s to stop"

  # Both rerun: they resume from the last committed checkpoint and finish a few steps later.
  resume_from = checkpoint.Checkpointer(str(workdir), async_save=False).latest_step()
  assert resume_from is not None and resume_from >= 2
  total = resume_from + 3  # odd, so the end falls between periodic checkpoints
  codes = _wait_all(_launch(workdir, logdir, num_steps=total), timeout=180)
  first, second = _log(logdir, 0), _log(logdir, 1)
  assert codes == [0, 0], first[-3000:] + second[-3000:]
  assert f"resumed from step {resume_from}" in first
  assert "done:" in first and "done:" not in second  # only process 0 reports

  # One process with all four devices, the same steps and global batch: the same parameters
  # (up to the order in which the gradient mean is summed) and the same validation metrics.
  reference = str(tmp_path / "single")
  train.train_and_evaluate(_config(total), reference)
  multi, meta = checkpoint.load_trained(str(workdir))
  single, _ = checkpoint.load_trained(reference)
  assert meta["step"] == total
  for a, b in zip(jax.tree_util.tree_leaves(multi), jax.tree_util.tree_leaves(single)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
  records, ref_records = train.read_metrics(str(workdir)), train.read_metrics(reference)
  # Metrics come from process 0 alone: one record per step, none left over from the killed run.
  assert [r["step"] for r in records if "train_loss" in r] == list(range(1, total + 1))
  val, ref_val = records[-1], ref_records[-1]
  assert val["val_count"] == ref_val["val_count"] == 16
  assert val["val_loss"] == pytest.approx(ref_val["val_loss"], abs=1e-5)
  assert os.path.exists(os.path.join(workdir, "curves.png"))


_CLUSTER_ENV = ("TRANSFER_COORDINATOR", "TRANSFER_NUM_PROCESSES", "TRANSFER_PROCESS_ID",
                "TRANSFER_DISTRIBUTED", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def test_single_process_runs_do_not_join_a_cluster(monkeypatch):
  for name in _CLUSTER_ENV:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
  assert not distributed.initialize()
  assert not distributed.initialize("127.0.0.1:1", 1, 0)
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert not distributed._cluster_detected()


@pytest.mark.parametrize("name,value", [("SLURM_NTASKS", "4"), ("OMPI_COMM_WORLD_SIZE", "2"),
                                        ("TPU_WORKER_HOSTNAMES", "w0,w1"),
                                        ("TRANSFER_DISTRIBUTED", "auto")])
def test_clusters_jax_configures_itself_are_detected(monkeypatch, name, value):
  for other in _CLUSTER_ENV:
    monkeypatch.delenv(other, raising=False)
  monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
  monkeypatch.setenv(name, value)
  assert distributed._cluster_detected()


def test_partial_or_bad_flags_fail_early(monkeypatch):
  monkeypatch.delenv("TRANSFER_COORDINATOR", raising=False)
  monkeypatch.setenv("TRANSFER_NUM_PROCESSES", "2")
  with pytest.raises(UserError, match="need all of"):
    distributed.initialize(process_id=0)
  with pytest.raises(UserError, match="outside 0..1"):
    distributed.initialize("127.0.0.1:1", process_id=2)
  monkeypatch.setenv("TRANSFER_HEARTBEAT_TIMEOUT", "soon")
  with pytest.raises(UserError, match="TRANSFER_HEARTBEAT_TIMEOUT"):
    distributed.heartbeat_timeout()
