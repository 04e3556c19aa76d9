"""Attention in the transformers: `jax.nn.dot_product_attention` against an explicit reference
(einsum, softmax, einsum), the softmax in float32 under bfloat16, the one choice of
implementation (`platform.resolve_attention`), cuDNN's fused kernel against XLA's where an
NVIDIA GPU is present, and a whole ViT's forward pass against the same net on the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfer import models
from transfer.errors import UserError
from transfer.platform import resolve_attention
from helpers import assert_close, one_line_error

# A ViT-B/16 layer at 224 px in miniature: 196 patches + the class token, 3 heads of width 64.
BATCH, TOKENS, HEADS, HEAD_DIM = 2, 197, 3, 64

# conftest.py defaults JAX_PLATFORMS to cpu: on a GPU machine run `JAX_PLATFORMS= pytest ...`.
ON_GPU = jax.devices()[0].platform == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="cuDNN's fused attention needs an NVIDIA GPU "
                               "(there, run with JAX_PLATFORMS= or cuda; conftest defaults to cpu)")


def reference_attention(q, k, v, softmax_dtype=jnp.float32, **_):
  """Softmax(q k^T / sqrt(d)) v, spelled out: logits and softmax in `softmax_dtype`, the
  probabilities back in the inputs' dtype for the second product (as `jax.nn`'s XLA path)."""
  scale = jnp.asarray(1.0 / np.sqrt(q.shape[-1]), softmax_dtype)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=softmax_dtype) * scale
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bnts,bsnh->btnh", probs, v)


def exact_attention(q, k, v):
  """The same in float64 numpy, on the inputs as given (already rounded to their dtype)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bnts,bsnh->btnh", probs / probs.sum(-1, keepdims=True), v)


def _qkv(dtype, seed=0):
  """Queries and keys at the scale of a trained ViT's (logits of a few units, so the softmax is
  peaked and its input's precision shows), values ~ N(0, 1)."""
  rng = np.random.default_rng(seed)
  shape = (BATCH, TOKENS, HEADS, HEAD_DIM)
  return tuple(jnp.asarray(rng.normal(size=shape) * s, dtype) for s in (2.0, 2.0, 1.0))


def _rms(a, b):
  return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


def test_float32_attention_equals_the_reference():
  q, k, v = _qkv(jnp.float32)
  got = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  assert got.dtype == jnp.float32 and got.shape == q.shape
  exact = exact_attention(q, k, v)
  assert_close(got, exact, rtol=1e-5)  # measured 8e-7 of the scale
  np.testing.assert_allclose(got, reference_attention(q, k, v), rtol=0, atol=1e-5)


def test_bfloat16_attention_takes_its_softmax_in_float32():
  """In bfloat16 the logits (8 significant bits) of a peaked softmax lose a few percent of each
  probability; XLA's path forms them and the softmax in float32 and rounds only the
  probabilities, which halves the error at least (measured: 4x less, in max and rms)."""
  q, k, v = _qkv(jnp.bfloat16)
  got = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  assert got.dtype == jnp.bfloat16
  exact = exact_attention(q, k, v)  # on the same bfloat16 inputs
  f32_softmax = reference_attention(q, k, v, jnp.float32)
  bf16_softmax = reference_attention(q, k, v, jnp.bfloat16)
  assert_close(got, exact, rtol=1e-2)  # measured 3.3e-3 of the scale (3.6)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(f32_softmax, np.float32),
                             rtol=0, atol=2e-2)
  assert _rms(got, exact) < 0.5 * _rms(bf16_softmax, exact)
  err = lambda x: np.abs(np.asarray(x, np.float64) - exact).max()
  assert err(got) < 0.5 * err(bf16_softmax)


@pytest.mark.parametrize("platform,dtype,want", [
    ("gpu", "bfloat16", "cudnn"), ("gpu", "float16", "cudnn"), ("gpu", "float32", "xla"),
    ("cpu", "bfloat16", "xla"), ("cpu", "float32", "xla"), ("tpu", "bfloat16", "xla"),
])
def test_auto_takes_cudnn_only_on_a_gpu_in_half_precision(platform, dtype, want):
  assert resolve_attention("auto", jnp.dtype(dtype), platform) == want
  for concrete in ("xla", "cudnn"):  # a concrete choice is kept as it is
    assert resolve_attention(concrete, jnp.dtype(dtype), platform) == concrete


def test_the_model_holds_the_resolved_choice_and_refuses_an_unknown_one():
  for dtype in ("float32", "bfloat16"):
    net = models.get("vit_b16_tiny", num_classes=3, head="gap", dtype=dtype)
    assert net.attention == resolve_attention("auto", jnp.dtype(dtype))
    assert net.attention == ("cudnn" if ON_GPU and dtype == "bfloat16" else "xla")
  net = models.get("vit_b16_tiny", num_classes=3, head="gap", attention="flash")
  with pytest.raises(UserError) as e:
    models.init_params(net, 32)
  assert one_line_error(e) == "unknown attention 'flash'; valid: xla, cudnn"


@needs_gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cudnn_fused_attention_agrees_with_xla(dtype):
  """Forward and backward: the fused kernel (float32 accumulation inside) against XLA's path."""
  q, k, v = _qkv(dtype)
  run = lambda impl: jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, implementation=impl))(q, k, v)
  fused, xla = run("cudnn"), run("xla")
  assert fused.dtype == xla.dtype == jnp.dtype(dtype)
  exact = exact_attention(q, k, v)
  assert_close(fused, exact, rtol=1e-2)
  assert_close(fused, np.asarray(xla, np.float64), rtol=1e-2)

  def grads(impl):
    loss = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(
        q, k, v, implementation=impl).astype(jnp.float32) * v[..., ::-1].astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  for a, b in zip(grads("cudnn"), grads("xla")):
    assert_close(a, np.asarray(b, np.float64), rtol=3e-2)


# --- a whole ViT ----------------------------------------------------------------------------------


def _vit(dtype, attention="xla"):
  return models.get("vit_b16_tiny", head="imagenet", num_classes=10, dtype=dtype,
                    attention=attention)


def _images(n=4, size=32):
  return np.random.default_rng(1).normal(size=(n, size, size, 3)).astype(np.float32)


def _forward(net, params, x, monkeypatch=None, reference=None):
  """`net`'s logits; with `reference`, every attention in it is the reference's instead."""
  if reference is None:
    return np.asarray(jax.jit(net.apply)({"params": params}, x), np.float64)
  seen = []

  def spy(q, k, v, **kw):
    seen.append(q.dtype)
    return reference(q, k, v)

  with monkeypatch.context() as m:
    m.setattr(jax.nn, "dot_product_attention", spy)
    out = np.asarray(jax.jit(net.apply)({"params": params}, x), np.float64)
  assert len(seen) == net.depth  # the model's attention is `jax.nn.dot_product_attention`
  assert set(seen) == {jnp.dtype(net.dtype)}
  return out


@pytest.fixture(scope="module")
def vit_params():
  params = models.init_params(_vit("float32"), 32, 0)
  # Weights of a trained net's scale (the fresh ones give near-uniform attention and logits).
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(
      lambda p: p + rng.normal(0, 0.3, p.shape).astype(np.float32), params)


def test_vit_forward_equals_the_net_on_reference_attention(vit_params, monkeypatch):
  x = _images()
  net = _vit("float32")
  got = _forward(net, vit_params, x)
  assert np.ptp(got, axis=0).max() > 0.1  # logits that differ between images
  assert_close(got, _forward(net, vit_params, x, monkeypatch, reference_attention), rtol=1e-5)


def test_bfloat16_vit_tracks_the_float32_one(vit_params, monkeypatch):
  x = _images()
  f32 = _forward(_vit("float32"), vit_params, x)
  net = _vit("bfloat16")
  bf16 = _forward(net, vit_params, x)
  assert_close(bf16, f32, rtol=5e-2)  # measured 2.2% of the largest logit (4)
  assert np.abs(bf16 - f32).max() > 1e-4  # it did compute in bfloat16
  # ... with the attention of the reference that takes its softmax in float32.
  assert_close(bf16, _forward(net, vit_params, x, monkeypatch, reference_attention), rtol=1e-2)


@needs_gpu
def test_cudnn_vit_tracks_the_xla_one(vit_params):
  """The whole bfloat16 ViT on cuDNN's kernel against the same net on XLA's attention."""
  x = _images()
  fused, xla = (_forward(_vit("bfloat16", impl), vit_params, x) for impl in ("cudnn", "xla"))
  assert_close(fused, xla, rtol=2e-2)
