"""transfer: fine-tune ImageNet networks in JAX/Flax.

    import transfer
    model = transfer.models.get("vgg16", head="flatten_dense", num_classes=1)

Importing the package is cheap: it imports neither JAX nor TensorFlow. Each submodule
(`transfer.models`, `transfer.weights`, `transfer.data`, `transfer.train`, ...) is imported the
first time it is used, so the CLI starts fast and nothing pulls in TensorFlow unless a TFDS dataset
is read.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = frozenset({
    "bench", "checkpoint", "configs", "data", "distributed", "errors", "evaluate", "features",
    "main", "metrics", "models", "optim", "parallel", "platform", "predict", "runs", "steps",
    "train", "weights", "workdir",
})


def __getattr__(name: str):
  """`transfer.models` and friends, imported on first use (PEP 562)."""
  if name in _SUBMODULES:
    return importlib.import_module(f"transfer.{name}")
  raise AttributeError(f"module 'transfer' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | _SUBMODULES)
