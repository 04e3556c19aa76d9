"""What `transfer` does to the process it runs in: XLA:CPU flags, huge pages, the conv policy.

Only this package touches XLA flags and the allocator, and only `resolve_conv` decides what
`conv="auto"` means. `setup()` is the one call that prepares a Python process (a notebook, a
script) as the `transfer` command prepares its own:

    from transfer import platform
    print(platform.setup())   # first, before JAX runs anything
    # {"xla_cpu_flags": [...], "hugepages": false, "hugepages_note": "off: ...",
    #  "conv_auto": "winograd_from_256"}

Huge pages are the one thing a call cannot give a running process: glibc reads its tunables at
start-up, so the command restarts itself with them (`hugepages.restart_if_wanted`) and a Python
program gets them by starting with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in its environment.
Without them `conv="auto"` takes Winograd for fewer layers on CPU (see `conv.resolve_conv`), and
`hugepages_note` says why they are off.

This package imports nothing heavy: the command line uses it before JAX is imported.
"""

from __future__ import annotations

import os
from typing import Any

from transfer.platform import hugepages, xla_flags
from transfer.platform.conv import resolve_conv

__all__ = ["hugepages", "resolve_conv", "setup", "xla_flags"]


def setup() -> dict[str, Any]:
  """Sets this process up as the `transfer` command does; idempotent.

  Adds the XLA:CPU flags (`xla_flags.configure`) if JAX has not started a backend yet, and starts
  none itself: a multi-process run must join `jax.distributed` first.

  Returns:
    JSON-able facts: `xla_cpu_flags` (the flags in effect, `[]` when off), `hugepages` (whether
    malloc uses them), `hugepages_note` (one line: why, and how to get them) and `conv_auto`
    (what `conv="auto"` resolves to here; when no backend exists yet, for the backend JAX will
    pick: CPU unless a GPU/TPU plugin is installed or `JAX_PLATFORMS` names another).
  """
  flags = list(xla_flags.CPU_XLA_FLAGS) if xla_flags.configure() else []
  if xla_flags.backend_started():
    import jax
    backend = jax.default_backend()
  else:
    backend = "accelerator" if hugepages.accelerator_installed(os.environ) else "cpu"
  return {"xla_cpu_flags": flags, "hugepages": hugepages.active(),
          "hugepages_note": hugepages.explain(), "conv_auto": resolve_conv("auto", backend)}
