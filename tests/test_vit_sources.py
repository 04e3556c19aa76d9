"""The Vision Transformer weight sources: each record against its publisher's own code, the
download of a file whose publisher gives no hash (size checked, sha256 recorded, a later change
refused), `weights list`, and `.npz` files recognised by their structure.

The expected values are read at test time from the installed publishers' code: torchvision's
`ViT_*_Weights` enums and their `transforms()`, timm's `get_pretrained_cfg` and its own eval
transform (`timm.data.create_transform`). Google's AugReg and DINOv2's own files are the `url`s
timm's cfgs name; their eval geometry (Google's input pipeline: squash to the model's resolution,
bilinear, [-1, 1]; DINOv2's `make_classification_eval_transform`: 256 bicubic, center 224) is
written out in `transfer.weights.vit_sources`, which says where it was read.
"""

import hashlib
import math
import os
import zipfile

import numpy as np
import pytest

from helpers import one_line_error
from transfer import main as cli_main
from transfer import models
from transfer import weights
from transfer.errors import UserError
from transfer.weights import formats, sources
from transfer.weights.preprocess import EvalGeometry, eval_geometry, resolve_data_config

pytestmark = pytest.mark.usefixtures("home")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# torchvision id -> (weights enum, member).
TORCHVISION = {
    "vit_b_16": ("ViT_B_16_Weights", "IMAGENET1K_V1"),
    "vit_b_16_swag": ("ViT_B_16_Weights", "IMAGENET1K_SWAG_E2E_V1"),
    "vit_b_16_swag_linear": ("ViT_B_16_Weights", "IMAGENET1K_SWAG_LINEAR_V1"),
    "vit_b_32": ("ViT_B_32_Weights", "IMAGENET1K_V1"),
    "vit_l_16": ("ViT_L_16_Weights", "IMAGENET1K_V1"),
    "vit_l_16_swag": ("ViT_L_16_Weights", "IMAGENET1K_SWAG_E2E_V1"),
    "vit_l_16_swag_linear": ("ViT_L_16_Weights", "IMAGENET1K_SWAG_LINEAR_V1"),
}
# timm tag -> our architecture.
TIMM = {
    "vit_small_patch16_224.augreg_in21k_ft_in1k": "vit_s16",
    "vit_small_patch16_384.augreg_in21k_ft_in1k": "vit_s16",
    "vit_base_patch16_224.augreg2_in21k_ft_in1k": "vit_b16",
    "vit_base_patch16_224.augreg_in21k_ft_in1k": "vit_b16",
    "vit_base_patch16_384.augreg_in21k_ft_in1k": "vit_b16",
    "vit_base_patch32_224.augreg_in21k_ft_in1k": "vit_b32",
    "vit_base_patch32_384.augreg_in21k_ft_in1k": "vit_b32",
    "vit_large_patch16_224.augreg_in21k_ft_in1k": "vit_l16",
    "vit_large_patch16_384.augreg_in21k_ft_in1k": "vit_l16",
    **{f"vit_{name}_patch14{reg}_dinov2.lvd142m": f"dinov2_{size}14{reg}"
       for name, size in (("small", "s"), ("base", "b"), ("large", "l")) for reg in ("", "_reg4")},
}
AUGREG = sorted(tag.split(".")[0] for tag in TIMM if tag.endswith(".augreg_in21k_ft_in1k"))
DINOV2 = [f"vit{size}14{reg}" for size in "sbl" for reg in ("", "_reg4")]
VIT_IDS = ([f"torchvision:{i}" for i in TORCHVISION] + [f"timm:{t}" for t in TIMM]
           + [f"augreg:{a}" for a in AUGREG] + [f"dinov2:{d}" for d in DINOV2])


@pytest.fixture(scope="module")
def torchvision():
  pytest.importorskip("torch")
  from torch_models import import_torchvision
  return import_torchvision()


@pytest.fixture(scope="module")
def timm(torchvision):
  return pytest.importorskip("timm")


def timm_eval(timm, cfg):
  """timm's own eval transform of a pretrained cfg: (resize, crop, interpolation, mean, std)."""
  data = timm.data.resolve_data_config({}, pretrained_cfg=cfg.to_dict())
  steps = timm.data.create_transform(**data, is_training=False).transforms
  resize, crop = steps[0], steps[1]
  size = resize.size if isinstance(resize.size, int) else resize.size[0]
  return (size, crop.size[0], resize.interpolation.value, data["mean"], data["std"])


def ours(source_id):
  """The same five values from our registry, through the public preprocessing config."""
  config = resolve_data_config(source_id)
  return (config.resize_size, config.input_size, config.interpolation, config.mean, config.std)


# ------------------------------------------------------------------ records vs the publishers


def test_every_vit_record_is_listed_and_fits_a_registered_model():
  assert set(VIT_IDS) <= set(weights.ids())
  for source_id in VIT_IDS:
    entry = sources.get(source_id)
    assert models.spec(entry.arch).name == entry.arch
    assert entry.variant is None


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_records_follow_the_weights_enums(torchvision, name):
  enum, member = TORCHVISION[name]
  published = getattr(getattr(torchvision.models, enum), member)
  entry = sources.get(f"torchvision:{name}")
  assert entry.url == published.url
  # torch.hub's `<name>-<sha256 prefix>.pth`: the prefix is the check.
  assert (entry.hash_kind, entry.hash) == ("sha256_prefix", published.url[:-4].rsplit("-", 1)[1])
  assert (entry.format, entry.include_top, entry.preprocess) == ("torch_pth", True, "torch")
  t = published.transforms()
  assert ours(entry.id) == (t.resize_size[0], t.crop_size[0], t.interpolation.value,
                            tuple(t.mean), tuple(t.std))
  assert entry.input_size == published.meta["min_size"][0]


@pytest.mark.parametrize("tag", sorted(TIMM))
def test_timm_records_follow_the_pretrained_cfg(timm, tag):
  cfg = timm.models.get_pretrained_cfg(tag)
  entry = sources.get(f"timm:{tag}")
  assert cfg.hf_hub_id == f"timm/{tag}"
  assert entry.url == f"https://huggingface.co/timm/{tag}/resolve/main/model.safetensors"
  assert entry.filename == f"{tag}.safetensors"  # Every Hub file is `model.safetensors`.
  assert (entry.hash_kind, entry.hash, entry.format) == ("none", "", "safetensors")
  assert entry.arch == TIMM[tag] and entry.include_top == (cfg.num_classes > 0)
  assert cfg.test_input_size is None  # timm's validate.py then evaluates at input_size.
  assert entry.resize_size == math.floor(cfg.input_size[-1] / cfg.crop_pct)
  want = timm_eval(timm, cfg)
  assert ours(entry.id)[:3] == want[:3]
  np.testing.assert_allclose(ours(entry.id)[3:], want[3:], rtol=1e-6)
  assert entry.preprocess == ("tf" if cfg.mean == (0.5, 0.5, 0.5) else "torch")


@pytest.mark.parametrize("arch", AUGREG)
def test_augreg_records_are_the_files_timm_converts(timm, arch):
  """Google's `.npz` behind timm's AugReg tag, evaluated as Google's input pipeline does."""
  cfg = timm.models.get_pretrained_cfg(f"{arch}.augreg_in21k_ft_in1k")
  entry = sources.get(f"augreg:{arch}")
  assert entry.url == cfg.url and entry.url.startswith("https://storage.googleapis.com/")
  assert entry.arch == sources.get(f"timm:{arch}.augreg_in21k_ft_in1k").arch
  assert (entry.hash_kind, entry.format, entry.include_top) == ("none", "npz", True)
  size = cfg.input_size[-1]
  assert entry.url.endswith(f"-res_{size}.npz")
  assert eval_geometry(entry.id) == EvalGeometry(size, None, "bilinear")  # Squashed.
  assert ours(entry.id)[3:] == ((0.5,) * 3, (0.5,) * 3)  # (x - 127.5) / 127.5


@pytest.mark.parametrize("name", DINOV2)
def test_dinov2_records_are_its_own_files_with_its_linear_eval(timm, name):
  size, reg = name[3], "_reg4" if name.endswith("_reg4") else ""
  long = {"s": "small", "b": "base", "l": "large"}[size]
  cfg = timm.models.get_pretrained_cfg(f"vit_{long}_patch14{reg}_dinov2.lvd142m")
  entry = sources.get(f"dinov2:{name}")
  assert entry.url == cfg.url and entry.url.startswith("https://dl.fbaipublicfiles.com/dinov2/")
  assert entry.arch == f"dinov2_{size}14{reg}"
  assert (entry.hash_kind, entry.format, entry.include_top) == ("none", "torch_pth", False)
  assert ours(entry.id) == (256, 224, "bicubic", IMAGENET_MEAN, IMAGENET_STD)


def test_a_cache_file_name_is_one_file():
  """Two ids may share a cached file only when it is the same file, proven by a published hash;
  files without one (all of the Hub's are `model.safetensors`) each have their own name."""
  by_name = {}
  for entry in weights.registry():
    by_name.setdefault(entry.filename, []).append(entry)
  for name, entries in by_name.items():
    if len(entries) > 1:
      assert len({(e.hash_kind, e.hash) for e in entries}) == 1 and entries[0].published_hash, name
  assert "model.safetensors" not in by_name
  assert sources.official_file("/somewhere/model.safetensors") is None


def test_an_official_file_name_is_its_record(tmp_path):
  """A file downloaded by hand under its registry name takes its publisher's recipe."""
  entry = sources.get("augreg:vit_base_patch16_384")
  parsed = sources.resolve(str(tmp_path / entry.filename))
  assert (parsed.entry, parsed.framework, parsed.preprocess) == (entry, "jax", "tf")
  assert (parsed.resize_size, parsed.input_size) == (None, 384)
  parsed = sources.resolve(str(tmp_path / "dinov2_vitb14_reg4_pretrain.pth"))
  assert parsed.entry.id == "dinov2:vitb14_reg4" and parsed.include_top is False


# ------------------------------------------------------- a download without a published hash

TAG = "vit_small_patch16_224.augreg_in21k_ft_in1k"
HUB_ID = f"timm:{TAG}"
BODY = os.urandom(200_000)


@pytest.fixture
def mirror(weight_server, monkeypatch):
  """`TRANSFER_WEIGHTS_URL_BASE` at the local server, which serves the Hub file as `<tag>
  .safetensors` (its cached name: the Hub's own name is the same for every tag)."""
  monkeypatch.setenv("TRANSFER_WEIGHTS_URL_BASE", weight_server.url("/mirror"))
  weight_server.files[f"/mirror/{TAG}.safetensors"] = (BODY, len(BODY))
  return weight_server


def sha256(data):
  return hashlib.sha256(data).hexdigest()


def download(capsys, source_id=HUB_ID):
  assert cli_main.run(["weights", "download", source_id]) == 0
  return capsys.readouterr()


def test_download_records_the_sha256_beside_the_file(mirror, capsys):
  path = download(capsys).out.strip()
  assert path == sources.cached_path(sources.get(HUB_ID))
  assert os.path.basename(path) == f"{TAG}.safetensors" and open(path, "rb").read() == BODY
  assert sorted(os.listdir(os.path.dirname(path))) == [f"{TAG}.safetensors",
                                                       f"{TAG}.safetensors.sha256"]
  # `sha256sum -c` reads it.
  assert open(path + ".sha256").read() == f"{sha256(BODY)}  {TAG}.safetensors\n"
  before = len(mirror.requests)
  assert weights.resolve(HUB_ID)[0] == path and download(capsys).out.strip() == path
  assert len(mirror.requests) == before  # A good cached file is used, not fetched again.


@pytest.mark.parametrize("declared", [len(BODY) + 1, None], ids=["short", "no_length"])
def test_a_download_without_the_announced_size_saves_nothing(mirror, capsys, declared):
  mirror.files[f"/mirror/{TAG}.safetensors"] = (BODY, declared)
  with pytest.raises(SystemExit) as e:
    cli_main.main(["weights", "download", HUB_ID])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1 and "nothing was saved" in err
  said = (f"got {len(BODY)} of {declared} bytes" if declared
          else "sent no Content-Length, and no hash is published for it")
  assert said in err
  cache = sources.cache_dir()
  assert not os.path.exists(cache) or os.listdir(cache) == []


def change_one_byte(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF  # Same size: only the hash can tell.
  open(path, "wb").write(bytes(data))
  return sha256(bytes(data))


def test_a_changed_cached_file_is_refused_on_every_use(mirror, capsys):
  path = download(capsys).out.strip()
  changed = change_one_byte(path)
  want = (f"cached file {path} differs from the sha256 recorded when it was downloaded (got "
          f"{changed}, recorded {sha256(BODY)} in {path}.sha256; no hash is published for it); "
          f"run transfer weights download {HUB_ID}")
  with pytest.raises(UserError) as e:
    weights.resolve(HUB_ID)
  assert one_line_error(e) == want
  with pytest.raises(UserError) as e:
    weights.resolve(HUB_ID + "?")  # Use-if-cached is a use too.
  assert one_line_error(e) == want
  with pytest.raises(SystemExit) as e:
    cli_main.main(["weights", "info", HUB_ID])
  assert e.value.code == 2 and capsys.readouterr().err == f"transfer: error: {want}\n"
  # The fix it names: download again, which replaces the file and its record.
  err = download(capsys).err
  assert f"transfer: cached file {path} differs from the sha256 recorded" in err
  assert open(path, "rb").read() == BODY
  assert open(path + ".sha256").read().split()[0] == sha256(BODY)
  assert weights.resolve(HUB_ID)[0] == path


def test_a_file_placed_by_hand_is_recorded_at_first_use(capsys):
  """No network: the file is placed where the error said; its sha256 is recorded then, and a
  later change is caught as for a download."""
  entry = sources.get("dinov2:vits14")
  path = sources.cached_path(entry)
  os.makedirs(os.path.dirname(path))
  open(path, "wb").write(BODY)
  assert weights.resolve(entry.id) == (path, entry)
  err = capsys.readouterr().err
  assert err == (f"transfer: {path} has no published hash; recorded its sha256 {sha256(BODY)} "
                 f"in {path}.sha256\n")
  change_one_byte(path)
  with pytest.raises(UserError, match="differs from the sha256 recorded"):
    weights.resolve(entry.id)


def test_weights_list_says_which_files_have_no_published_hash(mirror, capsys):
  download(capsys)
  assert cli_main.run(["weights", "list"]) == 0
  by_id = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
  unhashed = "(no published hash: size checked, sha256 recorded at download)"
  for source_id in VIT_IDS:
    assert (unhashed in by_id[source_id]) == (not source_id.startswith("torchvision:"))
  assert unhashed not in by_id["keras:vgg16"] and unhashed not in by_id["timm:resnet50.a1_in1k"]
  line = by_id[HUB_ID]
  assert f"{mirror.url('/mirror')}/{TAG}.safetensors  [cached at " in line
  assert "vit_s16" in line and "preprocess=tf" in line


# ------------------------------------------------------------------ .npz by its structure

ARRAYS = {"Transformer/encoderblock_0/LayerNorm_0/scale": np.arange(4, dtype=np.float32),
          "Transformer/encoderblock_0/LayerNorm_0/bias": np.ones(4, np.float32),
          "embedding/kernel": np.zeros((2, 2, 3, 4), np.float32),
          "cls": np.full((1, 1, 4), 0.5, np.float32)}


def write_npz(path, arrays=ARRAYS):
  with open(path, "wb") as f:  # A file object: np.savez adds no `.npz` to the name.
    np.savez(f, **arrays)
  return str(path)


@pytest.mark.parametrize("name", ["augreg.npz", "weights.bin", "model"])
def test_npz_is_recognised_by_structure_whatever_its_name(tmp_path, name):
  path = write_npz(tmp_path / name)
  assert formats.detect_format(path) == "npz"
  with formats.open_weights(path) as wf:
    assert wf.format == "npz"
    assert {layer: [t.name for t in ts] for layer, ts in wf.layers.items()} == {
        "Transformer/encoderblock_0/LayerNorm_0": [
            "Transformer/encoderblock_0/LayerNorm_0/scale",
            "Transformer/encoderblock_0/LayerNorm_0/bias"],
        "embedding": ["embedding/kernel"], "cls": ["cls"]}
    tensors = {t.name: t for ts in wf.layers.values() for t in ts}
    for key, array in ARRAYS.items():
      assert tensors[key].shape == array.shape
      np.testing.assert_array_equal(tensors[key].read(), array)


def test_other_zips_are_not_taken_for_npz(tmp_path, keras):
  """A Keras 3 `.keras` archive and a torch `.pth` are zips too; their names do not matter."""
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])
  archive = tmp_path / "model.keras"
  model.save(str(archive))
  renamed = tmp_path / "model.npz"
  os.replace(archive, renamed)
  assert formats.detect_format(str(renamed)) == "keras3_h5"
  torch = pytest.importorskip("torch")
  pth = tmp_path / "state.npz"
  torch.save({"fc.weight": torch.zeros(2, 3)}, pth)
  assert formats.detect_format(str(pth)) == "torch_pth"
  with zipfile.ZipFile(tmp_path / "mixed.zip", "w") as z:  # One non-array member: not an npz.
    z.writestr("a.npy", b"")
    z.writestr("notes.txt", b"")
  assert formats.detect_format(str(tmp_path / "mixed.zip")) == "torch_pth"


def test_a_cut_npz_is_one_line_error(tmp_path):
  path = write_npz(tmp_path / "cut.bin")
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])
  assert formats.detect_format(path) == "npz"  # From its first member's name.
  with pytest.raises(UserError) as e:
    with formats.open_weights(path):
      pass
  assert one_line_error(e).startswith(f"cannot read {path}: truncated or corrupt .npz file")


def test_a_corrupt_npz_member_is_one_line_error_when_read(tmp_path):
  path = write_npz(tmp_path / "w.npz", {"big/kernel": np.arange(4096, dtype=np.float32)})
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF  # Inside the array's bytes: the zip's CRC check fails.
  open(path, "wb").write(bytes(data))
  with formats.open_weights(path) as wf:
    [tensor] = wf.layers["big"]
    assert tensor.shape == (4096,)
    with pytest.raises(UserError) as e:
      tensor.read()
  assert one_line_error(e).startswith(f"cannot read big/kernel from {path}: truncated or corrupt")


def test_an_npz_of_python_objects_is_refused_not_unpickled(tmp_path):
  path = write_npz(tmp_path / "w.npz", {"head/kernel": np.array([{"a": 1}], dtype=object)})
  with formats.open_weights(path) as wf:
    with pytest.raises(UserError, match="cannot read head/kernel"):
      wf.layers["head"][0].read()


def test_an_npz_file_takes_googles_recipe(tmp_path):
  """A `.npz` of no registered architecture: written by a JAX program, [-1, 1], squashed."""
  parsed = sources.resolve(write_npz(tmp_path / "mine.bin"))
  assert (parsed.format, parsed.framework, parsed.preprocess) == ("npz", "jax", "tf")
  assert (parsed.arch, parsed.resize_size, parsed.input_size) == (None, None, 224)


def test_a_hashless_id_downloads_records_and_loads_into_its_model(weight_server, monkeypatch,
                                                                   timm, tmp_path):
  """The user's path end to end: `weights.load` of an id with no published hash downloads the
  file (size checked), records it, loads it strictly; once changed, the next load refuses it."""
  import torch
  from safetensors.torch import save_file
  torch.manual_seed(0)
  net = timm.models.vision_transformer.VisionTransformer(
      img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=1000)
  save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "served")
  data = (tmp_path / "served").read_bytes()
  tag = "vit_b16_tiny.test"
  entry = sources.WeightSource(
      id=f"timm:{tag}", arch="vit_b16_tiny", url=f"https://huggingface.co/timm/{tag}/resolve/main/"
      "model.safetensors", hash_kind="none", hash="", format="safetensors", include_top=True,
      preprocess="tf", resize_size=248, interpolation="bicubic", file=f"{tag}.safetensors")
  monkeypatch.setitem(sources._SOURCES, entry.id, entry)
  weight_server.files[f"/mirror/{tag}.safetensors"] = (data, len(data))
  monkeypatch.setenv("TRANSFER_WEIGHTS_URL_BASE", weight_server.url("/mirror"))
  model = models.get("vit_b16_tiny", include_top=True)
  params, report = weights.load(entry.id, model, image_size=32, return_report=True)
  path = sources.cached_path(entry)
  assert report.path == path and report.loaded and not report.fresh
  assert open(path + ".sha256").read().split()[0] == sha256(data)
  np.testing.assert_allclose(np.asarray(params["predictions"]["bias"]),
                             net.state_dict()["head.bias"].numpy())
  change_one_byte(path)
  with pytest.raises(UserError) as e:
    weights.load(entry.id, model, image_size=32)
  assert one_line_error(e).startswith(f"cached file {path} differs from the sha256 recorded")
