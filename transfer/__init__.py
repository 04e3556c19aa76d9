"""transfer: fine-tune ImageNet networks in JAX/Flax.

Importing the package is cheap: submodules (`transfer.models`, `transfer.weights`, `transfer.data`,
`transfer.train`, ...) are imported on demand so that the CLI starts fast and nothing pulls in
TensorFlow unless a TFDS dataset is used.
"""

__version__ = "0.1.0"
