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

pytestmark = pytest.mark.usefixtures("home")

TABBY = 281


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
  with pytest.raises(UserError, match="cannot read image .*nope.png: no such file"):
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
  """The torch-layout file gets torch preprocessing and torchvision's eval geometry (short side
  256, center crop 224); results equal running the model by hand."""
  path = tiny_weights(tmp_path / "w.safetensors", fmt="safetensors")
  got = predict.predict_imagenet(images[:2], model="vgg16_tiny", weights=path, top=3)
  net = models.get("vgg16_tiny", include_top=True)
  params = weights.load(path, net)
  x = weights.preprocess(predict.load_images(images[:2], 224, resize_size=256), "torch")
  probs = np.asarray(__import__("jax").nn.softmax(net.apply({"params": params}, x)))
  for (image, best, error), row in zip(got, probs):
    assert error is None
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


def test_cli_predict_bad_image_exits_1_with_one_line(tmp_path, capsys):
  path = tiny_weights(tmp_path / "tiny.h5")
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"garbage")
  with pytest.raises(SystemExit) as e:
    cli_main.main(["predict", "--model", "vgg16_tiny", "--weights", path, str(bad)])
  assert e.value.code == 1
  out, err = capsys.readouterr()
  assert out == "" and err.strip() == (
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


@pytest.fixture
def mixed(tmp_path, images):
  """[good, corrupt, missing, good]: the bad two sit between readable images."""
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
  return [images[0], str(corrupt), str(tmp_path / "missing.png"), images[2]]


def test_predict_answers_every_readable_image_json(tmp_path, mixed, capsys):
  path = tiny_weights(tmp_path / "tiny.h5", favourite=TABBY)
  status = cli_main.run(["predict", "--model", "vgg16_tiny", "--weights", path, "--json",
                         "--top", "2", *mixed])
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert status == 1
  assert [r["image"] for r in records] == mixed
  assert records[0]["top"][0]["label"] == "tabby" and records[3]["top"][0]["label"] == "tabby"
  assert set(records[1]) == set(records[2]) == {"image", "error"}
  assert records[2]["error"] == "no such file" and records[1]["error"]


def test_predict_answers_every_readable_image_text(tmp_path, mixed, capsys):
  path = tiny_weights(tmp_path / "tiny.h5", favourite=TABBY)
  status = cli_main.run(["predict", "--model", "vgg16_tiny", "--weights", path, "--top", "1",
                         *mixed])
  out, err = capsys.readouterr()
  assert status == 1
  assert [line for line in out.splitlines() if not line.startswith(" ")] == [mixed[0], mixed[3]]
  errors = err.splitlines()
  assert len(errors) == 2
  assert errors[0].startswith(f"transfer: error: cannot read image {mixed[1]}: ")
  assert errors[1] == f"transfer: error: cannot read image {mixed[2]}: no such file"


def test_failed_images_do_not_change_the_others(tmp_path, mixed):
  """A bad file in a batch leaves the good ones' probabilities as if predicted alone."""
  path = tiny_weights(tmp_path / "w.h5")
  got = predict.predict_imagenet(mixed, model="vgg16_tiny", weights=path, top=3)
  alone = predict.predict_imagenet([mixed[0], mixed[3]], model="vgg16_tiny", weights=path, top=3)
  assert [g.image for g in got] == mixed
  assert got[1].top is None and got[2].top is None and got[2].error == "no such file"
  for g, a in zip([got[0], got[3]], alone):
    assert g.error is None and [p["class"] for p in g.top] == [p["class"] for p in a.top]
    np.testing.assert_allclose([p["prob"] for p in g.top], [p["prob"] for p in a.top],
                               rtol=1e-5)


def test_folders_are_walked_recursively_sorted_without_hidden_or_other_files(tmp_path):
  root = tmp_path / "photos"
  for rel in ["b.png", "a/z.JPG", "a/deep/y.jpeg", ".hidden.png", ".git/x.png", "notes.txt",
              "doc.pdf"]:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(b"")
  named = str(tmp_path / "given.txt")  # a file named on the command line is kept as given
  assert predict.expand_images([named, str(root)]) == [
      named, str(root / "a/deep/y.jpeg"), str(root / "a/z.JPG"), str(root / "b.png")]


def test_folder_without_images_is_one_line_error(tmp_path):
  (tmp_path / "empty" / "sub").mkdir(parents=True)
  (tmp_path / "empty" / "readme.txt").write_text("x")
  with pytest.raises(UserError, match="no image files under .*empty") as e:
    predict.expand_images([str(tmp_path / "empty")])
  assert "\n" not in str(e.value)


def test_cli_predict_a_folder(tmp_path, images, capsys):
  path = tiny_weights(tmp_path / "w.h5")
  folder = tmp_path / "in"
  (folder / "sub").mkdir(parents=True)
  Image.open(images[0]).save(folder / "sub" / "x.png")
  Image.open(images[1]).save(folder / "y.jpg")
  assert cli_main.run(["predict", "--model", "vgg16_tiny", "--weights", path, "--json",
                       str(folder)]) == 0
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["image"] for r in records] == [str(folder / "sub" / "x.png"), str(folder / "y.jpg")]


def test_batch_size_that_does_not_divide_the_images(tmp_path, images, monkeypatch, capsys):
  """5 images in batches of 2: same answers as one batch, decoded only a batch ahead."""
  path = tiny_weights(tmp_path / "w.h5")
  paths = images + images[:2]
  whole = predict.predict_imagenet(paths, model="vgg16_tiny", weights=path, top=3, batch_size=8)

  decoded, decoded_when_printed = [], []
  decode_image = predict.decode_image
  monkeypatch.setattr(predict, "decode_image",
                      lambda p, *a, **k: decoded.append(p) or decode_image(p, *a, **k))
  format_predictions = predict.format_predictions
  monkeypatch.setattr(predict, "format_predictions",
                      lambda *a, **k: decoded_when_printed.append(len(decoded)) or
                      format_predictions(*a, **k))
  assert cli_main.run(["predict", "--model", "vgg16_tiny", "--weights", path, "--json",
                       "--top", "3", "--batch_size", "2", *paths]) == 0
  assert decoded_when_printed == [2, 2, 4, 4, 5]
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["image"] for r in records] == paths
  for record, w in zip(records, whole):
    np.testing.assert_allclose([p["prob"] for p in record["top"]], [p["prob"] for p in w.top],
                               rtol=1e-5)


def test_batch_size_must_be_positive(images):
  with pytest.raises(UserError, match="--batch_size must be >= 1, got 0"):
    predict.predict_imagenet(images, model="vgg16_tiny", weights="x.h5", batch_size=0)


def test_checkpoint_needs_a_workdir(images):
  with pytest.raises(UserError, match="--checkpoint .*--workdir"):
    predict.main(images, model="vgg16_tiny", checkpoint="best")
