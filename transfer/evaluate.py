"""`transfer eval`: a trained run's validation metrics and confusion matrix.

The run is rebuilt from its checkpoint metadata (model, head, classes, preprocessing) and the
config stored with it, so the original config file is not needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

import jax
import ml_collections

from transfer import checkpoint as checkpoint_lib
from transfer import parallel, runs, steps
from transfer.errors import UserError


def evaluate_workdir(workdir: str, checkpoint: str | int | None = "latest") -> dict[str, Any]:
  """Evaluates one checkpoint of `workdir` on its validation split.

  Args:
    workdir: the run directory (relative paths are to the current directory).
    checkpoint: "latest" (or None), "best" or a step (see `checkpoint.load_trained`).

  Returns:
    `{"step", "val_loss", "val_accuracy", "val_count", "confusion", "class_names"}`.
  """
  from transfer import data as data_lib
  variables, meta = checkpoint_lib.load_trained_variables(workdir, checkpoint)
  run = meta["run"]
  config = ml_collections.ConfigDict(meta["config"])
  recorded = run.get("data") or {}
  if recorded.get("dataset"):  # absolute: eval works from any working directory
    config.dataset = recorded["dataset"]
  model = runs.model_from_meta(run)
  mesh = parallel.make_mesh()
  ds = data_lib.create(config, preprocess_source=runs.weights_source(run["weights"]) or "none")
  if not ds.num_val:
    raise UserError(f"{workdir} was trained without a validation split ({config.dataset}, "
                    f"val_fraction={config.val_fraction}); there is nothing to evaluate on")
  data_lib.check_same_data(recorded, ds.identity(), f"eval of {workdir}",
                           hint="restore the run's data there, or train a new run on this data")
  eval_step = steps.make_eval_step(model, mesh, len(run["class_names"]), config.parallel)
  variables = parallel.replicate(variables, mesh)
  metrics = steps.evaluate(eval_step, variables, ds.eval_batches("val", config.batch_size), mesh)
  return {"step": meta["step"], **metrics, "class_names": run["class_names"]}


def format_confusion(confusion, class_names) -> str:
  """A plain-text confusion matrix (rows: true class, columns: predicted)."""
  names = [n[:12] for n in class_names]
  width = max(8, *(len(n) for n in names)) + 1
  lines = [" " * width + "".join(f"{n:>{width}}" for n in names) + "   <- predicted"]
  for name, row in zip(names, confusion):
    lines.append(f"{name:>{width}}" + "".join(f"{v:>{width}d}" for v in row))
  return "\n".join(lines)


def plot_confusion(confusion, class_names, path: str) -> str:
  """Writes the confusion matrix as a PNG heat map (whole or not at all: via a temporary file).

  Raises:
    OSError: the file cannot be written; no partial PNG is left behind.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  n = len(class_names)
  fig, ax = plt.subplots(figsize=(2 + 0.6 * n, 1.5 + 0.6 * n))
  ax.imshow(confusion, cmap="Blues")
  ax.set_xticks(range(n), class_names, rotation=45, ha="right")
  ax.set_yticks(range(n), class_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  for i in range(n):
    for j in range(n):
      ax.text(j, i, str(confusion[i][j]), ha="center", va="center")
  fig.tight_layout()
  partial = path + ".partial"
  try:
    fig.savefig(partial, dpi=80, format="png")
    os.replace(partial, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(partial)
    raise
  finally:
    plt.close(fig)
  return path


def main(workdir: str, as_json: bool = False,
         checkpoint: str | int | None = "latest") -> dict[str, Any]:
  """CLI entry: print metrics (or one JSON object) and write `confusion.png` in the workdir.

  The metrics are the result; the plot is a by-product. A workdir that cannot be written
  (read-only mount, full disk) costs a one-line warning, never the metrics.
  """
  result = evaluate_workdir(workdir, checkpoint)
  names = result["class_names"]
  confusion = result["confusion"][:len(names)]
  confusion = [row[:len(names)] for row in confusion]
  result["confusion"] = confusion
  if jax.process_index() == 0:
    path = os.path.join(workdir, "confusion.png")
    try:
      result["confusion_png"] = plot_confusion(confusion, names, path)
    except OSError as e:
      result["confusion_png"] = None
      print(f"transfer: warning: could not write {path} ({e.strerror or e}); "
            f"the metrics are reported all the same", file=sys.stderr)
  if as_json:
    print(json.dumps(result))
  else:
    print(f"step {result['step']}: val_loss {result['val_loss']:.4f}  "
          f"val_accuracy {result['val_accuracy']:.4f}  ({result['val_count']} examples)")
    print(format_confusion(confusion, names))
    if result.get("confusion_png"):
      print(f"confusion matrix plot: {result['confusion_png']}", file=sys.stderr)
  return result
