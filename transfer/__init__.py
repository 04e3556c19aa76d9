"""transfer: fine-tune ImageNet networks in JAX/Flax.

    import transfer
    model, variables = transfer.create_model("resnet50", weights="torchvision:resnet50",
                                             num_classes=0, pooling="avg")
    prep = transfer.weights.transform("torchvision:resnet50")      # resize, crop, normalise
    features = model.apply(variables, prep(uint8_images))
    predictor = transfer.Predictor.from_workdir("workdirs/cats_vs_dogs")
    probs = predictor.predict(["cat.jpg"])

Importing the package is cheap: it imports neither JAX nor TensorFlow. Every submodule
(`transfer.models`, `transfer.weights`, `transfer.export`, `transfer.train`, ...) is imported
the first time it is used, and so are the top-level names `create_model` (`transfer.factory`)
and `Predictor` (`transfer.predictor`), so the CLI starts fast and nothing pulls in TensorFlow
unless a TFDS dataset is read.
"""

import importlib
import os

__version__ = "0.1.0"



def _modules_here() -> frozenset[str]:
  """Every public module and package in this directory, listed from the files (so a new module is
  reachable as `transfer.<name>` without being registered here); plain `os`, as `pkgutil` would
  import `inspect` on the way to every `transfer --help`."""
  here = os.path.dirname(__file__)
  names = set()
  for entry in os.scandir(here):
    if entry.name.startswith("_"):
      continue
    if entry.is_file() and entry.name.endswith(".py"):
      names.add(entry.name[:-3])
    elif entry.is_dir() and os.path.isfile(os.path.join(entry.path, "__init__.py")):
      names.add(entry.name)
  return frozenset(names)


_SUBMODULES = _modules_here()

# Top-level names and the module that defines each.
_EXPORTS = {"create_model": "factory", "Predictor": "predictor"}


def __getattr__(name: str):
  """`transfer.models`, `transfer.create_model` and friends, imported on first use (PEP 562)."""
  if name in _SUBMODULES:
    return importlib.import_module(f"transfer.{name}")
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"transfer.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'transfer' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | _SUBMODULES | set(_EXPORTS))
