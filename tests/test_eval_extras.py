"""`transfer eval --tta`, `--top_losses K`, and a run with parameter EMA through eval/predict."""

import json
import os
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from transfer import checkpoint, evaluate, main, metrics, models, parallel, predict, runs, train
from transfer import steps as steps_lib
from helpers import tiny_config

IMAGE = 32


class Symmetric(nn.Module):
  """A flip-invariant model: the inner network sees (x + mirror(x)) / 2, the same bits for an
  image and its mirror (float addition commutes)."""
  inner: nn.Module

  def __call__(self, x, stage="full", **kw):
    return self.inner((x + x[:, :, ::-1]) / 2, stage=stage, **kw)


def _eval(model, variables, batch, tta, devices=2):
  mesh = parallel.make_mesh(jax.devices()[:devices])
  step = steps_lib.make_eval_step(model, mesh, model_outputs(model), tta=tta)
  return jax.device_get(step(parallel.replicate(variables, mesh),
                             jax.device_put(batch, parallel.batch_sharding(mesh))))


def model_outputs(model):
  return getattr(model, "num_classes", None) or model.inner.num_classes


def _batch(n=8, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, IMAGE, IMAGE, 3)).astype(np.float32),
          "label": rng.integers(0, classes, n).astype(np.int32), "mask": np.arange(n) < n - 1}


@pytest.mark.parametrize("outputs", [1, 3])
def test_tta_of_a_flip_invariant_model_equals_plain_eval(outputs):
  model = Symmetric(models.get("vgg16_tiny", head="gap", num_classes=outputs))
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, IMAGE, IMAGE, 3), np.float32))
  batch = _batch(classes=max(outputs, 2))
  plain, tta = _eval(model, variables, batch, False), _eval(model, variables, batch, True)
  np.testing.assert_array_equal(tta["confusion"], plain["confusion"])
  assert tta["correct"] == plain["correct"] and tta["count"] == plain["count"] == 7
  np.testing.assert_allclose(tta["loss"], plain["loss"], rtol=2e-6)


def test_tta_averages_the_probabilities_of_the_image_and_its_mirror():
  model = models.get("vgg16_tiny", head="gap", num_classes=3)
  params = models.init_params(model, IMAGE, 0)
  batch = _batch()
  sums = _eval(model, params, batch, True)
  softmax = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(
      x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
  logits = lambda x: np.asarray(model.apply({"params": params}, x), np.float64)
  probs = (softmax(logits(batch["image"])) + softmax(logits(batch["image"][:, :, ::-1]))) / 2
  mask = batch["mask"]
  true = probs[np.arange(8), batch["label"]]
  assert sums["loss"] == pytest.approx(-np.log(true[mask]).sum(), rel=1e-5)
  assert sums["correct"] == np.sum((probs.argmax(-1) == batch["label"])[mask])
  assert not np.allclose(softmax(logits(batch["image"])), probs)  # the mirror mattered


def test_find_top_losses_keeps_wrong_examples_by_loss():
  probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.05, 0.95], [0.7, 0.3]])
  labels = np.array([0, 0, 0, 0, 1])
  top = evaluate.find_top_losses(probs, labels, np.arange(10, 15), 3)
  assert [t["id"] for t in top] == [13, 11, 14]
  assert top[0]["pred"] == 1 and top[0]["prob_pred"] == 0.95
  assert top[0]["loss"] == pytest.approx(-np.log(0.05))
  assert len(evaluate.find_top_losses(probs, labels, np.arange(5), 10)) == 4  # only 4 wrong


def test_top_losses_figure_has_one_panel_per_example():
  top = [{"true": i % 2, "pred": 1 - i % 2, "prob_true": 0.1, "prob_pred": 0.9} for i in range(5)]
  images = np.zeros((5, 8, 8, 3), np.uint8)
  fig = evaluate.top_losses_figure(top, images, ["cat", "dog"])
  assert sum(1 for ax in fig.axes if ax.images) == 5
  titles = [ax.get_title() for ax in fig.axes if ax.images]
  assert titles[0] == "true cat (0.10)\npred dog (0.90)"
  top[0]["path"], top[1]["path"] = "/data/pets/cat/1.jpg", "/data/" + "x" * 40 + "/dog/22.jpg"
  titles = [ax.get_title() for ax in evaluate.top_losses_figure(top, images, ["cat", "dog"]).axes
            if ax.images]
  assert titles[0] == "/data/pets/cat/1.jpg\ntrue cat (0.10)\npred dog (0.90)"
  assert titles[1].splitlines()[0] == "..." + "x" * 16 + "/dog/22.jpg"  # the end, 30 chars


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ema"))
  train.train_and_evaluate(tiny_config(ema_decay=0.5, label_smoothing=0.1, mixup_alpha=0.2,
                                       cutmix_alpha=1.0, augment="inception_crop",
                                       learning_rate=1e-2), workdir)
  return workdir


def test_training_with_ema_reports_raw_and_ema_accuracy(ema_run):
  evals = [r for r in metrics.read_metrics(ema_run) if "val_accuracy" in r]
  assert evals and all("ema_val_accuracy" in r and "ema_val_loss" in r for r in evals)
  variables, _ = checkpoint.load_trained_variables(ema_run)
  assert runs.has_ema(variables)
  raw = jax.tree_util.tree_leaves(variables["params"])
  ema = jax.tree_util.tree_leaves(variables["ema_params"])
  assert any(not np.array_equal(a, b) for a, b in zip(raw, ema))
  served = runs.serving_variables(variables)
  assert served["params"] is variables["ema_params"] and "ema_params" not in served
  assert runs.serving_variables(variables, use_ema=False)["params"] is variables["params"]


def test_eval_tta_and_top_losses_from_the_cli(ema_run, capsys):
  result = evaluate.main(ema_run, as_json=True, tta=True, top_losses=4)
  printed = json.loads(capsys.readouterr().out)
  assert printed["tta"] is True and "ema_val_accuracy" in printed
  wrong = printed["val_count"] - int(round(printed["ema_val_accuracy"] * printed["val_count"]))
  assert len(result["top_losses"]) == min(4, wrong) > 0
  path = os.path.join(ema_run, evaluate.TOP_LOSSES_FILE)
  assert result["top_losses_png"] == path
  with Image.open(path) as png:
    assert png.format == "PNG"
  with pytest.raises(SystemExit) as e:
    main.main(["eval", "--workdir", ema_run, "--tta", "--top_losses", "2"])
  assert e.value.code == 0
  assert f"top losses plot: {path}" in capsys.readouterr().err


def test_top_losses_name_the_files(tmp_path, capsys):
  """`transfer eval --top_losses` on a folder run prints each wrong image's path, true and
  predicted class: the way to find a mislabeled image. Validation images of both classes are
  alike (mid-grey noise), so some are wrong."""
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    for name, low in [("bright", 150), ("dark", 0)]:
      os.makedirs(tmp_path / "data" / split / name)
      for i in range(8 if split == "train" else 4):
        low_i = low if split == "train" else 60
        pixels = rng.integers(low_i, low_i + 100, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "data" / split / name / f"{name}{i}.png")
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(dataset=f"folder:{tmp_path / 'data'}", num_steps=2,
                                       augment="none"), workdir)
  with pytest.raises(SystemExit) as e:
    main.main(["eval", "--workdir", workdir, "--top_losses", "8"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  listed = out.split("most confidently wrong):\n")[1].strip().splitlines()
  assert listed, out
  for line in listed:
    found = re.fullmatch(r"(\S+)  true (\w+)  predicted (\w+) \(p=([\d.]+)\)", line)
    assert found, line
    path, true, pred, p = found.groups()
    assert os.path.isfile(path) and path.startswith(str(tmp_path / "data" / "val"))
    assert os.path.basename(os.path.dirname(path)) == true != pred and float(p) >= 0.5


def test_predict_serves_the_ema_params(ema_run, tmp_path):
  variables, meta = checkpoint.load_trained_variables(ema_run)
  image = np.random.default_rng(0).integers(0, 256, (40, 40, 3)).astype(np.uint8)
  Image.fromarray(image).save(tmp_path / "x.png")
  got = predict.predict_trained([str(tmp_path / "x.png")], ema_run, top=2)[0].top
  run = meta["run"]
  net = runs.model_from_meta(run, dtype="float32")
  from transfer import weights as weights_lib
  from transfer.data import images as image_ops
  stored = image_ops.stored_size(run["image_size"], float(run["eval_crop"]))
  x = predict.load_images([str(tmp_path / "x.png")], stored)
  x = weights_lib.preprocess(image_ops.center_crop(x, run["image_size"]), run["preprocessing"])
  for use_ema in (True, False):
    probs = predict.make_forward(net)(runs.serving_variables(variables, use_ema), x)[0]
    match = all(p["prob"] == pytest.approx(float(probs[p["class"]]), abs=1e-6) for p in got)
    assert match == use_ema
