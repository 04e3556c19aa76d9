"""How a training run ends: its summary and done line, the answer to a rerun of a finished run
(with the one way to train further), and the next steps the offline demo prints."""

from __future__ import annotations

import os
from typing import Any

from transfer import logs, metrics as metrics_lib
from transfer import stages as stages_lib
from transfer import workdir as workdir_lib


def finish(workdir: str, step: int, start_step: int, best, last_eval, is_main: bool):
  """The run's summary, after plotting its curves."""
  summary = {"step": step, "best_val_accuracy": best, "final": last_eval, "workdir": workdir,
             "trained_steps": step - start_step}
  if is_main:
    try:
      metrics_lib.plot_curves(workdir)
    except (OSError, RuntimeError, ValueError) as e:
      logs.console(f"warning: could not write {os.path.join(workdir, 'curves.png')}: {e}")
    logs.console(f"done: {step} steps, {result_line(best, last_eval)}; workdir {workdir}")
  return summary


def result_line(best: float | None, last_eval: dict[str, Any]) -> str:
  """The best and last validation accuracy, as the done line and a finished run's rerun say it."""
  if best is None:
    return "no validation split"
  last = last_eval.get("val_accuracy")
  return f"best val_accuracy {best:.4f}" + (f", last {last:.4f}" if last is not None else "")


def already_finished(workdir: str, step: int, total_steps: int, is_main: bool,
                     config) -> dict[str, Any]:
  """A rerun of a finished run: report its final metrics and how to train further, train
  nothing."""
  records = metrics_lib.read_metrics(workdir) if is_main else []
  evals = [r for r in records if "val_accuracy" in r]
  best = max((r["val_accuracy"] for r in evals), default=None)
  last_eval = dict(evals[-1]) if evals else {}
  staged = stages_lib.is_staged(config)
  # Whether a longer rerun is the same run is `workdir.identity_changes`' decision: ask it.
  longer_is_same_run = not workdir_lib.identity_changes(
      {"num_steps": (total_steps, total_steps + 1)}, str(config.schedule), staged)
  hint = stages_lib.how_to_train_further(config, workdir, longer_is_same_run)
  if is_main:
    logs.console(f"already finished: step {step} of {total_steps}, {result_line(best, last_eval)}"
                 f"; nothing to train ({hint}); workdir {workdir}")
  return {"step": step, "best_val_accuracy": best, "final": last_eval, "workdir": workdir,
          "trained_steps": 0}


NEXT_STEPS = """
That was the offline demo (synthetic images). Look at it, then run the real recipe:
  transfer eval --workdir {workdir}
  transfer weights download keras:vgg16_notop        # ImageNet conv weights, 58 MB
  pip install -e '.[tfds]'                           # TensorFlow Datasets for cats_vs_dogs
  transfer train --config cats_vs_dogs --workdir workdirs/cats_vs_dogs"""
