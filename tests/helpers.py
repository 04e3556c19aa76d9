"""Helpers shared by the test files: configs at test size, batch and tree comparisons, a CLI run in
a subprocess, waiting on events, and the harness for "interrupted then resumed equals
uninterrupted" (`kill_and_resume`, `preempt_and_resume`), and a local HTTP server for downloads
(`file_server`).

Fixtures live in `conftest.py`; everything a test file calls lives here, so that no test file
imports another. Import it as `from helpers import ...` (pytest puts `tests/` on the path).
"""

import contextlib
import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time

import flax
import jax
import numpy as np
import pytest

from transfer import checkpoint, configs, metrics, optim, parallel, train_state
from transfer import steps as steps_lib

F32_U = float(np.finfo(np.float32).eps) / 2  # float32 unit round-off, 2**-24

# How long a test waits for an event (a checkpoint committed, a process exiting) before calling it
# a hang. A guard, not a budget: on a quiet machine the events come within seconds, and a machine
# loaded ten times over its cores must still pass well inside it.
HANG_S = 600.0


# --- configs at test size -------------------------------------------------------------------------


def override(config, overrides):
  """Sets `overrides` ({key: value}, keys may be dotted: "synthetic.train_size") on `config`."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def default_config(**overrides):
  """The default config with `overrides` (dotted keys allowed)."""
  return override(configs.load("default"), overrides)


def tiny_config(**overrides):
  """vgg16_tiny on 32x32 synthetic data: a few seconds per run on a CPU."""
  c = configs.load("default")
  c.model, c.weights, c.image_size, c.batch_size = "vgg16_tiny", "none", 32, 8
  c.synthetic.train_size, c.synthetic.val_size, c.synthetic.base_size = 48, 20, 32
  c.num_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 6, 2, 3, 3
  c.learning_rate, c.augment = 1e-3, "flip"
  return override(c, overrides)


def make_config(**overrides):
  """The default config at test size (16 px synthetic), with dotted-key overrides: for data."""
  c = configs.load("default")
  c.image_size, c.batch_size, c.augment = 16, 8, "flip"
  c.synthetic.update({"num_classes": 3, "train_size": 40, "val_size": 13, "base_size": 16})
  return override(c, overrides)


def noise_config(data_dir, cache_dir, **overrides):
  """`make_config` on the prepared `tfds_noise` dataset at 32 px, with a disk cache."""
  import tfds_noise  # needs tensorflow_datasets: imported only by the tests that use it
  return make_config(dataset=f"tfds:{tfds_noise.NAME}", data_dir=data_dir, image_size=32,
                     batch_size=8, augment="crop_flip", cache_dir=str(cache_dir), **overrides)


def bench_config(**overrides):
  """The bench config with vgg16_tiny at 32x32 on a 32-image synthetic epoch."""
  config = configs.load("bench")
  config.model, config.image_size, config.batch_size = "vgg16_tiny", 32, 8
  config.epoch_images = 32
  config.synthetic.train_size, config.synthetic.val_size, config.synthetic.base_size = 32, 8, 16
  return override(config, overrides)


# --- comparisons ----------------------------------------------------------------------------------


def take(iterator, n):
  """The next `n` items of `iterator`."""
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  """Two lists of batches (dicts of arrays) are equal, key by key and bit for bit."""
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def assert_trees_equal(a, b):
  """Two pytrees are equal leaf by leaf, bit for bit."""
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def flatten(tree):
  """A nested dict of arrays as {"a/b/c": numpy array}."""
  return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def assert_close(ours, ref, rtol: float = 1e-4):
  """Max abs difference within `rtol` of the reference's scale (element-wise rtol is meaningless
  for values near zero). For outputs of a ported network against its reference framework."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  err = np.abs(ours - ref).max()
  assert err <= rtol * np.abs(ref).max(), f"max error {err} vs scale {np.abs(ref).max()}"


def assert_trained_alike(got, want, *, terms: int, steps: int, slack: float = 4.0):
  """Asserts two param trees trained by different programs agree up to float32 round-off.

  For runs whose only difference is the order of the gradient's sums (another device or process
  count, shard_map vs pmap), under an optimizer linear in the gradient (SGD, with momentum).
  Per leaf, with p its largest magnitude (a bound on what `steps` small updates changed, exact
  for biases that start at 0): summing `terms` per element in another order changes the result
  by at most (terms - 1)·u·p, and each step may round p + Δp to the neighbouring float32,
  2u·p. `slack` covers cancellation among the terms and the differences' effect on later steps.

  Args:
    got, want: param trees of the same structure (`want` is the reference).
    terms: the most terms summed into one gradient element (examples × spatial positions).
    steps: optimizer steps taken.
    slack: safety factor over the round-off bound.
  """
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(want))
  for (path, w), g in zip(leaves, jax.tree_util.tree_leaves(jax.device_get(got))):
    w, g = np.asarray(w), np.asarray(g)
    atol = slack * (terms - 1 + 2 * steps) * F32_U * float(np.abs(w).max())
    np.testing.assert_allclose(g, w, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


def randomize(keras, model, seed):
  """Random weights for a Keras model, far from a fresh model's, so that a swapped kernel/bias or
  a wrong transpose shows in its outputs: He-scaled kernels (activations stay O(1) through the
  net), biases ~ N(0, 0.1); BatchNorm gamma ~ U(0.5, 1.5), beta ~ N(0, 0.2), moving_mean ~
  N(0.5, 1), moving_variance ~ U(0.5, 3). The last BatchNorm of a ResNet block (`_3_bn`) gets a
  small gamma, as trained ResNets have, so the residual sums stay O(1) through the depth."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    arrays = layer.get_weights()
    if not arrays:
      continue
    if isinstance(layer, keras.layers.BatchNormalization):
      assert len(arrays) in (3, 4)  # [gamma], beta, moving_mean, moving_variance
      n = arrays[0].shape
      values = []
      if len(arrays) == 4:
        values.append(rng.uniform(0.5, 1.5, n) * (0.2 if layer.name.endswith("_3_bn") else 1.0))
      values += [rng.normal(0, 0.2, n), rng.normal(0.5, 1.0, n), rng.uniform(0.5, 3.0, n)]
    else:
      kernel, *bias = arrays
      values = [rng.standard_normal(kernel.shape) * np.sqrt(2.0 / np.prod(kernel.shape[:-1]))]
      values += [rng.normal(0, 0.1, b.shape) for b in bias]
    layer.set_weights([np.asarray(v, np.float32) for v in values])


def random_variables(arch="resnet50_tiny", image_size=32, seed=0, **kw):
  """Random arrays in the model's collections; running variances positive."""
  from transfer import models
  from transfer.weights import port
  shapes = port.variable_shapes(models.get(arch, **kw), image_size)
  rng = np.random.default_rng(seed)
  out = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32) * 0.05, shapes)
  out["batch_stats"] = jax.tree.map(lambda a: np.abs(a) + 0.5, out["batch_stats"])
  return out


def calibrated_statistics(model, variables, size):
  """Running statistics equal to each BatchNorm's input statistics on a random batch.

  Random running statistics (or the fresh 0 and 1) do not fit the activations they meet: through
  ~90 BatchNorm layers in inference mode the activations drift far from zero mean and unit scale,
  and a trainable BatchNorm's variance E[x^2] - E[x]^2 then cancels catastrophically, which makes
  any comparison of float32 runs meaningless (in float64 two device counts agree; in float32 they
  differed by 16%). Statistics measured on data, as a trained network's are, keep every layer's
  input near unit scale.
  """
  import flax.linen as nn
  x = np.random.default_rng(1).normal(size=(16, size, size, 3)).astype(np.float32)
  stats = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
      h = np.asarray(args[0], np.float64)
      stats[context.module.name] = {"mean": np.asarray(h.mean((0, 1, 2)), np.float32),
                                    "var": np.asarray(h.var((0, 1, 2)), np.float32)}
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert set(stats) == set(variables["batch_stats"])
  return stats


def tiny_keras_file(path, top=False, naming="keras2"):
  """A Keras-variant resnet50_tiny in the legacy layout of the official files; returns its path
  and variables."""
  from transfer import models
  from transfer.weights import export
  variables = random_variables(variant="keras", include_top=top)
  layers = export.keras_layers(variables["params"], models.spec("resnet50_tiny"),
                               variables["batch_stats"])
  export.write_keras_h5(path, {"input_1": [], **layers}, naming=naming)
  return str(path), variables


def cli_probabilities(argv, capsys):
  """`transfer ARGV --json --top 1000` probabilities as an (N, classes) array in class order."""
  import json
  from transfer import main as cli_main
  capsys.readouterr()
  assert cli_main.run(list(argv) + ["--json", "--top", "1000"]) == 0
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  probs = np.zeros((len(records), len(records[0]["top"])))
  for row, record in zip(probs, records):
    for p in record["top"]:
      row[p["class"]] = p["prob"]
  return probs


def one_line_error(excinfo):
  """The message of a `pytest.raises` error, asserted to be one line (what the CLI prints)."""
  message = str(excinfo.value)
  assert "\n" not in message
  return message


def snapshot(root):
  """Every file under `root` with its bytes' hash and mtime: equal snapshots = untouched.

  Leaves out the run's lock file (`train.lock`), whose label names whoever took it last: every
  `train` start rewrites it, including one refused afterwards for a config change.
  """
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames) + sorted(dirnames):
      path = os.path.join(dirpath, name)
      if name == "train.lock" and dirpath == str(root):
        continue
      st = os.lstat(path)
      digest = ""
      if os.path.isfile(path):
        with open(path, "rb") as f:
          digest = hashlib.sha1(f.read()).hexdigest()
      out[os.path.relpath(path, root)] = (digest, st.st_mtime_ns)
  return out


# --- training without the loop --------------------------------------------------------------------


def train_steps(model, variables, trainable, devices, mode="shard_map", steps=3, seed=0, size=32,
                lr=1e-2):
  """`steps` SGD steps of `model` (one output, BatchNorm statistics in `variables`) on random
  8-image batches of `size` px; returns the train state on the host."""
  config = tiny_config(model="resnet50_tiny", head="gap", trainable=trainable, learning_rate=lr,
                       optimizer="sgd")
  mesh = parallel.make_mesh(devices)
  tx, labels = optim.make_optimizer(variables["params"], config, 10)
  state = parallel.replicate(train_state.create_train_state(
      variables["params"], tx, 0, variables["batch_stats"]), mesh)
  step = steps_lib.make_train_step(model, tx, labels, mesh, mode)
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    batch = {"image": rng.normal(size=(8, size, size, 3)).astype(np.float32),
             "label": rng.integers(0, 2, 8).astype(np.int32)}
    state, _ = step(state, jax.device_put(batch, parallel.batch_sharding(mesh)))
  return jax.device_get(state)


# --- the CLI in a subprocess, and waiting on it ---------------------------------------------------

# A run long enough to be killed part-way: 120 steps of vgg16_tiny, a checkpoint every 10.
LONG = {"model": "vgg16_tiny", "weights": "none", "image_size": 32, "batch_size": 8,
        "synthetic.train_size": 48, "synthetic.val_size": 16, "num_steps": 120,
        "checkpoint_every_steps": 10, "eval_every_steps": 40, "log_every_steps": 1,
        "augment": "flip", "learning_rate": 1e-3}


def final_params(workdir):
  """The trained params of the run in `workdir` (on the host) and its checkpoint's metadata."""
  params, meta = checkpoint.load_trained(str(workdir))
  return jax.device_get(params), meta


def wait_for(predicate, what: str, timeout: float = HANG_S, poll: float = 0.1):
  """Polls `predicate()` until it returns something true and returns that; fails naming `what`.

  `predicate` may raise (e.g. when the process it watches has ended) to fail at once.
  """
  deadline = time.monotonic() + timeout
  while True:
    value = predicate()
    if value:
      return value
    if time.monotonic() > deadline:
      pytest.fail(f"no {what} after {timeout:.0f}s")
    time.sleep(poll)


# The environment of a CLI subprocess: 4 fake CPU devices.
CLI_ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")


def train_argv(workdir, **extra):
  """The `transfer train` command line (after `python -m transfer.main`) of the LONG run."""
  args = ["train", "--workdir", str(workdir), "--config", "default"]
  return args + [f"--config.{k}={v}" for k, v in {**LONG, **extra}.items()]


def cli_train(workdir, **extra):
  """Starts `transfer train` (the LONG run, `extra` overriding) in a subprocess with 4 fake CPU
  devices.

  Its output goes to `<workdir>.log`: a file, not a pipe, which nobody would read while the run
  goes on and which would block it once full.
  """
  args = [sys.executable, "-m", "transfer.main", *train_argv(workdir, **extra)]
  with open(f"{workdir}.log", "w") as log:
    return subprocess.Popen(args, env=CLI_ENV, stdout=log, stderr=subprocess.STDOUT)


def cli_output(workdir) -> str:
  """What the `cli_train` run in `workdir` has printed so far."""
  with open(f"{workdir}.log") as f:
    return f.read()


def finish(proc, workdir) -> str:
  """Waits for the run to end and returns its output; HANG_S only guards against a hang."""
  try:
    proc.wait(timeout=HANG_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    pytest.fail(f"the run still going after {HANG_S:.0f}s:\n{cli_output(workdir)[-3000:]}")
  return cli_output(workdir)


def wait_for_checkpoint(workdir, step, proc):
  """Waits until checkpoint `step` is committed (Orbax renames its directory into place)."""
  path = os.path.join(workdir, "checkpoints", str(step))

  def committed():
    if os.path.isdir(path):
      return True
    if proc.poll() is not None:
      pytest.fail(f"the run ended before checkpoint {step}:\n{cli_output(workdir)[-3000:]}")
    return False

  # A short poll: the test then signals a run that has trained on by only a step or two.
  wait_for(committed, f"checkpoint {step} in {workdir}", poll=0.02)


def kill_and_resume(workdir, checkpoint_step: int, *, reference=None, killed_extra=None,
                    before_kill=None, after_kill=None, **config) -> str:
  """Interrupted then resumed: the one harness for "resume equals an uninterrupted run".

  Starts `cli_train(workdir, **config)` (with `killed_extra` on top for this first run only),
  SIGKILLs it once checkpoint `checkpoint_step` is committed, checks that it had not finished,
  and reruns it (with `config`) to the end, which must resume and succeed. The caller compares
  the result with the uninterrupted run as its test requires.

  Args:
    workdir: the run's directory.
    checkpoint_step: the checkpoint to wait for before the kill.
    reference: a directory for the uninterrupted run with the same `config`, started beside the
      one to be killed and finished before the rerun; None when the caller has one already.
    killed_extra: config keys of the killed run only (e.g. another decode worker kind).
    before_kill: called with the running process just before the kill.
    after_kill: called once the killed process is gone, before the rerun.
    **config: keys over `LONG`, as for `cli_train`.

  Returns:
    The resumed run's output.
  """
  ref = cli_train(reference, **config) if reference is not None else None
  proc = cli_train(workdir, **config, **(killed_extra or {}))
  wait_for_checkpoint(workdir, checkpoint_step, proc)
  if before_kill:
    before_kill(proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  if after_kill:
    after_kill()
  killed_at = max(r["step"] for r in metrics.read_metrics(str(workdir)))
  assert killed_at < {**LONG, **config}["num_steps"], "the run finished before it could be killed"
  if ref is not None:
    out = finish(ref, reference)
    assert ref.returncode == 0, out[-3000:]

  proc = cli_train(workdir, **config)
  out = finish(proc, workdir)
  assert proc.returncode == 0, out[-3000:]
  assert "resumed from step" in out
  return out


def preempt_and_resume(make_config, workdir, stop_step: int, monkeypatch, *, reference=None,
                       after_stop=None) -> dict:
  """The in-process form of `kill_and_resume`: `train.train_and_evaluate(make_config(), workdir)`
  stops after `stop_step` as on a SIGTERM (it checkpoints and raises `Preempted`), then the same
  call is rerun to the end. The caller compares the result with the uninterrupted run.

  Args:
    make_config: returns a fresh config for each run.
    workdir: the run's directory.
    stop_step: the step after which the first run stops.
    monkeypatch: the test's fixture (patches `Preemption.stop_at` for the first run only).
    reference: a directory where the uninterrupted run is trained first; None when the caller
      has one already.
    after_stop: called once the first run has stopped, before the rerun.

  Returns:
    The rerun's summary.
  """
  from transfer import preemption, train
  if reference is not None:
    train.train_and_evaluate(make_config(), str(reference))
  original = preemption.Preemption.stop_at

  def stop(self, step):
    if step == stop_step:
      self.signal = signal.SIGTERM
      return True
    return original(self, step)
  with monkeypatch.context() as patch:
    patch.setattr(preemption.Preemption, "stop_at", stop)
    with pytest.raises(preemption.Preempted):
      train.train_and_evaluate(make_config(), str(workdir))
  if after_stop:
    after_stop()
  return train.train_and_evaluate(make_config(), str(workdir))


# --- a local HTTP server for downloads ------------------------------------------------------------


class _FileHandler(http.server.BaseHTTPRequestHandler):
  """Serves `server.files[path] = (body, declared)`: `declared` is the Content-Length sent (a
  body shorter than it is a transfer cut short), None sends none; anything else is a 404."""

  def do_GET(self):
    self.server.requests.append(self.path)
    if self.path not in self.server.files:
      self.send_error(404)
      return
    body, declared = self.server.files[self.path]
    self.send_response(200)
    if declared is not None:
      self.send_header("Content-Length", str(declared))
    self.end_headers()
    self.wfile.write(body)
    self.wfile.flush()
    self.close_connection = True

  def log_message(self, *args):
    pass


@contextlib.contextmanager
def file_server():
  """A threaded HTTP server on 127.0.0.1: fill its `files` (see `_FileHandler`), read its
  `requests` (paths asked for, in order), and `url(path)` to reach it."""
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FileHandler)
  httpd.files, httpd.requests = {}, []
  httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}{path}"
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  try:
    yield httpd
  finally:
    httpd.shutdown()
    httpd.server_close()
