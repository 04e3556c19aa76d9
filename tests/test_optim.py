"""Freezing as optimizer structure: labels, multi_transform state, learning-rate multipliers."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from transfer import models, optim
from transfer.errors import UserError
from helpers import default_config


@pytest.fixture(scope="module")
def params():
  return models.init_params(models.get("vgg16_tiny", head="flatten_dense", num_classes=2), 32)


def test_labels_freeze_everything_but_the_head(params):
  labels = optim.param_labels(params, ["^head/"])
  flat = dict(zip(optim.param_paths(params), jax.tree_util.tree_leaves(labels)))
  assert flat["head/hidden/kernel"] == "trainable"
  assert flat["head/logits/bias"] == "trainable"
  assert flat["block5_conv3/kernel"] == "frozen"
  assert sum(l == "trainable" for l in flat.values()) == 4


def test_unmatched_pattern_is_an_error_listing_layers(params):
  with pytest.raises(UserError, match=r"'\^blok5' matches no parameter; layers are: .*block5_conv1"):
    optim.param_labels(params, ["^blok5"])


def test_lr_mults_make_groups_and_must_touch_trainable_params(params):
  labels = optim.param_labels(params, ["^head/", "^block5"], {"^block5": 0.1})
  flat = dict(zip(optim.param_paths(params), jax.tree_util.tree_leaves(labels)))
  assert flat["block5_conv1/kernel"] == "trainable_x0.1"
  assert flat["head/logits/kernel"] == "trainable"
  with pytest.raises(UserError, match="only frozen"):
    optim.param_labels(params, ["^head/"], {"^block4": 0.1})
  with pytest.raises(UserError, match="several lr_mults"):
    optim.param_labels(params, ["^head/"], {"^head/": 0.1, "logits": 2.0})


def test_frozen_parameters_have_no_optimizer_state(params):
  tx, labels = optim.make_optimizer(params, default_config(optimizer="adam"), 10)
  state = tx.init(params)
  leaves = jax.tree_util.tree_leaves(state)
  n_trainable, n_frozen = optim.count_params(params, labels)
  # Adam keeps mu and nu for trainable leaves only (plus scalar counts).
  assert sum(int(x.size) for x in leaves if x.ndim > 0) == 2 * n_trainable
  assert n_frozen > n_trainable


def test_lr_mult_scales_the_update(params):
  config = default_config(optimizer="sgd", momentum=0.0, learning_rate=1.0,
                          trainable=["^head/", "^block5_conv3"])
  config.lr_mults = ml_collections.ConfigDict({"^block5_conv3": 0.1})
  tx, _ = optim.make_optimizer(params, config, 10)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert np.allclose(updates["head"]["logits"]["bias"], -1.0)
  assert np.allclose(updates["block5_conv3"]["bias"], -0.1)
  assert not np.any(updates["block1_conv1"]["kernel"])


def test_describe_counts(params):
  _, labels = optim.make_optimizer(params, default_config(), 10)
  line = optim.describe(params, labels)
  trainable = 32 * 256 + 256 + 256 * 2 + 2  # 32x32 input -> 1x1x32 features
  assert line.startswith(f"params: {trainable:,} trainable")
  assert "head/hidden" in line


def test_schedules():
  config = default_config(schedule="warmup_cosine", warmup_steps=10, learning_rate=1.0)
  sched = optim.make_schedule(config, 100)
  assert float(sched(0)) == 0.0 and abs(float(sched(10)) - 1.0) < 1e-6 and float(sched(100)) < 1e-3
  with pytest.raises(UserError, match="unknown schedule"):
    optim.make_schedule(default_config(schedule="bogus"), 10)


def _fastai_one_cycle(step, total, peak, pct, div, final_div):
  """fastai's 1cycle written out: cosine from peak/div up to peak over pct of the steps, then
  cosine down to peak/(div*final_div)."""
  up = int(pct * total)
  lo, end = peak / div, peak / (div * final_div)
  if step <= up:
    return lo + (peak - lo) * (1 - np.cos(np.pi * step / up)) / 2
  t = (step - up) / (total - up)
  return end + (peak - end) * (1 + np.cos(np.pi * t)) / 2


@pytest.mark.parametrize("step", [0, 5, 25, 26, 60, 99, 100])
def test_one_cycle_rates_match_the_definition(step):
  config = default_config(schedule="one_cycle", learning_rate=0.1, pct_start=0.25,
                          div_factor=25.0, final_div_factor=1e4)
  rate = float(optim.make_schedule(config, 100)(step))
  # float32 arithmetic: relative to the peak rate near the end, where the rate is tiny.
  assert rate == pytest.approx(_fastai_one_cycle(step, 100, 0.1, 0.25, 25.0, 1e4), rel=1e-5,
                              abs=1e-6 * 0.1)
  if step == 25:
    assert rate == pytest.approx(0.1)


def _injected(opt_state, name):
  """The value of hyperparameter `name` in the first injected state found in `opt_state`."""
  found = [s.hyperparams[name] for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: hasattr(x, "hyperparams")) if hasattr(s, "hyperparams")]
  assert found, "no injected hyperparameters"
  return float(found[0])


@pytest.mark.parametrize("optimizer,key", [("adam", "b1"), ("adamw", "b1"), ("sgd", "momentum")])
def test_one_cycle_cycles_momentum_where_the_optimizer_has_it(params, optimizer, key):
  """0.95 at the start, 0.85 at the peak rate, back to 0.95 at the end (fastai's moms)."""
  config = default_config(schedule="one_cycle", optimizer=optimizer, learning_rate=0.01,
                          pct_start=0.25)
  tx, _ = optim.make_optimizer(params, config, 8)
  state = tx.init(params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  seen = []
  for _ in range(9):
    _, state = tx.update(grads, state, params)
    seen.append(_injected(state, key))  # evaluated at the count before this update
  assert seen[0] == pytest.approx(0.95) and seen[2] == pytest.approx(0.85)
  assert seen[8] == pytest.approx(0.95)
  assert seen[1] == pytest.approx(0.90)  # cosine half-way: (0.95 + 0.85) / 2


def test_one_cycle_leaves_an_optimizer_without_momentum_alone(params):
  config = default_config(schedule="one_cycle", optimizer="sgd", momentum=0.0)
  assert optim.make_momentum_schedule(config, 8) is None
  config = default_config(schedule="one_cycle", optimizer="adam", cycle_momentum=False)
  assert optim.make_momentum_schedule(config, 8) is None


def test_one_cycle_with_warmup_steps_is_one_line():
  from transfer import configs
  with pytest.raises(UserError, match=r"^warmup_steps=5 does not apply to schedule=one_cycle"):
    configs.validate(default_config(schedule="one_cycle", warmup_steps=5))


def test_keywords_build_what_the_config_builds(params):
  """`make_optimizer(params, learning_rate=..., ...)`: the config's keys as keywords, the
  default config's values for the rest."""
  config = default_config(optimizer="sgd", momentum=0.0, learning_rate=0.5,
                          trainable=["^head/", "^block5_conv3"])
  config.lr_mults = ml_collections.ConfigDict({"^block5_conv3": 0.1})
  by_config = optim.make_optimizer(params, config, 10)
  by_keywords = optim.make_optimizer(params, optimizer="sgd", momentum=0.0, learning_rate=0.5,
                                     trainable=("^head/", "^block5_conv3"),
                                     lr_mults={"^block5_conv3": 0.1})
  assert jax.tree_util.tree_leaves(by_keywords.labels) == jax.tree_util.tree_leaves(
      by_config.labels)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  want, _ = by_config.tx.update(grads, by_config.tx.init(params), params)
  got, _ = by_keywords.tx.update(grads, by_keywords.tx.init(params), params)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)
  # A keyword overrides the config's value; nothing given is the default config's.
  faster = optim.make_optimizer(params, config, 10, learning_rate=1.0)
  up, _ = faster.tx.update(grads, faster.tx.init(params), params)
  assert np.allclose(up["head"]["logits"]["bias"], -1.0)
  defaults = optim.make_optimizer(params)
  assert optim.describe(params, defaults.labels) == optim.describe(
      params, optim.make_optimizer(params, default_config(), 10).labels)


def test_bad_keywords_are_one_line_errors(params):
  with pytest.raises(UserError, match="unknown option.* lr; valid: optimizer, learning_rate"):
    optim.make_optimizer(params, lr=1e-3)
  with pytest.raises(UserError, match=r"learning_rate=-1.0 is out of range: must be > 0"):
    optim.make_optimizer(params, learning_rate=-1.0)
  with pytest.raises(UserError, match="optimizer='lamb' is not valid"):
    optim.make_optimizer(params, optimizer="lamb")
  with pytest.raises(UserError, match="schedule 'cosine' decays .* pass total_steps="):
    optim.make_optimizer(params, schedule="cosine")
  assert optim.make_optimizer(params, schedule="cosine", total_steps=10).tx is not None
