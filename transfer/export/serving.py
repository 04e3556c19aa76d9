"""The function an export serialises: uint8 RGB images in, class probabilities out.

A trained run becomes one pure JAX function with its variables baked in as constants: the
weights' pixel preprocessing (`transfer.weights.preprocess`), the network with BatchNorm in
inference mode, and the same softmax (or two-column sigmoid) `transfer predict` applies
(`probabilities`). Every format converts this one function, so they can only
differ by their runtime's rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from transfer import ema
from transfer.errors import UserError

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
DTYPES = ("float32", "bfloat16")
# The checkpoint entry holding the parameters' exponential moving average, when a run keeps one.
EMA_KEY = ema.FIELD


@dataclasses.dataclass(frozen=True)
class ServingModel:
  """A run's serving function and what a caller must know to feed it.

  Attributes:
    apply: `(variables, images) -> probabilities`: (N, size, size, 3) uint8 to (N, classes)
      float32; traceable with a symbolic N.
    variables: the variables it runs with (params, and `batch_stats` for BatchNorm networks).
    metadata: JSON-ready facts written into every artifact (`artifact_metadata`).
  """

  apply: Callable[[Any, Any], Any]
  variables: dict[str, Any]
  metadata: dict[str, Any]

  def fn(self, images):
    """`apply` with the variables baked in (as constants, when traced)."""
    return self.apply(self.variables, images)

  @property
  def image_size(self) -> int:
    return self.metadata["image_size"]

  @property
  def class_names(self) -> list[str]:
    return self.metadata["class_names"]


def inference_params(variables: dict[str, Any]) -> tuple[dict[str, Any], str]:
  """The variables a served model runs with, and which params they hold ("params" or "ema").

  `ema.serving_variables` makes the choice for predict and export alike: a run that keeps an
  exponential moving average of its params (`EMA_KEY` in the restored variables) serves the
  average, otherwise the trained params; BatchNorm statistics come along unchanged.
  """
  kind = "ema" if ema.has_ema(variables) else "params"
  return ema.serving_variables(variables), kind


def load_serving_model(workdir: str, checkpoint: str | int | None = "latest",
                       dtype: str = "float32") -> ServingModel:
  """The serving function of a trained run's checkpoint.

  Args:
    workdir: a run directory written by `transfer train`.
    checkpoint: "latest" (or None), "best" or a step (see `checkpoint.load_trained_variables`).
    dtype: compute dtype of the network, "float32" or "bfloat16" (params are stored in float32
      either way and the probabilities are float32).

  Returns:
    The `ServingModel`.

  Raises:
    UserError: an unknown dtype, or the workdir has no checkpoint that restores.
  """
  if dtype not in DTYPES:
    raise UserError(f"unknown export dtype {dtype!r}; valid dtypes: {', '.join(DTYPES)}")
  import jax
  import jax.numpy as jnp

  from transfer import assembly
  trained = assembly.Run.from_checkpoint(workdir, checkpoint, dtype=dtype, conv="xla",
                                           announce="export")
  variables, params_kind = inference_params(trained.variables)
  run = trained.metadata
  return ServingModel(apply=serving_function(run, dtype),
                      variables=jax.tree_util.tree_map(jnp.asarray, variables),
                      metadata=artifact_metadata(run, dtype, params_kind=params_kind))


def serving_function(run: dict[str, Any], dtype: str = "float32") -> Callable:
  """`(variables, images) -> probabilities` for the model described by run metadata.

  The convolutions are XLA's own (`conv="xla"`), not the CPU Winograd rewrite, and so is a
  ViT's attention (not cuDNN's fused kernel): the artifact runs on machines and runtimes this
  process knows nothing about.
  """
  import jax.numpy as jnp

  from transfer import runs
  from transfer import weights as weights_lib

  net = runs.model_from_meta(run, dtype=dtype, conv="xla", attention="xla")
  mode = run["preprocessing"]

  def apply(variables, images):
    x = weights_lib.preprocess(images, mode)  # uint8 -> float32, the weights' normalisation
    logits = net.apply(variables, x)  # train=False: BatchNorm on its running statistics
    return probabilities(logits.astype(jnp.float32))

  return apply


def probabilities(logits):
  """(N, outputs) logits -> (N, max(outputs, 2)) probabilities, exactly as `transfer predict`
  computes them (`losses.probabilities`: softmax, or [1 - p, p] for one sigmoid logit)."""
  from transfer import losses
  return losses.probabilities(logits)


def artifact_metadata(run: dict[str, Any], dtype: str,
                      params_kind: str = "params") -> dict[str, Any]:
  """What an artifact records about itself: classes, input contract, provenance.

  `resize_to` is the side an image is squashed to before the central `image_size` crop (equal
  to `image_size` when the run evaluates without a crop), the geometry `transfer predict` uses.
  """
  from transfer.data import images as image_ops
  size = int(run["image_size"])
  return {
      "class_names": list(run["class_names"]), "image_size": size,
      "resize_to": image_ops.stored_size(size, float(run["eval_crop"])),
      "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": [None, size, size, 3],
                "layout": "NHWC, RGB, 0-255"},
      "output": {"name": OUTPUT_NAME, "dtype": "float32",
                 "shape": [None, max(2, int(run["outputs"]))]},
      "probabilities": "sigmoid" if int(run["outputs"]) == 1 else "softmax",
      "preprocessing": run["preprocessing"], "model": run["model"],
      "variant": run.get("variant"), "head": run["head"], "dtype": dtype,
      "params": params_kind,
  }
