"""Label smoothing, mixup/cutmix and parameter EMA in the train step (transfer/steps.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfer import checkpoint, models, optim, parallel
from transfer import losses, regularisation, train_state
from transfer import steps as steps_lib
from transfer.configs import default
from helpers import assert_trained_alike, tiny_config

IMAGE = 32
BATCH = 8
Reg = regularisation.Regularisation


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------------ soft targets

def test_label_smoothed_softmax_loss_matches_a_hand_computation():
  logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]], np.float32)
  labels = np.array([0, 2])
  targets = losses.soft_targets(jnp.asarray(labels), 3, 0.3)
  want_t = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])  # 0.7 * onehot + 0.3 / 3
  np.testing.assert_allclose(targets, want_t, rtol=1e-6)
  loss, m = losses.loss_and_metrics(jnp.asarray(logits), jnp.asarray(labels), targets=targets)
  want = -(want_t * _log_softmax(logits.astype(np.float64))).sum(-1).mean()
  assert float(loss) == pytest.approx(want, rel=1e-6)
  assert float(m["accuracy"]) == 1.0  # argmax of logits: 0 and 2


def test_label_smoothed_sigmoid_loss_matches_a_hand_computation():
  logit = np.array([1.5, -0.5, 0.0], np.float32)
  labels = np.array([1, 0, 1])
  targets = losses.soft_targets(jnp.asarray(labels), 1, 0.2)
  np.testing.assert_allclose(targets, [0.9, 0.1, 0.9], rtol=1e-6)  # y * 0.8 + 0.2 / 2
  loss, _ = losses.loss_and_metrics(jnp.asarray(logit[:, None]), jnp.asarray(labels),
                                       targets=targets)
  t, p = np.array([0.9, 0.1, 0.9]), _sigmoid(logit.astype(np.float64))
  want = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()
  assert float(loss) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("outputs", [1, 4])
def test_label_smoothing_zero_equals_the_plain_loss(outputs):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(16, outputs)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, max(outputs, 2), 16))
  mask = jnp.asarray(np.arange(16) < 13)
  plain, plain_m = losses.loss_and_metrics(logits, labels, mask)
  soft, soft_m = losses.loss_and_metrics(
      logits, labels, mask, targets=losses.soft_targets(labels, outputs, 0.0))
  np.testing.assert_allclose(float(soft), float(plain), rtol=1e-6)
  assert float(soft_m["accuracy"]) == float(plain_m["accuracy"])


def test_mixed_soft_targets_loss_matches_a_hand_computation():
  """Softmax cross-entropy against lam * t_a + (1 - lam) * t_b, with smoothing on top."""
  logits = np.array([[1.0, 0.0], [-2.0, 3.0]], np.float32)
  t = np.asarray(losses.soft_targets(jnp.asarray([0, 1]), 2, 0.1))   # [[.95,.05],[.05,.95]]
  lam = 0.7
  mixed = lam * t + (1 - lam) * t[::-1]
  loss, _ = losses.loss_and_metrics(jnp.asarray(logits), None, targets=jnp.asarray(mixed))
  want = -(np.array([[0.68, 0.32], [0.32, 0.68]]) * _log_softmax(logits.astype(np.float64)))
  assert float(loss) == pytest.approx(want.sum(-1).mean(), rel=1e-6)


# ------------------------------------------------------------------------------------ mixing

def _mix(reg, seed=0, n=BATCH):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, IMAGE, IMAGE, 3)).astype(np.float32)
  targets = losses.soft_targets(jnp.asarray(rng.integers(0, 3, n)), 3, 0.0)
  out, mixed_t, lam = regularisation.mix_batch(jax.random.PRNGKey(seed), jnp.asarray(images), targets,
                                          lambda x: x[::-1], reg)
  return images, np.asarray(targets), np.asarray(out), np.asarray(mixed_t), float(lam)


def test_mixup_blends_each_example_with_the_flipped_batch():
  images, targets, out, mixed_t, lam = _mix(Reg(mixup_alpha=0.4))
  assert 0.0 < lam < 1.0
  np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(mixed_t, lam * targets + (1 - lam) * targets[::-1], rtol=1e-6)


def test_cutmix_pastes_one_box_and_lambda_is_its_real_area():
  for seed in range(5):
    images, targets, out, mixed_t, lam = _mix(Reg(cutmix_alpha=1.0), seed=seed)
    from_partner = np.all(out == images[::-1], axis=-1) & ~np.all(out == images, axis=-1)
    own = np.all(out == images, axis=-1)
    assert np.all(from_partner | own)
    box = from_partner[0]
    assert np.all(from_partner == box)  # one box for the whole batch
    rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
    if box.any():  # a rectangle
      assert box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and box.sum() == \
          len(rows) * len(cols)
    assert lam == pytest.approx(1 - box.mean(), abs=1e-6)
    np.testing.assert_allclose(mixed_t, lam * targets + (1 - lam) * targets[::-1], rtol=1e-6)


def test_both_alphas_pick_mixup_or_cutmix_per_batch():
  kinds = set()
  for seed in range(12):
    images, _, out, _, lam = _mix(Reg(mixup_alpha=0.4, cutmix_alpha=1.0), seed=seed)
    cut = np.all((out == images) | (out == images[::-1]))
    kinds.add(bool(cut))
    if not cut:
      np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], atol=1e-6)
  assert kinds == {True, False}


# ------------------------------------------------------------------------------------ train step

def _setup(trainable=("^head/", "^block5_conv3"), optimizer="sgd", lr=0.1, dropout=0.6,
           outputs=1):
  config = default.get_config()
  config.trainable, config.learning_rate, config.optimizer = list(trainable), lr, optimizer
  model = models.get("vgg16_tiny", head="flatten_dense", num_classes=outputs, dtype="float32",
                     head_dropout=dropout)
  params = jax.device_get(models.init_params(model, IMAGE, 0))
  tx, labels = optim.make_optimizer(params, config, 100)
  return model, params, tx, labels


def _batches(n, seed=0, classes=2):
  rng = np.random.default_rng(seed)
  for _ in range(n):
    label = rng.integers(0, classes, BATCH).astype(np.int32)
    image = rng.normal(size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
    image[:, 8:24, 8:24, :] += 2.0 * label[:, None, None, None]
    yield {"image": image, "label": label}


def _train(reg, devices=1, mode="shard_map", steps=3, ema=False, outputs=1, ema_decay=0.0, **kw):
  model, params, tx, labels = _setup(outputs=outputs, **kw)
  mesh = parallel.make_mesh(jax.devices()[:devices])
  step = steps_lib.make_train_step(model, tx, labels, mesh, mode, regularisation=reg,
                                   ema_decay=ema_decay)
  state = parallel.replicate(train_state.create_train_state(params, tx, 0, ema=ema), mesh)
  history, metrics = [], []
  for batch in _batches(steps, classes=max(outputs, 2)):
    state, m = step(state, jax.device_put(batch, parallel.batch_sharding(mesh)))
    history.append(jax.device_get(state.params))
    metrics.append(jax.device_get(m))
  return params, state, history, metrics


def _assert_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(a)),
                  jax.tree_util.tree_leaves(jax.device_get(b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_zero_alphas_and_zero_smoothing_train_as_no_regularisation():
  _, ref, _, ref_m = _train(None)
  _, got, _, got_m = _train(Reg(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0))
  _assert_equal(got.params, ref.params)
  assert [m["loss"] for m in got_m] == [m["loss"] for m in ref_m]


def test_the_step_trains_on_the_mixed_batch_from_its_own_key():
  """The step's loss is the soft-target loss of the model on the mixed batch drawn from
  fold_in(fold_in(rng, step), _MIX_STREAM), with smoothing; dropout off to recompute it."""
  reg = Reg(mixup_alpha=0.4, cutmix_alpha=1.0, label_smoothing=0.1)
  model, params, _, _ = _setup(dropout=0.0, outputs=3)
  _, _, _, metrics = _train(reg, steps=1, dropout=0.0, outputs=3, lr=0.0)
  batch = next(_batches(1, classes=3))
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 0), regularisation._MIX_STREAM)
  targets = losses.soft_targets(jnp.asarray(batch["label"]), 3, 0.1)
  images, targets, _ = regularisation.mix_batch(key, jnp.asarray(batch["image"]), targets,
                                                lambda x: x[::-1], reg)
  logits = np.asarray(model.apply({"params": params}, images), np.float64)
  want = -(np.asarray(targets) * _log_softmax(logits)).sum(-1).mean()
  assert float(metrics[0]["loss"]) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("mode,devices", [("shard_map", 2), ("shard_map", 4), ("pmap", 4)])
def test_mixing_is_the_same_on_any_device_count(mode, devices):
  """Partners are paired across the global batch (a ppermute between mirror devices), so 1, 2
  or 4 devices train the same params up to the gradient's summation order."""
  reg = Reg(mixup_alpha=0.4, cutmix_alpha=1.0, label_smoothing=0.1)
  _, ref, _, ref_m = _train(reg, steps=4)
  _, got, _, got_m = _train(reg, devices=devices, mode=mode, steps=4)
  assert_trained_alike(got.params, ref.params, terms=BATCH * (IMAGE // 16) ** 2, steps=4)
  np.testing.assert_allclose([m["loss"] for m in got_m], [m["loss"] for m in ref_m], rtol=1e-5)


# ------------------------------------------------------------------------------------ EMA

def test_ema_with_decay_zero_equals_the_raw_params():
  _, state, _, _ = _train(None, ema=True, ema_decay=0.0, devices=2)
  _assert_equal(state.ema_params, state.params)


def test_ema_follows_its_definition_and_frozen_leaves_equal_their_params():
  decay = 0.9
  params, state, history, _ = _train(None, ema=True, ema_decay=decay, steps=3)
  want = jax.tree_util.tree_map(np.asarray, params)
  for p in history:
    want = jax.tree_util.tree_map(lambda e, x: decay * e + (1 - decay) * x, want, p)
  got = jax.device_get(state.ema_params)
  np.testing.assert_allclose(got["head"]["logits"]["kernel"], want["head"]["logits"]["kernel"],
                             rtol=1e-6, atol=1e-7)
  assert not np.allclose(got["head"]["logits"]["kernel"],
                         jax.device_get(state.params)["head"]["logits"]["kernel"])
  _assert_equal(got["block1_conv1"], jax.device_get(state.params)["block1_conv1"])  # frozen


def test_ema_checkpoint_restores_exactly_and_old_checkpoints_still_restore(tmp_path):
  _, state, _, _ = _train(None, ema=True, ema_decay=0.5, steps=2)
  mesh = parallel.make_mesh(jax.devices()[:1])
  saver = checkpoint.Checkpointer(str(tmp_path / "new"), async_save=False)
  saver.save(2, state, {"run": {}})
  saver.close()
  _, restored, _ = checkpoint.Checkpointer(str(tmp_path / "new")).restore_latest(
      checkpoint.abstract_like(state))
  _assert_equal(restored, state)
  _assert_equal(restored.ema_params, state.ema_params)
  variables, _ = checkpoint.Checkpointer(str(tmp_path / "new")).restore_variables(2)
  _assert_equal(variables["ema_params"], state.ema_params)

  # A checkpoint written before `ema_params` existed: its state has no such field.
  plain = state.replace(ema_params={})
  old = {f.name: getattr(plain, f.name) for f in dataclasses.fields(plain)
         if f.name != "ema_params" and f.metadata.get("pytree_node", True)}
  saver = checkpoint.Checkpointer(str(tmp_path / "old"), async_save=False)
  saver.save(2, parallel.replicate(old, mesh), {"run": {}})
  saver.close()
  _, restored, _ = checkpoint.Checkpointer(str(tmp_path / "old")).restore_latest(
      checkpoint.abstract_like(plain))
  assert restored.ema_params == {}
  _assert_equal(restored.params, state.params)
  variables, _ = checkpoint.Checkpointer(str(tmp_path / "old")).restore_variables(2)
  assert "ema_params" not in variables


# ------------------------------------------------------------------------------------ config keys

@pytest.mark.parametrize("key,value,message", [
    ("label_smoothing", 1.0, "label_smoothing=1.0 is out of range: must be in [0, 1)"),
    ("label_smoothing", -0.1, "label_smoothing=-0.1 is out of range: must be in [0, 1)"),
    ("mixup_alpha", -1.0, "mixup_alpha=-1.0 is out of range: must be >= 0"),
    ("cutmix_alpha", -0.5, "cutmix_alpha=-0.5 is out of range: must be >= 0"),
    ("ema_decay", 1.0, "ema_decay=1.0 is out of range: must be in [0, 1)"),
    ("randaugment_n", 0, "randaugment_n=0 is out of range: must be >= 1"),
    ("randaugment_m", 11, "randaugment_m=11 is out of range: must be in [0, 10]"),
    ("augment", "autoaugment", "augment='autoaugment' is not valid: must be one of none, flip, "
                               "crop_flip, inception_crop, randaugment"),
])
def test_new_keys_are_validated(key, value, message):
  from transfer import configs
  from transfer.errors import UserError
  config = default.get_config()
  config[key] = value
  with pytest.raises(UserError) as e:
    configs.validate(config)
  assert str(e.value) == message


def test_new_keys_accept_their_documented_values():
  from transfer import configs
  config = default.get_config()
  config.update(label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0, ema_decay=0.9999,
                augment="randaugment", randaugment_n=3, randaugment_m=10)
  configs.validate(config)


# ------------------------------------------------------------------------------------ resume

def test_resume_with_ema_mixing_and_randaugment_is_bit_exact(tmp_path):
  """3 steps, then a rerun to 6, equals 6 steps at once: params, EMA and optimizer state."""
  from transfer import train
  extra = dict(ema_decay=0.9, mixup_alpha=0.4, cutmix_alpha=1.0, label_smoothing=0.1,
               augment="randaugment", eval_every_steps=-1)
  train.train_and_evaluate(tiny_config(**extra), str(tmp_path / "ref"))
  train.train_and_evaluate(tiny_config(num_steps=3, **extra), str(tmp_path / "run"))
  train.train_and_evaluate(tiny_config(**extra), str(tmp_path / "run"))
  states = []
  for name in ("ref", "run"):
    saver = checkpoint.Checkpointer(str(tmp_path / name), async_save=False)
    step = saver.latest_step()
    states.append(saver.manager.restore(step, args=checkpoint.ocp.args.Composite(
        state=checkpoint.ocp.args.StandardRestore(saver.local_target(step))))["state"])
    saver.close()
  assert int(states[0]["step"]) == 6 and states[0]["ema_params"]
  _assert_equal(states[1], states[0])
