"""The parameter exponential moving average (`ema_decay` > 0), in one home.

A run with `ema_decay` > 0 keeps an average of its params in the train state (`FIELD`), updates
it in the train step (`update`), reports its validation metrics beside the raw ones (`metrics`)
and serves it (`serving_variables`: predict, eval's headline, export). The decay is the run's
own setting, not a regularisation of the loss: the train step takes it on its own.
"""

from __future__ import annotations

from typing import Any

# jax is imported inside the functions: the command line reads `FIELD` (through the export
# registry) while parsing its arguments, before JAX may be imported.

# The train state's field holding the average, and its key in a trained run's restored variables
# (`checkpoint.Checkpointer.restore_variables`); checkpoints store it under this name.
FIELD = "ema_params"
# The validation metrics reported again, prefixed with `ema_`, for the averaged params.
METRICS = ("val_loss", "val_accuracy")


def decay(config) -> float:
  """The run's EMA decay (0: no average)."""
  return float(config.ema_decay)


def enabled(config) -> bool:
  """Whether a run with `config` keeps a parameter average."""
  return decay(config) > 0


def init(params, keep: bool):
  """The average a run starts with: a copy of `params` when it keeps one, else `{}`.

  It covers every param, frozen ones too: a frozen param's average is never updated, so it
  stays equal to the param, and a later stage that unfreezes it starts its average from the
  right value. One more copy of the params buys one code path for every stage.
  """
  import jax
  import jax.numpy as jnp
  return jax.tree_util.tree_map(jnp.array, params) if keep else {}


def update(ema_params, params, decay: float, mask):
  """`decay * ema + (1 - decay) * params` for trainable leaves; frozen leaves keep their average.

  A frozen leaf's average started at the param and neither has changed, so it stays bit-equal
  to the param (the formula would round it). No average (`{}`) stays none.
  """
  if not ema_params:
    return ema_params
  import jax
  return jax.tree_util.tree_map(
      lambda e, p, trains: decay * e + (1.0 - decay) * p if trains else e,
      ema_params, params, mask)


def has_ema(variables: dict[str, Any]) -> bool:
  """Whether a trained run's variables hold a parameter EMA."""
  return bool(variables.get(FIELD))


def serving_variables(variables: dict[str, Any], use_ema: bool = True) -> dict[str, Any]:
  """The variables to predict or export with: the EMA params when the run kept them.

  The one place that decides which params a trained run serves with (predict, eval's headline,
  export). BatchNorm statistics are the raw ones (the EMA averages params only).

  Args:
    variables: from `checkpoint.load_trained_variables` (`params`, maybe `batch_stats` and
      `ema_params`).
    use_ema: False gives the raw params even when an EMA exists.

  Returns:
    `{"params"}` (and `"batch_stats"`): what `model.apply` takes.
  """
  params = variables["params"]
  if use_ema and has_ema(variables):
    params = variables[FIELD]
  out = {"params": params}
  if variables.get("batch_stats"):
    out["batch_stats"] = variables["batch_stats"]
  return out


def metrics(evaluated: dict[str, Any]) -> dict[str, Any]:
  """The averaged params' validation metrics under their reported names (`ema_val_loss`, ...)."""
  return {f"ema_{k}": evaluated[k] for k in METRICS}
