"""Winograd F(2x2, 3x3) convolutions against XLA's direct convolution.

Values, gradients, odd and tiny feature maps, bfloat16, the dispatch that decides which calls it
takes, and a whole VGG whose layers run by Winograd against the same VGG on XLA's convolutions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from transfer import models
from transfer.errors import UserError
from transfer.models import winograd
from helpers import F32_U

NHWC = ("NHWC", "HWIO", "NHWC")
SLACK = 4  # safety factor over the expected round-off


def sum_rtol(terms: int) -> float:
  """Expected float32 round-off of a sum of `terms` products, relative to its scale: independent
  rounding errors grow like the square root of their count (the linear worst case is far from
  what random data gives, and over a whole net would let a real error through)."""
  return SLACK * float(np.sqrt(terms)) * F32_U


def conv_rtol(channels: int) -> float:
  """Two 3x3 convolutions over `channels` inputs: XLA sums 9 * channels products per output;
  Winograd sums `channels` per transformed entry, between its transforms (16 terms in, 9 out)."""
  return sum_rtol(9 * channels + 16 + 9)


def direct(x, kernel):
  return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC,
                                  precision=lax.Precision.HIGHEST)


def random(shape, seed, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32) * scale)


@pytest.mark.parametrize("n, h, w, c, d", [
    (2, 8, 8, 4, 5),      # even sides
    (2, 7, 5, 16, 3),     # odd sides: the last tile row/column is half padding
    (1, 1, 1, 8, 2),      # one pixel
    (3, 2, 2, 32, 32),    # block5 of VGG at 64x64 input
    (2, 28, 28, 64, 64),
])
def test_matches_direct_convolution(n, h, w, c, d):
  x, kernel = random((n, h, w, c), 0), random((3, 3, c, d), 1, scale=(9 * c) ** -0.5)
  want = direct(x, kernel)
  got = jax.jit(winograd.conv3x3)(x, kernel)
  assert got.shape == want.shape and got.dtype == jnp.float32
  # Only float32 rounding separates the two (transform coefficients are 0, +-1, +-1/2).
  np.testing.assert_allclose(got, want, rtol=0, atol=conv_rtol(c) * float(jnp.abs(want).max()))


def test_gradients_match_direct_convolution():
  """Trainable conv layers differentiate through the transforms: input and kernel gradients."""
  x, kernel = random((2, 9, 6, 8), 2), random((3, 3, 8, 4), 3, scale=0.2)
  target = random((2, 9, 6, 4), 4)

  def loss(conv):
    return lambda x, k: jnp.sum(jnp.tanh(conv(x, k)) * target)

  want = jax.grad(loss(direct), argnums=(0, 1))(x, kernel)
  got = jax.jit(jax.grad(loss(winograd.conv3x3), argnums=(0, 1)))(x, kernel)
  # The forward pass's round-off, then the backward's largest sum: the kernel gradient's, over
  # 2 x 9 x 6 positions.
  rtol = conv_rtol(8) + sum_rtol(2 * 9 * 6)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=0, atol=rtol * float(jnp.abs(w).max()))


def test_bfloat16_input_accumulates_in_float32():
  x, kernel = random((2, 16, 16, 64), 5), random((3, 3, 64, 64), 6, scale=1 / 24)
  want = direct(x, kernel)
  got = winograd.conv3x3(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert got.dtype == jnp.bfloat16
  err = float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())
  # The output's bfloat16 rounding and both inputs' (u = 2**-8 each), with 2x slack: tight
  # enough that summing the 9 x 64 products in bfloat16 (~sqrt(576) u) would fail.
  assert err < 2 * (1 + 2) * 2.0 ** -8


def test_kernel_transform_is_g_g_gt():
  g = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
  kernel = random((3, 3, 2, 3), 7)
  want = np.einsum("ji,iocd,lo->jlcd", g, np.asarray(kernel), g).reshape(16, 2, 3)
  # A bound, not an estimate: each entry sums 9 terms whose magnitudes add up to at most
  # 1.5 x 1.5 x max|kernel| (a row of g sums to at most 1.5; its halves multiply exactly).
  atol = (9 - 1) * F32_U * 1.5 ** 2 * float(np.abs(kernel).max())
  np.testing.assert_allclose(winograd.transform_kernel(kernel), want, rtol=0, atol=atol)


@pytest.mark.parametrize("kwargs, takes_winograd", [
    ({}, True),
    ({"padding": ((1, 1), (1, 1))}, True),
    ({"padding": "VALID"}, False),
    ({"window_strides": (2, 2)}, False),
    ({"rhs_dilation": (2, 2)}, False),
    ({"feature_group_count": 2}, False),
    ({"dimension_numbers": ("NCHW", "OIHW", "NCHW")}, False),
    ({"kernel": (5, 5)}, False),
])
def test_dispatch_takes_winograd_only_where_exact(kwargs, takes_winograd):
  """Every call gives XLA's answer; only 3x3 / stride 1 / SAME / NHWC calls take Winograd."""
  kwargs = dict(kwargs)
  hw = kwargs.pop("kernel", (3, 3))
  groups = kwargs.get("feature_group_count", 1)
  x, kernel = random((2, 6, 6, 4), 8), random((*hw, 4 // groups, 4), 9)
  if kwargs.get("dimension_numbers", NHWC)[0] == "NCHW":
    x, kernel = x.transpose(0, 3, 1, 2), kernel.transpose(3, 2, 0, 1)
  call = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC)
  call.update(kwargs)
  jaxpr = str(jax.make_jaxpr(lambda a, b: winograd.conv_general_dilated(a, b, **call))(x, kernel))
  assert ("conv_general_dilated" not in jaxpr) == takes_winograd
  want = lax.conv_general_dilated(x, kernel, **call, precision=lax.Precision.HIGHEST)
  got = winograd.conv_general_dilated(x, kernel, **call)
  rtol = sum_rtol(hw[0] * hw[1] * 4 + 16 + 9)  # as conv_rtol, for this kernel's taps
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * float(jnp.abs(want).max()))


@pytest.mark.parametrize("least", [64, 256])
def test_use_for_reads_only_the_concrete_choice(least):
  """Which layers a choice sends to Winograd; `auto` is the platform's to resolve, not ours."""
  assert winograd.use_for("winograd", 3) and not winograd.use_for("xla", 512)
  choice = winograd.choice(least)
  assert choice == f"winograd_from_{least}" and winograd.min_channels(choice) == least
  assert not winograd.use_for(choice, least - 1) and winograd.use_for(choice, least)
  assert winograd.choice(None) == "xla" and winograd.choice(0) == "winograd"
  for not_concrete in ("auto", "winograd_from_0", "winograd_from_064", "winograd_from_x"):
    with pytest.raises(ValueError):
      winograd.use_for(not_concrete, 512)
  with pytest.raises(UserError, match="unknown conv 'fast'"):
    models.get("vgg16_tiny", include_top=True, conv="fast")


@pytest.mark.parametrize("dense_head", ["flatten_dense", "gap"])
def test_vgg_on_winograd_matches_vgg_on_xla(dense_head):
  """Same params, same logits (to float32 rounding) and the same gradient of the whole net."""
  nets = {conv: models.get("vgg16_tiny", head=dense_head, num_classes=3, conv=conv)
          for conv in ("xla", "winograd")}
  params = models.init_params(nets["xla"], 64, rng=1)
  x = jax.random.uniform(jax.random.PRNGKey(2), (4, 64, 64, 3), minval=-1, maxval=1)
  jaxprs = {c: str(jax.make_jaxpr(lambda p, x: n.apply({"params": p}, x))(params, x))
            for c, n in nets.items()}
  assert jaxprs["xla"].count("conv_general_dilated") == 13
  assert jaxprs["winograd"].count("conv_general_dilated") == 0

  def loss(net):
    return lambda p: jnp.sum(net.apply({"params": p}, x) ** 2)

  want, want_grad = jax.value_and_grad(loss(nets["xla"]))(params)
  got, got_grad = jax.jit(jax.value_and_grad(loss(nets["winograd"])))(params)
  # Each of the 13 convolutions adds its own round-off and passes on the earlier layers'; the
  # loss squares the logits, and the backward pass runs the layers again: twice the sum.
  layers = sum(conv_rtol(params[name]["kernel"].shape[2])
               for name in models.spec("vgg16_tiny").conv_layers)
  np.testing.assert_allclose(got, want, rtol=2 * layers)
  for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(g, w, rtol=0, atol=2 * layers * float(jnp.abs(w).max()) + 1e-12)
