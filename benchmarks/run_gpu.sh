#!/usr/bin/env bash
# Everything issue 7 asks of one GPU, and jaxjoint plan's estimates against measurements, in one
# call (device time is short). Expects
# jaxjoint installed with '.[cuda]' and a CUDA build of PyTorch for the baseline;
# on a machine whose python3 already has jax[cuda], flax, optax, safetensors,
# transformers and torch, run it from the repository root without installing:
#   PYTHON=python3 OUT=/some/dir bash benchmarks/run_gpu.sh
# Prepared, not yet run: no GPU has been lent to this project so far.
# JSON goes to ${OUT:-benchmarks/results/gpu}/; tables and logs to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
$py -c "import jax; print(jax.devices())"
# Correctness first: parity with transformers and float64 on the GPU backend (the
# tests that force 8 CPU devices fail on one GPU; their names are in the log).
JAX_PLATFORMS=cuda $py -m pytest -q tests/test_models.py tests/test_tables.py tests/test_joints.py \
    tests/test_metrics.py -p no:cacheprovider > "$out/tests.txt" 2>&1 || true
tail -15 "$out/tests.txt"
for shape in bert-base-cased bert-large-cased; do
  $py -m benchmarks.end_to_end --shape $shape --length 16 32 --dtype float32 bfloat16 --no-baseline \
      --json "$out/end_to_end_$shape.json"
done
$py -m benchmarks.end_to_end --shape bert-base-cased --length 16 --dtype float32 --repeats 1 \
    --json "$out/end_to_end_bert-base-cased_baseline.json"
$py -m benchmarks.tables_throughput --shape bert-base-cased bert-large-cased --length 16 32 --rows 8192 \
    --dtype float32 bfloat16 --chunk 64 256 1024 --json "$out/tables_chunks.json"
$py -m benchmarks.ag_iteration --vocab 28996 --json "$out/ag_iteration_28996.json"
# Planned against measured on the same shapes (jaxjoint.plan): the programs compiled
# for this GPU ('local') and for the deviceless description of it (h100 or h200, by
# what nvidia-smi named above), then estimated seconds beside end_to_end's timings.
for dtype in float32 bfloat16; do
  $py -m benchmarks.plan_table --rows bert-base-cased/16 bert-base-cased/32 bert-large-cased/16 \
      bert-large-cased/32 --targets local --dtype $dtype --json "$out/plan_local.json"
done
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200|a100|b200' | tr A-Z a-z || true)
if [ -n "$gpu" ]; then
  JAX_PLATFORMS=cpu $py -m benchmarks.plan_table --rows bert-base-cased/32 bert-large-cased/32 --targets "$gpu" \
      --dtype float32 --json "$out/plan_deviceless.json"
fi
$py -m benchmarks.plan_vs_measured "$out/plan_local.json" "$out"/end_to_end_bert-*.json \
    --json "$out/plan_vs_measured.json"
