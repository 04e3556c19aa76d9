"""Everything the CNNs have, on a Vision Transformer, through the user's path: the frozen
backbone's cached features, stages (the head, then the top block), lr_find, EMA, TTA in eval,
export to every format (each artifact gives `transfer predict`'s probabilities), the same
parameters on any device count (shard_map and pmap) and bfloat16 training. vit_b16_tiny (2
blocks of width 32) on 32 px synthetic data, and DINOv2's linear probe (tok_gap features, with
and without registers) at 28 px."""

import contextlib
import io
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from transfer import assembly, checkpoint, export, main, metrics, predict, train
from helpers import (assert_trained_alike, cli_probabilities, final_params, flatten,
                     tiny_config)

pytestmark = pytest.mark.usefixtures("home")

MODEL = "vit_b16_tiny"
HEAD = ["^head/"]
TOP_BLOCK = ["^head/", "^block1_"]  # vit_b16_tiny's blocks are block0 and block1
BATCH, TOKENS = 8, 1 + (32 // 16) ** 2  # 8 images of 4 patches and the class token
# DINOv2's linear probe (tok_gap) at 28 px, 2 x 2 patches of 14, without and with registers.
PROBE_MODELS = ["dinov2_s14_tiny", "dinov2_s14_reg4_tiny"]
ATOL = 1e-4  # float32: an artifact against `transfer predict --json` (as tests/test_export.py)


def vit_config(**overrides):
  """vit_b16_tiny with the linear head (`gap` on the class token) on 3-class synthetic data."""
  config = tiny_config(**{"model": MODEL, "head": "gap", "augment": "none", **overrides})
  config.synthetic.num_classes = 3
  return config


def _train(config, workdir, devices=None) -> str:
  """Trains `config` in `workdir`; returns what the run printed on stderr."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    train.train_and_evaluate(config, str(workdir), devices)
  return err.getvalue()


def _params(workdir):
  return final_params(workdir)[0]


def _fresh(config):
  """The params `config`'s run starts from (its random initialisation), on the host."""
  return jax.device_get(assembly.build(config).initial_variables()[0]["params"])


def _moved(params, before):
  """The param paths ("block1_mlp_fc1/kernel") whose values differ between two flat trees."""
  return {p for p in before if not np.array_equal(params[p], before[p])}


def _assert_params_close(got, want, atol=1e-6):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def head_runs(tmp_path_factory):
  """Head-only runs of 3 steps on the frozen ViT, with and without cached features, and the
  two-stage run (that head, then the top block for 3 steps) in one workdir and in two."""
  root = tmp_path_factory.mktemp("vit_head")
  out = {name: str(root / name) for name in ("cached", "plain", "second", "staged")}
  logs = {"cached": _train(vit_config(cache_features=True, num_steps=3, trainable=HEAD),
                           out["cached"]),
          "plain": _train(vit_config(num_steps=3, trainable=HEAD), out["plain"])}
  second = vit_config(num_steps=3, init_from=out["cached"], learning_rate=3e-4)
  second.trainable = TOP_BLOCK
  _train(second, out["second"])
  staged = vit_config(cache_features=True, keep_checkpoints=10)
  staged.stages = [dict(name="head", steps=3, trainable=HEAD),
                   dict(name="top", steps=3, trainable=TOP_BLOCK, learning_rate=3e-4)]
  logs["staged"] = _train(staged, out["staged"])
  return out, logs


def test_cached_features_train_the_head_as_the_full_forward_does(head_runs):
  runs, logs = head_runs
  assert "cache_features: running the frozen backbone once" in logs["cached"]
  assert "cache_features" not in logs["plain"]
  cached, plain = _params(runs["cached"]), _params(runs["plain"])
  _assert_params_close(cached, plain)
  fresh = flatten(_fresh(vit_config()))
  for got in (flatten(cached), flatten(plain)):  # the transformer frozen, bit for bit
    assert _moved(got, fresh) == {p for p in fresh if p.startswith("head/")}


@pytest.fixture(scope="module")
def probe_runs(tmp_path_factory):
  """DINOv2's linear probe: one Dense layer on the frozen backbone's class token and mean patch
  token (`token_pool="tok_gap"`), 3 steps at 28 px, with and without cached features."""
  root = tmp_path_factory.mktemp("probe")
  out, logs = {}, {}
  for model in PROBE_MODELS:
    for cache in (True, False):
      out[model, cache] = str(root / f"{model}_{cache}")
      logs[model, cache] = _train(vit_config(
          model=model, image_size=28, token_pool="tok_gap", cache_features=cache, num_steps=3,
          trainable=HEAD), out[model, cache])
  return out, logs


@pytest.mark.parametrize("model", PROBE_MODELS)
def test_a_linear_probe_on_cached_tok_gap_features(probe_runs, model):
  runs, logs = probe_runs
  assert "cache_features: running the frozen backbone once" in logs[model, True]
  cached, plain = _params(runs[model, True]), _params(runs[model, False])
  assert cached["head"]["logits"]["kernel"].shape == (2 * 32, 3)  # class token ++ patch mean
  _assert_params_close(cached, plain)
  meta = checkpoint.load_trained(runs[model, True])[1]
  assert meta["run"]["token_pool"] == "tok_gap"


def test_two_stages_equal_the_two_command_version(head_runs):
  runs, logs = head_runs
  staged, second, first = (_params(runs[k]) for k in ("staged", "second", "cached"))
  _assert_params_close(staged, second)
  # The top block trained in stage 2, the rest of the transformer stayed frozen.
  moved = _moved(flatten(staged), flatten(first))
  assert moved == {p for p in flatten(first) if p.startswith(("block1_", "head/"))}
  head, top = logs["staged"].split("stage 2/2 (top)")
  assert "cache_features: running the frozen backbone once" in head
  assert "cache_features not used: backbone layers are trainable" in top
  meta = checkpoint.load_trained(runs["staged"])[1]
  assert meta["stage"] == {"index": 1, "name": "top", "start": 3, "steps": 3}
  assert meta["run"]["trainable"] == TOP_BLOCK


# --- one trained run with an EMA: eval, TTA, predict, export -----------------------------------


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
  """6 steps of the top block and head with a parameter EMA (decay 0.5)."""
  workdir = str(tmp_path_factory.mktemp("vit_ema") / "run")
  _train(vit_config(num_steps=6, trainable=TOP_BLOCK, ema_decay=0.5, learning_rate=1e-2),
         workdir)
  return workdir


def _pngs(folder, size):
  """Four `size` x `size` PNGs of noise at four brightnesses, and their pixels: at the run's
  input size, `transfer predict` classifies the pixels as they are (no resize, no crop)."""
  rng = np.random.default_rng(5)
  paths, pixels = [], []
  for i in range(4):
    x = np.clip(rng.normal(128 + 40 * (i - 1.5), 50, (size, size, 3)), 0, 255).astype(np.uint8)
    paths.append(str(folder / f"{i}.png"))
    Image.fromarray(x).save(paths[-1])
    pixels.append(x)
  return paths, np.stack(pixels)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  return _pngs(tmp_path_factory.mktemp("vit_images"), 32)


@pytest.fixture(scope="module")
def served(ema_run, probe_runs, images, tmp_path_factory):
  """The runs exported below, each with images at its input size: the ViT with an EMA, and
  the DINOv2 linear probe with registers and tok_gap features."""
  return {"vit": (ema_run, images),
          "dinov2_probe": (probe_runs[0]["dinov2_s14_reg4_tiny", True],
                           _pngs(tmp_path_factory.mktemp("probe_images"), 28))}


def _predict(workdir, paths, capsys):
  return cli_probabilities(["predict", "--workdir", workdir, *paths], capsys)


def test_predict_serves_the_ema_and_eval_reports_both(ema_run, images, capsys):
  paths, _ = images
  got = _predict(ema_run, paths, capsys)
  run = assembly.Run.from_checkpoint(ema_run)
  assert run.keeps_ema
  from transfer import ema, weights
  x = weights.preprocess(np.stack([np.asarray(Image.open(p)) for p in paths]),
                         run.metadata["preprocessing"])
  forward = predict.make_forward(run.model)
  served = forward(ema.serving_variables(run.variables), x)
  raw = forward(ema.serving_variables(run.variables, use_ema=False), x)
  np.testing.assert_allclose(got, served, rtol=0, atol=1e-6)
  assert np.abs(raw - served).max() > 1e-3  # the EMA is not the raw params
  assert main.run(["eval", "--workdir", ema_run, "--json"]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert {"val_loss", "ema_val_loss", "val_accuracy", "ema_val_accuracy"} <= set(printed)
  assert printed["val_loss"] != printed["ema_val_loss"]


def test_eval_tta_averages_the_image_and_its_mirror(ema_run, capsys):
  assert main.run(["eval", "--workdir", ema_run, "--tta", "--json"]) == 0
  tta = json.loads(capsys.readouterr().out)
  assert main.run(["eval", "--workdir", ema_run, "--json"]) == 0
  plain = json.loads(capsys.readouterr().out)
  assert tta["tta"] and not plain["tta"] and tta["val_count"] == plain["val_count"] == 20
  # The same numbers from the run's own forward pass on the validation images and mirrors.
  from transfer import ema
  run = assembly.Run.from_checkpoint(ema_run)
  forward = predict.make_forward(run.model)
  for key, variables in [("", ema.serving_variables(run.variables, use_ema=False)),
                         ("ema_", ema.serving_variables(run.variables))]:
    losses, mirrored_losses = [], []
    for batch in run.validation_data().eval_batches("val", 8):
      x, keep = batch["image"], batch["mask"]
      probs, mirrored = forward(variables, x), forward(variables, x[:, :, ::-1])
      rows = np.arange(len(x))
      true = lambda p: np.asarray(p, np.float64)[rows, batch["label"]][keep]
      losses += list(-np.log(true(probs)))
      mirrored_losses += list(-np.log((true(probs) + true(mirrored)) / 2))
    assert plain[f"{key}val_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert tta[f"{key}val_loss"] == pytest.approx(np.mean(mirrored_losses), rel=1e-5)
    assert abs(tta[f"{key}val_loss"] - plain[f"{key}val_loss"]) > 1e-4  # the mirror mattered


@pytest.mark.parametrize("fmt", export.FORMATS)
@pytest.mark.parametrize("run", ["vit", "dinov2_probe"])
def test_every_export_format_gives_predicts_probabilities(served, run, fmt, tmp_path, capsys):
  workdir, (paths, pixels) = served[run]
  want = _predict(workdir, paths, capsys)
  assert np.ptp(want, axis=0).max() > 1e-3 and want.max() < 0.999  # informative
  out = str(tmp_path / {"stablehlo": "m.stablehlo", "onnx": "m.onnx"}.get(fmt, "saved_model"))
  assert main.run(["export", "--workdir", workdir, "--format", fmt, "--out", out]) == 0
  writer = export.get_writer(fmt)
  assert writer.read_metadata(out)["class_names"] == ["class_0", "class_1", "class_2"]
  for batch in (pixels[:3], pixels[3:]):  # one artifact, two batch sizes
    got = np.asarray(writer.run(out, batch))
    np.testing.assert_allclose(got, want[:3] if len(batch) == 3 else want[3:], rtol=0,
                               atol=ATOL)


def test_a_bfloat16_export_made_on_a_gpu_runs_anywhere(ema_run, images, tmp_path, monkeypatch,
                                                      capsys):
  """On an NVIDIA GPU a bfloat16 ViT attends with cuDNN's fused kernel (`attention="auto"`);
  its artifact must not, or it runs nowhere else. Here the choice is made as on a GPU, and the
  bfloat16 StableHLO still exports and runs on this CPU (without the fix: "cuDNN is not
  detected")."""
  from transfer import models
  from transfer.platform import attention
  monkeypatch.setattr(models, "resolve_attention", lambda choice, dtype, platform=None:
                      attention.resolve_attention(choice, dtype, "gpu"))
  assert models.get(MODEL, head="gap", num_classes=3, dtype="bfloat16").attention == "cudnn"
  paths, pixels = images
  want = _predict(ema_run, paths, capsys)
  out = str(tmp_path / "m.stablehlo")
  assert main.run(["export", "--workdir", ema_run, "--format", "stablehlo", "--dtype",
                   "bfloat16", "--out", out]) == 0
  got = np.asarray(export.get_writer("stablehlo").run(out, pixels))
  np.testing.assert_allclose(got, want, rtol=0, atol=3e-2)  # bfloat16 (tests/test_export.py)


# --- lr_find, and the same parameters on any device count ----------------------------------------


def test_lr_find_sweeps_the_transformer(tmp_path, capsys):
  workdir = str(tmp_path / "lr")
  argv = ["lr_find", "--workdir", workdir, "--steps", "30", "--start_lr", "1e-5", "--end_lr",
          "100", "--config", "default", f"--config.model={MODEL}", "--config.weights=none",
          "--config.head=gap", "--config.image_size=32", "--config.batch_size=8",
          "--config.synthetic.train_size=48", "--config.synthetic.val_size=16",
          f"--config.trainable={TOP_BLOCK}"]
  assert main.run(argv) == 0
  result = json.load(open(os.path.join(workdir, "lr_find.json")))
  assert result["trainable"] == TOP_BLOCK
  assert result["suggestion"] in result["rates"] and np.all(np.isfinite(result["losses"]))
  assert max(result["smoothed"]) > 2 * min(result["smoothed"])  # the high rates blew it up
  out = capsys.readouterr().out
  assert f"suggested learning_rate: {result['suggestion']:.3g}" in out
  assert f"--config.model={MODEL}" in out.strip().splitlines()[-1]


def _sgd_config(**overrides):
  """The whole transformer trains, with SGD: its update is linear in the gradient, so two
  layouts differ only by the order of the gradient's sums. (Three classes: with one sigmoid
  logit, the head's single bias is a sum of terms that nearly cancel, and its round-off
  exceeded `assert_trained_alike`'s bound, which scales with the final value: 1.1x.)"""
  return vit_config(num_steps=3, trainable=["."], optimizer="sgd", learning_rate=0.1,
                    **overrides)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("vit_devices") / "one"
  _train(_sgd_config(), workdir, jax.devices()[:1])
  return _params(workdir)


@pytest.mark.parametrize("devices,mode", [(2, "shard_map"), (4, "shard_map"), (2, "pmap")])
def test_same_parameters_on_any_device_count(one_device, devices, mode, tmp_path):
  _train(_sgd_config(parallel=mode), tmp_path / "run", jax.devices()[:devices])
  got = _params(tmp_path / "run")
  # The most terms in one gradient element: a block's weights, over 8 examples x 5 tokens.
  assert_trained_alike(got, one_device, terms=BATCH * TOKENS, steps=3)
  fresh = flatten(_fresh(_sgd_config()))  # all of it trained (else this proves little)
  assert _moved(flatten(got), fresh) == set(fresh)


def test_bfloat16_training_tracks_float32(tmp_path):
  """Mixed precision: the whole ViT computes in bfloat16 (attention's softmax in float32),
  params stay float32, and the loss follows the float32 run's (measured within 2%)."""
  curves = {}
  for dtype in ("float32", "bfloat16"):
    workdir = tmp_path / dtype
    _train(vit_config(num_steps=6, trainable=["."], dtype=dtype, log_every_steps=1), workdir)
    params, meta = final_params(workdir)
    assert meta["run"]["dtype"] == dtype
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {np.dtype("float32")}
    curves[dtype] = [r["train_loss"] for r in metrics.read_metrics(str(workdir))
                     if "train_loss" in r]
  assert len(curves["float32"]) == 6
  np.testing.assert_allclose(curves["bfloat16"], curves["float32"], rtol=0.05)
  assert curves["bfloat16"] != curves["float32"]  # it did compute in bfloat16
