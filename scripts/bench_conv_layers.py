"""Each distinct 3x3 conv layer of VGG16 timed alone: XLA's convolution, Winograd, and oneDNN.

One row per layer shape (conv + bias + ReLU, float32, NHWC, SAME), best of `--repeats` after a
warm-up call. The three contestants alternate layer by layer in one process, so load from elsewhere
falls on all of them alike: `transfer`'s two algorithms (`conv="xla"` and `conv="winograd"`, with the
CPU settings every `transfer` command applies) and, with `--tf`, TensorFlow's fused oneDNN
convolution, which is what Keras runs on a CPU.

    python scripts/bench_conv_layers.py --tf            # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transfer import parallel  # noqa: E402

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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--tf", action="store_true", help="also time TensorFlow (oneDNN)")
  args = parser.parse_args()
  parallel.configure_cpu()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  from transfer.models import winograd

  def xla_conv(x, k, b):
    return jax.nn.relu(lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC")) + b)

  def winograd_conv(x, k, b):
    return jax.nn.relu(winograd.conv3x3(x, k) + b)

  jitted = {"xla": jax.jit(xla_conv), "winograd": jax.jit(winograd_conv)}
  if args.tf:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

  rng = np.random.default_rng(0)
  names = ["xla", "winograd"] + (["tf-onednn"] if args.tf else [])
  print(f"batch {args.batch}, float32, best of {args.repeats}; ms per call (GFLOP/s of direct "
        f"convolution arithmetic)")
  print("| layer input | channels | " + " | ".join(names) + " | winograd vs xla |"
        + (" winograd vs tf |" if args.tf else ""))
  print("|---|---|" + "---|" * (len(names) + 1 + args.tf))
  totals = dict.fromkeys(names, 0.0)
  for side, cin, cout, count in LAYERS:
    x = rng.standard_normal((args.batch, side, side, cin), np.float32)
    k = (rng.standard_normal((3, 3, cin, cout), np.float32) / np.sqrt(9 * cin)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32) * 0.1
    flops = 2 * args.batch * side * side * cin * cout * 9
    dev = [jnp.asarray(a) for a in (x, k, b)]
    seconds = {name: best_time(lambda f=f: f(*dev).block_until_ready(), args.repeats)
               for name, f in jitted.items()}
    if args.tf:
      xt, kt, bt = tf.constant(x), tf.Variable(k), tf.Variable(b)
      fused = tf.function(lambda v: tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(v, kt, 1, "SAME"), bt)))
      seconds["tf-onednn"] = best_time(lambda: fused(xt).numpy(), args.repeats)
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
