"""The blog job's train step in `transfer` against Keras 3 and PyTorch, interleaved in one run.

The job: VGG16 with the blog head (Flatten, Dense 256 relu, Dropout 0.6, Dense 1 sigmoid, binary
cross-entropy, Adam), the conv base frozen, random weights, one fixed batch at 224x224. Every
contestant runs in its own worker process (Keras fixes its backend at import, and separate
processes keep thread pools and allocators apart); the workers compile and warm up first, then the
parent asks each in turn for a few timed steps, round after round, so load from anything else on the
machine falls on all of them alike. Reported: median step time over all rounds, images/s, and the
ratio to `transfer` in float32.

`--model resnet50`: the same frozen-backbone step on ResNet50 (BatchNorm in inference mode) with a
global-average-pool head (Dense 1 sigmoid): `transfer` runs the torchvision (v1.5) variant, Keras
its `keras.applications.ResNet50` (v1: stride on the first 1x1 convolution), torch a v1.5 ResNet50
built here from torch.nn.

The end-to-end job (`--e2e`): the blog recipe's head training on the same generated JPEGs, wall
time of `transfer train` with `cache_features=True` (the backbone runs once) against Keras `fit`
with frozen layers (the backbone runs every epoch, validation included).

    python scripts/bench_peers.py                       # ~10-15 min on 2 CPU cores
    python scripts/bench_peers.py --write docs/BENCHMARKS.md
    python scripts/bench_peers.py --only jax-fp32,torch-eager-fp32 --batch_sizes 16 --no-e2e
    python scripts/bench_peers.py --model resnet50 --batch_sizes 16 --no-e2e \
        --only jax-fp32,jax-fp32-xlaconv,keras-tf-fp32,torch-eager-fp32

Each timed step ends synchronously (`block_until_ready`, `train_on_batch`'s returned loss, eager
torch), after untimed warm-up steps that include compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from transfer.platform import hugepages  # noqa: E402  (imports nothing heavy)

# name -> (framework, dtype, options). The first entry is the reference for the ratios.
CONTESTANTS = {
    "jax-fp32": ("transfer", "float32", {}),
    "keras-tf-fp32": ("keras-tensorflow", "float32", {}),
    "keras-jax-fp32": ("keras-jax", "float32", {}),
    "torch-eager-fp32": ("torch", "float32", {}),
    "torch-compile-fp32": ("torch", "float32", {"compile": True}),
    "jax-bf16": ("transfer", "bfloat16", {}),
    # What moved the float32 step on CPU, one setting at a time (docs/BENCHMARKS.md): `jax-fp32`
    # is the package as it runs (Winograd convolutions, CPU XLA flags, huge pages).
    "jax-fp32-nohugepages": ("transfer", "float32", {"env": {"TRANSFER_CPU_MALLOC": "0"}}),
    "jax-fp32-xlaconv": ("transfer", "float32", {"conv": "xla"}),
    "jax-fp32-xlaconv-nohugepages": ("transfer", "float32",
                                     {"conv": "xla", "env": {"TRANSFER_CPU_MALLOC": "0"}}),
    "jax-fp32-plain": ("transfer", "float32", {"conv": "xla", "env": {
        "TRANSFER_CPU_MALLOC": "0", "TRANSFER_CPU_XLA_FLAGS": "0"}}),
    # --model resnet50 only: Keras' network (v1, stride on the first 1x1), not torchvision's.
    "jax-fp32-kerasvariant": ("transfer", "float32", {"variant": "keras"}),
    "keras-tf-bf16": ("keras-tensorflow", "bfloat16", {}),
    "torch-eager-bf16": ("torch", "bfloat16", {}),
    "torch-compile-bf16": ("torch", "bfloat16", {"compile": True}),
}
REFERENCE = "jax-fp32"
MODELS = ("vgg16", "resnet50")
DEFAULT = [n for n in CONTESTANTS if not n.startswith("jax-fp32-")]


# ----------------------------------------------------------------------------- workers
# A worker builds one contestant's step per batch size on request and times it. It speaks JSON
# lines on the stdout it was started with; everything the libraries print goes to stderr.


def _keras_step(model_name: str, dtype: str, batch: int, size: int, options: dict):
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


def _torch_step(model_name: str, dtype: str, batch: int, size: int, options: dict):
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


def _transfer_step(model_name: str, dtype: str, batch: int, size: int, options: dict):
  import transfer.platform
  transfer.platform.setup()  # as every `transfer` command does, before JAX has a backend
  import jax
  from transfer import bench, configs
  config = configs.load("bench")
  config.batch_size, config.image_size, config.dtype = batch, size, dtype
  config.conv = options.get("conv", config.conv)
  if model_name == "resnet50":  # the frozen backbone's BatchNorm layers run in inference mode
    config.model, config.variant, config.head, config.head_dropout = (
        "resnet50", options.get("variant", "torchvision"), "gap", 0.0)
  setup = bench.Setup(config, dtype)
  step = setup.run.train_step(setup.parts)
  batch_arrays = {"image": setup.images(), "label": setup.labels_batch()}
  holder = {"state": setup.state()}
  step = step.lower(holder["state"], batch_arrays).compile()

  def run():
    holder["state"], metrics = step(holder["state"], batch_arrays)
    return float(jax.block_until_ready(metrics)["loss"])

  return run, {"jax": jax.__version__, "devices": f"{jax.device_count()} x "
                                                   f"{jax.devices()[0].device_kind}",
               "xla_flags": os.environ.get("XLA_FLAGS", ""), "conv": setup.model.conv,
               "hugepages": hugepages.active()}


_BUILDERS = {"keras-tensorflow": _keras_step, "keras-jax": _keras_step, "torch": _torch_step,
             "transfer": _transfer_step}


def worker(name: str) -> None:
  """Serves `setup` and `time` requests for contestant `name` over stdin/stdout."""
  out = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)  # Library chatter goes to stderr; the protocol keeps the real stdout.
  framework, dtype, options = CONTESTANTS[name]
  steps = {}
  for line in sys.stdin:
    request = json.loads(line)
    if request["cmd"] == "setup":
      start = time.perf_counter()
      step, info = _BUILDERS[framework](request["model"], dtype, request["batch"],
                                        request["size"], options)
      for _ in range(request["warmup"]):
        step()
      steps[request["batch"]] = step
      out.write(json.dumps({"setup_s": time.perf_counter() - start, "info": info}) + "\n")
    elif request["cmd"] == "time":
      step, durations = steps[request["batch"]], []
      for _ in range(request["steps"]):
        start = time.perf_counter()
        step()
        durations.append(time.perf_counter() - start)
      out.write(json.dumps({"durations": durations}) + "\n")
    else:
      return


class Worker:
  """The parent's handle on one worker process."""

  def __init__(self, name: str, threads: int | None):
    framework = CONTESTANTS[name][0]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    if framework.startswith("keras-"):
      env["KERAS_BACKEND"] = framework.split("-", 1)[1]
    if framework in ("transfer", "keras-jax"):
      env.setdefault("JAX_PLATFORMS", "cpu")
    env.update(CONTESTANTS[name][2].get("env", {}))
    if framework == "transfer" and hugepages.wanted(env):
      env = hugepages.restart_environment(env)  # what the `transfer` command starts itself with
    if threads:
      env["OMP_NUM_THREADS"] = str(threads)
    self.name = name
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", name],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                 stderr=subprocess.DEVNULL if not os.environ.get("PEERS_DEBUG")
                                 else None)

  def ask(self, **request) -> dict:
    self.proc.stdin.write(json.dumps(request) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"worker {self.name} died (rerun with PEERS_DEBUG=1 to see why)")
    return json.loads(line)

  def close(self):
    try:
      self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
      self.proc.stdin.close()
    except BrokenPipeError:
      pass
    self.proc.wait(timeout=60)


def step_benchmark(names, batch_sizes, size, steps, repeats, warmup, log,
                   save=lambda rows: None, model: str = "vgg16") -> list[dict]:
  """Interleaved step timings: for each batch size, every contestant, round after round.

  `save(rows)` is called after each batch size, so a long run that is stopped keeps its results.
  """
  workers = {name: Worker(name, None) for name in names}
  rows = []
  try:
    for batch in batch_sizes:
      infos, durations = {}, {name: [] for name in names}
      for name in names:
        reply = workers[name].ask(cmd="setup", model=model, batch=batch, size=size,
                                  warmup=warmup)
        infos[name] = reply
        log(f"batch {batch}: {name} ready in {reply['setup_s']:.1f}s {reply['info']}")
      for r in range(repeats):
        order = names if r % 2 == 0 else list(reversed(names))  # no one always goes first
        for name in order:
          durations[name] += workers[name].ask(cmd="time", batch=batch, steps=steps)["durations"]
        log(f"batch {batch}: round {r + 1}/{repeats} done")
      for name in names:
        median = statistics.median(durations[name])
        framework, dtype, options = CONTESTANTS[name]
        rows.append({"name": name, "model": model, "framework": framework, "dtype": dtype,
                     "batch": batch,
                     "step_s_median": median, "images_per_sec": batch / median,
                     "step_s_all": durations[name], "setup_s": infos[name]["setup_s"],
                     "info": infos[name]["info"]})
        log(f"batch {batch}: {name} {batch / median:.2f} images/s (median step {median:.2f}s)")
      save(rows)
  finally:
    for w in workers.values():
      w.close()
  for row in rows:
    ref = [r for r in rows if r["name"] == REFERENCE and r["batch"] == row["batch"]]
    row["vs_jax_fp32"] = row["images_per_sec"] / ref[0]["images_per_sec"] if ref else None
  return rows


# ----------------------------------------------------------------------------- end to end


def make_jpegs(root: str, n: int, size: int) -> None:
  """`n` JPEGs in two class folders (cats/dogs), `size` pixels square, different textures."""
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(0)
  for i in range(n):
    label = i % 2
    folder = os.path.join(root, ("cats", "dogs")[label])
    os.makedirs(folder, exist_ok=True)
    base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((size, size), Image.NEAREST if label else Image.BILINEAR)
    img.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def _keras_fit_job(root: str, size: int, batch: int, epochs: int) -> None:
  """Worker body for the Keras side of the end-to-end job; prints one JSON line."""
  start = time.perf_counter()
  import keras
  import numpy as np
  from PIL import Image
  files = sorted((os.path.join(root, c, f), k) for k, c in enumerate(("cats", "dogs"))
                 for f in os.listdir(os.path.join(root, c)))
  x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size)), np.float32)
                for f, _ in files])
  y = np.asarray([k for _, k in files], np.float32)
  order = np.random.default_rng(0).permutation(len(x))
  x, y = keras.applications.vgg16.preprocess_input(x[order]), y[order]
  n_val = int(round(0.2 * len(x)))
  base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(size, size, 3))
  base.trainable = False
  model = keras.Sequential([keras.Input((size, size, 3)), base, keras.layers.Flatten(),
                            keras.layers.Dense(256, activation="relu"), keras.layers.Dropout(0.6),
                            keras.layers.Dense(1, activation="sigmoid")])
  model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy",
                metrics=["accuracy"])
  epoch_times = []

  class Clock(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      self.t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      epoch_times.append(time.perf_counter() - self.t)

  model.fit(x[n_val:], y[n_val:], batch_size=batch, epochs=epochs, verbose=0,
            validation_data=(x[:n_val], y[:n_val]), callbacks=[Clock()])
  print(json.dumps({"wall_s": time.perf_counter() - start, "epoch_s": epoch_times,
                    "train": len(x) - n_val, "val": n_val}), flush=True)


def e2e_benchmark(images: int, size: int, batch: int, epochs: int, keras_epochs: int, log) -> dict:
  """Wall time of the blog head training: ours (cached features) vs Keras fit (frozen layers)."""
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, "data")
    make_jpegs(data, images, size)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    ours_cmd = [sys.executable, "-m", "transfer.main", "train", "--workdir",
                os.path.join(tmp, "run"), "--config", "quickstart",
                f"--config.dataset=folder:{data}", f"--config.image_size={size}",
                f"--config.batch_size={batch}", f"--config.num_epochs={epochs}",
                "--config.weights=none", "--config.cache_features=true",
                "--config.augment=none", "--config.learning_rate=1e-4",
                "--config.val_fraction=0.2"]
    start = time.perf_counter()
    done = subprocess.run(ours_cmd, env=env, capture_output=True, text=True)
    ours_s = time.perf_counter() - start
    if done.returncode:
      raise RuntimeError(f"transfer train failed:\n{done.stderr[-3000:]}")
    log(f"e2e: transfer train ({epochs} epochs, cached features) {ours_s:.1f}s")
    keras_cmd = [sys.executable, os.path.abspath(__file__), "--keras_fit", data,
                 str(size), str(batch), str(keras_epochs)]
    done = subprocess.run(keras_cmd, env=dict(env, KERAS_BACKEND="tensorflow"),
                          capture_output=True, text=True)
    if done.returncode:
      raise RuntimeError(f"keras fit failed:\n{done.stderr[-3000:]}")
    keras_run = json.loads(done.stdout.strip().splitlines()[-1])
    later = keras_run["epoch_s"][1:] or keras_run["epoch_s"]
    keras_full = (keras_run["wall_s"] + (epochs - keras_epochs) * statistics.mean(later))
    log(f"e2e: keras fit ({keras_epochs} epochs) {keras_run['wall_s']:.1f}s; "
        f"{epochs} epochs extrapolated {keras_full:.1f}s")
  return {"images": images, "size": size, "batch": batch, "epochs": epochs,
          "train": keras_run["train"], "val": keras_run["val"], "ours_s": ours_s,
          "keras_epochs": keras_epochs, "keras_s": keras_run["wall_s"],
          "keras_epoch_s": keras_run["epoch_s"], "keras_extrapolated_s": keras_full,
          "speedup": keras_full / ours_s}


# ----------------------------------------------------------------------------- report


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def markdown(rows, e2e, args, elapsed_s: float) -> str:
  """The tables for docs/BENCHMARKS.md."""
  lines = [f"Model: {args.model}. Machine: {machine()}; Python {platform.python_version()}. "
           f"{args.steps} timed steps x {args.repeats} interleaved rounds per contestant after "
           f"{args.warmup} warm-up step(s); whole run {elapsed_s / 60:.1f} min.", "",
           "| contestant | dtype | batch | median step (s) | images/s | vs jax-fp32 | notes |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    info = r["info"]
    note = ", ".join(f"{k}={v}" for k, v in info.items()
                     if k in ("jit_compile", "compile", "threads", "xla_flags", "conv", "hugepages")
                     and v)
    ratio = f"{r['vs_jax_fp32']:.2f}" if r["vs_jax_fp32"] else ""
    lines.append(f"| {r['name']} | {r['dtype']} | {r['batch']} | {r['step_s_median']:.2f} | "
                 f"{r['images_per_sec']:.2f} | {ratio} | {note} |")
  if e2e:
    lines += ["", f"End to end: {e2e['train']} train / {e2e['val']} val JPEGs at {e2e['size']}, "
                  f"batch {e2e['batch']}, {e2e['epochs']} epochs of head training "
                  "(wall time of the whole process: start-up, decoding, compilation, evaluation "
                  "every epoch).", "",
              "| job | wall time (s) |", "|---|---|",
              f"| transfer train, cache_features=True, {e2e['epochs']} epochs | "
              f"{e2e['ours_s']:.1f} |",
              f"| Keras 3 (TF) fit, frozen layers, {e2e['keras_epochs']} epochs (measured) | "
              f"{e2e['keras_s']:.1f} |",
              f"| Keras 3 (TF) fit, frozen layers, {e2e['epochs']} epochs (extrapolated from "
              f"its epochs 2+) | {e2e['keras_extrapolated_s']:.0f} |",
              "", f"Speed-up of the whole job: {e2e['speedup']:.1f}x."]
  return "\n".join(lines)


def write_section(path: str, text: str, command: str, section: str = "peers") -> None:
  """Replaces the text between the `<!-- {section}:begin/end -->` markers in `path`."""
  begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
  with open(path) as f:
    doc = f.read()
  if begin not in doc or end not in doc:
    raise SystemExit(f"{path} has no {begin} ... {end} section")
  head, rest = doc.split(begin, 1)
  _, tail = rest.split(end, 1)
  block = f"{begin}\nReproduce: `{command}`\n\n{text}\n{end}"
  with open(path, "w") as f:
    f.write(head + block + tail)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--keras_fit", nargs=4, help=argparse.SUPPRESS)
  parser.add_argument("--only", default=",".join(DEFAULT),
                      help=f"contestants (default: all but the jax-fp32-* ablations): "
                           f"{','.join(CONTESTANTS)}")
  parser.add_argument("--model", choices=MODELS, default="vgg16",
                      help="the frozen backbone: VGG16 + blog head, or ResNet50 + GAP head")
  parser.add_argument("--batch_sizes", default="16,32")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
  parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
  parser.add_argument("--no-e2e", dest="e2e", action="store_false")
  parser.add_argument("--e2e_images", type=int, default=160)
  parser.add_argument("--e2e_epochs", type=int, default=50)
  parser.add_argument("--e2e_keras_epochs", type=int, default=3)
  parser.add_argument("--write", help="replace the peers section of this markdown file")
  parser.add_argument("--section", default="peers",
                      help="which <!-- SECTION:begin/end --> block --write replaces")
  parser.add_argument("--json", help="also write the raw results here")
  args = parser.parse_args()
  if args.worker:
    return worker(args.worker)
  if args.keras_fit:
    root, size, batch, epochs = args.keras_fit
    return _keras_fit_job(root, int(size), int(batch), int(epochs))

  log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
  names = [n for n in args.only.split(",") if n]
  unknown = [n for n in names if n not in CONTESTANTS]
  if unknown:
    raise SystemExit(f"unknown contestants {unknown}; valid: {', '.join(CONTESTANTS)}")
  if args.e2e and args.model != "vgg16":
    raise SystemExit("--e2e runs the VGG16 blog job only; add --no-e2e")
  start = time.perf_counter()
  def save(rows, e2e=None):
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"rows": rows, "e2e": e2e, "machine": machine()}, f, indent=1)

  rows = step_benchmark(names, [int(b) for b in args.batch_sizes.split(",")], args.image_size,
                        args.steps, args.repeats, args.warmup, log, save, args.model)
  e2e = (e2e_benchmark(args.e2e_images, args.image_size, 16, args.e2e_epochs,
                       args.e2e_keras_epochs, log) if args.e2e else None)
  text = markdown(rows, e2e, args, time.perf_counter() - start)
  print(text)
  save(rows, e2e)
  if args.write:
    write_section(args.write, text, "python " + " ".join(
        [os.path.relpath(os.path.abspath(__file__), REPO)] + sys.argv[1:]), args.section)


if __name__ == "__main__":
  main()
