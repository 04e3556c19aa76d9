"""Reading `transfer bench` results from Python: collect rows, compare them in one table.

Each `transfer bench --json` prints one JSON line (the job, the environment and the timing; keys
in docs/BENCHMARKS.md). Append them to a file as you go, then compare:

    transfer bench --json >> bench.jsonl
    transfer bench --json --config.trainable='["^head/","^block5_"]' >> bench.jsonl
    python examples/read_bench.py bench.jsonl

or let this script run the benchmarks in this process (`transfer.bench.run`, the function the
CLI calls) for each trainable set, save the rows and print the same table:

    python examples/read_bench.py --run bench.jsonl --trainable '^head/' '^head/,^block5_'

Every rate is derived from the median step time (one statistic per row); `vs first` compares
each row's median step with the first row's. Rows from different machines or software versions
are marked, since their numbers do not compare.
"""

import argparse
import json

import transfer

COLUMNS = [("mode", "{}"), ("model", "{}"), ("trainable", "{}"), ("batch_size", "{}"),
           ("image_size", "{}"), ("dtype", "{}"), ("images_per_sec", "{:,.1f}"),
           ("step_ms_median", "{:,.2f}"), ("step_ms_p90", "{:,.2f}"), ("compile_s", "{:,.1f}")]
MACHINE = ("device_kind", "devices", "jax", "jaxlib", "xla_flags")


def read_rows(paths):
  """The bench results in JSON-lines files (other lines, like a table on the same stream, are
  skipped)."""
  rows = []
  for path in paths:
    with open(path) as f:
      rows += [json.loads(line) for line in f if line.startswith("{")]
  return rows


def run_rows(trainable_sets, overrides, steps, warmup):
  """One `transfer.bench.run` per trainable set (comma-separated patterns), on the bench config
  with `KEY=VALUE` overrides."""
  rows = []
  for trainable in trainable_sets:
    config = transfer.configs.load("bench")
    transfer.configs.apply_overrides(config, dict(o.split("=", 1) for o in overrides))
    config.trainable = trainable.split(",")
    rows.append(transfer.bench.run(config, mode="train", steps=steps, warmup=warmup))
  return rows


def table(rows):
  """The rows as an aligned text table, with each median step relative to the first row's."""
  first = rows[0]
  header = [name for name, _ in COLUMNS] + ["vs first", "machine"]
  lines = [header]
  for row in rows:
    cells = [fmt.format(",".join(row[name]) if name == "trainable" else row[name])
             for name, fmt in COLUMNS]
    cells.append(f"{first['step_ms_median'] / row['step_ms_median']:.2f}x")
    same = all(row.get(k) == first.get(k) for k in MACHINE)
    cells.append("same" if same else "DIFFERENT: " + ", ".join(
        k for k in MACHINE if row.get(k) != first.get(k)))
    lines.append(cells)
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                   for line in lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("files", nargs="+", help="JSON-lines files of `transfer bench --json`")
  parser.add_argument("--run", action="store_true",
                      help="run the benchmarks first and append their rows to the (one) file")
  parser.add_argument("--trainable", nargs="+", default=["^head/"],
                      help="with --run: trainable sets to time, patterns comma-separated")
  parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                      help="with --run: bench config overrides, e.g. model=vgg16_tiny")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=2)
  args = parser.parse_args()
  if args.run:
    rows = run_rows(args.trainable, args.set, args.steps, args.warmup)
    with open(args.files[0], "a") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)
  rows = read_rows(args.files)
  if not rows:
    parser.error(f"no bench results in {', '.join(args.files)}")
  print(table(rows))


if __name__ == "__main__":
  main()
