"""torchvision (and timm) ResNet weights compute in our ResNet what they compute in torch.

The reference is a plain `torch.nn` ResNet with torchvision's module names (torchvision itself is
not installed beside torch here): Bottleneck v1.5 (stride on the 3x3), convolutions without bias,
BatchNorm2d with eps 1e-5, `downsample` = Sequential(1x1 conv, BN). Its weights are random and so
are its BatchNorm running statistics, far from the fresh mean 0 / variance 1, so a statistic that
is dropped, swapped or read into the wrong collection changes the outputs. Files are written the
ways they are published: `torch.save(state_dict)` and safetensors, with and without
`num_batches_tracked` (timm's files may lack it).
"""

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import assert_close
from transfer import models
from transfer import weights
from transfer.weights import export, formats, port, sources
# `transfer.weights.preprocess` is also the name of a function the package exports.
from transfer.weights.preprocess import eval_image, eval_resize, preprocess

pytestmark = pytest.mark.usefixtures("home")

torch = pytest.importorskip("torch", reason="torch extra not installed")
nn = torch.nn
from torch_models import TorchResNet, run_torch, save, torch_resnet  # noqa: E402  (needs torch)

RTOL = 1e-4
RESNET50 = (3, 4, 6, 3)
RESNET101 = (3, 4, 23, 3)


# --- loading ------------------------------------------------------------------------------------


def load_variables(path, net, image_size):
  """`{"params", "batch_stats"}` for `net` from a torch file, strictly (the library's loader)."""
  return weights.load_variables(str(path), net, image_size=image_size)


def forward(net, variables, x, **kw):
  return np.asarray(jax.jit(lambda v, x: net.apply(v, x, **kw))(variables, x))


def random_images(n, size, seed):
  """Images normalised as torchvision's, so values are what the network saw in training."""
  pixels = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  return preprocess(pixels, "torch")


# --- the port, at the view level -----------------------------------------------------------------


def test_view_routes_batch_norm_tensors_and_drops_the_counter(tmp_path):
  """BN: weight/bias/running_mean/running_var -> scale/bias/mean/var; no num_batches_tracked;
  conv OIHW -> HWIO; fc (out, in) -> (in, out) without any C,H,W row permutation."""
  model = torch_resnet(RESNET50, seed=3, width=4)
  path = save(model, tmp_path / "tiny.pth", "pth")
  state = model.state_dict()
  with formats.open_weights(path) as wf:
    view = port.model_view(wf, models.spec("resnet50_tiny"))
    bn = view["conv3_block1_0_bn"]
    assert sorted(bn) == ["bias", "mean", "scale", "var"]
    for ours, theirs in [("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                         ("var", "running_var")]:
      np.testing.assert_array_equal(bn[ours].read(),
                                    state[f"layer2.0.downsample.1.{theirs}"].numpy())
    assert all("num_batches_tracked" not in params for params in view.values())
    conv = view["conv3_block1_2_conv"]
    assert list(conv) == ["kernel"] and conv["kernel"].shape == (3, 3, 8, 8)
    np.testing.assert_array_equal(conv["kernel"].read(),
                                  state["layer2.0.conv2.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(view["predictions"]["kernel"].read(),
                                  state["fc.weight"].numpy().T)
    spec = models.spec("resnet50_tiny")
    assert set(view) == set(spec.conv_layers + spec.top_layers)


def test_tiny_fits_strictly_and_matches(tmp_path):
  """The whole model at 1/16 width, through the strict plan: every layer loaded, none left."""
  model = torch_resnet(RESNET50, seed=4, width=4)
  path = save(model, tmp_path / "tiny.safetensors", "safetensors", counters=False)
  net = models.get("resnet50_tiny", include_top=True, variant="torchvision")
  variables = load_variables(path, net, 64)
  assert set(variables) == {"params", "batch_stats"}
  x = random_images(2, 64, seed=0)
  assert_close(forward(net, variables, x), run_torch(model, x))


def test_export_loads_strictly_into_torch_and_computes_the_same(tmp_path):
  """Our variables (with running statistics far from 0 and 1) -> `export.torch_state_dict` ->
  torch's `load_state_dict(strict=True)`: every key torch expects, BN buffers included."""
  net = models.get("resnet50_tiny", include_top=True, variant="torchvision")
  variables = jax.device_get(models.init_variables(net, 64, 5))
  rng = np.random.default_rng(5)
  variables["batch_stats"] = jax.tree.map(
      lambda v: rng.uniform(0.5, 2.0, v.shape).astype(np.float32), variables["batch_stats"])
  for layer in variables["batch_stats"]:  # BN affine parameters away from 1 and 0 too
    bn = variables["params"][layer]
    bn["scale"] = rng.uniform(0.5, 1.5, bn["scale"].shape).astype(np.float32)
    bn["bias"] = rng.normal(0, 0.2, bn["bias"].shape).astype(np.float32)
  fc = variables["params"]["predictions"]  # Flax's fresh bias is 0; the kernel is random
  fc["bias"] = rng.normal(0, 0.1, fc["bias"].shape).astype(np.float32)
  state = export.torch_state_dict(variables["params"], models.spec("resnet50_tiny"),
                                  variables["batch_stats"])
  model = TorchResNet(RESNET50, width=4)
  model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                        strict=True)
  x = random_images(2, 64, seed=6)
  ref = run_torch(model.eval(), x)
  assert np.abs(ref).max() > 0.1
  assert_close(forward(net, variables, x), ref)


# --- full-size parity ----------------------------------------------------------------------------


def test_resnet50_logits_match_torch_at_224(tmp_path):
  """torchvision's layout (.pth, with num_batches_tracked), the ImageNet top, 224 input."""
  model = torch_resnet(RESNET50, seed=0)
  path = save(model, tmp_path / "resnet50.pth", "pth")
  net = models.get("resnet50", include_top=True, variant="torchvision")
  variables = load_variables(path, net, 224)
  x = random_images(2, 224, seed=1)
  ref = run_torch(model, x)
  assert np.abs(ref).max() > 1.0  # the random network computes something worth comparing
  assert_close(forward(net, variables, x), ref)


def test_resnet50_notop_features_match_torch_timm_style(tmp_path):
  """A timm-style .safetensors (same keys, no num_batches_tracked) into a model without the
  top: the file's fc is ignored, the conv5 feature map equals torch's layer4 output."""
  model = torch_resnet(RESNET50, seed=1)
  path = save(model, tmp_path / "model.safetensors", "safetensors", counters=False)
  net = models.get("resnet50", head="none", variant="torchvision")
  variables = load_variables(path, net, 96)
  x = random_images(2, 96, seed=2)
  ours = forward(net, variables, x)
  ref = run_torch(model.features, x).transpose(0, 2, 3, 1)
  assert ours.shape == (2, 3, 3, 2048)
  assert_close(ours, ref)


def test_resnet101_notop_features_match_torch(tmp_path):
  """23 blocks in conv4: the block-index mapping beyond single digits (layer3.22)."""
  model = torch_resnet(RESNET101, seed=2)
  path = save(model, tmp_path / "resnet101.pth", "pth")
  net = models.get("resnet101", head="none", variant="torchvision")
  variables = load_variables(path, net, 64)
  x = random_images(1, 64, seed=3)
  assert_close(forward(net, variables, x), run_torch(model.features, x).transpose(0, 2, 3, 1))


# --- registry and eval geometry ------------------------------------------------------------------


@pytest.mark.parametrize("source_id, file, resize", [
    ("torchvision:resnet50", "resnet50-11ad3fa6.pth", 232),
    ("torchvision:resnet50_v1", "resnet50-0676ba61.pth", 256),
    ("torchvision:resnet101", "resnet101-cd907fc2.pth", 232),
    ("torchvision:resnet101_v1", "resnet101-63fe2227.pth", 256),
    ("torchvision:resnet152", "resnet152-f82ba261.pth", 232),
    ("torchvision:resnet152_v1", "resnet152-394f9c45.pth", 256),
    ("torchvision:vgg16", "vgg16-397923af.pth", 256),
])
def test_torchvision_registry(source_id, file, resize):
  entry = sources.get(source_id)
  assert entry.url == f"https://download.pytorch.org/models/{file}"
  assert (entry.hash_kind, entry.hash) == ("sha256_prefix", file.split("-")[1][:8])
  assert (entry.format, entry.include_top, entry.preprocess) == ("torch_pth", True, "torch")
  assert entry.arch == file.split("-")[0]
  assert entry.variant == ("torchvision" if entry.arch.startswith("resnet") else None)
  assert entry.resize_size == resize == eval_resize(source_id)


def test_eval_resize_by_source(tmp_path):
  """A file's geometry follows what its contents are (issue 21: never the name alone): a torch
  state dict of no registered architecture gets torchvision's 256, a Keras .h5 Keras' squash."""
  import h5py
  from safetensors.torch import save_file
  assert eval_resize("keras:vgg16") is None
  assert eval_resize(None) is None
  assert eval_resize("torchvision:resnet50?") == 232
  torch_file = str(tmp_path / "w.safetensors")
  save_file(torch.nn.Linear(3, 2).state_dict(), torch_file)
  assert eval_resize(torch_file) == 256  # a torch file
  keras_file = str(tmp_path / "w.h5")
  with h5py.File(keras_file, "w") as f:  # the legacy Keras layout: layer group, weight names
    f.attrs["layer_names"] = [b"dense"]
    group = f.create_group("dense")
    group.attrs["weight_names"] = [b"dense/kernel:0"]
    group.create_dataset("dense/kernel:0", data=np.zeros((3, 2), np.float32))
  assert eval_resize(keras_file) is None
  assert eval_resize("torchvision:vgg16", size=112) == 128  # same crop fraction


@pytest.fixture
def photo():
  """A non-square RGB image with structure at every scale (odd sizes: rounding matters)."""
  rng = np.random.default_rng(7)
  h, w = 301, 457
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1)
  noise = rng.integers(-40, 40, (h, w, 3))
  return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize("portrait", [False, True])
def test_torchvision_eval_geometry(photo, portrait):
  """Short side to 232, long side int(232 * long / short), center crop 224 at round offsets.

  The reference works out the sizes by hand and crops with numpy slicing.
  """
  image = photo.transpose(Image.Transpose.TRANSPOSE) if portrait else photo
  got = eval_image(image, 224, 232)
  # 301 x 457 -> 232 x int(232 * 457 / 301) = 232 x 352; crop offsets round(8/2)=4, round(128/2)=64.
  size = (232, 352) if portrait else (352, 232)
  resized = np.asarray(image.resize(size, Image.BILINEAR))
  top, left = (64, 4) if portrait else (4, 64)
  assert got.shape == (224, 224, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, resized[top:top + 224, left:left + 224])


def test_eval_geometry_close_to_torch_antialias(photo):
  """PIL's antialiased bilinear vs torch's `antialias=True` on a float tensor: the same filter,
  PIL rounding to uint8 between passes: within one level of the float result."""
  got = eval_image(photo, 224, 256).astype(np.float32)
  x = torch.from_numpy(np.asarray(photo, np.float32).transpose(2, 0, 1)[None].copy())
  ref = torch.nn.functional.interpolate(x, size=(256, int(256 * 457 / 301)), mode="bilinear",
                                        antialias=True, align_corners=False)[0].numpy()
  ref = ref.transpose(1, 2, 0)[16:240, 82:306]  # offsets round(32/2), round((388-224)/2)
  diff = np.abs(got - ref)
  assert diff.max() < 1.5 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_keras_geometry_squashes(photo):
  got = eval_image(photo, 224, None)
  np.testing.assert_array_equal(got, np.asarray(photo.resize((224, 224), Image.BILINEAR)))
