"""Each distinct 3x3 conv layer of VGG16 timed alone: XLA's convolution, Winograd, and oneDNN.

One row per layer shape (conv + bias + ReLU, float32, NHWC, SAME), best of `--repeats` after a
warm-up call. `transfer`'s two algorithms (`conv="xla"` and `conv="winograd"`, with the CPU
settings every `transfer` command applies: XLA flags and huge pages) alternate layer by layer in one process; with `--tf`,
TensorFlow's fused oneDNN convolution (what Keras runs on a CPU) is timed first in a process of its
own (TensorFlow's thread pools, loaded in the same process, slow JAX's next calls down).

    python scripts/bench_conv_layers.py --tf            # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transfer import platform  # noqa: E402  (imports nothing heavy)

# (input side, input channels, output channels, how many such layers VGG16 has)
LAYERS = ((224, 3, 64, 1), (224, 64, 64, 1), (112, 64, 128, 1), (112, 128, 128, 1),
          (56, 128, 256, 1), (56, 256, 256, 2), (28, 256, 512, 1), (28, 512, 512, 2),
          (14, 512, 512, 3))


def best_time(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def layer_arrays(batch: int):
  """The same random input, kernel and bias for every contestant, layer by layer."""
  import numpy as np
  rng = np.random.default_rng(0)
  for side, cin, cout, _ in LAYERS:
    x = rng.standard_normal((batch, side, side, cin), np.float32)
    k = (rng.standard_normal((3, 3, cin, cout), np.float32) / np.sqrt(9 * cin)).astype(np.float32)
    yield x, k, rng.standard_normal(cout).astype(np.float32) * 0.1


def tf_times(batch: int, repeats: int) -> list[float]:
  """Seconds per layer for TensorFlow's conv2d + bias_add + relu (grappler fuses them for oneDNN)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow as tf
  out = []
  for x, k, b in layer_arrays(batch):
    xt, kt, bt = tf.constant(x), tf.Variable(k), tf.Variable(b)
    fused = tf.function(lambda v: tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(v, kt, 1, "SAME"), bt)))
    out.append(best_time(lambda: fused(xt).numpy(), repeats))
  return out


def main() -> None:
  platform.hugepages.restart_if_wanted()  # as the `transfer` command does
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--tf", action="store_true", help="also time TensorFlow (oneDNN)")
  parser.add_argument("--tf_worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.tf_worker:
    print(json.dumps(tf_times(args.batch, args.repeats)))
    return
  tf_seconds = None
  if args.tf:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--tf_worker", "--batch",
                           str(args.batch), "--repeats", str(args.repeats)],
                          capture_output=True, text=True, check=True)
    tf_seconds = json.loads(done.stdout.strip().splitlines()[-1])

  platform.setup()  # as every `transfer` command does, before JAX has a backend
  import jax
  import jax.numpy as jnp
  from jax import lax

  from transfer.models import winograd

  def xla_conv(x, k, b):
    return jax.nn.relu(lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC")) + b)

  def winograd_conv(x, k, b):
    return jax.nn.relu(winograd.conv3x3(x, k) + b)

  jitted = {"xla": jax.jit(xla_conv), "winograd": jax.jit(winograd_conv)}
  names = ["xla", "winograd"] + (["tf-onednn"] if args.tf else [])
  print(f"batch {args.batch}, float32, best of {args.repeats}; ms per call (GFLOP/s of direct "
        f"convolution arithmetic)")
  print("| layer input | channels | " + " | ".join(names) + " | winograd vs xla |"
        + (" winograd vs tf |" if args.tf else ""))
  print("|---|---|" + "---|" * (len(names) + 1 + args.tf))
  totals = dict.fromkeys(names, 0.0)
  for i, ((side, cin, cout, count), arrays) in enumerate(zip(LAYERS, layer_arrays(args.batch))):
    flops = 2 * args.batch * side * side * cin * cout * 9
    dev = [jnp.asarray(a) for a in arrays]
    seconds = {name: best_time(lambda f=f: f(*dev).block_until_ready(), args.repeats)
               for name, f in jitted.items()}
    if args.tf:
      seconds["tf-onednn"] = tf_seconds[i]
    for name in names:
      totals[name] += count * seconds[name]
    cells = [f"{seconds[n] * 1e3:.0f} ({flops / seconds[n] / 1e9:.0f})" for n in names]
    ratios = [f"{seconds['xla'] / seconds['winograd']:.2f}"]
    if args.tf:
      ratios.append(f"{seconds['tf-onednn'] / seconds['winograd']:.2f}")
    print(f"| {side}x{side} | {cin} -> {cout} | " + " | ".join(cells + ratios) + " |", flush=True)
  cells = [f"{totals[n] * 1e3:.0f}" for n in names]
  ratios = [f"{totals['xla'] / totals['winograd']:.2f}"]
  if args.tf:
    ratios.append(f"{totals['tf-onednn'] / totals['winograd']:.2f}")
  print("| all 13 layers | | " + " | ".join(cells + ratios) + " |")


if __name__ == "__main__":
  main()
