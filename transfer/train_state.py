"""The train state: everything that changes during training, as one pytree (checkpointed whole).

    state = parallel.replicate(create_train_state(params, tx, seed), mesh)
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from transfer import ema as ema_lib


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree (checkpointed whole).

  Attributes:
    step: number of optimizer steps taken.
    params: model parameters (float32).
    opt_state: optimizer state (no entries for frozen parameters).
    rng: base PRNG key (raw uint32 key data); per-step keys are folded from it and `step`.
    nonfinite_step: -1, or the first step whose loss was NaN/inf (updates stop from then on, and
      the loop refuses to checkpoint), so a blow-up is caught without a host sync every step.
    batch_stats: BatchNorm running statistics (float32), `{}` for networks without BatchNorm.
    ema_params: exponential moving average of `params` (`ema_decay` > 0), else `{}`: see
      `transfer.ema` (its `FIELD` is this field's name).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_step: jax.Array
  batch_stats: Any = flax.struct.field(default_factory=dict)
  ema_params: Any = flax.struct.field(default_factory=dict)

  @property
  def variables(self) -> dict[str, Any]:
    """The model's variables: what `model.apply` takes."""
    return as_variables(self.params, self.batch_stats)

  @property
  def ema_variables(self) -> dict[str, Any] | None:
    """The variables with the averaged params (raw BatchNorm statistics); None without EMA."""
    if not self.ema_params:
      return None
    return as_variables(self.ema_params, self.batch_stats)


def create_train_state(params, tx: optax.GradientTransformation, seed: int,
                       batch_stats=None, ema: bool = False) -> TrainState:
  """A fresh train state at step 0 for `params` (and BatchNorm `batch_stats`) and optimizer `tx`.

  `ema=True` (a run with `ema_decay` > 0) starts the parameter average at the params.
  """
  return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.PRNGKey(seed)),
                    nonfinite_step=jnp.asarray(-1, jnp.int32), batch_stats=batch_stats or {},
                    ema_params=ema_lib.init(params, ema))


def as_variables(params_or_variables, batch_stats=None) -> dict[str, Any]:
  """`{"params": ..., "batch_stats": ...}` from a params tree or a variables dict.

  Eval and feature steps take either, so a network without BatchNorm keeps being called with its
  params alone. A params tree never has a top-level layer called `params`.
  """
  if "params" in params_or_variables:
    return dict(params_or_variables)
  variables = {"params": params_or_variables}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return variables
