"""`transfer predict` and `transfer eval` of a trained run give the numbers of its saved params:
each checked against a forward pass written here, from the checkpoint's arrays, the model built
from the recorded metadata and the preprocessing done by hand (`weights=none`: [-1, 1])."""

import json

import numpy as np
import pytest
from PIL import Image

from helpers import cli_probabilities
from transfer import assembly, checkpoint, main, models

SIZE = 32
FLAGS = ["--config", "default", "--config.model=vgg16_tiny", "--config.weights=none",
         f"--config.image_size={SIZE}", "--config.batch_size=8", "--config.head=gap",
         "--config.synthetic.num_classes=3", "--config.synthetic.train_size=24",
         "--config.synthetic.val_size=10", f"--config.synthetic.base_size={SIZE}",
         "--config.num_steps=4", "--config.trainable=['^head/', '^block5_']",
         "--config.learning_rate=0.01", "--config.augment=none"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  assert main.run(["train", "--workdir", workdir, *FLAGS]) == 0
  variables, meta = checkpoint.load_trained_variables(workdir, "latest")
  run = meta["run"]
  net = models.get(run["model"], head=run["head"], num_classes=run["outputs"],
                   head_hidden=run["head_hidden"], head_dropout=run["head_dropout"],
                   dtype="float32", conv="xla")
  params = {"params": variables["params"]}
  logits = lambda x: np.asarray(net.apply(params, np.asarray(x, np.float32)), np.float64)
  return workdir, meta, logits


def softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def test_predict_gives_the_saved_params_probabilities(trained, tmp_path, capsys):
  workdir, meta, logits = trained
  assert meta["run"]["preprocessing"] == "unit" and meta["run"]["eval_crop"] == 1.0
  pixels = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), np.uint8)
  paths = []
  for i, image in enumerate(pixels):  # at the input size: no resize, the pixels as they are
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(image).save(paths[-1])
  got = cli_probabilities(["predict", "--workdir", workdir, *paths], capsys)
  want = softmax(logits(pixels / 127.5 - 1.0))
  assert np.abs(want - 1 / 3).max() > 1e-3  # the params say something: the check can fail
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_eval_gives_the_saved_params_loss_and_accuracy(trained, capsys):
  workdir, _, logits = trained
  capsys.readouterr()
  main.run(["eval", "--workdir", workdir, "--json"])
  result = json.loads(capsys.readouterr().out)
  # The validation images as the pipeline decodes them (uint8, before preprocessing).
  data = assembly.Run.from_checkpoint(workdir).validation_data()
  rows = np.arange(data.num_val)
  pixels = data.eval_images("val", rows)
  labels = np.concatenate([b["label"][b["mask"]] for b in data.eval_batches("val")])
  z = logits(pixels / 127.5 - 1.0)
  p = softmax(z)
  loss = -np.log(p[np.arange(len(labels)), labels]).mean()
  accuracy = (z.argmax(-1) == labels).mean()
  confusion = np.zeros((3, 3), int)
  np.add.at(confusion, (labels, z.argmax(-1)), 1)
  assert result["val_count"] == len(labels) == 10
  assert result["val_loss"] == pytest.approx(loss, rel=1e-5)
  assert result["val_accuracy"] == pytest.approx(accuracy)
  np.testing.assert_array_equal(result["confusion"], confusion)
