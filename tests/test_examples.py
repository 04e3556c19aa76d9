"""The scripts in examples/, each run as a user runs it (a subprocess), at a tiny size."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import HANG_S, flatten

pytestmark = pytest.mark.usefixtures("home")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(script, *args):
  """`python examples/SCRIPT ARGS` from the repository root with this checkout's `transfer`;
  returns its stdout, asserting it exited 0."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  done = subprocess.run([sys.executable, os.path.join("examples", script), *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=HANG_S)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_linear_probe(tmp_path):
  """Two classes a linear probe must tell apart (bright and dark noise images of various
  sizes), on random vgg16_tiny features at 32 px."""
  rng = np.random.default_rng(0)
  for name, low in [("bright", 170), ("dark", 0)]:
    os.makedirs(tmp_path / name)
    for i in range(10):
      size = (int(rng.integers(30, 60)), int(rng.integers(30, 60)), 3)
      pixels = rng.integers(low, low + 86, size, dtype=np.uint8)
      Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
  out = run_example("linear_probe.py", "--data", str(tmp_path), "--model", "vgg16_tiny",
                    "--weights", "none", "--image_size", "32", "--batch_size", "4")
  found = re.search(r"2 classes, 16 train / 4 val images: linear probe val accuracy (\S+)", out)
  assert found, out
  assert float(found.group(1)) == 1.0


def test_read_bench(tmp_path):
  """Runs two tiny train benchmarks (head only, head + block5) into a JSON-lines file, then
  reads the file alone: the same two rows, rates from the median step, compared with the first."""
  results = tmp_path / "bench.jsonl"
  tiny = ["model=vgg16_tiny", "image_size=32", "batch_size=8", "epoch_images=32",
          "synthetic.train_size=32", "synthetic.val_size=8", "synthetic.base_size=16"]
  ran = run_example("read_bench.py", "--run", str(results), "--trainable", "^head/",
                    "^head/,^block5_", "--set", *tiny, "--steps", "3", "--warmup", "1")
  rows = [json.loads(line) for line in results.read_text().splitlines()]
  assert [r["trainable"] for r in rows] == [["^head/"], ["^head/", "^block5_"]]
  for r in rows:
    assert r["steps_per_sec"] == pytest.approx(1e3 / r["step_ms_median"])
  read = run_example("read_bench.py", str(results))
  assert read == ran
  lines = read.splitlines()
  assert lines[0].split()[:3] == ["mode", "model", "trainable"] and len(lines) == 3
  assert lines[1].split()[:3] == ["train", "vgg16_tiny", "^head/"]
  assert lines[2].split()[:3] == ["train", "vgg16_tiny", "^head/,^block5_"]
  assert lines[1].split()[-2:] == ["1.00x", "same"]
  ratio = rows[0]["step_ms_median"] / rows[1]["step_ms_median"]
  assert lines[2].split()[-2:] == [f"{ratio:.2f}x", "same"]


def test_custom_loop_trains_the_unfrozen_layers_and_leaves_the_callers_variables(capsys):
  """Imported rather than run, to look at what the loop returns: the caller's variables (still
  readable) and the state, in which only conv5 and the head moved (params and statistics)."""
  spec = importlib.util.spec_from_file_location(
      "custom_loop", os.path.join(ROOT, "examples", "custom_loop.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  variables, state = module.main(steps=3)
  assert int(state.step) == 3 and "step 3: loss" in capsys.readouterr().out
  before, after = flatten(jax.device_get(variables)), flatten(jax.device_get(state.variables))
  changed = {k.split("/")[1] for k in before if not np.array_equal(before[k], after[k])}
  trained = {k.split("/")[1] for k in before if k.startswith("params/")
             and k.split("/")[1].startswith(("conv5_", "head"))}
  assert changed == trained  # params and BatchNorm statistics of conv5 and the head only
