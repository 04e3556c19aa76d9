"""Transparent huge pages for glibc's malloc on CPU hosts, and why the CLI restarts itself once.

XLA:CPU allocates a step's activations and temporaries afresh on every call, and glibc serves each
block over 32 MiB with a fresh `mmap` and returns it with `munmap`, so every step page-faults all
of its memory in again, 4 KiB at a time: a 205 MB elementwise op took 45 ms with 50,177 page
faults, against 8.5 ms when its buffer is reused (docs/BENCHMARKS.md). glibc's
`glibc.malloc.hugetlb=1` tunable makes malloc ask the kernel for transparent huge pages, 2 MiB at a
time, which brings that op to 18 ms and the VGG16 train step up by 1.04x (XLA's convolutions) to
1.25x (Winograd's, whose temporaries are larger), with the memory still returned to the system
after every step.

glibc reads tunables only when a process starts, so `transfer`'s command line re-executes itself
once, first thing, with the tunable added to `GLIBC_TUNABLES` (same interpreter, arguments and
process id). It does so only on Linux with glibc, when the kernel's transparent huge pages are not
`never`, when no GPU/TPU plugin for JAX is installed, and not with `TRANSFER_CPU_MALLOC=0`. A Python
program gets the same by starting with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in its environment.

`explain` says in one line whether this process has them and, if not, why. This module imports
nothing heavy: it runs before JAX is imported.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
_ACCELERATOR_PACKAGES = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")
_RESTARTED = "TRANSFER_HUGEPAGES_RESTARTED"  # set in the restarted process: never loop


@functools.cache  # read once: the setting does not change while a process runs
def kernel_allows() -> bool:
  """Whether the kernel hands out transparent huge pages to a process that asks (`madvise`)."""
  try:
    with open(THP_SETTING) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def accelerator_installed(environ: Mapping[str, str]) -> bool:
  """Whether JAX will run on a GPU or TPU here (then the host allocator is left alone)."""
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms:
    return not platforms.lower().startswith("cpu")
  return any((dist.metadata["Name"] or "").lower().startswith(_ACCELERATOR_PACKAGES)
             for dist in importlib.metadata.distributions())


def _tunables(environ: Mapping[str, str]) -> list[str]:
  return [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]


def active(environ: Mapping[str, str] | None = None) -> bool:
  """Whether this process's malloc uses transparent huge pages."""
  environ = os.environ if environ is None else environ
  return TUNABLE in _tunables(environ) and kernel_allows()


def wanted(environ: Mapping[str, str]) -> bool:
  """Whether a process started with `environ` should restart with the tunable."""
  return (environ.get("TRANSFER_CPU_MALLOC", "1") != "0" and not environ.get(_RESTARTED)
          and sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
          and TUNABLE not in _tunables(environ) and kernel_allows()
          and not accelerator_installed(environ))


def explain(environ: Mapping[str, str] | None = None) -> str:
  """One line: whether this process's malloc uses huge pages and, if not, why and how to get them."""
  environ = os.environ if environ is None else environ
  if active(environ):
    return f"on (GLIBC_TUNABLES has {TUNABLE})"
  if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
    return "off: glibc's huge-page tunable needs Linux with glibc"
  if not kernel_allows():
    return f"off: the kernel's transparent huge pages are 'never' ({THP_SETTING})"
  if accelerator_installed(environ):
    return "off: JAX runs on a GPU/TPU here, so the host allocator is left alone"
  if environ.get("TRANSFER_CPU_MALLOC", "1") == "0":
    return "off: TRANSFER_CPU_MALLOC=0"
  return (f"off: glibc reads its tunables at start-up only; start Python with "
          f"GLIBC_TUNABLES={TUNABLE} in its environment (the transfer command restarts itself "
          f"with it)")


def restart_environment(environ: Mapping[str, str]) -> dict[str, str]:
  """`environ` with the tunable appended to `GLIBC_TUNABLES` and the no-loop marker set."""
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join([*_tunables(environ), TUNABLE])
  env[_RESTARTED] = "1"
  return env


def restart_if_wanted() -> None:
  """Re-executes this process with the tunable when `wanted`; returns only when it is not.

  Call it first thing in a command-line entry point, before anything is printed or imported.
  """
  if not wanted(os.environ) or not sys.executable:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
              restart_environment(os.environ))
  except OSError:  # cannot re-execute (unusual embedding): run on without huge pages
    return
