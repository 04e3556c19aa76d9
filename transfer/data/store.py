"""Checking every example once and, optionally, keeping the decoded, resized images.

Corrupt files must never stop a run mid-epoch, so an untrusted source is decoded once before
training; an example that fails is dropped and reported. When images are cached, that same pass
fills the cache, so checking costs nothing extra. The disk cache is a numpy memmap under a cache
directory, keyed by the source's content and the image size, so a second run (or a second process
on the same host) skips decoding altogether.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import tempfile

import numpy as np
from PIL import Image

from transfer.data import images
from transfer.data.sources import Source

log = logging.getLogger(__name__)
_SUFFIX_DATA, _SUFFIX_META = ".u8", ".json"


def prepare(source: Source, size: int, cache: str, cache_dir: str,
            pool: concurrent.futures.Executor):
  """Checks `source` (when untrusted) and builds its image cache (when asked).

  Args:
    source: the split.
    size: side of the cached images (the size this split is mostly read at).
    cache: "" (no cache), "memory" or "disk".
    cache_dir: where disk caches live.
    pool: thread pool for decoding.

  Returns:
    (failed, cached): failed maps the index of each unreadable example to the reason; cached is
    None or a uint8 array (N, size, size, 3) indexed like the source (failed rows are zero).
  """
  if len(source) == 0:  # np.memmap cannot map an empty file.
    return {}, None
  if cache == "disk":
    return _disk(source, size, cache_dir, pool)
  if cache == "memory":
    cached = np.zeros((len(source), size, size, 3), np.uint8)
    return _fill(source, size, cached, pool), cached
  if source.trusted:
    return {}, None
  return _fill(source, size, None, pool), None


def _fill(source: Source, size: int, out, pool) -> dict[int, str]:
  """Decodes every example (into `out` when given); returns {index: reason} of those that failed."""
  def one(i):
    try:
      img = images.resize(source.open_image(i, size), size)
    except Image.UnidentifiedImageError:
      return "not an image in a format PIL reads (or an empty file)"
    except Exception as e:  # Any decoder error means "unreadable"; the run must go on.
      return f"{type(e).__name__}: {e}"
    if out is not None:
      out[i] = img
    return None
  failed = {i: e for i, e in enumerate(pool.map(one, range(len(source)))) if e is not None}
  _warn(source, failed)
  return failed


def _warn(source: Source, failed: dict[int, str]) -> None:
  """One warning per skipped example, naming it."""
  for i, reason in failed.items():
    log.warning("skipping unreadable image %s (%s)", source.names[i], reason)


def _disk(source: Source, size: int, cache_dir: str, pool):
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
  failed = _fill(source, size, out, pool)
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
