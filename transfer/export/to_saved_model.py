"""TensorFlow SavedModel export with `jax.experimental.jax2tf` (native serialisation).

Why jax2tf directly rather than orbax-export: orbax-export wraps this same jax2tf call and adds
a dependency and a serving-config layer we do not need for one signature; jax2tf ships with jax.
The program is embedded as StableHLO in an `XlaCallModule` op (native serialisation, the only
kind current jax2tf makes), lowered for CPU and CUDA, with a polymorphic batch dimension. The
variables are `tf.Variable`s of the module (checkpointed beside the graph, not constants in it).

The SavedModel has a `serving_default` signature, `images` (uint8 [N, size, size, 3]) ->
`probabilities` (float32 [N, classes]), which TF Serving serves as is; `class_names`,
`image_size` and `metadata_json` as attributes; and `assets/class_names.txt` and
`assets/transfer_export.json`.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from transfer.errors import UserError
from transfer.export.serving import INPUT_NAME, OUTPUT_NAME, ServingModel
from transfer.export.writer import Writer

INSTALL = "pip install 'transfer[export]' (or: pip install tensorflow-cpu)"
PLATFORMS = ("cpu", "cuda")
METADATA_ASSET = "transfer_export.json"
CLASSES_ASSET = "class_names.txt"


def require_tf():
  """TensorFlow, kept off the GPU (JAX holds it), or a one-line error naming the pip command.

  The export itself only traces and saves; the check run after it is small, on the CPU.
  """
  # TensorFlow's C++ start-up notes (oneDNN, absl) are noise here; errors still show.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    import tensorflow as tf
  except ImportError:
    raise UserError(f"SavedModel export needs TensorFlow: {INSTALL}") from None
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF was initialised elsewhere first; its devices can no longer change.
    pass
  return tf


def write(model: ServingModel, path: str) -> str:
  """Writes `model` as a SavedModel directory at `path`; returns `path`."""
  tf = require_tf()
  import jax
  from jax.experimental import jax2tf

  size = model.image_size
  module = tf.Module()
  leaves, treedef = jax.tree_util.tree_flatten(model.variables)
  module.weights = [tf.Variable(leaf, trainable=False) for leaf in leaves]
  converted = jax2tf.convert(
      lambda flat, x: model.apply(jax.tree_util.tree_unflatten(treedef, flat), x),
      polymorphic_shapes=[None, f"(N, {size}, {size}, 3)"],
      native_serialization_platforms=PLATFORMS, with_gradient=False)

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, size, size, 3], tf.uint8, name=INPUT_NAME)])
  def serve(images):
    return {OUTPUT_NAME: converted(module.weights, images)}

  module.serve = serve
  # Variables, not constants: a SavedModel keeps only trackable attributes.
  module.class_names = tf.Variable(model.class_names, trainable=False, name="class_names")
  module.image_size = tf.Variable(size, trainable=False, name="image_size")
  module.metadata_json = tf.Variable(json.dumps(model.metadata), trainable=False,
                                     name="metadata_json")
  with tempfile.TemporaryDirectory() as staging:
    module.class_names_file = tf.saved_model.Asset(_write(staging, CLASSES_ASSET,
                                                          "\n".join(model.class_names) + "\n"))
    module.metadata_file = tf.saved_model.Asset(
        _write(staging, METADATA_ASSET, json.dumps(model.metadata, indent=1) + "\n"))
    tf.saved_model.save(module, path, signatures={"serving_default": serve})
  return path


def _write(folder: str, name: str, text: str) -> str:
  path = os.path.join(folder, name)
  with open(path, "w", encoding="utf8") as f:
    f.write(text)
  return path


def read_metadata(path: str) -> dict[str, Any]:
  """The metadata of a SavedModel written by `write` (from its assets, no TensorFlow needed)."""
  with open(os.path.join(path, "assets", METADATA_ASSET), encoding="utf8") as f:
    return json.load(f)


def run(path: str, images) -> Any:
  """Probabilities of a SavedModel on uint8 images through its `serving_default` signature."""
  tf = require_tf()
  loaded = tf.saved_model.load(path)
  return loaded.signatures["serving_default"](**{INPUT_NAME: tf.constant(images)})[
      OUTPUT_NAME].numpy()


def usage(path: str) -> list[str]:
  """Python that runs the artifact on a uint8 batch `x` with TensorFlow alone."""
  return ["import tensorflow as tf",
          f"print(tf.saved_model.load({path!r}).signatures['serving_default']"
          "(images=tf.constant(x))['probabilities'].numpy())"]


WRITER = Writer(name="saved_model", title="SavedModel", default_name="saved_model", directory=True,
                write=write, read_metadata=read_metadata, run=run, usage=usage,
                require=require_tf, extra="export")
