"""`transfer bench`: the JSON report, every mode, FLOP counts, and no TensorFlow import.

Tiny model, 32px, a few steps: these tests check what is reported, never how fast anything is.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from transfer import bench, models, optim
from transfer import main as cli
from helpers import bench_config

TINY = ["--config.model=vgg16_tiny", "--config.image_size=32", "--config.batch_size=8",
        "--steps=2", "--warmup=1"]
NUMBERS = ("steps_per_sec", "images_per_sec", "step_ms_median", "step_ms_p90", "compile_s",
           "flops_per_step", "tflops_per_sec")


def _json_line(capsys) -> dict:
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert len(lines) == 1, lines
  return json.loads(lines[0])


def test_train_json_line_has_every_key_with_sane_types(capsys):
  result = bench.main(bench_config(), mode="train", steps=3, warmup=1, as_json=True)
  line = _json_line(capsys)
  assert line == json.loads(json.dumps(result))
  for key in NUMBERS:
    assert isinstance(line[key], float) and line[key] >= 0, key
  # One statistic per row: the rates are the median step's.
  assert line["steps_per_sec"] == pytest.approx(1e3 / line["step_ms_median"])
  assert line["images_per_sec"] == pytest.approx(8 * line["steps_per_sec"])
  assert line["step_ms_p90"] >= line["step_ms_median"] > 0
  assert line["flops_source"] == "xla"
  assert line["mfu"] is None and line["peak_tflops"] is None  # CPU: no known peak
  assert isinstance(line["train_forward_ratio"], float) and line["train_forward_ratio"] > 0
  assert line["device_kind"] and line["devices"] == jax.device_count() == 4
  assert line["dtype"] == "float32"  # "auto" on CPU
  assert {"jax", "jaxlib", "flax"} <= set(line)


def test_peak_gives_mfu(capsys):
  bench.main(bench_config(), mode="forward", steps=2, warmup=0, as_json=True, peak_tflops=2.0)
  line = _json_line(capsys)
  assert line["peak_tflops"] == 2.0 * 4
  assert line["mfu"] == pytest.approx(line["tflops_per_sec"] / 8.0)


@pytest.mark.parametrize("mode,parallel", [("train", "shard_map"), ("forward", "shard_map"),
                                           ("eval", "shard_map"), ("train", "pmap")])
def test_cli_modes(mode, parallel, capsys):
  assert cli.run(["bench", f"--mode={mode}", "--json", f"--config.parallel={parallel}"]
                 + TINY) == 0
  line = _json_line(capsys)
  assert line["mode"] == mode and line["parallel"] == parallel
  assert line["images_per_sec"] > 0 and line["flops_per_step"] > 0
  assert ("train_forward_ratio" in line) == (mode == "train")


def test_table_without_json(capsys):
  cli.run(["bench", "--mode=forward"] + TINY)
  out = capsys.readouterr().out
  assert "vgg16_tiny" in out and "images/s" in out and "compile s" in out
  assert not any(l.startswith("{") for l in out.splitlines())


def test_frozen_conv_train_step_costs_a_forward_pass(capsys):
  """XLA's own FLOP count: a frozen base adds only the head's backward; block5 adds more."""
  frozen = bench.main(bench_config(), mode="train", steps=1, warmup=0, as_json=True)
  block5 = bench.main(bench_config(trainable=["^head/", "^block5"]), mode="train", steps=1,
                      warmup=0, as_json=True)
  capsys.readouterr()
  assert frozen["flops_ratio_train_forward"] < block5["flops_ratio_train_forward"]
  assert frozen["flops_per_step_xla"] < block5["flops_per_step_xla"]


def test_analytic_flops_count_only_the_trainable_backward():
  model = models.get("vgg16", head="flatten_dense", num_classes=1)
  params = jax.eval_shape(lambda: models.init_params(model, 224))
  forward = bench.analytic_flops(params, "vgg16", 224, 16)
  assert forward == pytest.approx(2 * 16 * 15.47e9, rel=0.01)  # VGG16 convs: 15.47 GMACs/image

  def train(patterns):
    labels = optim.param_labels(params, patterns)
    return bench.analytic_flops(params, "vgg16", 224, 16, labels)

  head = 2 * 16 * (7 * 7 * 512 * 256 + 256)  # forward FLOPs of the head's two Dense layers
  assert train(["^head/"]) == pytest.approx(forward + 2 * head - 2 * 16 * 7 * 7 * 512 * 256)
  block5_conv = 2 * 16 * 14 * 14 * 9 * 512 * 512
  # conv1: weight grad only; conv2, conv3 and the head: input and weight grads.
  assert train(["^head/", "^block5"]) == pytest.approx(forward + 5 * block5_conv + 2 * head)



def test_analytic_flops_of_vit_count_tokens_and_attention():
  """ViT-B/16 at 224 (17.56 GMACs, timm's published 17.6): the patch embedding on 196 patches,
  every block's dense layers on 197 tokens and attention's two products of activations (scores
  and weighted values, 197 x 197 x 768 MACs each), the head once per image."""
  model = models.get("vit_b16", head="gap", num_classes=2)
  params = jax.eval_shape(lambda: models.init_params(model, 224))
  tokens, width = 197, 768
  dense = tokens * width * (3 * width + width + 2 * 4 * width)  # qkv, proj, fc1, fc2
  attention = 2 * tokens * tokens * width
  macs = 196 * 16 * 16 * 3 * width + 12 * (dense + attention) + width * 2
  forward = bench.analytic_flops(params, "vit_b16", 224, 2, model=model)
  assert forward == pytest.approx(2 * 2 * macs, rel=1e-9)

  def train(patterns):
    return bench.analytic_flops(params, "vit_b16", 224, 2, optim.param_labels(params, patterns),
                                model=model)

  head = 2 * 2 * width * 2
  assert train(["^head/"]) == pytest.approx(forward + head)  # the head's weight gradient only
  # block11 and the head: block11's qkv weight grad, its proj, fc1, fc2 and the head input and
  # weight grads, both operands of both attention products.
  block11 = (2 * 2 * tokens * width * (3 * width + 2 * (width + 8 * width))
             + 2 * 2 * 2 * attention + 2 * head)
  assert train(["^head/", "^block11_"]) == pytest.approx(forward + block11)


def test_cli_benchmarks_a_vit(capsys):
  """`transfer bench --config.model=vit_b16_tiny`: the frozen backbone's step counts the head's
  backward only, full fine-tuning the whole backward (XLA's count and the analytic one)."""
  vit = ["--config.model=vit_b16_tiny", "--config.head=gap", "--config.head_dropout=0",
         "--config.image_size=32", "--config.batch_size=8", "--steps=1", "--warmup=0", "--json"]
  assert cli.run(["bench"] + vit) == 0
  frozen = _json_line(capsys)
  assert cli.run(["bench", "--config.trainable=."] + vit) == 0
  full = _json_line(capsys)
  assert frozen["model"] == "vit_b16_tiny" and frozen["flops_source"] == "xla"
  assert frozen["flops_ratio_train_forward"] < 1.1 < 2 < full["flops_ratio_train_forward"]
  assert 2.5 < full["flops_per_step_analytic"] / frozen["flops_per_step_analytic"] < 3

def test_cached_feature_epoch(capsys):
  result = bench.main(bench_config(cache_features=True), mode="train", steps=2, warmup=1,
                      as_json=True)
  capsys.readouterr()
  assert result["epoch_images"] == 32
  for key in ("feature_pass_s", "head_epoch_s", "backbone_epoch_s", "head_epoch_speedup"):
    assert result[key] > 0, key


def test_input_mode_reports_both_sides(capsys):
  result = bench.main(bench_config(), mode="input", steps=2, warmup=0, as_json=True)
  capsys.readouterr()
  assert result["input_images_per_sec"] > 0 and result["images_per_sec"] > 0
  assert result["input_images_per_cpu_sec"] > 0
  # the side that feeds fewer images per second is the one named
  slower = "input" if result["input_images_per_sec"] < result["images_per_sec"] else "step"
  assert result["limited_by"] == slower
  by_workers = result["input_images_per_sec_by_workers"]
  counts = [int(n) for n in by_workers]
  assert counts[0] == 1 and max(counts) >= (os.cpu_count() or 1)
  assert result["input_images_per_sec"] == by_workers[str(result["input_workers"])]
  assert all(rate > 0 for rate in by_workers.values())


def test_input_worker_counts():
  from transfer.bench.cases import input_worker_counts
  assert input_worker_counts(2, 2) == [1, 2]
  assert input_worker_counts(12, 16) == [1, 2, 4, 8, 12, 16]
  assert input_worker_counts(1, 3) == [1, 3]


def test_dtype_auto_and_peak_table():
  assert models.resolve_dtype("auto", "cpu") == "float32"  # what bench's default resolves to
  assert models.resolve_dtype("auto", "gpu") == models.resolve_dtype("auto", "tpu") == "bfloat16"
  assert bench.peak_tflops("NVIDIA H200", "bfloat16") == 989.0
  assert bench.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
  assert bench.peak_tflops("NVIDIA L40S", "bfloat16") == 362.0  # not the L4 row
  assert bench.peak_tflops("TPU v5 lite", "float32") == 197.0
  assert bench.peak_tflops("cpu", "float32") is None


def test_unknown_mode_is_a_user_error():
  with pytest.raises(bench.UserError, match="valid: train, forward"):
    bench.run(bench_config(), mode="backward")


def test_bench_never_imports_tensorflow():
  """A fresh process: train and forward benchmarks leave TensorFlow and Keras unimported."""
  code = ("import json, sys\nfrom transfer import main\n"
          f"main.run(['bench', '--mode=train', '--json'] + {TINY!r})\n"
          f"main.run(['bench', '--mode=forward', '--json'] + {TINY!r})\n"
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
          "assert not bad, bad\n")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  modes = [json.loads(l)["mode"] for l in done.stdout.splitlines() if l.startswith("{")]
  assert modes == ["train", "forward"]


@pytest.mark.parametrize("variant,gmacs", [("torchvision", 4.09), ("keras", 3.86)])
def test_analytic_flops_of_resnet50_follow_each_variants_strides(variant, gmacs):
  """The published multiply-adds of ResNet50 at 224: 4.09 G for torchvision's v1.5 (the stride
  in the 3x3 makes that convolution run at the larger resolution), about 3.86 G for Keras' v1.
  Convolutions plus the 1000-way top; BatchNorm, pooling and additions are not counted."""
  model = models.get("resnet50", variant=variant)
  params = jax.eval_shape(lambda: models.init_params(model, 224))
  flops = bench.analytic_flops(params, "resnet50", 224, 1, model=model)
  assert flops / 2 / 1e9 == pytest.approx(gmacs, rel=0.01)
