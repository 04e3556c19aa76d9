"""`transfer eval`: a trained run's validation metrics and confusion matrix.

The run is rebuilt from its checkpoint metadata (model, head, classes, preprocessing) and the
config stored with it, so the original config file is not needed.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import ml_collections

from transfer import checkpoint, parallel, train


def evaluate_workdir(workdir: str, step: int | None = None) -> dict[str, Any]:
  """Evaluates the latest (or given) checkpoint of `workdir` on its validation split.

  Returns:
    `{"step", "val_loss", "val_accuracy", "val_count", "confusion", "class_names"}`.
  """
  from transfer import data as data_lib
  params, meta = checkpoint.load_trained(workdir, step)
  run = meta["run"]
  config = ml_collections.ConfigDict(meta["config"])
  model = train.model_from_meta(run)
  mesh = parallel.make_mesh()
  ds = data_lib.create(config, preprocess_source=train._weights_source(run["weights"]) or "none")
  eval_step = train.make_eval_step(model, mesh, len(run["class_names"]), config.parallel)
  params = parallel.replicate(params, mesh)
  metrics = train._evaluate(eval_step, params, ds.eval_batches("val", config.batch_size), mesh)
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
  """Writes the confusion matrix as a PNG heat map."""
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
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def main(workdir: str, as_json: bool = False) -> dict[str, Any]:
  """CLI entry: print metrics (or one JSON object) and write `confusion.png` in the workdir."""
  result = evaluate_workdir(workdir)
  names = result["class_names"]
  confusion = result["confusion"][:len(names)]
  confusion = [row[:len(names)] for row in confusion]
  result["confusion"] = confusion
  if jax.process_index() == 0:
    result["confusion_png"] = plot_confusion(confusion, names,
                                             os.path.join(workdir, "confusion.png"))
  if as_json:
    print(json.dumps(result))
  else:
    print(f"step {result['step']}: val_loss {result['val_loss']:.4f}  "
          f"val_accuracy {result['val_accuracy']:.4f}  ({result['val_count']} examples)")
    print(format_confusion(confusion, names))
    print(f"confusion matrix plot: {result.get('confusion_png')}", file=sys.stderr)
  return result
