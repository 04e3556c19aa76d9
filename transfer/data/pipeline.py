"""`create`: the `Dataset` a config names, built and checked before anything compiles.

The dataset string picks the source (`synthetic`, `folder:PATH`, `tfds:NAME`); its examples are
checked (and cached) at the stored sizes the augmentation policy needs, and every way the data can
be wrong is a `UserError` here. The pieces live apart: `dataset` (the iterable splits),
`augmentation` (the policy), `pool` (host threads), `workers` (decoding), `store` (the image cache).
"""

from __future__ import annotations

import os

import numpy as np

from transfer import configs
from transfer.data import images, store, workers
from transfer.data.augmentation import AUGMENTS, stored_train_size
from transfer.data.dataset import Dataset, Origin, Split, check_batch_size
from transfer.data.sources import Source
from transfer.errors import UserError

CACHES = ("", "memory", "disk")


def create(config, *, preprocess_source: str | None, process_index: int | None = None,
           process_count: int | None = None) -> Dataset:
  """Builds the dataset named by `config.dataset`, checked and ready to iterate.

  Everything that can be wrong with the data (batch size, unknown dataset, empty or single class,
  unreadable files with `strict_data`) raises a `UserError` here, before any compilation.

  Args:
    config: the run config (keys: dataset, data_dir, train_split, val_split, val_fraction,
      labels_from, image_size, batch_size, augment, randaugment_*, eval_crop, train_crop,
      cache_images, cache_dir, strict_data, data_workers, data_worker_kind, prefetch, seed,
      synthetic.*); completed from the defaults and checked by `transfer.configs.validate`.
    preprocess_source: the run's parsed weights (`runs.weights_source`) or a preprocessing
      mode, which decides the pixel normalisation (`transfer.weights.preprocess.mode_for`);
      None for random initialisation.
    process_index, process_count: this process and the number of processes; default to JAX's.
      Tests pass them to simulate several hosts in one process.

  Returns:
    A `Dataset`.
  """
  configs.fill_defaults(config)  # a config handed in from Python may lack keys
  import jax  # Deferred so `import transfer.data` stays light; jax never imports TensorFlow.
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  local_devices = jax.local_device_count()
  check_batch_size(int(config.batch_size), process_count, local_devices)
  from transfer.weights.preprocess import mode_for
  preprocess_source = mode_for(preprocess_source)  # once: batches normalise by the mode name
  decoder = workers.Decoder(config.data_worker_kind, int(config.data_workers))  # checks; lazy
  train, val, class_names, origin = _sources(config)
  # The CLI, train and lr_find validate first; a config handed in from Python is checked here by
  # the same one validator, after the decoder and the sources have named their own argument
  # errors, before any image is read.
  configs.validate(config)

  cache = config.cache_images
  cache_dir = config.cache_dir or store.default_cache_dir()
  image_size, augment = int(config.image_size), config.augment
  train_crop = float(config.train_crop)
  train_size = stored_train_size(image_size, augment, train_crop)
  eval_size = images.stored_size(image_size, float(config.eval_crop))
  failed_train, cached_train = store.prepare(train, train_size, cache, cache_dir, decoder)
  failed_val, cached_val = store.prepare(val, eval_size, cache, cache_dir, decoder)
  skipped = ([(train.names[i], r) for i, r in sorted(failed_train.items())]
             + [(val.names[i], r) for i, r in sorted(failed_val.items())])
  if skipped and config.strict_data:
    listing = "; ".join(f"{name} ({reason})" for name, reason in skipped)
    raise UserError(f"{len(skipped)} unreadable image(s) with strict_data=True: {listing}")

  train_split = Split(train, failed_train, cached_train, train_size, decoder)
  val_split = Split(val, failed_val, cached_val, eval_size, decoder)
  _check_classes(train_split, class_names)
  if len(train_split) < int(config.batch_size):
    raise UserError(f"the train split has {len(train_split)} readable examples, fewer than "
                    f"batch_size {config.batch_size}")
  return Dataset(train_split, val_split, class_names, skipped, image_size=image_size,
                 batch_size=int(config.batch_size), augment=augment,
                 eval_crop=float(config.eval_crop), train_crop=train_crop, seed=int(config.seed),
                 preprocess_source=preprocess_source, process_index=process_index,
                 process_count=process_count, local_device_count=local_devices,
                 ahead=int(config.prefetch), origin=origin,
                 randaugment=(int(config.randaugment_n), float(config.randaugment_m)),
                 augment_threads=int(config.data_workers) or workers.default_count())


def _sources(config) -> tuple[Source, Source, list[str], Origin]:
  """(train, val, class_names, origin) for `config.dataset`."""
  kind, _, arg = str(config.dataset).partition(":")
  if kind == "synthetic" and not arg:
    from transfer.data.synthetic import synthetic_sources
    s = config.synthetic
    sizes = [int(s.num_classes), int(s.train_size), int(s.val_size), int(s.base_size)]
    params = ("num_classes={} train_size={} val_size={} base_size={}".format(*sizes)
              + f" seed={int(config.seed)}")
    return (*synthetic_sources(*sizes, int(config.seed)), Origin("synthetic", params=params))
  if kind == "folder" and arg:
    from transfer.data.sources import folder_sources
    found = folder_sources(os.path.expanduser(arg), float(config.val_fraction),
                           seed=int(config.seed), val_split=str(config.val_split),
                           labels_from=config.labels_from)
    return (found.train, found.val, found.class_names,
            Origin(f"folder:{found.root}", root=found.root, notes=tuple(found.notes)))
  if kind == "tfds" and arg:
    from transfer.data.tfds_source import tfds_sources  # The only path that imports TensorFlow.
    return (*tfds_sources(arg, data_dir=config.data_dir, train_split=config.train_split,
                          val_split=config.val_split, val_fraction=float(config.val_fraction),
                          cache_dir=config.cache_dir),
            Origin(f"tfds:{arg}"))
  raise UserError(f"unknown dataset {config.dataset!r}; expected tfds:NAME, folder:PATH or "
                  "synthetic")


def _check_classes(train: Split, class_names: list[str]) -> None:
  """Every class needs training examples, and there must be at least two classes."""
  if len(class_names) < 2:
    raise UserError(f"the dataset has {len(class_names)} class(es); classification needs two")
  counts = np.bincount(train.labels, minlength=len(class_names))
  empty = [class_names[c] for c in np.flatnonzero(counts == 0)]
  if empty:
    raise UserError(f"no readable training images for class(es) {empty}")
