"""The host-side evaluation loop: runs a jitted eval step over validation batches and adds up
its sums on the host."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from transfer import ema, parallel
from transfer.train_state import TrainState


def host(tree):
  """A pytree of device arrays as numpy arrays on the host."""
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def evaluate_state(eval_step, state: TrainState, make_batches: Callable, mesh) -> dict[str, Any]:
  """`evaluate` of the state's params, plus `ema_val_loss`/`ema_val_accuracy` when it has EMA.

  Args:
    make_batches: a function returning one fresh pass over the validation batches.
  """
  metrics = evaluate(eval_step, state.variables, make_batches(), mesh)
  if state.ema_params:
    metrics.update(ema.metrics(evaluate(eval_step, state.ema_variables, make_batches(), mesh)))
  return metrics


def evaluate(eval_step, params, batches, mesh) -> dict[str, Any]:
  """Validation metrics and confusion matrix of `eval_step` over padded, masked batches.

  Returns:
    `{"val_loss", "val_accuracy", "val_count", "confusion"}` (host values).
  """
  from transfer.data import prefetch_to_device
  total = None
  for batch in prefetch_to_device(batches, parallel.batch_sharding(mesh)):
    sums = eval_step(params, {k: batch[k] for k in ("image", "label", "mask")})
    total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
  total = host(total)
  count = max(float(total["count"]), 1.0)
  return {"val_loss": float(total["loss"]) / count, "val_accuracy": float(total["correct"]) / count,
          "val_count": int(total["count"]), "confusion": total["confusion"].astype(int).tolist()}
