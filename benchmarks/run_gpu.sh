#!/usr/bin/env bash
# The GPU checks of issues 7 and 20 in one short lease (at most 8 minutes on one H100),
# the most important first, each step's JSON written as soon as it exists:
#   1. machine.txt      nvidia-smi and JAX's devices
#   2. parity.json      --matmul-precision float32 against transformers' PyTorch model on
#                       the GPU at 1e-4 (random checkpoints of the seven families, made here),
#                       and what tensorfloat32 / bfloat16 / --dtype bfloat16 give instead
#   3. modes.json       the tables stage of a bert-base-shaped random model at 32 tokens in
#                       every mode on the same shapes, beside this GPU's measured product
#                       rate in each arithmetic and the plan's roofline estimate
#   4. end_to_end.json  one bert-base pair end to end (tables, five joints, metrics) in
#                       float32 and --dtype bfloat16
#   5. ag_iteration.json one AG iteration at V = 28,996 against the memory bandwidth, and one
#                       pass by jaxjoint's Pallas kernel against XLA's (the step fails if
#                       their sums differ by more than 1e-4: the kernel's first run on a GPU)
#   log.txt             every step's output, its exit status and seconds
# Run from the repository root, installing nothing, under a python3 that has jax with its
# CUDA plugin, flax, optax, transformers, a CUDA torch, safetensors, tokenizers and pyyaml
# (no `datasets`: nothing here imports it):
#   OUT=/some/dir bash benchmarks/run_gpu.sh
# JAXJOINT_GPU_SMOKE=1 runs every step at tiny shapes on whatever JAX finds (the suite
# runs it so on the CPU: tests/test_benchmarks.py). JAXJOINT_GPU_BUDGET_S (default 450)
# caps the whole run: each step gets its own limit (times JAXJOINT_GPU_STEP_SCALE, default
# 1, for slow hosts), cut to what is left, and a step that would start with under 20 s
# left is skipped and logged. A failed or skipped step does
# not stop the next; the exit status is 1 if any did.
# Plans compiled on the GPU host (benchmarks.plan_table --targets local) are left out:
# they take minutes of compiles; modes.json sets measured against the roofline instead.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${OUT:-benchmarks/results/gpu}
smoke=${JAXJOINT_GPU_SMOKE:-0}
budget=${JAXJOINT_GPU_BUDGET_S:-450}
scale=${JAXJOINT_GPU_STEP_SCALE:-1}
mkdir -p "$out"
log="$out/log.txt"
: > "$log"
start=$SECONDS
failed=0

# step NAME LIMIT_SECONDS COMMAND...: run COMMAND under a time limit, output to the log.
step() {
  local name=$1 limit=$2 left rc began
  shift 2
  limit=$((limit * scale))
  left=$((budget - (SECONDS - start)))
  if ((left < 20)); then
    echo "== $name: SKIPPED, ${left}s of the ${budget}s budget left" | tee -a "$log"
    failed=1
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  began=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - began))s" | tee -a "$log"
  ((rc != 0)) && failed=1
  return 0
}

if [ "$smoke" = 1 ]; then
  families=(bert); parity_size=(--tiny)
  timing=(--shape default --length 16 --rows 64 --chunk 32 --repeats 1)
  e2e=(--shape esm2_t6_8M_UR50D --length 16 --repeats 1 --ag-iters 3)
  ag=(--vocab 256 --extra 2 --repeats 1)
else
  families=(bert roberta xlm-roberta distilbert electra modernbert esm); parity_size=()
  timing=(--shape bert-base-cased --length 32 --rows 8192 --chunk 1024 --repeats 3)
  e2e=(--shape bert-base-cased --length 32 --repeats 2)
  ag=(--vocab 28996 --repeats 3)
fi

{
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
  else
    echo "no nvidia-smi"
  fi
  timeout 60 "$py" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} > "$out/machine.txt" 2>&1 || failed=1
cat "$out/machine.txt" | tee -a "$log"
step parity 180 "$py" -m benchmarks.matmul_modes parity "${parity_size[@]}" --families "${families[@]}" \
    --json "$out/parity.json"
step timing 150 "$py" -m benchmarks.matmul_modes timing "${timing[@]}" --json "$out/modes.json"
step end_to_end 120 "$py" -m benchmarks.end_to_end "${e2e[@]}" --dtype float32 bfloat16 --no-baseline \
    --json "$out/end_to_end.json"
step ag_iteration 45 "$py" -m benchmarks.ag_iteration "${ag[@]}" --json "$out/ag_iteration.json"
echo "== done in $((SECONDS - start))s; $( ((failed)) && echo 'some step failed or was skipped' || echo 'every step passed')" \
    | tee -a "$log"
exit $failed
