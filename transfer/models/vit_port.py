"""The ViT family's porting adapter: every publisher's files under timm's names, and position
embeddings resampled as the file's own framework resamples them.

timm's state-dict names are the family's canonical torch names (`vit.torch_names`). The other
publishers' files are renamed (and, for Google's `.npz`, brought to torch's layouts) by
`to_timm_names`, lazily, so the generic porting (`transfer.weights.port`) reads one naming:

| dialect | recognised by | what changes |
| --- | --- | --- |
| `timm` | anything else | nothing |
| `torchvision` | `encoder.layers.*` | `conv_proj` -> `patch_embed.proj`, `class_token`, `encoder.pos_embedding`, `ln_1`, `self_attention.in_proj_*` (already q, k, v stacked as timm's `qkv`), `out_proj`, `mlp.0`/`mlp.3`, `encoder.ln`, `heads.head` |
| `dinov2`, `dinov2_reg` | `mask_token`; `register_tokens` | `register_tokens` -> `reg_token`; `mask_token` (for masked training) left out |
| `big_vision` | an `.npz` file | Flax paths and layouts (`Transformer/encoderblock_3/MultiHeadDotProductAttention_1/query/kernel`, (in, heads, head_dim)) -> timm's names and torch's layouts |

The dialect also decides how the position embeddings are resampled to the model's patch grid
when the file was trained at another resolution (`transfer.models.pos_embed`): timm's
`resample_abs_pos_embed` (timm's files and Google's, which timm's npz loader resamples),
torchvision's `interpolate_embeddings`, DINOv2's own interpolation (its models with registers
interpolate as timm does). The class token's row is
kept; timm's files for DINOv2 with registers have none (timm folds it into the class token),
so a zero row takes its place.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import numpy as np

IGNORED = ("mask_token",)  # DINOv2's token for masked-image training; not used on images
# DINOv2's hub models without registers interpolate with an offset of 0.1 and no antialias;
# those with registers as timm does (`interpolate_offset=0`, antialias: `dinov2/hub/backbones.py`).
_METHOD = {"timm": "timm", "big_vision": "timm", "torchvision": "torchvision",
           "dinov2": "dinov2", "dinov2_reg": "timm"}

_TORCHVISION = (
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^class_token$", "cls_token"),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (r"^encoder\.ln\.", "norm."),
    (r"^heads\.head\.", "head."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)$",
     r"blocks.\1.attn.qkv.\2"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.",
     r"blocks.\1.attn.proj."),
    # torchvision's MLPBlock: `mlp.0`/`mlp.3` (files before 0.13: `mlp.linear_1`/`linear_2`).
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:0|linear_1)\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:3|linear_2)\.", r"blocks.\1.mlp.fc2."),
)
_BIG_VISION_BLOCK = {"LayerNorm_0": "norm1", "LayerNorm_2": "norm2",
                     "MlpBlock_3/Dense_0": "mlp.fc1", "MlpBlock_3/Dense_1": "mlp.fc2",
                     "MultiHeadDotProductAttention_1/out": "attn.proj"}
_BIG_VISION = {"embedding": "patch_embed.proj", "cls": "cls_token",
               "Transformer/posembed_input/pos_embedding": "pos_embed",
               "Transformer/encoder_norm": "norm", "head": "head"}
_FLAX_PARAM = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def dialect(fmt: str, keys: Sequence[str]) -> str:
  """Who wrote a file of the family: `timm`, `torchvision`, `dinov2` or `big_vision`."""
  if fmt == "npz":
    return "big_vision"
  keys = set(keys)
  if any(k.startswith("encoder.layers.") for k in keys):
    return "torchvision"
  if "register_tokens" in keys:
    return "dinov2_reg"
  if "mask_token" in keys:
    return "dinov2"
  return "timm"


def to_timm_names(fmt: str, tensors: Mapping[str, Any]) -> dict[str, Any]:
  """A file's tensors (full key -> `transfer.weights.formats.Tensor`; the models package
  does not import the weights package) under timm's names, in torch's layouts."""
  kind = dialect(fmt, list(tensors))
  if kind == "timm":
    return dict(tensors)
  if kind.startswith("dinov2"):
    return {("reg_token" if k == "register_tokens" else k): _named(t, "reg_token")
            if k == "register_tokens" else t for k, t in tensors.items()}
  if kind == "torchvision":
    out = {}
    for key, t in tensors.items():
      new = key
      for pattern, repl in _TORCHVISION:
        if re.search(pattern, key):
          new = re.sub(pattern, repl, key)
          break
      out[new] = _named(t, new)
    return out
  return _from_big_vision(tensors)


def _derived(parts, name: str, shape=None, read=None):
  """A tensor made from the file's tensor(s) `parts` (renamed by default), remembering the file
  keys it came from (`Tensor.sources`)."""
  parts = parts if isinstance(parts, (list, tuple)) else [parts]
  first = parts[0]
  sources = tuple(k for p in parts for k in (p.sources or (p.name,)))
  return type(first)(name, first.shape if shape is None else tuple(shape),
                     first.read if read is None else read, sources)


def _named(t, name: str):
  return _derived(t, name)


def _from_big_vision(tensors: Mapping[str, Any]) -> dict[str, Any]:
  """Google's AugReg `.npz` (vision_transformer / big_vision Flax paths) -> timm's names and
  torch's layouts: conv HWIO -> OIHW, dense (in, out) -> (out, in), the attention's separate
  query/key/value kernels (in, heads, head_dim) stacked into one `qkv` (3 x width, in)."""
  out, pending = {}, {}
  for key, t in tensors.items():
    layer, _, param = key.rpartition("/")
    block = re.match(r"^Transformer/encoderblock_(\d+)/(.+)$", layer)
    if block:
      i, part = block.groups()
      attn = re.match(r"^MultiHeadDotProductAttention_1/(query|key|value)$", part)
      if attn:
        pending.setdefault((i, param), {})[attn.group(1)] = t
        continue
      if part in _BIG_VISION_BLOCK:
        name = f"blocks.{i}.{_BIG_VISION_BLOCK[part]}.{_FLAX_PARAM.get(param, param)}"
        out[name] = _torch_layout(t, name, attn_out=part.endswith("/out"))
        continue
    elif layer in _BIG_VISION or key in _BIG_VISION:
      if key in _BIG_VISION:  # a bare array: `cls`, the position embeddings
        out[_BIG_VISION[key]] = _named(t, _BIG_VISION[key])
        continue
      name = f"{_BIG_VISION[layer]}.{_FLAX_PARAM.get(param, param)}"
      out[name] = _torch_layout(t, name)
      continue
    out[key] = t  # unknown: shows up as unexpected
  for (i, param), parts in pending.items():
    name = f"blocks.{i}.attn.qkv.{_FLAX_PARAM.get(param, param)}"
    out[name] = _stacked_qkv(parts, name)
  return out


def _torch_layout(t, name: str, attn_out: bool = False):
  """A Flax array in torch's layout: conv kernels OIHW, dense kernels (out, in); the attention
  output's (heads, head_dim, width) kernel flattened to (width, heads x head_dim) first."""
  if attn_out and len(t.shape) == 3:
    h, d, c = t.shape
    return _derived(t, name, (c, h * d),
                    lambda: np.ascontiguousarray(t.read().reshape(h * d, c).T))
  if len(t.shape) == 4:
    return _derived(t, name, (t.shape[3], t.shape[2], t.shape[0], t.shape[1]),
                    lambda: np.ascontiguousarray(np.transpose(t.read(), (3, 2, 0, 1))))
  if len(t.shape) == 2:
    return _derived(t, name, t.shape[::-1], lambda: np.ascontiguousarray(t.read().T))
  return _named(t, name)


def _stacked_qkv(parts: Mapping[str, Any], name: str):
  """Query, key and value kernels (in, heads, head_dim) or biases (heads, head_dim) -> timm's
  `qkv` weight (3 x width, in) or bias (3 x width)."""
  if set(parts) != {"query", "key", "value"}:
    missing = sorted({"query", "key", "value"} - set(parts))
    raise ValueError(f"{name}: the file lacks the attention's {', '.join(missing)}")
  q, k, v = (parts[p] for p in ("query", "key", "value"))
  if len(q.shape) == 3:
    c, h, d = q.shape
    read = lambda: np.concatenate([p.read().reshape(c, h * d).T for p in (q, k, v)], axis=0)
    return _derived([q, k, v], name, (3 * h * d, c), read)
  h, d = q.shape
  return _derived([q, k, v], name, (3 * h * d,),
                  lambda: np.concatenate([p.read().reshape(-1) for p in (q, k, v)]))


def resample(layer: str, param: str, file_shape: tuple, model_shape: tuple,
             dialect: str | None = None):
  """A function bringing a file's position embeddings to the model's patch grid (the class
  token's row kept, or a zero row where the file has none), or None for any other misfit.

  Args:
    layer, param: where the array goes (`pos_embedding`, `embedding`).
    file_shape, model_shape: (1, rows, width) each; the model's rows are 1 + grid^2.
    dialect: the file's publisher (`dialect`), whose resampling is used; None (recognition,
      where only shapes matter) resamples as timm.
  """
  if (layer, param) != ("pos_embedding", "embedding") or len(file_shape) != 3 \
      or len(model_shape) != 3 or file_shape[2] != model_shape[2]:
    return None
  grid = _square(model_shape[1] - 1)
  if grid is None:
    return None
  prefix = 0 if _square(file_shape[1]) else 1  # timm's reg4 DINOv2: no class-token row
  old = _square(file_shape[1] - prefix)
  if old is None:
    return None
  method = _METHOD[dialect or "timm"]

  def convert(pos: np.ndarray) -> np.ndarray:
    from transfer.models import pos_embed
    if not prefix:
      pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
    return pos_embed.resample(pos, 1, (grid, grid), method, old_hw=(old, old))

  return convert


def trained_size(view, patch: int) -> int | None:
  """The input side a file was trained at: its position grid (with or without the class
  token's row) times the patch; None without position embeddings."""
  pos = view.get("pos_embedding", {}).get("embedding")
  if pos is None or len(pos.shape) != 3:
    return None
  grid = _square(pos.shape[1]) or _square(pos.shape[1] - 1)
  return grid * patch if grid else None


def _square(rows: int) -> int | None:
  side = math.isqrt(rows) if rows > 0 else 0
  return side if side and side * side == rows else None


def unsupported_structure(keys: Sequence[str]) -> str | None:
  """Forms of the family this package does not build, with the reason."""
  if any(k.startswith("heads.pre_logits") or k.startswith("pre_logits") for k in keys):
    return ("a ViT with a representation layer (pre_logits) before its head is not supported; "
            "the published ImageNet-1k weights have none")
  if any(re.match(r"^blocks\.\d+\.mlp\.w12", k) for k in keys):
    return "DINOv2 ViT-g's SwiGLU MLP is not supported (ViT-S/B/L are)"
  return None
