"""XLA:CPU flags that `transfer` sets before JAX creates its first backend.

XLA:CPU in jaxlib 0.10/0.11 hands convolutions to YNNPACK fusions; its own Eigen kernels run the
VGG16 train step 1.2-1.3x faster on CPU (docs/BENCHMARKS.md). An empty list turns YNN fusions
off altogether: allowing only dots ("=dot") still let a dot fusion swallow the whole conv base of
a forward pass (1.26x slower than none). The flag only affects CPU compilation. It is set only
for jaxlib versions known to have it: XLA aborts on unknown flags.
"""

from __future__ import annotations

import os

CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
_CPU_XLA_FLAGS_JAXLIB = ((0, 10), (0, 11))


def configure() -> bool:
  """Adds `CPU_XLA_FLAGS` to `XLA_FLAGS` before the first backend exists; whether they apply.

  XLA reads its flags once, when the first backend is created, so this must run first (the CLI
  does it through `transfer.platform.setup`). A flag the user already set (any value) is left
  alone; `TRANSFER_CPU_XLA_FLAGS=0` turns it off. Imports jaxlib but creates no backend.
  """
  import jaxlib
  if os.environ.get("TRANSFER_CPU_XLA_FLAGS", "1") == "0":
    return False
  current = os.environ.get("XLA_FLAGS", "")
  if backend_started():
    return all(flag in current for flag in CPU_XLA_FLAGS)
  if tuple(int(p) for p in jaxlib.__version__.split(".")[:2]) not in _CPU_XLA_FLAGS_JAXLIB:
    return False
  added = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in current]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return True


def backend_started() -> bool:
  """Whether JAX has created a backend in this process (after which XLA flags no longer apply)."""
  from jax._src import xla_bridge
  return bool(getattr(xla_bridge, "_backends", None))
