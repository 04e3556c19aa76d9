"""Which data a run saw: a fingerprint that survives moving the data, and the check that uses it.

A run records `Dataset.identity()`; resuming or evaluating it compares that record with the data
at hand through `check_same_data`, so a run is never silently continued on other images. The
fingerprint covers the class names and, for each split in order, every example's
location-independent name (a file's path relative to the dataset root, `tfds:NAME/SPLIT#i`, ...)
and label, plus the parameters of generated data. It leaves out absolute paths, sizes and mtimes:
a copied, re-mounted or differently spelled folder keeps its fingerprint, while adding, removing,
renaming or relabelling a file, or moving one between train and val, changes it. Editing a file's
pixels in place under the same name does not.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

from transfer.errors import UserError

_VERSION = "transfer-data-v1"  # Part of every digest, so a future scheme never matches this one.
_SPLITS = ("train", "val")
_LISTED = 8  # Class lists up to this long are quoted whole in a message.


def split_fingerprint(names: Sequence[str], labels: Sequence[int]) -> str:
  """The hex digest of one split: its examples' (name, label) in order."""
  digest = hashlib.sha256(_VERSION.encode())
  for name, label in zip(names, labels):
    digest.update(f"\n{name}\0{int(label)}".encode())
  return digest.hexdigest()


def make_identity(dataset: str, root: str, class_names: Sequence[str], params: str,
                  splits: dict[str, tuple[Sequence[str], Sequence[int]]]) -> dict:
  """The JSON-able record of a dataset that `check_same_data` compares.

  Args:
    dataset: the canonical dataset string (`folder:/abs/root`, `tfds:NAME`, `synthetic`).
    root: the folder's absolute root, or "".
    class_names: one name per class id.
    params: what else decides the examples (synthetic data's parameters), or "".
    splits: {"train": (names, labels), "val": (names, labels)} of the examples used.

  Returns:
    {"dataset", "root", "fingerprint", "num_train", "num_val", "class_names", "params",
     "split_fingerprints": {"train", "val"}}.
  """
  per_split = {s: split_fingerprint(*splits[s]) for s in _SPLITS}
  whole = json.dumps({"version": _VERSION, "classes": list(class_names), "params": params,
                      "splits": per_split}, sort_keys=True)
  return {"dataset": dataset, "root": root,
          "fingerprint": hashlib.sha256(whole.encode()).hexdigest(),
          "num_train": len(splits["train"][0]), "num_val": len(splits["val"][0]),
          "class_names": list(class_names), "params": params, "split_fingerprints": per_split}


def check_same_data(saved: dict | None, current: dict, what: str, hint: str | None = None) -> None:
  """Refuses to go on when the data differs from the data a run recorded.

  The fingerprints alone decide: the same files under another root (a copy, another spelling of
  the path) pass; other files under the same root do not.

  Args:
    saved: the run's `Dataset.identity()`; None or {} (a run from before fingerprints) passes.
    current: `Dataset.identity()` of the data at hand.
    what: what is being done, for the message: "resume of /path/to/workdir", "eval".
    hint: the way forward; defaults to using the run's data or a fresh workdir.

  Raises:
    UserError: one line naming what changed (counts, classes, root, files) and the way forward.
  """
  if not saved or not saved.get("fingerprint") or saved["fingerprint"] == current["fingerprint"]:
    return
  hint = hint or (f"point --config.dataset at the data the run was trained on "
                  f"({saved.get('dataset', '?')}), or use a fresh workdir to train on this data")
  raise UserError(f"{what}: the data differs from the run's ({'; '.join(_changes(saved, current))})"
                  f"; {hint}")


def _changes(saved: dict, current: dict) -> list[str]:
  """What differs between two identities with different fingerprints, most telling first."""
  changes = []
  before, after = saved.get("dataset", ""), current.get("dataset", "")
  if before != after and not (before.startswith("folder:") and after.startswith("folder:")):
    changes.append(f"dataset {before} -> {after}")
  if saved.get("params", "") != current.get("params", ""):
    changes.append(f"parameters {saved.get('params', '')} -> {current.get('params', '')}")
  if saved.get("class_names") is not None and saved["class_names"] != current["class_names"]:
    changes.append(_class_change(list(saved["class_names"]), list(current["class_names"])))
  for split in _SPLITS:
    key = f"num_{split}"
    if key in saved and saved[key] != current[key]:
      changes.append(f"{split}: {saved[key]} -> {current[key]} examples")
  if not changes:
    saved_splits = saved.get("split_fingerprints") or {}
    changes = [f"{split}: other files, same count ({current[f'num_{split}']})"
               for split in _SPLITS
               if saved_splits.get(split, "") != current["split_fingerprints"][split]]
    changes = changes or ["other files"]
  if saved.get("root") and current.get("root") and saved["root"] != current["root"]:
    changes.insert(0, f"root {saved['root']} -> {current['root']} with different files")
  return changes


def _class_change(before: list[str], after: list[str]) -> str:
  """`classes [...] -> [...]` for short lists, else what was added and removed."""
  if len(before) <= _LISTED and len(after) <= _LISTED:
    return f"classes {before} -> {after}"
  added = [c for c in after if c not in set(before)]
  removed = [c for c in before if c not in set(after)]
  if not added and not removed:
    return f"classes in another order ({len(after)} classes)"
  parts = [f"added {added[:_LISTED]}" if added else "", f"removed {removed[:_LISTED]}"
           if removed else ""]
  return f"classes {len(before)} -> {len(after)}: " + ", ".join(p for p in parts if p)
