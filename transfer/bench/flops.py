"""FLOP counts of a benchmarked step (XLA's own, or counted from the shapes) and the device peaks
that turn achieved TFLOP/s into MFU."""

from __future__ import annotations

import re

import numpy as np

# Dense peak TFLOP/s of one JAX device: (bfloat16, float32). float32 uses the TF32 tensor-core
# figure on NVIDIA Ampere and later (XLA's default precision for float32 convolutions there) and
# the bfloat16 figure on TPU (default precision is one bfloat16 pass). v2/v3 devices are cores.
# Ordered: the first pattern found in `device_kind` wins, so specific names come first.
PEAK_TFLOPS: tuple[tuple[str, tuple[float, float]], ...] = (
    (r"\bH200\b", (989.0, 494.0)),
    (r"\bH100 PCIe\b", (756.0, 378.0)),
    (r"\bH100\b", (989.0, 494.0)),
    (r"\bGH200\b", (989.0, 494.0)),
    (r"\bB200\b", (2250.0, 1100.0)),
    (r"\bA100\b", (312.0, 156.0)),
    (r"\bL40S\b", (362.0, 183.0)),
    (r"\bL4\b", (121.0, 60.0)),
    (r"\bA10G?\b", (125.0, 62.5)),
    (r"\bTPU v6 lite\b", (918.0, 918.0)),
    (r"\bTPU v5 lite\b", (197.0, 197.0)),
    (r"\bTPU v5p?\b", (459.0, 459.0)),
    (r"\bTPU v4\b", (275.0, 275.0)),
    (r"\bTPU v3\b", (61.5, 61.5)),
    (r"\bTPU v2\b", (22.5, 22.5)),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """Peak dense TFLOP/s of one device of `device_kind` in `dtype`; None when unknown."""
  for pattern, (bf16, fp32) in PEAK_TFLOPS:
    if re.search(pattern, device_kind):
      return bf16 if dtype in ("bfloat16", "float16") else fp32
  return None


def analytic_flops(params, model_name: str, image_size: int, batch: int, labels=None,
                   stage: str = "full", model=None) -> float:
  """Multiply-add FLOPs (2 per MAC) of one step, counted from the parameter shapes.

  The forward pass costs 2*MACs for every conv and dense layer. With `labels` (a train step) the
  backward pass adds, for each layer from the first trainable one on, the input gradient
  (another forward's worth; not needed by the first trainable layer itself) and, for trainable
  layers, the weight gradient (one more). A frozen conv base therefore adds nothing, and a trainable
  block5 adds block5's backward only. Bias adds, normalisation, activations and pooling are not
  counted.

  Args:
    params: the params tree (its shapes are read).
    model_name: registry name, for the backbone's layer order.
    image_size: input side.
    batch: global batch size.
    labels: the optimizer's label tree for a train step; None for a forward pass.
    stage: `"full"` or `"head"` (cached features: only the head runs).
    model: the module, whose conv output sizes are traced (default: the registry's default
      variant of `model_name`; strides differ between variants).
  """
  from flax import traverse_util
  from transfer import models, optim

  flat = traverse_util.flatten_dict(params)
  trainable = (traverse_util.flatten_dict(optim.trainable_mask(labels)) if labels is not None
               else {})
  layers = {k[:-1] for k in flat if k[-1] == "kernel"}
  conv_layers = [n for n in models.spec(model_name).conv_layers if (n,) in layers]
  order = [(name,) for name in conv_layers] + sorted(l for l in layers if l[0] not in conv_layers)
  sides = conv_output_positions(model or models.get(model_name, head="none"), image_size)
  total, seen_trainable = 0.0, False
  for layer in order:
    kernel = flat[layer + ("kernel",)]
    if layer[0] in conv_layers:
      if stage == "head":
        continue
      forward = 2.0 * batch * sides[layer[0]] * int(np.prod(kernel.shape))
    else:
      forward = 2.0 * batch * int(np.prod(kernel.shape))
    total += forward
    is_trainable = bool(trainable.get(layer + ("kernel",), False))
    if seen_trainable:
      total += forward  # input gradient
    if is_trainable:
      total += forward  # weight gradient
      seen_trainable = True
  return total


def conv_output_positions(model, image_size: int) -> dict[str, int]:
  """Output positions (H x W) of every convolution of `model` on one `image_size` input.

  Traced with shapes only (Flax's method interception), so strides and paddings are the model's
  own rather than a rule per architecture.
  """
  import flax.linen as nn
  import jax
  positions = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
      positions[context.module.name] = int(out.shape[1] * out.shape[2])
    return out

  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
  return positions


def xla_flops(compiled, num_devices: int) -> float | None:
  """Global FLOPs of one call of a compiled SPMD step from XLA's cost analysis (None if absent).

  The analysis describes one device's partition of the program, hence the factor.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # Some backends do not implement it.
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"]) * num_devices
