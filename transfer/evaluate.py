"""`transfer eval`: a trained run's validation metrics and confusion matrix.

The run is rebuilt from its checkpoint metadata (model, head, classes, preprocessing) and the
config stored with it, so the original config file is not needed. A run trained with
`ema_decay` > 0 is evaluated with its raw and its EMA params (`ema_val_loss`,
`ema_val_accuracy`). `--tta` averages the probabilities of each image and its mirror;
`--top_losses K` draws the K most confidently wrong validation images into `top_losses.png`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

import jax
import numpy as np

from transfer import ema, eval_loop, parallel, steps
from transfer.errors import UserError


TOP_LOSSES_FILE = "top_losses.png"


def evaluate_workdir(workdir: str, checkpoint: str | int | None = "latest", tta: bool = False,
                     top_losses: int = 0) -> dict[str, Any]:
  """Evaluates one checkpoint of `workdir` on its validation split.

  Args:
    workdir: the run directory (relative paths are to the current directory).
    checkpoint: "latest" (or None), "best" or a step (see `checkpoint.load_trained`).
    tta: average the probabilities of each image and its horizontal mirror.
    top_losses: > 0: also find the K most confidently wrong validation examples under the
      serving params (`ema.serving_variables`: the EMA when there is one), see
      `find_top_losses`.

  Returns:
    `{"step", "val_loss", "val_accuracy", "val_count", "confusion", "class_names", "tta"}`,
    plus `ema_val_loss` and `ema_val_accuracy` for a run with an EMA, and when asked
    `top_losses` (a list of `{"id", "path", "true", "pred", "prob_pred", "prob_true", "loss"}`;
    `path` is the image file, or the source's id for it when it has none) with
    `top_losses_images` (their uint8 images as evaluated, for `plot_top_losses`).
  """
  from transfer import assembly
  trained = assembly.Run.from_checkpoint(workdir, checkpoint, announce="eval")
  variables, mesh, config = trained.variables, trained.mesh, trained.config
  ds = trained.validation_data()
  if top_losses and jax.process_count() > 1:
    raise UserError("--top_losses runs on a single process; run transfer eval on one host")
  eval_step = trained.eval_step(tta=tta)
  batches = lambda: ds.eval_batches("val", config.batch_size)
  raw = parallel.replicate(ema.serving_variables(variables, use_ema=False), mesh)
  result = {"step": trained.step, **eval_loop.evaluate(eval_step, raw, batches(), mesh),
            "class_names": trained.metadata["class_names"], "tta": tta}
  serving = raw
  if trained.keeps_ema:
    serving = parallel.replicate(ema.serving_variables(variables), mesh)
    result.update(ema.metrics(eval_loop.evaluate(eval_step, serving, batches(), mesh)))
  if top_losses:
    probs_step = steps.make_probabilities_step(trained.model, mesh, tta=tta)
    probs, labels, ids = example_probabilities(probs_step, serving, batches(), mesh)
    top = find_top_losses(probs, labels, ids, top_losses)
    for item, path in zip(top, ds.example_paths("val", [t["id"] for t in top])):
      item["path"] = path
    result["top_losses"] = top
    result["top_losses_images"] = ds.eval_images("val", [t["id"] for t in top])
  return result


def example_probabilities(probs_step, variables, batches, mesh):
  """Per-example class probabilities over padded, masked batches (this process's rows).

  Returns:
    `(probs (N, C), labels (N,), ids (N,))` of the real examples, in order.
  """
  from transfer.data import prefetch_to_device
  out = []
  for batch in prefetch_to_device(batches, parallel.batch_sharding(mesh)):
    probs = np.asarray(jax.device_get(probs_step(variables, batch["image"])))
    mask = np.asarray(batch["mask"])
    out.append((probs[mask], np.asarray(batch["label"])[mask], np.asarray(batch["id"])[mask]))
  return tuple(np.concatenate(parts) for parts in zip(*out))


def find_top_losses(probs: np.ndarray, labels: np.ndarray, ids: np.ndarray,
                    k: int) -> list[dict[str, Any]]:
  """The `k` most confidently wrong examples: misclassified, highest loss (-log p(true)) first.

  fastai's `plot_top_losses` ranks every example by loss; only wrong ones are kept here, so a
  confident mistake is never crowded out by a right answer with a low margin. Fewer than `k`
  come back when fewer are wrong.
  """
  pred = np.argmax(probs, -1)
  true_p = probs[np.arange(len(labels)), labels]
  loss = -np.log(np.maximum(true_p, np.finfo(np.float32).tiny))
  wrong = np.flatnonzero(pred != labels)
  order = wrong[np.argsort(-loss[wrong], kind="stable")][:k]
  return [{"id": int(ids[i]), "true": int(labels[i]), "pred": int(pred[i]),
           "prob_pred": float(probs[i, pred[i]]), "prob_true": float(true_p[i]),
           "loss": float(loss[i])} for i in order]


def plot_top_losses(top: list[dict[str, Any]], images: np.ndarray, class_names, path: str) -> str:
  """A PNG grid of the examples in `top` (from `find_top_losses`): each image under its true
  and predicted class and their probabilities (written whole or not at all).

  Raises:
    OSError: the file cannot be written.
  """
  return _save_figure(top_losses_figure(top, images, class_names), path)


def top_losses_figure(top: list[dict[str, Any]], images: np.ndarray, class_names):
  """The matplotlib figure of `plot_top_losses`: one titled panel per example, in a grid."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = int(np.ceil(np.sqrt(len(top))))
  rows = int(np.ceil(len(top) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(2.5 * cols, 3.0 * rows + 0.4), squeeze=False,
                           layout="constrained")
  for ax in axes.flat:
    ax.axis("off")
  for ax, item, image in zip(axes.flat, top, images):
    ax.imshow(image)
    where = f"{_tail(item['path'], 30)}\n" if item.get("path") else ""
    ax.set_title(f"{where}true {class_names[item['true']][:14]} ({item['prob_true']:.2f})\n"
                 f"pred {class_names[item['pred']][:14]} ({item['prob_pred']:.2f})", fontsize=9)
  fig.suptitle("most confidently wrong: file, true (p), predicted (p)", fontsize=10)
  return fig


def _tail(path: str, width: int) -> str:
  """The end of `path` in `width` characters (the file name and its nearest folders)."""
  return path if len(path) <= width else "..." + path[-(width - 3):]


def format_top_losses(top: list[dict[str, Any]], class_names) -> str:
  """One line per example of `find_top_losses`: its path, true and predicted class and the
  predicted probability, so a mislabeled image can be found and fixed."""
  return "\n".join(f"{item['path']}  true {class_names[item['true']]}  predicted "
                   f"{class_names[item['pred']]} (p={item['prob_pred']:.3f})" for item in top)


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
  return _save_figure(fig, path)


def _save_figure(fig, path: str) -> str:
  """Writes `fig` as a PNG at `path` via a temporary file, then closes it."""
  import matplotlib.pyplot as plt
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


def main(workdir: str, as_json: bool = False, checkpoint: str | int | None = "latest",
         tta: bool = False, top_losses: int = 0) -> dict[str, Any]:
  """CLI entry: print metrics (or one JSON object) and write `confusion.png` in the workdir
  (and `top_losses.png` with `top_losses` > 0).

  The metrics are the result; the plots are by-products. A workdir that cannot be written
  (read-only mount, full disk) costs a one-line warning, never the metrics.
  """
  if top_losses < 0:
    raise UserError(f"--top_losses must be >= 0, got {top_losses}")
  result = evaluate_workdir(workdir, checkpoint, tta=tta, top_losses=top_losses)
  top_images = result.pop("top_losses_images", None)
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
    if top_losses:
      result["top_losses_png"] = _write_top_losses(result["top_losses"], top_images, names,
                                                   os.path.join(workdir, TOP_LOSSES_FILE))
  if as_json:
    print(json.dumps(result))
  else:
    tta_note = " (TTA: image + mirror)" if tta else ""
    print(f"step {result['step']}: val_loss {result['val_loss']:.4f}  "
          f"val_accuracy {result['val_accuracy']:.4f}  ({result['val_count']} examples)"
          f"{tta_note}")
    if "ema_val_accuracy" in result:
      print(f"  EMA params: val_loss {result['ema_val_loss']:.4f}  "
            f"val_accuracy {result['ema_val_accuracy']:.4f}")
    print(format_confusion(confusion, names))
    if result.get("confusion_png"):
      print(f"confusion matrix plot: {result['confusion_png']}", file=sys.stderr)
  if top_losses and not as_json and result["top_losses"]:
    print(f"top losses ({len(result['top_losses'])} most confidently wrong):")
    print(format_top_losses(result["top_losses"], names))
  if result.get("top_losses_png"):
    print(f"top losses plot: {result['top_losses_png']}", file=sys.stderr)
  return result


def _write_top_losses(top, images, class_names, path: str) -> str | None:
  """`plot_top_losses`, or None with a one-line note (nothing wrong, or the disk refused)."""
  if not top:
    print("transfer: no misclassified validation images: no top_losses plot", file=sys.stderr)
    return None
  try:
    return plot_top_losses(top, images, class_names, path)
  except OSError as e:
    print(f"transfer: warning: could not write {path} ({e.strerror or e}); "
          f"the metrics are reported all the same", file=sys.stderr)
    return None
