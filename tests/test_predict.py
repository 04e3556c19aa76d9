"""`transfer predict` on the ImageNet path: image decoding, top-k, output formats, the CLI."""

import json

import numpy as np
import pytest
from PIL import Image

from transfer import main as cli_main
from transfer import models
from transfer import predict
from transfer import weights
from transfer.errors import UserError
from transfer.weights import export, port

TABBY = 281


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
  monkeypatch.setenv("TRANSFER_HOME", str(tmp_path / "home"))
  monkeypatch.setenv("TRANSFER_WEIGHTS_URL_BASE", "http://127.0.0.1:9/none")


@pytest.fixture
def images(tmp_path):
  """A 224 RGB PNG, a small grayscale JPEG and a wide RGBA PNG."""
  rng = np.random.default_rng(0)
  paths = []
  for name, mode, size in [("a.png", "RGB", (224, 224)), ("b.jpg", "L", (100, 80)),
                           ("c.png", "RGBA", (300, 200))]:
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(tmp_path / name)
    paths.append(str(tmp_path / name))
  return paths


def tiny_weights(path, favourite=None, fmt="h5"):
  """Random vgg16_tiny weights with the ImageNet top; `favourite` gets a huge bias."""
  rng = np.random.default_rng(1)
  shapes = port.param_shapes(models.get("vgg16_tiny", include_top=True), 224)
  params = {layer: {n: rng.standard_normal(s.shape, dtype=np.float32) * 0.05
                    for n, s in p.items()} for layer, p in shapes.items()}
  if favourite is not None:
    params["predictions"]["bias"][favourite] = 50.0
  spec = models.spec("vgg16_tiny")
  if fmt == "h5":
    export.write_keras_h5(path, export.keras_layers(params, spec))
  else:
    export.write_safetensors(path, export.torch_state_dict(params, spec))
  return str(path)


def test_load_images_converts_and_resizes(images):
  x = predict.load_images(images, 224)
  assert x.shape == (3, 224, 224, 3) and x.dtype == np.uint8
  np.testing.assert_array_equal(x[0], np.asarray(Image.open(images[0])))
  assert (x[1, ..., 0] == x[1, ..., 2]).all()  # Grayscale became RGB.


@pytest.mark.parametrize("content", [b"not an image at all", b"\xff\xd8\xff\xe0 truncated jpeg"])
def test_corrupt_image_is_one_line_error_naming_the_file(tmp_path, images, content):
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(content)
  with pytest.raises(UserError) as e:
    predict.load_images([images[0], str(bad)], 224)
  assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_missing_image(tmp_path):
  with pytest.raises(UserError, match="no image file"):
    predict.load_images([str(tmp_path / "nope.png")], 224)


def test_top_k_orders_and_labels():
  probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
  best = predict.top_k(probs, 2, ["a", "b", "c"])
  assert [[p["class"] for p in row] for row in best] == [[1, 2], [0, 1]]
  assert best[0][0] == {"class": 1, "label": "b", "prob": pytest.approx(0.6)}
  assert len(predict.top_k(probs, 10)[0]) == 3 and predict.top_k(probs, 1)[0][0]["label"] == "1"


def test_format_predictions():
  best = [{"class": 281, "label": "tabby", "prob": 0.75}]
  assert json.loads(predict.format_predictions("x.png", best, as_json=True)) == {
      "image": "x.png", "top": best}
  text = predict.format_predictions("x.png", best)
  assert text.splitlines()[0] == "x.png" and "75.00%" in text and "281  tabby" in text


def test_imagenet_labels_ship_with_the_package():
  labels, wnids = predict.imagenet_labels(), predict.imagenet_wnids()
  assert len(labels) == len(wnids) == 1000
  assert (wnids[0], labels[0]) == ("n01440764", "tench")
  assert labels[TABBY] == "tabby" and labels[999] == "toilet tissue"


def test_predictions_match_a_direct_forward_pass(tmp_path, images):
  """The torch-layout file gets torch preprocessing; results equal running the model by hand."""
  path = tiny_weights(tmp_path / "w.safetensors", fmt="safetensors")
  got = predict.predict_imagenet(images[:2], model="vgg16_tiny", weights=path, top=3)
  net = models.get("vgg16_tiny", include_top=True)
  params = weights.load(path, net)
  x = weights.preprocess(predict.load_images(images[:2], 224), "torch")
  probs = np.asarray(__import__("jax").nn.softmax(net.apply({"params": params}, x)))
  for (image, best), row in zip(got, probs):
    assert [p["class"] for p in best] == list(np.argsort(-row)[:3])
    np.testing.assert_allclose([p["prob"] for p in best], np.sort(row)[::-1][:3], rtol=1e-5)


def test_cli_predict_json(tmp_path, images, capsys):
  path = tiny_weights(tmp_path / "tiny.h5", favourite=TABBY)
  assert cli_main.run(["predict", "--model", "vgg16_tiny", "--weights", path, "--top", "3",
                       "--json", *images[:2]]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2
  for line, image in zip(lines, images):
    record = json.loads(line)
    assert record["image"] == image and len(record["top"]) == 3
    assert record["top"][0]["class"] == TABBY and record["top"][0]["label"] == "tabby"
    probs = [p["prob"] for p in record["top"]]
    assert probs == sorted(probs, reverse=True) and 0.99 < probs[0] <= 1.0


def test_cli_predict_table(tmp_path, images, capsys):
  path = tiny_weights(tmp_path / "tiny.h5", favourite=TABBY)
  cli_main.run(["predict", "--model", "vgg16_tiny", "--weights", path, "--top", "2", images[2]])
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == images[2] and "tabby" in lines[1] and len(lines) == 3


def test_cli_predict_bad_image_exits_2(tmp_path, capsys):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"garbage")
  with pytest.raises(SystemExit) as e:
    cli_main.main(["predict", "--model", "vgg16_tiny", "--weights", "x.h5", str(bad)])
  assert e.value.code == 2
  assert capsys.readouterr().err.strip() == (
      f"transfer: error: cannot read image {bad}: cannot identify image file '{bad}'")


def test_notop_weights_cannot_predict(tmp_path, images):
  rng = np.random.default_rng(0)
  shapes = port.param_shapes(models.get("vgg16_tiny", head="none"), 32)
  export.write_keras_h5(tmp_path / "notop.h5", {
      layer: [rng.standard_normal(p["kernel"].shape, dtype=np.float32),
              rng.standard_normal(p["bias"].shape, dtype=np.float32)]
      for layer, p in shapes.items()})
  with pytest.raises(UserError, match="no ImageNet top"):
    predict.predict_imagenet(images[:1], model="vgg16_tiny", weights=str(tmp_path / "notop.h5"))


def test_workdir_without_a_run_is_one_clear_error(images, tmp_path):
  with pytest.raises(UserError, match="no checkpoint in .*; train there first"):
    predict.main(images, workdir=str(tmp_path / "runs" / "x"))
