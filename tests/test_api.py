"""The Python API a researcher starts from: `transfer.create_model`, `transfer.weights.transform`,
`transfer.Predictor`, and the package's lazy submodules."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import assert_close, cli_probabilities, one_line_error, tiny_config
import transfer
from transfer import train
from transfer.errors import UserError

pytestmark = pytest.mark.usefixtures("home")

RESNET50 = (3, 4, 6, 3)


def forward(model, variables, x):
  return np.asarray(jax.jit(model.apply)(variables, x))


# --- create_model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_file(tmp_path_factory):
  """A torchvision-layout ResNet50 (1/16 width) with random weights and running statistics,
  saved by torch under a name the registry does not know; and the torch model itself."""
  pytest.importorskip("torch", reason="torch extra not installed")
  from torch_models import save, torch_resnet
  model = torch_resnet(RESNET50, seed=11, width=4)
  return save(model, tmp_path_factory.mktemp("w") / "my_resnet.pth", "pth"), model


def torch_outputs(model, x_nhwc):
  """torch's own features map (NHWC), its average and max pooled features and its logits."""
  import torch
  with torch.no_grad():
    fmap = model.features(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()))
    return (fmap.numpy().transpose(0, 2, 3, 1), fmap.mean(dim=(2, 3)).numpy(),
            fmap.amax(dim=(2, 3)).numpy(), model.fc(fmap.mean(dim=(2, 3))).numpy())


def test_create_model_features_equal_torchs_with_the_variant_from_the_file(torch_file):
  path, reference = torch_file
  images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  x = transfer.weights.preprocess(images, path)  # a torch file: torchvision's mean/std
  fmap, avg, peak, logits = torch_outputs(reference, x)

  model, variables = transfer.create_model("resnet50_tiny", weights=path, num_classes=0,
                                           pooling="avg")
  assert model.variant == "torchvision"  # v1.5, read from the file: nobody named it
  assert set(variables) == {"params", "batch_stats"} and "predictions" not in variables["params"]
  got = forward(model, variables, x)
  assert got.shape == (2, 128)
  assert_close(got, avg)

  model, variables = transfer.create_model("resnet50_tiny", weights=path, num_classes=0,
                                           pooling="max")
  assert_close(forward(model, variables, x), peak)
  model, variables = transfer.create_model("resnet50_tiny", weights=path, num_classes=0,
                                           pooling=None)
  assert_close(forward(model, variables, x), fmap)
  # The file holds the ImageNet top: by default (timm's and Keras') it is kept.
  model, variables = transfer.create_model(weights=path)
  assert (model.arch, model.head, model.num_classes) == ("resnet50_tiny", "imagenet", 1000)
  assert_close(forward(model, variables, x), logits)


def test_create_model_new_head_loads_the_backbone_and_starts_the_head_fresh(torch_file):
  path, _ = torch_file
  model, variables, report = transfer.create_model("resnet50_tiny", weights=path, num_classes=3,
                                                   return_report=True)
  assert (model.head, model.num_classes) == ("gap", 3)
  assert report.fresh == ("head",) and "predictions" in report.ignored
  _, features = transfer.create_model("resnet50_tiny", weights=path, num_classes=0)
  shared = {k: v for k, v in variables["params"].items() if k != "head"}
  jax.tree.map(np.testing.assert_array_equal, shared, features["params"])
  assert forward(model, variables, np.zeros((1, 64, 64, 3), np.float32)).shape == (1, 3)
  # A fresh 1000-way head is asked for with include_top=False.
  model, _ = transfer.create_model("resnet50_tiny", weights=path, num_classes=1000,
                                   include_top=False)
  assert (model.head, model.num_classes) == ("gap", 1000)


def test_create_model_random_init_and_refusals(torch_file):
  path, _ = torch_file
  model, variables = transfer.create_model("resnet50_tiny")
  assert (model.head, model.num_classes, model.variant) == ("imagenet", 1000, "torchvision")
  model, variables = transfer.create_model("vgg16_tiny", num_classes=0, pooling=None)
  assert forward(model, variables, np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 1, 1, 32)
  with pytest.raises(UserError) as e:
    transfer.create_model("resnet50_tiny", weights=path, num_classes=3, pooling="max")
  assert "num_classes=0" in one_line_error(e)
  with pytest.raises(UserError, match="are for resnet50_tiny, model is vgg16_tiny"):
    transfer.create_model("vgg16_tiny", weights=path)
  with pytest.raises(UserError, match="has 1000 classes, not 5"):
    transfer.create_model("resnet50_tiny", weights=path, num_classes=5, include_top=True)
  with pytest.raises(UserError, match="num_classes must be >= 0"):
    transfer.create_model("resnet50_tiny", num_classes=-1)


# --- transform -------------------------------------------------------------------------------


def torchvision_eval(image, resize, crop, mean, std):
  """torchvision's documented eval transform on a PIL image, written out: Resize(resize) (short
  side, bilinear), CenterCrop(crop) (offsets int(round((side - crop) / 2))), ToTensor, Normalize."""
  w, h = image.size
  new = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
  image = image.resize(new, Image.BILINEAR)
  left, top = int(round((new[0] - crop) / 2.0)), int(round((new[1] - crop) / 2.0))
  pixels = np.asarray(image.crop((left, top, left + crop, top + crop)), np.uint8)
  return pixels, (pixels / 255.0 - np.asarray(mean)) / np.asarray(std)


def test_transform_is_torchvisions_eval_for_torchvision_weights():
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
  prep = transfer.weights.transform("torchvision:resnet50")
  config = prep.config
  assert (config.input_size, config.resize_size, config.interpolation, config.mode) == (
      224, 232, "bilinear", "torch")
  assert config.mean == (0.485, 0.456, 0.406) and config.std == (0.229, 0.224, 0.225)
  pixels, want = torchvision_eval(Image.fromarray(image), 232, 224, config.mean, config.std)
  np.testing.assert_array_equal(prep.geometry(image), pixels)
  np.testing.assert_allclose(prep(image), want, atol=1e-5)
  tall = rng.integers(0, 256, (500, 260, 3), dtype=np.uint8)
  batch = prep([image, tall])
  assert batch.shape == (2, 224, 224, 3) and batch.dtype == np.float32
  np.testing.assert_array_equal(prep.geometry([tall])[0],
                                torchvision_eval(Image.fromarray(tall), 232, 224, config.mean,
                                                 config.std)[0])


def test_transform_squashes_for_keras_weights_with_caffe_scaling():
  image = np.random.default_rng(4).integers(0, 256, (120, 90, 3), dtype=np.uint8)
  prep = transfer.weights.transform("keras:vgg16")
  assert prep.config.resize_size is None and prep.config.channel_order == "BGR"
  squashed = np.asarray(Image.fromarray(image).resize((224, 224), Image.BILINEAR), np.float32)
  np.testing.assert_allclose(prep(image), squashed[..., ::-1] - [103.939, 116.779, 123.68],
                             atol=1e-4)
  # InceptionV3: [-1, 1] at 299.
  config = transfer.weights.transform("keras:inception_v3").config
  assert (config.input_size, config.mode, config.mean, config.std) == (
      299, "tf", (0.5,) * 3, (0.5,) * 3)


def test_transform_is_what_predict_applies(tmp_path):
  """The pretrained predictor's preprocessing is `transform(weights)`, and on a file it gives
  what `transfer predict`'s decoding gives."""
  path = write_images(tmp_path, [(70, 50)])[0]
  config = transfer.weights.transform("torchvision:vgg16").config
  from transfer import predict
  np.testing.assert_array_equal(
      transfer.weights.transform("torchvision:vgg16").geometry(np.asarray(Image.open(path))),
      predict.load_image(path, config.input_size, config.resize_size, config.interpolation))


# --- Predictor -------------------------------------------------------------------------------


def write_images(folder, sizes, seed=0):
  rng = np.random.default_rng(seed)
  paths = []
  for i, (w, h) in enumerate(sizes):
    path = os.path.join(folder, f"img{i}.png")
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    paths.append(path)
  return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(tiny_config(eval_crop=0.8, **{"synthetic.num_classes": 3}), workdir)
  return workdir


def test_predictor_of_a_workdir_equals_transfer_predict(trained, tmp_path, capsys):
  paths = write_images(tmp_path, [(40, 40), (64, 30), (33, 90)])
  predictor = transfer.Predictor.from_workdir(trained, checkpoint="latest", batch_size=2)
  probs = predictor.predict(paths)
  assert probs.shape == (3, 3) and probs.dtype == np.float32
  cli = cli_probabilities(["predict", "--workdir", trained, "--batch_size", "2", *paths], capsys)
  np.testing.assert_array_equal(probs.astype(np.float64), cli)  # exactly what it prints
  # Arrays (and PIL images) go through the same resize and crop as files.
  arrays = [np.asarray(Image.open(p)) for p in paths]
  np.testing.assert_array_equal(predictor.predict(arrays), probs)
  np.testing.assert_array_equal(predictor.predict([Image.open(p) for p in paths]), probs)
  assert predictor.predict(paths[1]).shape == (1, 3)  # one image: a path, an array, a PIL image
  best = predictor.top(paths[0], k=1)[0][0]
  assert best["label"] == predictor.class_names[best["class"]]
  assert predictor.transform.config.squash_size == 40 and predictor.step > 0


def test_predictor_of_pretrained_weights_equals_transfer_predict(torch_file, tmp_path, capsys):
  path, _ = torch_file
  images = write_images(tmp_path, [(80, 60), (50, 90)])
  predictor = transfer.Predictor.from_pretrained("resnet50_tiny", weights=path)
  assert predictor.transform.config == transfer.weights.transform(path).config
  cli = cli_probabilities(["predict", "--model", "resnet50_tiny", "--weights", path, *images],
                          capsys)
  np.testing.assert_array_equal(predictor.predict(images).astype(np.float64), cli)
  assert predictor.top(images, k=1)[0][0]["label"] == predictor.class_names[
      predictor.top(images, k=1)[0][0]["class"]]


# --- the package -----------------------------------------------------------------------------


def test_every_module_is_reachable_after_import_transfer_without_jax():
  code = ("import sys, transfer; assert 'jax' not in sys.modules, 'jax at import'; "
          "assert callable(transfer.export.export) and callable(transfer.lr_find.main); "
          "assert transfer.stages.total_steps; "
          "import pkgutil; names = [m.name for m in pkgutil.iter_modules(transfer.__path__)]; "
          "missing = [n for n in names if not n.startswith('_') and not hasattr(transfer, n)]; "
          "assert not missing, missing; "
          "assert callable(transfer.create_model) and transfer.Predictor.from_workdir; "
          "assert {'create_model', 'Predictor', 'export'} <= set(dir(transfer)); print('ok')")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == "ok"
