"""The learning-rate range test: its suggestion on a problem with known rates, its files, and a
run in the same workdir left untouched."""

import json
import os

import numpy as np
import pytest

from transfer import lr_find, main, train
from helpers import snapshot, tiny_config

CURVATURE = 100.0  # gradient descent on 0.5 * h * w^2 diverges above 2 / h


def _quadratic(noise: float, seed: int = 0):
  """One SGD step of the i-th sweep rate on 0.5 * h * (w - 1)^2, the loss seen with a little
  multiplicative noise (as minibatches give)."""
  lrs = lr_find.rates(1e-7, 10.0, 100)
  rng = np.random.default_rng(seed)
  w = [0.0]

  def train_one(i):
    loss = 0.5 * CURVATURE * (w[0] - 1.0) ** 2 * (1 + noise * rng.standard_normal())
    w[0] -= lrs[i] * CURVATURE * (w[0] - 1.0)
    return loss

  return lrs, train_one


@pytest.mark.parametrize("noise,seed", [(0.0, 0), (0.03, 0), (0.03, 1), (0.1, 2)])
def test_the_suggestion_lies_between_the_flat_and_the_diverging_rates(noise, seed):
  lrs, train_one = _quadratic(noise, seed)
  losses, smoothed = lr_find.range_test(train_one, 100)
  taken = lrs[:len(losses)]
  # The problem as the test saw it: flat at the lowest rates, stopped once the loss blew up.
  flat = taken < 1e-5
  assert np.all(np.abs(np.array(losses)[flat] / losses[0] - 1) < 4 * noise + 0.02)
  assert len(losses) < 100 and taken[-1] > 2 / CURVATURE
  assert smoothed[-1] > 4 * min(smoothed)
  suggestion = taken[lr_find.suggest_valley(taken, smoothed)]
  steep = taken[lr_find.suggest_steep(taken, smoothed)]
  for rate in (suggestion, steep):
    assert 1e-5 < rate < 2 / CURVATURE, rate


def test_the_sweep_is_exponential_from_start_to_end():
  r = lr_find.rates(1e-6, 1.0, 7)
  assert r[0] == pytest.approx(1e-6) and r[-1] == pytest.approx(1.0)
  np.testing.assert_allclose(r[1:] / r[:-1], 10.0)


def test_valley_takes_the_middle_of_the_longest_descent():
  # 10 flat-noisy points, then a clean descent over indices 10..29, then a blow-up.
  smoothed = [1.0, 1.01] * 5 + list(np.linspace(1.0, 0.2, 20)) + [0.5, 2.0, 5.0, 9.0, 20.0]
  lrs = lr_find.rates(1e-5, 1.0, len(smoothed))
  index = lr_find.suggest_valley(lrs, smoothed)
  assert 14 <= index <= 22


LR_FIND = ["--config", "default", "--config.model=vgg16_tiny", "--config.weights=none",
           "--config.image_size=32", "--config.batch_size=8", "--config.synthetic.train_size=48",
           "--config.synthetic.val_size=16", "--config.num_steps=3"]


def test_cli_writes_its_two_files_and_leaves_the_run_there_untouched(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(num_steps=3), workdir)
  before = snapshot(workdir)
  status = main.run(["lr_find", "--workdir", workdir, "--steps", "30", "--start_lr", "1e-5",
                     "--end_lr", "100", *LR_FIND[:2], *[a for a in LR_FIND[2:]]])
  assert status == 0
  out = capsys.readouterr().out
  after = snapshot(workdir)
  assert set(after) - set(before) == {"lr_find.json", "lr_find.png"}
  assert {k: v for k, v in after.items() if k in before} == before  # byte for byte, same mtimes
  result = json.load(open(os.path.join(workdir, "lr_find.json")))
  n = len(result["losses"])
  assert 2 <= n <= 30 and len(result["rates"]) == len(result["smoothed"]) == n
  assert result["rates"][0] == pytest.approx(1e-5) and result["rule"].startswith("valley")
  assert result["suggestion"] in result["rates"] and result["trainable"] == ["^head/"]
  assert os.path.getsize(os.path.join(workdir, "lr_find.png")) > 1000
  rate = f"{result['suggestion']:.3g}"
  assert f"suggested learning_rate: {rate}" in out
  # The command to train with it: the same config and overrides, the suggested rate, and no
  # --workdir (this one holds a run already).
  command = out.strip().splitlines()[-1].strip()
  assert command.startswith("transfer train --config default --config.model=vgg16_tiny")
  assert command.endswith(f"--config.learning_rate={rate}")


def test_cli_suggests_training_in_a_fresh_workdir(tmp_path, capsys):
  workdir = str(tmp_path / "new")
  assert main.run(["lr_find", "--workdir", workdir, "--steps", "8", *LR_FIND]) == 0
  assert sorted(os.listdir(workdir)) == ["lr_find.json", "lr_find.png"]
  assert capsys.readouterr().out.strip().endswith(f"--workdir {workdir}")


def test_bad_sweep_is_one_line():
  config = tiny_config()
  with pytest.raises(lr_find.UserError, match="start_lr < end_lr"):
    lr_find.find(config, start_lr=1.0, end_lr=0.1)
