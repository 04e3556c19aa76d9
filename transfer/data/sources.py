"""Where examples come from: a uniform, random-access view of one split of one dataset.

Every source (image folder, TFDS, synthetic) is reduced to labels plus a function that opens
example i. Random access is what lets every process compute the same global permutation and read
only its own rows, and lets a resumed run jump straight to a step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Callable

import numpy as np
from PIL import Image

from transfer.data import images
from transfer.errors import UserError


@dataclasses.dataclass(frozen=True)
class Source:
  """One split before validation.

  Attributes:
    labels: int32 (N,) class ids.
    open_image: (index, min_side) -> RGB `PIL.Image`; may raise for a corrupt file.
    names: per-example names for warnings (file paths, `tfds:NAME/SPLIT#i`, ...).
    key: identity of the split's content, for the disk cache (changes when any file changes).
    trusted: False when examples may be unreadable, so each is decoded once before training.
  """
  labels: np.ndarray
  open_image: Callable[[int, int], Image.Image]
  names: tuple[str, ...]
  key: str
  trusted: bool

  def __len__(self) -> int:
    return len(self.labels)


def folder_sources(path: str, val_fraction: float) -> tuple[Source, Source, list[str]]:
  """Reads `PATH/<class>/*`, or `PATH/train/<class>/*` with `PATH/val/<class>/*` (or `validation/`).

  Without a separate validation folder, `val_fraction` of each class is held out. Which files are
  held out depends only on their names (ordered by a hash of the path), not on the seed, so
  changing the seed never moves validation images into training.

  Args:
    path: the dataset root.
    val_fraction: share of each class held out when there is no validation folder.

  Returns:
    (train, val, class_names).
  """
  if not os.path.isdir(path):
    raise UserError(f"dataset folder {path!r} does not exist")
  train_root = os.path.join(path, "train")
  val_root = next((os.path.join(path, d) for d in ("val", "validation")
                   if os.path.isdir(os.path.join(path, d))), None)
  if os.path.isdir(train_root) and val_root:
    class_names = _class_dirs(train_root)
    train = _list_files(train_root, class_names)
    val_classes = _class_dirs(val_root, min_classes=1)
    unknown = sorted(set(val_classes) - set(class_names))
    if unknown:
      raise UserError(f"{val_root} has classes missing from {train_root}: {unknown}")
    val = _list_files(val_root, val_classes, class_names)
  else:
    class_names = _class_dirs(path)
    train, val = _hold_out(_list_files(path, class_names), val_fraction)
  return _file_source(train), _file_source(val), class_names


def _class_dirs(root: str, min_classes: int = 2) -> list[str]:
  """Sorted class folder names under `root` (hidden folders ignored)."""
  names = sorted(d for d in os.listdir(root)
                 if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
  if len(names) < min_classes:
    found = f"only {names}" if names else "no class folders"
    raise UserError(f"{root} has {found}; expected one folder per class "
                    f"(at least {min_classes}), e.g. {root}/cat/*.jpg and {root}/dog/*.jpg")
  return names


def _list_files(root: str, classes: list[str], class_names: list[str] | None = None):
  """[(path, label)] of every non-hidden file under each class folder, in sorted order."""
  ids = {name: i for i, name in enumerate(class_names or classes)}
  files = []
  for name in classes:
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      found += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    if not found:
      raise UserError(f"class folder {os.path.join(root, name)} is empty")
    files += [(f, ids[name]) for f in found]
  return files


def _hold_out(files, fraction: float):
  """Splits [(path, label)] per class: the `fraction` with the smallest path hashes is held out."""
  if not 0.0 <= fraction < 1.0:
    raise UserError(f"val_fraction must be in [0, 1), got {fraction}")
  train, val = [], []
  for label in sorted({label for _, label in files}):
    group = [f for f in files if f[1] == label]
    by_hash = sorted(group, key=lambda f: hashlib.sha1(f[0].encode()).hexdigest())
    held = set(p for p, _ in by_hash[:int(round(fraction * len(group)))])
    train += [f for f in group if f[0] not in held]
    val += [f for f in group if f[0] in held]
  return train, val


def _file_source(files) -> Source:
  """A `Source` over [(path, label)]; its cache key covers each file's size and mtime."""
  paths = tuple(p for p, _ in files)
  digest = hashlib.sha1()
  for p in paths:
    st = os.stat(p)
    digest.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return Source(labels=np.asarray([label for _, label in files], np.int32),
                open_image=lambda i, side: images.open_file(paths[i], side),
                names=paths, key="folder:" + digest.hexdigest(), trusted=False)
