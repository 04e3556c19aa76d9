"""`init_from` continues a run on the input its params learned: the preprocessing, eval geometry
and variant of the run they come from, whatever the new config's `weights` would imply."""

import os

import numpy as np
import pytest

from transfer import assembly, checkpoint, configs, ema, main
from transfer.errors import UserError
from helpers import one_line_error, tiny_keras_file

TINY = ["--config.model=resnet50_tiny", "--config.dataset=synthetic", "--config.image_size=32",
        "--config.batch_size=8", "--config.synthetic.train_size=16",
        "--config.synthetic.val_size=8", "--config.synthetic.base_size=40",
        "--config.num_steps=2", "--config.cache_features=false", "--config.head=gap"]


@pytest.fixture(scope="module")
def keras_run(tmp_path_factory):
  """A resnet50_tiny run trained two steps from a Keras-format file (caffe input, v1)."""
  root = tmp_path_factory.mktemp("keras_run")
  path, _ = tiny_keras_file(root / "tiny_notop.h5")
  workdir = str(root / "first")
  assert main.run(["train", "--workdir", workdir, "--config", "default",
                   f"--config.weights={path}", "--config.trainable=['^head/', '^conv5_']",
                   *TINY]) == 0
  return workdir


def _first_eval_logits(run):
  """A trained or assembled run's logits on the first validation batch, with that batch."""
  data = run.validation_data() if run.data is None else run.data
  batch = next(iter(data.eval_batches("val")))
  return batch, run.model.apply(ema.serving_variables(run.variables), batch["image"])


def test_init_from_a_keras_run_keeps_its_caffe_input_under_a_torch_config(keras_run, tmp_path,
                                                                         capsys):
  """resnet50_cats_vs_dogs defaults to torchvision's weights (mean/std input, v1.5); continued
  from a run on a Keras file it must keep caffe input and the v1 form."""
  second = str(tmp_path / "second")
  capsys.readouterr()
  # eval_crop is the config's own choice (resnet50_cats_vs_dogs crops 224/232): set to the first
  # run's so the two validation batches can be compared pixel for pixel.
  assert main.run(["train", "--workdir", second, "--config", "resnet50_cats_vs_dogs",
                   f"--config.init_from={keras_run}", "--config.eval_crop=1.0", *TINY]) == 0
  printed = "".join(capsys.readouterr())
  assert f"preprocessing caffe kept from {keras_run}" in printed
  assert "weights=torchvision:resnet50 would use torch" in printed

  _, meta = checkpoint.load_trained_variables(second, "latest")
  recorded = meta["run"]
  assert recorded["preprocessing"] == "caffe" and recorded["variant"] == "keras"
  assert recorded["source"]["preprocess"] == "caffe"
  assert recorded["source"]["framework"] == "keras" and recorded["source"]["resize_size"] is None

  # The numbers: the continued run, assembled from its own config, starts from the first run's
  # final params and sees the same validation batch, so its logits are the first run's eval's.
  first = assembly.Run.from_checkpoint(keras_run)
  want_batch, want = _first_eval_logits(first)
  config = configs.load(os.path.join(second, "config.json"))
  run = assembly.build(configs.validate(config))
  variables, note = run.initial_variables()
  assert "kept from" in note
  run.variables = variables
  got_batch, got = _first_eval_logits(run)
  np.testing.assert_array_equal(got_batch["image"], want_batch["image"])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_a_variant_other_than_the_init_from_runs_is_refused(keras_run, tmp_path):
  with pytest.raises(UserError, match="trained the keras variant") as e:
    main.run(["train", "--workdir", str(tmp_path / "w"), "--config", "default",
              f"--config.init_from={keras_run}", "--config.variant=torchvision", *TINY])
  one_line_error(e)
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_the_same_preprocessing_adds_no_note(keras_run, tmp_path, capsys):
  weights = configs.load(os.path.join(keras_run, "config.json")).weights
  second = str(tmp_path / "same")
  assert main.run(["train", "--workdir", second, "--config", "default",
                   f"--config.weights={weights}", f"--config.init_from={keras_run}",
                   *TINY]) == 0
  assert "kept from" not in "".join(capsys.readouterr())
