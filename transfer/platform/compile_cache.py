"""JAX's persistent compilation cache, on by default under `$TRANSFER_HOME/compile_cache`.

A rerun, resume, `eval`, `predict` or `export` of a config already compiled on this machine then
loads its executables instead of compiling them again (seconds to tens of seconds each on a CPU).
JAX keys every entry by the program, the XLA flags, the backend and the jax/jaxlib versions, so
an entry is only ever reused for the very same compilation; a stale one is never wrong, only unused.

Switches, read when `transfer.platform.setup()` runs (the command line, or the library on first
use):

    TRANSFER_COMPILE_CACHE=DIR    use DIR instead
    TRANSFER_COMPILE_CACHE=0      off (also `off`, `false`, `no`)
    JAX_COMPILATION_CACHE_DIR     JAX's own setting, when given, is left as it is

The cache is capped at `MAX_BYTES`, least recently used entries going first. JAX enforces the cap
through the `filelock` package (a dependency of ours), and then every read and write holds a lock
on the directory, so concurrent processes (`pytest -n 2`, two runs on one machine) never read an
entry another is still writing. In a multi-process run JAX writes entries from process 0 only.
Delete the directory to reclaim its space.
"""

from __future__ import annotations

import os
from typing import Mapping

from transfer import home

ENV = "TRANSFER_COMPILE_CACHE"
_OFF = ("0", "off", "false", "no")

# What gets written: everything. Flax's eager init compiles each initialiser op apart (~150
# programs of 10-250 ms for ResNet50), and together they are seconds of a first step; a threshold
# that dropped the small ones would keep them out.
MIN_COMPILE_SECS = 0.0
# No size floor: JAX would otherwise pick one for the file system (0 on a local disk).
MIN_ENTRY_BYTES = -1
# Least recently used entries are evicted beyond this (a VGG16 train step's entry is ~10-50 MB).
MAX_BYTES = 4 << 30


def directory(environ: Mapping[str, str] | None = None) -> str | None:
  """The cache directory this process should use, or None when the cache is switched off."""
  environ = os.environ if environ is None else environ
  chosen = environ.get(ENV, "").strip()
  if chosen.lower() in _OFF:
    return None
  return os.path.abspath(os.path.expanduser(chosen)) if chosen else os.path.join(
      home.path(environ), "compile_cache")


def configure() -> str | None:
  """Points JAX's persistent cache at `directory()`; returns the directory in use (None: off).

  Imports jax (no backend is created). A directory JAX was already given (its own
  `JAX_COMPILATION_CACHE_DIR`, or `jax.config.update` by the caller) is kept. The thresholds are
  set so that the programs before a first step (init, train and eval steps) are written.
  """
  import jax
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  path = directory()
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:  # a read-only home: run on, compiling as before
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", MIN_ENTRY_BYTES)
  # Capped, JAX evicts through `filelock` and also locks every read and write with it.
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return path
