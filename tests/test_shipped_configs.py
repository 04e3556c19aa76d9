"""Every shipped config trains through the CLI, as a user would run it: two steps at a tiny size
(`--config.KEY=VALUE` overrides only), its weights replaced by a generated file in its source's
own format (Keras HDF5 or a torch state dict), its second-stage configs continued from the first
with `init_from`. Each run's record says what its docstring promises: the preprocessing and the
variant of its weights, and the eval crop."""

import os
import re

import jax
import numpy as np
import pytest

from transfer import checkpoint, configs, main, models
from transfer.weights import export

# The tiny stand-in of each model, and the input size it is run at.
TINY = {"vgg16": ("vgg16_tiny", 32), "resnet50": ("resnet50_tiny", 32),
        "inception_v3": ("inception_v3_tiny", 75), "vit_b16": ("vit_b16_tiny", 32),
        "dinov2_s14": ("dinov2_s14_tiny", 28)}
# Freeze patterns naming blocks the 2-block tiny ViTs lack, and the tiny model's own top block.
TINY_PATTERNS = {"^block(9|10|11)_": "^block1_"}
# config -> (the run it continues, or None; preprocessing and variant its record must show).
SHIPPED = {
    "default": (None, "caffe", None),
    "quickstart": (None, "caffe", None),
    "cats_vs_dogs": (None, "caffe", None),
    "fine_tune_block5": ("cats_vs_dogs", "caffe", None),
    "flowers_gap": (None, "torch", None),
    "resnet50_cats_vs_dogs": (None, "torch", "torchvision"),
    "resnet50_fine_tune_conv5": ("resnet50_cats_vs_dogs", "torch", "torchvision"),
    "inception_v3_cats_vs_dogs": (None, "tf", "keras"),
    "inception_v3_fine_tune_mixed9": ("inception_v3_cats_vs_dogs", "tf", "keras"),
    # A timm ViT file by path is taken as AugReg's ([-1, 1]), a DINOv2 one as DINOv2's; the
    # registry ids' geometry: test_the_vit_configs_take_their_weights_preprocessing_and_geometry.
    "vit_b16_cats_vs_dogs": (None, "tf", None),
    "dinov2_linear_probe": (None, "torch", None),
}


def test_every_shipped_config_is_covered():
  assert set(configs.shipped()) == set(SHIPPED) | {"bench"}


def vit_weight_file(directory, config) -> str:
  """A random timm ViT of the tiny model's shape, written by timm itself: a `.safetensors` in
  timm's layout for `timm:` ids, a `.pth` in DINOv2's own (`mask_token`, at its 518 grid) for
  `dinov2:` ids."""
  import torch
  from torch_models import import_torchvision
  import_torchvision()  # timm imports torchvision
  import timm
  framework = config.weights.split(":")[0]
  tiny, size = TINY[config.model]
  shape = dict(embed_dim=32, depth=2, num_heads=2)
  if framework == "timm":
    net = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=size, **shape)
    path = os.path.join(directory, f"{tiny}.safetensors")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
  else:
    net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, **shape)
    state = dict(net.state_dict(), mask_token=torch.zeros(1, 32))
    path = os.path.join(directory, f"{tiny}.pth")
    torch.save(state, path)
  return path


def weight_file(directory, config) -> str:
  """A generated file in the format of `config.weights` for the tiny model: a Keras notop
  `.h5` for `keras:` ids, a torchvision-keyed `.pth` for `torchvision:` ids, timm's and DINOv2's
  own files for theirs (`vit_weight_file`)."""
  import torch
  tiny, size = TINY[config.model]
  framework = config.weights.split(":")[0]
  if framework in ("timm", "dinov2"):
    return vit_weight_file(directory, config)
  variant = {"keras": "keras", "torchvision": "torchvision"}[framework]
  spec = models.spec(tiny)
  net = models.get(tiny, include_top=False,
                   **({"variant": variant} if spec.variants else {}))
  variables = jax.device_get(models.init_variables(net, size, 0))
  stats = variables.get("batch_stats")
  if framework == "keras":
    path = os.path.join(directory, f"{tiny}_notop.h5")
    layers = export.keras_layers(variables["params"], spec, stats)
    export.write_keras_h5(path, {"input_1": [], **layers})
  else:
    path = os.path.join(directory, f"{tiny}.pth")
    state = export.torch_state_dict(variables["params"], spec, stats)
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
  return path


def tiny_flags(config, size) -> list[str]:
  """Overrides that make a shipped config a two-step run on 8 synthetic images."""
  flags = ["--config.dataset=synthetic", f"--config.image_size={size}",
           "--config.batch_size=4", "--config.synthetic.train_size=8",
           "--config.synthetic.val_size=4", f"--config.synthetic.base_size={size + 8}",
           "--config.num_steps=2", "--config.log_every_steps=1"]
  if config.stages:  # each stage one step, its other keys as shipped (blocks: the tiny's)
    stages = [{**{k: v for k, v in dict(s).items() if k not in ("epochs", "steps")}, "steps": 1,
               **({"trainable": tiny_patterns(s["trainable"])} if "trainable" in s else {})}
              for s in config.stages]
    flags.append(f"--config.stages={stages!r}")
  return flags


def tiny_patterns(patterns) -> list[str]:
  """Freeze patterns with the full model's block numbers replaced by the tiny model's."""
  return [TINY_PATTERNS.get(p, p) for p in patterns]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Workdirs of the runs trained so far, by config (a continued config needs its first)."""
  return {"root": tmp_path_factory.mktemp("shipped")}


def train_shipped(name, runs, capsys):
  root = runs["root"]
  config = configs.load(name)
  tiny, size = TINY[config.model]
  first = SHIPPED[name][0]
  argv = ["train", "--workdir", str(root / name), "--config", name, f"--config.model={tiny}",
          *tiny_flags(config, size)]
  if first:
    if first not in runs:
      train_shipped(first, runs, capsys)
    argv.append(f"--config.init_from={runs[first]}")
  else:
    argv.append(f"--config.weights={weight_file(root, config)}")
  capsys.readouterr()
  assert main.run(argv) == 0, capsys.readouterr()
  runs[name] = str(root / name)
  return config, capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_shipped_config_trains_two_steps_through_the_cli(name, runs, capsys):
  config, _ = train_shipped(name, runs, capsys)
  _, preprocessing, variant = SHIPPED[name]
  variables, meta = checkpoint.load_trained_variables(runs[name], "latest")
  recorded = meta["run"]
  assert meta["step"] == 2
  assert recorded["model"] == TINY[config.model][0] and recorded["head"] == config.head
  assert recorded["preprocessing"] == preprocessing and recorded["variant"] == variant
  assert recorded["eval_crop"] == pytest.approx(config.eval_crop)
  assert recorded["trainable"] == tiny_patterns(config.stages[-1].get("trainable")
                                                if config.stages else config.trainable)
  pool = {"auto": "tok"}.get(config.token_pool, config.token_pool)  # a ViT's own default: tok
  assert recorded["token_pool"] == (pool if "token_pool" in models.spec(recorded["model"]).options
                                    else None)
  if SHIPPED[name][0]:  # continued: the first run's frozen layers unchanged
    first, _ = checkpoint.load_trained_variables(runs[SHIPPED[name][0]], "latest")
    frozen = next(k for k in first["params"]
                  if not any(re.match(p, k + "/") for p in config.trainable))
    for a, b in zip(jax.tree_util.tree_leaves(first["params"][frozen]),
                    jax.tree_util.tree_leaves(variables["params"][frozen])):
      np.testing.assert_array_equal(a, b)


def test_the_bench_config_benchmarks_two_steps_through_the_cli(capsys):
  capsys.readouterr()
  assert main.run(["bench", "--config", "bench", "--config.model=vgg16_tiny",
                   "--config.image_size=32", "--config.batch_size=4",
                   "--config.epoch_images=8", "--steps", "2", "--warmup", "1", "--json"]) == 0
  import json
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["images_per_sec"] > 0


def test_resnet50_cats_vs_dogs_validates_on_torchvision_crop_fraction():
  """Its docstring: the centre 224 of the image squashed to 232."""
  from transfer.data import images
  config = configs.load("resnet50_cats_vs_dogs")
  assert images.stored_size(config.image_size, config.eval_crop) == 232


@pytest.mark.parametrize("name, preprocess, resize", [("vit_b16_cats_vs_dogs", "tf", 248),
                                                      ("dinov2_linear_probe", "torch", 256)])
def test_the_vit_configs_take_their_weights_preprocessing_and_geometry(name, preprocess, resize):
  """Their docstrings: AugReg's [-1, 1] with the centre 224 of 248 (timm's crop_pct 0.9),
  DINOv2's ImageNet mean/std with the centre 224 of 256 (its linear evaluation)."""
  from transfer.data import images
  from transfer.weights import sources
  config = configs.load(name)
  source = sources.resolve(config.weights)
  assert (source.preprocess, source.input_size, source.resize_size) == (
      preprocess, config.image_size, resize)
  assert images.stored_size(config.image_size, config.eval_crop) == resize
