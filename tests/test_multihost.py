"""Multi-process training on one machine: two `transfer train` processes on 127.0.0.1, each with
two fake CPU devices (gloo collectives), against one process with all four.

One launch is killed part-way (the survivor must stop with an error, not hang), then both are
rerun: they resume from the last checkpoint and end with the parameters a single process gets
for the same steps and global batch, up to round-off. Two launches in all keep the file near a
minute on a quiet machine.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from transfer import checkpoint, distributed, metrics, train
from transfer import workdir as workdir_lib
from transfer.errors import UserError
from helpers import F32_U, HANG_S, assert_trained_alike, default_config, wait_for

# vgg16_tiny on 32x32 synthetic images; a checkpoint every 2 steps so the kill lands after one.
# SGD, not Adam: Adam's m/sqrt(v) turns round-off in near-zero gradients (summed in another
# order across processes) into lr-sized differences, so only a linear optimizer lets the
# comparison with one process be tight (Adam's resume is checked bitwise in test_checkpoint).
TINY = {"model": "vgg16_tiny", "weights": "none", "image_size": 32, "batch_size": 8,
        "synthetic.train_size": 48, "synthetic.val_size": 16, "augment": "flip",
        "optimizer": "sgd", "learning_rate": 0.05, "log_every_steps": 1, "eval_every_steps": 6,
        "checkpoint_every_steps": 2}
# The killed launch's heartbeat timeout: the survivor stops about this long after the kill.
HEARTBEAT_S = 10
# The rerun kills nothing; a long timeout keeps a busy machine from tripping it, e.g. in the
# shutdown barrier where process 1 waits for process 0 to finish writing curves.png.
RERUN_HEARTBEAT_S = 120
# How long the survivor may take to stop: many heartbeat timeouts, so a machine loaded ten times
# over its cores passes; a survivor left blocked in a collective would never stop.
STOP_BOUND_S = 30 * HEARTBEAT_S


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, logdir, num_steps: int, processes: int = 2, devices: int = 2,
            heartbeat_s: int = HEARTBEAT_S):
  """Starts `processes` copies of `transfer train` joined through a local coordinator."""
  address = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             TRANSFER_HEARTBEAT_TIMEOUT=str(heartbeat_s))
  overrides = [f"--config.{k}={v}" for k, v in {**TINY, "num_steps": num_steps}.items()]
  procs = []
  for i in range(processes):
    args = [sys.executable, "-m", "transfer.main", "train", "--workdir", str(workdir),
            "--config", "default", *overrides, "--coordinator_address", address,
            "--num_processes", str(processes), "--process_id", str(i)]
    with open(os.path.join(logdir, f"process{i}.log"), "w") as log:
      procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _log(logdir, i: int) -> str:
  with open(os.path.join(logdir, f"process{i}.log")) as f:
    return f.read()


def _wait_all(procs, timeout: float = HANG_S) -> list[int]:
  """Waits for every process to exit (`timeout` only guards against a hang); kills stragglers."""
  deadline = time.monotonic() + timeout
  try:
    return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _kill_one(workdir, logdir) -> tuple[int, float]:
  """Starts a long two-process run, SIGKILLs process 1 once a checkpoint is committed, and
  returns process 0's exit status and how long it took to stop."""
  procs = _launch(workdir, logdir, num_steps=1000)
  first = os.path.join(workdir, "checkpoints", "2")

  def committed():
    if os.path.isdir(first):
      return True
    if any(p.poll() is not None for p in procs):
      _wait_all(procs, 1)
      pytest.fail(f"a process ended before the first checkpoint:\n{_log(logdir, 0)[-3000:]}")
    return False

  try:
    wait_for(committed, f"checkpoint 2 in {workdir}")
  except BaseException:
    _wait_all(procs, 1)
    raise
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.monotonic()
  rc = _wait_all(procs[:1])[0]
  procs[1].wait()
  return rc, time.monotonic() - killed_at


def test_kill_fails_fast_then_rerun_resumes_and_matches_one_process(tmp_path):
  """Kill, rerun and compare in one test: each launch costs tens of seconds of start-up and
  compilation, and a fixture shared by several tests would run once per xdist worker."""
  workdir, logdir = tmp_path / "multi", tmp_path / "logs"
  logdir.mkdir()

  # A process dies: the survivor stops with JAX's error (about HEARTBEAT_S later; the bound is
  # loose on purpose, the point is that it stops and says why).
  rc, seconds = _kill_one(workdir, logdir)
  out = _log(logdir, 0)
  assert rc != 0, out[-3000:]
  # Why, in JAX's words: its heartbeat monitor ("another task died", "stopped sending
  # heartbeats"), or the collective that was waiting on the dead peer (gloo: connection reset).
  assert re.search(r"another task died|stopped sending heartbeats|[Cc]onnection reset by peer",
                   out), out[-3000:]
  assert seconds < STOP_BOUND_S, f"the survivor took {seconds:.0f}s to stop"

  # Both rerun: they resume from the last committed checkpoint and finish a few steps later.
  resume_from = checkpoint.Checkpointer(str(workdir), async_save=False).latest_step()
  assert resume_from is not None and resume_from >= 2
  total = resume_from + 3  # odd, so the end falls between periodic checkpoints
  codes = _wait_all(_launch(workdir, logdir, num_steps=total, heartbeat_s=RERUN_HEARTBEAT_S))
  first, second = _log(logdir, 0), _log(logdir, 1)
  assert codes == [0, 0], first[-3000:] + second[-3000:]
  assert f"resumed from step {resume_from}" in first
  assert "done:" in first and "done:" not in second  # only process 0 reports

  # One process with all four devices, the same steps and global batch: the same parameters
  # and validation metrics, up to the order in which the gradient mean is summed.
  reference = str(tmp_path / "single")
  train.train_and_evaluate(default_config(**TINY, num_steps=total), reference)
  multi, meta = checkpoint.load_trained(str(workdir))
  single, _ = checkpoint.load_trained(reference)
  assert meta["step"] == total
  # Only the head trains: each gradient element sums one term per example of the batch of 8.
  assert_trained_alike(multi, single, terms=TINY["batch_size"], steps=total)
  records, ref_records = metrics.read_metrics(str(workdir)), metrics.read_metrics(reference)
  # Metrics come from process 0 alone: one record per step, none left over from the killed run.
  assert [r["step"] for r in records if "train_loss" in r] == list(range(1, total + 1))
  val, ref_val = records[-1], ref_records[-1]
  assert val["val_count"] == ref_val["val_count"] == 16
  # A sum of 16 positive losses in another order, plus the params' round-off (as above)
  # carried through the head; 4x slack, as for the params.
  val_rtol = 4 * (16 - 1 + TINY["batch_size"] - 1 + 2 * total) * F32_U
  assert val["val_loss"] == pytest.approx(ref_val["val_loss"], rel=val_rtol, abs=0)
  assert os.path.exists(os.path.join(workdir, "curves.png"))


_CLUSTER_ENV = ("TRANSFER_COORDINATOR", "TRANSFER_NUM_PROCESSES", "TRANSFER_PROCESS_ID",
                "TRANSFER_DISTRIBUTED", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def test_a_run_directory_in_use_stops_every_process_before_anything_is_written(tmp_path):
  """Process 0 takes the run directory's lock for all; refused, every process stops with it."""
  workdir, logdir = tmp_path / "multi", tmp_path / "logs"
  workdir.mkdir()
  logdir.mkdir()
  with workdir_lib.lock_run(str(workdir)):  # this test process is the other `train`
    codes = _wait_all(_launch(workdir, logdir, num_steps=4))
  first, second = _log(logdir, 0), _log(logdir, 1)
  assert codes == [2, 2], first[-3000:] + second[-3000:]
  assert f"is in use by another train (host {socket.gethostname()}, pid {os.getpid()}, " in first
  assert "is in use by another train (process 0 says which)" in second
  assert os.listdir(workdir) == [workdir_lib.LOCK_FILE]


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
