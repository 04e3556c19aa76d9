"""Legacy Keras `.h5` files both ways, at full size, with Keras itself on the other side: files that
tf_keras writes (`save_weights(path.h5)`) predict through `transfer predict` what tf_keras
predicts; files `transfer.weights.export` writes load into tf_keras and Keras 3
(`keras.applications.*(weights=None).load_weights`) and predict there what `transfer predict`
does. Random weights (BatchNorm statistics included) far from a fresh model's, random images at
the model's 224 input (so the squash geometry leaves their pixels as they are)."""

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import assert_close, cli_probabilities, randomize
from transfer import models
from transfer.weights import export

# float32 on both sides, sums in another order through up to 50 layers (see test_resnet_keras).
RTOL = 1e-4

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.usefixtures("home")]


def images(tmp_path, n=2, seed=0):
  """`n` random 224x224 RGB PNGs and their pixels."""
  pixels = np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), np.uint8)
  paths = []
  for i, image in enumerate(pixels):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(image).save(paths[-1])
  return paths, pixels


def keras_applications(keras, arch):
  """The application and its `preprocess_input` (caffe for both VGG16 and ResNet50)."""
  module = {"vgg16": keras.applications.vgg16, "resnet50": keras.applications.resnet50}[arch]
  build = getattr(module, {"vgg16": "VGG16", "resnet50": "ResNet50"}[arch])
  return build, module.preprocess_input


@pytest.mark.parametrize("arch", ["vgg16", "resnet50"])
def test_a_file_tf_keras_wrote_predicts_as_tf_keras(arch, tmp_path, capsys):
  tf_keras = pytest.importorskip("tf_keras")
  build, preprocess_input = keras_applications(tf_keras, arch)
  model = build(weights=None)
  randomize(tf_keras, model, seed=1)
  path = str(tmp_path / f"my_{arch}.h5")  # no official name: recognised by its layers
  model.save_weights(path)  # tf_keras' legacy HDF5 writer
  paths, pixels = images(tmp_path)
  want = np.asarray(model.predict(preprocess_input(pixels.astype(np.float32)), verbose=0))
  assert want.max() > 2.0 / 1000  # not uniform: the comparison can fail
  got = cli_probabilities(["predict", "--model", arch, "--weights", path, *paths], capsys)
  assert_close(got, want, RTOL)


def exported_resnet50(tmp_path) -> str:
  """A ResNet50 (Keras v1 form, ImageNet top) with random, well-scaled weights and statistics
  (a randomised tf_keras model's, read in), written by `transfer.weights.export`."""
  tf_keras = pytest.importorskip("tf_keras")
  from transfer import weights
  source = tf_keras.applications.ResNet50(weights=None)
  randomize(tf_keras, source, seed=2)
  source.save_weights(str(tmp_path / "source.h5"))
  net = models.get("resnet50", include_top=True, variant="keras")
  variables = jax.device_get(weights.load_variables(str(tmp_path / "source.h5"), net))
  layers = export.keras_layers(variables["params"], models.spec("resnet50"),
                               variables["batch_stats"])
  path = str(tmp_path / "exported_resnet50.h5")
  export.write_keras_h5(path, layers, naming="keras2")
  return path


@pytest.mark.parametrize("library", ["tf_keras", "keras"])
def test_a_file_transfer_exported_predicts_in_keras_as_in_transfer(library, tmp_path, capsys):
  keras = pytest.importorskip(library)
  path = exported_resnet50(tmp_path)
  build, preprocess_input = keras_applications(keras, "resnet50")
  model = build(weights=None)
  model.load_weights(path)
  paths, pixels = images(tmp_path, seed=3)
  got = cli_probabilities(["predict", "--model", "resnet50", "--weights", path, *paths], capsys)
  want = np.asarray(model.predict(preprocess_input(pixels.astype(np.float32)), verbose=0))
  assert want.max() > 2.0 / 1000
  assert_close(got, want, RTOL)
