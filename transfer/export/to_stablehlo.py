"""StableHLO export with `jax.export`: a serialised, batch-polymorphic program plus a JSON file.

The file is `jax.export.Exported.serialize()` bytes: StableHLO with the variables as constants,
the input shape `(N, size, size, 3)` uint8 with a symbolic N, lowered for CPU and CUDA. Any
process with a compatible jax reloads it without this package:

    exported = jax.export.deserialize(open(path, "rb").read())
    probabilities = exported.call(images)  # uint8 (N, size, size, 3)

The metadata (class names, input size, ...) is `<path>.json` beside it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transfer.export.serving import ServingModel
from transfer.export.writer import Writer

# CPU and CUDA in one artifact: the CUDA lowering needs no GPU here, and the file then runs on
# either (jax picks the lowering for the platform it calls on).
PLATFORMS = ("cpu", "cuda")


def metadata_path(path: str) -> str:
  """The JSON file beside a StableHLO artifact."""
  return path + ".json"


def write(model: ServingModel, path: str) -> str:
  """Serialises `model` to `path` and its metadata to `metadata_path(path)`; returns `path`."""
  import jax
  import jax.numpy as jnp
  size = model.image_size
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"N, {size}, {size}, 3"), jnp.uint8)
  exported = jax.export.export(jax.jit(model.fn), platforms=PLATFORMS)(spec)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(exported.serialize())
  with open(metadata_path(path), "w", encoding="utf8") as f:
    json.dump(dict(model.metadata, platforms=list(PLATFORMS)), f, indent=1)
    f.write("\n")
  return path


def read_metadata(path: str) -> dict[str, Any]:
  """The metadata written beside a StableHLO artifact."""
  with open(metadata_path(path), encoding="utf8") as f:
    return json.load(f)


def run(path: str, images) -> Any:
  """Probabilities of a StableHLO artifact on uint8 images, in this process's jax."""
  import jax
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  return exported.call(images)


def usage(path: str) -> list[str]:
  """Python that runs the artifact on a uint8 batch `x` with jax alone."""
  return ["import jax", f"print(jax.export.deserialize(open({path!r}, 'rb').read()).call(x))"]


WRITER = Writer(name="stablehlo", title="StableHLO", default_name="model.stablehlo",
                directory=False, write=write, read_metadata=read_metadata, run=run, usage=usage,
                extra_files=lambda path: (metadata_path(path),))
