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

  The forward pass costs 2*MACs for every conv and dense layer (a dense layer once per position
  it is applied at: per image for a head, per token in a transformer) and for every product of
  two activations (attention's scores and weighted sum). With `labels` (a train step) the backward
  pass adds, for each layer from the first trainable one on, the input gradient (another forward's
  worth; not needed by the first trainable layer itself) and, for trainable layers, the weight
  gradient (one more); an activation product adds one forward's worth per operand that depends
  on a trainable parameter. A frozen backbone therefore adds nothing, and a trainable block5
  adds block5's backward only. Bias adds, normalisation, activations, softmax and pooling are not
  counted.

  Args:
    params: the params tree (its shapes are read).
    model_name: registry name, for the backbone's layer order.
    image_size: input side.
    batch: global batch size.
    labels: the optimizer's label tree for a train step; None for a forward pass.
    stage: `"full"` or `"head"` (cached features: only the head runs).
    model: the module, whose layers' output positions are traced (default: the registry's
      default variant of `model_name`; strides differ between variants).
  """
  from flax import traverse_util
  from transfer import models, optim

  flat = traverse_util.flatten_dict(params)
  trainable = (traverse_util.flatten_dict(optim.trainable_mask(labels)) if labels is not None
               else {})
  layers = {k[:-1] for k in flat if k[-1] == "kernel"}
  conv_layers = [n for n in models.spec(model_name).conv_layers if (n,) in layers]
  order = [(name,) for name in conv_layers] + sorted(l for l in layers if l[0] not in conv_layers)
  model = model or models.get(model_name, head="none")
  positions = layer_positions(model, image_size)
  total, seen_trainable = 0.0, False
  for layer in order:
    if stage == "head" and layer[0] in conv_layers:
      continue
    forward = 2.0 * batch * positions.get(layer, 1) * int(np.prod(flat[layer + ("kernel",)].shape))
    total += forward
    is_trainable = bool(trainable.get(layer + ("kernel",), False))
    if seen_trainable:
      total += forward  # input gradient
    if is_trainable:
      total += forward  # weight gradient
      seen_trainable = True
  if stage != "head":
    trained = {k[:-1] for k, v in trainable.items() if v}
    for flops, upstream in activation_products(model, image_size):
      total += batch * flops * (1 + sum(bool(u & trained) for u in upstream))
  return total


def layer_positions(model, image_size: int) -> dict[tuple[str, ...], int]:
  """Positions each conv and dense layer of `model` is applied at, on one `image_size` input:
  H x W of a convolution's output, the tokens of a dense layer on a sequence, 1 on a vector.

  Keyed by the layer's path in the params tree. Traced with shapes only (Flax's method
  interception), so strides and paddings are the model's own rather than a rule per architecture.
  """
  import flax.linen as nn
  import jax
  positions = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, (nn.Conv, nn.Dense)) and context.method_name == "__call__":
      positions[tuple(context.module.scope.path)] = int(np.prod(out.shape[1:-1]))
    return out

  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
  return positions


def activation_products(model, image_size: int) -> list[tuple[float, list[frozenset]]]:
  """The matrix products of two activations in `model`'s inference forward pass on one
  `image_size` image (attention's query-key scores and weighted values; none in a CNN).

  Returns (FLOPs, [for each operand, the param layers it depends on]) per product, found by
  following which layers' params and whether the image flow into each value of the traced
  program (a product with a weight, a Winograd kernel transform included, is a layer's and
  counted from its kernel shape instead).
  """
  import jax
  from flax import traverse_util
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
  leaves = jax.tree_util.tree_leaves_with_path(variables)
  closed = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x)
  sources = []
  for path, _ in leaves:
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    sources.append(frozenset({keys[1:-1]}) if keys[0] == "params" else frozenset())
  image = frozenset({("<image>",)})
  products = []
  _follow(closed.jaxpr, sources + [image], image, products)
  return products


def _follow(jaxpr, taints, image, products) -> list[frozenset]:
  """Propagates what each value of `jaxpr` depends on (param layer paths, `image`), recording
  products of two image-dependent operands; returns the outputs' dependencies."""
  env = dict(zip(jaxpr.invars, taints))
  env.update((v, frozenset()) for v in jaxpr.constvars)
  taint = lambda v: frozenset() if hasattr(v, "val") else env.get(v, frozenset())
  for eqn in jaxpr.eqns:
    ins = [taint(v) for v in eqn.invars]
    inner = [getattr(p, "jaxpr", p) for p in eqn.params.values()]
    inner = [j for j in inner if hasattr(j, "eqns") and len(j.invars) == len(ins)]
    if inner:  # a nested call (jit, custom_jvp): follow its body
      outs = _follow(inner[0], ins, image, products)
    else:
      outs = [frozenset().union(*ins)] * len(eqn.outvars)
      if eqn.primitive.name == "dot_general" and all(image <= t for t in ins):
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        macs = np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contract])
        products.append((2.0 * float(macs), [t - image for t in ins]))
    env.update(zip(eqn.outvars, outs))
  return [taint(v) for v in jaxpr.outvars]


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
