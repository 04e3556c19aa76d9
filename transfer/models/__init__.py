"""Model registry: names -> Flax modules.

`get("vgg16", head="flatten_dense", num_classes=1)` returns an unbound `flax.linen.Module`.
`include_top=True` is the Keras spelling of `head="imagenet", num_classes=1000`.

Each entry is a `ModelSpec` (`transfer.models.spec`): how to build the module, its layers in
forward order with the kind of each, and its family's porting adapter. A family's module (`vgg`,
`resnet`, `inception`) declares its backbone on `backbone.Classifier` and says its layer kinds and
framework names; a new family adds its module and its lines in `_SPECS` below
(docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from transfer.errors import UserError
from transfer.models import inception, resnet, vgg, vit
from transfer.models.heads import HEADS, POOLINGS
from transfer.models.spec import (BATCH_NORM, CONV, DENSE, EMBEDDING, KINDS, LAYER_NORM,
                                  ModelSpec, Porting)
from transfer import platform
from transfer.platform import resolve_attention, resolve_conv

__all__ = ["BATCH_NORM", "CONV", "DENSE", "EMBEDDING", "KINDS", "LAYER_NORM", "ModelSpec",
           "Porting", "as_dtype", "check_image_size", "get", "init_params", "init_variables",
           "layer_kinds_of", "names", "resolve_dtype", "spec"]


def _vgg_spec(name: str, stage_sizes: tuple[int, ...], widths=(64, 128, 256, 512, 512),
              top_hidden: int = 4096) -> ModelSpec:
  def build(**kw):
    return vgg.VGG(stage_sizes=stage_sizes, arch=name, widths=widths, top_hidden=top_hidden, **kw)

  return ModelSpec(name=name, build=build, family="vgg", conv_layers=vgg.layer_names(stage_sizes),
                   top_layers=vgg.TOP_LAYERS, layer_kinds=vgg.layer_kinds(stage_sizes),
                   port=vgg.porting(stage_sizes))


def _resnet_spec(name: str, stage_sizes: tuple[int, ...], width: int = 64) -> ModelSpec:
  def build(variant=None, **kw):
    return resnet.ResNet(stage_sizes=stage_sizes, arch=name, width=width,
                         variant=variant or resnet.VARIANTS[1], **kw)

  return ModelSpec(name=name, build=build, family="resnet",
                   conv_layers=resnet.layer_names(stage_sizes), top_layers=("predictions",),
                   layer_kinds=resnet.layer_kinds(stage_sizes), port=resnet.porting(stage_sizes),
                   top_fixed_size=False, variants=(resnet.VARIANTS[1], resnet.VARIANTS[0]),
                   variant_traits={
                       "keras": "a Keras ResNet (v1: stride in the first 1x1, conv bias, "
                                "eps 1.001e-5)",
                       "torchvision": "a torchvision ResNet (v1.5: stride in the 3x3, no conv "
                                      "bias, eps 1e-5)"})


def _inception_spec(name: str, width_divisor: int = 1) -> ModelSpec:
  def build(variant=None, **kw):
    return inception.InceptionV3(arch=name, variant=variant or inception.VARIANTS[0],
                                 width_divisor=width_divisor, **kw)

  return ModelSpec(
      name=name, build=build, family="inception_v3", conv_layers=inception.layer_names(),
      top_layers=("predictions",), layer_kinds=inception.layer_kinds(), port=inception.porting(),
      top_image_size=299, min_image_size=75, top_fixed_size=False, variants=inception.VARIANTS,
      blocks=inception.BLOCK_NAMES, variant_traits={
          "keras": "a Keras InceptionV3 (BatchNorm without scale; average pools that do not "
                   "count padding)",
          "torchvision": "a torchvision InceptionV3 (BatchNorm with scale; average pools that "
                         "count padding)"})


def _vit_spec(name: str, patch: int, width: int, depth: int, num_heads: int,
              registers: int = 0, layer_scale: bool = False, top_image_size: int = 224,
              token_pool: str = "tok") -> ModelSpec:
  def build(**kw):
    kw.setdefault("token_pool", token_pool)
    return vit.ViT(arch=name, patch=patch, width=width, depth=depth, num_heads=num_heads,
                   mlp_dim=4 * width, registers=registers, layer_scale=layer_scale, **kw)

  return ModelSpec(
      name=name, build=build, family="dinov2" if layer_scale else "vit",
      conv_layers=vit.layer_names(depth, registers, layer_scale), top_layers=("predictions",),
      layer_kinds=vit.layer_kinds(depth, registers, layer_scale),
      port=vit.porting(depth, registers, layer_scale, patch), top_image_size=top_image_size,
      min_image_size=patch, feature_stride=patch, top_fixed_size=False,
      options=("token_pool", "drop_path_rate", "attention"), size_multiple=patch,
      layer_depth=functools.partial(vit.block_of, depth=depth))


def _dinov2_spec(name: str, width: int, depth: int, num_heads: int, registers: int = 0):
  # DINOv2 was trained at 518 (a 37 x 37 grid); its own evaluations run at 224.
  return _vit_spec(name, 14, width, depth, num_heads, registers, layer_scale=True,
                   top_image_size=224)


_SPECS = {
    "vgg16": _vgg_spec("vgg16", (2, 2, 3, 3, 3)),
    "vgg19": _vgg_spec("vgg19", (2, 2, 4, 4, 4)),
    # Same layer names and structure as VGG16 with 1/16 of the widths: for tests and demos.
    "vgg16_tiny": _vgg_spec("vgg16_tiny", (2, 2, 3, 3, 3), widths=(4, 8, 16, 32, 32), top_hidden=64),
    "resnet50": _resnet_spec("resnet50", (3, 4, 6, 3)),
    "resnet101": _resnet_spec("resnet101", (3, 4, 23, 3)),
    "resnet152": _resnet_spec("resnet152", (3, 8, 36, 3)),
    # ResNet50's layers and names at 1/16 of the width: for tests.
    "resnet50_tiny": _resnet_spec("resnet50_tiny", (3, 4, 6, 3), width=4),
    "inception_v3": _inception_spec("inception_v3"),
    # InceptionV3's layers and names at 1/8 of the width: for tests.
    "inception_v3_tiny": _inception_spec("inception_v3_tiny", width_divisor=8),
    "vit_s16": _vit_spec("vit_s16", 16, 384, 12, 6),
    "vit_b16": _vit_spec("vit_b16", 16, 768, 12, 12),
    "vit_b32": _vit_spec("vit_b32", 32, 768, 12, 12),
    "vit_l16": _vit_spec("vit_l16", 16, 1024, 24, 16),
    # A ViT's layers and names at width 32, 2 blocks: for tests.
    "vit_b16_tiny": _vit_spec("vit_b16_tiny", 16, 32, 2, 2),
    "dinov2_s14": _dinov2_spec("dinov2_s14", 384, 12, 6),
    "dinov2_b14": _dinov2_spec("dinov2_b14", 768, 12, 12),
    "dinov2_l14": _dinov2_spec("dinov2_l14", 1024, 24, 16),
    "dinov2_s14_reg4": _dinov2_spec("dinov2_s14_reg4", 384, 12, 6, registers=4),
    "dinov2_b14_reg4": _dinov2_spec("dinov2_b14_reg4", 768, 12, 12, registers=4),
    "dinov2_l14_reg4": _dinov2_spec("dinov2_l14_reg4", 1024, 24, 16, registers=4),
    # DINOv2's layers (LayerScale; with and without registers) at width 32, 2 blocks: for tests.
    "dinov2_s14_tiny": _dinov2_spec("dinov2_s14_tiny", 32, 2, 2),
    "dinov2_s14_reg4_tiny": _dinov2_spec("dinov2_s14_reg4_tiny", 32, 2, 2, registers=4),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def names() -> list[str]:
  """Registered model names."""
  return sorted(_SPECS)


def spec(name: str) -> ModelSpec:
  """The `ModelSpec` of `name`, with a one-line error listing valid names."""
  try:
    return _SPECS[name]
  except KeyError:
    raise UserError(f"unknown model {name!r}; valid models: {', '.join(names())}") from None


def layer_kinds_of(tree: Mapping[str, Any]) -> Mapping[str, str]:
  """The declared layer kinds of the registered architecture whose layers `tree` holds.

  For callers that hold a params (or label) tree but not its model: a tree's top-level layers
  (all but the new head) name the architecture, whose spec declares each layer's kind.

  Raises:
    UserError: no registered architecture has all of the tree's layers.
  """
  layers = {k for k in tree if k != "head"}
  for name in names():
    if layers <= _SPECS[name].layer_kinds.keys():
      return _SPECS[name].layer_kinds
  raise UserError(f"no registered model has the layers {sorted(layers)[:5]}...; pass the "
                  f"model's spec(name).layer_kinds")


def resolve_dtype(dtype: str, platform: str | None = None) -> str:
  """The compute dtype for a config's `dtype`, where `"auto"` picks by backend.

  bfloat16 halves memory traffic and runs on GPU tensor cores and TPU MXUs; XLA on CPU has no
  native bfloat16 convolution (it converts to float32 and back), so `"auto"` stays float32 there.
  """
  if dtype != "auto":
    return dtype
  platform = platform or jax.devices()[0].platform
  return "float32" if platform == "cpu" else "bfloat16"


CONVS = ("auto", "xla", "winograd")  # what a config's `conv` may say (the schema lists these)


def as_dtype(dtype: Any):
  """Accepts 'float32'/'bfloat16'/'float16'/'auto' strings or numpy/jax dtypes."""
  if isinstance(dtype, str):
    dtype = resolve_dtype(dtype)
    if dtype not in _DTYPES:
      raise UserError(f"unknown dtype {dtype!r}; valid dtypes: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]
  return dtype


def get(name: str, *, include_top: bool | None = None, head: str | None = None,
        num_classes: int | None = None, head_hidden: int | None = None,
        head_dropout: float | None = None, dtype: Any = "float32",
        param_dtype: Any = "float32", conv: str = "auto", variant: str | None = None,
        pooling: str | None = None, token_pool: str | None = None,
        drop_path_rate: float | None = None, attention: str = "auto") -> nn.Module:
  """Builds a registered model.

  Args:
    name: e.g. `"vgg16"`, `"vgg19"`; see `names()`.
    include_top: Keras' switch. True = the 1000-class ImageNet top (`head="imagenet"`); False with
      no `head` = the bare backbone (`head="none"`) returning block5_pool features.
    head: `"imagenet"`, `"flatten_dense"` (Flatten, Dense 256 relu, Dropout 0.6, Dense),
      `"gap"` (global average pool, Dense) or `"none"`.
    num_classes: head outputs; 1 means one sigmoid logit (binary). Defaults to 1000 for the
      ImageNet top and is required for the other heads.
    head_hidden, head_dropout: override the head's hidden width / dropout rate.
    dtype: compute dtype (`"bfloat16"` for mixed precision; `"auto"` = bfloat16 on GPU/TPU,
      float32 on CPU).
    param_dtype: parameter dtype.
    conv: convolution algorithm: `"auto"`, resolved here, once, for this machine
      (`transfer.platform.resolve_conv`: Winograd on CPU for the layers where it is faster, XLA
      on GPU/TPU), or a concrete choice (`"xla"`, `"winograd"`, `"winograd_from_N"`; see
      `transfer.models.winograd`). The module's `conv` holds the concrete choice, so the same
      choice gives the same program anywhere. It changes speed and float32 rounding, not the
      parameters.
    variant: for architectures that exist in several forms (`spec(name).variants`: ResNet's
      `"keras"` v1 and `"torchvision"` v1.5), the one to build; default the first. Weight files
      fit one variant only (`transfer.weights` says which).
    pooling: with `head="none"`, None returns the backbone's features unpooled (an NHWC map),
      `"avg"` / `"max"` one vector per image (Keras' `pooling`); only with `head="none"`.
    token_pool: a transformer's features (`spec(name).options`): `"tok"` the class token,
      `"gap"` the mean of the patch tokens, `"tok_gap"` both (DINOv2's linear probe), `"none"`
      the token sequence; None: `"tok"`.
    drop_path_rate: a transformer's stochastic depth in training (last block's rate, linear
      over depth); None: 0.
    attention: a transformer's attention implementation: `"auto"` (resolved here, once:
      `transfer.platform.resolve_attention`, cuDNN's fused kernel on an NVIDIA GPU in
      bfloat16/float16, else XLA's), `"xla"` or `"cudnn"`.

  Returns:
    An unbound `flax.linen.Module`; `module.apply({"params": p}, x)` gives float32 logits.
  """
  platform.setup()  # first use: XLA flags and compile cache as the CLI sets them (idempotent)
  model_spec = spec(name)
  if head is None:
    head = "imagenet" if include_top or include_top is None and num_classes is None else "none"
  elif include_top and head != "imagenet":
    raise UserError(f"include_top=True conflicts with head={head!r}; pass one of them")
  if head not in HEADS:
    raise UserError(f"unknown head {head!r}; valid heads: {', '.join(HEADS)}")
  if num_classes is None:
    if head in ("flatten_dense", "gap"):
      raise UserError(f"head={head!r} needs num_classes")
    num_classes = 1000
  if num_classes < 1:
    raise UserError(f"num_classes must be >= 1, got {num_classes}")
  if pooling not in POOLINGS:
    raise UserError(f"unknown pooling {pooling!r}; valid: None, 'avg', 'max'")
  if pooling is not None and head != "none":
    raise UserError(f"pooling={pooling!r} pools the features of a model without a classifier; "
                    f"head={head!r} has its own (drop pooling, or use head='none')")
  extra = {"pooling": pooling} if pooling is not None else {}
  if model_spec.variants:
    variant = variant or model_spec.variants[0]
    if variant not in model_spec.variants:
      raise UserError(f"unknown variant {variant!r} of {name}; valid: "
                      f"{', '.join(model_spec.variants)}")
    extra["variant"] = variant
  elif variant is not None:
    raise UserError(f"{name} has no variants; drop variant={variant!r}")
  given = {"token_pool": token_pool, "drop_path_rate": drop_path_rate}
  for option, value in given.items():
    if value is not None and option not in model_spec.options:
      raise UserError(f"{name} has no {option} (a transformer's option); drop "
                      f"{option}={value!r}")
    if value is not None:
      extra[option] = value
  if "attention" in model_spec.options:
    extra["attention"] = resolve_attention(attention, as_dtype(dtype))
  return model_spec.build(head=head, num_classes=num_classes, head_hidden=head_hidden,
                          head_dropout=head_dropout, dtype=as_dtype(dtype),
                          param_dtype=as_dtype(param_dtype), conv=resolve_conv(conv), **extra)


def init_params(model: nn.Module, image_size: int, rng: jax.Array | int = 0):
  """Freshly initialised float params for `model` on `image_size` x `image_size` RGB input
  (`init_variables`' params)."""
  return init_variables(model, image_size, rng)["params"]


def init_variables(model: nn.Module, image_size: int, rng: jax.Array | int = 0) -> dict:
  """All of a fresh model's collections: `params`, and `batch_stats` for BatchNorm networks
  (running means 0, variances 1).

  `lazy_init` on a shape-only input runs the initialisers without the forward pass, eagerly:
  each initialiser op is compiled once per shape and process, and kept in the persistent
  compilation cache (`transfer.platform.compile_cache`), so a second process reads them back.
  One `jax.jit` of the whole init gives the same values but took XLA:CPU twice as long to
  compile (its ~270 inlined threefry generators; docs/BENCHMARKS.md, "Seconds to the first
  step"). Under `jax.eval_shape` (shapes only) nothing is compiled.
  """
  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return dict(model.lazy_init(rng, x))


def check_image_size(name: str, head: str, image_size: int) -> None:
  """Raises a one-line error for an input size the model cannot take."""
  s = spec(name)
  if head == "imagenet" and s.top_fixed_size and image_size != s.top_image_size:
    raise UserError(f"the ImageNet top of {name} needs {s.top_image_size}x{s.top_image_size} "
                     f"input, got {image_size}; use another head for other sizes")
  if image_size % s.size_multiple:
    raise UserError(f"{name} takes input sides that are multiples of its patch "
                    f"({s.size_multiple}), got {image_size}; e.g. "
                    f"{image_size // s.size_multiple * s.size_multiple or s.size_multiple}")
  if image_size < s.min_image_size:
    raise UserError(f"{name} needs input of at least {s.min_image_size}x{s.min_image_size}, "
                     f"got {image_size}")
