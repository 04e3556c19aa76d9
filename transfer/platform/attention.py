"""Which attention implementation a transformer runs: decided here, once per model.

`jax.nn.dot_product_attention(implementation=None)` runs XLA's composed attention everywhere
(its automatic choice is XLA for now), so the fused cuDNN kernel, several times faster on an
H100 under bfloat16, is taken only when asked for. `"auto"` asks for it where it exists: an
NVIDIA GPU and a float16/bfloat16 compute dtype (cuDNN's fused attention takes no float32).
The model holds the concrete choice, so the same choice gives the same program anywhere.
"""

from __future__ import annotations

from typing import Any

CHOICES = ("auto", "xla", "cudnn")


def resolve_attention(attention: str, dtype: Any, platform: str | None = None) -> str:
  """`"xla"` or `"cudnn"` for a config's `attention` (`"auto"`, `"xla"`, `"cudnn"`).

  Args:
    attention: the setting.
    dtype: the model's compute dtype.
    platform: the backend (default: jax's first device's).
  """
  if attention != "auto":
    return attention
  import jax
  import jax.numpy as jnp
  device = jax.devices()[0]
  platform = platform or device.platform
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if platform == "gpu" and half and not _is_rocm(device) else "xla"


def _is_rocm(device) -> bool:
  """AMD GPUs are platform "gpu" too; cuDNN is NVIDIA's."""
  version = str(getattr(getattr(device, "client", None), "platform_version", ""))
  return "rocm" in version.lower()
