"""`transfer eval` and checkpoint choice: best/latest/step, read-only workdirs, relative paths."""

import errno
import glob
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from transfer import checkpoint, evaluate, main, metrics, train
from transfer.errors import UserError
from helpers import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run with checkpoints (and evaluations) at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("eval") / "run")
  config = tiny_config(num_steps=4, log_every_steps=2, eval_every_steps=2,
                       checkpoint_every_steps=2)
  train.train_and_evaluate(config, workdir)
  return workdir


def _fake_run(workdir, accuracies, keep=2, keep_best=1):
  """Checkpoints whose params are `{"w": [step, step]}`, saved with the given val_accuracy."""
  saver = checkpoint.Checkpointer(str(workdir), keep=keep, keep_best=keep_best, async_save=False)
  for step, accuracy in accuracies:
    saver.save(step, {"params": {"w": jnp.full(2, float(step))}}, {"step": step},
               val_accuracy=accuracy)
  saver.close()
  return str(workdir)


def _loaded_step(workdir, which):
  params, _ = checkpoint.load_trained(workdir, which)
  return int(np.asarray(params["w"])[0])


def test_checkpoint_best_latest_and_step(tmp_path):
  workdir = _fake_run(tmp_path, [(1, 0.5), (2, 0.9), (3, None), (4, 0.6)])
  assert checkpoint.Checkpointer(workdir).steps() == [2, 3, 4]
  assert _loaded_step(workdir, "best") == 2
  assert _loaded_step(workdir, "latest") == _loaded_step(workdir, None) == 4
  assert _loaded_step(workdir, 3) == _loaded_step(workdir, "3") == 3


def test_unknown_step_lists_the_available_ones(tmp_path):
  workdir = _fake_run(tmp_path, [(1, 0.5), (2, 0.9)])
  with pytest.raises(UserError, match="no checkpoint at step 7 .*available steps: 1, 2$"):
    checkpoint.load_trained(workdir, 7)
  with pytest.raises(UserError, match="best, latest or a step number, got 'newest'"):
    checkpoint.load_trained(workdir, "newest")


def test_best_without_val_metrics_is_one_line_error(tmp_path):
  workdir = _fake_run(tmp_path, [(1, None), (2, None)], keep_best=0)
  with pytest.raises(UserError, match="no checkpoint .* has a val_accuracy .*latest or a step"):
    checkpoint.load_trained(workdir, "best")


def test_best_survives_a_resume(tmp_path):
  """The best step's metric is on disk: a later process still knows it, keeps it, picks it."""
  workdir = _fake_run(tmp_path, [(1, 0.5), (2, 0.9), (3, 0.6)])
  _fake_run(tmp_path, [(4, 0.7), (5, None)])
  assert 2 in checkpoint.Checkpointer(workdir).steps()
  assert _loaded_step(workdir, "best") == 2


def _damage(workdir, step):
  for path in glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"),
                        recursive=True):
    os.remove(path)


def test_only_latest_falls_back_past_a_damaged_step(tmp_path):
  workdir = _fake_run(tmp_path, [(1, 0.5), (2, 0.9)], keep=2)
  _damage(workdir, 2)
  assert _loaded_step(workdir, "latest") == 1
  for which in (2, "best"):
    with pytest.raises(UserError, match="checkpoint at step 2 .* cannot be restored") as e:
      checkpoint.load_trained(workdir, which)
    assert "\n" not in str(e.value)


def test_eval_and_predict_checkpoint_flag(trained, tmp_path, capsys):
  assert main.run(["eval", "--workdir", trained, "--checkpoint", "2", "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["step"] == 2

  evals = {r["step"]: r["val_accuracy"] for r in metrics.read_metrics(trained)
           if "val_accuracy" in r}
  main.run(["eval", "--workdir", trained, "--checkpoint", "best", "--json"])
  best = json.loads(capsys.readouterr().out)
  assert evals[best["step"]] == max(evals.values())
  assert best["val_accuracy"] == pytest.approx(evals[best["step"]])

  image = str(tmp_path / "x.png")
  Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(image)
  probs = {}
  for which in ("2", "latest"):
    assert main.run(["predict", "--workdir", trained, "--checkpoint", which, "--json",
                     image]) == 0
    probs[which] = [p["prob"] for p in json.loads(capsys.readouterr().out)["top"]]
  assert probs["2"] != probs["latest"]  # a different checkpoint really was used

  with pytest.raises(SystemExit) as e:
    main.main(["eval", "--workdir", trained, "--checkpoint", "5"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("transfer: error: no checkpoint at step 5")
  assert err.endswith("available steps: 2, 4") and "\n" not in err


def test_eval_still_reports_when_the_plot_cannot_be_written(trained, monkeypatch, capsys):
  """A full disk mid-write: metrics printed, one warning, no partial PNG left behind."""
  from matplotlib.figure import Figure

  def full_disk(self, path, **kwargs):
    with open(path, "wb") as f:
      f.write(b"\x89PNG half")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  png = os.path.join(trained, "confusion.png")
  if os.path.exists(png):
    os.remove(png)
  monkeypatch.setattr(Figure, "savefig", full_disk)
  assert main.run(["eval", "--workdir", trained, "--json"]) == 0
  out, err = capsys.readouterr()
  result = json.loads(out)
  assert result["val_count"] == 20 and result["confusion_png"] is None
  assert err.strip().splitlines() == [
      "eval: checkpoint step 4 (latest)",
      f"transfer: warning: could not write {png} (No space left on device); the metrics are "
      f"reported all the same"]
  assert not os.path.exists(png) and not glob.glob(png + "*")


def test_eval_text_in_a_read_only_workdir(trained, monkeypatch, capsys):
  def read_only(confusion, names, path):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

  monkeypatch.setattr(evaluate, "plot_confusion", read_only)
  main.run(["eval", "--workdir", trained])
  out, err = capsys.readouterr()
  assert out.startswith("step 4: val_loss ") and "(20 examples)" in out
  assert "<- predicted" in out
  assert "could not write" in err and "Read-only file system" in err
  # the step it read, then the one warning
  assert err.strip().splitlines()[0] == "eval: checkpoint step 4 (latest)"
  assert len(err.strip().splitlines()) == 2


def test_eval_of_a_relative_workdir_from_another_directory(trained, tmp_path, monkeypatch,
                                                          capsys):
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  relative = os.path.relpath(trained)
  assert relative.startswith("..")
  png = os.path.join(trained, "confusion.png")
  if os.path.exists(png):
    os.remove(png)
  main.run(["eval", "--workdir", relative, "--json"])
  assert json.loads(capsys.readouterr().out)["val_count"] == 20
  assert os.path.exists(png) and not os.listdir(elsewhere)
