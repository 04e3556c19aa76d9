"""The learning-rate range test (Smith 2015; fastai's `lr_find`): which learning rate to train with.

From a fresh copy of the run's initial params (pretrained weights, or an `init_from` run's), train
for at most `steps` steps while the rate grows exponentially from `start_lr` to `end_lr`, with the
config's optimizer, trainable set, `lr_mults`, data and augmentation, and record each step's
training loss. The loss is smoothed with a bias-corrected exponential moving average (`beta`,
fastai's 0.98); the test stops early once the smoothed loss exceeds `diverge` (4) times its
minimum, or turns NaN/inf.

The suggestion follows fastai's `valley` rule: drop the first tenth of the steps and the last
five (the blow-up), find the longest run of steps whose smoothed losses decrease (the longest
strictly decreasing subsequence), and take the rate halfway along it (at 1/3 + 1/6 of its length).
That lands in the middle of the steady descent, an order of magnitude or so below the minimum,
where training is fast yet stable. The rate of steepest descent of the smoothed loss (fastai's
`steep`) is reported beside it. A suggestion always lies before the last five steps of a sweep
that diverged, so never at or beyond the divergence: when the loss diverges before `MIN_POINTS`
steps remain once the head and tail are dropped, there is nothing to judge, no rate is suggested
and the user is told to lower `--start_lr`.

Nothing of a run in the workdir is read or changed: the test writes only `lr_find.json` and
`lr_find.png` there. It streams images even with `cache_features`: a sweep of 100 batches costs
less than running the backbone over the whole training set.

    transfer lr_find --config cats_vs_dogs --workdir workdirs/cats_vs_dogs
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Callable

import numpy as np

from transfer.errors import UserError

JSON_FILE, PLOT_FILE = "lr_find.json", "lr_find.png"
HEAD_FRACTION, TAIL = 10, 5  # fastai's trim: the first tenth and the last five steps
MIN_POINTS = 3  # fewest smoothed losses a suggestion is judged from
RULE = ("valley: the rate halfway along the longest decreasing stretch of the smoothed loss "
        "(fastai's valley), first 10% and last 5 steps left out")


def rates(start_lr: float, end_lr: float, steps: int) -> np.ndarray:
  """The rate of each step: `start_lr * (end_lr / start_lr) ** (i / (steps - 1))`."""
  return start_lr * (end_lr / start_lr) ** (np.arange(steps) / max(steps - 1, 1))


def range_test(train_one: Callable[[int], float], steps: int, diverge: float = 4.0,
               beta: float = 0.98) -> tuple[list[float], list[float]]:
  """Runs `train_one(i)` (one step at the i-th rate, returning its loss) until the end or a
  blow-up.

  Returns:
    `(losses, smoothed)`: the raw losses and their bias-corrected moving average, one per step
    taken (a NaN/inf loss ends the test and is not kept).
  """
  losses, smoothed, average = [], [], 0.0
  for i in range(steps):
    loss = float(train_one(i))
    if not math.isfinite(loss):
      break
    average = beta * average + (1 - beta) * loss
    losses.append(loss)
    smoothed.append(average / (1 - beta ** (i + 1)))
    if i > 0 and smoothed[-1] > diverge * min(smoothed):
      break
  return losses, smoothed


def window(n: int, diverged: bool) -> tuple[int, int] | None:
  """The `[lo, hi)` steps the suggestion rules look at, or None when too few remain to judge.

  fastai's trim (first tenth, last five). A sweep that ran to the end without diverging keeps all
  its steps when the trim would leave fewer than `MIN_POINTS` (a short sweep asked for); one that
  diverged never does: its last five steps lead into the blow-up.
  """
  lo, hi = n // HEAD_FRACTION, n - TAIL
  if hi - lo >= MIN_POINTS:
    return lo, hi
  return None if diverged or n < 2 else (0, n)


def suggest_valley(lrs, smoothed, diverged: bool = True) -> int | None:
  """The index of fastai's `valley` suggestion (see the module docstring); None when `window`
  leaves nothing to judge."""
  bounds = window(len(smoothed), diverged)
  if bounds is None:
    return None
  lo, hi = bounds
  losses = list(smoothed[lo:hi])
  n = len(losses)
  # longest[i]: length of the longest strictly decreasing subsequence ending at i.
  longest = [1] * n
  for i in range(1, n):
    longest[i] = 1 + max((longest[j] for j in range(i) if losses[j] > losses[i]), default=0)
  end = int(np.argmax(longest))
  start = end - longest[end] + 1
  third = (end - start) / 3
  return lo + start + int(third) + int(third / 2)


def suggest_steep(lrs, smoothed, diverged: bool = True) -> int | None:
  """The index where the smoothed loss falls fastest per unit of log rate (None as for
  `suggest_valley`)."""
  bounds = window(len(smoothed), diverged)
  if bounds is None:
    return None
  lo, hi = bounds
  lrs, losses = np.log(np.asarray(lrs[lo:hi])), np.asarray(smoothed[lo:hi])
  if len(losses) < 2:
    return lo
  return lo + int(np.argmin(np.diff(losses) / np.diff(lrs)))


def check_sweep(steps: int, start_lr: float, end_lr: float, diverge: float = 4.0,
                beta: float = 0.98) -> None:
  """Refuses a sweep that cannot run: bounds not finite, not positive or not increasing."""
  finite = all(math.isfinite(float(x)) for x in (start_lr, end_lr, diverge, beta))
  if not finite or steps < 2 or not 0 < start_lr < end_lr or diverge <= 1 or not 0 <= beta < 1:
    raise UserError(f"lr_find needs steps >= 2, finite 0 < start_lr < end_lr, diverge > 1 and "
                    f"beta in [0, 1); got steps={steps}, start_lr={start_lr}, end_lr={end_lr}, "
                    f"diverge={diverge}, beta={beta}; e.g. --start_lr 1e-7 --end_lr 10")


def find(config, *, steps: int = 100, start_lr: float = 1e-7, end_lr: float = 10.0,
         diverge: float = 4.0, beta: float = 0.98, stage: int = 1, devices=None,
         log=None) -> dict[str, Any]:
  """Runs the range test for `config` (its `stage`-th stage when it has stages).

  Args:
    config: a validated run config.
    steps: the most steps to take (fewer when the loss blows up).
    start_lr, end_lr: the first and last rates (the trainable params' base rate; `lr_mults`
      scale it per group as in training).
    diverge: stop once the smoothed loss exceeds this many times its minimum.
    beta: the smoothing factor of the loss's moving average.
    stage: 1-based stage whose trainable set, optimizer and data options are tested (its
      initial params are the run's, not the previous stage's result).
    devices: devices to run on (default: all).
    log: called with progress lines.

  Returns:
    The record written to `lr_find.json`: rates, losses, smoothed losses, suggestion, rule,
    `diverged_at` (the 1-based step the loss diverged at, or None). `suggestion` and `steep`
    are None when the loss diverged before enough steps to judge (`window`).

  Raises:
    UserError: a sweep `check_sweep` refuses, or a bad stage.
  """
  import jax
  import optax
  from transfer import assembly, data as data_lib, optim, parallel, stages as stages_lib
  log = log or (lambda line: None)
  check_sweep(steps, start_lr, end_lr, diverge, beta)
  stage_configs = stages_lib.stage_configs(config)
  if not 1 <= stage <= len(stage_configs):
    raise UserError(f"--stage {stage}: the config has {len(stage_configs)} stage(s)")
  c = stage_configs[stage - 1].copy_and_resolve_references()
  with c.unlocked():
    c.schedule = "constant"  # no momentum cycling: the sweep is the only schedule

  # The run this stage trains (data, class check, model, regularisation, EMA), its optimizer
  # driven by the sweep.
  run = assembly.build(c, devices)
  log(f"data: {c.dataset}: {run.data.describe()}")
  variables, note = run.initial_variables()
  log(f"{c.model} + {c.head} head; {note}")
  sweep = optax.exponential_decay(start_lr, max(steps - 1, 1), end_lr / start_lr)
  parts = run.sweep(run.stage(0), steps, sweep)
  log(optim.describe(variables["params"], parts.param_labels))
  state = run.new_state(variables, parts)
  train_step = run.train_step(parts, "full")
  batches = data_lib.prefetch_to_device(run.data.train_batches(0),
                                        parallel.batch_sharding(run.mesh), size=c.prefetch)
  lrs = rates(start_lr, end_lr, steps)

  def train_one(i):
    nonlocal state
    batch = next(batches)
    state, metrics = train_step(state, {"image": batch["image"], "label": batch["label"]})
    loss = float(jax.device_get(metrics["loss"]))
    if i % 10 == 0 or not math.isfinite(loss):
      log(f"lr_find step {i + 1}/{steps}: learning_rate {lrs[i]:.3g} loss {loss:.4f}")
    return loss

  losses, smoothed = range_test(train_one, steps, diverge, beta)
  blew_up = len(smoothed) > 1 and smoothed[-1] > diverge * min(smoothed)
  diverged = blew_up or len(losses) < steps
  # 1-based step of the divergence: the last kept one, or the NaN/inf one after it.
  diverged_at = (len(losses) if blew_up else len(losses) + 1) if diverged else None
  lrs = lrs[:len(losses)]
  valley, steep = (suggest_valley(lrs, smoothed, diverged), suggest_steep(lrs, smoothed, diverged))
  stage_name = stages_lib.stage_name(config, stage - 1) if stages_lib.is_staged(config) else ""
  rate_at = lambda index: None if index is None else float(lrs[index])
  return {"rates": [float(x) for x in lrs], "losses": losses, "smoothed": smoothed,
          "suggestion": rate_at(valley), "rule": RULE, "steep": rate_at(steep),
          "stopped_early": diverged, "diverged_at": diverged_at, "steps": steps, "start_lr": start_lr,
          "end_lr": end_lr, "diverge": diverge, "beta": beta, "stage": stage_name,
          "trainable": list(c.trainable), "lr_mults": dict(c.lr_mults),
          "optimizer": c.optimizer}


def write(workdir: str, result: dict[str, Any]) -> tuple[str, str]:
  """Writes `lr_find.json` and `lr_find.png` into `workdir` (nothing else); returns their paths."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, JSON_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(path + ".tmp", path)
  return path, plot(workdir, result)


def plot_limits(result: dict[str, Any]) -> tuple[float, float] | None:
  """The loss axis of `lr_find.png`: the smoothed curve up to where it diverged, a margin
  around it; raw spikes above it are cut so they do not flatten the useful region."""
  smoothed, losses = result["smoothed"], result["losses"]
  if not smoothed:
    return None
  limit = result.get("diverge", 4.0) * min(smoothed)
  shown = [s for s in smoothed if s <= limit] or smoothed
  low, high = min(min(shown), min(losses)), max(shown)
  margin = 0.05 * (high - low) or 0.05 * abs(high) or 1.0
  return low - margin, high + margin


def plot(workdir: str, result: dict[str, Any]) -> str:
  """`lr_find.png`: raw and smoothed loss against the rate (log scale), the suggestions marked,
  the loss axis clipped to the useful range (`plot_limits`)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(result["rates"], result["losses"], color="lightgray", label="loss")
  ax.plot(result["rates"], result["smoothed"], label="smoothed loss")
  if result["suggestion"] is not None:
    ax.axvline(result["suggestion"], color="red", linestyle="--",
               label=f"valley {result['suggestion']:.2g}")
    ax.axvline(result["steep"], color="gray", linestyle=":",
               label=f"steep {result['steep']:.2g}")
  limits = plot_limits(result)
  if limits:
    ax.set_ylim(*limits)
  ax.set_xscale("log")
  ax.set_xlabel("learning rate")
  ax.set_ylabel("training loss")
  title = "lr_find" + (f" (stage {result['stage']})" if result["stage"] else "")
  ax.set_title(title + ("" if result["suggestion"] is not None else ": diverged, no suggestion"))
  ax.legend()
  path = os.path.join(workdir, PLOT_FILE)
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=80)
  plt.close(fig)
  os.replace(path + ".tmp.png", path)
  return path


def train_command(config_name: str, overrides: dict[str, str], rate: float,
                  workdir: str | None) -> str:
  """The `transfer train` line that trains with `rate` (the other overrides kept)."""
  parts = ["transfer", "train", "--config", config_name]
  parts += [f"--config.{k}={v}" for k, v in overrides.items() if k != "learning_rate"]
  parts.append(f"--config.learning_rate={rate:.3g}")
  if workdir:
    parts += ["--workdir", workdir]
  import shlex
  return " ".join(shlex.quote(p) for p in parts)


def main(config, workdir: str | None, config_name: str, overrides: dict[str, str], *,
         steps: int = 100, start_lr: float = 1e-7, end_lr: float = 10.0, stage: int = 1) -> int:
  """CLI entry: run the test, write its files, print the suggestion and how to train with it."""
  from transfer import configs, train
  from transfer import workdir as workdir_lib
  config = configs.validate(config)
  check_sweep(steps, start_lr, end_lr)  # before anything is built
  workdir = workdir or train.default_workdir(config_name) + "-lr_find"
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} is a file, not a directory; give a directory path")
  err = lambda line: print(line, file=sys.stderr, flush=True)
  result = find(config, steps=steps, start_lr=start_lr, end_lr=end_lr, stage=stage, log=err)
  import jax
  if jax.process_index() != 0:  # one writer, one report
    return 0
  json_path, png_path = write(workdir, result)
  holds_run = os.path.isfile(os.path.join(workdir, workdir_lib.CONFIG_FILE))
  rate, taken = result["suggestion"], len(result["losses"])
  ended = (f"stopped at step {taken} (loss diverged)" if result["stopped_early"]
           else f"{taken} steps")
  if rate is None:
    at = result["diverged_at"]
    where = f"at step {at} of {steps} (learning_rate {rates(start_lr, end_lr, steps)[at - 1]:.3g})"
    raise UserError(f"lr_find: the loss diverged {where}, before enough steps to judge (the "
                    f"first {HEAD_FRACTION}% and the last {TAIL} are left out); no rate suggested. "
                    f"Lower --start_lr (e.g. --start_lr {start_lr / 1e3:.3g}); the curve is in "
                    f"{png_path}")
  print(f"lr_find: {ended}; wrote {json_path} and {png_path}")
  print(f"suggested learning_rate: {rate:.3g} ({result['rule'].split(':')[0]}; steepest descent "
        f"at {result['steep']:.3g})")
  staged = stages_of(config)
  if staged and "learning_rate" in staged[stage - 1]:
    print(f"set learning_rate={rate:.3g} in stages[{stage - 1}] of the config to train with it")
  else:
    print("train with it:")
    print("  " + train_command(config_name, overrides, rate, None if holds_run else workdir))
  return 0


def stages_of(config) -> list[dict]:
  return [dict(s) for s in config.stages]
