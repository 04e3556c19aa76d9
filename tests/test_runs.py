"""A run directory is the user's work: reruns with another config are refused without touching
it, bookkeeping changes are recorded, failures keep what was trained, exits tell the truth."""

import json
import os
import shutil
import signal

import jax
import pytest

from transfer import checkpoint, eval_loop, main, metrics, preemption, train
from transfer import workdir as workdir_lib
from transfer.errors import UserError
from helpers import snapshot, tiny_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 3-step run (copied by each test that changes it)."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  train.train_and_evaluate(tiny_config(num_steps=3), workdir)
  return workdir


@pytest.fixture
def run_copy(finished, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  return workdir


@pytest.mark.parametrize("key,value", [
    ("head_hidden", 64), ("grad_clip_norm", 1.0), ("weight_decay", 0.1), ("batch_size", 4),
    ("learning_rate", 0.1), ("schedule", "cosine"), ("seed", 1), ("augment", "none"),
    ("trainable", ["^head/", "^block5_"]), ("dataset", "folder:/nonexistent"),
])
def test_a_rerun_that_changes_the_run_is_refused_and_touches_nothing(finished, key, value):
  before = snapshot(finished)
  with pytest.raises(UserError) as error:
    train.train_and_evaluate(tiny_config(num_steps=6, **{key: value}), finished)
  message = str(error.value)
  assert "\n" not in message
  assert f"{key} " in message and "->" in message
  assert "--workdir" in message and f"--config.init_from={finished}" in message
  assert snapshot(finished) == before
  assert not os.path.exists(os.path.join(os.path.dirname(finished), "checkpoints_damaged"))


def test_every_changed_key_is_listed_old_to_new(finished):
  with pytest.raises(UserError, match=r"head_hidden 256 -> 64, learning_rate 0\.001 -> 0\.01"):
    train.train_and_evaluate(tiny_config(head_hidden=64, learning_rate=0.01), finished)


def test_the_length_of_a_non_constant_schedule_is_part_of_the_run(tmp_path):
  workdir = str(tmp_path / "cosine")
  train.train_and_evaluate(tiny_config(num_steps=3, schedule="cosine"), workdir)
  with pytest.raises(UserError, match=r"num_steps 3 -> 6 .*length of the cosine schedule"):
    train.train_and_evaluate(tiny_config(num_steps=6, schedule="cosine"), workdir)


def test_bookkeeping_changes_resume_and_are_recorded_not_overwritten(run_copy, capsys):
  original = open(os.path.join(run_copy, "config.json")).read()
  summary = train.train_and_evaluate(
      tiny_config(num_steps=6, log_every_steps=1, keep_checkpoints=3), run_copy)
  assert summary["step"] == 6 and summary["trained_steps"] == 3
  assert open(os.path.join(run_copy, "config.json")).read() == original
  history = [json.loads(line)
             for line in open(os.path.join(run_copy, workdir_lib.HISTORY_FILE))]
  assert len(history) == 1 and history[0]["step"] == 3
  assert history[0]["changes"] == {"keep_checkpoints": [2, 3], "log_every_steps": [2, 1],
                                   "num_steps": [3, 6]}
  assert "config changes accepted" in capsys.readouterr().err


def test_a_checkpoint_that_does_not_fit_is_refused_not_set_aside(run_copy):
  """Without config.json (and its copy in the checkpoints), the state's shapes still decide."""
  os.remove(os.path.join(run_copy, "config.json"))
  checkpointer = checkpoint.Checkpointer(run_copy)
  model_shapes = jax.eval_shape(lambda: {"w": jax.numpy.zeros((3, 3))})
  before = snapshot(run_copy)
  with pytest.raises(checkpoint.CheckpointMismatch, match=r"does not fit .*missing"):
    checkpointer.restore_latest({"params": model_shapes})
  checkpointer.close()
  assert snapshot(run_copy) == before
  assert not os.path.exists(os.path.join(run_copy, "checkpoints_damaged"))


def test_a_workdir_whose_checkpoints_are_all_unreadable_is_not_restarted_from_zero(run_copy):
  for step in checkpoint.Checkpointer(run_copy).steps():
    for dirpath, _, filenames in os.walk(os.path.join(run_copy, "checkpoints", str(step))):
      for name in filenames:
        with open(os.path.join(dirpath, name), "r+b") as f:
          f.truncate(3)
  with pytest.raises(UserError, match=r"could be read .*refusing to start over from step 0"):
    train.train_and_evaluate(tiny_config(num_steps=6), run_copy)
  assert os.listdir(os.path.join(run_copy, "checkpoints_damaged"))
  # Rerunning says the same: the set-aside checkpoints still stand for trained steps.
  with pytest.raises(UserError, match="refusing to start over"):
    train.train_and_evaluate(tiny_config(num_steps=6), run_copy)


def test_a_finished_run_rerun_reports_its_metrics_and_trains_nothing(finished, capsys):
  before = snapshot(finished)
  summary = train.train_and_evaluate(tiny_config(num_steps=3), finished)
  err = capsys.readouterr().err
  assert summary["trained_steps"] == 0 and summary["step"] == 3
  assert "already finished: step 3 of 3, best val_accuracy" in err and "nan" not in err
  assert snapshot(finished) == before


def test_an_empty_validation_split_trains_without_evaluating(tmp_path, capsys):
  config = tiny_config(num_steps=4)
  config.synthetic.val_size = 0
  summary = train.train_and_evaluate(config, str(tmp_path / "noval"))
  assert summary["step"] == 4 and summary["best_val_accuracy"] is None
  assert "training without evaluation" in capsys.readouterr().err
  assert checkpoint.Checkpointer(str(tmp_path / "noval")).latest_step() == 4
  assert not [r for r in metrics.read_metrics(str(tmp_path / "noval")) if "val_accuracy" in r]


def test_a_failing_eval_keeps_the_trained_steps(tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError("eval exploded")
  monkeypatch.setattr(eval_loop, "evaluate", broken)
  workdir = str(tmp_path / "run")
  with pytest.raises(RuntimeError, match="eval exploded"):
    train.train_and_evaluate(tiny_config(num_steps=6, eval_every_steps=3,
                                         checkpoint_every_steps=100), workdir)
  assert checkpoint.Checkpointer(workdir).latest_step() == 3


def test_a_start_that_fails_before_its_first_step_leaves_no_trace(tmp_path):
  fresh = str(tmp_path / "fresh")
  with pytest.raises(UserError):
    train.train_and_evaluate(tiny_config(dataset="folder:" + str(tmp_path / "missing")), fresh)
  assert not os.path.exists(fresh)
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("mine")
  with pytest.raises(UserError):
    train.train_and_evaluate(tiny_config(model="vgg16_tiny", image_size=8, head="imagenet"),
                             str(existing))
  assert os.listdir(existing) == ["notes.txt"]


def test_a_workdir_that_is_a_file_is_one_error(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(UserError, match="is a file, not a directory"):
    train.train_and_evaluate(tiny_config(), str(path))
  assert path.read_text() == "x"


def test_an_interrupted_run_exits_with_128_plus_the_signal(tmp_path, monkeypatch, capsys):
  def stop_after_two(self, step):
    if step >= 2:
      self.signal = signal.SIGINT
      return True
    return False
  monkeypatch.setattr(preemption.Preemption, "stop_at", stop_after_two)
  status = train.main(tiny_config(), str(tmp_path / "run"), "quickstart", {})
  assert status == 128 + signal.SIGINT
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.startswith("SIGINT: saved a checkpoint at step 2") and "exit status 130" in last
  assert checkpoint.Checkpointer(str(tmp_path / "run")).latest_step() == 2


def test_the_demo_text_follows_only_the_synthetic_demo(tmp_path, capsys):
  assert train.main(tiny_config(num_steps=2), str(tmp_path / "a"), "quickstart", {}) == 0
  assert "offline demo" in capsys.readouterr().err
  assert train.main(tiny_config(num_steps=2), str(tmp_path / "a"), "quickstart", {}) == 0
  assert "offline demo" not in capsys.readouterr().err  # a finished rerun trained nothing
  assert train.main(tiny_config(num_steps=2), str(tmp_path / "b"), "default", {}) == 0
  assert "offline demo" not in capsys.readouterr().err


@pytest.fixture
def small_disk(tmp_path):
  """A 16 MiB tmpfs (root only: elsewhere the test is skipped)."""
  import subprocess
  mount = tmp_path / "disk"
  mount.mkdir()
  if os.geteuid() != 0:
    pytest.skip("mounting a small tmpfs needs root")
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if done.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory, leave: int = 0):
  """Fills the file system of `directory` to the last byte, then frees `leave` bytes."""
  path = os.path.join(directory, "filler")
  with open(path, "wb", buffering=0) as f:
    for chunk in (65536, 1):
      try:
        while True:
          f.write(b"\0" * chunk)
      except OSError:
        pass
  if leave:
    os.truncate(path, os.path.getsize(path) - leave)


def test_a_full_disk_is_one_error_and_keeps_the_last_good_checkpoint(small_disk):
  workdir = str(small_disk / "run")
  train.train_and_evaluate(tiny_config(num_steps=3), workdir)
  good = jax.device_get(checkpoint.load_trained(workdir)[0])
  _fill(small_disk)
  with pytest.raises(UserError) as error:
    train.train_and_evaluate(tiny_config(num_steps=6), workdir)
  message = str(error.value)
  assert "No space left on device" in message and "step 3" in message and "\n" not in message
  os.remove(small_disk / "filler")
  params, meta = checkpoint.load_trained(workdir)
  assert meta["step"] == 3
  for a, b in zip(jax.tree_util.tree_leaves(good), jax.tree_util.tree_leaves(params)):
    assert (a == b).all()
  # With space again, the same command resumes from the kept checkpoint.
  assert train.train_and_evaluate(tiny_config(num_steps=6), workdir)["step"] == 6


# Orbax's failed write leaves futures for its closed asyncio loop, reported as "unraisable": the
# aftermath of the full disk this test makes, not a bug of ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_disk_that_fills_while_checkpointing_is_one_error_too(small_disk):
  """Room for the metrics but not for a checkpoint: Orbax's writer fails, in its own words."""
  workdir = str(small_disk / "run")
  train.train_and_evaluate(tiny_config(num_steps=3), workdir)
  _fill(small_disk, leave=120_000)
  with pytest.raises(UserError, match=r"No space left on device; the last good checkpoint "
                                      r"\(step 3\) is intact"):
    train.train_and_evaluate(tiny_config(num_steps=9), workdir)
  os.remove(small_disk / "filler")
  assert checkpoint.load_trained(workdir)[1]["step"] == 3
  assert train.train_and_evaluate(tiny_config(num_steps=9), workdir)["step"] == 9


def test_a_read_only_workdir_is_one_error_before_anything(small_disk):
  import subprocess
  workdir = str(small_disk / "run")
  train.train_and_evaluate(tiny_config(num_steps=3), workdir)
  subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
  with pytest.raises(UserError, match="is not writable"):
    train.train_and_evaluate(tiny_config(num_steps=6), workdir)


def _folder(root, per_class=10):
  """`root/<class>/*.png`: two classes of small distinct images."""
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(0)
  for name in ("cat", "dog"):
    os.makedirs(root / name, exist_ok=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
          root / name / f"{i}.png")
  return root


def test_a_folder_run_resumes_and_evaluates_under_any_spelling_of_its_path(tmp_path,
                                                                             monkeypatch):
  from transfer import evaluate
  _folder(tmp_path / "data" / "flat")
  monkeypatch.chdir(tmp_path)
  config = lambda steps, path: tiny_config(num_steps=steps, dataset=f"folder:{path}",
                                           val_fraction=0.2, batch_size=8)
  train.train_and_evaluate(config(2, "data/flat"), "run")
  recorded = json.load(open(tmp_path / "run" / "config.json"))["dataset"]
  assert recorded == "folder:" + os.path.realpath(tmp_path / "data" / "flat")
  summary = train.train_and_evaluate(config(4, "./data/flat"), "run")
  assert summary["trained_steps"] == 2
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  assert evaluate.evaluate_workdir("../run")["val_count"] == 4  # 20% of 10 per class
  # The folder copied elsewhere: the same files, the same run.
  shutil.copytree(tmp_path / "data" / "flat", tmp_path / "copy")
  assert train.train_and_evaluate(config(6, tmp_path / "copy"), str(tmp_path / "run"))["step"] == 6
  # Files added: another split, refused before anything is touched.
  _folder(tmp_path / "copy", per_class=12)
  before = snapshot(tmp_path / "run")
  with pytest.raises(UserError, match=r"data differs .*train: 16 -> 20"):
    train.train_and_evaluate(config(8, tmp_path / "copy"), str(tmp_path / "run"))
  assert snapshot(tmp_path / "run") == before


def test_init_from_a_run_on_the_same_data_with_another_split_is_refused(tmp_path):
  data = _folder(tmp_path / "data")
  first = str(tmp_path / "first")
  train.train_and_evaluate(tiny_config(num_steps=2, dataset=f"folder:{data}"), first)
  with pytest.raises(UserError, match=f"init_from={first}: the data differs"):
    train.train_and_evaluate(tiny_config(num_steps=2, dataset=f"folder:{data}", seed=3,
                                         init_from=first), str(tmp_path / "second"))
  assert not os.path.exists(tmp_path / "second")
  # The same split: accepted.
  summary = train.train_and_evaluate(tiny_config(num_steps=2, dataset=f"folder:{data}",
                                                 init_from=first), str(tmp_path / "third"))
  assert summary["step"] == 2


def test_train_with_only_a_workdir_resumes_it_with_its_own_config(run_copy, capsys):
  """`transfer train --workdir W`, no --config: W's config.json, not the demo's."""
  status = main.run(["train", "--workdir", run_copy, "--config.num_steps=5"])
  assert status == 0
  err = capsys.readouterr().err
  assert "resumed from step 3" in err and "offline demo" not in err
  assert checkpoint.Checkpointer(run_copy).latest_step() == 5
  # The run's record reproduces it elsewhere: --config W/config.json.
  other = os.path.join(os.path.dirname(run_copy), "again")
  assert main.run(["train", "--workdir", other, "--config",
                   os.path.join(run_copy, "config.json"), "--config.num_steps=1"]) == 0
  assert json.load(open(os.path.join(other, "config.json")))["model"] == "vgg16_tiny"


def test_config_range_errors_come_before_the_workdir_is_made(tmp_path):
  with pytest.raises(UserError, match=r"learning_rate=-0\.001 .*> 0"):
    train.train_and_evaluate(tiny_config(learning_rate=-0.001), str(tmp_path / "neg"))
  assert not os.path.exists(tmp_path / "neg")


def test_orbax_write_errors_count_as_disk_errors(tmp_path):
  error = ValueError("RESOURCE_EXHAUSTED: Error writing file [os_error_code='28'] ...")
  message = str(workdir_lib.disk_error(error, str(tmp_path)))
  assert "No space left on device" in message and "no checkpoint was written" in message
  assert workdir_lib.disk_error(ValueError("shape mismatch"), str(tmp_path)) is None


def test_sigterm_before_the_first_step_undoes_the_start(tmp_path):
  """A real SIGTERM while the run sets up, in a process of its own: signal handlers belong to a
  process's main thread, which a pytest-xdist worker does not give its tests."""
  import subprocess
  import sys
  workdir = tmp_path / "run"
  code = f"""
import os, signal, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from helpers import tiny_config
from transfer import main, runs, train
real = runs.initial_variables
def terminated_while_setting_up(*args, **kwargs):
  out = real(*args, **kwargs)
  os.kill(os.getpid(), signal.SIGTERM)
  return out
runs.initial_variables = terminated_while_setting_up
try:
  train.train_and_evaluate(tiny_config(), {str(workdir)!r})
except BaseException as e:
  print(type(e).__name__, getattr(e, "exit_status", None), signal.getsignal(signal.SIGTERM))
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
  assert done.stdout.split() == ["Terminated", "143", str(signal.SIG_DFL)], done.stderr[-2000:]
  assert not os.path.exists(workdir)


def test_eval_of_a_run_without_validation_is_one_error(tmp_path):
  from transfer import evaluate
  config = tiny_config(num_steps=2)
  config.synthetic.val_size = 0
  train.train_and_evaluate(config, str(tmp_path / "noval"))
  with pytest.raises(UserError, match="without a validation split"):
    evaluate.evaluate_workdir(str(tmp_path / "noval"))


def test_train_with_only_a_workdir_continues_the_last_accepted_changes(run_copy, monkeypatch):
  """An extension stopped part-way continues to its new length, not the original one."""
  def stop_at_4(self, step):
    if step >= 4:
      self.signal = signal.SIGTERM
      return True
    return False
  with monkeypatch.context() as patch:
    patch.setattr(preemption.Preemption, "stop_at", stop_at_4)
    assert main.run(["train", "--workdir", run_copy, "--config.num_steps=6"]) == 143
  assert main.run(["train", "--workdir", run_copy]) == 0
  assert checkpoint.Checkpointer(run_copy).latest_step() == 6
  history = workdir_lib.read_history(run_copy)
  assert [r["changes"] for r in history] == [{"num_steps": [3, 6]}]  # no duplicate record


def test_an_unknown_key_suggests_the_likely_one():
  from transfer import configs
  with pytest.raises(UserError, match="did you mean 'batch_size'"):
    configs.apply_overrides(tiny_config(), {"batch_sise": "8"})
