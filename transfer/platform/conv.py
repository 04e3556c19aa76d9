"""Which convolution algorithm a model runs: the `conv` policy, decided once per model.

A config says `conv="auto"`, `"xla"` or `"winograd"`; a model holds a concrete choice in the
spelling defined here (`"xla"`, `"winograd"` or `"winograd_from_N"`: Winograd
for the 3x3 layers with at least N input channels). `resolve_conv` turns the first into the
second when the model is built (`transfer.models.get`), so the choice is recorded with the run
and in `bench`'s report, and the same config compiles to the same program from the CLI and from
Python. Nothing decides it later, while tracing, from the state of the process.
"""

from __future__ import annotations

from transfer.errors import UserError

# A model's `conv` is one of these concrete choices of which 3x3 layers run by Winograd:
#   "xla"              none (XLA's convolution everywhere),
#   "winograd"         every one,
#   "winograd_from_N"  those with at least N input channels (N > 0).
# `resolve_conv` below decides which one a config's `conv="auto"` means on this machine.
XLA, ALL, _FROM = "xla", "winograd", "winograd_from_"


def choice(min_channels: int | None) -> str:
  """The choice that runs Winograd from `min_channels` input channels up (None: no layer)."""
  if min_channels is None:
    return XLA
  return ALL if min_channels <= 0 else f"{_FROM}{int(min_channels)}"


def min_channels(conv: str) -> int | None:
  """The fewest input channels that take Winograd under the concrete choice `conv` (None: none).

  Raises:
    ValueError: `conv` is not a concrete choice in its one spelling (`"auto"` included).
  """
  if conv == XLA:
    return None
  if conv == ALL:
    return 0
  if conv.startswith(_FROM) and conv[len(_FROM):].isdigit():
    n = int(conv[len(_FROM):])
    if choice(n) == conv:
      return n
  raise ValueError(f"not a concrete conv choice: {conv!r}")


def use_for(conv: str, in_channels: int) -> bool:
  """Whether a 3x3 conv layer with `in_channels` inputs runs by Winograd under the choice `conv`."""
  least = min_channels(conv)
  return least is not None and in_channels >= least


# The fewest input channels for which `auto` takes Winograd on CPU. Measured at batch 16 on
# VGG16's layers with huge pages (`transfer.platform.hugepages`, which the `transfer` command
# turns on): 3 -> 64 channels runs 0.55-0.65x as fast as XLA's convolution, 64 -> 64 1.0-1.2x,
# 512 -> 512 1.7-1.9x. Without huge pages (a Python process started without the glibc tunable)
# Winograd's temporaries are page-faulted in on every call and it wins only from 256 input
# channels, but `auto` does not follow the process's malloc: the same config must compile the
# same program from the CLI and from Python. docs/BENCHMARKS.md has the tables and the cost.
MIN_CHANNELS = 64


def resolve_conv(conv: str, backend: str | None = None) -> str:
  """The concrete conv choice for `conv` on this backend.

  `"auto"` is XLA's convolution on GPU and TPU (cuDNN picks its own algorithms, Winograd among
  them, and the TPU's MXU runs plain convolutions at full rate) and, on CPU, Winograd from
  `MIN_CHANNELS` input channels. It depends on the backend only, never on how the process was
  started. A concrete choice is returned as it is.

  Args:
    conv: `"auto"`, or a concrete choice (`"xla"`, `"winograd"`, `"winograd_from_N"`).
    backend: JAX's backend (`"cpu"`, `"gpu"`, `"tpu"`); default: `jax.default_backend()`, which
      starts JAX's backend if none exists yet.

  Returns:
    The concrete choice, e.g. `"winograd_from_64"`.

  Raises:
    UserError: `conv` is neither `"auto"` nor a concrete choice.
  """
  if conv != "auto":
    try:
      min_channels(conv)
    except (ValueError, AttributeError):
      raise UserError(f"unknown conv {conv!r}; valid values: auto, xla, winograd, "
                      "winograd_from_N (N input channels or more)") from None
    return conv
  if backend is None:
    import jax
    backend = jax.default_backend()
  return choice(MIN_CHANNELS if backend == "cpu" else None)
