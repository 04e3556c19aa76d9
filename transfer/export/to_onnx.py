"""ONNX export with `jax2onnx`, checked with `onnx.checker` and run in `onnxruntime`.

Why jax2onnx: it converts the traced JAX program (the same jaxpr `jax.export` lowers) straight
to ONNX, with a symbolic batch dimension. The other road, jax2tf then tf2onnx, is closed: jax2tf
now only serialises StableHLO inside an `XlaCallModule` op, which tf2onnx cannot read.

Two things about jax2onnx 0.12.5, the newest release that does not pin orbax-checkpoint below
the version this package uses (0.13 and later require orbax-checkpoint<0.11.37):
  * its Flax-level shims replace `flax.linen.max_pool` with a keyword-only signature and accept
    only "SAME"/"VALID" padding, so tracing our modules under them fails. We trace first and
    hand jax2onnx the jaxpr (`jax.core` primitives only), so no shim is involved.
  * it lowers `reduce_window_max` to a MaxPool over every axis of the operand: an NHWC 2-D pool
    becomes a 4-D MaxPool, which onnxruntime refuses ("Unsupported pooling size"). While
    replaying the jaxpr we compute each NHWC spatial max pool on an (N*C, H, W) view instead,
    the same maximum over the same windows, which lowers to a 3-D MaxPool onnxruntime runs.
  * it lowers a reduction over no axes (`reduce_sum` with `axes=()`, which a global average
    pool gives on features that are one vector already, as a ViT's class token) to a ReduceSum
    with an empty axes list, which ONNX reads as "reduce every axis": the checker refuses the
    shapes, and a runtime would return a scalar. Over no axes a reduction is its operand, so
    the replay passes it through.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from typing import Any

from transfer.errors import UserError
from transfer.export.serving import INPUT_NAME, OUTPUT_NAME, ServingModel
from transfer.export.writer import Writer

# Opset 21 (ONNX 1.16, onnxruntime >= 1.20): every op this export emits, without the newest.
OPSET = 21
INSTALL = "pip install 'transfer[export]' (or: pip install 'jax2onnx==0.12.5' onnx onnxruntime)"
METADATA_KEY = "transfer"  # metadata_props key holding the artifact metadata as JSON


def require(*names: str):
  """The named converter modules, or a one-line error naming the pip command."""
  import importlib
  modules = []
  for name in names:
    try:
      modules.append(importlib.import_module(name))
    except ImportError:
      raise UserError(f"ONNX export needs the {name} package: {INSTALL}") from None
  return modules


def write(model: ServingModel, path: str) -> str:
  """Converts `model` to an ONNX file at `path` (metadata in `metadata_props`); returns `path`."""
  jax2onnx, onnx = require("jax2onnx", "onnx")
  import jax
  import jax.numpy as jnp
  size = model.image_size
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"N, {size}, {size}, 3"), jnp.uint8)
  closed = jax.make_jaxpr(model.fn)(spec)
  with _quiet():
    proto = jax2onnx.to_onnx(lambda x: _replay(closed, x), [spec], model_name="transfer",
                             opset=OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
  _set_metadata(proto, model.metadata)
  onnx.checker.check_model(proto, full_check=True)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  onnx.save(proto, path)
  return path


@contextlib.contextmanager
def _quiet():
  """Converter chatter off: jax2onnx logs each plugin it skips and prints debug lines to stdout,
  onnx_ir warns about shape values it does not serialise; our stdout is the command's output."""
  loggers = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def _set_metadata(proto, metadata: dict[str, Any]) -> None:
  """The artifact metadata as one JSON entry plus the two facts a caller reads most."""
  del proto.metadata_props[:]
  for key, value in ((METADATA_KEY, json.dumps(metadata)),
                     ("class_names", json.dumps(metadata["class_names"])),
                     ("image_size", str(metadata["image_size"]))):
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value
  proto.doc_string = ("uint8 NHWC RGB images -> class probabilities; preprocessing inside. "
                      f"metadata_props[{METADATA_KEY!r}] describes the input and classes.")


def read_metadata(path: str) -> dict[str, Any]:
  """The artifact metadata stored in an ONNX file by `write`."""
  (onnx,) = require("onnx")
  proto = onnx.load(path, load_external_data=False)
  props = {p.key: p.value for p in proto.metadata_props}
  return json.loads(props[METADATA_KEY])


def run(path: str, images) -> Any:
  """Probabilities of an ONNX artifact on uint8 images, in onnxruntime."""
  (ort,) = require("onnxruntime")
  session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


def _replay(closed, *args):
  """Evaluates a closed jaxpr, with NHWC spatial max pools computed channels-first."""
  import jax
  from jax.extend import core

  env = {}
  reductions = _reductions()

  def read(v):
    return v.val if isinstance(v, core.Literal) else env[v]

  env.update(zip(closed.jaxpr.constvars, closed.consts))
  env.update(zip(closed.jaxpr.invars, args))
  for eqn in closed.jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    if eqn.primitive is jax.lax.reduce_window_max_p and _is_spatial_pool(eqn.params):
      outs = [_max_pool_channels_first(ins[0], eqn.params)]
    elif eqn.primitive in reductions and not eqn.params["axes"]:
      outs = [ins[0]]  # over no axes: the operand itself (see the module docstring)
    else:
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
      outs = outs if eqn.primitive.multiple_results else [outs]
    env.update(zip(eqn.outvars, outs))
  return read(closed.jaxpr.outvars[0])


def _reductions():
  """The primitives that reduce over `axes` (a `reduce_*` over none of them is the identity)."""
  import jax
  return tuple(getattr(jax.lax, f"reduce_{op}_p") for op in
               ("sum", "max", "min", "prod", "and", "or", "xor"))


def _is_spatial_pool(params) -> bool:
  """A 4-D pool over axes 1 and 2 only (NHWC), undilated: the shape `nn.max_pool` gives."""
  dims, strides, padding = (params["window_dimensions"], params["window_strides"],
                            params["padding"])
  return (len(dims) == 4 and dims[0] == dims[3] == strides[0] == strides[3] == 1
          and tuple(padding[0]) == tuple(padding[3]) == (0, 0)
          and set(params["base_dilation"]) == set(params["window_dilation"]) == {1})


def _max_pool_channels_first(x, params):
  """The same max pool on an (N*C, H, W) view of NHWC `x`, back in NHWC."""
  import jax
  import jax.numpy as jnp
  n, h, w, c = x.shape
  # In float32 whatever x's dtype (a max is exact in any float type): jax2onnx recognises the
  # max pool only by its float32 identity, -inf.
  planes = jnp.transpose(x, (0, 3, 1, 2)).reshape((n * c, h, w)).astype(jnp.float32)
  pooled = jax.lax.reduce_window(
      planes, -jnp.inf, jax.lax.max, (1,) + tuple(params["window_dimensions"][1:3]),
      (1,) + tuple(params["window_strides"][1:3]),
      ((0, 0),) + tuple(tuple(p) for p in params["padding"][1:3]))
  return jnp.transpose(pooled.reshape((n, c) + pooled.shape[1:]), (0, 2, 3, 1)).astype(x.dtype)


def usage(path: str) -> list[str]:
  """Python that runs the artifact on a uint8 batch `x` with onnxruntime alone."""
  return ["import onnxruntime as ort",
          f"print(ort.InferenceSession({path!r}).run(None, {{'images': x}})[0])"]


WRITER = Writer(
    name="onnx", title="ONNX", default_name="model.onnx", directory=False, write=write,
    read_metadata=read_metadata, run=run, usage=usage, extra="export",
    require=lambda: require("jax2onnx", "onnx", "onnxruntime"),
    refused_dtypes={"bfloat16": "ONNX has no bfloat16 convolution (its Conv takes float16/32/64); "
                                "export ONNX with --dtype float32"})
