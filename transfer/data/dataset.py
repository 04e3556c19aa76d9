"""The `Dataset` the training loop iterates: deterministic, resumable, split over processes.

Every batch is a pure function of (seed, step): the epoch's order is a permutation drawn from
(seed, epoch) and each example's augmentation from (seed, epoch, example id). So a run resumed at
step k sees exactly the batches an uninterrupted run would have, and the result does not depend on
how many processes share the work: every process draws the same global permutation and keeps its
contiguous rows of each global batch. `transfer.data.create` builds one from the config.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterator

import numpy as np

from transfer.data import augmentation, identity, images, pool, workers
from transfer.data.sources import Source
from transfer.errors import UserError

# Stream tags keep the shuffle and augmentation generators apart: numpy's SeedSequence pads short
# keys with zeros, so (seed, epoch) and (seed, epoch, 0) would otherwise be the same stream.
_SHUFFLE, _AUGMENT = 1, 2
_LISTED_CLASSES, _LISTED_SKIPPED = 20, 5  # Names `describe` lists before "... and N more".


@functools.lru_cache(maxsize=4)
def permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the `n` training examples in `epoch`; identical on every process."""
  return np.random.default_rng((seed, _SHUFFLE, epoch)).permutation(n)


class Split:
  """The readable examples of one split, and their pixels at any size (cached or decoded)."""

  def __init__(self, source: Source, failed: dict[int, str], cached, cached_size: int,
               decoder: workers.Decoder):
    self._source = source
    self._index = np.delete(np.arange(len(source), dtype=np.int64),
                            np.fromiter(failed, np.int64, len(failed)))
    self._cached, self._cached_size, self._decoder = cached, cached_size, decoder
    self.labels = source.labels[self._index]

  def __len__(self) -> int:
    return len(self._index)

  @property
  def decoder(self) -> workers.Decoder:
    """The workers this split decodes on (shared with the other split)."""
    return self._decoder

  def close(self) -> None:
    """Stops the decode workers this split shares with the other."""
    self._decoder.close()

  def names(self) -> list[str]:
    """The location-independent names of the readable examples, in order."""
    names = self._source.identities()
    return [names[i] for i in self._index]

  def paths(self, rows) -> list[str]:
    """Where the examples `rows` come from, as a user finds them: a file's absolute path, else
    the source's id for it (`tfds:NAME/SPLIT#i`, ...)."""
    names = self._source.names
    return [names[i] for i in self._index[np.asarray(rows, np.int64)]]

  def images(self, rows: np.ndarray, size: int) -> np.ndarray:
    """uint8 (len(rows), size, size, 3) for the split's examples `rows`."""
    idx = self._index[rows]
    if self._cached is not None and size == self._cached_size:
      return np.asarray(self._cached[idx])
    if not len(idx):
      return np.zeros((0, size, size, 3), np.uint8)
    out = self._decoder.try_images((self._source.job(i) for i in idx), size)
    return np.stack([self._check(img, i) for img, i in zip(out, idx)])

  def _check(self, img, i: int) -> np.ndarray:
    """The decoded image, or a one-line error for a file that broke after the start."""
    if isinstance(img, Exception):  # Only an untrusted-but-unchecked source can get here.
      raise UserError(f"cannot decode {self._source.names[i]} ({img}); it was readable when the "
                      "run started: restore the file, then rerun to resume") from img
    return img


@dataclasses.dataclass(frozen=True)
class Origin:
  """Where a dataset's examples come from, as `Dataset.identity` records it.

  Attributes:
    dataset: canonical dataset string: `folder:/abs/root`, `tfds:NAME`, `synthetic`.
    root: a folder's absolute root, else "".
    params: what else decides the examples (synthetic data's parameters), else "".
    notes: what the source ignored on purpose (a `test/` folder, loose files), one line each.
  """
  dataset: str
  root: str = ""
  params: str = ""
  notes: tuple[str, ...] = ()


class Dataset:
  """Train and validation splits, batched for this process. Build it with `create`.

  Attributes:
    class_names: one name per class id.
    num_classes, num_train, num_val: counts after unreadable files were dropped (num_val may be
      0: no validation data, and `eval_batches("val")` yields nothing).
    skipped: [(name, reason)] of the files that were dropped.
    notes: what the source ignored on purpose, one line each (also in `describe()`).
    dataset, root: the canonical dataset string and a folder's absolute root ("" otherwise).
    batch_size: the global batch size; local_batch_size is this process's share.
    steps_per_epoch: num_train // batch_size (the train remainder is dropped each epoch).
    image_size: side of the output images.
  """

  def __init__(self, train: Split, val: Split, class_names: list[str],
               skipped: list[tuple[str, str]], *, image_size: int, batch_size: int,
               augment: str, eval_crop: float, train_crop: float, seed: int,
               preprocess_source: str | None, process_index: int, process_count: int,
               local_device_count: int, ahead: int, origin: Origin | None = None,
               randaugment: tuple[int, float] = (2, 9.0),
               augment_threads: int = 1):
    self._splits = {"train": train, "val": val}
    self._origin = origin or Origin(dataset="")
    self.dataset, self.root = self._origin.dataset, self._origin.root
    self.notes = list(self._origin.notes)
    self.class_names = list(class_names)
    self.num_classes = len(class_names)
    self.num_train, self.num_val = len(train), len(val)
    self.skipped = skipped
    self.image_size = image_size
    self.batch_size = batch_size
    self.process_index, self.process_count = process_index, process_count
    self._local_devices = local_device_count
    self.local_batch_size = batch_size // process_count
    self.steps_per_epoch = self.num_train // batch_size
    self.augment, self.seed = augment, seed
    self._randaugment = (int(randaugment[0]), float(randaugment[1]))
    # Augments a batch's examples in parallel (PIL releases the GIL); started on first use.
    self._augment_pool = pool.LazyThreadPool(augment_threads, "transfer-augment")
    self._preprocess_source = preprocess_source
    self._train_size = augmentation.stored_train_size(image_size, augment, train_crop)
    self._eval_size = images.stored_size(image_size, eval_crop)
    self._ahead = max(1, ahead)

  def describe(self) -> str:
    """One line for the start of training: sizes, classes with their training counts, steps,
    the skipped files and what the source ignored, so a wrong layout shows before any compiling.

    E.g. `1600 train / 400 val examples; 2 classes: cat 800, dog 800; 50 steps per epoch of 32`.
    """
    counts = np.bincount(self._splits["train"].labels, minlength=self.num_classes)
    classes = ", ".join(f"{name} {n}" for name, n in
                        zip(self.class_names[:_LISTED_CLASSES], counts))
    val = f"{self.num_val} val" if self.num_val else "no val"
    parts = [f"{self.num_train} train / {val} examples",
             f"{self.num_classes} classes: {classes}{_more(self.class_names, _LISTED_CLASSES)}",
             f"{self.steps_per_epoch} steps per epoch of {self.batch_size}"]
    if self.skipped:
      shown = [self._display(name) for name, _ in self.skipped[:_LISTED_SKIPPED]]
      parts.append(f"{len(self.skipped)} unreadable file(s) skipped: {', '.join(shown)}"
                   f"{_more(self.skipped, _LISTED_SKIPPED)}")
    return "; ".join(parts + self.notes)

  def _display(self, name: str) -> str:
    """A file's name relative to the dataset root when it lies under it."""
    prefix = self.root.rstrip(os.sep) + os.sep
    return name[len(prefix):] if self.root and name.startswith(prefix) else name

  def identity(self) -> dict:
    """What `transfer.data.check_same_data` compares: this data's JSON-able record.

    Returns:
      {"dataset": canonical string, "root": absolute folder root or "", "fingerprint": hex
       digest of the class names and each split's readable examples (location-independent name,
       label) in order, "num_train", "num_val", "class_names", "params",
       "split_fingerprints": {"train", "val"}}. See `transfer.data.identity`.
    """
    splits = {name: (split.names(), split.labels) for name, split in self._splits.items()}
    return identity.make_identity(self.dataset, self.root, self.class_names, self._origin.params,
                                  splits)

  def close(self) -> None:
    """Stops the decode workers (worker processes exit) and the augmentation threads; iterating
    again restarts them."""
    self._splits["train"].close()
    self._augment_pool.close()

  def position(self, step: int) -> dict[str, int]:
    """Where training step `step` lies: {"epoch": e, "index": batch index within the epoch}."""
    return {"epoch": step // self.steps_per_epoch, "index": step % self.steps_per_epoch}

  def step_of(self, position: dict[str, int]) -> int:
    """The inverse of `position`."""
    return position["epoch"] * self.steps_per_epoch + position["index"]

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's share of the global training batch of `step` (a pure function of it).

    Returns:
      {"image": float32 (local_batch, S, S, 3) preprocessed, "label": int32 (local_batch,),
       "id": int32 (local_batch,) the examples' indices in the train split}.
    """
    epoch, index = step // self.steps_per_epoch, step % self.steps_per_epoch
    start = index * self.batch_size + self.process_index * self.local_batch_size
    ids = permutation(self.seed, epoch, self.num_train)[start:start + self.local_batch_size]
    train = self._splits["train"]
    stored = train.images(ids, self._train_size)
    if self.augment != "none" or self._train_size != self.image_size:
      # Augmentation (and normalisation) per example, in parallel: both are elementwise per
      # example (the same bits as batched), and together they are the pipeline's main cost
      # (docs/BENCHMARKS.md, "Augmentation on the host"). Worker processes augment where they
      # decode, so augmentation scales with cores as decoding does; the float normalisation stays
      # here (it needs `transfer.weights`, which the workers never import).
      if train.decoder.kind == "process":
        n = len(ids)
        keys = [(self.seed, _AUGMENT, epoch, int(i)) for i in ids]
        augmented = train.decoder.run(augmentation.augment_example, list(stored),
                                      [self.augment] * n, [self.image_size] * n, keys,
                                      [self._randaugment] * n)
        image = _preprocess(np.stack(augmented), self._preprocess_source)
      else:
        one = lambda img, i: _preprocess(self._augment_one(img, epoch, i)[None],
                                        self._preprocess_source)[0]
        image = np.stack(self._augment_pool.map(one, stored, ids))
    else:
      image = _preprocess(stored, self._preprocess_source)
    return {"image": image, "label": train.labels[ids].astype(np.int32),
            "id": ids.astype(np.int32)}

  def _augment_one(self, image: np.ndarray, epoch: int, example_id: int) -> np.ndarray:
    """One example's augmentation: a pure function of (seed, epoch, example id) and its pixels."""
    return augmentation.augment_example(image, self.augment, self.image_size,
                                        (self.seed, _AUGMENT, epoch, int(example_id)),
                                        self._randaugment)

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Training batches from `start_step` on, forever (epoch after epoch).

    Batches are assembled `ahead` steps in advance on background threads, so decoding overlaps
    the device's work.

    Args:
      start_step: the first step to produce; a resumed run passes its checkpoint's step.

    Yields:
      `train_batch(step)` for step = start_step, start_step + 1, ...
    """
    steps = iter(range(start_step, 2**62))
    return pool.run_ahead(lambda: (functools.partial(self.train_batch, s) for s in steps),
                          self._ahead)

  def eval_batches(self, split: str = "val",
                   batch_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over a split without augmentation, for evaluation.

    The last global batch is padded; "mask" is False on padding, so summing masked metrics over
    all batches and processes counts every example exactly once.

    Args:
      split: "val" or "train" (the train set, e.g. to compute backbone features once).
      batch_size: global batch size; defaults to the training batch size.

    Yields:
      {"image": float32 (local_batch, S, S, 3), "label": int32, "id": int32 (-1 on padding),
       "mask": bool}, each (local_batch,) except image.
    """
    if split not in self._splits:
      raise UserError(f"unknown split {split!r}; expected one of {sorted(self._splits)}")
    batch_size = batch_size or self.batch_size
    check_batch_size(batch_size, self.process_count, self._local_devices)
    n = len(self._splits[split])
    num_batches = -(-n // batch_size)
    make = lambda k: functools.partial(self._eval_batch, split, k, batch_size)
    return pool.run_ahead(lambda: (make(k) for k in range(num_batches)), self._ahead)

  def example_paths(self, split: str, rows) -> list[str]:
    """The file paths (or source ids) of the split's examples `rows` (`Split.paths`)."""
    return self._splits[split].paths(rows)

  def eval_images(self, split: str, rows: np.ndarray) -> np.ndarray:
    """uint8 (len(rows), S, S, 3) of the split's examples `rows` in the eval geometry (resize,
    centre crop), before preprocessing: what evaluation sees, for display."""
    data = self._splits[split]
    return images.center_crop(data.images(np.asarray(rows, np.int64), self._eval_size),
                              self.image_size)

  def _eval_batch(self, split: str, k: int, batch_size: int) -> dict[str, np.ndarray]:
    """Batch `k` of an ordered pass over `split`, this process's rows, padded and masked."""
    data = self._splits[split]
    local = batch_size // self.process_count
    rows = k * batch_size + self.process_index * local + np.arange(local)
    mask = rows < len(data)
    real = rows[mask]
    stored = self.eval_images(split, real)
    image = np.zeros((local,) + stored.shape[1:], np.uint8)
    image[:len(real)] = stored
    label = np.zeros(local, np.int32)
    label[:len(real)] = data.labels[real]
    ids = np.where(mask, rows, -1).astype(np.int32)
    return {"image": _preprocess(image, self._preprocess_source), "label": label, "id": ids,
            "mask": mask}


def check_batch_size(batch_size: int, process_count: int, local_devices: int) -> None:
  """Fails unless the global batch splits evenly over processes and each process's devices."""
  from transfer import parallel  # the one check; deferred: it imports jax
  parallel.check_batch_size(batch_size, process_count=process_count, local_devices=local_devices)


def _preprocess(images_u8: np.ndarray, source: str | None) -> np.ndarray:
  """The weights' pixel normalisation. Imported here, not at the top: the `transfer.weights`
  package imports JAX, which decode worker processes (they import this package) never need."""
  from transfer.weights.preprocess import preprocess
  return preprocess(images_u8, source)


def _more(items: list, shown: int) -> str:
  """", ... and N more" when `items` is longer than the `shown` listed."""
  return f", ... and {len(items) - shown} more" if len(items) > shown else ""
