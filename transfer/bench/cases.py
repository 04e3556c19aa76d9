"""What a benchmark runs: the run's model, params and optimizer on on-device batches (`Setup`),
and each kind of step compiled and warmed up, ready to time (`prepare_*`), plus the two measures
that are epochs rather than steps (cached features, the input pipeline)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from transfer.bench.timing import Prepared, block, compile_step, warm


class Setup:
  """The run a benchmark times (`transfer.assembly.build`: the data's class count, the model,
  the first stage's optimizer, regularisation and parameter average, so the step timed is the
  step `train` trains), its initial params and an on-device batch."""

  def __init__(self, config, dtype: str):
    import jax
    from transfer import assembly

    self.config, self.dtype = config, dtype
    self.run = assembly.build(config, dtype=dtype)
    self.mesh = self.run.mesh
    self.num_devices = self.mesh.devices.size
    self.num_classes = self.run.num_classes
    self.model, self.outputs = self.run.model, self.run.outputs
    self.parts = self.run.stage(0)
    variables = jax.device_get(self.run.initial_variables()[0])
    self.params = variables["params"]
    self.batch_stats = variables.get("batch_stats") or {}  # BatchNorm statistics (ResNet)
    self.tx, self.labels = self.parts.tx, self.parts.param_labels
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
    """Random labels made on the devices, sharded like `images`."""
    import jax
    from transfer import parallel
    make = jax.jit(lambda key: jax.random.randint(key, (self.batch,), 0, self.num_classes),
                   out_shardings=parallel.batch_sharding(self.mesh))
    return make(jax.random.PRNGKey(seed))

  def state(self, params=None):
    """A fresh train state of `params` (default: the set-up's), replicated over the mesh."""
    params = self.params if params is None else params
    return self.run.new_state({"params": params, "batch_stats": self.batch_stats}, self.parts)

  @property
  def variables(self):
    """What `model.apply` takes: the params, and the BatchNorm statistics when there are any."""
    from transfer import train_state
    return train_state.as_variables(self.params, self.batch_stats)


def prepare_train(setup: Setup, warmup: int, stage: str = "full", batch=None) -> Prepared:
  """The run's train step (`assembly.Run.train_step`) on an on-device batch."""
  step = setup.run.train_step(setup.parts, stage)
  batch = batch or train_batch(setup)
  holder = {"state": setup.state()}
  fingerprint = fingerprint_of(step, holder["state"], batch)
  step, compile_s, compiled = compile_step(step, holder["state"], batch)

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    return metrics

  return warm(Prepared(run, compile_s, compiled, setup.labels, stage, fingerprint), warmup)


def train_batch(setup: Setup) -> dict[str, Any]:
  """An on-device batch of noise images and random labels, as the train step takes it."""
  return {"image": setup.images(), "label": setup.labels_batch()}


def fingerprint_of(step, *args) -> str | None:
  """`transfer.platform.program_fingerprint` of a jitted step for `args` (None for pmap's)."""
  from transfer import platform
  return platform.program_fingerprint(step.lower(*args)) if hasattr(step, "lower") else None


def forward_fn(setup: Setup):
  """The jitted inference forward pass (logits), batch sharded over `data`."""
  import jax
  from transfer import parallel
  model = setup.model
  return jax.jit(lambda variables, images: model.apply(variables, images),
                 in_shardings=(parallel.replicated(setup.mesh), parallel.batch_sharding(setup.mesh)),
                 out_shardings=parallel.batch_sharding(setup.mesh))


def prepare_forward(setup: Setup, warmup: int) -> Prepared:
  """The inference forward pass on a batch like the train step's."""
  from transfer import parallel
  params = parallel.replicate(setup.variables, setup.mesh)
  images = setup.images()
  fn, compile_s, compiled = compile_step(forward_fn(setup), params, images)
  return warm(Prepared(lambda: fn(params, images), compile_s, compiled, None), warmup)


def prepare_eval(setup: Setup, warmup: int) -> Prepared:
  """The eval step (loss, accuracy and confusion sums over a masked batch)."""
  import jax
  import jax.numpy as jnp
  from transfer import parallel
  params = parallel.replicate(setup.variables, setup.mesh)
  batch = {"image": setup.images(), "label": setup.labels_batch(),
           "mask": jax.device_put(jnp.ones((setup.batch,), bool),
                                  parallel.batch_sharding(setup.mesh))}
  step = setup.run.eval_step()
  return warm(Prepared(lambda: step(params, batch), None, None, None), warmup)


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
  steps_per_epoch = max(1, int(config.epoch_images) // setup.batch)
  n = steps_per_epoch * setup.batch
  params = parallel.replicate(setup.variables, setup.mesh)
  images = setup.images()
  features_fn = steps.make_feature_step(setup.model, setup.mesh)
  block(features_fn(params, images))  # compile
  start = time.perf_counter()
  feats = [np.asarray(features_fn(params, images)) for _ in range(steps_per_epoch)]
  feature_pass_s = time.perf_counter() - start
  cached = np.concatenate(feats)
  labels = np.random.default_rng(config.seed).integers(0, setup.num_classes, n).astype(np.int32)

  head_step = setup.run.train_step(setup.parts, "head")
  state = setup.state()
  sharding = parallel.batch_sharding(setup.mesh)

  def epoch(state, first_step):
    host = features.feature_batches(cached, labels, setup.batch, config.seed, first_step)
    batches = data.prefetch_to_device((next(host) for _ in range(steps_per_epoch)), sharding,
                                      size=config.prefetch)
    metrics = None
    for batch in batches:
      state, metrics = head_step(state, batch)
    block(metrics)
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


def bench_input(config, batches: int) -> dict[str, Any]:
  """Images/s of the host input pipeline for `config.dataset` (decode, augment, preprocess).

  Timed for 1, 2, 4, ... workers up to this host's cores (and the configured count), of the
  configured `data_worker_kind`, so the report shows how decoding scales with cores; the
  configured count's rate is `input_images_per_sec`.
  """
  from transfer import data, runs
  from transfer.data import workers
  kind = config.data_worker_kind
  configured = int(config.data_workers) or workers.default_count()
  source = runs.weights_source(config.weights) or "none"
  rates, prepare_s, num_train = {}, None, 0
  for count in input_worker_counts(os.cpu_count() or 1, configured):
    trial = config.copy_and_resolve_references()
    trial.data_workers = count
    start = time.perf_counter()
    ds = data.create(trial, preprocess_source=source)
    prepare_s = time.perf_counter() - start if prepare_s is None else prepare_s
    try:
      rates[count] = data.input_rates(ds, max(1, batches))
    finally:
      ds.close()
    num_train = ds.num_train
  wall, cpu = rates[configured]
  # Process CPU time does not count worker processes, so a CPU rate is reported for threads only.
  return {"input_images_per_sec": wall,
          "input_images_per_cpu_sec": cpu if kind == "thread" else None,
          "input_prepare_s": prepare_s,
          "input_batches": max(1, batches), "input_train_examples": num_train,
          "input_worker_kind": kind, "input_workers": configured,
          "input_images_per_sec_by_workers": {str(k): v[0] for k, v in sorted(rates.items())}}


def input_worker_counts(cpus: int, configured: int) -> list[int]:
  """1, 2, 4, ... below `cpus`, then `cpus` itself, and the configured count."""
  counts = {configured, cpus}
  n = 1
  while n < cpus:
    counts.add(n)
    n *= 2
  return sorted(counts)
