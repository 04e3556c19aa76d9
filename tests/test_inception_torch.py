"""torchvision InceptionV3 weights compute in our InceptionV3 what they compute in torch.

The reference is a plain `torch.nn` InceptionV3 written after torchvision's `inception.py`
(torchvision itself is not installed beside torch here), with its module names: `BasicConv2d`
(conv without bias, BatchNorm2d eps 1e-3, ReLU), InceptionA-E with `F.avg_pool2d(x, 3, 1, 1)`
pool branches (padding counted), `AuxLogits` (InceptionAux), `fc`. Weights and running
statistics are random, statistics far from 0 and 1. Each side preprocesses uint8 pixels its own
way: torchvision's pretrained transform (ToTensor, Normalize with the ImageNet mean/std, then the
model's `transform_input`), ours `preprocess(x, "torchvision:inception_v3")` ([-1, 1]).
"""

import os

import jax
import numpy as np
import pytest

from helpers import assert_close
from transfer import models
from transfer import weights
from transfer.errors import UserError
from transfer.weights import sources
from transfer.weights.preprocess import TORCH_MEAN, TORCH_STD, eval_resize, mode_for, preprocess

pytestmark = pytest.mark.usefixtures("home")

torch = pytest.importorskip("torch", reason="torch extra not installed")
nn = torch.nn
F = torch.nn.functional
from torch_models import randomize  # noqa: E402  (needs torch, so after the skip)

# float32 on both sides, sums in another order: measured 2.2e-7 (features at 99) and 4.8e-7
# (logits at 299) of the output's scale; a pool that ignores padding is off by percents.
RTOL = 1e-4


# --- the torch reference (torchvision's module layout) -------------------------------------------


class BasicConv2d(nn.Module):
  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
  def __init__(self, cin, pool):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool, kernel_size=1)

  def forward(self, x):
    return torch.cat([
        self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))], 1)


class InceptionB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    return torch.cat([self.branch3x3(x),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      d = layer(d)
    return torch.cat([self.branch1x1(x), b7, d,
                      self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))], 1)


class InceptionD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                      F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    return torch.cat([self.branch1x1(x),
                      torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
                      torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1),
                      self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))], 1)


class InceptionAux(nn.Module):
  def __init__(self, cin, num_classes):
    super().__init__()
    self.conv0 = BasicConv2d(cin, 128, kernel_size=1)
    self.conv1 = BasicConv2d(128, 768, kernel_size=5)
    self.fc = nn.Linear(768, num_classes)


class TorchInception3(nn.Module):
  """torchvision's Inception3 with aux_logits=True and transform_input=True (its pretrained
  configuration), in eval mode: the aux classifier is present in the state dict but unused."""

  def __init__(self, num_classes=1000):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (InceptionA(192, 32), InceptionA(256, 64),
                                                   InceptionA(288, 64))
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
    self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
    self.AuxLogits = InceptionAux(768, num_classes)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b, self.Mixed_7c = InceptionE(1280), InceptionE(2048)
    self.fc = nn.Linear(2048, num_classes)

  @staticmethod
  def transform_input(x):
    """torchvision's `_transform_input`: undoes Normalize into [-1, 1] scaling."""
    return torch.cat([x[:, c:c + 1] * (s / 0.5) + (m - 0.5) / 0.5
                      for c, (m, s) in enumerate(zip(TORCH_MEAN, TORCH_STD))], 1)

  def features(self, x):
    x = self.transform_input(x)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    return x

  def forward(self, x):
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), (1, 1)), 1))


def torch_inception(seed):
  """The reference with random weights (He-scaled convs) and random running statistics."""
  torch.manual_seed(seed)
  return randomize(TorchInception3())


def torch_pixels(pixels):
  """torchvision's pretrained transform on uint8 NHWC pixels: ToTensor, Normalize (the model's
  `transform_input` follows inside it)."""
  x = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()).float() / 255.0
  mean, std = torch.tensor(TORCH_MEAN).view(1, 3, 1, 1), torch.tensor(TORCH_STD).view(1, 3, 1, 1)
  return (x - mean) / std


def save(model, path, fmt):
  state = model.state_dict()
  if fmt == "pth":
    torch.save(state, path)
  else:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")},
              str(path))
  return str(path)


@pytest.fixture(scope="module")
def reference():
  return torch_inception(seed=0)


def random_pixels(n, size, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# --- tests -------------------------------------------------------------------------------------


def test_notop_features_match_torch_from_safetensors(reference, tmp_path):
  """mixed10's feature map equals torch's Mixed_7c output at 99x99; AuxLogits is reported as
  ignored, not as unexpected."""
  path = save(reference, tmp_path / "inception.safetensors", "safetensors")
  net = models.get("inception_v3", head="none", variant="torchvision")
  variables, report = weights.load_variables(path, net, image_size=99, return_report=True)
  assert report.loaded == models.spec("inception_v3").conv_layers
  assert report.ignored == ("predictions",)  # the file's fc, under a model without the top
  assert {l.split(".")[0] for l in report.left_out} == {"AuxLogits"} and len(report.left_out) == 5
  assert "ignored (not part of the model): 5 layers (AuxLogits." in report.summary()
  pixels = random_pixels(2, 99, seed=1)
  ours = np.asarray(jax.jit(net.apply)(variables, preprocess(pixels, "torchvision:inception_v3")))
  with torch.no_grad():
    ref = reference.features(torch_pixels(pixels)).numpy().transpose(0, 2, 3, 1)
  assert ours.shape == ref.shape == (2, 1, 1, 2048)
  assert_close(ours, ref, RTOL)


@pytest.mark.slow
def test_logits_match_torch_at_299_from_pth(reference, tmp_path):
  path = save(reference, tmp_path / "inception_v3_google-0cc3c7bd.pth", "pth")
  net = models.get("inception_v3", include_top=True, variant="torchvision")
  variables = weights.load_variables(path, net)
  pixels = random_pixels(2, 299, seed=2)
  ours = np.asarray(jax.jit(net.apply)(variables, preprocess(pixels, "torchvision:inception_v3")))
  with torch.no_grad():
    ref = reference(torch_pixels(pixels)).numpy()
  assert np.abs(ref).max() > 1.0
  assert_close(ours, ref, RTOL)


def test_the_pool_padding_is_what_tells_the_variants_apart(reference, tmp_path):
  """The Keras variant on the same weights (its pools do not count padding) is measurably off,
  and the variant check refuses the torch file for it."""
  path = save(reference, tmp_path / "inception.safetensors", "safetensors")
  torchvision_net = models.get("inception_v3", head="none", variant="torchvision")
  variables = weights.load_variables(path, torchvision_net, image_size=75)
  keras_net = models.get("inception_v3", head="none", variant="keras")
  x = preprocess(random_pixels(1, 75, seed=3), "tf")
  # Same params apart from BatchNorm's scale, which the Keras form lacks: set all scales to 1.
  ones = jax.tree.map(lambda a: np.ones_like(a), variables)
  unit = {"params": {k: {n: (ones["params"][k][n] if n == "scale" else v) for n, v in p.items()}
                     for k, p in variables["params"].items()},
          "batch_stats": variables["batch_stats"]}
  keras_params = {k: {n: v for n, v in p.items() if n != "scale"}
                  for k, p in unit["params"].items()}
  a = np.asarray(torchvision_net.apply(unit, x))
  b = np.asarray(keras_net.apply({"params": keras_params, "batch_stats": unit["batch_stats"]}, x))
  assert np.abs(a - b).max() > 1e-2 * np.abs(a).max()
  with pytest.raises(UserError, match=r"is a torchvision InceptionV3 .*variant='torchvision'"):
    weights.load(path, keras_net, image_size=75)


def test_a_missing_tensor_outside_the_aux_classifier_is_an_error(reference, tmp_path):
  from safetensors.torch import save_file
  state = {k: v.contiguous() for k, v in reference.state_dict().items()
           if k != "Mixed_6c.branch7x7_2.bn.running_var"}
  path = tmp_path / "broken.safetensors"
  save_file(state, str(path))
  with pytest.raises(UserError, match=r"missing \(1\): mixed5_branch7x7_2_bn/var"):
    weights.load_variables(str(path), models.get("inception_v3", head="none",
                                                 variant="torchvision"), image_size=75)


def test_preprocessing_is_torchvisions_pretrained_transform():
  """Normalize then transform_input is [-1, 1] scaling up to float32 rounding."""
  pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
  ref = TorchInception3.transform_input(torch_pixels(pixels)).numpy().transpose(0, 2, 3, 1)
  ours = preprocess(pixels, "torchvision:inception_v3")
  assert np.abs(ours - ref).max() < 1e-6
  assert mode_for("torchvision:inception_v3") == "tf"


def test_registry_and_eval_geometry():
  entry = sources.get("torchvision:inception_v3")
  assert entry.url == "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"
  assert (entry.hash_kind, entry.hash, entry.arch, entry.variant) == (
      "sha256_prefix", "0cc3c7bd", "inception_v3", "torchvision")
  assert (entry.include_top, entry.format, entry.preprocess) == (True, "torch_pth", "tf")
  assert (entry.resize_size, entry.input_size) == (342, 299)
  assert eval_resize("torchvision:inception_v3", 299) == 342  # resize 342, center crop 299
  assert eval_resize("torchvision:inception_v3", 150) == 172  # same crop fraction
  assert eval_resize("torchvision:resnet50", 224) == 232
  assert weights.variant_for("torchvision:inception_v3", "inception_v3") == "torchvision"


def test_info_recognises_a_torchvision_file_with_its_aux_classifier(reference, tmp_path):
  path = save(reference, tmp_path / "inception.safetensors", "safetensors")
  meta = weights.info(path)
  assert (meta["arch"], meta["variant"], meta["format"]) == ("inception_v3", "torchvision",
                                                             "safetensors")
  names = {layer["name"]: layer["model_name"] for layer in meta["layers"]}
  assert names["Mixed_7c.branch3x3dbl_3b.bn"] == "mixed10_branch3x3dbl_3b_bn"
  assert names["AuxLogits.fc"] == "AuxLogits.fc"


# --- a torchvision InceptionV3 file by path: tf preprocessing, 342 then the center 299 -----------


@pytest.mark.slow
def test_a_torch_inception_file_by_path_predicts_as_torchvision(reference, tmp_path, capsys):
  """`transfer predict --weights my_inception.pth`: torchvision's eval transform for these
  weights (Resize(342), CenterCrop(299), ToTensor, Normalize, then `transform_input`), written
  out with PIL here, gives torch's probabilities."""
  import json
  from PIL import Image
  from transfer import main as cli_main
  path = save(reference, tmp_path / "my_inception.pth", "pth")
  rng = np.random.default_rng(6)
  t = np.linspace(0, 1, 400)[None, :, None] * np.linspace(0.2, 1, 360)[:, None, None]
  picture = rng.integers(0, 256, 3) * (1 - t) + rng.integers(0, 256, 3) * t
  image = str(tmp_path / "x.png")
  Image.fromarray(np.clip(picture + rng.normal(0, 20, picture.shape), 0, 255)
                  .astype(np.uint8)).save(image)
  capsys.readouterr()
  assert cli_main.run(["predict", "--model", "inception_v3", "--weights", path, "--json",
                       "--top", "1000", image]) == 0
  (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  ours = np.zeros(1000)
  for p in record["top"]:
    ours[p["class"]] = p["prob"]
  # Resize(342): short side 360 -> 342, long side int(342 * 400 / 360) = 380, bilinear (PIL,
  # antialiased); CenterCrop(299): offsets int(round((380 - 299) / 2)), int(round(43 / 2)).
  resized = Image.open(image).convert("RGB").resize((380, 342), Image.BILINEAR)
  left, top = int(round((380 - 299) / 2.0)), int(round((342 - 299) / 2.0))
  pixels = np.asarray(resized.crop((left, top, left + 299, top + 299)), np.uint8)[None]
  with torch.no_grad():
    ref = torch.softmax(reference(torch_pixels(pixels)), -1).numpy()[0]
  assert ref.max() < 0.9  # informative probabilities
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_a_torch_inception_file_by_path_is_parsed_as_torchvision_inception(reference, tmp_path,
                                                                          fmt):
  from transfer.weights.preprocess import EvalGeometry, eval_geometry
  path = save(reference, tmp_path / f"my_inception.{fmt}", fmt)
  parsed = sources.resolve(path)
  assert (parsed.arch, parsed.variant, parsed.framework, parsed.preprocess) == (
      "inception_v3", "torchvision", "torch", "tf")
  assert parsed.entry is None and parsed.format == {"pth": "torch_pth",
                                                    "safetensors": "safetensors"}[fmt]
  assert eval_geometry(path) == EvalGeometry(299, 342, "bilinear")
  assert weights.info(path)["preprocess"] == "tf"


def test_an_official_file_name_by_path_gets_its_ids_geometry(reference, tmp_path):
  """A file downloaded by hand keeps its official name: it is that registry record, whatever
  directory it is in (the ResNet one holds no ResNet here: the name alone decides, unread)."""
  from transfer.weights.preprocess import eval_geometry
  official = save(reference, tmp_path / "inception_v3_google-0cc3c7bd.pth", "pth")
  resnet = str(tmp_path / "resnet50-11ad3fa6.pth")
  os.link(official, resnet)
  for path, source_id in ((official, "torchvision:inception_v3"),
                          (resnet, "torchvision:resnet50")):
    parsed = sources.resolve(path)
    assert parsed.entry == sources.get(source_id) and parsed.source == path
    assert eval_geometry(path) == eval_geometry(source_id)
    assert mode_for(path) == mode_for(source_id)
  assert eval_geometry(resnet).resize == 232 and eval_geometry(official).resize == 342
