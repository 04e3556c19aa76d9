"""The report of a benchmark: the environment header, per-step statistics and FLOP rates, the
human-readable table and the JSON line."""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any

import numpy as np

from transfer.bench.cases import Setup
from transfer.bench.flops import analytic_flops, xla_flops
from transfer.bench.timing import Prepared, summarize


def environment(dtype: str) -> dict[str, Any]:
  """Device kind and count, backend, versions, XLA flags and huge pages: every report's header."""
  import flax
  import jax
  import jaxlib

  from transfer.platform import hugepages
  devices = jax.devices()
  return {"device_kind": devices[0].device_kind, "platform": devices[0].platform,
          "devices": len(devices), "processes": jax.process_count(),
          "host_cpus": os.cpu_count(), "dtype": dtype,
          "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "hugepages": hugepages.active()}


def add_rates(result: dict[str, Any], env: dict[str, Any], peak: float | None) -> None:
  """Adds achieved TFLOP/s and MFU (against `peak` per device times the device count)."""
  tflops = result["flops_per_step"] * result["steps_per_sec"] / 1e12
  result["tflops_per_sec"] = tflops
  result["peak_tflops"] = peak * env["devices"] if peak else None
  result["mfu"] = tflops / result["peak_tflops"] if peak else None


def step_result(setup: Setup, prepared: Prepared, durations: np.ndarray) -> dict[str, Any]:
  """Summary stats, compile time and FLOP counts of one measured step."""
  result = summarize(durations, setup.batch)
  result["compile_s"] = prepared.compile_s
  result["flops_per_step_analytic"] = analytic_flops(
      setup.params, setup.config.model, setup.config.image_size, setup.batch, prepared.labels,
      prepared.stage, model=setup.model)
  counted = (xla_flops(prepared.compiled, setup.num_devices) if prepared.compiled is not None
             else None)
  result["flops_per_step_xla"] = counted
  result["flops_per_step"] = counted if counted else result["flops_per_step_analytic"]
  result["flops_source"] = "xla" if counted else "analytic"
  return result


_ROWS = (
    ("images_per_sec", "images/s", "{:,.1f}"),
    ("steps_per_sec", "steps/s", "{:,.2f}"),
    ("step_ms_median", "step ms (median)", "{:,.2f}"),
    ("step_ms_p90", "step ms (p90)", "{:,.2f}"),
    ("compile_s", "compile s", "{:,.2f}"),
    ("flops_per_step", "GFLOP/step", None),
    ("tflops_per_sec", "TFLOP/s", "{:,.3f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("forward_images_per_sec", "forward images/s", "{:,.1f}"),
    ("forward_step_ms_median", "forward step ms (median)", "{:,.2f}"),
    ("train_forward_ratio", "train / forward time", "{:.3f}"),
    ("flops_ratio_train_forward", "train / forward FLOPs", "{:.3f}"),
    ("input_images_per_sec", "input pipeline images/s", "{:,.1f}"),
    ("input_images_per_cpu_sec", "input images per CPU-second", "{:,.1f}"),
    ("input_images_per_sec_by_workers", "input images/s by workers", None),
    ("limited_by", "limited by", "{}"),
    ("epoch_images", "epoch images", "{:,}"),
    ("feature_pass_s", "feature pass s (once)", "{:,.2f}"),
    ("head_epoch_s", "head epoch s (cached)", "{:,.3f}"),
    ("backbone_epoch_s", "backbone epoch s", "{:,.2f}"),
    ("head_epoch_speedup", "epoch speed-up", "{:,.1f}x"),
)


def format_table(result: dict[str, Any]) -> str:
  """The human-readable report: a header line about the devices and the job, then one row each."""
  lines = [f"{result['devices']} x {result['device_kind']} ({result['platform']}), "
           f"{result['processes']} process(es), {result['host_cpus']} host CPUs; "
           f"jax {result['jax']}, jaxlib {result['jaxlib']}, flax {result['flax']}",
           f"{result['mode']}: {result['model']} + {result['head']} head, batch "
           f"{result['batch_size']} at {result['image_size']}, {result['dtype']}, "
           f"{result['conv']} conv, {result['parallel']}, trainable {','.join(result['trainable'])}; "
           f"{result['steps']} timed steps after {result['warmup']} warm-up"]
  if result["xla_flags"]:
    lines.append(f"XLA_FLAGS={result['xla_flags']}")
  for key, label, fmt in _ROWS:
    value = result.get(key)
    if value is None:
      continue
    if key == "flops_per_step":
      text = f"{value / 1e9:,.2f} ({result['flops_source']})"
    elif key == "input_images_per_sec_by_workers":
      text = ", ".join(f"{n}: {rate:,.1f}" for n, rate in value.items()) + \
          f" ({result['input_worker_kind']} workers)"
    else:
      text = fmt.format(value)
    lines.append(f"  {label:<26} {text}")
  return "\n".join(lines)


def print_result(result: dict[str, Any], as_json: bool) -> None:
  """The table on stdout; with `as_json`, the table on stderr and one JSON line on stdout."""
  table = format_table(result)
  if as_json:
    print(table, file=sys.stderr, flush=True)
    print(json.dumps(result), flush=True)
  else:
    print(table, flush=True)
