"""`transfer export`: a trained run as a self-contained artifact for serving.

    transfer export --workdir DIR --format stablehlo|onnx|saved_model [--out PATH]
                    [--dtype float32|bfloat16] [--checkpoint best|latest|STEP]

Every format holds one function, `serving.ServingModel.fn`: a batch of uint8 RGB images at the
run's input size (any batch size) -> class probabilities, with the weights' preprocessing, the
network (BatchNorm in inference mode) and the softmax (or sigmoid) of `transfer predict` inside.
Each is made by the tool built for it (`to_stablehlo`: `jax.export`; `to_onnx`: jax2onnx;
`to_saved_model`: jax2tf), carries the class names and input size, and is run once in its own
runtime after writing, against JAX, before the command reports it.

Each format is one `writer.Writer` in its own module, listed once in `WRITERS`; the code below
never branches on a format's name, so a new format is a module plus a line in that registry.

This is not `transfer.weights.export`, which writes weight files in Keras/torchvision layouts.
The converters are optional (`pip install 'transfer[export]'`) and imported only here.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from transfer.errors import UserError
from transfer.export import to_onnx, to_saved_model, to_stablehlo
from transfer.export.writer import Writer, registry, write_artifact

# Every format `transfer export` writes, in `--format`'s order: one module each, one line here.
WRITERS: dict[str, Writer] = registry(
    to_stablehlo.WRITER,
    to_onnx.WRITER,
    to_saved_model.WRITER,
)
FORMATS = tuple(WRITERS)  # Their names; the CLI and errors read `WRITERS` itself.
CHECK_IMAGES = 2  # random images the fresh artifact is run on, against JAX


@dataclasses.dataclass(frozen=True)
class Artifact:
  """What `export` wrote.

  Attributes:
    path: the file (StableHLO, ONNX) or directory (SavedModel).
    format: one of `FORMATS`.
    size_bytes: bytes on disk (all files, for a directory; with the StableHLO's JSON).
    metadata: what the artifact records (class names, input size, ...).
    max_abs_diff: largest |probability difference| between the artifact in its runtime and
      JAX, on `CHECK_IMAGES` random images.
  """

  path: str
  format: str
  size_bytes: int
  metadata: dict[str, Any]
  max_abs_diff: float


def get_writer(fmt: str) -> Writer:
  """The `Writer` of a format (imports no converter yet)."""
  if fmt not in WRITERS:
    raise UserError(f"unknown export format {fmt!r}; valid formats: {', '.join(WRITERS)}")
  return WRITERS[fmt]


_module = get_writer  # The name tests/test_export.py reaches for.


def default_path(workdir: str, fmt: str, dtype: str = "float32") -> str:
  """`<workdir>/export/model.<ext>` (`saved_model/` for SavedModel), `-bf16` for bfloat16."""
  name = get_writer(fmt).default_name
  if dtype == "bfloat16":
    stem, dot, ext = name.partition(".")
    name = f"{stem}-bf16{dot}{ext}"
  return os.path.join(workdir, "export", name)


def export(workdir: str, format: str, out: str | None = None,  # pylint: disable=redefined-builtin
           dtype: str = "float32", checkpoint: str | int | None = "latest") -> Artifact:
  """Writes a trained run's serving artifact and runs it once against JAX.

  Args:
    workdir: a run directory written by `transfer train`.
    format: "stablehlo", "onnx" or "saved_model".
    out: where to write (default `default_path`); an existing artifact there is replaced.
    dtype: the network's compute dtype, "float32" or "bfloat16".
    checkpoint: "latest", "best" or a step.

  Returns:
    The `Artifact`.

  Raises:
    UserError: an unknown format or dtype, a missing converter (the message names the pip
      command), a workdir without a checkpoint that restores, or an `out` that cannot be
      written (read-only, forbidden, full).
  """
  from transfer.export import serving
  chosen = get_writer(format)
  if dtype not in serving.DTYPES:
    raise UserError(f"unknown export dtype {dtype!r}; valid dtypes: {', '.join(serving.DTYPES)}")
  if dtype in chosen.refused_dtypes:
    others = [w.name for w in WRITERS.values() if dtype not in w.refused_dtypes]
    raise UserError(f"{chosen.refused_dtypes[dtype]}, or {dtype} as {' or '.join(others)}")
  chosen.require()  # before the (slow) checkpoint restore
  model = serving.load_serving_model(workdir, checkpoint, dtype)
  path = out or default_path(workdir, format, dtype)
  _check_out(path, chosen)
  write_artifact(chosen, model, path)  # a full or read-only target: one line
  return Artifact(path=path, format=format, size_bytes=chosen.size_bytes(path),
                  metadata=chosen.read_metadata(path),
                  max_abs_diff=_check_against_jax(model, chosen, path))


def _check_out(path: str, chosen: Writer) -> None:
  """Refuses an output path of the wrong kind (a folder for a file format, or vice versa)."""
  if chosen.directory and os.path.isfile(path):
    raise UserError(f"--out {path} is a file; a {chosen.title} is a directory: name a new one")
  if not chosen.directory and os.path.isdir(path):
    raise UserError(f"--out {path} is a directory; name the {chosen.name} file to write")


def _check_against_jax(model, chosen: Writer, path: str) -> float:
  """Max |difference| between the artifact in its runtime and JAX on random images."""
  import jax
  import numpy as np
  size = model.image_size
  images = np.random.default_rng(0).integers(0, 256, (CHECK_IMAGES, size, size, 3), np.uint8)
  want = np.asarray(jax.jit(model.fn)(images), np.float64)
  got = np.asarray(chosen.run(path, images), np.float64)
  return float(np.abs(got - want).max())


def usage(artifact: Artifact, image: str = "cat.jpg") -> str:
  """Python lines that classify one image file with `artifact` (without this package).

  The file is decoded as training, eval and `predict` decode it
  (`transfer.data.images.open_file`: EXIF orientation, transparency onto white), then squashed
  to `resize_to` and center-cropped: the artifact takes those uint8 pixels.
  """
  meta = artifact.metadata
  size, resize = meta["image_size"], meta["resize_to"]
  lines = ["import numpy as np; from PIL import Image, ImageOps",
           f"img = ImageOps.exif_transpose(Image.open({image!r})).convert('RGBA')  # upright",
           "img = Image.alpha_composite(Image.new('RGBA', img.size, 'white'), img)  # alpha: white",
           f"x = np.asarray(img.convert('RGB')"
           f".resize(({resize}, {resize}), Image.BILINEAR))[None]  # uint8 (1, H, W, 3)"]
  if resize != size:
    offset = (resize - size) // 2
    lines.append(f"x = x[:, {offset}:{offset + size}, {offset}:{offset + size}]  "
                 "# the run's center crop")
  lines += get_writer(artifact.format).usage(artifact.path)
  return "\n".join(lines)


def main(workdir: str, format: str, out: str | None = None,  # pylint: disable=redefined-builtin
         dtype: str = "float32", checkpoint: str | int | None = "latest") -> Artifact:
  """`transfer export`: writes the artifact and prints its path, size and how to run it."""
  artifact = export(workdir, format, out=out, dtype=dtype, checkpoint=checkpoint)
  meta = artifact.metadata
  print(f"exported {artifact.format} ({_human(artifact.size_bytes)}): {artifact.path}")
  print(f"  input uint8 [N, {meta['image_size']}, {meta['image_size']}, 3] RGB -> "
        f"{meta['probabilities']} probabilities over {len(meta['class_names'])} classes "
        f"{meta['class_names'][:10]}; dtype {meta['dtype']}; checked against JAX: "
        f"max |diff| {artifact.max_abs_diff:.1e}")
  print("run it on an image (Python):")
  print("\n".join("  " + line for line in usage(artifact).splitlines()))
  sys.stdout.flush()
  return artifact


def _human(n: int) -> str:
  """Bytes as B, KB, MB or GB (powers of 1024)."""
  size, unit = float(n), "B"
  for unit in ("B", "KB", "MB", "GB"):
    if size < 1024 or unit == "GB":
      break
    size /= 1024
  return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
