"""Keras InceptionV3 weights: layers matched by kind and order, never by their generated names.

`keras.applications.InceptionV3` builds its 94 conv/BatchNorm pairs without names, so Keras
numbers them per process (`conv2d_17`); the files say nothing else about where a layer belongs.
The parity tests build the Keras model with random weights and random, non-trivial running
statistics, write it the two ways Keras files exist (the legacy HDF5 layout with Keras 2's names,
`conv2d_1` ... counted from 1 in creation order, as in the official files; Keras 3's own
`.weights.h5`, keyed by class and position, whose layers carry this process's names, shifted by
a model built before) and compare outputs on random inputs.
"""

import h5py
import jax
import numpy as np
import pytest

from helpers import assert_close, cli_probabilities, randomize
from transfer import models
from transfer import weights
from transfer.errors import UserError
from transfer.models import inception
from transfer.weights import sources
from transfer.weights.preprocess import EvalGeometry, eval_geometry, eval_resize, mode_for

# As for ResNet (tests/test_resnet_keras.py): float32 in both frameworks, sums in another order,
# ~100 layers deep: measured 2.7e-7 (notop at 99) and 4.6e-7 (top at 299) of the output's scale;
# 1e-4 hides no porting error (a pool that counts padding, a swapped statistic or two swapped
# layers are off by far more).
RTOL = 1e-4

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.usefixtures("home")]


def keras2_names(keras, model):
  """Layer name -> the name Keras 2 gave it: conv and BatchNorm layers `<class>_<n>`, counted
  from 1 in creation order (other layers keep theirs: they hold no weights).

  Keras 3 numbers layers per class in creation order too, from wherever this process's counter
  stood, so the creation order is the order of this model's own suffixes.
  """
  names = {layer.name: layer.name for layer in model.layers}
  for cls, base in ((keras.layers.Conv2D, "conv2d"),
                    (keras.layers.BatchNormalization, "batch_normalization")):
    members = [l.name for l in model.layers if isinstance(l, cls)]
    members.sort(key=lambda n: 0 if n == base else int(n.rsplit("_", 1)[1]))
    names.update({n: f"{base}_{rank}" for rank, n in enumerate(members, start=1)})
  return names


def write_legacy(keras, model, path):
  """The legacy HDF5 layout of the official files: `layer_names` in `model.layers` order, one
  group per layer with `weight_names` (`conv2d_1/kernel:0`, `batch_normalization_1/beta:0`)."""
  names = keras2_names(keras, model)
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = np.array([names[l.name].encode() for l in model.layers], dtype="S")
    f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.1.6"
    for layer in model.layers:
      group = f.create_group(names[layer.name])
      weight_names = [f"{names[layer.name]}/{v.name}:0" for v in layer.weights]
      group.attrs["weight_names"] = np.array([n.encode() for n in weight_names], dtype="S")
      for name, v in zip(weight_names, layer.weights):
        group.create_dataset(name, data=np.asarray(v.numpy(), np.float32))
  return str(path)


def write(keras, model, tmp_path, writer):
  if writer == "keras3":
    path = str(tmp_path / "inception.weights.h5")
    model.save_weights(path)
    return path
  return write_legacy(keras, model, tmp_path / "inception_legacy.h5")


@pytest.fixture(scope="module")
def notop(keras, tmp_path_factory):
  """A random Keras InceptionV3 without top at 99x99, built after another one (so its generated
  names are shifted: `conv2d_94` ...), and its two files."""
  keras.applications.InceptionV3(weights=None, include_top=False, input_shape=(75, 75, 3))
  model = keras.applications.InceptionV3(weights=None, include_top=False, input_shape=(99, 99, 3))
  randomize(keras, model, seed=0)
  tmp = tmp_path_factory.mktemp("inception")
  return model, {w: write(keras, model, tmp, w) for w in ("keras3", "legacy")}


_FORWARD = {}


def forward(net, variables, x):
  """One compiled forward per model (the full InceptionV3 compiles for seconds on a CPU)."""
  if net not in _FORWARD:
    _FORWARD[net] = jax.jit(net.apply)
  return np.asarray(_FORWARD[net](variables, x))


def file_layer_names(path):
  with weights.formats.open_weights(path) as wf:
    return list(wf.layers)


def test_keras_order_is_keras_model_layers_order(keras):
  """The spec's order, computed from our architecture description, is `model.layers`' order."""
  model = keras.applications.InceptionV3(weights=None, include_top=False,
                                         input_shape=(75, 75, 3))
  names = keras2_names(keras, model)
  creation = inception.layer_names()  # conv, bn per unit, in creation order
  listed = []
  for layer in model.layers:
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.BatchNormalization)):
      rank = int(names[layer.name].rsplit("_", 1)[1]) - 1
      listed.append(creation[2 * rank + isinstance(layer, keras.layers.BatchNormalization)])
  assert tuple(listed) == models.spec("inception_v3").keras_order
  assert listed != list(creation)  # Keras does not list them in creation order


@pytest.mark.parametrize("writer", ["keras3", "legacy"])
def test_notop_features_match_keras(keras, notop, writer):
  model, paths = notop
  net = models.get("inception_v3", include_top=False, variant="keras")
  variables, report = weights.load_variables(paths[writer], net, image_size=99,
                                             return_report=True)
  assert report.format == ("keras3_h5" if writer == "keras3" else "keras_h5")
  assert report.loaded == models.spec("inception_v3").conv_layers and not report.fresh
  # One known layer end to end: the second conv of mixed5's 7x7 branch is Keras' 55th unit.
  keras_bn = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
  keras_bn.sort(key=lambda l: int(keras2_names(keras, model)[l.name].rsplit("_", 1)[1]))
  unit = inception.layer_names().index("mixed5_branch7x7_2_bn") // 2
  np.testing.assert_array_equal(variables["batch_stats"]["mixed5_branch7x7_2_bn"]["var"],
                                keras_bn[unit].moving_variance.numpy())
  x = np.random.default_rng(1).uniform(-1, 1, (2, 99, 99, 3)).astype(np.float32)
  assert_close(forward(net, variables, x), model(x), RTOL)


def test_the_two_files_name_their_layers_differently(notop):
  """Keras 2's `conv2d_1` ... against this process's shifted `conv2d_188` ...: the same layer has
  another name in each file, so a port by name would mismatch every layer; by kind and order
  both load (above)."""
  _, paths = notop
  legacy, keras3 = file_layer_names(paths["legacy"]), file_layer_names(paths["keras3"])
  convs = lambda names: [n for n in names if n.startswith("conv2d")]
  assert len(convs(legacy)) == len(convs(keras3)) == 94
  assert all(a != b for a, b in zip(convs(legacy), convs(keras3)))
  assert convs(legacy)[0] == "conv2d_1" and "conv2d_1" not in keras3


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["keras3", "legacy"])
def test_logits_with_top_match_keras_at_299(keras, tmp_path, writer):
  model = keras.applications.InceptionV3(weights=None, include_top=True, classifier_activation=None)
  randomize(keras, model, seed=2)
  path = write(keras, model, tmp_path, writer)
  net = models.get("inception_v3", include_top=True, variant="keras")
  variables, report = weights.load_variables(path, net, return_report=True)
  assert len(report.loaded) == len(models.spec("inception_v3").conv_layers) + 1
  x = np.random.default_rng(3).uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
  ref = np.asarray(model(x))
  assert np.abs(ref).max() > 1.0
  assert_close(forward(net, variables, x), ref, RTOL)


# --- a file whose structure does not fit ---------------------------------------------------------


def _rewrite_layer_names(path, tmp_path, edit):
  """A copy of a legacy file with its `layer_names` list edited."""
  import shutil
  copy = str(tmp_path / "edited.h5")
  shutil.copy(path, copy)
  with h5py.File(copy, "r+") as f:
    names = [n.decode() for n in f.attrs["layer_names"]]
    f.attrs["layer_names"] = np.array([n.encode() for n in edit(names)], dtype="S")
  return copy


def _conv_positions(names, block_convs):
  """Positions in `names` of the file's conv layers that stand for `block_convs` (by order)."""
  convs = [n for n in names if n.startswith("conv2d_")]
  keras_convs = [n for n in models.spec("inception_v3").keras_order if n.endswith("_conv")]
  return [names.index(convs[keras_convs.index(c)]) for c in block_convs]


def _error(path):
  with pytest.raises(UserError) as e:
    weights.load_variables(path, models.get("inception_v3", head="none", variant="keras"),
                           image_size=99)
  message = str(e.value)
  assert "\n" not in message
  return message


def test_a_block_in_another_order_is_one_error_naming_it(notop, tmp_path):
  """mixed3's 3x3 stride-2 conv listed after its 1x1: the shapes show it, the message says
  which block, and nothing before it is blamed."""
  _, paths = notop

  def swap(names):
    i, j = _conv_positions(names, ["mixed3_branch3x3_conv", "mixed3_branch3x3dbl_1_conv"])
    names[i], names[j] = names[j], names[i]
    return names

  message = _error(_rewrite_layer_names(paths["legacy"], tmp_path, swap))
  assert "likely cause: mixed3: the file's convolution layers in that place do not fit" in message
  assert "mixed2" not in message.split("likely cause:")[1].split(";")[0]


def test_a_block_with_another_shape_is_one_error_naming_it(notop, tmp_path):
  _, paths = notop
  path = _rewrite_layer_names(paths["legacy"], tmp_path, lambda names: names)
  with h5py.File(path, "r+") as f:
    layer = [n.decode() for n in f.attrs["layer_names"]][
        _conv_positions([n.decode() for n in f.attrs["layer_names"]],
                        ["mixed5_branch7x7dbl_3_conv"])[0]]
    name = f[layer].attrs["weight_names"][0].decode()
    del f[layer][name]
    f[layer].create_dataset(name, data=np.zeros((7, 1, 160, 160), np.float32))  # 1x7 -> 7x1
  message = _error(path)
  assert "likely cause: mixed5: the file's convolution layers" in message
  assert "mis-shaped (1): mixed5_branch7x7dbl_3_conv/kernel" in message


def test_a_keras_file_into_the_torchvision_variant_is_one_clear_error(notop):
  _, paths = notop
  with pytest.raises(UserError, match=r"is a Keras InceptionV3 \(BatchNorm without scale.*"
                                       r"build it with variant='keras'"):
    weights.load(paths["keras3"], models.get("inception_v3", head="none",
                                             variant="torchvision"), image_size=99)


def test_info_names_the_layers_by_order(notop):
  _, paths = notop
  meta = weights.info(paths["legacy"])
  assert (meta["arch"], meta["variant"]) == ("inception_v3", "keras")
  first = meta["layers"][0]
  assert (first["name"], first["model_name"]) == ("conv2d_1", "stem_1a_conv")


# --- registry ----------------------------------------------------------------------------------


def test_registry_records_the_keras_files():
  base = "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
  for suffix, md5 in (("", "9a0d58056eeedaa3f26cb7ebd46da564"),
                      ("_notop", "bcbd6486424b2319ff4ef7d526e38f63")):
    entry = sources.get(f"keras:inception_v3{suffix}")
    assert entry.url == f"{base}inception_v3_weights_tf_dim_ordering_tf_kernels{suffix}.h5"
    assert (entry.hash_kind, entry.hash, entry.arch, entry.variant) == (
        "md5", md5, "inception_v3", "keras")
    assert (entry.include_top, entry.preprocess, entry.resize_size) == (not suffix, "tf", None)
  assert mode_for("keras:inception_v3_notop") == "tf"
  assert mode_for("/anywhere/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5") == "tf"
  assert mode_for("keras:resnet50") == "caffe" and eval_resize("keras:inception_v3") is None
  assert eval_geometry("keras:inception_v3") == EvalGeometry(299, None, "bilinear")
  assert weights.variant_for("keras:inception_v3_notop", "inception_v3") == "keras"
  with pytest.raises(UserError, match="is a Keras InceptionV3"):  # before any download
    weights.load("keras:inception_v3_notop",
                 models.get("inception_v3", head="none", variant="torchvision"), image_size=75)


# --- tiny files, no Keras needed ---------------------------------------------------------------


@pytest.mark.parametrize("naming", ["keras1", "keras2"])
def test_an_exported_tiny_file_loads_back_exactly(tmp_path, naming):
  """`export.keras_layers` writes Keras' order (and BatchNorm without gamma); loading by kind
  and order gives back every array bit for bit, through a file whose names are ours."""
  from transfer.weights import export, port
  net = models.get("inception_v3_tiny", head="none", variant="keras")
  shapes = port.variable_shapes(net, 75)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  variables["batch_stats"] = jax.tree.map(lambda a: np.abs(a) + 0.5, variables["batch_stats"])
  layers = export.keras_layers(variables["params"], models.spec("inception_v3_tiny"),
                               variables["batch_stats"])
  assert list(layers) == list(models.spec("inception_v3_tiny").keras_order)
  path = tmp_path / "tiny.h5"
  export.write_keras_h5(path, {"input_1": [], **layers}, naming=naming)
  got = weights.load_variables(str(path), net, image_size=75)
  jax.tree.map(np.testing.assert_array_equal, got, variables)


# --- a Keras InceptionV3 file by path (any name): tf preprocessing at 299 --------------------------


def _photo(path, size, seed):
  """A smooth random RGB image of `size` (w, h), saved as PNG."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  w, h = size
  t = np.linspace(0, 1, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
  a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
  noise = rng.normal(0, 20, (h, w, 3))
  Image.fromarray(np.clip(a * (1 - t) + b * t + noise, 0, 255).astype(np.uint8)).save(path)
  return str(path)


def _informative_top(model):
  """The top scaled down, so its probabilities are informative rather than one-hot."""
  top = model.get_layer("predictions")
  kernel, bias = top.get_weights()
  top.set_weights([kernel * 0.05, bias * 0.0])


@pytest.fixture(scope="module")
def with_top(keras, tmp_path_factory):
  """A random Keras InceptionV3 with its top (299), written by Keras 3 both ways it writes: its
  own `.weights.h5` and, through `model.save("*.h5")`, the legacy HDF5 layout. The file names
  say nothing of the architecture."""
  model = keras.applications.InceptionV3(weights=None)
  randomize(keras, model, seed=4)
  _informative_top(model)
  tmp = tmp_path_factory.mktemp("inception_top")
  own, legacy = str(tmp / "my_inception.weights.h5"), str(tmp / "my_inception.h5")
  model.save_weights(own)
  model.save(legacy)
  return keras, model, {"keras3": own, "keras3_legacy": legacy}


@pytest.fixture(scope="module")
def tf_keras_top(tmp_path_factory):
  """The same from Keras 2 (`tf_keras`): `save_weights("*.h5")`, the official files' layout."""
  tf_keras = pytest.importorskip("tf_keras", reason="tf_keras not installed")
  model = tf_keras.applications.InceptionV3(weights=None)
  randomize(tf_keras, model, seed=5)
  _informative_top(model)
  path = str(tmp_path_factory.mktemp("inception_tf_keras") / "my_inception_v3.h5")
  model.save_weights(path)
  return tf_keras, model, {"tf_keras": path}


_WRITERS = {"keras3": "with_top", "keras3_legacy": "with_top", "tf_keras": "tf_keras_top"}


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["keras3", "tf_keras"])
def test_a_keras_inception_file_by_path_predicts_as_keras_at_299(request, writer, tmp_path,
                                                                 capsys):
  """`transfer predict --weights my_inception.h5`: squashed to 299, [-1, 1] input, the
  probabilities Keras computes (caffe scaling at 224, the extension's old guess, is far off)."""
  from PIL import Image
  framework, model, files = request.getfixturevalue(_WRITERS[writer])
  image = _photo(tmp_path / "x.png", (360, 280), seed=5)
  ours = cli_probabilities(["predict", "--model", "inception_v3", "--weights", files[writer], image],
                    capsys)
  pixels = np.asarray(Image.open(image).convert("RGB").resize((299, 299), Image.BILINEAR),
                      np.float32)[None]
  ref = np.asarray(model(framework.applications.inception_v3.preprocess_input(pixels)))
  assert ref.max() < 0.9  # informative probabilities
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("writer", ["keras3", "keras3_legacy", "tf_keras"])
def test_a_keras_inception_file_by_path_is_parsed_as_keras_inception(request, writer, capsys):
  from transfer import main as cli_main
  path = request.getfixturevalue(_WRITERS[writer])[2][writer]
  parsed = sources.resolve(path)
  assert (parsed.arch, parsed.variant, parsed.framework, parsed.preprocess) == (
      "inception_v3", "keras", "keras", "tf")
  assert eval_geometry(parsed) == eval_geometry(path) == EvalGeometry(299, None, "bilinear")
  assert weights.variant_for(path, "inception_v3") == "keras"
  capsys.readouterr()
  assert cli_main.run(["weights", "info", path]) == 0
  assert "arch: inception_v3 (variant=keras)  preprocess: tf" in capsys.readouterr().out


def test_keras_inception_v3_evaluates_at_299_without_being_told():
  for source_id in ("keras:inception_v3", "keras:inception_v3_notop"):
    assert eval_geometry(source_id) == EvalGeometry(299, None, "bilinear")
    assert sources.resolve(source_id).input_size == 299
  assert eval_geometry("keras:resnet50").size == 224


@pytest.mark.slow
def test_a_run_fine_tuned_from_a_keras_inception_file_records_and_uses_tf(notop, tmp_path):
  """`transfer train --config.weights=my_inception.weights.h5` trains on [-1, 1] input and
  records it; eval reads the record (it works with the weight file gone, and computes the
  run's own last validation loss)."""
  import os
  import shutil
  from transfer import checkpoint, evaluate, metrics
  from transfer import main as cli_main
  path = shutil.copy(notop[1]["keras3"], tmp_path / "my_inception.weights.h5")
  workdir = str(tmp_path / "run")
  assert cli_main.run([
      "train", "--workdir", workdir, "--config.model=inception_v3", "--config.head=gap",
      f"--config.weights={path}", "--config.image_size=75", "--config.batch_size=4",
      "--config.synthetic.train_size=8", "--config.synthetic.val_size=4",
      "--config.synthetic.base_size=75", "--config.num_steps=1", "--config.log_every_steps=1",
      "--config.eval_every_steps=1", "--config.checkpoint_every_steps=1",
      "--config.augment=none"]) == 0
  _, meta = checkpoint.load_trained_variables(workdir)
  assert meta["run"]["preprocessing"] == "tf" and meta["run"]["variant"] == "keras"
  trained_loss = [r["val_loss"] for r in metrics.read_metrics(workdir) if "val_loss" in r][-1]
  os.remove(path)
  result = evaluate.evaluate_workdir(workdir)
  assert result["val_loss"] == pytest.approx(trained_loss, rel=1e-5)
