"""Timing a step: compile apart, warm up, then time N steps ending with `block_until_ready`.

Step times are completion-to-completion intervals with one step always queued behind the one
running, so the device never idles for the host's sake. Throughput is derived from the median
step time (`summarize`), so each row holds one statistic.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np


def percentile_ms(seconds, q: float) -> float:
  """The `q`-th percentile of step durations in milliseconds."""
  return float(np.percentile(np.asarray(seconds) * 1e3, q))


def time_steps(run_step: Callable[[], Any], steps: int) -> np.ndarray:
  """Durations (seconds) of `steps` calls of `run_step`, which dispatches one step.

  `run_step` returns arrays the step produces; step i is waited for only after step i+1 has been
  dispatched, so the device always has the next step queued and the intervals between completions
  are step times, not step plus host latency. The last one ends with `block_until_ready`.
  """
  import jax
  start = time.perf_counter()
  stamps, pending = [], None
  for _ in range(steps):
    out = run_step()
    if pending is not None:
      jax.block_until_ready(pending)
      stamps.append(time.perf_counter())
    pending = out
  jax.block_until_ready(pending)
  stamps.append(time.perf_counter())
  return np.diff([start] + stamps)


def compile_step(fn, *args):
  """AOT-compiles a jitted `fn` for `args`: (callable, compile seconds, compiled or None).

  A function without `.lower` (the pmap wrapper) is returned as is with compile time None; the
  caller times its first call instead.
  """
  if not hasattr(fn, "lower"):
    return fn, None, None
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - start, compiled


def summarize(durations: np.ndarray, batch: int) -> dict[str, float]:
  """Throughput and step-time statistics of timed steps, all from the median step.

  One statistic per row: `steps_per_sec` and `images_per_sec` are the median step's rates, so
  they and `step_ms_median` agree (a mean rate beside a median time would not, and the mean
  is the one a stall from elsewhere on a shared machine moves). `step_ms_p90` shows the spread.
  """
  median_ms = percentile_ms(durations, 50)
  return {"steps_per_sec": 1e3 / median_ms,
          "images_per_sec": batch * 1e3 / median_ms,
          "step_ms_median": median_ms,
          "step_ms_p90": percentile_ms(durations, 90)}


@dataclasses.dataclass
class Prepared:
  """A compiled, warmed-up step ready to time.

  Attributes:
    run: dispatches one step and returns arrays to wait on.
    compile_s: compile time (for steps without AOT lowering: the first call, run included).
    compiled: the AOT-compiled executable (for XLA's FLOP count), or None.
    labels: the freeze labels for a train step (analytic backward FLOPs), None otherwise.
    stage: `"full"` or `"head"`.
    fingerprint: `transfer.platform.program_fingerprint` of the step's program, or None.
  """

  run: Callable[[], Any]
  compile_s: float
  compiled: Any
  labels: Any
  stage: str = "full"
  fingerprint: str | None = None


def warm(prepared: Prepared, warmup: int) -> Prepared:
  """Compiles by calling when there was no AOT compile, then runs `warmup` untimed steps."""
  if prepared.compile_s is None:
    start = time.perf_counter()
    block(prepared.run())
    prepared.compile_s = time.perf_counter() - start
  for _ in range(warmup):
    block(prepared.run())
  return prepared


def measure(prepared: list[Prepared], steps: int, rounds: int) -> list[np.ndarray]:
  """Step durations of each prepared step, `steps` each, interleaved in `rounds` rounds.

  Alternating A, B, A, B ... in chunks makes the ratio of A to B robust to load that comes and goes
  on a shared machine, which timing all of A then all of B is not.
  """
  rounds = max(1, min(rounds, steps))
  chunks = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
  durations = [[] for _ in prepared]
  for chunk in chunks:
    for i, p in enumerate(prepared):
      durations[i].extend(time_steps(p.run, chunk))
  return [np.asarray(d) for d in durations]


def block(x):
  """`jax.block_until_ready(x)`."""
  import jax
  return jax.block_until_ready(x)
