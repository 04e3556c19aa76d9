"""BatchNorm in training (ResNet): frozen layers in inference mode, trainable ones on global-batch
statistics, running statistics in the train state and the checkpoint, equal on any device count."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfer import checkpoint, metrics, models, optim, train
from helpers import flatten, kill_and_resume, preempt_and_resume, tiny_config, train_steps


def _resnet(**overrides):
  """resnet50_tiny (ResNet50's layers at 1/16 width) with a GAP head on 32x32 synthetic data."""
  return tiny_config(model="resnet50_tiny", head="gap", **overrides)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
  """The variables every run below starts from (seed 0, random init)."""
  model = models.get("resnet50_tiny", head="gap", num_classes=1)
  variables = models.init_variables(model, 32, 0)
  # Non-trivial running statistics, so that "unchanged" and "moved" are both visible.
  rng = np.random.default_rng(0)
  stats = {layer: {"mean": jnp.asarray(rng.normal(0.0, 0.3, s["mean"].shape), jnp.float32),
                   "var": jnp.asarray(rng.uniform(0.5, 2.0, s["var"].shape), jnp.float32)}
           for layer, s in variables["batch_stats"].items()}
  # Host copies: the donated train state must not take the fixture's buffers with it.
  return model, jax.device_get({"params": variables["params"], "batch_stats": stats})


def test_a_frozen_backbone_keeps_its_params_and_statistics_bit_for_bit(start):
  model, variables = start
  state = train_steps(model, variables, ["^head/"], jax.devices()[:2])
  before, after = flatten(variables["params"]), flatten(state.params)
  assert all(np.array_equal(before[k], after[k]) for k in before if not k.startswith("head/"))
  assert not np.array_equal(before["head/logits/kernel"], after["head/logits/kernel"])
  stats_before, stats_after = flatten(variables["batch_stats"]), flatten(state.batch_stats)
  assert all(np.array_equal(stats_before[k], stats_after[k]) for k in stats_before)


def test_a_trainable_block_moves_exactly_its_own_statistics(start):
  model, variables = start
  state = train_steps(model, variables, ["^head/", "^conv5_"], jax.devices()[:2])
  before, after = flatten(variables["batch_stats"]), flatten(state.batch_stats)
  moved = {k.split("/")[0] for k in before if not np.array_equal(before[k], after[k])}
  conv5_bn = {k for k in optim.batch_norm_layers(variables["params"]) if k.startswith("conv5_")}
  assert moved == conv5_bn and len(moved) == 10  # block1: 4 BN layers, blocks 2-3: 3 each


def test_train_bn_trains_batchnorm_inside_frozen_blocks(start):
  config = _resnet(train_bn=True)
  _, labels = optim.make_optimizer(start[1]["params"], config, 10)
  flat = flatten(labels)
  assert flat["conv2_block1_1_bn/scale"] != optim.FROZEN
  assert flat["conv2_block1_1_conv/kernel"] == optim.FROZEN


def test_train_true_trains_batchnorm_as_in_flax_except_the_frozen_layers(start):
  """`model.apply(v, x, train=True, mutable=["batch_stats"])` moves every layer's running
  statistics; the layers in `frozen_batch_norm` (the optimizer's frozen ones) keep theirs, and
  `train=False` is inference everywhere."""
  model, variables = start
  x = np.random.default_rng(3).normal(size=(4, 32, 32, 3)).astype(np.float32)
  before = flatten(variables["batch_stats"])
  moved = lambda m: {k.split("/")[0] for k, v in flatten(
      m.apply(variables, x, train=True, mutable=["batch_stats"])[1]["batch_stats"]).items()
      if not np.array_equal(v, before[k])}
  every = set(optim.batch_norm_layers(variables["params"]))
  assert moved(model) == every
  opt = optim.make_optimizer(variables["params"], trainable=["^head/", "^conv5_"])
  frozen = opt.frozen_batch_norm
  assert frozen == {k for k in every if not k.startswith("conv5_")}
  assert moved(model.clone(frozen_batch_norm=frozen)) == every - frozen
  np.testing.assert_array_equal(model.apply(variables, x),  # inference: no mutable needed
                                model.clone(frozen_batch_norm=tuple(every)).apply(
                                    variables, x, train=True))


@pytest.mark.parametrize("devices,mode", [(2, "shard_map"), (4, "shard_map"), (4, "pmap")])
def test_trainable_batchnorm_gives_the_same_result_on_any_device_count(start, devices, mode):
  """Batch statistics over the global batch: 1, 2 or 4 devices compute the same steps."""
  model, variables = start
  trainable = ["^head/", "^conv5_", "^conv4_block6_"]
  run = lambda n, m: train_steps(model, variables, trainable, jax.devices()[:n], m, size=64,
                                 lr=1e-3)
  ref, got = run(1, "shard_map"), run(devices, mode)
  # Each statistic sums 8 x 2 x 2 (conv5) to 8 x 4 x 4 (conv4) values in another order per
  # device count, and BatchNorm's backward divides by the batch deviation and subtracts two such
  # sums from the gradient, so round-off is amplified, not just carried: the bound is measured,
  # not derived. With the variance as E[x^2] - E[x]^2 (Flax's default, one cross-device mean)
  # params differed by up to 1.6e-5 of a leaf's scale over 3 SGD steps; with the centered
  # variance the model uses (global mean first, then the mean of squared deviations), at most
  # 5.8e-6 (params) and 3.1e-7 (statistics) over three seeds and 2/4 devices, shard_map and
  # pmap: within the 1e-5 asked for.
  for want, have, rel in ((ref.params, got.params, 1e-5), (ref.batch_stats, got.batch_stats, 1e-5)):
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want),
                            jax.tree_util.tree_leaves(have)):
      np.testing.assert_allclose(g, w, rtol=0, atol=rel * float(np.abs(w).max()),
                                 err_msg=jax.tree_util.keystr(path))


def test_bfloat16_keeps_batchnorm_statistics_in_float32(start):
  _, variables = start
  model = models.get("resnet50_tiny", head="gap", num_classes=1, dtype="bfloat16")
  state = train_steps(model, variables, ["^head/", "^conv5_"], jax.devices()[:2], steps=1)
  assert {v.dtype for v in jax.tree_util.tree_leaves(state.batch_stats)} == {np.dtype("float32")}
  assert {v.dtype for v in jax.tree_util.tree_leaves(state.params)} == {np.dtype("float32")}


def test_resume_with_trainable_batchnorm_matches_an_uninterrupted_run(tmp_path, monkeypatch):
  config = lambda: _resnet(num_steps=6, trainable=["^head/", "^conv5_"], checkpoint_every_steps=2)
  preempt_and_resume(config, tmp_path / "run", 3, monkeypatch, reference=tmp_path / "ref")
  ref, _ = checkpoint.load_trained_variables(str(tmp_path / "ref"))
  got, meta = checkpoint.load_trained_variables(str(tmp_path / "run"))
  assert meta["step"] == 6 and set(got) == {"params", "batch_stats"}
  for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(a, b)  # bitwise: same program, devices, data and steps


# test_checkpoint's CLI run (4 devices), as resnet50_tiny with conv5 and every BatchNorm layer
# training (`train_bn`): all running statistics update, on the global batch. 60 steps, a
# checkpoint every 10: the kill after checkpoint 20 leaves 40 steps of margin.
_TRAINABLE_BN = {"model": "resnet50_tiny", "head": "gap", "trainable": "^head/,^conv5_",
                 "train_bn": True, "num_steps": 60, "eval_every_steps": 30}


def test_resume_after_sigkill_with_trainable_batchnorm_matches_an_uninterrupted_run(tmp_path):
  ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
  # The reference runs beside the one killed; that one must not have finished; the rerun resumes.
  kill_and_resume(run_dir, 20, reference=ref_dir, **_TRAINABLE_BN)
  want, _ = checkpoint.load_trained_variables(str(ref_dir))
  got, meta = checkpoint.load_trained_variables(str(run_dir))
  assert meta["step"] == 60 and set(got) == {"params", "batch_stats"}
  records = metrics.read_metrics(str(run_dir))
  assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 61))
  fresh = models.init_variables(models.get("resnet50_tiny", head="gap", num_classes=1), 32)
  moved = {k.split("/")[0] for k, v in flatten(fresh["batch_stats"]).items()
           if not np.array_equal(v, flatten(got["batch_stats"])[k])}
  assert moved == set(got["batch_stats"])  # every layer's statistics trained
  assert flatten(want).keys() == flatten(got).keys()
  for path, value in flatten(want).items():  # bitwise: same program, devices, data and steps
    np.testing.assert_array_equal(flatten(got)[path], value, err_msg=path)


def test_a_changed_variant_is_refused_on_resume(tmp_path):
  from transfer.errors import UserError
  train.train_and_evaluate(_resnet(num_steps=2), str(tmp_path / "run"))
  with pytest.raises(UserError, match=r"variant 'auto' -> 'keras'"):
    train.train_and_evaluate(_resnet(num_steps=4, variant="keras"), str(tmp_path / "run"))


def test_a_variant_mismatch_from_the_config_names_the_config_key(tmp_path):
  """A torchvision file into `--config.variant=keras`: the fix is spelled as the flag to pass."""
  from transfer.errors import UserError
  from transfer.weights import export, port
  shapes = port.variable_shapes(models.get("resnet50_tiny", head="none"), 32)
  variables = jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes)
  path = str(tmp_path / "tv.safetensors")
  export.write_safetensors(path, export.torch_state_dict(
      variables["params"], models.spec("resnet50_tiny"), variables["batch_stats"]))
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(_resnet(num_steps=1, variant="keras", weights=path),
                             str(tmp_path / "run"))
  message = str(e.value)
  assert message.startswith(f"{path} is a torchvision ResNet (v1.5") and "\n" not in message
  assert message.endswith("the model is --config.variant=keras: build it with "
                          "--config.variant=torchvision (or auto, which follows the weights)")


def test_cached_features_train_a_frozen_resnet_like_streaming_images(tmp_path):
  """Frozen BatchNorm is inference mode, so the backbone's output is fixed: the head trains on
  the same numbers whether they are cached once or recomputed every step."""
  config = lambda cache: _resnet(num_steps=4, augment="none", optimizer="sgd",
                                 cache_features=cache)
  cached = train.train_and_evaluate(config(True), str(tmp_path / "cached"))
  streamed = train.train_and_evaluate(config(False), str(tmp_path / "streamed"))
  assert cached["step"] == streamed["step"] == 4
  a, _ = checkpoint.load_trained_variables(str(tmp_path / "cached"))
  b, _ = checkpoint.load_trained_variables(str(tmp_path / "streamed"))
  # The same operations in two programs (feature step + head step vs one step): XLA may fuse
  # the pooling differently, a few float32 roundings over 4 SGD steps of a 64-wide GAP head.
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=0, atol=64 * 4 * 2**-24 * max(1.0, np.abs(y).max()))
