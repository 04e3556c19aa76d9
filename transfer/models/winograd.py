"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3), for XLA on CPU.

Why: XLA:CPU runs a convolution as one Eigen kernel at 150-210 GFLOP/s on VGG16's layers, while
oneDNN (TensorFlow, PyTorch) reaches 200-240 on the same CPU. F(2x2, 3x3) computes each 2x2 output
tile from a 4x4 input tile with 16 multiplies per channel pair instead of 36, so 2.25x less
arithmetic, and the multiplies become 16 independent matmuls that XLA hands to a fast GEMM. What
it costs is two cheap elementwise passes (input and output transforms) that XLA fuses. From 64
input channels up it runs each VGG16 layer 1.0-1.8x as fast as XLA's convolution, and the 13
layers 1.4x (docs/BENCHMARKS.md).

Numerics: every transform coefficient is 0, +-1 or +-1/2, so the result differs from a direct
convolution only by float32 rounding (about 1e-6 of the output scale, measured in the tests).

The functions are plain `jax.numpy`, so autodiff gives the backward pass (for trainable conv
layers) and `conv_general_dilated` drops in for `lax.conv_general_dilated` in `flax.linen.Conv`.
Reference: Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# A model's `conv` is a concrete choice of which 3x3 layers run by Winograd (`"xla"`, `"winograd"`,
# `"winograd_from_N"`). Its spelling, and what `"auto"` means on this machine, belong to the
# platform code (`transfer.platform.conv`), which decides it once when a run is built; the model
# code reads a choice through these names.
from transfer.platform.conv import ALL, XLA, choice, min_channels, use_for  # noqa: F401

_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _input_transform(d0, d1, d2, d3):
  """B^T d along one axis, for a 4-tap input tile."""
  return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def _kernel_transform(g0, g1, g2):
  """G g along one axis, for a 3-tap filter."""
  half_sum = (g0 + g2) * 0.5
  return g0, half_sum + g1 * 0.5, half_sum - g1 * 0.5, g2


def _output_transform(m0, m1, m2, m3):
  """A^T m along one axis: 4 products -> 2 outputs."""
  return m0 + m1 + m2, m1 - m2 - m3


def transform_kernel(kernel: jax.Array) -> jax.Array:
  """(3, 3, C, D) HWIO kernel -> (16, C, D): G g G^T for every channel pair."""
  rows = _kernel_transform(kernel[0], kernel[1], kernel[2])              # 4 x (3, C, D)
  taps = [t for r in rows for t in _kernel_transform(r[0], r[1], r[2])]  # 16 x (C, D)
  return jnp.stack(taps)


def transform_input(x: jax.Array) -> jax.Array:
  """(N, H, W, C) -> (16, N * ceil(H/2) * ceil(W/2), C): B^T d B for every 4x4 tile.

  Tiles start every 2 pixels of the zero-padded input (SAME padding, plus one more row/column
  when H or W is odd). The row transform is materialised before the column transform: one fused
  pass that builds all 16 outputs at once ran 2.3x slower in XLA:CPU.
  """
  n, h, w, c = x.shape
  th, tw = -(-h // 2), -(-w // 2)
  padded = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
  rows = [padded[:, i:i + 2 * th - 1:2] for i in range(4)]              # 4 x (N, th, W+2, C)
  by_rows = jnp.stack(_input_transform(*rows))                          # (4, N, th, W+2, C)
  cols = [by_rows[:, :, :, k:k + 2 * tw - 1:2] for k in range(4)]       # 4 x (4, N, th, tw, C)
  return jnp.stack(_input_transform(*cols), axis=1).reshape(16, n * th * tw, c)


def transform_output(m: jax.Array, shape: Sequence[int]) -> jax.Array:
  """(16, N * th * tw, D) products -> (N, H, W, D) for an output of `shape` (N, H, W, D)."""
  n, h, w, d = shape
  th, tw = -(-h // 2), -(-w // 2)
  m = m.reshape(4, 4, n, th, tw, d)
  by_cols = [_output_transform(*(m[j, l] for j in range(4))) for l in range(4)]  # [l][p]
  tiles = jnp.stack([jnp.stack(_output_transform(*(by_cols[l][p] for l in range(4))))
                     for p in range(2)])                                # (2, 2, N, th, tw, D)
  y = tiles.transpose(2, 3, 0, 4, 1, 5).reshape(n, 2 * th, 2 * tw, d)
  return y[:, :h, :w]


def conv3x3(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
  """SAME, stride-1 3x3 convolution of NHWC `x` with an HWIO `kernel`, by F(2x2, 3x3).

  The 16 matmuls accumulate in float32 whatever the input dtype; the result has `x`'s dtype.
  """
  n, h, w, _ = x.shape
  d = kernel.shape[-1]
  v = transform_input(x)
  u = transform_kernel(kernel.astype(x.dtype))
  m = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), precision=precision,
                      preferred_element_type=jnp.float32)
  return transform_output(m, (n, h, w, d)).astype(x.dtype)


def applies(x_shape, kernel_shape, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
            dimension_numbers=None, feature_group_count=1, batch_group_count=1) -> bool:
  """Whether `conv3x3` computes this `lax.conv_general_dilated` call exactly."""
  unit = lambda v: v is None or tuple(v) == (1, 1)
  same = padding == "SAME" or (not isinstance(padding, str)
                               and [tuple(p) for p in padding] == [(1, 1), (1, 1)])
  layout = dimension_numbers in (_NHWC, ("NHWC", "HWIO", "NHWC"))
  return (len(x_shape) == 4 and tuple(kernel_shape[:2]) == (3, 3) and unit(window_strides)
          and same and layout and unit(lhs_dilation) and unit(rhs_dilation)
          and feature_group_count == 1 and batch_group_count == 1)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` that takes the Winograd path where it applies (3x3, stride 1, SAME,
  NHWC/HWIO, no dilation or groups) and XLA's convolution everywhere else."""
  if preferred_element_type is None and applies(
      lhs.shape, rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count):
    return conv3x3(lhs, rhs, precision)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
