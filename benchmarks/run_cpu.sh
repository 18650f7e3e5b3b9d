#!/usr/bin/env bash
# The CPU runs recorded in benchmarks/RESULTS.md, in one go (about 23 minutes on 2 cores, and
# 15 more for ag_solvers).
# JSON goes to benchmarks/results/cpu/; the printed tables to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=benchmarks/results/cpu
mkdir -p "$out"
$py -m benchmarks.tables_throughput --shape default --length 16 32 --chunk 128 512 2048 --json "$out/tables_default.json"
$py -m benchmarks.tables_throughput --shape bert-base-cased --length 32 --rows 128 --chunk 32 128 --json "$out/tables_bert_base.json"
$py -m benchmarks.ag_iteration --vocab 2048 --json "$out/ag_iteration_2048.json"
$py -m benchmarks.ag_iteration --vocab 4096 --json "$out/ag_iteration_4096.json"
$py -m benchmarks.ag_iteration --vocab 8192 --json "$out/ag_iteration_8192.json"
$py -m benchmarks.end_to_end --shape default --length 16 32 --json "$out/end_to_end_default.json"
$py -m benchmarks.end_to_end --shape bert-base-cased --vocab 1024 --length 16 32 --repeats 1 \
    --json "$out/end_to_end_bert_base_v1024.json"
$py -m benchmarks.buckets --sentences 24 --json "$out/buckets.json"
$py -m benchmarks.ag_solvers --max-sentences 6 --plain-max-sentences 2 --json "$out/ag_solvers.json"
