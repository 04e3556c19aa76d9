"""Vision Transformers (Dosovitskiy et al., 2020) and DINOv2 (Oquab et al., 2023) in Flax linen.

One module, `ViT`, on the backbone protocol (`backbone.Classifier`), covers every published form
the package loads: timm's and Google's AugReg ViTs, torchvision's `vit_b_16`/`vit_b_32`/`vit_l_16`
(their SWAG weights too) and DINOv2 with and without registers. They differ only in fields:

| | AugReg (timm, Google) | torchvision | DINOv2 |
| --- | --- | --- | --- |
| patch | 16 or 32 | 16 or 32 | 14 |
| LayerScale (`layer_scale`) | no | no | yes |
| register tokens (`registers`) | 0 | 0 | 0 or 4 |

Every form is pre-norm: `x + ls1(attn(norm1(x)))`, then `x + ls2(mlp(norm2(x)))`, LayerNorm
epsilon 1e-6, an exact (erf) GELU, one `qkv` projection with bias. The class token's position
embedding is the first row of `pos_embedding` (timm's files for DINOv2 with registers fold it
into the class token; loading puts a zero row there, which computes the same); register tokens
take no position embedding and sit between the class token and the patches, as in DINOv2.

Layer names are flat and stable, for freezing patterns and the porting adapter:

  patch_embed, cls_token, reg_token, pos_embedding,
  block{i}_norm1, block{i}_attn_qkv, block{i}_attn_proj, block{i}_ls1,
  block{i}_norm2, block{i}_mlp_fc1, block{i}_mlp_fc2, block{i}_ls2,   (i = 0 .. depth - 1)
  final_norm, predictions (the ImageNet top)

so `trainable=("^block(9|10|11)_", "^final_norm")` trains the top three blocks of a ViT-B.

The backbone's features (`stage="features"`) are the final-normed tokens pooled as `token_pool`
says: `"tok"` the class token (timm's and torchvision's classifier input), `"gap"` the mean of
the patch tokens, `"tok_gap"` both concatenated (DINOv2's linear-probe input, 2 x width), or
`"none"` the whole token sequence (N, 1 + registers + patches, width). Every head takes them.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from transfer.errors import UserError
from transfer.models.backbone import Classifier
from transfer.models.spec import CONV, DENSE, EMBEDDING, LAYER_NORM, Porting

TOKEN_POOLS = ("tok", "gap", "tok_gap", "none")
# The attention implementations `jax.nn.dot_product_attention` offers: XLA's (any backend) and
# cuDNN's fused kernel (NVIDIA GPUs, float16/bfloat16). `platform.resolve_attention` picks one.
ATTENTIONS = ("xla", "cudnn")
_EPSILON = 1e-6  # every published ViT and DINOv2 (timm, torchvision, big_vision)

_BLOCK_LAYERS = (("norm1", LAYER_NORM), ("attn_qkv", DENSE), ("attn_proj", DENSE),
                 ("ls1", EMBEDDING), ("norm2", LAYER_NORM), ("mlp_fc1", DENSE),
                 ("mlp_fc2", DENSE), ("ls2", EMBEDDING))
# Our block layer -> timm's (and DINOv2's) module under `blocks.{i}`.
_TIMM_BLOCK = {"norm1": "norm1", "attn_qkv": "attn.qkv", "attn_proj": "attn.proj",
               "ls1": "ls1", "norm2": "norm2", "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2",
               "ls2": "ls2"}


def layer_names(depth: int, registers: int = 0, layer_scale: bool = False) -> tuple[str, ...]:
  """The backbone's layers in forward order."""
  names = ["patch_embed", "cls_token"] + (["reg_token"] if registers else []) + ["pos_embedding"]
  for i in range(depth):
    names += [f"block{i}_{n}" for n, _ in _BLOCK_LAYERS if layer_scale or not n.startswith("ls")]
  return tuple(names + ["final_norm"])


def layer_kinds(depth: int, registers: int = 0, layer_scale: bool = False) -> dict[str, str]:
  """Every backbone and top layer -> its kind: the patch embedding a conv, the tokens, position
  embeddings and layer scales learned tensors (`embedding`), norms LayerNorm, the rest dense."""
  block_kinds = dict(_BLOCK_LAYERS)
  kinds = {"patch_embed": CONV, "cls_token": EMBEDDING, "reg_token": EMBEDDING,
           "pos_embedding": EMBEDDING, "final_norm": LAYER_NORM, "predictions": DENSE}
  return {name: kinds.get(name) or block_kinds[name.split("_", 1)[1]]
          for name in layer_names(depth, registers, layer_scale) + ("predictions",)}


def block_of(layer: str, depth: int) -> int:
  """The depth a layer sits at, for layer-wise learning-rate decay, as timm groups a ViT
  (`group_matcher`): 0 for the embeddings (patch, tokens, positions), i + 1 for `block{i}_*`,
  depth for `final_norm` (timm's `^norm` joins the last block), depth + 1 for the top and
  any other layer (the new `head`)."""
  if layer.startswith("block") and "_" in layer:
    return int(layer[len("block"):layer.index("_")]) + 1
  if layer in ("patch_embed", "cls_token", "reg_token", "pos_embedding"):
    return 0
  return depth if layer == "final_norm" else depth + 1


def torch_names(depth: int, registers: int = 0, layer_scale: bool = False) -> dict[str, str]:
  """Our layer name -> timm's state-dict prefix (`block3_attn_qkv` -> `blocks.3.attn.qkv`)."""
  names = {"patch_embed": "patch_embed.proj", "cls_token": "cls_token", "reg_token": "reg_token",
           "pos_embedding": "pos_embed", "final_norm": "norm", "predictions": "head"}
  out = {}
  for layer in layer_names(depth, registers, layer_scale) + ("predictions",):
    if layer in names:
      out[layer] = names[layer]
    else:
      block, part = layer.split("_", 1)
      out[layer] = f"blocks.{block[len('block'):]}.{_TIMM_BLOCK[part]}"
  return out


def porting(depth: int, registers: int = 0, layer_scale: bool = False,
            patch: int = 16) -> Porting:
  """The ViT family's adapter: timm's names, the other publishers' files renamed to them
  (`transfer.models.vit_port`), and the position embeddings resampled to the model's grid as
  the file's own framework does it."""
  from transfer.models import vit_port
  return Porting(torch_names=torch_names(depth, registers, layer_scale),
                 torch_ignored=vit_port.IGNORED, convert=vit_port.to_timm_names,
                 dialect=vit_port.dialect, resample=vit_port.resample,
                 unsupported=vit_port.unsupported_structure,
                 trained_size=lambda view: vit_port.trained_size(view, patch),
                 torch_params={f"block{i}_{ls}": "gamma" for i in range(depth)
                               for ls in ("ls1", "ls2") if layer_scale})


class Learned(nn.Module):
  """One learned tensor as a layer of its own (`embedding`): a class or register token, the
  position embeddings, a layer scale. A layer is a dict of arrays, as the merge expects."""

  shape: Sequence[int]
  init: nn.initializers.Initializer = nn.initializers.normal(0.02)
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self):
    return self.param("embedding", self.init, tuple(self.shape), self.param_dtype)


def drop_path(x, rate: float, key, example_ids):
  """Stochastic depth: each example's residual branch dropped with probability `rate` (scaled
  by 1 / (1 - rate) when kept). Masks are keyed by the example's global index when given, so
  they do not depend on how the batch is split over devices."""
  keep = 1.0 - rate
  if example_ids is None:
    mask = jax.random.bernoulli(key, keep, (x.shape[0],))
  else:
    mask = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(key, i), keep))(example_ids)
  return x * (mask / keep).astype(x.dtype)[:, None, None]


class ViT(Classifier):
  """A Vision Transformer (or DINOv2) backbone on `Classifier`'s protocol.

  Attributes (besides `Classifier`'s; `"imagenet"` is `predictions` on the pooled features):
    patch: patch side (16, 32; 14 for DINOv2); the input side must be a multiple of it.
    width: token width (384 S, 768 B, 1024 L).
    depth: transformer blocks.
    num_heads: attention heads.
    mlp_dim: hidden width of each block's MLP (4 x width).
    registers: register tokens (DINOv2 with registers: 4).
    layer_scale: a learned per-channel scale on each residual branch (DINOv2).
    token_pool: how the tokens become the features (`TOKEN_POOLS`, module docstring).
    drop_path_rate: stochastic depth of the last block in training; block i drops its residual
      branches with rate * i / (depth - 1) (linear over depth, as timm and DINOv2).
    attention: `"xla"` or `"cudnn"` (`jax.nn.dot_product_attention`'s implementation; the
      config's `"auto"` is resolved once by `transfer.platform.resolve_attention`).
  """

  patch: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  registers: int = 0
  layer_scale: bool = False
  token_pool: str = "tok"
  drop_path_rate: float = 0.0
  attention: str = "xla"

  def check(self) -> None:
    if self.token_pool not in TOKEN_POOLS:
      raise UserError(f"unknown token_pool {self.token_pool!r}; valid: {', '.join(TOKEN_POOLS)}")
    if self.attention not in ATTENTIONS:
      raise UserError(f"unknown attention {self.attention!r}; valid: {', '.join(ATTENTIONS)}")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise UserError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

  def _dense(self, features: int, name: str):
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def _norm(self, name: str):
    return nn.LayerNorm(epsilon=_EPSILON, dtype=self.dtype, param_dtype=self.param_dtype,
                        name=name)

  def backbone(self, x, train: bool = False, example_ids=None):
    n, h, w, _ = x.shape
    if h % self.patch or w % self.patch:
      raise UserError(f"{self.arch} takes input sides that are multiples of its patch "
                      f"({self.patch}), got {h}x{w}")
    x = nn.Conv(self.width, (self.patch, self.patch), strides=(self.patch, self.patch),
                padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
                name="patch_embed")(x)
    x = x.reshape(n, -1, self.width)
    learned = lambda shape, name, init=nn.initializers.normal(0.02): Learned(
        shape, init, self.param_dtype, name=name)()
    cls = jnp.broadcast_to(learned((1, 1, self.width), "cls_token"), (n, 1, self.width))
    x = jnp.concatenate([cls.astype(self.dtype), x], axis=1)
    x = x + learned((1, x.shape[1], self.width), "pos_embedding").astype(self.dtype)
    if self.registers:
      reg = learned((1, self.registers, self.width), "reg_token")
      reg = jnp.broadcast_to(reg, (n, self.registers, self.width)).astype(self.dtype)
      x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
    for i in range(self.depth):
      rate = self.drop_path_rate * i / max(self.depth - 1, 1)
      x = self._block(x, f"block{i}", rate if train else 0.0, example_ids)
    x = self._norm("final_norm")(x)
    return self._pool(x)

  def _block(self, x, name: str, rate: float, example_ids):
    def residual(x, y, scale):
      if self.layer_scale:
        y = y * Learned((self.width,), nn.initializers.constant(1e-5), self.param_dtype,
                        name=f"{name}_{scale}")().astype(self.dtype)
      if rate > 0.0:
        y = drop_path(y, rate, self.make_rng("dropout"), example_ids)
      return x + y

    x = residual(x, self._attention(self._norm(f"{name}_norm1")(x), name), "ls1")
    y = self._dense(self.mlp_dim, f"{name}_mlp_fc1")(self._norm(f"{name}_norm2")(x))
    y = self._dense(self.width, f"{name}_mlp_fc2")(nn.gelu(y, approximate=False))
    return residual(x, y, "ls2")

  def _attention(self, x, name: str):
    n, t, _ = x.shape
    heads, head_dim = self.num_heads, self.width // self.num_heads
    qkv = self._dense(3 * self.width, f"{name}_attn_qkv")(x).reshape(n, t, 3, heads, head_dim)
    # Softmax in float32 whatever the compute dtype (XLA's path promotes the logits; cuDNN's
    # kernel accumulates in float32).
    y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                     implementation=self.attention)
    return self._dense(self.width, f"{name}_attn_proj")(y.reshape(n, t, self.width))

  def _pool(self, x):
    # The patch tokens' mean is taken in float32 (a bfloat16 sum of 256 tokens loses digits).
    patches = lambda: jnp.mean(x[:, 1 + self.registers:].astype(jnp.float32), axis=1).astype(
        self.dtype)
    if self.token_pool == "tok":
      return x[:, 0]
    if self.token_pool == "gap":
      return patches()
    if self.token_pool == "tok_gap":
      return jnp.concatenate([x[:, 0], patches()], axis=-1)
    return x

  def imagenet_top(self, x):
    """`predictions` on the pooled features (the class token for timm's and torchvision's
    classifiers; with `token_pool="none"`, the class token of the sequence)."""
    if x.ndim == 3:
      x = x[:, 0]
    return self._dense(self.num_classes, "predictions")(x)
