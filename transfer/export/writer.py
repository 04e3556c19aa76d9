"""What an export format is: one `Writer` per format, each in its own `to_<format>.py` module.

`transfer.export` knows formats only through this record (`transfer.export.WRITERS`), so adding a
format is one module that defines a `WRITER` plus one line in that registry; nothing in the
export command branches on a format's name. Nothing here imports a converter.

`write_artifact` is the one edge where an artifact meets the file system: a target that is
read-only, forbidden or full is one line naming the path and the reason, whatever the
converter's own error type (Python's `OSError`, TensorFlow's `PermissionDeniedError`, ...).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

from transfer.errors import UserError
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


def write_artifact(writer: Writer, model: ServingModel, path: str) -> str:
  """`writer.write(model, path)`, creating the folder; a failed write is one line.

  A file artifact left half-written (a full disk) is removed with its extra files, so nothing
  at `path` looks like a usable export; a directory artifact is left as it is (it may be a
  folder the user already had).

  Raises:
    UserError: the folder cannot be created, or the file system refused the write (no space,
      read-only, permission): the message names `path` and the OS's reason.
  """
  from transfer import workdir  # the one judge of what a failed write is
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create {folder} for --out {path}: {e.strerror or e}; choose "
                    "another --out") from None
  try:
    return writer.write(model, path)
  except Exception as e:  # pylint: disable=broad-except  (each converter has its own types)
    reason = workdir.disk_reason(e)
    if reason is None:
      raise
    if not writer.directory and os.path.isfile(path) and not os.path.islink(path):
      for written in (path, *writer.extra_files(path)):
        if os.path.isfile(written) and not os.path.islink(written):
          os.remove(written)
    raise UserError(f"cannot write the {writer.title} to {path}: {reason}; free space or fix "
                    "permissions there, or choose another --out") from None
