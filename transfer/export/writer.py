"""What an export format is: one `Writer` per format, each in its own `to_<format>.py` module.

`transfer.export` knows formats only through this record (`transfer.export.WRITERS`), so adding a
format is one module that defines a `WRITER` plus one line in that registry; nothing in the
export command branches on a format's name. Nothing here imports a converter.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

from transfer.export.serving import ServingModel


def _nothing_to_require() -> None:
  """A format whose converter ships with jax needs no check."""


def _no_extra_files(path: str) -> tuple[str, ...]:
  del path
  return ()


@dataclasses.dataclass(frozen=True)
class Writer:
  """One serving format: how it is written, read back, run and explained.

  Attributes:
    name: the `--format` value (`stablehlo`).
    title: the format's own name in messages (`StableHLO`, `SavedModel`).
    default_name: the artifact's name under `DIR/export/` (`model.stablehlo`); a bfloat16
      export inserts `-bf16` before the first dot.
    directory: the artifact is a directory (a SavedModel), not a file.
    write: `(ServingModel, path) -> path`: converts and writes the artifact.
    read_metadata: `path -> dict`: the metadata the artifact carries (class names, input size).
    run: `(path, uint8 images) -> probabilities`: the artifact in its own runtime, the check
      `export` makes against JAX after writing.
    usage: `path -> [line, ...]`: Python lines that load the artifact and print
      `probabilities` for a uint8 batch `x`, without this package.
    require: raises a one-line `UserError` naming the pip command when the converter or
      runtime is missing; called before any checkpoint is read.
    extra: the pip extra that installs what `require` checks (`export`), "" for none.
    refused_dtypes: `{dtype: why}` for compute dtypes the format cannot hold.
    extra_files: `path -> paths` written beside the artifact (StableHLO's JSON), counted in
      its size.
  """

  name: str
  title: str
  default_name: str
  directory: bool
  write: Callable[[ServingModel, str], str]
  read_metadata: Callable[[str], dict[str, Any]]
  run: Callable[[str, Any], Any]
  usage: Callable[[str], list[str]]
  require: Callable[[], Any] = _nothing_to_require
  extra: str = ""
  refused_dtypes: Mapping[str, str] = dataclasses.field(default_factory=dict)
  extra_files: Callable[[str], tuple[str, ...]] = _no_extra_files

  def size_bytes(self, path: str) -> int:
    """Bytes on disk: every file of a directory artifact, else the file and its extras."""
    if os.path.isdir(path):
      return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
                 for f in files)
    return sum(os.path.getsize(p) for p in (path, *self.extra_files(path)))


def registry(*writers: Writer) -> dict[str, Writer]:
  """`{name: writer}` in the given order (the order `--format` lists them); names are unique."""
  named = {w.name: w for w in writers}
  if len(named) != len(writers):
    raise ValueError(f"two export writers share a name: {[w.name for w in writers]}")
  return named
