"""Ported weights compute what they computed in Keras and torch.

Reference networks get random weights, the weights are written the way the official files are
(legacy Keras HDF5 with Keras-1 dataset names, Keras 3 `.weights.h5`, torchvision-keyed `.pth` and
`.safetensors`), loaded with `transfer.weights.load`, and both sides run on the same random
inputs. Random (not zero) biases make a swapped kernel/bias or a wrong transpose show.
"""

import jax
import numpy as np
import pytest

from helpers import assert_close, randomize
from transfer import models
from transfer import weights
from transfer.weights import export

RTOL = 1e-4

# Keras' TF backend trips numpy 2's __array__(copy=...) deprecation on every call.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.usefixtures("home")]


def keras_layers(model):
  """All layers with their arrays in model order, including the weightless ones (the official
  files list input, pooling and flatten layers with empty `weight_names`)."""
  return {layer.name: [np.asarray(v) for v in layer.get_weights()] for layer in model.layers}


def forward(model_name, params, x, **kw):
  net = models.get(model_name, **kw)
  return np.asarray(jax.jit(net.apply)({"params": params}, x))


# --- Keras ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_vgg16_top(keras):
  """Keras VGG16 with its ImageNet top (ends with softmax), random weights; built once."""
  model = keras.applications.VGG16(weights=None, include_top=True)
  randomize(keras, model, seed=0)
  return model


@pytest.fixture(scope="module", params=["vgg16", "vgg19"])
def keras_notop(request, keras):
  """Keras VGG16/VGG19 without top at 64x64, random weights."""
  build = {"vgg16": keras.applications.VGG16, "vgg19": keras.applications.VGG19}[request.param]
  model = build(weights=None, include_top=False, input_shape=(64, 64, 3))
  randomize(keras, model, seed=1)
  return request.param, model


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["legacy_keras1", "keras3"])
def test_keras_vgg16_with_top_matches(keras_vgg16_top, tmp_path, writer):
  if writer == "legacy_keras1":
    path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
    export.write_keras_h5(path, keras_layers(keras_vgg16_top), naming="keras1")
  else:
    path = tmp_path / "vgg16.weights.h5"
    keras_vgg16_top.save_weights(str(path))
  x = np.random.default_rng(2).standard_normal((2, 224, 224, 3), dtype=np.float32)
  params, report = weights.load(str(path), models.get("vgg16", include_top=True),
                                return_report=True)
  assert report.format == ("keras_h5" if writer == "legacy_keras1" else "keras3_h5")
  assert len(report.loaded) == 16 and not report.fresh and not report.ignored
  logits = forward("vgg16", params, x, include_top=True)
  assert_close(jax.nn.softmax(logits), keras_vgg16_top(x))


@pytest.mark.parametrize("naming", ["keras1", "keras2", "keras3", "keras_archive"])
def test_keras_notop_features_match(keras_notop, tmp_path, naming):
  arch, model = keras_notop
  path = tmp_path / f"{arch}_{naming}.h5"
  if naming == "keras3":
    path = tmp_path / f"{arch}.weights.h5"
    model.save_weights(str(path))
  elif naming == "keras_archive":
    path = tmp_path / f"{arch}.keras"
    model.save(str(path))
  else:
    export.write_keras_h5(path, keras_layers(model), naming=naming)
  x = np.random.default_rng(3).standard_normal((1, 64, 64, 3), dtype=np.float32)
  params = weights.load(str(path), models.get(arch, include_top=False), image_size=64)
  assert_close(forward(arch, params, x, include_top=False), model(x))


def test_legacy_file_is_read_through_its_attributes(keras_notop, tmp_path):
  """The official layout: root `layer_names`, per-layer `weight_names`, weightless layers listed."""
  import h5py
  arch, model = keras_notop
  path = tmp_path / "notop.h5"
  export.write_keras_h5(path, keras_layers(model))
  with h5py.File(path) as f:
    names = [n.decode() for n in f.attrs["layer_names"]]
    assert names[0].startswith("input") and "block1_pool" in names
    assert [n.decode() for n in f["block1_conv1"].attrs["weight_names"]] == [
        "block1_conv1_W_1:0", "block1_conv1_b_1:0"]
    assert len(f["block1_pool"].attrs["weight_names"]) == 0
  meta = weights.info(str(path))
  assert meta["format"] == "keras_h5" and meta["arch"] == arch
  assert meta["layers"][0]["weights"][0] == {"name": "block1_conv1_W_1:0", "shape": [3, 3, 3, 64]}


# --- torch ---------------------------------------------------------------------------------------


def torch_vgg(arch: str, seed: int):
  """A torch VGG with torchvision's module layout and state-dict keys, random weights."""
  torch = pytest.importorskip("torch", reason="torch extra not installed")
  from torch import nn

  torch.manual_seed(seed)
  net = models.get(arch, include_top=True)
  layers, channels = [], 3
  for size, width in zip(net.stage_sizes, net.widths):
    for _ in range(size):
      layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
      channels = width
    layers.append(nn.MaxPool2d(2, 2))
  hidden = net.top_hidden

  class VGG(nn.Module):

    def __init__(self):
      super().__init__()
      self.features = nn.Sequential(*layers)
      self.avgpool = nn.AdaptiveAvgPool2d(7)
      self.classifier = nn.Sequential(
          nn.Linear(channels * 49, hidden), nn.ReLU(True), nn.Dropout(),
          nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(), nn.Linear(hidden, 1000))

    def forward(self, x):
      return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

  model = VGG().eval()
  with torch.no_grad():  # Random biases too (torch's default init is small but not zero).
    for p in model.parameters():
      if p.ndim == 1:
        p.normal_(0, 0.1)
  return model


def torch_logits(model, x_nhwc):
  torch = pytest.importorskip("torch", reason="torch extra not installed")
  with torch.no_grad():
    return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_torch_tiny_matches(tmp_path, fmt):
  torch = pytest.importorskip("torch", reason="torch extra not installed")
  model = torch_vgg("vgg16_tiny", seed=0)
  path = tmp_path / f"vgg16_tiny.{fmt}"
  state = model.state_dict()
  assert "features.28.weight" in state and "classifier.6.bias" in state
  if fmt == "pth":
    torch.save(state, path)
  else:
    export.write_safetensors(path, {k: v.numpy() for k, v in state.items()})
  x = np.random.default_rng(4).standard_normal((2, 224, 224, 3), dtype=np.float32)
  params, report = weights.load(str(path), models.get("vgg16_tiny", include_top=True),
                                return_report=True)
  assert report.format == ("torch_pth" if fmt == "pth" else "safetensors")
  assert_close(forward("vgg16_tiny", params, x, include_top=True), torch_logits(model, x))


@pytest.mark.slow
def test_torch_vgg16_matches(tmp_path):
  """The full network, as torchvision publishes it (.pth)."""
  torch = pytest.importorskip("torch", reason="torch extra not installed")
  model = torch_vgg("vgg16", seed=1)
  path = tmp_path / "vgg16-random.pth"
  torch.save(model.state_dict(), path)
  x = np.random.default_rng(5).standard_normal((1, 224, 224, 3), dtype=np.float32)
  params = weights.load(str(path), models.get("vgg16", include_top=True))
  assert_close(forward("vgg16", params, x, include_top=True), torch_logits(model, x))


def test_export_round_trips_through_torch_layout(tmp_path):
  """`export.torch_state_dict` inverts the port, including the classifier row permutation."""
  model = torch_vgg("vgg16_tiny", seed=2)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  path = tmp_path / "a.safetensors"
  export.write_safetensors(path, state)
  params = weights.load(str(path), models.get("vgg16_tiny", include_top=True))
  back = export.torch_state_dict(params, models.spec("vgg16_tiny"))
  assert set(back) == set(state)
  for key in state:
    np.testing.assert_array_equal(back[key], state[key])
