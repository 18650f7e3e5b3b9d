"""Length buckets: multiples of 8 (``jaxjoint.tables.bucket_length``) against powers of two.

    python -m benchmarks.buckets                       # embedded model, SNLI-like and XSUM-like mixes
    python -m benchmarks.buckets --sentences 24 --json benchmarks/results/cpu/buckets.json
    python -m benchmarks.buckets --model DIR --sentences 3     # another checkpoint (the tests: a tiny one)

Two length mixes: the embedded model's short held-out sentences (SNLI-like lengths)
and its long ones (XSUM-summary-like), the first N of each with the random masking
protocol. For each mix and each bucket rule it reports the padded tokens per
sentence, the counted FLOPs of the tables stage per pair, the tables stage's
seconds per pair (every bucket compiled first, then each pair's tables timed), and
the main job, ``jaxjoint evaluate`` on the same sentences with all five methods,
timed from start to summary with its compiles included (what a user waits for;
the jit caches are cleared before each).
The baseline is the bucket rule jaxjoint used before (16, 32, 64, ...), given the
same warm-up and repeats in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np

from benchmarks.common import DEFAULT_MODEL_DIR, machine, print_table, time_call, write_json
from jaxjoint import load_mlm, tables
from jaxjoint.config import resolve_config
from jaxjoint.data import load_sentences, make_pairs, max_tokens
from jaxjoint.flops import pair_flops
from jaxjoint.run import evaluate

MIXES = {"snli-like": "default", "xsum-like": "default-news"}


def powers_of_two(length: int, max_positions: int) -> int:
    """The bucket rule before issue 15: 16, 32, 64, 128, 256, 512, then the maximum."""
    for bucket in (16, 32, 64, 128, 256, 512):
        if length <= bucket:
            return min(bucket, max_positions)
    return max_positions


RULES: dict[str, Callable[[int, int], int]] = {"multiples of 8": tables.bucket_length,
                                               "powers of two": powers_of_two}


@contextlib.contextmanager
def bucket_rule(rule: Callable[[int, int], int]) -> Iterator[None]:
    """Make ``rule`` the tables stage's bucket rule for a while."""
    real = tables.bucket_length
    tables.bucket_length = rule
    try:
        yield
    finally:
        tables.bucket_length = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=24, help="sentences per mix (default 24)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the tables stage")
    parser.add_argument("--json", default="benchmarks/results/buckets.json")
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR),
                        help="checkpoint directory (default the embedded model)")
    args = parser.parse_args()

    mlm = load_mlm(args.model)
    rows = []
    for mix, data in MIXES.items():
        sentences = load_sentences(data, args.sentences)
        pairs, _ = make_pairs(sentences, mlm.tokenizer, masking="random", seed=0, max_length=max_tokens(mlm.config))
        lengths = [len(p.input_ids) for p in pairs]
        for name, rule in RULES.items():
            buckets = [rule(n, mlm.config.max_positions) for n in lengths]
            with bucket_rule(rule):
                for bucket in sorted(set(buckets)):  # compile every bucket before timing
                    pair = pairs[buckets.index(bucket)]
                    jax.block_until_ready(tables.pair_tables(mlm, pair.input_ids, pair.a, pair.b))
                seconds = [time_call(lambda p=p: tables.pair_tables(mlm, p.input_ids, p.a, p.b),
                                     repeats=args.repeats, warmup=0) for p in pairs]
                with tempfile.TemporaryDirectory() as out:
                    config = resolve_config({"model": args.model, "data": data, "max_sentences": args.sentences,
                                             "out": out, "devices": 1})
                    jax.clear_caches()  # both rules compile their programs inside the timed run
                    start = time.perf_counter()
                    evaluate(config, quiet=True)
                    main_job = time.perf_counter() - start
            rows.append({
                "mix": mix, "rule": name, "pairs": len(pairs),
                "mean_tokens": float(np.mean(lengths)),
                "mean_padding": float(np.mean(np.subtract(buckets, lengths))),
                "max_padding": int(np.max(np.subtract(buckets, lengths))),
                "buckets": sorted(set(buckets)),
                "tables_flops_per_pair": float(np.mean([pair_flops(mlm.config, b) for b in buckets])),
                "tables_s_per_pair": float(statistics.mean(seconds)),
                "main_job_s": main_job,
            })
    for row in rows:
        base = next(r for r in rows if r["mix"] == row["mix"] and r["rule"] == "powers of two")
        row["tables_speedup"] = base["tables_s_per_pair"] / row["tables_s_per_pair"]
        row["main_job_speedup"] = base["main_job_s"] / row["main_job_s"]
    print_table(rows, ["mix", "rule", "pairs", "mean_tokens", "mean_padding", "max_padding", "buckets",
                       "tables_flops_per_pair", "tables_s_per_pair", "tables_speedup", "main_job_s",
                       "main_job_speedup"])
    write_json(args.json, {"machine": machine(), "model": args.model, "sentences": args.sentences,
                           "repeats": args.repeats, "results": rows})


if __name__ == "__main__":
    main()
