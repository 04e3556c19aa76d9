"""The training loop end to end: outputs, frozen weights, the blog config, NaN stop, eval, predict."""

import glob
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from transfer import checkpoint, configs, main, metrics, models, runs, train
from transfer.weights import export
from helpers import assert_trained_alike, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  summary = train.train_and_evaluate(tiny_config(), workdir)
  return workdir, summary


def test_loop_writes_metrics_config_curves_and_checkpoints(trained):
  workdir, summary = trained
  records = metrics.read_metrics(workdir)
  train_steps = [r["step"] for r in records if "train_loss" in r]
  eval_steps = [r["step"] for r in records if "val_accuracy" in r]
  assert train_steps == [2, 4, 6] and eval_steps == [3, 6]
  for r in records:
    if "train_loss" in r:
      assert set(r) == {"step", "epoch", "train_loss", "train_accuracy", "images_per_sec",
                        "learning_rate"}
      assert r["learning_rate"] == pytest.approx(1e-3)
  assert records[-1]["val_count"] == 20  # every validation example once (20 = 2 batches + 4)
  assert summary["step"] == 6 and summary["best_val_accuracy"] == max(
      r["val_accuracy"] for r in records if "val_accuracy" in r)
  assert json.load(open(os.path.join(workdir, "config.json")))["model"] == "vgg16_tiny"
  assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000
  assert checkpoint.Checkpointer(workdir).steps() == [3, 6]
  if _has("tensorboardX"):  # a test extra; optional for users
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))


def test_images_per_sec_counts_train_steps_only(tmp_path, monkeypatch):
  """Compiling the first step and evaluating take 1000 s each on a shifted clock: a rate that
  counted either would be at most 16 images / 1000 s."""
  import time
  from transfer import assembly, eval_loop
  shift, clock = [0.0], time.perf_counter
  monkeypatch.setattr(time, "perf_counter", lambda: clock() + shift[0])
  evaluate = eval_loop.evaluate_state

  def slow_eval(*args, **kwargs):
    shift[0] += 1000.0
    return evaluate(*args, **kwargs)

  make_step = assembly.Run.train_step

  def compiling_step(self, *args, **kwargs):
    step, calls = make_step(self, *args, **kwargs), []

    def first_compiles(*a):
      if not calls:
        shift[0] += 1000.0
      calls.append(1)
      return step(*a)
    return first_compiles

  monkeypatch.setattr(eval_loop, "evaluate_state", slow_eval)
  monkeypatch.setattr(assembly.Run, "train_step", compiling_step)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(log_every_steps=2, eval_every_steps=2), workdir)
  rates = [r["images_per_sec"] for r in metrics.read_metrics(workdir) if "train_loss" in r]
  assert len(rates) == 3 and shift[0] == 4000.0
  assert all(rate > 1.0 for rate in rates), rates


def _has(module: str) -> bool:
  import importlib.util
  return importlib.util.find_spec(module) is not None


def test_checkpoint_metadata_rebuilds_the_model(trained):
  workdir, _ = trained
  params, meta = checkpoint.load_trained(workdir)
  run = meta["run"]
  assert (run["model"], run["head"], run["outputs"]) == ("vgg16_tiny", "flatten_dense", 1)
  assert run["class_names"] == ["class_0", "class_1"] and run["preprocessing"] == "unit"
  assert meta["data_position"] == {"epoch": 1, "index": 0}  # 6 steps of 8 over 48 examples
  model = runs.model_from_meta(run)
  out = model.apply({"params": params}, np.zeros((2, 32, 32, 3), np.float32))
  assert out.shape == (2, 1)


def test_frozen_backbone_is_bit_identical_to_the_weight_file(tmp_path):
  """Conv layers from a Keras-layout notop file stay exactly as loaded; the head trains."""
  spec = models.spec("vgg16_tiny")
  model = models.get("vgg16_tiny", include_top=False)
  rng = np.random.default_rng(0)
  source = {name: {k: rng.normal(0, 0.2, v.shape).astype(np.float32) for k, v in layer.items()}
            for name, layer in jax.device_get(models.init_params(model, 32)).items()}
  path = str(tmp_path / "tiny_notop.h5")
  export.write_keras_h5(path, export.keras_layers(source, spec))
  train.train_and_evaluate(tiny_config(weights=path), str(tmp_path / "run"))
  params, meta = checkpoint.load_trained(str(tmp_path / "run"))
  assert meta["run"]["preprocessing"] == "caffe"
  for name in spec.conv_layers:
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(np.asarray(params[name][leaf]), source[name][leaf])
  fresh = models.init_params(models.get("vgg16_tiny", head="flatten_dense", num_classes=1), 32, 0)
  assert not np.allclose(np.asarray(params["head"]["logits"]["kernel"]),
                         np.asarray(fresh["head"]["logits"]["kernel"]))


def test_cached_features_match_the_streaming_path(tmp_path):
  """Same data, no augmentation: training on cached backbone features gives the same run.

  The two paths are different programs (the backbone jitted apart from the head), so the head's
  params agree up to round-off; SGD keeps that linear (see test_train_step)."""
  config = tiny_config(augment="none", head_dropout=0.0, optimizer="sgd", learning_rate=0.05)
  streamed = train.train_and_evaluate(config, str(tmp_path / "stream"))
  config.cache_features = True
  cached = train.train_and_evaluate(config, str(tmp_path / "cache"))
  a, _ = checkpoint.load_trained(str(tmp_path / "stream"))
  b, _ = checkpoint.load_trained(str(tmp_path / "cache"))
  # Only the head trains: each gradient element sums one term per example of the batch of 8.
  assert_trained_alike(b["head"], a["head"], terms=config.batch_size, steps=config.num_steps)
  assert cached["final"]["val_accuracy"] == pytest.approx(streamed["final"]["val_accuracy"])


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
  workdir = str(tmp_path / "nan")
  argv = ["train", "--workdir", workdir, "--config", "default", "--config.model=vgg16_tiny",
          "--config.weights=none", "--config.image_size=32", "--config.batch_size=8",
          "--config.synthetic.train_size=48", "--config.synthetic.val_size=8",
          "--config.num_steps=6", "--config.checkpoint_every_steps=1",
          "--config.eval_every_steps=100", "--config.log_every_steps=1",
          "--config.optimizer=sgd", "--config.learning_rate=1e36"]
  with pytest.raises(SystemExit) as exit_info:
    main.main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("transfer: error: loss became NaN/inf at step 2;")
  assert checkpoint.Checkpointer(workdir).steps() == [1]


TINY_CLI = ["--config", "default", "--config.model=vgg16_tiny", "--config.weights=none",
            "--config.image_size=32", "--config.batch_size=8", "--config.synthetic.train_size=16",
            "--config.synthetic.val_size=8", "--config.augment=none"]


def _cli(argv, capsys) -> tuple[int, str]:
  """`transfer ARGV` in this process: (exit status, stderr)."""
  with pytest.raises(SystemExit) as exit_info:
    main.main(argv)
  return exit_info.value.code, capsys.readouterr().err


def test_the_finished_staged_run_hint_works_when_followed(tmp_path, capsys):
  """A finished staged run, rerun, says how to train further; doing what it says trains on
  (raising num_steps, the hint of a one-stage run, is refused for a staged run)."""
  workdir, stages = str(tmp_path / "staged"), ("--config.stages=[{'steps': 2, 'trainable': "
                                               "['^head/']}, {'steps': 2}]")
  assert _cli(["train", "--workdir", workdir, *TINY_CLI, stages], capsys)[0] == 0
  status, err = _cli(["train", "--workdir", workdir, *TINY_CLI, stages], capsys)
  assert status == 0 and "already finished: step 4 of 4" in err
  hint = re.search(r"to train further, start a new run from its params: "
                   r"--config\.init_from=(\S+) --workdir NEW_DIR with the stages to train next "
                   r"as --config\.stages", err)
  assert hint and hint.group(1) == workdir, err
  status, err = _cli(["train", "--workdir", workdir, *TINY_CLI, stages, "--config.num_steps=9"],
                     capsys)
  assert status == 2 and "holds a different run" in err
  further = str(tmp_path / "further")
  status, err = _cli(["train", f"--config.init_from={hint.group(1)}", "--workdir", further,
                      *TINY_CLI, "--config.stages=[{'steps': 3, 'trainable': ['^head/']}]"],
                     capsys)
  assert status == 0, err[-2000:]
  params, meta = checkpoint.load_trained(further)
  assert meta["step"] == 3
  before, _ = checkpoint.load_trained(workdir)
  np.testing.assert_array_equal(params["block1_conv1"]["kernel"],
                                before["block1_conv1"]["kernel"])  # from the staged run's params


_QUIET_LIBRARY = """
import logging, sys
sys.path.insert(0, "tests")
from helpers import tiny_config
from transfer import train
config = tiny_config(num_steps=4, log_every_steps=1)
config.stages = [dict(steps=2, trainable=["^head/"]), dict(steps=2)]
train.train_and_evaluate(config, sys.argv[1])
print(len(logging.root.handlers), logging.getLevelName(logging.root.level))
"""


def test_training_leaves_the_root_logger_alone_and_prints_above_the_bar(tmp_path):
  """From Python, in a fresh interpreter: no handler on the root logger afterwards (so a
  program's own `logging.basicConfig` still works), and the data, model and stage lines are
  whole lines above the progress bar, never written into it."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
  done = subprocess.run([sys.executable, "-c", _QUIET_LIBRARY, str(tmp_path / "run")], cwd=root,
                        env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split() == ["0", "WARNING"]  # and nothing else on stdout
  pieces = re.split(r"[\r\n]", done.stderr)
  for start in ("data: synthetic", "vgg16_tiny + ", "stage 1/2", "stage 2/2", "params: ",
                "step 2: val_loss", "step 4: val_loss"):
    lines = [p for p in pieces if start in p]
    assert lines and all(p.startswith(start) for p in lines), (start, lines)


def test_blog_config_builds_with_a_generated_weight_file(tmp_path, mock_tfds):
  """cats_vs_dogs as shipped (VGG16 at 224, Keras notop weights, a head stage on cached features,
  then block5), with the weights replaced by a generated file in the official layout, TFDS mocked
  and each stage cut to one step."""
  model = models.get("vgg16", include_top=False)
  params = jax.device_get(models.init_params(model, 224))
  path = str(tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")
  export.write_keras_h5(path, export.keras_layers(params, models.spec("vgg16")))
  config = configs.load("cats_vs_dogs")
  config.weights, config.data_dir = path, mock_tfds
  config.batch_size, config.log_every_steps = 4, 1
  config.stages = [{**{k: v for k, v in s.items() if k != "epochs"}, "steps": 1}
                   for s in config.stages]
  summary = train.train_and_evaluate(config, str(tmp_path / "blog"))
  assert summary["step"] == 2 and summary["final"]["val_count"] == 10
  _, meta = checkpoint.load_trained(str(tmp_path / "blog"))
  assert meta["run"]["class_names"] == ["cat", "dog"] and meta["run"]["outputs"] == 1
  assert meta["run"]["preprocessing"] == "caffe" and meta["config"]["optimizer"] == "rmsprop"
  assert meta["stage"]["name"] == "block5" and meta["run"]["trainable"] == ["^head/", "^block5_"]


def test_eval_and_predict_cli_on_a_trained_run(trained, tmp_path, capsys):
  workdir, _ = trained
  main.run(["eval", "--workdir", workdir, "--json"])
  result = json.loads(capsys.readouterr().out)
  assert result["val_count"] == 20 and np.sum(result["confusion"]) == 20
  assert result["class_names"] == ["class_0", "class_1"]
  assert os.path.exists(os.path.join(workdir, "confusion.png"))

  image = str(tmp_path / "x.png")
  Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(image)
  main.run(["predict", "--workdir", workdir, "--json", image])
  line = json.loads(capsys.readouterr().out)
  assert line["image"] == image and {p["label"] for p in line["top"]} == {"class_0", "class_1"}
  assert sum(p["prob"] for p in line["top"]) == pytest.approx(1.0, abs=1e-5)


def test_unknown_config_key_is_one_line(capsys):
  with pytest.raises(SystemExit):
    main.main(["train", "--config.modle=vgg16"])
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "unknown config key 'modle'" in err and "model" in err
