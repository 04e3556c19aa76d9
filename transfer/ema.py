"""The parameter exponential moving average (`ema_decay` > 0)."""

from __future__ import annotations

import jax


def update_ema(ema_params, params, decay: float, mask):
  """`decay * ema + (1 - decay) * params` for trainable leaves; frozen leaves keep their average.

  A frozen leaf's average started at the param and neither has changed, so it stays bit-equal
  to the param (the formula would round it).
  """
  return jax.tree_util.tree_map(
      lambda e, p, trains: decay * e + (1.0 - decay) * p if trains else e,
      ema_params, params, mask)
