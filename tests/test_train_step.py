"""The pure train step: freezing, data parallelism across device counts, compile-once, NaN guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfer import models, optim, parallel
from transfer import steps as steps_lib, train_state
from transfer.configs import default
from transfer.errors import UserError
from helpers import F32_U, assert_trained_alike

IMAGE = 32
BATCH = 8


def _setup(dtype="float32", trainable=("^head/",), lr=1e-2, optimizer="adam", conv="auto"):
  config = default.get_config()
  config.trainable, config.learning_rate, config.optimizer = list(trainable), lr, optimizer
  model = models.get("vgg16_tiny", head="flatten_dense", num_classes=1, dtype=dtype, conv=conv)
  params = models.init_params(model, IMAGE, 0)
  tx, labels = optim.make_optimizer(params, config, 100)
  return model, params, tx, labels


def _batches(n, seed=0):
  """Learnable two-class data: class 1 images are brighter in the centre."""
  rng = np.random.default_rng(seed)
  for _ in range(n):
    label = rng.integers(0, 2, BATCH).astype(np.int32)
    image = rng.normal(size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
    image[:, 8:24, 8:24, :] += 2.0 * label[:, None, None, None]
    yield {"image": image, "label": label}


def _run(devices, mode, steps=3, **kw):
  model, params, tx, labels = _setup(**kw)
  params = jax.device_get(params)  # host copy: the device buffers get donated to the step
  mesh = parallel.make_mesh(devices)
  step = steps_lib.make_train_step(model, tx, labels, mesh, mode)
  state = parallel.replicate(train_state.create_train_state(params, tx, 0), mesh)
  metrics = []
  for batch in _batches(steps):
    state, m = step(state, jax.device_put(batch, parallel.batch_sharding(mesh)))
    metrics.append(jax.device_get(m))
  return params, state, metrics, step


def test_frozen_parameters_stay_bit_identical_and_the_head_trains():
  params, state, _, _ = _run(jax.devices()[:1], "shard_map")
  after = jax.device_get(state.params)
  for name in params:
    for leaf in params[name] if name != "head" else ():
      np.testing.assert_array_equal(np.asarray(params[name][leaf]), after[name][leaf])
  assert not np.allclose(params["head"]["logits"]["kernel"], after["head"]["logits"]["kernel"])
  assert int(state.step) == 3


def test_optimizer_state_has_no_moments_for_frozen_leaves():
  _, params, tx, labels = _setup()
  state = train_state.create_train_state(params, tx, 0)
  n_trainable, _ = optim.count_params(params, labels)
  moments = [x for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0]
  assert sum(x.size for x in moments) == 2 * n_trainable


def test_loss_decreases():
  _, _, metrics, _ = _run(jax.devices()[:1], "shard_map", steps=30, lr=3e-3, trainable=(".",))
  first = np.mean([m["loss"] for m in metrics[:5]])
  last = np.mean([m["loss"] for m in metrics[-5:]])
  assert last < 0.7 * first, (first, last)


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
@pytest.mark.parametrize("num_devices", [2, 4])
@pytest.mark.parametrize("conv", ["auto", "winograd"])
def test_same_parameters_on_any_device_count(mode, num_devices, conv):
  """Dropout is on (rate 0.6), block5 trains too: results must not depend on the layout.

  SGD keeps updates linear in the gradients; Adam's m/sqrt(v) would turn float round-off in
  near-zero gradients (summed in another order on another layout) into lr-sized differences.
  With `conv="winograd"` block5_conv3's gradient flows back through the Winograd transforms.
  """
  kw = dict(trainable=("^head/", "^block5_conv3"), optimizer="sgd", lr=0.1, conv=conv)
  _, ref, ref_metrics, _ = _run(jax.devices()[:1], "shard_map", **kw)
  _, got, got_metrics, _ = _run(jax.devices()[:num_devices], mode, **kw)
  # The most terms in one gradient element: block5_conv3's kernel, over 8 examples x 2x2
  # positions (32 / 2**4 after four pools).
  terms = BATCH * (IMAGE // 16) ** 2
  assert_trained_alike(got.params, ref.params, terms=terms, steps=3)
  # The batch mean of 8 positive per-example losses, summed in another order; 4x slack for
  # the forward pass on another per-device batch.
  loss_rtol = 4 * (BATCH - 1) * F32_U
  np.testing.assert_allclose([m["loss"] for m in got_metrics], [m["loss"] for m in ref_metrics],
                             rtol=loss_rtol)


def test_step_compiles_once():
  _, _, _, step = _run(jax.devices()[:2], "shard_map", steps=4)
  assert step._cache_size() == 1


def test_nonfinite_loss_freezes_state_and_records_the_step():
  """A learning rate of 1e36 makes the second step's loss NaN (a real divergence, not an input
  NaN: XLA's CPU max/relu would quietly drop a NaN pixel)."""
  model, params, tx, labels = _setup(optimizer="sgd", lr=1e36)
  mesh = parallel.make_mesh(jax.devices()[:2])
  step = steps_lib.make_train_step(model, tx, labels, mesh)
  state = parallel.replicate(train_state.create_train_state(jax.device_get(params), tx, 0), mesh)
  history, losses = [], []
  for batch in _batches(4):
    state, metrics = step(state, jax.device_put(batch, parallel.batch_sharding(mesh)))
    history.append(jax.device_get(state.params["head"]["logits"]["kernel"]))
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses[0]) and not np.isfinite(losses[1])
  assert int(state.nonfinite_step) == 1 and int(state.step) == 4
  np.testing.assert_array_equal(history[0], history[3])  # nothing applied after the blow-up
  assert np.all(np.isfinite(history[3]))


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
  _, ref, ref_m, _ = _run(jax.devices()[:1], "shard_map")
  _, got, got_m, _ = _run(jax.devices()[:1], "shard_map", dtype="bfloat16")
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(got.params))
  np.testing.assert_allclose([m["loss"] for m in ref_m], [m["loss"] for m in got_m], rtol=0.05)


def test_eval_step_counts_masked_examples_once():
  model, params, _, _ = _setup()
  mesh = parallel.make_mesh(jax.devices()[:4])
  eval_step = steps_lib.make_eval_step(model, mesh, 2)
  batch = next(_batches(1))
  batch["mask"] = np.arange(BATCH) < 5
  sums = jax.device_get(eval_step(parallel.replicate(params, mesh),
                                  jax.device_put(batch, parallel.batch_sharding(mesh))))
  assert sums["count"] == 5 and np.asarray(sums["confusion"]).sum() == 5
  logits = model.apply({"params": params}, batch["image"][:5])
  pred = (np.asarray(logits)[:, 0] > 0).astype(int)
  assert sums["correct"] == pytest.approx(np.sum(pred == batch["label"][:5]), abs=1e-4)


def test_the_step_leaves_the_callers_variables_readable():
  """A researcher's own variables (device arrays) go into a state and through the step, placed
  by `replicate` or as they are: afterwards they still read, unchanged (donation is opt-in)."""
  model, params, tx, labels = _setup()
  want = jax.device_get(params)
  mesh = parallel.make_mesh(jax.devices()[:1])
  step = steps_lib.make_train_step(model, tx, labels, mesh)
  for place in (lambda s: parallel.replicate(s, mesh), lambda s: s):
    state = place(train_state.create_train_state(params, tx, 0))
    for batch in _batches(3):
      state, _ = step(state, jax.device_put(batch, parallel.batch_sharding(mesh)))
    assert int(state.step) == 3
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(params)),
                    jax.tree_util.tree_leaves(want)):
      np.testing.assert_array_equal(a, b)


def test_the_state_is_a_flax_train_state():
  """flax's fields and `apply_gradients` (its `tx`), with `apply_fn` and `tx` static."""
  from flax.training import train_state as flax_train_state
  model, params, tx, _ = _setup(optimizer="sgd", lr=1.0)
  state = train_state.create_train_state(params, tx, 0, apply_fn=model.apply)
  assert isinstance(state, flax_train_state.TrainState)
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert not any(n.startswith((".apply_fn", ".tx")) for n in names)
  x = next(_batches(1))["image"]
  np.testing.assert_array_equal(state.apply_fn(state.variables, x),
                                model.apply({"params": params}, x))
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  after = state.apply_gradients(grads=grads)
  assert int(after.step) == 1
  np.testing.assert_allclose(after.params["head"]["logits"]["bias"],
                             params["head"]["logits"]["bias"] - 1.0)
  np.testing.assert_array_equal(after.params["block1_conv1"]["kernel"],  # frozen
                                params["block1_conv1"]["kernel"])


def test_a_state_of_another_optimizer_is_refused():
  model, params, tx, labels = _setup()
  _, _, other, _ = _setup()
  mesh = parallel.make_mesh(jax.devices()[:1])
  step = steps_lib.make_train_step(model, tx, labels, mesh)
  state = train_state.create_train_state(params, other, 0)
  with pytest.raises(UserError, match="another optimizer"):
    step(state, jax.device_put(next(_batches(1)), parallel.batch_sharding(mesh)))
