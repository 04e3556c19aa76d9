"""InceptionV3 in training, as ResNet (tests/test_batchnorm.py; both use helpers.py): a frozen
base keeps params and BatchNorm statistics bit for bit (also the Keras form's scale-less
BatchNorm), trainable blocks move exactly their own statistics, any device count computes the
same steps, and train / init_from / cached features / evaluate / predict / bench run end to end.
`inception_v3_tiny` has InceptionV3's layers and names at 1/8 of the width; 75x75 is the
smallest input InceptionV3 takes."""

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import (bench_config, calibrated_statistics, flatten, preempt_and_resume, tiny_config,
                     train_steps)
from transfer import bench, checkpoint, evaluate, models, optim, predict, train
from transfer.errors import UserError

TINY, SIZE = "inception_v3_tiny", 75
TOP_TWO = ["^head/", "^mixed9_", "^mixed10_"]


def _config(**overrides):
  return tiny_config(model=TINY, head="gap", image_size=SIZE, **overrides)


@pytest.fixture(scope="module", params=["keras", "torchvision"])
def start(request):
  """Variables every run starts from (seed 0), with running statistics measured on data (far
  from the fresh 0 and 1, see `calibrated_statistics`)."""
  model = models.get(TINY, head="gap", num_classes=1, variant=request.param)
  variables = models.init_variables(model, SIZE, 0)
  stats = calibrated_statistics(model, variables, SIZE)
  return model, jax.device_get({"params": variables["params"], "batch_stats": stats})


def test_names_make_the_top_two_blocks_one_pattern_each():
  spec = models.spec("inception_v3")
  blocks = sorted({name.split("_")[0] for name in spec.conv_layers})
  assert blocks == sorted(["stem"] + [f"mixed{i}" for i in range(11)])
  trained = [n for n in spec.conv_layers if any(n.startswith(p[1:]) for p in TOP_TWO[1:])]
  assert len(trained) == 2 * 2 * 9  # two blocks of nine conv+BN units
  assert "mixed1_branch1x1_conv" not in trained and "mixed10_branch1x1_conv" in trained


def test_a_frozen_base_keeps_its_params_and_statistics_bit_for_bit(start):
  model, variables = start
  state = train_steps(model, variables, ["^head/"], jax.devices()[:2], size=SIZE)
  before, after = flatten(variables["params"]), flatten(state.params)
  assert all(np.array_equal(before[k], after[k]) for k in before if not k.startswith("head/"))
  assert not np.array_equal(before["head/logits/kernel"], after["head/logits/kernel"])
  stats_before, stats_after = flatten(variables["batch_stats"]), flatten(state.batch_stats)
  assert all(np.array_equal(stats_before[k], stats_after[k]) for k in stats_before)


def test_the_top_two_blocks_move_exactly_their_own_statistics(start):
  """Keras' BatchNorm has no scale: its layers are found all the same, and train."""
  model, variables = start
  state = train_steps(model, variables, TOP_TWO, jax.devices()[:2], size=SIZE)
  before, after = flatten(variables["batch_stats"]), flatten(state.batch_stats)
  moved = {k.split("/")[0] for k in before if not np.array_equal(before[k], after[k])}
  top_bn = {n for n in optim.batch_norm_layers(variables["params"])
            if n.startswith(("mixed9_", "mixed10_"))}
  assert moved == top_bn and len(moved) == 18
  params_before, params_after = flatten(variables["params"]), flatten(state.params)
  assert not np.array_equal(params_before["mixed10_branch_pool_bn/bias"],
                            params_after["mixed10_branch_pool_bn/bias"])


@pytest.mark.parametrize("devices,mode", [(4, "shard_map"), (4, "pmap")])
def test_the_same_steps_on_any_device_count(start, devices, mode):
  model, variables = start
  run = lambda n, m: train_steps(model, variables, TOP_TWO, jax.devices()[:n], m, size=SIZE,
                                 lr=1e-3)
  ref, got = run(1, "shard_map"), run(devices, mode)
  # As for ResNet (test_batchnorm): BatchNorm's backward amplifies the round-off of its batch
  # sums, which another device count orders differently; the ResNet bounds (measured, 4x margin).
  for want, have, rel in ((ref.params, got.params, 6.4e-5),
                          (ref.batch_stats, got.batch_stats, 4e-6)):
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want),
                            jax.tree_util.tree_leaves(have)):
      np.testing.assert_allclose(g, w, rtol=0, atol=rel * float(np.abs(w).max()),
                                 err_msg=jax.tree_util.keystr(path))


def test_cached_features_train_the_head_as_streaming_images_do(tmp_path):
  config = lambda cache: _config(num_steps=4, augment="none", optimizer="sgd",
                                 cache_features=cache)
  train.train_and_evaluate(config(True), str(tmp_path / "cached"))
  train.train_and_evaluate(config(False), str(tmp_path / "streamed"))
  a, _ = checkpoint.load_trained_variables(str(tmp_path / "cached"))
  b, _ = checkpoint.load_trained_variables(str(tmp_path / "streamed"))
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=0, atol=64 * 4 * 2**-24 * max(1.0, np.abs(y).max()))


def test_train_then_fine_tune_the_top_blocks_then_evaluate_and_predict(tmp_path):
  """The first run is the torchvision form (BatchNorm with scale), which `weights=none` would
  not build: the continued run must inherit it, its BatchNorm scales included."""
  first = str(tmp_path / "first")
  train.train_and_evaluate(_config(num_steps=2, variant="torchvision",
                                   trainable=["^head/", "^mixed10_"]), first)
  second = str(tmp_path / "second")
  summary = train.train_and_evaluate(
      _config(num_steps=2, init_from=first, trainable=TOP_TWO, optimizer="sgd", momentum=0.9,
              learning_rate=1e-4), second)
  assert summary["step"] == 2
  a, first_meta = checkpoint.load_trained_variables(first)
  b, meta = checkpoint.load_trained_variables(second)
  assert first_meta["run"]["variant"] == meta["run"]["variant"] == "torchvision"
  # BatchNorm scales came across: frozen ones bit for bit, the first run's trained ones too.
  assert np.array_equal(a["params"]["mixed8_branch3x3_1_bn"]["scale"],
                        b["params"]["mixed8_branch3x3_1_bn"]["scale"])
  trained_scale = a["params"]["mixed10_branch1x1_bn"]["scale"]
  assert not np.array_equal(trained_scale, np.ones_like(trained_scale))
  assert np.array_equal(a["params"]["mixed8_branch3x3_1_conv"]["kernel"],
                        b["params"]["mixed8_branch3x3_1_conv"]["kernel"])
  assert not np.array_equal(a["batch_stats"]["mixed9_branch1x1_bn"]["mean"],
                            b["batch_stats"]["mixed9_branch1x1_bn"]["mean"])
  assert "val_accuracy" in evaluate.evaluate_workdir(second)
  image = tmp_path / "x.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), np.uint8)).save(image)
  (prediction,) = predict.predict_trained([str(image)], second, top=1)
  assert prediction.error is None and prediction.top[0]["label"] in meta["run"]["class_names"]


def test_bench_runs_inception(capsys):
  result = bench.main(bench_config(model=TINY, image_size=SIZE, head="gap",
                                   trainable=TOP_TWO), mode="train", steps=1, warmup=0,
                      as_json=True)
  assert result["flops_per_step"] > 0 and result["images_per_sec"] > 0


def test_input_smaller_than_75_is_one_clear_error():
  with pytest.raises(UserError, match="needs input of at least 75x75"):
    models.check_image_size("inception_v3", "gap", 64)
  models.check_image_size("inception_v3", "imagenet", 150)  # the top takes any size


def test_bfloat16_keeps_statistics_and_params_in_float32(start):
  _, variables = start
  model = models.get(TINY, head="gap", num_classes=1, dtype="bfloat16",
                     variant="torchvision" if "scale" in variables["params"]["stem_1a_bn"]
                     else "keras")
  state = train_steps(model, variables, TOP_TWO, jax.devices()[:2], steps=1, size=SIZE)
  assert {v.dtype for v in jax.tree_util.tree_leaves(state.batch_stats)} == {np.dtype("float32")}
  assert {v.dtype for v in jax.tree_util.tree_leaves(state.params)} == {np.dtype("float32")}


def test_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
  config = lambda: _config(num_steps=4, trainable=TOP_TWO, checkpoint_every_steps=2)
  preempt_and_resume(config, tmp_path / "run", 2, monkeypatch, reference=tmp_path / "ref")
  ref, _ = checkpoint.load_trained_variables(str(tmp_path / "ref"))
  got, meta = checkpoint.load_trained_variables(str(tmp_path / "run"))
  assert meta["step"] == 4 and set(got) == {"params", "batch_stats"}
  for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(a, b)  # bitwise: same program, devices, data and steps
