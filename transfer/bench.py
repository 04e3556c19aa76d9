"""`transfer bench`: time the real train step, forward pass, eval step or input pipeline.

The steps timed are the ones training runs (`transfer.steps.make_train_step` and friends, with the
optimizer and freeze labels of `transfer.optim`) on batches generated on the device, so the figures
measure the accelerator and not the disk, and nothing but `--mode=input` touches the input pipeline
(TensorFlow is never imported otherwise). Each measurement compiles first and reports the compile
time apart, runs `warmup` untimed steps, then times `steps` steps ending with `block_until_ready`.

Step times are completion-to-completion intervals with one step always queued behind the one
running, so the device never idles for the host's sake and the per-step median and p90 come from
the same run as the throughput.

Python API:
    config = transfer.configs.load("bench")
    result = transfer.bench.main(config, mode="train", steps=10, as_json=True)

Figures and how to reproduce them: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import sys
import time
from typing import Any, Callable

import numpy as np

from transfer.errors import UserError

MODES = ("train", "forward", "eval", "input")

# Dense peak TFLOP/s of one JAX device: (bfloat16, float32). float32 uses the TF32 tensor-core
# figure on NVIDIA Ampere and later (XLA's default precision for float32 convolutions there) and
# the bfloat16 figure on TPU (default precision is one bfloat16 pass). v2/v3 devices are cores.
# Ordered: the first pattern found in `device_kind` wins, so specific names come first.
PEAK_TFLOPS: tuple[tuple[str, tuple[float, float]], ...] = (
    (r"\bH200\b", (989.0, 494.0)),
    (r"\bH100 PCIe\b", (756.0, 378.0)),
    (r"\bH100\b", (989.0, 494.0)),
    (r"\bGH200\b", (989.0, 494.0)),
    (r"\bB200\b", (2250.0, 1100.0)),
    (r"\bA100\b", (312.0, 156.0)),
    (r"\bL40S\b", (362.0, 183.0)),
    (r"\bL4\b", (121.0, 60.0)),
    (r"\bA10G?\b", (125.0, 62.5)),
    (r"\bTPU v6 lite\b", (918.0, 918.0)),
    (r"\bTPU v5 lite\b", (197.0, 197.0)),
    (r"\bTPU v5p?\b", (459.0, 459.0)),
    (r"\bTPU v4\b", (275.0, 275.0)),
    (r"\bTPU v3\b", (61.5, 61.5)),
    (r"\bTPU v2\b", (22.5, 22.5)),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """Peak dense TFLOP/s of one device of `device_kind` in `dtype`; None when unknown."""
  for pattern, (bf16, fp32) in PEAK_TFLOPS:
    if re.search(pattern, device_kind):
      return bf16 if dtype in ("bfloat16", "float16") else fp32
  return None


def percentile_ms(seconds, q: float) -> float:
  """The `q`-th percentile of step durations in milliseconds."""
  return float(np.percentile(np.asarray(seconds) * 1e3, q))


# ----------------------------------------------------------------------------- FLOP counts


def analytic_flops(params, model_name: str, image_size: int, batch: int, labels=None,
                   stage: str = "full") -> float:
  """Multiply-add FLOPs (2 per MAC) of one step, counted from the parameter shapes.

  The forward pass costs 2*MACs for every conv and dense layer. With `labels` (a train step) the
  backward pass adds, for each layer from the first trainable one on, the input gradient
  (another forward's worth; not needed by the first trainable layer itself) and, for trainable
  layers, the weight gradient (one more). A frozen conv base therefore adds nothing, and a trainable
  block5 adds block5's backward only. Bias adds, activations and pooling are not counted.

  Args:
    params: the params tree (its shapes are read).
    model_name: registry name, for the backbone's layer order.
    image_size: input side; block b runs at image_size / 2**(b-1).
    batch: global batch size.
    labels: the optimizer's label tree for a train step; None for a forward pass.
    stage: `"full"` or `"head"` (cached features: only the head runs).
  """
  from flax import traverse_util
  from transfer import models, optim

  flat = traverse_util.flatten_dict(params)
  trainable = (traverse_util.flatten_dict(optim.trainable_mask(labels)) if labels is not None
               else {})
  conv_layers = list(models.spec(model_name).conv_layers)
  layers = {k[:-1] for k in flat if k[-1] == "kernel"}
  order = [(name,) for name in conv_layers] + sorted(l for l in layers if l[0] not in conv_layers)
  total, seen_trainable = 0.0, False
  for layer in order:
    kernel = flat[layer + ("kernel",)]
    if layer[0] in conv_layers:
      if stage == "head":
        continue
      block = int(re.match(r"block(\d+)_", layer[0]).group(1))
      side = image_size // 2 ** (block - 1)
      forward = 2.0 * batch * side * side * int(np.prod(kernel.shape))
    else:
      forward = 2.0 * batch * int(np.prod(kernel.shape))
    total += forward
    is_trainable = bool(trainable.get(layer + ("kernel",), False))
    if seen_trainable:
      total += forward  # input gradient
    if is_trainable:
      total += forward  # weight gradient
      seen_trainable = True
  return total


def xla_flops(compiled, num_devices: int) -> float | None:
  """Global FLOPs of one call of a compiled SPMD step from XLA's cost analysis (None if absent).

  The analysis describes one device's partition of the program, hence the factor.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # Some backends do not implement it.
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"]) * num_devices


# ----------------------------------------------------------------------------- timing


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
  """Throughput and step-time statistics of timed steps."""
  total = float(np.sum(durations))
  return {"steps_per_sec": len(durations) / total,
          "images_per_sec": len(durations) * batch / total,
          "step_ms_median": percentile_ms(durations, 50),
          "step_ms_p90": percentile_ms(durations, 90)}


# ----------------------------------------------------------------------------- set-up


class Setup:
  """The model, params, optimizer and on-device batch a benchmark runs on."""

  def __init__(self, config, dtype: str):
    import jax
    from transfer import optim, parallel, runs

    self.config, self.dtype = config, dtype
    if config.parallel not in parallel.MODES:
      raise UserError(f"unknown parallel mode {config.parallel!r}; valid: {', '.join(parallel.MODES)}")
    self.mesh = parallel.make_mesh()
    self.num_devices = self.mesh.devices.size
    parallel.check_batch_size(config.batch_size, self.mesh)
    num_classes = (config.num_classes if config.num_classes > 0
                   else int(config.synthetic.num_classes))
    self.num_classes = num_classes
    self.model, self.outputs = runs.build_model(config, num_classes, dtype=dtype)
    self.params = jax.device_get(runs.initial_params(config, self.model)[0])
    self.tx, self.labels = optim.make_optimizer(config, self.params, 1000)
    self.batch = config.batch_size

  def images(self, shape=None, dtype="float32", seed: int = 1):
    """A batch of normal noise made on the devices, sharded over `data` like real batches."""
    import jax
    from transfer import parallel
    shape = shape or (self.batch, self.config.image_size, self.config.image_size, 3)
    make = jax.jit(lambda key: jax.random.normal(key, shape, dtype),
                   out_shardings=parallel.batch_sharding(self.mesh))
    return make(jax.random.PRNGKey(seed))

  def labels_batch(self, seed: int = 2):
    import jax
    from transfer import parallel
    make = jax.jit(lambda key: jax.random.randint(key, (self.batch,), 0, self.num_classes),
                   out_shardings=parallel.batch_sharding(self.mesh))
    return make(jax.random.PRNGKey(seed))

  def state(self, params=None):
    from transfer import parallel, steps
    return parallel.replicate(
        steps.create_train_state(self.params if params is None else params, self.tx,
                                 self.config.seed), self.mesh)


# ----------------------------------------------------------------------------- one kind of step


@dataclasses.dataclass
class Prepared:
  """A compiled, warmed-up step ready to time.

  Attributes:
    run: dispatches one step and returns arrays to wait on.
    compile_s: compile time (for steps without AOT lowering: the first call, run included).
    compiled: the AOT-compiled executable (for XLA's FLOP count), or None.
    labels: the freeze labels for a train step (analytic backward FLOPs), None otherwise.
    stage: `"full"` or `"head"`.
  """

  run: Callable[[], Any]
  compile_s: float
  compiled: Any
  labels: Any
  stage: str = "full"


def prepare_train(setup: Setup, warmup: int, stage: str = "full", batch=None) -> Prepared:
  """The real train step (`transfer.steps.make_train_step`) on an on-device batch."""
  from transfer import steps
  step = steps.make_train_step(setup.model, setup.tx, setup.labels, setup.mesh,
                               setup.config.parallel, stage)
  batch = batch or {"image": setup.images(), "label": setup.labels_batch()}
  holder = {"state": setup.state()}
  step, compile_s, compiled = compile_step(step, holder["state"], batch)

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    return metrics

  return _warm(Prepared(run, compile_s, compiled, setup.labels, stage), warmup)


def forward_fn(setup: Setup):
  """The jitted inference forward pass (logits), batch sharded over `data`."""
  import jax
  from transfer import parallel
  model = setup.model
  return jax.jit(lambda params, images: model.apply({"params": params}, images),
                 in_shardings=(parallel.replicated(setup.mesh), parallel.batch_sharding(setup.mesh)),
                 out_shardings=parallel.batch_sharding(setup.mesh))


def prepare_forward(setup: Setup, warmup: int) -> Prepared:
  """The inference forward pass on a batch like the train step's."""
  from transfer import parallel
  params = parallel.replicate(setup.params, setup.mesh)
  images = setup.images()
  fn, compile_s, compiled = compile_step(forward_fn(setup), params, images)
  return _warm(Prepared(lambda: fn(params, images), compile_s, compiled, None), warmup)


def prepare_eval(setup: Setup, warmup: int) -> Prepared:
  """The eval step (loss, accuracy and confusion sums over a masked batch)."""
  import jax
  import jax.numpy as jnp
  from transfer import parallel, steps
  params = parallel.replicate(setup.params, setup.mesh)
  batch = {"image": setup.images(), "label": setup.labels_batch(),
           "mask": jax.device_put(jnp.ones((setup.batch,), bool),
                                  parallel.batch_sharding(setup.mesh))}
  step = steps.make_eval_step(setup.model, setup.mesh, setup.num_classes, setup.config.parallel)
  return _warm(Prepared(lambda: step(params, batch), None, None, None), warmup)


def _warm(prepared: Prepared, warmup: int) -> Prepared:
  """Compiles by calling when there was no AOT compile, then runs `warmup` untimed steps."""
  if prepared.compile_s is None:
    start = time.perf_counter()
    jax_block(prepared.run())
    prepared.compile_s = time.perf_counter() - start
  for _ in range(warmup):
    jax_block(prepared.run())
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


def report(setup: Setup, prepared: Prepared, durations: np.ndarray) -> dict[str, Any]:
  """Summary stats, compile time and FLOP counts of one measured step."""
  result = summarize(durations, setup.batch)
  result["compile_s"] = prepared.compile_s
  result["flops_per_step_analytic"] = analytic_flops(
      setup.params, setup.config.model, setup.config.image_size, setup.batch, prepared.labels,
      prepared.stage)
  counted = (xla_flops(prepared.compiled, setup.num_devices) if prepared.compiled is not None
             else None)
  result["flops_per_step_xla"] = counted
  result["flops_per_step"] = counted if counted else result["flops_per_step_analytic"]
  result["flops_source"] = "xla" if counted else "analytic"
  return result


def jax_block(x):
  import jax
  return jax.block_until_ready(x)


# ----------------------------------------------------------------------------- cached features


def bench_cached_epoch(setup: Setup, train_step_s: float, warmup: int) -> dict[str, Any]:
  """One epoch of head training on cached features against one epoch through the backbone.

  Runs what `config.cache_features=True` runs: the backbone once over `epoch_images` images
  (device -> host feature maps), then one epoch of the head-only train step on batches of host
  features (`stage="head"`). The backbone epoch is `steps_per_epoch` train steps at the measured
  median step time, so the comparison does not need a second full epoch on slow devices.

  Returns:
    `epoch_images`, `feature_pass_s`, `head_epoch_s`, `backbone_epoch_s`, `head_epoch_speedup`.
  """
  from transfer import data, features, parallel, steps
  config = setup.config
  steps_per_epoch = max(1, int(config.get("epoch_images", 512)) // setup.batch)
  n = steps_per_epoch * setup.batch
  params = parallel.replicate(setup.params, setup.mesh)
  images = setup.images()
  features_fn = steps.make_feature_step(setup.model, setup.mesh)
  jax_block(features_fn(params, images))  # compile
  start = time.perf_counter()
  feats = [np.asarray(features_fn(params, images)) for _ in range(steps_per_epoch)]
  feature_pass_s = time.perf_counter() - start
  cached = np.concatenate(feats)
  labels = np.random.default_rng(config.seed).integers(0, setup.num_classes, n).astype(np.int32)

  head_step = steps.make_train_step(setup.model, setup.tx, setup.labels, setup.mesh,
                                    config.parallel, stage="head")
  state = setup.state()
  sharding = parallel.batch_sharding(setup.mesh)

  def epoch(state, first_step):
    host = features.feature_batches(cached, labels, setup.batch, config.seed, first_step)
    batches = data.prefetch_to_device((next(host) for _ in range(steps_per_epoch)), sharding,
                                      size=config.prefetch)
    metrics = None
    for batch in batches:
      state, metrics = head_step(state, batch)
    jax_block(metrics)
    return state

  for i in range(max(1, warmup)):  # compile, and warm the host feature path
    state = epoch(state, i * steps_per_epoch)
  start = time.perf_counter()
  epoch(state, 0)
  head_epoch_s = time.perf_counter() - start
  backbone_epoch_s = steps_per_epoch * train_step_s
  return {"epoch_images": n, "feature_pass_s": feature_pass_s, "head_epoch_s": head_epoch_s,
          "backbone_epoch_s": backbone_epoch_s,
          "head_epoch_speedup": backbone_epoch_s / max(head_epoch_s, 1e-12),
          "feature_mib": cached.nbytes / 2**20}


# ----------------------------------------------------------------------------- input pipeline


def bench_input(config, batches: int) -> dict[str, Any]:
  """Images/s of the host input pipeline for `config.dataset` (decode, augment, preprocess)."""
  from transfer import data, runs
  start = time.perf_counter()
  ds = data.create(config, preprocess_source=runs.weights_source(config.weights) or "none")
  prepare_s = time.perf_counter() - start
  rate = data.input_throughput(ds, max(1, batches))
  return {"input_images_per_sec": rate, "input_prepare_s": prepare_s,
          "input_batches": max(1, batches), "input_train_examples": ds.num_train}


# ----------------------------------------------------------------------------- report


def environment(dtype: str) -> dict[str, Any]:
  """Device kind and count, backend, versions and XLA flags: the header of every report."""
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


def _rates(result: dict[str, Any], env: dict[str, Any], peak: float | None) -> None:
  """Adds achieved TFLOP/s and MFU (against `peak` per device times the device count)."""
  tflops = result["flops_per_step"] * result["steps_per_sec"] / 1e12
  result["tflops_per_sec"] = tflops
  result["peak_tflops"] = peak * env["devices"] if peak else None
  result["mfu"] = tflops / result["peak_tflops"] if peak else None


def run(config, mode: str = "train", steps: int = 20, warmup: int = 2,
        peak: float | None = None) -> dict[str, Any]:
  """Runs one benchmark and returns the flat JSON-able result (see `main`)."""
  import jax
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
  result = report(setup, steps_to_time[0], durations[0])
  _rates(result, env, peak)

  if mode == "train":
    forward = report(setup, steps_to_time[1], durations[1])
    extra["forward_step_ms_median"] = forward["step_ms_median"]
    extra["forward_images_per_sec"] = forward["images_per_sec"]
    extra["train_forward_ratio"] = result["step_ms_median"] / forward["step_ms_median"]
    extra["forward_flops_per_step"] = forward["flops_per_step"]
    same = "xla" if result["flops_source"] == forward["flops_source"] == "xla" else "analytic"
    extra["flops_ratio_train_forward"] = (result[f"flops_per_step_{same}"]
                                          / forward[f"flops_per_step_{same}"])
    if config.get("cache_features", False):
      extra.update(bench_cached_epoch(setup, result["step_ms_median"] / 1e3, warmup))
  if mode == "input":
    extra["limited_by"] = ("input" if extra["input_images_per_sec"] < result["images_per_sec"]
                           else "step")
  return {**head, **result, **extra}


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
    else:
      text = fmt.format(value)
    lines.append(f"  {label:<26} {text}")
  return "\n".join(lines)


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
  from transfer import platform
  platform.setup()  # nothing new after the CLI did it; for calls from Python
  result = run(config, mode, steps, warmup, peak_tflops)
  table = format_table(result)
  if as_json:
    print(table, file=sys.stderr, flush=True)
    print(json.dumps(result), flush=True)
  else:
    print(table, flush=True)
  return result
