#!/usr/bin/env bash
# One prepared pass of `transfer bench` on a GPU (or TPU) host, about 5 minutes on one H200.
#
#   scripts/gpu_bench.sh                 # table on stdout and in ./gpu_bench.md (or $OUT/)
#   BATCH=512 STEPS=50 scripts/gpu_bench.sh
#
# Runs the blog job (VGG16, blog head, conv frozen, 224x224, synthetic on-device batches) as:
# float32 and bfloat16 x shard_map and pmap, bfloat16 with block5 trainable, bfloat16 with
# Winograd convolutions (`conv=auto` leaves GPU convolutions to cuDNN; this row checks that), and the
# cache_features comparison (one head epoch on cached features vs one epoch through the backbone).
# Each run is its own process with a time limit, so one failure costs only its row.
#
# Needs jax, flax, optax, orbax-checkpoint, ml_collections and numpy; never TensorFlow (bench does
# not import it). If ml_collections is missing the script says so and stops before any run.
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
DEST="${OUT:-.}"
BATCH="${BATCH:-256}"
STEPS="${STEPS:-30}"
WARMUP="${WARMUP:-3}"
EPOCH_IMAGES="${EPOCH_IMAGES:-20000}"
LIMIT="${LIMIT:-100}"   # seconds per run
EXTRA="${EXTRA:-}"      # more flags for every run, e.g. a CPU dry run:
                        # EXTRA="--config.model=vgg16_tiny --config.image_size=32" BATCH=8
mkdir -p "$DEST"
JSONL="$DEST/gpu_bench.jsonl"
LOG="$DEST/gpu_bench.log"
: > "$JSONL"
: > "$LOG"

if ! "$PY" - <<'EOF' 2>>"$LOG"; then
import importlib, sys
missing = [m for m in ("jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "numpy")
           if importlib.util.find_spec(m.split(".")[0]) is None]
if missing:
  sys.exit(f"gpu_bench: missing modules {missing}; install them (pip install ml_collections ...)")
import jax
print(f"gpu_bench: {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}",
      file=sys.stderr)
EOF
  cat "$LOG" >&2
  exit 1
fi

run() {  # run LABEL ARGS...: one bench process, its JSON line tagged with LABEL
  local label="$1"; shift
  local line
  echo "gpu_bench: $label" >&2
  line=$(timeout "$LIMIT" "$PY" -m transfer.main bench --json --steps="$STEPS" --warmup="$WARMUP" \
         --config.batch_size="$BATCH" $EXTRA "$@" 2>>"$LOG" | tail -n 1)
  if [[ "$line" == \{* ]]; then
    echo "{\"label\": \"$label\", \"result\": $line}" >> "$JSONL"
  else
    echo "{\"label\": \"$label\", \"result\": null}" >> "$JSONL"
    echo "gpu_bench: $label failed or timed out (see $LOG)" >&2
  fi
}

run "bf16 shard_map"        --config.dtype=bfloat16 --config.parallel=shard_map
run "fp32 shard_map"        --config.dtype=float32 --config.parallel=shard_map
run "bf16 pmap"             --config.dtype=bfloat16 --config.parallel=pmap
run "fp32 pmap"             --config.dtype=float32 --config.parallel=pmap
run "bf16 block5 trainable" --config.dtype=bfloat16 --config.trainable='^head/,^block5'
run "bf16 winograd conv"    --config.dtype=bfloat16 --config.conv=winograd  # auto = cuDNN's choice
run "bf16 cached features"  --config.dtype=bfloat16 --config.cache_features=true \
                            --config.epoch_images="$EPOCH_IMAGES"

"$PY" - "$JSONL" <<'EOF' | tee "$DEST/gpu_bench.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
first = next((r["result"] for r in rows if r["result"]), None)
if first:
  print(f"{first['devices']} x {first['device_kind']}, jax {first['jax']}, jaxlib "
        f"{first['jaxlib']}, flax {first['flax']}; {first['model']} + {first['head']} head, batch "
        f"{first['batch_size']} at {first['image_size']}, {first['steps']} timed steps\n")
print("| run | images/s | step ms (median / p90) | compile s | TFLOP/s | MFU "
      "| train/forward time | train/forward FLOPs |")
print("|---|---|---|---|---|---|---|---|")
fmt = lambda v, f: "" if v is None else format(v, f)
for row in rows:
  r = row["result"]
  if r is None:
    print(f"| {row['label']} | failed | | | | | | |")
    continue
  print(f"| {row['label']} | {r['images_per_sec']:,.0f} | {r['step_ms_median']:.2f} / "
        f"{r['step_ms_p90']:.2f} | {r['compile_s']:.1f} | {r['tflops_per_sec']:.1f} | "
        f"{fmt(r['mfu'], '.1%')} | {fmt(r.get('train_forward_ratio'), '.3f')} | "
        f"{fmt(r.get('flops_ratio_train_forward'), '.3f')} |")
cached = next((r["result"] for r in rows if r["result"] and "head_epoch_s" in r["result"]), None)
if cached:
  print(f"\nCached features, {cached['epoch_images']:,} images: feature pass "
        f"{cached['feature_pass_s']:.2f} s once, head epoch {cached['head_epoch_s']:.3f} s, "
        f"backbone epoch {cached['backbone_epoch_s']:.2f} s "
        f"({cached['head_epoch_speedup']:.0f}x per epoch).")
EOF
