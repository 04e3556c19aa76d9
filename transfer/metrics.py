"""A run's metrics on disk: `metrics.jsonl` (one JSON object per log or eval event), TensorBoard
events when `tensorboardX` is installed, and the `curves.png` plot.

A resumed run first drops the records logged after the checkpoint it resumes from, so the file
reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from typing import Any


class MetricsWriter:
  """Appends one JSON object per event to `metrics.jsonl` (process 0 only), and TensorBoard."""

  def __init__(self, workdir: str, resume_step: int, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not enabled:
      return
    truncate_after(self.path, resume_step)
    try:
      from tensorboardX import SummaryWriter  # optional
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      pass

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for k, v in record.items():
        if k not in ("step", "epoch") and isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, record["step"])

  def close(self):
    if self.tb is not None:
      self.tb.close()


def truncate_after(path: str, step: int) -> None:
  """Drops records past `step`: they were logged after the checkpoint a resume starts from.

  The file is replaced atomically, so an interruption leaves the old records, never half of them.
  """
  if not os.path.exists(path):
    return
  keep = [json.dumps(r) + "\n" for r in _records(path) if r.get("step", 0) <= step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of `WORKDIR/metrics.jsonl`."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return _records(path)


def _records(path: str) -> list[dict[str, Any]]:
  """Every complete JSON line (a process killed mid-write leaves a partial last line)."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        continue
  return records


def stage_starts(records: list[dict[str, Any]]) -> list[tuple[int, str]]:
  """`(step, stage name)` of each stage start a staged run logged (`event: stage_start`)."""
  return [(r["step"], r.get("stage", "")) for r in records if r.get("event") == "stage_start"]


def plot_curves(workdir: str) -> str | None:
  """Writes `curves.png` (loss and accuracy, train and val) from metrics.jsonl; a staged run's
  stage boundaries are dashed vertical lines, labelled with the stage that starts there."""
  records = read_metrics(workdir)
  if not records:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, metric in zip(axes, ("loss", "accuracy")):
    for split in ("train", "val"):
      points = [(r["step"], r[f"{split}_{metric}"]) for r in records if f"{split}_{metric}" in r]
      if points:
        ax.plot(*zip(*points), marker="." if split == "val" else None, label=split)
    for i, (step, name) in enumerate(stage_starts(records)):
      if i:  # the first stage starts at step 0, before the first logged point: no line
        ax.axvline(step, color="gray", linestyle="--", linewidth=1)
      ax.annotate(name, (step if i else 0.01, 1.0),
                  xycoords=("data" if i else "axes fraction", "axes fraction"), xytext=(3, -12),
                  textcoords="offset points", fontsize=8, color="gray")
    ax.set_xlabel("step")
    ax.set_title(metric)
    ax.legend()
  path = os.path.join(workdir, "curves.png")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path
