"""Strict loading, fresh heads, error messages, the registry and `transfer weights` commands.

Files are generated from random arrays shaped like the tiny model (same layer names as VGG16,
1/16 widths) in the official layouts, so nothing is downloaded and every test is quick.
"""

import os
import sys

import jax
import numpy as np
import pytest

from transfer import main as cli_main
from transfer import models
from transfer import weights
from transfer.errors import UserError
from helpers import one_line_error
from transfer.weights import export, port, sources

pytestmark = pytest.mark.usefixtures("home")

TINY = "vgg16_tiny"
# The convolutional networks' records (the Vision Transformers' are tested in test_vit_sources.py).
CNN_FAMILIES = ("vgg", "resnet", "inception")


def random_params(arch, image_size=224, seed=0, **kw):
  """Random arrays in the model's param structure (cheaper than `init_params` on CPU)."""
  shapes = port.param_shapes(models.get(arch, **kw), image_size)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32) * 0.05, shapes)


def keras_file(path, arch=TINY, top=True, naming="keras1"):
  params = random_params(arch, include_top=top) if top else random_params(
      arch, models.spec(arch).min_image_size, include_top=False)
  layers = {"input_1": []}
  for name, arrays in export.keras_layers(params, models.spec(arch)).items():
    layers[name] = arrays
    if name.endswith(("conv2", "conv3")) and name[:6] in ("block1", "block2") or \
        name.endswith("conv3") and arch == TINY:
      layers[name[:6] + "_pool"] = []
  export.write_keras_h5(path, layers, naming=naming)
  return str(path), params


@pytest.fixture
def tiny_top(tmp_path):
  return keras_file(tmp_path / "tiny.h5")


@pytest.fixture
def tiny_notop(tmp_path):
  return keras_file(tmp_path / "tiny_notop.h5", top=False)


# --- merging -------------------------------------------------------------------------------------


def test_full_file_loads_every_layer_exactly(tiny_top):
  path, expected = tiny_top
  params, report = weights.load(path, models.get(TINY, include_top=True), return_report=True)
  assert report.loaded == models.spec(TINY).conv_layers + ("fc1", "fc2", "predictions")
  assert report.fresh == () and report.ignored == () and report.format == "keras_h5"
  assert report.path == path and report.source == path
  jax.tree.map(np.testing.assert_array_equal, params, expected)
  assert "loaded 16 layers" in report.summary()


def test_notop_file_into_new_head_keeps_head_fresh(tiny_notop):
  path, expected = tiny_notop
  model = models.get(TINY, head="flatten_dense", num_classes=2)
  params, report = weights.load(path, model, image_size=64, rng=3, return_report=True)
  assert report.loaded == models.spec(TINY).conv_layers
  assert report.fresh == ("head",) and report.ignored == ()
  assert "fresh: head" in report.summary()
  shapes = port.param_shapes(model, 64)
  assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda s: s.shape, shapes)
  np.testing.assert_array_equal(params["block3_conv2"]["kernel"],
                                expected["block3_conv2"]["kernel"])
  # The fresh head is a real initialisation, decided by `rng`.
  head = lambda p: p["head"]["hidden"]["kernel"]
  assert float(np.std(head(params))) > 0
  np.testing.assert_array_equal(head(weights.load(path, model, image_size=64, rng=3)),
                                head(params))
  assert not np.array_equal(head(weights.load(path, model, image_size=64, rng=4)), head(params))


@pytest.mark.parametrize("head", ["gap", "none"])
def test_top_of_file_is_ignored_for_another_head(tiny_top, head):
  path, _ = tiny_top
  kw = {"head": head, "num_classes": 5} if head != "none" else {"head": "none"}
  params, report = weights.load(path, models.get(TINY, **kw), image_size=64, return_report=True)
  assert report.ignored == ("fc1", "fc2", "predictions")
  assert report.fresh == (("head",) if head != "none" else ())
  assert "ignored for the new head: fc1, fc2, predictions" in report.summary()
  assert "fc1" not in params


def test_fresh_head_true_restarts_the_imagenet_top(tiny_top):
  path, expected = tiny_top
  params, report = weights.load(path, models.get(TINY, include_top=True), fresh_head=True,
                                return_report=True)
  assert report.fresh == ("fc1", "fc2", "predictions") == report.ignored
  assert not np.array_equal(params["fc1"]["kernel"], expected["fc1"]["kernel"])


def test_new_head_with_fresh_head_false_is_an_error(tiny_notop):
  with pytest.raises(UserError) as e:
    weights.load(tiny_notop[0], models.get(TINY, head="gap", num_classes=2), image_size=64,
                 fresh_head=False)
  assert "missing (1): head" in one_line_error(e)


def test_param_dtype_is_the_models(tiny_top):
  model = models.get(TINY, include_top=True, param_dtype="bfloat16")
  params = weights.load(tiny_top[0], model)
  assert params["fc1"]["kernel"].dtype == np.dtype("bfloat16")


# --- errors --------------------------------------------------------------------------------------


def test_notop_file_into_imagenet_top_names_the_cause(tiny_notop):
  with pytest.raises(UserError) as e:
    weights.load(tiny_notop[0], models.get(TINY, include_top=True))
  message = one_line_error(e)
  assert "no ImageNet top" in message and "missing (3): fc1, fc2, predictions" in message


def test_vgg19_file_into_vgg16(tmp_path):
  path, _ = keras_file(tmp_path / "vgg19_notop.h5", arch="vgg19", top=False)
  with pytest.raises(UserError) as e:
    weights.load(path, models.get("vgg16", include_top=False), image_size=32)
  message = one_line_error(e)
  assert "this is a vgg19 file, model is vgg16" in message
  assert "unexpected (3): block3_conv4, block4_conv4, block5_conv4" in message
  assert "block4_conv1/kernel file (3, 3, 256, 512) vs model" not in message  # Same shapes.


def test_vgg19_torch_file_into_vgg16(tmp_path):
  params = random_params("vgg19", 32, include_top=False)
  path = tmp_path / "vgg19.safetensors"
  export.write_safetensors(path, export.torch_state_dict(params, models.spec("vgg19")))
  with pytest.raises(UserError) as e:
    weights.load(str(path), models.get("vgg16", include_top=False), image_size=32)
  message = one_line_error(e)
  assert "this is a vgg19 file, model is vgg16" in message and "features.34" in message


def test_misshaped_layers_list_both_shapes(tiny_top):
  with pytest.raises(UserError) as e:
    weights.load(tiny_top[0], models.get("vgg16", include_top=True))
  message = one_line_error(e)
  assert "this is a vgg16_tiny file, model is vgg16" in message
  assert "block1_conv1/kernel file (3, 3, 3, 4) vs model (3, 3, 3, 64)" in message
  assert "fc1/kernel file (1568, 64) vs model (25088, 4096)" in message


def test_other_class_count_suggests_fresh_head(tiny_top):
  with pytest.raises(UserError) as e:
    weights.load(tiny_top[0], models.get(TINY, head="imagenet", num_classes=10))
  assert "pass fresh_head=True" in one_line_error(e)


def test_missing_bias_is_named(tmp_path):
  params = random_params(TINY, include_top=False)
  layers = export.keras_layers(params, models.spec(TINY))
  layers["block2_conv1"] = layers["block2_conv1"][:1]
  export.write_keras_h5(tmp_path / "x.h5", layers)
  with pytest.raises(UserError) as e:
    weights.load(str(tmp_path / "x.h5"), models.get(TINY, head="none"), image_size=32)
  message = one_line_error(e)
  assert "missing (1): block2_conv1/bias" in message and "unexpected" not in message


@pytest.mark.parametrize("fmt", ["h5", "safetensors", "pth"])
def test_truncated_file(tmp_path, fmt):
  params = random_params(TINY, include_top=False)
  path = tmp_path / f"cut.{fmt}"
  if fmt == "h5":
    export.write_keras_h5(path, export.keras_layers(params, models.spec(TINY)))
  else:
    state = export.torch_state_dict(params, models.spec(TINY))
    if fmt == "safetensors":
      export.write_safetensors(path, state)
    else:
      torch = pytest.importorskip("torch", reason="torch extra not installed")
      torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(UserError) as e:
    weights.load(str(path), models.get(TINY, head="none"), image_size=32)
  message = one_line_error(e)
  assert str(path) in message and ("truncated" in message or "corrupt" in message)


def test_not_a_weight_file(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("hello")
  with pytest.raises(UserError, match="cannot tell the format"):
    weights.load(str(path), models.get(TINY, head="none"), image_size=32)


@pytest.mark.parametrize("source, pattern", [
    ("keras:vgg17", "unknown weights id 'keras:vgg17'; valid ids: augreg:"),
    ("no/such/file.h5", "no weight file no/such/file.h5"),
])
def test_unknown_source(source, pattern):
  with pytest.raises(UserError) as e:
    weights.load(source, models.get(TINY, head="none"), image_size=32)
  assert pattern in one_line_error(e)


def test_registry_id_for_another_architecture_fails_before_downloading():
  with pytest.raises(UserError, match="weights keras:vgg19 are for vgg19, model is vgg16"):
    weights.load("keras:vgg19", models.get("vgg16", include_top=True))


def test_pth_without_torch_says_how_to_fix(tmp_path, monkeypatch):
  params = random_params(TINY, include_top=False)
  state = export.torch_state_dict(params, models.spec(TINY))
  export.write_safetensors(tmp_path / "w.safetensors", state)
  (tmp_path / "w.pth").write_bytes(b"PK\x03\x04 not really")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError.
  model = models.get(TINY, head="none")
  with pytest.raises(UserError, match="pip install torch"):
    weights.load(str(tmp_path / "w.pth"), model, image_size=32)
  loaded = weights.load(str(tmp_path / "w.safetensors"), model, image_size=32)
  np.testing.assert_allclose(loaded["block5_conv3"]["kernel"], params["block5_conv3"]["kernel"])


# --- registry and cache --------------------------------------------------------------------------


def test_registry_records_official_files():
  entries = {e.id: e for e in weights.registry()}
  assert sorted(entries) == weights.ids()
  assert {"keras:vgg16", "keras:vgg16_notop", "keras:vgg19", "keras:vgg19_notop",
          "torchvision:vgg16", "torchvision:vgg19", "torchvision:resnet50",
          "torchvision:resnet50_v1", "torchvision:resnet101", "torchvision:resnet101_v1",
          "torchvision:resnet152", "torchvision:resnet152_v1", "keras:resnet50",
          "keras:resnet50_notop"} <= set(entries)
  k16 = entries["keras:vgg16_notop"]
  assert k16.filename == "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
  assert k16.url.startswith("https://storage.googleapis.com/tensorflow/keras-applications/vgg16/")
  assert (k16.hash_kind, k16.hash) == ("md5", "6d6bbae143d832006294945121d1f1fc")
  assert entries["keras:vgg19"].hash == "cbe5617147190e668d6c5d5026f83318"
  assert not k16.include_top and entries["keras:vgg16"].include_top
  tv = entries["torchvision:vgg19"]
  assert tv.url == "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
  assert (tv.hash_kind, tv.hash, tv.include_top) == ("sha256_prefix", "dcbb9e9d", True)
  for entry in (e for e in entries.values() if e.arch.startswith(CNN_FAMILIES)):
    assert entry.preprocess == ("tf" if entry.arch == "inception_v3" else  # [-1, 1], both
                                "caffe" if entry.id.startswith("keras") else "torch")
    # Keras squashes; torchvision resizes the short side, then center-crops 224.
    assert (entry.resize_size is None) == entry.id.startswith("keras")


def test_cache_location_and_url_override(tmp_path, monkeypatch):
  entry = sources.get("torchvision:vgg16")
  assert sources.cached_path(entry) == str(tmp_path / "home" / "weights" / "vgg16-397923af.pth")
  assert sources.url_for(entry) == "http://127.0.0.1:9/none/vgg16-397923af.pth"
  monkeypatch.delenv("TRANSFER_WEIGHTS_URL_BASE")
  assert sources.url_for(entry) == entry.url
  monkeypatch.delenv("TRANSFER_HOME")
  assert sources.cache_dir().endswith(os.path.join(".cache", "transfer", "weights"))


@pytest.fixture
def tiny_entry(monkeypatch):
  entry = sources.WeightSource(id="keras:vgg16_tiny_notop", arch=TINY,
                               url="https://example.invalid/tiny/tiny_notop.h5", hash_kind="md5",
                               hash="0" * 32, format="keras_h5", include_top=False,
                               preprocess="caffe")
  monkeypatch.setitem(sources._SOURCES, entry.id, entry)
  return entry


def test_optional_id_in_cache_is_loaded(tiny_entry):
  path = sources.cached_path(tiny_entry)
  os.makedirs(os.path.dirname(path))
  _, expected = keras_file(path, top=False)
  params, report = weights.load(tiny_entry.id + "?", models.get(TINY, head="none"),
                                image_size=32, return_report=True)
  assert report.path == path and len(report.loaded) == 13
  np.testing.assert_array_equal(params["block1_conv1"]["bias"], expected["block1_conv1"]["bias"])


def test_optional_id_not_cached_gives_fresh_params_and_says_so(tiny_entry, tiny_notop):
  model = models.get(TINY, head="flatten_dense", num_classes=2)
  params, report = weights.load(tiny_entry.id + "?", model, image_size=64, rng=3,
                                return_report=True)
  assert report.format == "none" and report.path is None and report.loaded == ()
  assert report.fresh == models.spec(TINY).conv_layers + ("head",)
  assert "not in the cache" in report.summary() and sources.cached_path(tiny_entry) in report.note
  assert "transfer weights download keras:vgg16_tiny_notop" in report.note
  assert not os.path.exists(sources.cache_dir())  # Nothing fetched, nothing written.
  shapes = port.param_shapes(model, 64)
  assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda s: s.shape, shapes)
  # This was a full `init_params`; a fresh head next to loaded convs (initialised alone, which
  # is cheaper) gets the very same values for the same rng.
  loaded = weights.load(tiny_notop[0], model, image_size=64, rng=3)
  jax.tree.map(np.testing.assert_array_equal, loaded["head"], params["head"])


# --- info and the CLI ----------------------------------------------------------------------------


def test_info_lists_layers_shapes_and_format(tiny_top):
  meta = weights.info(tiny_top[0])
  assert (meta["format"], meta["arch"], meta["preprocess"]) == ("keras_h5", TINY, "caffe")
  assert [l["name"] for l in meta["layers"]][:2] == ["block1_conv1", "block1_conv2"]
  assert meta["layers"][-1]["weights"][0] == {"name": "predictions_W_1:0", "shape": [64, 1000]}
  expected = sum(a.size for a in jax.tree.leaves(tiny_top[1]))
  assert meta["num_params"] == expected


def test_info_of_torch_file_maps_names(tmp_path):
  params = random_params(TINY)
  export.write_safetensors(tmp_path / "t.safetensors",
                           export.torch_state_dict(params, models.spec(TINY)))
  meta = weights.info(str(tmp_path / "t.safetensors"))
  assert meta["format"] == "safetensors" and meta["preprocess"] == "torch"
  first = meta["layers"][0]
  assert first["name"] == "features.0" and first["model_name"] == "block1_conv1"
  assert {"name": "features.0.weight", "shape": [4, 3, 3, 3]} in first["weights"]


def test_cli_weights_info(tiny_top, capsys):
  assert cli_main.run(["weights", "info", tiny_top[0]]) == 0
  out = capsys.readouterr().out
  assert "format: keras_h5" in out and f"arch: {TINY}" in out
  assert "block1_conv1_W_1:0" in out and "3x3x3x4" in out and "fc1_W_1:0" in out


def test_cli_weights_list(tiny_entry, capsys):
  path = sources.cached_path(tiny_entry)
  os.makedirs(os.path.dirname(path))
  keras_file(path, top=False)
  assert cli_main.run(["weights", "list"]) == 0
  lines = capsys.readouterr().out.splitlines()
  by_id = {line.split()[0]: line for line in lines}
  assert set(weights.ids()) <= set(by_id)
  assert "not cached" in by_id["keras:vgg16"] and "vgg16_weights_tf_dim_ordering_tf_kernels.h5" \
      in by_id["keras:vgg16"]
  assert f"cached at {path}" in by_id[tiny_entry.id]


def test_cli_errors_are_one_line(capsys):
  with pytest.raises(SystemExit) as e:
    cli_main.main(["weights", "info", "keras:nope"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("transfer: error: unknown weights id 'keras:nope'") and "\n" not in err


def test_convert_script_round_trips(tiny_top, tmp_path):
  import runpy
  script = os.path.join(os.path.dirname(__file__), "..", "scripts", "convert_weights.py")
  convert = runpy.run_path(script)["convert"]
  out = str(tmp_path / "tiny.safetensors")
  assert convert(tiny_top[0], out) == TINY
  assert weights.info(out)["format"] == "safetensors"
  params = weights.load(out, models.get(TINY, include_top=True))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, tiny_top[1])


def test_convert_script_turns_a_torchvision_resnet_pth_into_safetensors(tmp_path):
  """A ResNet with its BatchNorm statistics: .pth -> .safetensors, every array unchanged."""
  torch = pytest.importorskip("torch", reason="torch extra not installed")
  import runpy
  script = os.path.join(os.path.dirname(__file__), "..", "scripts", "convert_weights.py")
  convert = runpy.run_path(script)["convert"]
  model = models.get("resnet50_tiny", include_top=True, variant="torchvision")
  rng = np.random.default_rng(3)
  variables = jax.tree.map(lambda s: rng.uniform(0.5, 2.0, s.shape).astype(np.float32),
                           port.variable_shapes(model, 224))
  state = export.torch_state_dict(variables["params"], models.spec("resnet50_tiny"),
                                  variables["batch_stats"])
  src = str(tmp_path / "r.pth")
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, src)
  out = str(tmp_path / "r.safetensors")
  assert convert(src, out) == "resnet50_tiny"
  loaded = weights.load_variables(out, model, image_size=224)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), variables)


def test_output_cut_short_by_its_reader_is_not_a_traceback(tmp_path):
  # `transfer weights list | head -0`: the reader is gone before anything is written.
  import subprocess
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
      repo, os.environ.get("PYTHONPATH")]))}
  read_end, write_end = os.pipe()
  os.close(read_end)
  try:
    proc = subprocess.run([sys.executable, "-m", "transfer.main", "weights", "list"],
                          stdout=write_end, stderr=subprocess.PIPE, env=env, timeout=600)
  finally:
    os.close(write_end)
  assert "Traceback" not in proc.stderr.decode() and "BrokenPipeError" not in proc.stderr.decode()
  assert proc.returncode == 141


@pytest.mark.parametrize("variant, layout", [("torchvision", "safetensors"),
                                             ("keras", "keras1"), ("keras", "keras2")])
def test_a_resnet_round_trips_with_its_batch_norm(tmp_path, variant, layout):
  """export -> file -> strict load gives back every param and running statistic bit for bit."""
  arch = "resnet50_tiny"
  shapes = port.variable_shapes(models.get(arch, include_top=True, variant=variant), 32)
  rng = np.random.default_rng(2)
  variables = jax.tree.map(lambda s: rng.uniform(0.5, 2.0, s.shape).astype(np.float32), shapes)
  spec = models.spec(arch)
  if layout == "safetensors":
    state = export.torch_state_dict(variables["params"], spec, variables["batch_stats"])
    bn = "layer4.0.downsample.1"
    assert [k for k in state if k.startswith(bn + ".")] == [
        f"{bn}.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                              "num_batches_tracked")]
    assert state[f"{bn}.num_batches_tracked"].dtype == np.int64
    assert "conv1.bias" not in state  # torchvision's convolutions have no bias
    assert state["fc.weight"].shape == (1000, 128)
    path = tmp_path / "r.safetensors"
    export.write_safetensors(path, state)
  else:
    layers = export.keras_layers(variables["params"], spec, variables["batch_stats"])
    assert len(layers["conv5_block3_3_bn"]) == 4 and len(layers["conv1_conv"]) == 2
    path = tmp_path / "r.h5"
    export.write_keras_h5(path, layers, naming=layout)
  model = models.get(arch, include_top=True, variant=variant)
  loaded = weights.load_variables(str(path), model, image_size=32)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), variables)


def test_torch_export_of_batch_norm_needs_the_statistics():
  shapes = port.variable_shapes(models.get("resnet50_tiny", head="none"), 32)
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes["params"])
  with pytest.raises(ValueError, match="conv1_bn is a BatchNorm layer: pass batch_stats"):
    export.torch_state_dict(params, models.spec("resnet50_tiny"))


# What each publisher's own loader feeds its weights, written out from their code rather than
# read from our registry: keras.applications' `preprocess_input` (vgg16/resnet: caffe; inception_v3:
# tf), torchvision's `ImageClassification` (mean/std; its InceptionV3 transform too, but the
# Google port sets `transform_input` to map mean/std input back to [-1, 1]), timm's cfg mean/std.
# ViTs: torchvision's mean/std (SWAG too); timm's AugReg and Google's own files 0.5/0.5 ([-1, 1]);
# DINOv2 mean/std, from timm or its own files.
PUBLISHED_MODE = {("keras", "vgg"): "caffe", ("keras", "resnet"): "caffe",
                  ("keras", "inception"): "tf", ("torchvision", "vgg"): "torch",
                  ("torchvision", "resnet"): "torch", ("torchvision", "inception"): "tf",
                  ("timm", "resnet"): "torch", ("torchvision", "vit"): "torch",
                  ("timm", "vit"): "tf", ("augreg", "vit"): "tf", ("timm", "dinov2"): "torch",
                  ("dinov2", "vit"): "torch"}
# Which form each publisher's ResNet and InceptionV3 are: Keras v1, torchvision/timm v1.5; Keras'
# scale-less InceptionV3, torchvision's with scale.
PUBLISHED_VARIANT = {"keras": "keras", "torchvision": "torchvision", "timm": "torchvision"}


@pytest.mark.parametrize("source_id", sources.ids())
def test_mode_and_variant_of_every_registry_id_are_its_publishers(source_id):
  framework, name = source_id.split(":")
  family = "dinov2" if "dinov2" in name else next(
      f for f in ("vgg", "resnet", "inception", "vit") if name.startswith(f))
  arch = sources.get(source_id).arch
  assert weights.mode_for(source_id) == PUBLISHED_MODE[framework, family]
  assert weights.mode_for(source_id + "?") == PUBLISHED_MODE[framework, family]
  want = PUBLISHED_VARIANT[framework] if family in ("resnet", "inception") else None
  assert weights.variant_for(source_id, arch) == want
  # The mode is what the pipeline applies: the same pixels through each publisher's formula.
  x = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3) * 2.5
  got = weights.preprocess(x.astype(np.uint8), source_id)
  formula = {"caffe": lambda v: v[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32),
             "torch": lambda v: (v / 255 - np.array([0.485, 0.456, 0.406], np.float32))
             / np.array([0.229, 0.224, 0.225], np.float32),
             "tf": lambda v: v / 127.5 - 1}[PUBLISHED_MODE[framework, family]]
  np.testing.assert_allclose(got, formula(x.astype(np.uint8).astype(np.float32)), rtol=1e-5,
                             atol=1e-5)
