"""One pair end to end — tables, each joint, metrics — against the published approach.

    python -m benchmarks.end_to_end                        # embedded default model, CPU-sized
    python -m benchmarks.end_to_end --shape bert-base-cased --length 16 32 --dtype float32 bfloat16

For each model shape (random weights with the real config, or the embedded default's
real weights), sentence length and dtype it reports seconds per pair for each stage,
counted FLOP/s and the fraction of the matmul peak measured in the same run, AG bytes/s
against the measured memory bandwidth, and the same pair done the paper's way
(``benchmarks/paper_baseline.py``, PyTorch, float32) with the ratio between the two.
``--vocab`` shrinks V for slow devices (the tables stage costs 2·V forward passes).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import (
    DEFAULT_MODEL_DIR,
    SHAPES,
    machine,
    measured_bandwidth,
    measured_matmul_peak,
    model_shape,
    print_table,
    time_call,
    write_json,
)
from jaxjoint import load_mlm
from jaxjoint.flops import pair_flops
from jaxjoint.joints import METHODS, derive_joint
from jaxjoint.metrics import pair_metrics
from jaxjoint.models.checkpoint import save_checkpoint
from jaxjoint.models.mlm import random_params
from jaxjoint.sharding import make_mesh
from jaxjoint.tables import bucket_length, pair_tables

MASK_ID = 4  # the [MASK] of a random-weight shape without its own (ESM-2's is 32)
# ESM-2's vocabulary: <cls> 0, <eos> 2, the 20 amino acids at 4..23.
ESM_CLS, ESM_EOS, ESM_RESIDUES = 0, 2, (4, 24)


def checkpoint(shape: str, vocab: int | None, directory: Path) -> Path:
    """A checkpoint directory both jaxjoint and PyTorch load: the embedded default, or a
    random-weight model with the real config of ``shape`` (V replaced by ``vocab``)."""
    if shape == "default":
        return DEFAULT_MODEL_DIR
    config = model_shape(shape)
    if vocab:
        # ModernBERT's pad id (50283) sits at the end of its vocabulary.
        config = dataclasses.replace(config, vocab_size=vocab, pad_token_id=min(config.pad_token_id, vocab - 1))
    save_checkpoint(directory, config, random_params(config), mask_token_id=mask_id(config))
    return directory


def mask_id(config) -> int:
    """The shape's own [MASK] (ESM's token dropout reads it), else ``MASK_ID``."""
    return getattr(config, "mask_token_id", MASK_ID)


def sentence(config, length: int) -> np.ndarray:
    """int[length]: random tokens between two specials; a protein's residues for ESM."""
    rng = np.random.default_rng(length)
    if config.family == "esm":
        ids = rng.integers(*ESM_RESIDUES, size=length)
        ids[0], ids[-1] = ESM_CLS, ESM_EOS
    else:
        vocab = config.vocab_size
        ids = rng.integers(min(1000, vocab // 2), vocab, size=length)
        ids[0], ids[-1] = 2, 3
    return ids.astype(np.int64)


def run_jaxjoint(mlm, ids, a, b, dtype, methods, ag_iters, repeats) -> dict[str, float]:
    mesh = make_mesh()
    gold = (int(ids[a]), int(ids[b]))

    def timed(fn):
        # (median seconds, the last timed call's result): the result is not computed a third time
        out = []
        return time_call(lambda: out.append(fn()) or out[-1], repeats=repeats), out[-1]

    seconds, joints = {}, {}
    seconds["tables"], tables = timed(lambda: pair_tables(mlm, ids, a, b, mesh=mesh, dtype=dtype))
    for method in methods:
        options = {"iters": ag_iters} if method == "ag" else {}
        seconds[f"joint_{method}"], joints[method] = timed(
            lambda: derive_joint(tables, method, mesh=mesh, **options))  # noqa: B023 - called here
    seconds["metrics"] = time_call(
        lambda: [pair_metrics(tables, joints[m], gold=gold) for m in methods], repeats=repeats)
    return seconds


def run_baseline(model, ids, a, b, mask, methods, ag_iters, device) -> dict[str, float]:
    from benchmarks import paper_baseline  # PyTorch: imported only when the baseline runs

    gold = (int(ids[a]), int(ids[b]))
    start = time.perf_counter()
    t = paper_baseline.tables(model, ids, a, b, mask, device=device)
    seconds = {"tables": time.perf_counter() - start}
    start = time.perf_counter()
    joints = paper_baseline.joints(t, device=device, ag_iters=ag_iters)
    seconds["joints"] = time.perf_counter() - start
    start = time.perf_counter()
    for m in methods:
        paper_baseline.metrics(t, joints[m], gold)
    seconds["metrics"] = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", default=["default"],
                        choices=["default", *SHAPES])
    parser.add_argument("--length", nargs="+", type=int, default=[16],
                        help="tokens with specials; SNLI sentences are ~16, XSUM summaries ~32")
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--vocab", type=int, default=None, help="override V of the random-weight shapes")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ag-iters", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/end_to_end.json")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if not args.no_baseline:
        try:
            import torch
            import transformers
        except ImportError:
            raise SystemExit("the paper's baseline runs on PyTorch, which is not installed: "
                             "pip install -e '.[test]' (a CPU build from local disk), or pass --no-baseline") from None
        device = "cuda" if torch.cuda.is_available() else "cpu"

    peaks = {d: measured_matmul_peak(d) for d in args.dtype}
    bandwidth = measured_bandwidth()
    rows = []
    for shape in args.shape:
        tmp = Path(tempfile.mkdtemp(prefix="jaxjoint-bench-"))
        try:
            directory = checkpoint(shape, args.vocab, tmp)
            mlm = load_mlm(directory)
            if mlm.tokenizer is None:
                mlm.hf_config["mask_token_id"] = mask_id(mlm.config)
            torch_model = None if args.no_baseline else transformers.AutoModelForMaskedLM.from_pretrained(
                directory).eval().to(device)
            for length in args.length:
                ids = sentence(mlm.config, length)
                a, b = 1, length - 2
                baseline = None if torch_model is None else run_baseline(
                    torch_model, ids, a, b, mlm.mask_token_id, methods, args.ag_iters, device)
                for dtype in args.dtype:
                    s = run_jaxjoint(mlm, ids, a, b, dtype, methods, args.ag_iters, args.repeats)
                    total = sum(s.values())
                    flops = pair_flops(mlm.config, bucket_length(length, mlm.config.max_positions))
                    v = mlm.vocab_size
                    ag_bytes = 4 * v * v  # one iteration reads the table qA + qB once
                    row = {
                        "shape": shape, "V": v, "length": length, "dtype": dtype,
                        "devices": jax.device_count(), **{f"s_{k}": x for k, x in s.items()},
                        "s_total": total, "pairs_per_s": 1 / total,
                        "flops_per_pair": flops, "tables_flop_per_s": flops / s["tables"],
                        "fraction_of_peak": flops / s["tables"] / peaks[dtype],
                    }
                    if "ag" in methods:
                        per_iter = s["joint_ag"] / args.ag_iters  # includes set-up: a lower bound on speed
                        row["ag_bytes_per_s"] = ag_bytes / per_iter
                        row["ag_fraction_of_bandwidth"] = ag_bytes / per_iter / bandwidth
                    if baseline is not None:
                        row.update({f"baseline_s_{k}": x for k, x in baseline.items()})
                        row["baseline_s_total"] = sum(baseline.values())
                        row["speedup_vs_baseline"] = row["baseline_s_total"] / total
                    rows.append(row)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    print_table(rows, ["shape", "V", "length", "dtype", "s_tables", *[f"s_joint_{m}" for m in methods],
                       "s_metrics", "s_total", "pairs_per_s", "fraction_of_peak",
                       "ag_fraction_of_bandwidth", "baseline_s_total", "speedup_vs_baseline"])
    print(f"measured: matmul peak {', '.join(f'{d} {p:.4g} FLOP/s' for d, p in peaks.items())}; "
          f"bandwidth {bandwidth:.4g} B/s")
    write_json(args.json, {"machine": machine(), "matmul_peak_flop_per_s": peaks,
                           "bandwidth_bytes_per_s": bandwidth, "results": rows})


if __name__ == "__main__":
    main()
