"""TensorFlow Datasets as a random-access source; the only module that imports TensorFlow.

Random access is what the pipeline needs: every process computes the same global permutation and
reads only its rows, and a resumed run starts at any step, none of which a streaming `shuffle`
buffer allows. A dataset prepared in a random-access format (ArrayRecord, the format TFDS
recommends for it) is read by index on demand through `builder.as_data_source`: host memory
holds the labels (read once, then kept in the cache directory) and the records being decoded,
not the split. A dataset prepared only as TFRecord has no random access, so tf.data reads each
split once and keeps the encoded images in memory (about its size on disk); that is refused
above `in_memory_limit()` (a quarter of the host's memory, at most 16 GiB), naming the commands
that convert the dataset to ArrayRecord in place (`tfds convert_format`, which needs Apache Beam)
or prepare it anew in that format (`tfds build --file_format=array_record`). Decoding and
resizing then go through the same workers as image folders.

A dataset that is not prepared in its data_dir is downloaded only when the network answers: TFDS
itself retries an unreachable host for minutes before it gives up, so without network this module
fails at once, naming the data_dir TFDS actually uses (`data_dir`, else `$TFDS_DATA_DIR`, else
`~/tensorflow_datasets`) and how to prepare the dataset elsewhere.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import threading

import numpy as np

from transfer.data import images, store
from transfer.data.sources import IndexNames, Source
from transfer.errors import UserError


def tfds_sources(name: str, *, data_dir: str, train_split: str, val_split: str,
                 val_fraction: float, cache_dir: str = "") -> tuple[Source, Source, list[str]]:
  """Loads (downloading and preparing if needed) a TFDS image classification dataset.

  Args:
    name: TFDS name, optionally with config and version (`oxford_iiit_pet:4.*.*`).
    data_dir: TFDS data_dir ("" = the TFDS default: $TFDS_DATA_DIR, else ~/tensorflow_datasets).
    train_split: split for training; may use TFDS slicing (`train[:90%]`).
    val_split: validation split. When the dataset has no such split (cats_vs_dogs has only
      `train`), the last `val_fraction` of `train_split` is held out instead.
    val_fraction: see `val_split`.
    cache_dir: where the labels of a random-access split are kept after the first read ("" =
      the image cache's default directory).

  Returns:
    (train, val, class_names).

  Raises:
    UserError: TensorFlow or TFDS not installed, an unknown name, a dataset that is not prepared
      while there is no network, a failed download, or splits that do not fit.
  """
  tf, tfds = _import_tf(name)
  builder = _builder(tfds, name, data_dir)
  _prepare(builder, name)
  image_key, label_key = builder.info.supervised_keys or ("image", "label")
  label_feature = builder.info.features[label_key]
  if not hasattr(label_feature, "names"):
    raise UserError(f"tfds:{name} has no class labels in {label_key!r}; not a classification set")
  train_split, val_split = _splits(builder, train_split, val_split, val_fraction)
  if random_access(builder, tfds):
    cache_dir = cache_dir or store.default_cache_dir()
    read = lambda split: _random_access_split(tfds, builder, split, image_key, label_key, name,
                                              cache_dir)
  else:
    _check_fits_in_memory(builder, name, (train_split, val_split))
    read = lambda split: _read_split(tf, tfds, builder, split, image_key, label_key, name)
  return read(train_split), read(val_split), list(label_feature.names)


def random_access(builder, tfds) -> bool:
  """Whether the prepared dataset has a format readable by index (ArrayRecord, Parquet)."""
  formats = tfds.core.file_adapters.FileFormat.with_random_access()
  return bool(set(builder.info.available_file_formats()) & set(formats))


def in_memory_limit() -> int:
  """Bytes of encoded TFRecord data read into memory at most: a quarter of this host's memory,
  at most 16 GiB (the model, the decoded batches and other processes need the rest)."""
  try:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError):
    ram = 16 * 2**30
  return min(16 * 2**30, ram // 4)


def _check_fits_in_memory(builder, name: str, splits) -> None:
  """Refuses a TFRecord-only dataset too large to hold encoded, naming the conversion."""
  bases = {re.split(r"[\[+]", s, maxsplit=1)[0] for s in splits}
  size = sum(int(builder.info.splits[b].num_bytes or 0) for b in bases
             if b in builder.info.splits)
  limit = in_memory_limit()
  if size > limit:
    raise UserError(
        f"tfds:{name} is prepared only as TFRecord, which has no random access, and its "
        f"{size / 2**30:.1f} GiB would have to be held in memory (limit {limit / 2**30:.1f} GiB, "
        f"a quarter of RAM up to 16 GiB); get it as ArrayRecord, read by index: convert it in "
        f"place with `pip install apache-beam; tfds convert_format "
        f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record`, or prepare "
        f"it anew with `tfds build {name} --data_dir=DIR --file_format=array_record`")


# Labels of a random-access split are read in chunks of this many records (a few MB at once).
_LABEL_CHUNK = 64


def _random_access_split(tfds, builder, split: str, image_key: str, label_key: str, name: str,
                         cache_dir: str) -> Source:
  """One split read by index on demand (`as_data_source`), keeping only its labels."""
  data = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
  n = len(data)
  key = f"tfds:{builder.info.full_name}:{builder.data_dir}:{split}"

  def read_labels() -> np.ndarray:
    labels = np.empty(n, np.int32)
    for start in range(0, n, _LABEL_CHUNK):
      records = data.__getitems__(list(range(start, min(n, start + _LABEL_CHUNK))))
      labels[start:start + len(records)] = [int(r[label_key]) for r in records]
    return labels

  shards = [f.filename for f in builder.info.splits[split].file_instructions]
  labels = store.cached_labels(key, shards, n, read_labels, cache_dir)
  return Source(labels=labels, job=lambda i: (images.open_bytes, (data[int(i)][image_key],)),
                names=IndexNames(f"tfds:{name}/{split}", n), key=key, trusted=True)


INSTALL_HINT = "pip install -e '.[tfds]'"


def _import_tf(name: str):
  """Imports TensorFlow without letting it reserve accelerator memory that JAX needs."""
  try:
    import tensorflow as tf
    try:
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF was initialised elsewhere first; its devices can no longer change.
      pass
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise UserError(f"tfds:{name} needs TensorFlow and TensorFlow Datasets, which are not "
                    f"installed ({e}); install them with {INSTALL_HINT}, or use "
                    f"dataset='folder:PATH'") from None
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


def _prepare(builder, name: str) -> None:
  """Downloads and prepares the dataset if it is not there yet, with one actionable error."""
  root = os.fspath(getattr(builder, "data_dir_root", None) or builder.data_dir)
  elsewhere = (f"On a machine with network run `python -c \"import tensorflow_datasets as tfds; "
               f"tfds.builder('{name}', data_dir='DIR').download_and_prepare()\"`, copy DIR to "
               f"this machine and set --config.data_dir=DIR")
  if not builder.is_prepared() and not network_reachable():
    raise UserError(f"tfds:{name} is not prepared in {root} and there is no network to download "
                    f"it ({PROBE_HOST} does not answer). {elsewhere}")
  try:
    builder.download_and_prepare()
  except ImportError as e:  # TFDS imports some modules only to prepare (importlib_resources).
    raise UserError(f"preparing tfds:{name} needs a module that is not installed ({e}); "
                    f"install it with {INSTALL_HINT}") from None
  except Exception as e:  # Network, manual-download and disk errors all need the same advice.
    raise UserError(
        f"could not download or prepare tfds:{name} into {root} ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}). {elsewhere}") from None


# TFDS's own bucket, where it also fetches many datasets' source files; answering means online.
PROBE_HOST, PROBE_PORT, PROBE_TIMEOUT_S = "storage.googleapis.com", 443, 5.0
_PROXY_VARS = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")


def network_reachable(host: str = PROBE_HOST, port: int = PROBE_PORT,
                      timeout_s: float = PROBE_TIMEOUT_S) -> bool:
  """Whether a TCP connection to `host:port` opens within `timeout_s` (name lookup included).

  Behind a proxy a direct connection says nothing about downloads, so the answer is then True
  and TFDS finds out itself.
  """
  if any(os.environ.get(var) for var in _PROXY_VARS):
    return True
  answered = []

  def probe():
    try:
      socket.create_connection((host, port), timeout=timeout_s).close()
      answered.append(True)
    except OSError:
      pass

  # A thread, because the name lookup inside create_connection ignores the timeout.
  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout_s)
  return bool(answered)


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
  return Source(labels=np.asarray(labels, np.int32),
                job=lambda i: (images.open_bytes, (encoded[i],)),
                names=IndexNames(f"tfds:{name}/{split}", len(encoded)),
                key=f"tfds:{builder.info.full_name}:{builder.data_dir}:{split}", trusted=True)
