"""The steps `scripts/bench_peers.py` times, one builder per framework: `transfer`, Keras 3 and
PyTorch (plain torch.nn networks, and timm's ViT).

`build(framework, model, job, dtype, batch, size, options)` returns `(step, info)`: `step()` runs
one whole step synchronously (it returns only when the result is computed), `info` describes what
was built for the report. Jobs:

  frozen   the backbone frozen, a new head trained (Adam): what the CNN rows and the ViT's
           "frozen" rows time;
  full     every parameter trained (Adam): full fine-tuning (ViT only);
  forward  the inference forward pass with the head, for the train/forward ratio (ViT only).

Each builder runs in its own worker process (Keras fixes its backend at import), so imports are
local to the builder.
"""

from __future__ import annotations

import os
import sys

JOBS = ("frozen", "full", "forward")
TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def build(framework: str, model: str, job: str, dtype: str, batch: int, size: int,
          options: dict):
  """The step of `framework` for `model` and `job` (module docstring)."""
  if model.startswith("vit"):
    builders = {"transfer": _transfer_step, "torch": _timm_vit_step}
  else:
    builders = {"keras-tensorflow": _keras_step, "keras-jax": _keras_step,
                "torch": _torch_step, "transfer": _transfer_step}
    if job != "frozen":
      raise SystemExit(f"{model}: only the frozen-backbone job is defined, not {job!r}")
  if framework not in builders:
    raise SystemExit(f"no {framework} contestant for {model}; valid: {', '.join(builders)}")
  return builders[framework](model, job, dtype, batch, size, options)


def _keras_step(model_name: str, job: str, dtype: str, batch: int, size: int, options: dict):
  import keras
  import numpy as np
  if dtype == "bfloat16":
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
  if model_name == "resnet50":  # frozen: Keras runs its BatchNorm layers in inference mode
    base = keras.applications.ResNet50(weights=None, include_top=False, pooling="avg",
                                       input_shape=(size, size, 3))
    head = []
  else:
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(size, size, 3))
    head = [keras.layers.Flatten(), keras.layers.Dense(256, activation="relu"),
            keras.layers.Dropout(0.6)]
  base.trainable = False
  model = keras.Sequential([keras.Input((size, size, 3)), base, *head,
                            keras.layers.Dense(1, activation="sigmoid", dtype="float32")])
  model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy",
                jit_compile=options.get("jit_compile", "auto"))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  y = rng.integers(0, 2, (batch, 1)).astype(np.float32)
  step = lambda: float(model.train_on_batch(x, y))
  info = {"jit_compile": str(getattr(model, "jit_compile", "?")), "keras": keras.__version__,
          "backend": keras.backend.backend()}
  return step, info


def _torch_vgg16_blog(size: int):
  """VGG16's conv base (13 convs, 5 max pools) and the blog head, built from the layer list."""
  import torch.nn as tnn
  layers, channels = [], 3
  for width, convs in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
    for _ in range(convs):
      layers += [tnn.Conv2d(channels, width, 3, padding=1), tnn.ReLU(inplace=True)]
      channels = width
    layers.append(tnn.MaxPool2d(2, 2))
  features = tnn.Sequential(*layers)
  head = tnn.Sequential(tnn.Flatten(), tnn.Linear(512 * (size // 32) ** 2, 256), tnn.ReLU(inplace=True),
                        tnn.Dropout(0.6), tnn.Linear(256, 1))
  return features, head


def _torch_resnet50():
  """torchvision's ResNet50 (v1.5: stride on the 3x3 convolution) and a GAP -> Linear(1) head."""
  import torch.nn as tnn

  def conv_bn(cin, cout, k, stride=1, relu=True):
    layers = [tnn.Conv2d(cin, cout, k, stride, k // 2, bias=False), tnn.BatchNorm2d(cout)]
    return tnn.Sequential(*layers, *([tnn.ReLU(inplace=True)] if relu else []))

  class Bottleneck(tnn.Module):
    def __init__(self, cin, inner, stride):
      super().__init__()
      self.body = tnn.Sequential(conv_bn(cin, inner, 1), conv_bn(inner, inner, 3, stride),
                                 conv_bn(inner, 4 * inner, 1, relu=False))
      self.shortcut = (conv_bn(cin, 4 * inner, 1, stride, relu=False)
                       if stride != 1 or cin != 4 * inner else tnn.Identity())

    def forward(self, x):
      return (self.body(x) + self.shortcut(x)).relu_()

  layers, cin = [conv_bn(3, 64, 7, 2), tnn.MaxPool2d(3, 2, 1)], 64
  for s, blocks in enumerate((3, 4, 6, 3)):
    for b in range(blocks):
      layers.append(Bottleneck(cin, 64 * 2 ** s, 2 if s > 0 and b == 0 else 1))
      cin = 4 * 64 * 2 ** s
  head = tnn.Sequential(tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(cin, 1))
  return tnn.Sequential(*layers), head


def _torch_step(model_name: str, job: str, dtype: str, batch: int, size: int, options: dict):
  import torch
  import torch.nn.functional as F
  features, head = _torch_resnet50() if model_name == "resnet50" else _torch_vgg16_blog(size)
  for p in features.parameters():
    p.requires_grad_(False)
  model = torch.nn.Sequential(features, head).to(memory_format=torch.channels_last)
  features.eval()  # frozen: ResNet's BatchNorm in inference mode (the head keeps its dropout)
  opt = torch.optim.Adam(head.parameters(), lr=1e-4)
  forward = torch.compile(model) if options.get("compile") else model
  gen = torch.Generator().manual_seed(0)
  x = torch.randn(batch, 3, size, size, generator=gen).to(memory_format=torch.channels_last)
  y = torch.randint(0, 2, (batch,), generator=gen).float()
  bf16 = dtype == "bfloat16"

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      logits = forward(x)
    loss = F.binary_cross_entropy_with_logits(logits.float().squeeze(1), y)
    loss.backward()
    opt.step()
    return float(loss)

  return step, {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "compile": bool(options.get("compile")), "memory_format": "channels_last"}


def _timm_vit_step(model_name: str, job: str, dtype: str, batch: int, size: int, options: dict):
  """timm's `vit_base_patch16_224` with a new 2-class head, as a timm user fine-tunes it.

  frozen: `requires_grad_(False)` on every parameter but the head's, the backbone in `eval()`
  and Adam over the head only; no parameter before the head requires a gradient, so autograd
  records nothing for the backbone (what wrapping it in `torch.no_grad()` would give).
  full: every parameter trains, the model in `train()` (timm's default rates are all 0, so no
  dropout or drop-path either way). forward: `eval()` under `torch.inference_mode()`. bfloat16
  is `torch.autocast("cpu", torch.bfloat16)` around the forward, float32 parameters and loss.
  `compile`: `torch.compile(model)` with the default mode; its compile time falls in the
  untimed set-up.
  """
  import torch
  import torch.nn.functional as F
  if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
  import torch_models  # tests/torch_models.py: torchvision (which timm imports) beside CPU torch
  torch_models.import_torchvision()
  import timm
  if model_name != "vit_b16":
    raise SystemExit(f"the timm contestant runs vit_b16 only, not {model_name}")
  torch.manual_seed(0)
  model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=2,
                            img_size=size)
  head = model.get_classifier()
  if job == "full":
    model.train()
    params = list(model.parameters())
  else:
    for p in model.parameters():
      p.requires_grad_(False)
    for p in head.parameters():
      p.requires_grad_(True)
    model.eval()
    params = list(head.parameters())
  forward = torch.compile(model) if options.get("compile") else model
  opt = torch.optim.Adam(params, lr=1e-4)
  gen = torch.Generator().manual_seed(0)
  x = torch.randn(batch, 3, size, size, generator=gen)
  y = torch.randint(0, 2, (batch,), generator=gen)
  autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

  def train_step():
    opt.zero_grad(set_to_none=True)
    with autocast():
      logits = forward(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    opt.step()
    return float(loss.detach())

  def forward_step():
    with torch.inference_mode(), autocast():
      return float(forward(x).float().sum())

  return (forward_step if job == "forward" else train_step), {
      "torch": torch.__version__, "timm": timm.__version__, "threads": torch.get_num_threads(),
      "compile": bool(options.get("compile"))}


def _transfer_step(model_name: str, job: str, dtype: str, batch: int, size: int, options: dict):
  """The step `transfer bench` times (`transfer.bench`'s set-up and prepared steps).

  VGG16: the blog head; ResNet50: BatchNorm in inference mode and a GAP head; a ViT: a new
  2-class linear head on the class token (`head="gap"` on the pooled token is the identity pool
  and one Dense, as timm's `head`), frozen = `trainable=["^head/"]`, full = `trainable=["."]`.
  """
  import transfer.platform
  transfer.platform.setup()  # as every `transfer` command does, before JAX has a backend
  import jax
  from transfer import bench, configs
  from transfer.bench import cases
  from transfer.platform import hugepages
  config = configs.load("bench")
  config.batch_size, config.image_size, config.dtype = batch, size, dtype
  config.conv = options.get("conv", config.conv)
  if model_name == "resnet50":  # the frozen backbone's BatchNorm layers run in inference mode
    config.model, config.variant, config.head, config.head_dropout = (
        "resnet50", options.get("variant", "torchvision"), "gap", 0.0)
  elif model_name.startswith("vit"):
    config.model, config.head, config.head_dropout, config.num_classes = (
        model_name, "gap", 0.0, 2)
    config.trainable = ["."] if job == "full" else ["^head/"]
  setup = bench.Setup(config, dtype)
  prepared = (cases.prepare_forward(setup, warmup=0) if job == "forward"
              else cases.prepare_train(setup, warmup=0))

  def run():
    return jax.block_until_ready(prepared.run())

  info = {"jax": jax.__version__, "devices": f"{jax.device_count()} x "
                                            f"{jax.devices()[0].device_kind}",
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "hugepages": hugepages.active(),
          "compile_s": prepared.compile_s}
  if model_name.startswith("vit"):  # its one conv, the patch embedding, is never Winograd
    info["attention"] = setup.model.attention
  else:
    info["conv"] = setup.model.conv
  return run, info
