"""What `transfer` does to the process it runs in: XLA:CPU flags, the compilation cache, huge
pages, the conv policy.

Only this package touches XLA flags, JAX's process settings and the allocator, and only
`resolve_conv` decides what `conv="auto"` means. `setup()` prepares a process; the command line
calls it before anything else, and the library calls it on first use (`transfer.models.get`,
`transfer.assembly.build`, `transfer.bench.run`, `transfer.train.train_and_evaluate`), so a
notebook or script compiles the same programs as the `transfer` command without asking:

    from transfer import platform
    print(platform.setup())   # optional: what it did
    # {"xla_cpu_flags": [...], "compile_cache": "~/.cache/transfer/compile_cache",
    #  "hugepages": false, "hugepages_note": "off: ...", "conv_auto": "winograd_from_64"}

XLA reads its flags when JAX creates its first backend, so a program that computed with JAX
before touching `transfer` runs without them (`xla_cpu_flags` is then `[]`, and run metadata
records the flags in effect). Huge pages are the one thing a call cannot give a running process:
glibc reads its tunables at start-up, so the command restarts itself with them
(`hugepages.restart_if_wanted`) and a Python program gets them by starting with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in its environment. They change speed only, never the
program: `conv="auto"` resolves the same way with or without them.

Importing this package imports nothing heavy; `setup()` imports jax but creates no backend.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from transfer.platform import compile_cache, hugepages, xla_flags
from transfer.platform.attention import resolve_attention
from transfer.platform.conv import resolve_conv

__all__ = ["compile_cache", "facts", "hugepages", "program_fingerprint", "program_text",
           "resolve_attention", "resolve_conv", "setup", "xla_flags"]

_DONE: dict[str, Any] = {}  # setup()'s facts, once per process


def setup() -> dict[str, Any]:
  """Sets this process up as the `transfer` command does; idempotent and cheap after the first.

  Adds the XLA:CPU flags (`xla_flags.configure`) if JAX has not started a backend yet, points
  JAX's persistent compilation cache at `$TRANSFER_HOME/compile_cache` (`compile_cache`), and
  starts no backend itself: a multi-process run must join `jax.distributed` first.

  Returns:
    JSON-able facts: `xla_cpu_flags` (the flags in effect, `[]` when off), `compile_cache` (its
    directory, None when off), `hugepages` (whether malloc uses them), `hugepages_note` (one
    line: why, and how to get them) and `conv_auto` (what `conv="auto"` resolves to here; when no
    backend exists yet, for the backend JAX will pick: CPU unless a GPU/TPU plugin is installed
    or `JAX_PLATFORMS` names another).
  """
  if not _DONE:
    flags = list(xla_flags.CPU_XLA_FLAGS) if xla_flags.configure() else []
    cache = compile_cache.configure()
    if xla_flags.backend_started():
      import jax
      backend = jax.default_backend()
    else:
      backend = "accelerator" if hugepages.accelerator_installed(os.environ) else "cpu"
    _DONE.update(xla_cpu_flags=flags, compile_cache=cache, hugepages=hugepages.active(),
                 hugepages_note=hugepages.explain(), conv_auto=resolve_conv("auto", backend))
  return dict(_DONE)


def facts() -> dict[str, Any]:
  """What a run's compiled programs depend on besides the run's config, for its metadata and
  `bench`'s report: the XLA flags in effect (`XLA_FLAGS`) and whether malloc uses huge pages
  (speed only)."""
  return {"xla_flags": os.environ.get("XLA_FLAGS", ""), "hugepages": hugepages.active()}


def program_text(lowered) -> str:
  """The StableHLO text of a lowered program (`jax.jit(f).lower(...)`) without source locations,
  so the same program traced from different files or lines reads the same."""
  text = lowered.as_text()
  text = re.sub(r"\s*loc\([^\n]*?\)(?=\s*$)", "", text, flags=re.M)  # trailing locations
  return "\n".join(l for l in text.splitlines() if not l.startswith("#loc")) + "\n"


def program_fingerprint(lowered) -> str:
  """A short hash of `program_text(lowered)`: equal fingerprints, the same program to compile.

  `transfer bench --json` reports its train step's (`step_fingerprint`), and a notebook gets the
  same value for the same config (`transfer.bench.step_fingerprint(config)`).
  """
  return hashlib.sha256(program_text(lowered).encode()).hexdigest()[:16]
