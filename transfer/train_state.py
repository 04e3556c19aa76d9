"""The train state: flax's `TrainState` plus what a run also carries, as one pytree.

`TrainState` is `flax.training.train_state.TrainState` (`step`, `apply_fn`, `params`, `tx`,
`opt_state`, `apply_gradients`), so a loop written for flax works on it unchanged; it adds the
PRNG key, the NaN guard's step, the BatchNorm statistics and the parameter average. `apply_fn`
and `tx` are static (not pytree leaves): the checkpoint holds the same arrays under the same
names as before they were added, and old run directories resume.

    tx, labels = transfer.optim.make_optimizer(params, learning_rate=1e-3, trainable=["^head/"])
    state = create_train_state(params, tx, seed=0, batch_stats=..., apply_fn=model.apply)
    state = state.apply_gradients(grads=grads)        # a custom loop
    state, metrics = train_step(state, batch)         # or the library's (`transfer.steps`)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state as flax_train_state

from transfer import ema as ema_lib


class TrainState(flax_train_state.TrainState):
  """Everything that changes during training, as one pytree (checkpointed whole).

  Attributes (besides flax's `step`, `apply_fn`, `params`, `tx`, `opt_state`):
    rng: base PRNG key (raw uint32 key data); per-step keys (dropout, mixup) are folded from it
      and `step`.
    nonfinite_step: -1, or the first step whose loss was NaN/inf (updates stop from then on, and
      the loop refuses to checkpoint), so a blow-up is caught without a host sync every step.
    batch_stats: BatchNorm running statistics (float32), `{}` for networks without BatchNorm.
    ema_params: exponential moving average of `params` (`ema_decay` > 0), else `{}`: see
      `transfer.ema` (its `FIELD` is this field's name).

  `step` is an int32 array (flax's `create` starts it at a Python 0) so that the first step
  and a resumed one compile the same program.
  """

  rng: jax.Array
  nonfinite_step: jax.Array
  batch_stats: Any = struct.field(default_factory=dict)
  ema_params: Any = struct.field(default_factory=dict)

  @classmethod
  def create(cls, *, apply_fn: Callable | None, params, tx: optax.GradientTransformation,
             seed: int = 0, batch_stats=None, ema: bool = False, **kwargs) -> "TrainState":
    """A fresh state at step 0: `tx.init(params)`, the key from `seed`, the average when
    `ema` (a run with `ema_decay` > 0; it starts at the params)."""
    return cls(step=jnp.asarray(0, jnp.int32), apply_fn=apply_fn, params=params, tx=tx,
               opt_state=tx.init(params), rng=jax.random.key_data(jax.random.PRNGKey(seed)),
               nonfinite_step=jnp.asarray(-1, jnp.int32), batch_stats=batch_stats or {},
               ema_params=ema_lib.init(params, ema), **kwargs)

  @property
  def variables(self) -> dict[str, Any]:
    """The model's variables: what `model.apply` (and `apply_fn`) takes."""
    return as_variables(self.params, self.batch_stats)

  @property
  def ema_variables(self) -> dict[str, Any] | None:
    """The variables with the averaged params (raw BatchNorm statistics); None without EMA."""
    if not self.ema_params:
      return None
    return as_variables(self.ema_params, self.batch_stats)


def create_train_state(params, tx: optax.GradientTransformation, seed: int = 0,
                       batch_stats=None, ema: bool = False, *,
                       apply_fn: Callable | None = None) -> TrainState:
  """A fresh train state at step 0 for `params` (and BatchNorm `batch_stats`) and optimizer `tx`.

  The state holds `params` and `batch_stats` as given (no copy). The library's train step does
  not donate them unless asked (`steps.make_train_step(donate=True)`), so the caller's arrays
  stay readable; a donating step deletes them.

  Args:
    params: the params tree.
    tx: the optimizer (`transfer.optim.make_optimizer`); frozen params get no state.
    seed: seeds the state's PRNG key (dropout, mixup).
    batch_stats: BatchNorm running statistics, if the network has any.
    ema: start a parameter average (a run with `ema_decay` > 0).
    apply_fn: usually `model.apply`, for loops that call `state.apply_fn`; the library's steps
      take the model themselves.
  """
  return TrainState.create(apply_fn=apply_fn, params=params, tx=tx, seed=seed,
                           batch_stats=batch_stats, ema=ema)


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
