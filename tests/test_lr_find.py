"""The learning-rate range test: its suggestion on a problem with known rates, its files, and a
run in the same workdir left untouched."""

import json
import os

import numpy as np
import pytest

from transfer import assembly, lr_find, main, train
from helpers import one_line_error, snapshot, tiny_config

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


@pytest.mark.parametrize("bounds", [("1.0", "0.1"), ("1e-3", "1e-3"), ("1e-7", "inf"),
                                    ("nan", "1"), ("0", "1"), ("-1e-3", "1"), ("1e-7", "-inf")])
def test_bad_sweep_bounds_are_refused_in_one_line_before_anything_is_built(bounds, tmp_path):
  workdir = tmp_path / "w"
  with pytest.raises(lr_find.UserError, match="finite 0 < start_lr < end_lr") as e:
    main.run(["lr_find", "--workdir", str(workdir), f"--start_lr={bounds[0]}",
              f"--end_lr={bounds[1]}", *LR_FIND])
  one_line_error(e)
  assert not workdir.exists()
  with pytest.raises(lr_find.UserError, match="start_lr < end_lr"):
    lr_find.find(tiny_config(), start_lr=float(bounds[0]), end_lr=float(bounds[1]))


def test_end_lr_inf_exits_2_with_one_line(tmp_path):
  import subprocess
  import sys
  result = subprocess.run([sys.executable, "-m", "transfer.main", "lr_find", "--workdir",
                           str(tmp_path / "w"), "--end_lr", "inf", *LR_FIND],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().count("\n") == 0 and "end_lr=inf" in result.stderr


@pytest.mark.parametrize("diverge_at", [0, 1, 2, 6, 7])
def test_a_sweep_diverging_before_enough_steps_suggests_nothing(diverge_at):
  """Fewer than MIN_POINTS steps left once the head and the five steps before the blow-up are
  dropped: no rate is judged (a NaN at step `diverge_at`)."""
  losses = [2.0 - 0.1 * i for i in range(diverge_at)] + [float("nan")]
  kept, smoothed = lr_find.range_test(lambda i: losses[i], 100)
  lrs = lr_find.rates(1e4, 1e8, 100)[:len(kept)]
  assert len(kept) == diverge_at
  assert lr_find.suggest_valley(lrs, smoothed, diverged=True) is None
  assert lr_find.suggest_steep(lrs, smoothed, diverged=True) is None


@pytest.mark.parametrize("n", list(range(8, 40)))
@pytest.mark.parametrize("shape", ["falling", "flat", "rising"])
def test_a_suggestion_lies_before_the_steps_that_led_to_divergence(n, shape):
  """Whatever the curve, the suggested step is at least TAIL steps before the divergence (the
  last step kept, or the NaN after it)."""
  curve = {"falling": lambda i: 2.0 - 0.01 * i, "flat": lambda i: 1.0 + 0.01 * (i % 2),
           "rising": lambda i: 1.0 + 0.001 * i}[shape]
  smoothed = [curve(i) for i in range(n)]
  lrs = lr_find.rates(1e-5, 1.0, n)
  for rule in (lr_find.suggest_valley, lr_find.suggest_steep):
    index = rule(lrs, smoothed, diverged=True)
    if n - lr_find.TAIL - n // 10 < lr_find.MIN_POINTS:
      assert index is None
    else:
      assert index <= n - 1 - lr_find.TAIL


def test_cli_diverging_at_once_suggests_nothing_and_asks_for_a_lower_start_lr(tmp_path, capsys):
  """The issue's case: `--start_lr 1e4 --end_lr 1e8` blows up within two steps."""
  workdir = str(tmp_path / "w")
  with pytest.raises(lr_find.UserError) as e:
    main.run(["lr_find", "--workdir", workdir, "--steps", "20", "--start_lr", "1e4",
              "--end_lr", "1e8", *LR_FIND])
  message = one_line_error(e)
  assert "no rate suggested" in message and "Lower --start_lr" in message
  assert "suggested learning_rate" not in capsys.readouterr().out
  assert "transfer train" not in message
  result = json.load(open(os.path.join(workdir, "lr_find.json")))
  assert result["suggestion"] is None and result["steep"] is None and result["stopped_early"]
  assert result["diverged_at"] <= 3 and f"at step {result['diverged_at']} of 20" in message
  assert os.path.getsize(os.path.join(workdir, "lr_find.png")) > 1000


def test_the_plot_cuts_loss_spikes_to_the_useful_range():
  rng = np.random.default_rng(0)
  losses = list(np.linspace(2.0, 0.5, 40) + 0.01 * rng.standard_normal(40))
  losses[20] = 500.0  # one spike, which the smoothed curve absorbs
  smoothed, average = [], 0.0
  for i, loss in enumerate(losses):
    average = 0.98 * average + 0.02 * loss
    smoothed.append(average / (1 - 0.98 ** (i + 1)))
  low, high = lr_find.plot_limits({"losses": losses, "smoothed": smoothed, "diverge": 4.0})
  assert high < 4 * min(smoothed) and high >= max(s for s in smoothed if s <= 4 * min(smoothed))
  assert low <= min(losses) and high < 100.0


def test_the_optimizer_applies_the_sweep_rate_at_every_step(monkeypatch):
  """The sweep reaches the optimizer: plain SGD on one fixed batch at rates small enough that
  the gradient stays put, so each step's update is the rate the optimizer applied times one
  and the same gradient; the ratios of the update norms follow the sweep's rates."""
  import jax
  updates = []
  real = assembly.Run.train_step

  def recording(self, parts, kind="full"):
    step = real(self, parts, kind)

    def wrapped(state, batch):
      before = jax.device_get(state.params["head"])
      state, metrics = step(state, batch)
      after = jax.device_get(state.params["head"])
      deltas = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: a - b, after, before))
      updates.append(float(np.sqrt(sum(np.sum(np.square(d, dtype=np.float64)) for d in deltas))))
      return state, metrics
    return wrapped

  monkeypatch.setattr(assembly.Run, "train_step", recording)
  # One batch of 8 (the same 8 images each step, in any order), no augmentation, no momentum,
  # no weight decay, no dropout: only the rate changes the update.
  config = tiny_config(optimizer="sgd", momentum=0.0, weight_decay=0.0, augment="none",
                       head_dropout=0.0, batch_size=8, **{"synthetic.train_size": 8})
  steps = 8
  result = lr_find.find(config, steps=steps, start_lr=1e-6, end_lr=1e-3)
  assert len(result["losses"]) == steps == len(updates)
  applied = np.array(updates) / updates[0] * result["rates"][0]
  np.testing.assert_allclose(applied, result["rates"], rtol=0.02)
