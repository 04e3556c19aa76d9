"""VGG16/VGG19: sizes, Keras layer names, feature shapes, mixed precision, dropout.

Shapes come from `jax.eval_shape` (nothing allocated); forward passes use the tiny variant with
random params, so the file runs in seconds.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfer import models
from transfer.errors import UserError
from transfer.weights import port

# Keras' TF backend trips numpy 2's __array__(copy=...) deprecation.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def random_params(model, image_size, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.1),
                      port.param_shapes(model, image_size))


def count(tree):
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(tree))


@pytest.mark.parametrize("name, expected", [("vgg16", 138_357_544), ("vgg19", 143_667_240)])
def test_param_count_matches_keras(name, expected):
  assert count(port.param_shapes(models.get(name, include_top=True), 224)) == expected


def test_layer_names_are_keras_names():
  shapes = port.param_shapes(models.get("vgg16", include_top=True), 224)
  assert list(shapes) == [
      "block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2", "block3_conv1",
      "block3_conv2", "block3_conv3", "block4_conv1", "block4_conv2", "block4_conv3",
      "block5_conv1", "block5_conv2", "block5_conv3", "fc1", "fc2", "predictions"]
  assert set(shapes["fc1"]) == {"kernel", "bias"}
  spec = models.spec("vgg19")
  assert spec.conv_layers[-1] == "block5_conv4" and len(spec.conv_layers) == 16
  assert spec.torch_names["block5_conv4"] == "features.34"
  assert spec.torch_names["predictions"] == "classifier.6"


@pytest.mark.parametrize("name", ["vgg16", "vgg19"])
def test_layer_names_and_shapes_match_keras_applications(name):
  keras = pytest.importorskip("keras", reason="keras not installed")
  build = {"vgg16": keras.applications.VGG16, "vgg19": keras.applications.VGG19}[name]
  ref = build(weights=None, include_top=False, input_shape=(32, 32, 3))
  theirs = {l.name: [tuple(w.shape) for w in l.weights] for l in ref.layers if l.weights}
  ours = port.param_shapes(models.get(name, include_top=False), 32)
  assert list(ours) == list(theirs)
  for layer, shapes in theirs.items():
    assert [ours[layer]["kernel"].shape, ours[layer]["bias"].shape] == shapes


@pytest.mark.parametrize("size", [32, 48, 64, 100, 224])
def test_notop_feature_shape(size):
  model = models.get("vgg16", include_top=False)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x),
                       port.param_shapes(model, size), x)
  assert out.shape == (2, size // 32, size // 32, 512)


def test_imagenet_top_needs_224():
  with pytest.raises(UserError, match="needs 224x224"):
    models.check_image_size("vgg16", "imagenet", 64)


def test_bfloat16_compute_gives_float32_logits_close_to_float32():
  f32 = models.get("vgg16_tiny", head="gap", num_classes=10)
  bf16 = models.get("vgg16_tiny", head="gap", num_classes=10, dtype="bfloat16")
  params = random_params(f32, 64)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 64, 64, 3), np.float32))
  ref = f32.apply({"params": params}, x)
  out = bf16.apply({"params": params}, x)
  assert out.dtype == jnp.float32 and ref.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()))
  assert not np.array_equal(out, ref)  # It really computed in bfloat16.


@pytest.fixture(scope="module")
def dense_head():
  model = models.get("vgg16_tiny", head="flatten_dense", num_classes=3)
  params = random_params(model, 64)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 64, 64, 3), np.float32))
  return model, params, x


def test_inference_is_deterministic_without_rngs(dense_head):
  model, params, x = dense_head
  a = model.apply({"params": params}, x)
  b = model.apply({"params": params}, x, train=False)
  np.testing.assert_array_equal(a, b)


def test_dropout_is_active_in_training(dense_head):
  model, params, x = dense_head
  eval_out = model.apply({"params": params}, x)
  train = lambda seed: model.apply({"params": params}, x, train=True,
                                   rngs={"dropout": jax.random.PRNGKey(seed)})
  assert not np.allclose(train(0), eval_out)
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(train(0), train(0))


def test_stages_compose_to_the_full_model(dense_head):
  model, params, x = dense_head
  feats = model.apply({"params": params}, x, stage="features")
  np.testing.assert_allclose(model.apply({"params": params}, feats, stage="head"),
                             model.apply({"params": params}, x), rtol=1e-6)
