"""Checking every example once and, optionally, keeping the decoded, resized images.

Corrupt files must never stop a run mid-epoch, so an untrusted source is decoded once before
training; an example that fails is dropped and reported. When images are cached, that same pass
fills the cache, so checking costs nothing extra. The disk cache is a numpy memmap under a cache
directory, keyed by the source's content and the image size, so a second run (or a second process
on the same host) skips decoding altogether.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile

import numpy as np
from PIL import Image

from transfer.data import workers
from transfer.data.sources import Source

log = logging.getLogger(__name__)
_SUFFIX_DATA, _SUFFIX_META = ".u8", ".json"


def prepare(source: Source, size: int, cache: str, cache_dir: str, decoder: workers.Decoder):
  """Checks `source` (when untrusted) and builds its image cache (when asked).

  Args:
    source: the split.
    size: side of the cached images (the size this split is mostly read at).
    cache: "" (no cache), "memory" or "disk".
    cache_dir: where disk caches live.
    decoder: the worker pool that decodes (threads or processes).

  Returns:
    (failed, cached): failed maps the index of each unreadable example to the reason; cached is
    None or a uint8 array (N, size, size, 3) indexed like the source (failed rows are zero).
  """
  if len(source) == 0:  # np.memmap cannot map an empty file.
    return {}, None
  if cache == "disk":
    return _disk(source, size, cache_dir, decoder)
  if cache == "memory":
    cached = np.zeros((len(source), size, size, 3), np.uint8)
    return _fill(source, size, cached, decoder), cached
  if source.trusted:
    return {}, None
  return _fill(source, size, None, decoder), None


def _fill(source: Source, size: int, out, decoder: workers.Decoder) -> dict[int, str]:
  """Decodes every example (into `out` when given); returns {index: reason} of those that failed.

  Images are written as they arrive, with a bounded number in flight, so a disk cache larger
  than memory fills through its memory map without ever being held whole.
  """
  failed = {}
  jobs = (source.job(i) for i in range(len(source)))
  for i, img in enumerate(decoder.try_images(jobs, size)):
    if isinstance(img, Image.UnidentifiedImageError):
      failed[i] = "not an image in a format PIL reads (or an empty file)"
    elif isinstance(img, Exception):
      failed[i] = f"{type(img).__name__}: {img}"
    elif out is not None:
      out[i] = img
  _warn(source, failed)
  return failed


def _warn(source: Source, failed: dict[int, str]) -> None:
  """One warning per skipped example, naming it."""
  for i, reason in failed.items():
    log.warning("skipping unreadable image %s (%s)", source.names[i], reason)


def _disk(source: Source, size: int, cache_dir: str, decoder: workers.Decoder):
  """Reuses or writes the memmap cache of `source` at `size`."""
  os.makedirs(cache_dir, exist_ok=True)
  stem = os.path.join(cache_dir, hashlib.sha1(f"{source.key}:{size}".encode()).hexdigest()[:20])
  shape = (len(source), size, size, 3)
  meta = _read_meta(stem + _SUFFIX_META)
  if meta and tuple(meta["shape"]) == shape and meta.get("key") == source.key:
    failed = {int(i): reason for i, reason in meta["failed"].items()}
    _warn(source, failed)
    return failed, np.memmap(stem + _SUFFIX_DATA, np.uint8, "r", shape=shape)
  # Write under a private name and publish with an atomic rename: the metadata file appears last,
  # so a reader never sees a half-written cache.
  tmp = f"{stem}.{os.getpid()}.partial"
  out = np.memmap(tmp, np.uint8, "w+", shape=shape)
  failed = _fill(source, size, out, decoder)
  out.flush()
  del out
  os.replace(tmp, stem + _SUFFIX_DATA)
  with open(tmp, "w") as f:
    json.dump({"shape": list(shape), "key": source.key, "failed": failed}, f)
  os.replace(tmp, stem + _SUFFIX_META)
  return failed, np.memmap(stem + _SUFFIX_DATA, np.uint8, "r", shape=shape)


def _read_meta(path: str):
  """The cache's metadata, or None when absent or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def default_cache_dir() -> str:
  """A per-user directory under the system temp dir."""
  return os.path.join(tempfile.gettempdir(), f"transfer-image-cache-{os.getuid()}")


def cached_labels(key: str, files, n: int, read, cache_dir: str) -> np.ndarray:
  """The labels of a split read by index, computed once and then kept in `cache_dir`.

  Reading the labels of a random-access split means reading every record once (the labels sit
  inside them), which for ImageNet is a pass over 150 GB; later runs reuse the array. The cache
  is keyed by `key` and the size and mtime of every file the split reads, so a rewritten dataset
  is read again.

  Args:
    key: the split's identity (`Source.key`).
    files: the files the split's records come from.
    n: the number of examples.
    read: () -> int32 (n,) labels, called on a miss.
    cache_dir: where the arrays live.

  Returns:
    int32 (n,) labels.
  """
  digest = hashlib.sha1(f"labels\0{key}\0{n}".encode())
  for path in files:
    try:
      st = os.stat(path)
    except OSError:  # Not a local file: nothing to key on, so nothing is cached.
      return read()
    digest.update(f"\n{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
  path = os.path.join(cache_dir, f"labels-{digest.hexdigest()[:20]}.npy")
  try:
    labels = np.load(path)
    if labels.shape == (n,):
      return labels.astype(np.int32)
  except (OSError, ValueError):
    pass
  labels = np.asarray(read(), np.int32)
  try:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.partial"
    with open(tmp, "wb") as f:
      np.save(f, labels)
    os.replace(tmp, path)
  except OSError as e:  # A read-only cache directory costs a re-read next time, nothing more.
    log.warning("could not keep the labels in %s (%s)", cache_dir, e)
  return labels
