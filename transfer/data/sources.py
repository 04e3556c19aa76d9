"""Where examples come from: a uniform, random-access view of one split of one dataset.

Every source (image folder, TFDS, synthetic) is reduced to labels plus a function that opens
example i. Random access is what lets every process compute the same global permutation and read
only its own rows, and lets a resumed run jump straight to a step.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import hashlib
import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from transfer.data import images
from transfer.errors import UserError


@dataclasses.dataclass(frozen=True)
class Source:
  """One split before validation.

  Attributes:
    labels: int32 (N,) class ids.
    job: index -> `workers.Job`, (function, args) with function(*args, min_side) -> the RGB
      `PIL.Image` (it may raise for a corrupt file). A module-level function and small
      picklable args (a path, a record's bytes), so a worker process can run it.
    names: per-example names for warnings (absolute file paths, `tfds:NAME/SPLIT#i`, ...); any
      sequence (`IndexNames` spells them on demand for a large split).
    key: identity of the split's content, for the disk cache (changes when any file changes).
    trusted: False when examples may be unreadable, so each is decoded once before training.
    rel_names: per-example names that do not depend on where the data lives (a file's path
      relative to the dataset root, `/`-separated); empty when `names` already are. The data's
      fingerprint covers these, so a copied or re-mounted folder keeps it.
  """
  labels: np.ndarray
  job: Callable[[int], tuple[Callable[..., Image.Image], tuple]]
  names: Sequence[str]
  key: str
  trusted: bool
  rel_names: tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.labels)

  def identities(self) -> Sequence[str]:
    """The location-independent name of every example (`rel_names`, else `names`)."""
    return self.rel_names or self.names

  def open_image(self, i: int, min_side: int = 0) -> Image.Image:
    """Decodes example `i` here, in this thread (see `job`)."""
    fn, args = self.job(i)
    return fn(*args, min_side)


class IndexNames(collections.abc.Sequence):
  """`PREFIX#0`, `PREFIX#1`, ...: the names of a split's examples, spelled only when asked, so a
  split of millions holds no list of millions of strings."""

  def __init__(self, prefix: str, n: int):
    self._prefix, self._n = prefix, n

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(self._n))]
    i = int(i)
    if not -self._n <= i < self._n:
      raise IndexError(i)
    return f"{self._prefix}#{i % self._n}"


LABELS_FROM = ("folders", "filename")
VAL_FOLDERS = ("val", "valid", "validation")  # Recognised beside `train/`, in this order.
_SHOWN = 5  # File or folder names quoted in one note.


@dataclasses.dataclass(frozen=True)
class Folder:
  """What `folder_sources` found: the two splits, the classes, and what it chose to ignore.

  Attributes:
    train, val: the splits (val may be empty).
    class_names: sorted class names; label i is class_names[i].
    root: the dataset root as an absolute path with symbolic links resolved.
    notes: one line per thing ignored on purpose (a `test/` folder, loose files), for the log.
  """
  train: Source
  val: Source
  class_names: list[str]
  root: str
  notes: list[str]


def folder_sources(path: str, val_fraction: float, *, seed: int = 0,
                   val_split: str = "validation", labels_from: str = "folders") -> Folder:
  """Reads an image folder in any of the common layouts.

  Layouts (`labels_from="folders"`, the default):
    PATH/<class>/*                        `val_fraction` of each class is held out
    PATH/train/<class>/*                  the same, from train/
    PATH/train/<class>/* + PATH/val/<class>/*   also `valid/` or `validation/`
  With `labels_from="filename"` the label is a file's name up to its first `.` and the files
  sit directly in PATH/ or PATH/train/ (and PATH/val/): Kaggle's `train/cat.0.jpg`. Names must
  look like LABEL.ID.EXT; other files are ignored with a note. Underscores are not separators,
  because class names often contain them (Oxford pets' `great_pyrenees_10.jpg`).

  A `test/` folder is never a class and never trained on: it is ignored with a note unless
  `val_split="test"` names it as the validation split (PATH/test/<class>/*). Other folders beside
  `train/` and files beside class folders are ignored with a note too.

  The root is resolved with `os.path.realpath`, so every spelling of it (relative, `./x`,
  absolute, through a symbolic link) gives the same dataset, from any working directory. Which
  files are held out is a function of (each file's path relative to the root, `seed`) only: per
  class, the `round(val_fraction * n)` files with the smallest sha1 of "seed NUL path" (never all
  of a class). So the split survives moving the folder, and a run and its resume or `eval` agree.

  Args:
    path: the dataset root.
    val_fraction: share of each class held out when there is no validation folder.
    seed: mixed into the hold-out order.
    val_split: "test" validates on PATH/test/; another name of a folder beside train/ picks it
      (when several of val/, valid/, validation/ exist); a name with no folder (the default
      "validation", or a TFDS split like "train[80%:]") means "hold out `val_fraction`".
    labels_from: "folders" or "filename" (see above).

  Returns:
    A `Folder`.
  """
  root = os.path.realpath(path)
  if not os.path.isdir(root):
    raise UserError(f"dataset folder {path!r} does not exist")
  if labels_from not in LABELS_FROM:
    raise UserError(f"unknown labels_from {labels_from!r}; expected one of {LABELS_FROM}")
  notes: list[str] = []
  dirs = _subdirs(root)
  has_train = "train" in dirs
  val_dir = _val_dir(root, dirs, val_split, has_train)
  if "test" in dirs and val_dir != "test":
    notes.append(f"{_join(root, 'test')} ignored: a test split is never trained on "
                 "(val_split=test validates on it)")
  if has_train:
    other = [d + "/" for d in dirs if d not in ("train", val_dir, "test")] + _files(root)
    if other:
      notes.append(f"ignored beside {_join(root, 'train')}: {_some(other)}")
    train = _labelled(root, "train", labels_from, notes)
  else:
    train = _labelled(root, "", labels_from, notes, skip={"test"})
  class_names = sorted({c for _, c in train})
  if val_dir:
    val = _labelled(root, val_dir, labels_from, notes, min_classes=1)
    unknown = sorted({c for _, c in val} - set(class_names))
    if unknown:
      raise UserError(f"{_join(root, val_dir)} has classes missing from the training images: "
                      f"{unknown}")
  else:
    if val_split not in VAL_FOLDERS and val_fraction > 0:
      notes.append(f"no {val_split!r} folder in {root}: validating on {val_fraction:.0%} of "
                   "each class, held out of the training images")
    train, val = _hold_out(train, val_fraction, seed)
  ids = {name: i for i, name in enumerate(class_names)}
  source = lambda files: _file_source(root, [(rel, ids[c]) for rel, c in files])
  return Folder(source(train), source(val), class_names, root, notes)


def _val_dir(root: str, dirs: list[str], val_split: str, has_train: bool) -> str:
  """The folder (a name in `dirs`) that holds the validation split, or "" to hold out."""
  if val_split == "test":
    if "test" not in dirs:
      raise UserError(f"val_split='test' but {_join(root, 'test')} does not exist; use the "
                      "default val_split to hold out part of the training images")
    return "test"
  if not has_train:
    return ""
  if val_split in dirs and val_split != "train":
    return val_split
  present = [d for d in VAL_FOLDERS if d in dirs]
  if len(present) > 1:
    raise UserError(f"{root} has several validation folders {present}; set val_split to the "
                    "one to use")
  return present[0] if present else ""


def _labelled(root: str, sub: str, labels_from: str, notes: list[str],
              skip: frozenset[str] | set[str] = frozenset(), min_classes: int = 2):
  """[(path relative to root, class name)] of the examples in `root/sub`, in sorted order."""
  folder = _join(root, sub)
  classes = [d for d in _subdirs(folder) if d not in skip]
  loose = _files(folder)
  if labels_from == "filename":
    return _labels_from_names(root, sub, loose, classes, notes)
  if len(classes) < min_classes:
    if loose and not classes and any(images.is_image_name(f) for f in loose):
      raise UserError(f"{folder} has image files but no class folders; for names like "
                      f"cat.0.jpg set --config.labels_from=filename, else move them into "
                      f"{folder}/<class>/")
    found = f"only {classes}" if classes else "no class folders"
    raise UserError(f"{folder} has {found}; expected one folder per class "
                    f"(at least {min_classes}), e.g. {folder}/cat/*.jpg and {folder}/dog/*.jpg")
  if loose:
    notes.append(f"{len(loose)} file(s) directly in {folder} ignored (not in a class folder): "
                 f"{_some(loose)}")
  files = []
  for name in classes:
    found = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(folder, name)):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      found += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    if not found:
      raise UserError(f"class folder {os.path.join(folder, name)} is empty")
    files += [(_relative(f, root), name) for f in found]
  return files


def _labels_from_names(root: str, sub: str, loose: list[str], folders: list[str],
                       notes: list[str]):
  """[(relative path, label)] of the files in `root/sub` named LABEL.ID.EXT."""
  folder = _join(root, sub)
  files, unnamed = [], []
  for name in loose:
    label, _, rest = name.partition(".")
    if label and "." in rest:
      files.append((_relative(os.path.join(folder, name), root), label))
    else:
      unnamed.append(name)
  if not files:
    also = f"; it has folders {_some(folders)}: for one folder per class set " \
           "--config.labels_from=folders" if folders else ""
    raise UserError(f"{folder} has no files named LABEL.ID.EXT (e.g. cat.0.jpg) for "
                    f"labels_from=filename{also}")
  if unnamed:
    notes.append(f"{len(unnamed)} file(s) in {folder} ignored: labels_from=filename needs names "
                 f"like cat.0.jpg: {_some(unnamed)}")
  if folders:
    notes.append(f"folders in {folder} ignored with labels_from=filename: "
                 f"{_some([d + '/' for d in folders])}")
  return files


def _hold_out(files, fraction: float, seed: int):
  """Splits [(relative path, class)] per class into (train, val), keeping the listing order."""
  if not 0.0 <= fraction < 1.0:
    raise UserError(f"val_fraction must be in [0, 1), got {fraction}")
  groups = collections.defaultdict(list)
  for rel, name in files:
    groups[name].append(rel)
  held = set()
  for group in groups.values():
    order = sorted(group, key=lambda rel: hashlib.sha1(f"{seed}\0{rel}".encode()).hexdigest())
    held.update(order[:min(int(round(fraction * len(group))), len(group) - 1)])
  return [f for f in files if f[0] not in held], [f for f in files if f[0] in held]


def _file_source(root: str, files) -> Source:
  """A `Source` over [(path relative to root, label)]; its cache key covers sizes and mtimes."""
  rel_names = tuple(rel for rel, _ in files)
  paths = tuple(os.path.join(root, *rel.split("/")) for rel in rel_names)
  digest = hashlib.sha1()
  for p in paths:
    try:
      st = os.stat(p)
      digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:  # A dangling link: decoding fails later and skips (or, strictly, rejects) it.
      digest.update(f"{p}\0unreadable\n".encode())
  return Source(labels=np.asarray([label for _, label in files], np.int32),
                job=lambda i: (open_path, (paths[i],)),
                names=paths, key="folder:" + digest.hexdigest(), trusted=False,
                rel_names=rel_names)


def open_path(path: str, side: int) -> Image.Image:
  """Decodes one file; a dangling symbolic link says so rather than "no such file"."""
  try:
    return images.open_file(path, side)
  except FileNotFoundError:
    if os.path.islink(path):
      raise FileNotFoundError(f"dangling symbolic link to {os.readlink(path)}") from None
    raise


def _subdirs(folder: str) -> list[str]:
  """Sorted names of the non-hidden folders in `folder`."""
  return sorted(d for d in os.listdir(folder)
                if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))


def _files(folder: str) -> list[str]:
  """Sorted names of the non-hidden entries of `folder` that are not folders, dangling links too."""
  return sorted(f for f in os.listdir(folder)
                if not f.startswith(".") and not os.path.isdir(os.path.join(folder, f)))


def _join(root: str, sub: str) -> str:
  """`root/sub`, or `root` itself for sub == ""."""
  return os.path.join(root, sub) if sub else root


def _relative(path: str, root: str) -> str:
  """`path` relative to `root`, `/`-separated on every platform."""
  return os.path.relpath(path, root).replace(os.sep, "/")


def _some(names: list[str]) -> str:
  """The first few names, and how many more."""
  more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
  return ", ".join(names[:_SHOWN]) + more
