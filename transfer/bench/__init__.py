"""`transfer bench`: time the real train step, forward pass, eval step or input pipeline.

The steps timed are the ones training runs (the run `transfer.assembly.build` assembles: its
optimizer and freeze labels, regularisation and parameter average) on batches generated on the device, so the figures
measure the accelerator and not the disk, and nothing but `--mode=input` touches the input pipeline
(TensorFlow is never imported otherwise). Each measurement compiles first and reports the compile
time apart, runs `warmup` untimed steps, then times `steps` steps ending with `block_until_ready`.

The package follows the job's seams: `cases` (what runs: `Setup` and the `prepare_*` steps),
`timing` (compile, warm up, time), `flops` (FLOP counts and device peaks for MFU) and `report`
(the environment header, the table and the JSON line). The conv algorithm the model compiled
with is the concrete choice `transfer.platform.resolve_conv` made (`conv`, e.g.
`winograd_from_64`), next to `hugepages`, `xla_flags` and the train step's `step_fingerprint`
(`step_fingerprint(config)` gives the same from Python: equal values, the same program).

Python API:
    config = transfer.configs.load("bench")
    result = transfer.bench.main(config, mode="train", steps=10, as_json=True)

Figures and how to reproduce them: docs/BENCHMARKS.md.
"""

from __future__ import annotations

from typing import Any

from transfer.bench.cases import (Setup, bench_cached_epoch, bench_input, fingerprint_of,
                                  prepare_eval, prepare_forward, prepare_train, train_batch)
from transfer.bench.flops import PEAK_TFLOPS, analytic_flops, peak_tflops
from transfer.bench.report import add_rates, environment, print_result, step_result
from transfer.bench.timing import measure
from transfer.errors import UserError

__all__ = ["MODES", "PEAK_TFLOPS", "Setup", "UserError", "analytic_flops", "main", "peak_tflops",
           "run", "step_fingerprint"]

MODES = ("train", "forward", "eval", "input")


def run(config, mode: str = "train", steps: int = 20, warmup: int = 2,
        peak: float | None = None) -> dict[str, Any]:
  """Runs one benchmark and returns the flat JSON-able result (see `main`)."""
  import jax
  from transfer import platform
  platform.setup()  # first use from Python: the CLI's XLA flags and compile cache (idempotent)
  if mode not in MODES:
    raise UserError(f"unknown bench mode {mode!r}; valid: {', '.join(MODES)}")
  if steps < 1 or warmup < 0:
    raise UserError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
  from transfer import models
  dtype = models.resolve_dtype(config.dtype, jax.devices()[0].platform)
  env = environment(dtype)
  peak = peak or peak_tflops(env["device_kind"], dtype)
  extra: dict[str, Any] = {}
  if mode == "input":
    extra.update(bench_input(config, steps))
  setup = Setup(config, dtype)
  head = {"mode": mode, "model": config.model, "head": config.head, "weights": config.weights,
          "batch_size": int(config.batch_size), "image_size": int(config.image_size),
          "parallel": config.parallel, "trainable": list(config.trainable),
          "conv": setup.model.conv,  # the concrete choice this program compiled with
          "steps": steps, "warmup": warmup, **env}
  prepare = {"train": prepare_train, "input": prepare_train, "forward": prepare_forward,
             "eval": prepare_eval}[mode]
  steps_to_time = [prepare(setup, warmup)]
  if mode == "train":  # the forward pass, for the train/forward ratio
    steps_to_time.append(prepare_forward(setup, warmup))
  durations = measure(steps_to_time, steps, rounds=3 if len(steps_to_time) > 1 else 1)
  result = step_result(setup, steps_to_time[0], durations[0])
  if mode in ("train", "input"):
    result["step_fingerprint"] = steps_to_time[0].fingerprint
  add_rates(result, env, peak)

  if mode == "train":
    forward = step_result(setup, steps_to_time[1], durations[1])
    extra["forward_step_ms_median"] = forward["step_ms_median"]
    extra["forward_images_per_sec"] = forward["images_per_sec"]
    extra["train_forward_ratio"] = result["step_ms_median"] / forward["step_ms_median"]
    extra["forward_flops_per_step"] = forward["flops_per_step"]
    same = "xla" if result["flops_source"] == forward["flops_source"] == "xla" else "analytic"
    extra["flops_ratio_train_forward"] = (result[f"flops_per_step_{same}"]
                                          / forward[f"flops_per_step_{same}"])
    if config.cache_features:
      extra.update(bench_cached_epoch(setup, result["step_ms_median"] / 1e3, warmup))
  if mode == "input":
    extra["limited_by"] = ("input" if extra["input_images_per_sec"] < result["images_per_sec"]
                           else "step")
  return {**head, **result, **extra}


def main(config, mode: str = "train", steps: int = 20, warmup: int = 2, as_json: bool = False,
         peak_tflops: float | None = None) -> dict[str, Any]:
  """CLI entry: runs one benchmark, prints the table (stdout, or stderr with `as_json`).

  Args:
    config: the bench config (`transfer.configs.load("bench")`) or any training config; uses
      model, head, weights, batch_size, image_size, dtype (`"auto"`: bfloat16 on GPU/TPU, float32
      on CPU), parallel, trainable, cache_features, epoch_images and, for `input`, the data keys.
    mode: `train` (the train step, and the forward pass for the ratio), `forward`, `eval` or
      `input` (host pipeline images/s next to the train step's).
    steps: timed steps after `warmup` untimed ones.
    as_json: print one JSON line on stdout (the table goes to stderr).
    peak_tflops: peak TFLOP/s of one device, for MFU on devices missing from `PEAK_TFLOPS`.

  Returns:
    The result dict: the job, the environment, `steps_per_sec`, `images_per_sec`,
    `step_ms_median`, `step_ms_p90`, `compile_s`, `flops_per_step` (XLA's count, or analytic),
    `tflops_per_sec`, `mfu` (None without a known peak), and per mode the extras (train:
    `train_forward_ratio`, `flops_ratio_train_forward`; input: `input_images_per_sec`,
    `limited_by`; cache_features: the epoch comparison).
  """
  result = run(config, mode, steps, warmup, peak_tflops)
  print_result(result, as_json)
  return result


def step_fingerprint(config) -> str | None:
  """The `step_fingerprint` `transfer bench --json` reports for `config`, computed without
  compiling or timing anything: the program of the run's first train step
  (`transfer.platform.program_fingerprint`; None for the pmap step, which has no lowering).

  A notebook and the `transfer` command compile the same step exactly when these agree.
  """
  import jax
  from transfer import models, platform
  platform.setup()
  setup = Setup(config, models.resolve_dtype(config.dtype, jax.devices()[0].platform))
  return fingerprint_of(setup.run.train_step(setup.parts), setup.state(), train_batch(setup))
