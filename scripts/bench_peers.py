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

`--model vit_b16`: ViT-B/16 with a new 2-class head (softmax cross-entropy, Adam) against timm's
`vit_base_patch16_224` in PyTorch, in three jobs (`--jobs`, `peer_steps.JOBS`): the backbone
frozen (`trainable=["^head/"]`; timm: `requires_grad_(False)` on all but the head), full
fine-tuning, and the forward pass, timed in the same rounds as the frozen step for the
train/forward ratio. Set-up time (compilation, `torch.compile`'s included, and warm-up) is
reported apart and never timed. The steps themselves are built in `scripts/peer_steps.py`.

The end-to-end job (`--e2e`): the blog recipe's head training on the same generated JPEGs, wall
time of `transfer train` with `cache_features=True` (the backbone runs once) against Keras `fit`
with frozen layers (the backbone runs every epoch, validation included).

    python scripts/bench_peers.py                       # ~10-15 min on 2 CPU cores
    python scripts/bench_peers.py --write docs/BENCHMARKS.md
    python scripts/bench_peers.py --only jax-fp32,torch-eager-fp32 --batch_sizes 16 --no-e2e
    python scripts/bench_peers.py --model resnet50 --batch_sizes 16 --no-e2e \
        --only jax-fp32,jax-fp32-xlaconv,keras-tf-fp32,torch-eager-fp32
    python scripts/bench_peers.py --model vit_b16 --batch_sizes 16 --no-e2e   # ~25 min

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
import peer_steps  # noqa: E402  (scripts/, beside this file; imports nothing heavy)

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
MODELS = ("vgg16", "resnet50", "vit_b16")
# Per model: the default contestants and job groups (`--jobs`; `peer_steps.JOBS`).
DEFAULT = {"vgg16": [n for n in CONTESTANTS if not n.startswith("jax-fp32-")],
           "vit_b16": ["jax-fp32", "torch-eager-fp32", "torch-compile-fp32", "jax-bf16",
                       "torch-eager-bf16", "torch-compile-bf16"]}
DEFAULT_JOBS = {"vit_b16": "frozen+forward,full"}


# ----------------------------------------------------------------------------- workers
# A worker builds one contestant's steps (`peer_steps.build`) on request and times them. It speaks
# JSON lines on the stdout it was started with; everything the libraries print goes to stderr.


def worker(name: str) -> None:
  """Serves `setup` and `time` requests for contestant `name` over stdin/stdout.

  `setup` builds and warms up one step per job of a group (dropping the previous group's, so a
  worker holds one group in memory); `time` runs a job's step a few times.
  """
  import gc
  out = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)  # Library chatter goes to stderr; the protocol keeps the real stdout.
  framework, dtype, options = CONTESTANTS[name]
  steps = {}
  for line in sys.stdin:
    request = json.loads(line)
    if request["cmd"] == "setup":
      steps.clear()
      gc.collect()
      setup_s, infos = {}, {}
      for job in request["jobs"]:
        start = time.perf_counter()
        step, infos[job] = peer_steps.build(framework, request["model"], job, dtype,
                                            request["batch"], request["size"], options)
        for _ in range(request["warmup"]):
          step()
        steps[job], setup_s[job] = step, time.perf_counter() - start
      out.write(json.dumps({"setup_s": setup_s, "info": infos}) + "\n")
    elif request["cmd"] == "time":
      step, durations = steps[request["job"]], []
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
                   save=lambda rows: None, model: str = "vgg16",
                   groups=(("frozen",),)) -> list[dict]:
  """Interleaved step timings: for each batch size and group of jobs, every contestant's step
  for every job of the group, round after round (the order reversed every other round).

  Jobs timed in one group share their rounds, so their ratio (a frozen train step over the
  forward pass) sees the same load. `save(rows)` is called after each group, so a long run that
  is stopped keeps its results.
  """
  workers = {name: Worker(name, None) for name in names}
  rows = []
  try:
    for batch in batch_sizes:
      for jobs in groups:
        infos = {}
        for name in names:
          infos[name] = workers[name].ask(cmd="setup", model=model, jobs=list(jobs),
                                          batch=batch, size=size, warmup=warmup)
          log(f"batch {batch}: {name} ready: set-up {infos[name]['setup_s']} s, "
              f"{infos[name]['info']}")
        pairs = [(name, job) for name in names for job in jobs]
        durations = {pair: [] for pair in pairs}
        for r in range(repeats):
          for name, job in (pairs if r % 2 == 0 else reversed(pairs)):  # no one always first
            durations[name, job] += workers[name].ask(cmd="time", job=job,
                                                      steps=steps)["durations"]
          log(f"batch {batch} {'+'.join(jobs)}: round {r + 1}/{repeats} done")
        for name, job in pairs:
          median = statistics.median(durations[name, job])
          framework, dtype, options = CONTESTANTS[name]
          rows.append({"name": name, "model": model, "job": job, "framework": framework,
                       "dtype": dtype, "batch": batch,
                       "step_s_median": median, "images_per_sec": batch / median,
                       "step_s_all": durations[name, job],
                       "setup_s": infos[name]["setup_s"][job], "info": infos[name]["info"][job]})
          log(f"batch {batch}: {name} {job} {batch / median:.2f} images/s "
              f"(median step {median:.2f}s)")
        save(rows)
  finally:
    for w in workers.values():
      w.close()
  add_ratios(rows)
  return rows


def add_ratios(rows) -> None:
  """`vs_jax_fp32`: images/s over `transfer` float32's on the same job and batch;
  `train_forward`: a frozen step's time over the same contestant's forward pass."""
  find = lambda name, job, batch: next((r for r in rows if (r["name"], r["job"], r["batch"])
                                        == (name, job, batch)), None)
  for row in rows:
    ref = find(REFERENCE, row["job"], row["batch"])
    row["vs_jax_fp32"] = row["images_per_sec"] / ref["images_per_sec"] if ref else None
    forward = find(row["name"], "forward", row["batch"]) if row["job"] == "frozen" else None
    row["train_forward"] = row["step_s_median"] / forward["step_s_median"] if forward else None


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


def markdown(rows, e2e, args, elapsed_s: float, load: str = "") -> str:
  """The tables for docs/BENCHMARKS.md: one row per contestant (and job, when several ran)."""
  jobs = len({r["job"] for r in rows}) > 1
  lines = [f"Model: {args.model}. Machine: {machine()}; Python {platform.python_version()}. "
           f"{args.steps} timed steps x {args.repeats} interleaved rounds per contestant after "
           f"{args.warmup} warm-up step(s); whole run {elapsed_s / 60:.1f} min.{load}", ""]
  if jobs:
    lines += ["| contestant | job | dtype | batch | median step (s) | images/s | vs jax-fp32 | "
              "train / forward | set-up (s) | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
  else:
    lines += ["| contestant | dtype | batch | median step (s) | images/s | vs jax-fp32 | notes |",
              "|---|---|---|---|---|---|---|"]
  for r in rows:
    info = r["info"]
    note = ", ".join(f"{k}={v}" for k, v in info.items()
                     if k in ("jit_compile", "compile", "threads", "xla_flags", "conv", "hugepages",
                              "attention")
                     and v)
    ratio = f"{r['vs_jax_fp32']:.2f}" if r["vs_jax_fp32"] else ""
    if jobs:
      tf = f"{r['train_forward']:.2f}" if r.get("train_forward") else ""
      lines.append(f"| {r['name']} | {r['job']} | {r['dtype']} | {r['batch']} | "
                   f"{r['step_s_median']:.2f} | {r['images_per_sec']:.2f} | {ratio} | {tf} | "
                   f"{r['setup_s']:.0f} | {note} |")
    else:
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
  parser.add_argument("--only", help=f"contestants (default: all but the jax-fp32-* ablations "
                                     f"for vgg16; transfer and torch for vit_b16): "
                                     f"{','.join(CONTESTANTS)}")
  parser.add_argument("--model", choices=MODELS, default="vgg16",
                      help="VGG16 + blog head or ResNet50 + GAP head (frozen backbone), or "
                           "ViT-B/16 + a 2-class head (transfer against timm)")
  parser.add_argument("--jobs", help="job groups: groups split by ',', jobs within one (timed in "
                                     "the same rounds) by '+'; jobs: frozen, full, forward "
                                     "(default: frozen+forward,full for vit_b16, else frozen)")
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
  names = [n for n in (args.only or ",".join(DEFAULT.get(args.model, DEFAULT["vgg16"])))
           .split(",") if n]
  groups = [tuple(g.split("+")) for g in
            (args.jobs or DEFAULT_JOBS.get(args.model, "frozen")).split(",") if g]
  if any(job not in peer_steps.JOBS for g in groups for job in g):
    raise SystemExit(f"unknown job in --jobs {args.jobs}; valid: {', '.join(peer_steps.JOBS)}")
  unknown = [n for n in names if n not in CONTESTANTS]
  if unknown:
    raise SystemExit(f"unknown contestants {unknown}; valid: {', '.join(CONTESTANTS)}")
  if args.e2e and args.model != "vgg16":
    raise SystemExit("--e2e runs the VGG16 blog job only; add --no-e2e")
  start, load_before = time.perf_counter(), os.getloadavg()
  def save(rows, e2e=None):
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"rows": rows, "e2e": e2e, "machine": machine()}, f, indent=1)

  rows = step_benchmark(names, [int(b) for b in args.batch_sizes.split(",")], args.image_size,
                        args.steps, args.repeats, args.warmup, log, save, args.model, groups)
  e2e = (e2e_benchmark(args.e2e_images, args.image_size, 16, args.e2e_epochs,
                       args.e2e_keras_epochs, log) if args.e2e else None)
  load = (f" Load average (1, 5, 15 min) at the start {', '.join(f'{v:.1f}' for v in load_before)}"
          f", at the end {', '.join(f'{v:.1f}' for v in os.getloadavg())}.")
  text = markdown(rows, e2e, args, time.perf_counter() - start, load)
  print(text)
  save(rows, e2e)
  if args.write:
    write_section(args.write, text, "python " + " ".join(
        [os.path.relpath(os.path.abspath(__file__), REPO)] + sys.argv[1:]), args.section)


if __name__ == "__main__":
  main()
