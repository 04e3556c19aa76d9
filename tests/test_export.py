"""`transfer export`: each format, run in its own runtime, gives `transfer predict`'s
probabilities, and carries the run's class names and input size."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageDraw

from transfer import checkpoint, export, main, models, predict, runs, train
from transfer.data import images as image_ops
from transfer.errors import UserError
from transfer.export import serving, to_onnx, to_stablehlo
from transfer.weights import export as weight_files
from transfer.weights import port
from helpers import calibrated_statistics, cli_probabilities, snapshot, tiny_config

pytestmark = pytest.mark.usefixtures("home")

ATOL = 1e-4  # float32: the artifact against `transfer predict --json`
# bfloat16 compute against float32 predict: 8 significant bits (2**-8 relative per rounding)
# through ~50 layers; measured 4-5e-3 on the ResNet run's probabilities.
BF16_ATOL = 3e-2


def _photo(rng, size):
  """A photo-like image: a smooth two-colour gradient with a few filled shapes."""
  w, h = size
  t = np.linspace(0, 1, w)[None, :, None] * np.linspace(0.3, 1, h)[:, None, None]
  a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
  image = Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  for _ in range(3):
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    box = (x0, y0, x0 + rng.integers(w // 8, w // 2), y0 + rng.integers(h // 8, h // 2))
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
  return image


def _dataset(root, classes, per_class=6):
  rng = np.random.default_rng(1)
  for name in classes:
    os.makedirs(root / name, exist_ok=True)
    for i in range(per_class):
      _photo(rng, (40, 40)).save(root / name / f"{i}.png")
  return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """Five images of several sizes and shapes, JPEG and PNG, one grayscale."""
  folder = tmp_path_factory.mktemp("photos")
  rng = np.random.default_rng(0)
  paths = []
  for i, size in enumerate([(64, 48), (40, 40), (120, 80), (33, 70), (50, 50)]):
    image = _photo(rng, size)
    path = folder / (f"{i}.jpg" if i % 2 else f"{i}.png")
    (image.convert("L") if i == 3 else image).save(path)
    paths.append(str(path))
  return paths


def _torch_vgg_weights(path):
  """Random vgg16_tiny conv weights as a torchvision-layout .safetensors (torch preprocessing)."""
  rng = np.random.default_rng(2)
  shapes = port.param_shapes(models.get("vgg16_tiny", include_top=False), 32)
  params = {layer: {n: rng.standard_normal(s.shape, dtype=np.float32) * 0.1
                    for n, s in p.items()} for layer, p in shapes.items()}
  weight_files.write_safetensors(path, weight_files.torch_state_dict(
      params, models.spec("vgg16_tiny")))
  return str(path)


def _keras_resnet_weights(path):
  """Random resnet50_tiny (Keras variant) weights with non-trivial BatchNorm statistics, as a
  Keras .h5 (caffe preprocessing)."""
  net = models.get("resnet50_tiny", include_top=False, variant="keras")
  variables = models.init_variables(net, 32, 3)
  rng = np.random.default_rng(3)
  stats = {layer: {"mean": rng.normal(0, 0.3, s["mean"].shape).astype(np.float32),
                   "var": rng.uniform(0.5, 2.0, s["var"].shape).astype(np.float32)}
           for layer, s in variables["batch_stats"].items()}
  params = jax.tree_util.tree_map(np.array, variables["params"])
  # caffe inputs span +-128: a smaller first conv keeps the logits, and so the probabilities
  # compared below, away from saturation, where any two programs agree.
  params["conv1_conv"]["kernel"] /= 64.0
  weight_files.write_keras_h5(path, weight_files.keras_layers(
      params, models.spec("resnet50_tiny"), stats), naming="keras2")
  return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Two short runs on a folder of images, shared by the tests below:
  `vgg`: vgg16_tiny from torchvision-layout weights, flatten_dense head, two classes (one
  sigmoid logit), evaluated on a center crop (eval_crop 0.8);
  `resnet`: resnet50_tiny from Keras weights with BatchNorm statistics, GAP head, three
  classes (softmax), its last block training (so its statistics move)."""
  root = tmp_path_factory.mktemp("export_runs")
  two = _dataset(root / "two", ["cat", "dog"])
  three = _dataset(root / "three", ["ant", "bee", "cow"])
  common = dict(num_steps=2, eval_every_steps=2, checkpoint_every_steps=2, batch_size=4,
                val_fraction=0.25, augment="none")
  configs = {
      "vgg": tiny_config(dataset=f"folder:{two}", eval_crop=0.8,
                         weights=_torch_vgg_weights(root / "vgg.safetensors"), **common),
      "resnet": tiny_config(model="resnet50_tiny", head="gap", dataset=f"folder:{three}",
                            weights=_keras_resnet_weights(root / "resnet.h5"),
                            trainable=["^head/", "^conv5_block3_"], **common),
  }
  workdirs = {}
  for name, config in configs.items():
    workdirs[name] = str(root / name)
    train.train_and_evaluate(config, workdirs[name])
  return workdirs


def _predict_json(workdir, paths, capsys):
  """`transfer predict --json` probabilities, (N, classes) in class order."""
  return cli_probabilities(["predict", "--workdir", workdir, *paths], capsys)


def _inputs(workdir, paths):
  """The uint8 images `transfer predict` classifies: squashed to the stored size, center crop."""
  meta = serving.load_serving_model(workdir).metadata
  stored = np.stack([predict.load_image(p, meta["resize_to"]) for p in paths])
  return image_ops.center_crop(stored, meta["image_size"])


def _run_stablehlo_without_transfer(path, batches, tmp_path):
  """Runs a StableHLO artifact in a fresh Python that imports only jax and numpy."""
  np.savez(tmp_path / "in.npz", *batches)
  script = textwrap.dedent(f"""
      import sys, numpy as np, jax
      exported = jax.export.deserialize(bytearray(open({path!r}, "rb").read()))
      inputs = np.load({str(tmp_path / "in.npz")!r})
      outs = [np.asarray(exported.call(inputs[k])) for k in sorted(inputs.files)]
      np.savez({str(tmp_path / "out.npz")!r}, *outs)
      assert not any(m == "transfer" or m.startswith("transfer.") for m in sys.modules)
      print(str(exported.in_avals[0].shape))
  """)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                        cwd=str(tmp_path), check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  outs = np.load(tmp_path / "out.npz")
  return [outs[f"arr_{i}"] for i in range(len(batches))], done.stdout.strip()


def _run_onnx(path, batches):
  import onnx
  import onnxruntime as ort
  model = onnx.load(path)
  onnx.checker.check_model(model, full_check=True)
  assert model.opset_import[0].version == to_onnx.OPSET
  session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  (inp,), (out,) = session.get_inputs(), session.get_outputs()
  assert (inp.name, inp.type, out.name) == ("images", "tensor(uint8)", "probabilities")
  assert isinstance(inp.shape[0], str)  # a symbolic batch dimension
  props = {p.key: p.value for p in model.metadata_props}
  meta = {"class_names": json.loads(props["class_names"]), "image_size": int(props["image_size"])}
  return [session.run(["probabilities"], {"images": x})[0] for x in batches], meta


def _run_saved_model(path, batches):
  import tensorflow as tf
  loaded = tf.saved_model.load(path)
  serve = loaded.signatures["serving_default"]
  spec = serve.structured_input_signature[1]["images"]
  assert spec.dtype == tf.uint8 and spec.shape.as_list()[0] is None
  assert list(serve.structured_outputs) == ["probabilities"]
  meta = {"class_names": [c.decode() for c in loaded.class_names.numpy()],
          "image_size": int(loaded.image_size.numpy())}
  with open(os.path.join(path, "assets", "class_names.txt"), encoding="utf8") as f:
    assert f.read().splitlines() == meta["class_names"]
  return [serve(images=tf.constant(x))["probabilities"].numpy() for x in batches], meta


def _artifact_equals_predict(workdir, photos, fmt, tmp_path, capsys):
  """Exports `workdir` as `fmt`, runs the artifact in its own runtime on two batch sizes and
  checks it gives `transfer predict --json`'s probabilities; returns (artifact, its metadata,
  predict's probabilities)."""
  want = _predict_json(workdir, photos[:4], capsys)
  # informative probabilities: they differ between images and are not all saturated
  assert np.ptp(want, axis=0).max() > 1e-3 and want.max(axis=1).min() < 0.999
  artifact = export.export(workdir, fmt)
  assert artifact.path == export.default_path(workdir, fmt) and artifact.size_bytes > 0
  assert artifact.max_abs_diff <= ATOL
  x = _inputs(workdir, photos[:4])
  batches = [x[:3], x[3:4]]  # batch sizes 3 and 1 from one artifact
  if fmt == "stablehlo":
    outs, shape = _run_stablehlo_without_transfer(artifact.path, batches, tmp_path)
    assert shape.startswith("(N,")
    meta = to_stablehlo.read_metadata(artifact.path)
  elif fmt == "onnx":
    outs, meta = _run_onnx(artifact.path, batches)
  else:
    outs, meta = _run_saved_model(artifact.path, batches)
  got = np.concatenate(outs)
  assert got.shape == want.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
  return artifact, meta, want


@pytest.mark.parametrize("fmt", export.FORMATS)
@pytest.mark.parametrize("run", ["vgg", "resnet"])
def test_artifact_in_its_runtime_equals_predict(trained, photos, fmt, run, tmp_path, capsys):
  workdir = trained[run]
  artifact, meta, want = _artifact_equals_predict(workdir, photos, fmt, tmp_path, capsys)
  assert want.max() < 0.999  # none saturated
  record = json.load(open(os.path.join(workdir, "config.json")))
  classes = {"vgg": ["cat", "dog"], "resnet": ["ant", "bee", "cow"]}[run]
  assert meta["class_names"] == classes and meta["image_size"] == record["image_size"] == 32
  assert artifact.metadata["class_names"] == classes
  assert artifact.metadata["preprocessing"] == {"vgg": "torch", "resnet": "caffe"}[run]
  assert artifact.metadata["resize_to"] == {"vgg": 40, "resnet": 32}[run]


def _inception_weights(folder, variant):
  """Random inception_v3_tiny weights at 75 px in `variant`'s own file format (a Keras .h5, or a
  torchvision-layout .safetensors), with running statistics measured on data: with the fresh 0
  and 1, ~90 inference-mode BatchNorms leave every image with the same probabilities."""
  net = models.get("inception_v3_tiny", include_top=False, variant=variant)
  variables = models.init_variables(net, 75, 4)
  stats = calibrated_statistics(net, variables, 75)
  params = jax.tree_util.tree_map(np.array, variables["params"])
  spec = models.spec("inception_v3_tiny")
  if variant == "keras":
    path = os.path.join(folder, "inception.h5")
    weight_files.write_keras_h5(path, weight_files.keras_layers(params, spec, stats),
                                naming="keras2")
  else:
    path = os.path.join(folder, "inception.safetensors")
    weight_files.write_safetensors(path, weight_files.torch_state_dict(params, spec, stats))
  return path


@pytest.fixture(scope="module")
def inception_runs(tmp_path_factory):
  """InceptionV3 in both its forms (Keras: BatchNorm without scale; torchvision: with scale),
  tiny at its smallest input (75), each from a file in its own format (the form is read from the
  file), three classes, mixed10 training for two steps."""
  root = tmp_path_factory.mktemp("inception_runs")
  three = _dataset(root / "three", ["ant", "bee", "cow"])
  workdirs = {}
  for variant in ("keras", "torchvision"):
    workdirs[variant] = str(root / variant)
    train.train_and_evaluate(tiny_config(
        model="inception_v3_tiny", weights=_inception_weights(root, variant), head="gap",
        image_size=75, dataset=f"folder:{three}", trainable=["^head/", "^mixed10_"],
        num_steps=2, eval_every_steps=2, checkpoint_every_steps=2, batch_size=4,
        val_fraction=0.25, augment="none"), workdirs[variant])
  return workdirs


@pytest.mark.parametrize("fmt", export.FORMATS)
@pytest.mark.parametrize("variant", ["keras", "torchvision"])
def test_inception_v3_artifact_in_its_runtime_equals_predict(inception_runs, photos, fmt,
                                                             variant, tmp_path, capsys):
  workdir = inception_runs[variant]
  variables, saved = checkpoint.load_trained_variables(workdir)
  assert saved["run"]["variant"] == variant  # the form exported is the one asked for
  assert ("scale" in variables["params"]["stem_1a_bn"]) == (variant == "torchvision")
  _, meta, _ = _artifact_equals_predict(workdir, photos, fmt, tmp_path, capsys)
  assert meta["class_names"] == ["ant", "bee", "cow"] and meta["image_size"] == 75


@pytest.mark.parametrize("fmt", ["stablehlo", "saved_model"])
def test_bfloat16_export_runs_close_to_float32(trained, photos, fmt, capsys):
  workdir = trained["resnet"]
  want = _predict_json(workdir, photos, capsys)
  artifact = export.export(workdir, fmt, dtype="bfloat16")
  assert artifact.path.endswith(("model-bf16.stablehlo", "saved_model-bf16"))
  assert artifact.metadata["dtype"] == "bfloat16"
  got = np.asarray(export._module(fmt).run(artifact.path, _inputs(workdir, photos)))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=BF16_ATOL)
  assert np.abs(got - want).max() > 1e-5  # it did compute in bfloat16 (measured ~5e-3)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_cli_prints_path_size_and_python_that_runs(trained, photos, tmp_path, capsys):
  out = str(tmp_path / "m.stablehlo")
  assert main.run(["export", "--workdir", trained["vgg"], "--format", "stablehlo",
                   "--out", out, "--checkpoint", "best"]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert printed[0].startswith("exported stablehlo (") and printed[0].endswith(f"): {out}")
  assert "KB)" in printed[0] and "['cat', 'dog']" in printed[1]
  code = [line[2:] for line in printed[printed.index("run it on an image (Python):") + 1:]]
  code = [line.replace("'cat.jpg'", repr(photos[0])) for line in code]
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  done = subprocess.run([sys.executable, "-c", "\n".join(code)], capture_output=True, text=True,
                        env=env, cwd=str(tmp_path), check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  want = _predict_json(trained["vgg"], photos[:1], capsys)
  probs = np.fromstring(done.stdout.replace("[", " ").replace("]", " "), sep=" ")
  np.testing.assert_allclose(probs, want[0], atol=ATOL)


def test_workdir_without_checkpoints_is_one_line_error(tmp_path, capsys):
  with pytest.raises(UserError, match="no checkpoint in .*; train there first") as e:
    export.export(str(tmp_path / "empty"), "stablehlo")
  assert "\n" not in str(e.value)
  with pytest.raises(SystemExit) as exit_:
    main.main(["export", "--workdir", str(tmp_path / "empty"), "--format", "stablehlo"])
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("transfer: error: no checkpoint in") and err.count("\n") == 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(format="tflite"), "unknown export format 'tflite'; valid formats: stablehlo, onnx, "
                            "saved_model"),
    (dict(format="onnx", dtype="float16"), "unknown export dtype 'float16'; valid dtypes: "
                                           "float32, bfloat16"),
    (dict(format="onnx", dtype="bfloat16"), "ONNX has no bfloat16 convolution"),
])
def test_bad_format_or_dtype_is_one_line_error_before_any_loading(tmp_path, kwargs, message):
  with pytest.raises(UserError) as e:
    export.export(str(tmp_path / "nothing here"), **kwargs)
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("fmt,module,pip", [
    ("onnx", "jax2onnx", "pip install 'transfer[export]'"),
    ("onnx", "onnxruntime", "pip install 'transfer[export]'"),
    ("saved_model", "tensorflow", "pip install 'transfer[export]'"),
])
def test_missing_converter_names_the_pip_command(trained, monkeypatch, fmt, module, pip):
  monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
  with pytest.raises(UserError) as e:
    export.export(trained["vgg"], fmt)
  assert module in str(e.value) and pip in str(e.value) and "\n" not in str(e.value)


def test_out_of_the_wrong_kind_is_refused(trained, tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match="is a file; a SavedModel is a directory"):
    export.export(trained["vgg"], "saved_model", out=str(tmp_path / "file"))
  with pytest.raises(UserError, match="is a directory; name the onnx file"):
    export.export(trained["vgg"], "onnx", out=str(tmp_path))


def _export_error(argv, capsys) -> str:
  """The one line `transfer export ARGV` prints when it exits 2."""
  with pytest.raises(SystemExit) as e:
    main.main(["export", *argv])
  err = capsys.readouterr().err
  assert e.value.code == 2, err[-3000:]
  assert "Traceback" not in err
  lines = err.strip().splitlines()
  assert any(line.startswith("export: checkpoint step ") for line in lines), err
  assert [line for line in lines if line.startswith("transfer: error:")] == lines[-1:], err
  return lines[-1]


TARGETS = [("stablehlo", "m.stablehlo"), ("onnx", "m.onnx"), ("saved_model", "saved_model")]


@pytest.mark.parametrize("fmt,name", TARGETS)
def test_a_forbidden_target_is_one_line(trained, capsys, fmt, name):
  forbidden = "/sys/transfer-export-test/" + name  # refused to root as well (EPERM)
  line = _export_error(["--workdir", trained["vgg"], "--format", fmt, "--out", forbidden],
                       capsys)
  assert line.startswith("transfer: error: cannot create /sys/transfer-export-test for --out ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (chmod) folder")
@pytest.mark.parametrize("fmt,name", TARGETS)
def test_a_read_only_target_is_one_line(trained, tmp_path, capsys, fmt, name):
  folder = tmp_path / "read_only"
  folder.mkdir()
  folder.chmod(0o555)
  try:
    out = folder / name
    line = _export_error(["--workdir", trained["vgg"], "--format", fmt, "--out", str(out)],
                         capsys)
    assert line.startswith(f"transfer: error: cannot write the ") and "Permission denied" in line
    assert os.listdir(folder) == []
  finally:
    folder.chmod(0o755)


@pytest.mark.parametrize("fmt,name", TARGETS)
def test_a_read_only_file_system_is_one_line(trained, tmpfs, capsys, fmt, name):
  out = tmpfs("ro") / name  # read-only even to root
  line = _export_error(["--workdir", trained["vgg"], "--format", fmt, "--out", str(out)], capsys)
  assert line == (f"transfer: error: cannot write the {export.get_writer(fmt).title} to {out}: "
                  f"Read-only file system; free space or fix permissions there, or choose "
                  f"another --out")


@pytest.mark.parametrize("fmt", ["stablehlo", "onnx"])
def test_a_full_disk_is_one_line(trained, tmp_path, capsys, fmt):
  # /dev/full answers every write with ENOSPC, as a full disk does: the artifact's path is a
  # link to it (its extra files, beside the link, go to the real folder).
  out = tmp_path / f"model.{fmt}"
  os.symlink("/dev/full", out)
  line = _export_error(["--workdir", trained["vgg"], "--format", fmt, "--out", str(out)], capsys)
  assert line == (f"transfer: error: cannot write the {export.get_writer(fmt).title} to {out}: "
                  f"No space left on device; free space or fix permissions there, or choose "
                  f"another --out")


def test_export_skips_a_damaged_latest_step_moves_nothing_and_names_the_step(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(num_steps=4, checkpoint_every_steps=2,
                                       eval_every_steps=2), workdir)
  with open(os.path.join(workdir, "checkpoints", "4", "_CHECKPOINT_METADATA"), "w") as f:
    f.write("{not json")
  before = snapshot(workdir)
  capsys.readouterr()
  artifact = main.run(["export", "--workdir", workdir, "--format", "stablehlo", "--out",
                       str(tmp_path / "m.stablehlo")])
  assert artifact == 0
  assert "export: checkpoint step 2 (latest readable; 1 newer skipped)" in \
      capsys.readouterr().err.splitlines()
  assert snapshot(workdir) == before  # nothing moved into checkpoints_damaged/, nothing added


def test_ema_params_are_served_when_the_run_has_them():
  variables = {"params": {"w": 1}, "batch_stats": {"m": 2}, serving.EMA_KEY: {"w": 3}}
  assert serving.inference_params(variables) == ({"params": {"w": 3}, "batch_stats": {"m": 2}},
                                                 "ema")
  assert serving.inference_params({"params": {"w": 1}}) == ({"params": {"w": 1}}, "params")


def _random_model(name, head, outputs, variant=None, size=32):
  run = {"model": name, "head": head, "outputs": outputs, "head_hidden": None,
         "head_dropout": None, "dtype": "float32", "variant": variant, "preprocessing": "unit",
         "class_names": [f"c{i}" for i in range(max(2, outputs))], "image_size": size,
         "eval_crop": 1.0}
  net = runs.model_from_meta(run, conv="xla")
  variables = models.init_variables(net, size, 0)
  if "batch_stats" in variables:  # statistics away from (0, 1), so inference mode shows
    variables["batch_stats"] = jax.tree_util.tree_map(
        lambda v: v + 0.5, variables["batch_stats"])
  return net, variables, serving.ServingModel(serving.serving_function(run), variables,
                                              serving.artifact_metadata(run, "float32"))


@pytest.mark.parametrize("name,variant,head,outputs", [
    ("resnet50_tiny", "torchvision", "imagenet", 3),
    ("resnet50_tiny", "keras", "flatten_dense", 1),
    ("vgg16_tiny", None, "gap", 4),
    ("vit_b16_tiny", None, "gap", 3),  # pooled features: a mean over no axes (ONNX: see to_onnx)
    ("vit_b16_tiny", None, "imagenet", 3),
])
def test_every_head_and_variant_converts_to_onnx_and_stablehlo(name, variant, head, outputs,
                                                               tmp_path):
  """Random-init tiny models: ONNX (onnxruntime) and StableHLO equal the predict forward."""
  net, variables, model = _random_model(name, head, outputs, variant)
  x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8)
  from transfer import weights as weights_lib
  want = predict.make_forward(net)(variables, weights_lib.preprocess(x, "unit"))
  assert want.shape == (3, max(2, outputs))
  for module, path in [(to_onnx, tmp_path / "m.onnx"), (to_stablehlo, tmp_path / "m.shlo")]:
    module.write(model, str(path))
    for batch in (x[:1], x):
      np.testing.assert_allclose(np.asarray(module.run(str(path), batch)), want[:len(batch)],
                                 rtol=0, atol=ATOL)


@pytest.mark.parametrize("name,variant,head", [
    ("vgg16", None, "imagenet"), ("vgg19", None, "flatten_dense"),
    ("resnet50", "torchvision", "gap"), ("resnet50", "keras", "imagenet"),
    ("resnet101", "torchvision", "flatten_dense"), ("resnet152", "keras", "gap"),
])
def test_every_registry_model_exports_with_a_symbolic_batch(name, variant, head):
  """Full-size models at 224, traced on abstract variables (no weights): the serving program
  lowers with a polymorphic batch and gives (N, classes) probabilities."""
  outputs = {"imagenet": 1000, "flatten_dense": 1, "gap": 5}[head]
  run = {"model": name, "head": head, "outputs": outputs, "head_hidden": None,
         "head_dropout": None, "dtype": "float32", "variant": variant, "preprocessing": "caffe"}
  net = runs.model_from_meta(run, conv="xla")
  shapes = jax.eval_shape(lambda: models.init_variables(net, 224, 0))
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("N, 224, 224, 3"), jnp.uint8)
  exported = jax.export.export(jax.jit(serving.serving_function(run)))(shapes, spec)
  (out,) = exported.out_avals
  assert str(out.shape[0]) == "N" and out.shape[1] == max(2, outputs)


# --- one decode: an EXIF-rotated JPEG and an RGBA PNG are one picture in predict, eval, export ---


def _awkward_files(folder):
  """A JPEG stored sideways with EXIF orientation 6 (shown rotated 90 degrees clockwise) and a
  PNG whose alpha fades out over coloured pixels (shown over white)."""
  rng = np.random.default_rng(7)
  os.makedirs(folder, exist_ok=True)
  jpeg, png = str(folder / "sideways.jpg"), str(folder / "faded.png")
  exif = Image.Exif()
  exif[0x0112] = 6
  _photo(rng, (72, 40)).save(jpeg, quality=95, exif=exif.tobytes())
  rgba = np.dstack([np.asarray(_photo(rng, (48, 56))),
                    np.linspace(0, 255, 48)[None, :].repeat(56, 0).astype(np.uint8)])
  Image.fromarray(rgba, "RGBA").save(png)
  return jpeg, png


def test_an_exif_jpeg_and_an_rgba_png_give_one_answer_in_predict_eval_and_export(
    trained, tmp_path, capsys):
  import ml_collections
  from transfer import checkpoint
  from transfer import data as data_lib
  workdir = trained["vgg"]
  variables, meta = checkpoint.load_trained_variables(workdir)
  run = meta["run"]
  # A folder dataset whose validation split is the two files (and a train split beside them).
  root = tmp_path / "data"
  for name in ("cat", "dog"):
    os.makedirs(root / "train" / name)
    for i, picture in enumerate(_photo(np.random.default_rng(i), (40, 40)) for i in range(4)):
      picture.save(root / "train" / name / f"{i}.png")
  jpeg, png = _awkward_files(tmp_path / "awkward")
  os.makedirs(root / "validation" / "cat")
  os.makedirs(root / "validation" / "dog")
  os.link(jpeg, root / "validation" / "cat" / "sideways.jpg")
  os.link(png, root / "validation" / "dog" / "faded.png")
  config = ml_collections.ConfigDict(meta["config"])
  config.dataset = f"folder:{root}"
  ds = data_lib.create(config, preprocess_source=run["preprocessing"])
  batch = next(ds.eval_batches("val", 4))
  forward = predict.make_forward(runs.model_from_meta(run, dtype="float32"))
  evaluated = forward(runs.serving_variables(variables), batch["image"])[batch["mask"]]
  pixels = ds.eval_images("val", [0, 1])  # what eval decoded, cropped, before normalising

  predicted = _predict_json(workdir, [jpeg, png], capsys)
  np.testing.assert_allclose(predicted, evaluated, rtol=0, atol=ATOL)
  artifact = export.export(workdir, "stablehlo")
  (exported,), _ = _run_stablehlo_without_transfer(artifact.path, [pixels], tmp_path)
  np.testing.assert_allclose(exported, predicted, rtol=0, atol=ATOL)
  # The files are awkward: PIL's bare decode (sideways, colour under the alpha) is another picture.
  bare = np.stack([np.asarray(Image.open(p).convert("RGB").resize((40, 40), Image.BILINEAR))
                   for p in (jpeg, png)])
  assert np.abs(image_ops.center_crop(bare, 32).astype(int) - pixels).mean(axis=(1, 2, 3)).min() > 5
