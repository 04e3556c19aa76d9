"""Keras ResNet weights: BatchNorm porting, `load_variables`, the variant check, the registry.

Parity tests build `keras.applications.ResNet50/101` with random weights and random, non-trivial
running statistics (a swapped mean and variance, or statistics left at 0 and 1, would show), write
them the two ways Keras does (Keras 3 `.weights.h5` with positional variables; the legacy HDF5
layout of the official files, `conv1_bn/gamma:0` ...) and compare outputs on random inputs. The
other tests use `resnet50_tiny` files written from random arrays and need no Keras.
"""

import jax
import numpy as np
import pytest

from helpers import assert_close, one_line_error, random_variables, randomize, tiny_keras_file
from transfer import models
from transfer import weights
from transfer.errors import UserError
from transfer.weights import export, port, sources

# Keras (TF, oneDNN) and XLA both compute in float32 but sum in different orders, and our CPU
# default runs the wider 3x3 convolutions as Winograd. One conv layer's rounding is about
# sqrt(K) * 2**-24 of its output scale (K = 3*3*512 = 4608 products: ~4e-6); through ~50 layers
# that stays below 1e-5 of the output's scale (measured: about 1e-6 for these tests), so 1e-4
# leaves a margin without hiding a porting error (a swapped statistic or a stride in the wrong
# convolution is off by far more; the epsilons 1e-5 and 1.001e-5 are too close to tell apart at
# variances of 0.5 and more, which is why the variant is checked by name, not by numbers).
RTOL = 1e-4
TINY = "resnet50_tiny"

# Keras' TF backend trips numpy 2's __array__(copy=...) deprecation on every call.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.usefixtures("home")]


# --- Keras parity ---------------------------------------------------------------------------------


def keras_layers(model):
  """All layers with their arrays in model order, the weightless ones included, as the official
  files list them."""
  return {layer.name: [np.asarray(v) for v in layer.get_weights()] for layer in model.layers}


def write(model, tmp_path, writer) -> str:
  """The model's weights as Keras 3 writes them or in the legacy layout (tf_keras' names)."""
  if writer == "keras3":
    path = str(tmp_path / f"{model.name}.weights.h5")
    model.save_weights(path)
  else:
    path = str(tmp_path / f"{model.name}_legacy.h5")
    export.write_keras_h5(path, keras_layers(model), naming="keras2")
  return path


def forward(net, variables, x):
  return np.asarray(jax.jit(net.apply)(variables, x))


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["keras3", "legacy"])
def test_resnet50_with_top_matches_keras(keras, tmp_path, writer):
  # The same layers and file as the default softmax top, but the output is the logits, which do
  # not saturate the way probabilities do under random weights.
  model = keras.applications.ResNet50(weights=None, include_top=True, classifier_activation=None)
  randomize(keras, model, seed=0)
  path = write(model, tmp_path, writer)
  net = models.get("resnet50", variant="keras", include_top=True)
  variables, report = weights.load_variables(path, net, return_report=True)
  assert report.format == ("keras3_h5" if writer == "keras3" else "keras_h5")
  assert len(report.loaded) == len(models.spec("resnet50").conv_layers) + 1 and not report.fresh
  x = np.random.default_rng(1).standard_normal((2, 224, 224, 3), dtype=np.float32) * 50
  assert_close(forward(net, variables, x), model(x))


@pytest.mark.parametrize("writer", ["keras3", "legacy"])
def test_resnet50_notop_features_match_keras(keras, tmp_path, writer):
  model = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(96, 96, 3))
  randomize(keras, model, seed=2)
  path = write(model, tmp_path, writer)
  net = models.get("resnet50", variant="keras", include_top=False)
  variables = weights.load_variables(path, net, image_size=96)
  bn = variables["batch_stats"]["conv4_block2_1_bn"]
  np.testing.assert_array_equal(bn["var"], model.get_layer("conv4_block2_1_bn").moving_variance)
  x = np.random.default_rng(3).standard_normal((1, 96, 96, 3), dtype=np.float32) * 50
  assert_close(forward(net, variables, x), model(x))


def test_resnet101_notop_features_match_keras(keras, tmp_path):
  model = keras.applications.ResNet101(weights=None, include_top=False, input_shape=(64, 64, 3))
  randomize(keras, model, seed=4)
  path = write(model, tmp_path, "keras3")
  net = models.get("resnet101", variant="keras", include_top=False)
  variables = weights.load_variables(path, net, image_size=64)
  x = np.random.default_rng(5).standard_normal((1, 64, 64, 3), dtype=np.float32) * 50
  assert_close(forward(net, variables, x), model(x))


def test_keras3_file_names_batch_norm_variables(keras, tmp_path):
  """Keras 3 stores variables by position; the reader names a BatchNormalization's four."""
  inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
  model = keras.Model(inputs, keras.layers.BatchNormalization(name="conv_bn")(x))
  path = tmp_path / "small.weights.h5"
  model.save_weights(str(path))
  with weights.formats.open_weights(path) as wf:
    assert [t.name for t in wf.layers["conv_bn"]] == ["gamma", "beta", "moving_mean",
                                                      "moving_variance"]
    assert [t.name for t in wf.layers["conv"]] == ["0", "1"]


# --- tiny files, no Keras needed -------------------------------------------------------------------


@pytest.mark.parametrize("naming", ["keras1", "keras2"])
def test_load_variables_reads_batch_norm_by_name(tmp_path, naming):
  path, expected = tiny_keras_file(tmp_path / "tiny.h5", naming=naming)
  net = models.get(TINY, variant="keras", head="none")
  variables, report = weights.load_variables(path, net, image_size=32, return_report=True)
  assert set(variables) == {"params", "batch_stats"}
  assert report.loaded == models.spec(TINY).conv_layers
  jax.tree.map(np.testing.assert_array_equal, variables, expected)
  # `load` is the params part of the same merge.
  params = weights.load(path, net, image_size=32)
  jax.tree.map(np.testing.assert_array_equal, params, expected["params"])


def test_batch_norm_order_in_file_does_not_matter(tmp_path):
  """Names, not positions: a file listing a BatchNorm's arrays in another order loads the same."""
  import h5py
  path, expected = tiny_keras_file(tmp_path / "tiny.h5")
  with h5py.File(path, "r+") as f:
    names = list(f["conv1_bn"].attrs["weight_names"])
    f["conv1_bn"].attrs["weight_names"] = np.array(names[::-1], dtype="S")
  variables = weights.load_variables(path, models.get(TINY, variant="keras", head="none"),
                                     image_size=32)
  np.testing.assert_array_equal(variables["batch_stats"]["conv1_bn"]["mean"],
                                expected["batch_stats"]["conv1_bn"]["mean"])
  np.testing.assert_array_equal(variables["params"]["conv1_bn"]["scale"],
                                expected["params"]["conv1_bn"]["scale"])


def test_missing_running_statistics_are_named(tmp_path):
  import h5py
  path, _ = tiny_keras_file(tmp_path / "tiny.h5")
  with h5py.File(path, "r+") as f:
    group = f["conv2_block1_1_bn"]
    group.attrs["weight_names"] = np.array(list(group.attrs["weight_names"])[:2], dtype="S")
  with pytest.raises(UserError) as e:
    weights.load_variables(path, models.get(TINY, variant="keras", head="none"), image_size=32)
  message = one_line_error(e)
  assert "missing (2): conv2_block1_1_bn/mean, conv2_block1_1_bn/var" in message


def test_notop_file_into_new_head(tmp_path):
  path, expected = tiny_keras_file(tmp_path / "tiny.h5")
  net = models.get(TINY, variant="keras", head="gap", num_classes=3)
  variables, report = weights.load_variables(path, net, image_size=32, return_report=True)
  assert report.fresh == ("head",)
  assert variables["params"]["head"]["logits"]["kernel"].shape[-1] == 3
  jax.tree.map(np.testing.assert_array_equal, variables["batch_stats"], expected["batch_stats"])


def test_keras_file_into_torchvision_variant_is_one_clear_error(tmp_path):
  path, _ = tiny_keras_file(tmp_path / "tiny.h5")
  with pytest.raises(UserError) as e:
    weights.load_variables(path, models.get(TINY, variant="torchvision", head="none"),
                           image_size=32)
  message = one_line_error(e)
  assert message.startswith(f"{path} is a Keras ResNet (v1: stride in the first 1x1, conv bias")
  assert message.endswith("build it with variant='keras'")


def test_torch_file_into_keras_variant_is_one_clear_error(tmp_path):
  path = tmp_path / "r.safetensors"
  export.write_safetensors(path, {"conv1.weight": np.zeros((4, 3, 7, 7), np.float32)})
  with pytest.raises(UserError) as e:
    weights.load(str(path), models.get(TINY, variant="keras", head="none"), image_size=32)
  assert "is a torchvision ResNet (v1.5" in one_line_error(e)
  assert "build it with variant='torchvision'" in str(e.value)


def test_registry_id_for_another_variant_fails_before_downloading():
  with pytest.raises(UserError) as e:
    weights.load("keras:resnet50_notop", models.get("resnet50", variant="torchvision",
                                                    head="none"), image_size=32)
  assert one_line_error(e).startswith("keras:resnet50_notop is a Keras ResNet (v1:")


def test_variant_for(tmp_path):
  path, _ = tiny_keras_file(tmp_path / "tiny.h5")
  assert weights.variant_for("keras:resnet101_notop", "resnet101") == "keras"
  assert weights.variant_for("keras:resnet50?", "resnet50") == "keras"
  assert weights.variant_for(path, TINY) == "keras"
  assert weights.variant_for("keras:vgg16", "vgg16") is None
  assert weights.variant_for("none", "resnet50") is None
  assert weights.variant_for("", "resnet50") is None
  with pytest.raises(UserError, match="no weight file"):
    weights.variant_for(str(tmp_path / "nope.h5"), "resnet50")


def test_registry_records_keras_resnets():
  hashes = {"resnet50": ("2cb95161c43110f7111970584f804107", "4d473c1dd8becc155b73f8504c6f6626"),
            "resnet101": ("f1aeb4b969a6efcfb50fad2f0c20cfc5", "88cf7a10940856eca736dc7b7e228a21"),
            "resnet152": ("100835be76be38e30d865e96f2aaae62", "ee4c566cf9a93f14d82f913c2dc6dd0c")}
  base = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
  for arch, (top, notop) in hashes.items():
    for suffix, md5 in (("", top), ("_notop", notop)):
      entry = sources.get(f"keras:{arch}{suffix}")
      assert entry.url == f"{base}{arch}_weights_tf_dim_ordering_tf_kernels{suffix}.h5"
      assert (entry.hash_kind, entry.hash, entry.arch) == ("md5", md5, arch)
      assert (entry.include_top, entry.preprocess, entry.variant) == (not suffix, "caffe", "keras")
  assert sources.get("keras:vgg16").variant is None


def test_info_of_a_resnet_file(tmp_path, capsys):
  from transfer import main as cli_main
  path, _ = tiny_keras_file(tmp_path / "tiny.h5")
  meta = weights.info(path)
  assert (meta["arch"], meta["variant"], meta["preprocess"]) == (TINY, "keras", "caffe")
  bn = next(layer for layer in meta["layers"] if layer["name"] == "conv1_bn")
  assert [w["name"] for w in bn["weights"]] == ["conv1_bn/gamma:0", "conv1_bn/beta:0",
                                                "conv1_bn/moving_mean:0",
                                                "conv1_bn/moving_variance:0"]
  assert cli_main.run(["weights", "list"]) == 0
  listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
  assert {"keras:resnet50", "keras:resnet101_notop", "keras:resnet152_notop"} <= listed
