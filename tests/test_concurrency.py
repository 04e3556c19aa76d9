"""One writer per run directory, and readers that never disturb it: a second `train` is refused
naming the holder, a killed `train` leaves no lock behind, and eval, export and predict run
against a run that saves (and rotates away) a checkpoint every step while it trains."""

import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import (CLI_ENV, HANG_S, assert_trees_equal, cli_output, cli_train, final_params,
                     finish, snapshot, train_argv, wait_for, wait_for_checkpoint)

# `transfer train` whose save of step GATE waits for the file GATE_FILE: the run keeps training
# (and rotating its checkpoints) until then, and cannot finish before the readers are done,
# however slow they are. Nothing else of the run changes.
GATED_TRAIN = """
import os, sys, time
from transfer import checkpoint
gate_file, gate = sys.argv[1], int(sys.argv[2])
save = checkpoint.Checkpointer.save
def gated(self, step, *args, **kwargs):
  while step == gate and not os.path.exists(gate_file):
    time.sleep(0.05)
  return save(self, step, *args, **kwargs)
checkpoint.Checkpointer.save = gated
from transfer import main
main.main(sys.argv[3:])
"""
ROTATING = {"num_steps": 60, "checkpoint_every_steps": 1, "keep_checkpoints": 1,
            "keep_best_checkpoints": 0}
READERS, AT_ONCE = 20, 4


def _cli(argv, log_path):
  with open(log_path, "w") as log:
    return subprocess.Popen([sys.executable, "-m", "transfer.main", *argv], env=CLI_ENV,
                            stdout=log, stderr=subprocess.STDOUT)


def _wait(proc, log_path) -> str:
  try:
    proc.wait(timeout=HANG_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail(f"{proc.args} still running after {HANG_S:.0f}s")
  with open(log_path) as f:
    return f.read()


def test_eval_export_and_predict_while_training_rotates_every_step(tmp_path):
  workdir, reference = tmp_path / "run", tmp_path / "reference"
  gate_file, gate = tmp_path / "readers_done", ROTATING["num_steps"] - 10
  image = str(tmp_path / "x.png")
  Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(image)
  ref = cli_train(reference, **ROTATING)
  with open(f"{workdir}.log", "w") as log:
    trainer = subprocess.Popen(
        [sys.executable, "-c", GATED_TRAIN, str(gate_file), str(gate),
         *train_argv(workdir, **ROTATING)],
        env=CLI_ENV, stdout=log, stderr=subprocess.STDOUT)

  def first_checkpoint():
    if trainer.poll() is not None:
      pytest.fail(f"the run ended before its first checkpoint:\n{cli_output(workdir)[-3000:]}")
    folder = workdir / "checkpoints"
    return folder.is_dir() and any(n.isdigit() for n in os.listdir(folder))

  wait_for(first_checkpoint, f"a checkpoint in {workdir}", poll=0.05)
  commands = {
      "eval": ["eval", "--workdir", str(workdir), "--json"],
      "export": ["export", "--workdir", str(workdir), "--format", "stablehlo", "--out"],
      "predict": ["predict", "--workdir", str(workdir), "--json", image],
  }
  read = []
  for first in range(0, READERS, AT_ONCE):
    running = []
    for i in range(first, min(first + AT_ONCE, READERS)):
      kind = list(commands)[i % len(commands)]
      argv = commands[kind] + ([str(tmp_path / f"m{i}.stablehlo")] if kind == "export" else [])
      log_path = tmp_path / f"reader{i}.log"
      running.append((kind, _cli(argv, log_path), log_path))
    for kind, proc, log_path in running:
      out = _wait(proc, log_path)
      assert proc.returncode == 0, f"{kind}:\n{out[-3000:]}"
      said = re.findall(rf"^{kind}: checkpoint step (\d+) \(latest\)$", out, re.M)
      assert len(said) == 1, f"{kind} did not name its step:\n{out[-3000:]}"
      read.append(int(said[0]))
  assert len(read) == READERS and all(1 <= s <= gate for s in read)

  gate_file.touch()
  out = finish(trainer, workdir)
  assert trainer.returncode == 0, out[-3000:]
  assert "Traceback" not in out
  ref_out = finish(ref, reference)
  assert ref.returncode == 0, ref_out[-3000:]
  assert_trees_equal(final_params(workdir)[0], final_params(reference)[0])
  # The readers left nothing behind, and set nothing aside.
  assert not {".readers", "checkpoints_damaged"} & set(os.listdir(workdir))


def test_a_second_train_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
  workdir = tmp_path / "run"
  first = cli_train(workdir)
  wait_for_checkpoint(workdir, 10, first)
  first.send_signal(signal.SIGSTOP)  # the directory holds still while the second one tries
  try:
    before, label = snapshot(workdir), (workdir / "train.lock").read_text()
    second = subprocess.run([sys.executable, "-m", "transfer.main", *train_argv(workdir)],
                            env=CLI_ENV, capture_output=True, text=True, timeout=HANG_S)
    after = snapshot(workdir)
    assert (workdir / "train.lock").read_text() == label  # still names the first
  finally:
    first.send_signal(signal.SIGCONT)
  assert second.returncode == 2, second.stderr[-3000:]
  assert "Traceback" not in second.stderr
  last = second.stderr.strip().splitlines()[-1]
  assert re.fullmatch(rf"transfer: error: {re.escape(str(workdir))} is in use by another train "
                      rf"\(host {re.escape(socket.gethostname())}, pid {first.pid}, since "
                      rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d\); nothing was changed "
                      rf"there\. .*--workdir", last), last
  assert after == before  # nothing written: no metrics, no checkpoint, no config record

  first.send_signal(signal.SIGKILL)
  first.wait()
  rerun = cli_train(workdir)  # the kernel dropped the killed run's lock with it
  out = finish(rerun, workdir)
  assert rerun.returncode == 0, out[-3000:]
  assert "resumed from step" in out


def test_a_file_system_without_locks_is_said_once_and_the_run_goes_on(tmp_path, monkeypatch,
                                                                    capsys):
  import errno
  import fcntl

  from transfer import workdir as workdir_lib

  def no_locks(fd, operation):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

  monkeypatch.setattr(fcntl, "flock", no_locks)
  lock = workdir_lib.lock_run(str(tmp_path))
  assert not lock.held
  assert capsys.readouterr().err.strip() == (
      f"transfer: warning: the file system of {tmp_path} cannot lock files (No locks "
      f"available); nothing stops a second train there: run one at a time")
