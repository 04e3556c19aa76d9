"""Where `transfer` keeps its files on this machine: `$TRANSFER_HOME`, default `~/.cache/transfer`.

Downloaded weights (`weights/`) and compiled programs (`compile_cache/`) live under it; this is the
one place that decides the directory. Imports nothing heavy.
"""

from __future__ import annotations

import os
from typing import Mapping

ENV = "TRANSFER_HOME"


def path(environ: Mapping[str, str] | None = None) -> str:
  """`$TRANSFER_HOME` from `environ` (default: this process's), else `~/.cache/transfer`."""
  environ = os.environ if environ is None else environ
  return environ.get(ENV) or os.path.join(os.path.expanduser("~"), ".cache", "transfer")
