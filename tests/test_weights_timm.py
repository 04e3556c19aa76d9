"""timm's ResNet weights: registry ids, a verified download from a local server, loading into the
torchvision variant, timm's eval geometry in `predict`, and a clear refusal of ResNet-D files.

The expected values are timm's `pretrained_cfg`s as `timm/models/resnet.py` (huggingface/
pytorch-image-models at aa4b5850) states them: `_rcfg` (test_input_size 288, test_crop_pct 1.0,
bicubic) and `_cfg` with overrides; the eval transform is timm's `transforms_imagenet_eval`:
short side `floor(size / crop_pct)`, center crop, the cfg's interpolation.
"""

import dataclasses
import hashlib
import importlib
import math
import os

import jax
import numpy as np
import pytest
from PIL import Image

from transfer import main as cli_main
from transfer import models
from transfer import predict
from transfer import weights
from transfer.errors import UserError
from transfer.weights import export, port, sources
from transfer.weights.preprocess import EvalGeometry, eval_geometry, eval_image, mode_for

pytestmark = pytest.mark.usefixtures("home")

_RSB = "releases/download/v0.1-rsb-weights"
# tag -> (legacy `url`, test_input_size, test_crop_pct, interpolation), as timm's cfgs say.
TIMM_CFG = {
    "resnet50.a1_in1k": (
        f"https://github.com/rwightman/pytorch-image-models/{_RSB}/resnet50_a1_0-14fe96d1.pth",
        288, 1.0, "bicubic"),
    "resnet50.a1h_in1k": (
        f"https://github.com/huggingface/pytorch-image-models/{_RSB}/"
        f"resnet50_a1h2_176-001a1197.pth", 224, 1.0, "bicubic"),
    "resnet50.tv2_in1k": ("https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
                          224, 0.965, "bilinear"),
    "resnet101.a1h_in1k": (
        f"https://github.com/rwightman/pytorch-image-models/{_RSB}/resnet101_a1h-36d3f2aa.pth",
        288, 1.0, "bicubic"),
    "resnet152.a1h_in1k": (
        f"https://github.com/rwightman/pytorch-image-models/{_RSB}/resnet152_a1h-dc400468.pth",
        288, 1.0, "bicubic"),
}
A1 = "timm:resnet50.a1_in1k"


@pytest.mark.parametrize("tag", sorted(TIMM_CFG))
def test_timm_registry_follows_the_pretrained_cfg(tag):
  url, size, crop_pct, interpolation = TIMM_CFG[tag]
  entry = sources.get(f"timm:{tag}")
  assert entry.url == url and entry.filename == url.rsplit("/", 1)[1]
  # torch.hub's `<name>-<sha256 prefix>.pth`: the prefix is the check.
  assert (entry.hash_kind, entry.hash) == ("sha256_prefix", url.rsplit("-", 1)[1][:8])
  assert entry.hub_url == f"https://huggingface.co/timm/{tag}/resolve/main/model.safetensors"
  assert (entry.arch, entry.format, entry.include_top) == (tag.split(".")[0], "torch_pth", True)
  assert entry.variant == weights.variant_for(entry.id, entry.arch) == "torchvision"
  assert mode_for(entry.id) == entry.preprocess == "torch"  # IMAGENET_DEFAULT_MEAN/STD
  assert eval_geometry(entry.id) == EvalGeometry(size, math.floor(size / crop_pct), interpolation)


def test_weights_list_shows_the_hub_file_as_unverified(capsys):
  assert cli_main.run(["weights", "list"]) == 0
  [line] = [l for l in capsys.readouterr().out.splitlines() if l.startswith(A1 + " ")]
  assert "resnet50_a1_0-14fe96d1.pth  [not cached]" in line
  assert line.endswith("(publisher's hub copy, unverified: "
                       "https://huggingface.co/timm/resnet50.a1_in1k/resolve/main/model.safetensors)")


def test_timm_tv2_is_torchvisions_v2_file_and_eval_geometry():
  """timm's `resnet50.tv2_in1k` cfg reproduces torchvision's IMAGENET1K_V2 recipe (232 -> 224)."""
  tv, timm = sources.get("torchvision:resnet50"), sources.get("timm:resnet50.tv2_in1k")
  assert (timm.url, timm.hash) == (tv.url, tv.hash)
  assert eval_geometry(timm.id) == eval_geometry(tv.id) == EvalGeometry(224, 232, "bilinear")


# --- a generated timm-style file served over HTTP ---------------------------------------------


def random_variables(arch, image_size=64, seed=0):
  """Random params and non-trivial running statistics for the torchvision variant of `arch`."""
  shapes = port.variable_shapes(models.get(arch, include_top=True, variant="torchvision"),
                                image_size)
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32) * 0.05, shapes)
  variables["batch_stats"] = jax.tree.map(
      lambda s: rng.uniform(0.5, 2.0, s.shape).astype(np.float32), shapes["batch_stats"])
  return variables


def timm_pth(path, arch, variables):
  """`variables` saved as timm publishes a plain ResNet: a torch state dict, torchvision keys."""
  torch = pytest.importorskip("torch", reason="torch extra not installed")
  state = export.torch_state_dict(variables["params"], models.spec(arch),
                                  variables["batch_stats"])
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
  return path


def test_timm_id_downloads_checks_its_hash_prefix_and_loads(weight_server, tmp_path, monkeypatch):
  server = weight_server
  real = sources.get(A1)
  variables = random_variables("resnet50")
  data = timm_pth(tmp_path / "served.pth", "resnet50", variables).read_bytes()
  server.files[f"/mirror/{real.filename}"] = (data, len(data))
  monkeypatch.setenv("TRANSFER_WEIGHTS_URL_BASE", server.url("/mirror"))
  cached = sources.cached_path(real)

  # The published prefix is checked: our generated file is not the real one.
  with pytest.raises(UserError, match=rf"expected {real.hash}\.\.\.; nothing was saved"):
    weights.download(A1, progress=False)
  assert not (tmp_path / "home" / "weights").exists() or not any(
      (tmp_path / "home" / "weights").iterdir())

  # The same entry with the served file's prefix: downloaded once, verified, loaded strictly.
  sha = hashlib.sha256(data).hexdigest()
  monkeypatch.setitem(sources._SOURCES, A1, dataclasses.replace(real, hash=sha[:8]))
  net = models.get("resnet50", include_top=True, variant=weights.variant_for(A1, "resnet50"))
  assert net.variant == "torchvision"
  loaded, report = weights.load_variables(A1, net, image_size=64, return_report=True)
  assert report.path == cached and cached.endswith("resnet50_a1_0-14fe96d1.pth")
  assert report.fresh == () and len(report.loaded) == len(models.spec("resnet50").conv_layers) + 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), variables)


@pytest.fixture
def photo():
  rng = np.random.default_rng(3)
  pixels = np.clip(rng.normal(128, 60, (301, 457, 3)), 0, 255).astype(np.uint8)
  return Image.fromarray(pixels, "RGB")


def test_timm_eval_image_is_bicubic_short_side_then_center_crop(photo):
  """timm's a1 eval: Resize(288, BICUBIC) on the short side, CenterCrop(288), worked by hand."""
  g = eval_geometry(A1)
  got = eval_image(photo, g.size, g.resize, g.interpolation)
  # 457 x 301 -> int(288 * 457 / 301) = 437 x 288; crop left round((437 - 288) / 2) = 74, top 0.
  resized = np.asarray(photo.resize((437, 288), Image.BICUBIC))
  np.testing.assert_array_equal(got, resized[0:288, 74:74 + 288])
  bilinear = np.asarray(photo.resize((437, 288), Image.BILINEAR))[0:288, 74:74 + 288]
  assert not np.array_equal(got, bilinear)  # the filter is really bicubic


def test_predict_with_a_timm_id_uses_its_size_resize_and_filter(tmp_path, monkeypatch, photo):
  """`predict` on timm weights evaluates at the cfg's test size (288) with its bicubic resize."""
  entry = dataclasses.replace(sources.get(A1), id="timm:resnet50_tiny.a1_in1k",
                              arch="resnet50_tiny")
  monkeypatch.setitem(sources._SOURCES, entry.id, entry)
  cached = sources.cached_path(entry)
  os.makedirs(os.path.dirname(cached), exist_ok=True)
  timm_pth(cached, "resnet50_tiny", random_variables("resnet50_tiny"))  # placed by hand
  image = str(tmp_path / "photo.png")
  photo.save(image)
  calls = []
  # `transfer.weights.preprocess` is also a function the package exports: the module by name.
  preprocess_lib = importlib.import_module("transfer.weights.preprocess")
  real_eval_image = preprocess_lib.eval_image
  monkeypatch.setattr(preprocess_lib, "eval_image",
                      lambda img, *a, **k: calls.append((a, k)) or real_eval_image(img, *a, **k))
  [result] = predict.predict_imagenet([image], model="resnet50_tiny", weights=entry.id, top=1)
  assert result.error is None and len(result.top) == 1
  assert calls == [((288, 288, "bicubic"), {})]


# --- ResNet-D ---------------------------------------------------------------------------------


def _resnet_d(state, deep_stem, avg_down):
  """A torchvision-keyed state dict turned into timm's ResNet-D layout (resnet50d: stem_width 32,
  stem_type='deep', avg_down=True)."""
  out = dict(state)
  if deep_stem:
    width = state["conv1.weight"].shape[0]
    del out["conv1.weight"]
    rng = np.random.default_rng(0)
    for i, (cout, cin) in ((0, (8, 3)), (3, (8, 8)), (6, (width, 8))):
      out[f"conv1.{i}.weight"] = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
      if i < 6:
        for k in ("weight", "bias", "running_mean", "running_var"):
          out[f"conv1.{i + 1}.{k}"] = np.ones(cout, np.float32)
  if avg_down:
    for key in list(out):
      if ".downsample." in key:
        head, tail = key.split(".downsample.")
        index, kind = tail.split(".", 1)
        del out[key]
        out[f"{head}.downsample.{int(index) + 1}.{kind}"] = state[key]
  return out


@pytest.mark.parametrize("deep_stem, avg_down, kind", [
    (True, True, "deep-stem ResNet-D"), (True, False, "deep-stem ResNet-D"),
    (False, True, "average-pool-shortcut ResNet-D")])
def test_a_resnet_d_file_is_refused_in_one_line(tmp_path, deep_stem, avg_down, kind):
  variables = random_variables("resnet50_tiny")
  state = export.torch_state_dict(variables["params"], models.spec("resnet50_tiny"),
                                  variables["batch_stats"])
  path = str(tmp_path / "resnet50d.safetensors")
  export.write_safetensors(path, _resnet_d(state, deep_stem, avg_down))
  net = models.get("resnet50_tiny", include_top=True, variant="torchvision")
  with pytest.raises(UserError) as e:
    weights.load_variables(path, net, image_size=64)
  message = str(e.value)
  assert message.startswith(f"weights {path}: {kind} is not supported; the file has ")
  assert "timm:resnet50.a1_in1k" in message and "\n" not in message
