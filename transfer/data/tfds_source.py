"""TensorFlow Datasets as a random-access source; the only module that imports TensorFlow.

tf.data reads each split's records once (in order, AUTOTUNE parallelism) and keeps the encoded
images in host memory, which is about the dataset's size on disk. Decoding and resizing then go
through the same thread pool as image folders. Holding the encoded bytes is what gives random
access: every process can compute the same global permutation, read only its rows, and a resumed
run can start at any step, none of which a streaming `shuffle` buffer allows.
"""

from __future__ import annotations

import difflib
import re

import numpy as np

from transfer.data import images
from transfer.data.sources import Source
from transfer.errors import UserError


def tfds_sources(name: str, *, data_dir: str, train_split: str, val_split: str,
                 val_fraction: float) -> tuple[Source, Source, list[str]]:
  """Loads (downloading and preparing if needed) a TFDS image classification dataset.

  Args:
    name: TFDS name, optionally with config and version (`oxford_iiit_pet:4.*.*`).
    data_dir: TFDS data_dir ("" = the TFDS default, usually ~/tensorflow_datasets).
    train_split: split for training; may use TFDS slicing (`train[:90%]`).
    val_split: validation split. When the dataset has no such split (cats_vs_dogs has only
      `train`), the last `val_fraction` of `train_split` is held out instead.
    val_fraction: see `val_split`.

  Returns:
    (train, val, class_names).
  """
  tf, tfds = _import_tf()
  builder = _builder(tfds, name, data_dir)
  _prepare(builder, name, data_dir)
  image_key, label_key = builder.info.supervised_keys or ("image", "label")
  label_feature = builder.info.features[label_key]
  if not hasattr(label_feature, "names"):
    raise UserError(f"tfds:{name} has no class labels in {label_key!r}; not a classification set")
  train_split, val_split = _splits(builder, train_split, val_split, val_fraction)
  read = lambda split: _read_split(tf, tfds, builder, split, image_key, label_key, name)
  return read(train_split), read(val_split), list(label_feature.names)


def _import_tf():
  """Imports TensorFlow without letting it reserve accelerator memory that JAX needs."""
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF was initialised elsewhere first; its devices can no longer change.
    pass
  import tensorflow_datasets as tfds
  return tf, tfds


def _builder(tfds, name: str, data_dir: str):
  """The dataset builder; an unknown name suggests the closest registered ones."""
  try:
    return tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    base = name.split(":")[0].split("/")[0]
    close = difflib.get_close_matches(base, tfds.list_builders(), n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else \
        " (see https://www.tensorflow.org/datasets/catalog)"
    raise UserError(f"unknown TFDS dataset {name!r}{hint}") from None


def _prepare(builder, name: str, data_dir: str) -> None:
  """Downloads and prepares the dataset if it is not there yet, with one actionable error."""
  try:
    builder.download_and_prepare()
  except Exception as e:  # Network, manual-download and disk errors all need the same advice.
    where = data_dir or "~/tensorflow_datasets"
    raise UserError(
        f"could not download or prepare tfds:{name} into {where} ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}). On a machine with network run "
        f"`python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{name}', data_dir='DIR').download_and_prepare()\"`, copy DIR here and "
        f"set --config.data_dir=DIR") from None


def _splits(builder, train_split: str, val_split: str, val_fraction: float) -> tuple[str, str]:
  """The train and validation split strings, slicing `train_split` when there is no val split."""
  known = set(builder.info.splits.keys())
  base = lambda s: re.split(r"[\[+]", s, maxsplit=1)[0]
  if val_split and base(val_split) in known:
    return train_split, val_split
  if "[" in train_split:
    raise UserError(f"the dataset has no {val_split!r} split and train_split {train_split!r} "
                    f"is already sliced; set val_split too (splits: {sorted(known)})")
  if not 0.0 < val_fraction < 1.0:
    raise UserError(f"the dataset has no {val_split!r} split (splits: {sorted(known)}); "
                    f"set val_split, or val_fraction in (0, 1) to hold out part of {train_split!r}")
  percent = 100.0 * (1.0 - val_fraction)
  if percent == int(percent):
    cut = f"{int(percent)}%"
  else:  # TFDS percent slices are whole numbers; fall back to an example count.
    cut = str(int(round(builder.info.splits[train_split].num_examples * (1.0 - val_fraction))))
  return f"{train_split}[:{cut}]", f"{train_split}[{cut}:]"


def _read_split(tf, tfds, builder, split: str, image_key: str, label_key: str,
                name: str) -> Source:
  """Reads one split's encoded images and labels into memory, in the dataset's order."""
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={image_key: tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(interleave_cycle_length=1))
  ds = ds.map(lambda ex: (ex[image_key], ex[label_key]), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True).prefetch(tf.data.AUTOTUNE)
  encoded, labels = [], []
  for data, label in ds.as_numpy_iterator():
    encoded.append(data)
    labels.append(label)
  names = tuple(f"tfds:{name}/{split}#{i}" for i in range(len(encoded)))
  return Source(labels=np.asarray(labels, np.int32),
                open_image=lambda i, side: images.open_bytes(encoded[i], side),
                names=names, key=f"tfds:{builder.info.full_name}:{builder.data_dir}:{split}",
                trusted=True)
