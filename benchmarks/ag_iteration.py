"""One Arnold-Gokhale iteration at vocabulary size V: fused streaming pass vs a dense joint.

    python -m benchmarks.ag_iteration [--vocab 4096] [--json PATH]

jaxjoint's iteration (``derive_joint(..., "ag")``) reads one V x V table,
qA + qB (row-scaled), built once per pair from the two conditional tables, and keeps only
the two marginals; its time per iteration is the difference between runs of
``1 + n`` and ``1`` iterations divided by ``n`` (the set-up work common to both
cancels). Its bytes moved are that float32 table, 4 V^2 bytes, set against a large
array copy measured in the same run (bytes read + written). The baseline is the
straightforward implementation that carries the V x V joint from one iteration to
the next (reads the two probability tables and the joint, writes the joint), timed
the same way in the same run.

Prints a table and writes JSON; not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine, measured_bandwidth, print_table, write_json
from jaxjoint.joints import derive_joint
from jaxjoint.joints.streaming import default_block_rows
from jaxjoint.tables import tables_from_logits


@jax.jit
def dense_ag(q_a: jax.Array, q_b: jax.Array, iters: jax.Array) -> jax.Array:
    """float32[V, V] joint after ``iters`` AG iterations from uniform, in probability
    space as the paper does; q_a, q_b: float32[V, V] probability tables qA(a|b),
    qB(b|a). The joint is the loop state, written every iteration. Peaked tables
    underflow here (0/0); it is the speed reference, not a correct alternative."""
    v = q_a.shape[0]

    def step(_, p):
        p_a, p_b = p.sum(axis=1), p.sum(axis=0)
        new = (q_a + q_b) / (1 / p_a[:, None] + 1 / p_b[None, :])
        return new / new.sum()

    return jax.lax.fori_loop(0, iters, step, jnp.full((v, v), 1.0 / (v * v)))


@jax.jit
def dense_log_ag(log_q_a: jax.Array, log_q_b: jax.Array, iters: jax.Array) -> jax.Array:
    """The same dense loop in log space (jaxjoint's arithmetic, the joint materialised):
    float32[V, V] log joint; log_q_a, log_q_b: float32[V, V] log-probability tables."""
    v = log_q_a.shape[0]
    log_q = jnp.logaddexp(log_q_a, log_q_b)  # loop-invariant, hoisted

    def step(_, log_p):
        lp_a = jax.nn.logsumexp(log_p, axis=1)
        lp_b = jax.nn.logsumexp(log_p, axis=0)
        new = log_q - jnp.logaddexp(-lp_a[:, None], -lp_b[None, :])
        return new - jax.nn.logsumexp(new)

    return jax.lax.fori_loop(0, iters, step, jnp.full((v, v), -2 * jnp.log(v)))


def per_iteration(run, extra: int, repeats: int) -> float:
    """Median over ``repeats`` of (time of 1 + extra iterations - time of 1) / extra."""
    jax.block_until_ready(run(1))
    jax.block_until_ready(run(1 + extra))
    samples = []
    for _ in range(repeats):
        times = []
        for iters in (1, 1 + extra):
            start = time.perf_counter()
            jax.block_until_ready(run(iters))
            times.append(time.perf_counter() - start)
        samples.append((times[1] - times[0]) / extra)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=4096, help="V")
    parser.add_argument("--extra", type=int, default=10, help="iterations timed beyond the first")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-rows", type=int, default=None, help="rows per streaming block")
    parser.add_argument("--json", default="benchmarks/results/ag_iteration.json")
    args = parser.parse_args()
    v = args.vocab

    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    logits_a = 3 * jax.random.normal(key_a, (v, v), jnp.float32)
    logits_b = 3 * jax.random.normal(key_b, (v, v), jnp.float32)
    tables = tables_from_logits(logits_a, logits_b, jnp.zeros(v), jnp.zeros(v))
    block_rows = args.block_rows or default_block_rows(tables, None)

    bandwidth = measured_bandwidth()
    fused = per_iteration(
        lambda n: derive_joint(tables, "ag", iters=n, block_rows=block_rows), args.extra, args.repeats
    )
    log_q_a = jax.nn.log_softmax(logits_a, axis=0)
    log_q_b = jax.nn.log_softmax(logits_b, axis=1)
    q_a, q_b = jnp.exp(log_q_a), jnp.exp(log_q_b)
    dense = per_iteration(lambda n: dense_ag(q_a, q_b, jnp.int32(n)), args.extra, args.repeats)
    dense_log = per_iteration(lambda n: dense_log_ag(log_q_a, log_q_b, jnp.int32(n)), args.extra, args.repeats)

    # The three programs compute the same joint (a check that the timings compare like with like).
    iters = 1 + args.extra
    fused_log_p = np.asarray(derive_joint(tables, "ag", iters=iters, block_rows=block_rows).to_dense())
    max_diff = {
        "dense": float(np.nanmax(np.abs(np.exp(fused_log_p) - np.asarray(dense_ag(q_a, q_b, jnp.int32(iters)))))),
        "dense_log": float(np.abs(fused_log_p - np.asarray(dense_log_ag(log_q_a, log_q_b, jnp.int32(iters)))).max()),
    }

    fused_bytes = 4 * v * v  # the table qA + qB, read once
    dense_bytes = 4 * 4 * v * v  # two tables and the joint read, the joint written
    dense_log_bytes = 3 * 4 * v * v  # log(qA + qB) and the joint read, the joint written

    def row(name: str, seconds: float, nbytes: int) -> dict:
        return {
            "implementation": name,
            "ms_per_iter": 1e3 * seconds,
            "bytes_per_iter": nbytes,
            "GB_per_s": nbytes / seconds / 1e9,
            "fraction_of_copy_bw": nbytes / seconds / bandwidth,
            "jaxjoint_speedup": seconds / fused,
        }

    rows = [
        row("jaxjoint (streaming, one table)", fused, fused_bytes),
        row("dense joint, probability space", dense, dense_bytes),
        row("dense joint, log space", dense_log, dense_log_bytes),
    ]
    print(f"V = {v}, block_rows = {block_rows}, copy bandwidth {bandwidth / 1e9:.4g} GB/s; after {iters} "
          f"iterations max |p - p_dense| {max_diff['dense']:.2g}, max |log p - log p_dense_log| "
          f"{max_diff['dense_log']:.2g}")
    print_table(rows, list(rows[0]))
    write_json(
        args.json,
        {
            "benchmark": "ag_iteration",
            "machine": machine(),
            "vocab": v,
            "block_rows": block_rows,
            "extra_iterations": args.extra,
            "repeats": args.repeats,
            "copy_bandwidth_bytes_per_s": bandwidth,
            "s_per_iter": {"jaxjoint": fused, "dense": dense, "dense_log": dense_log},
            "speedup_vs_dense": dense / fused,
            "speedup_vs_dense_log": dense_log / fused,
            "jaxjoint_bytes_per_s": fused_bytes / fused,
            "jaxjoint_fraction_of_copy_bandwidth": fused_bytes / fused / bandwidth,
            "max_abs_difference": max_diff,
            "results": rows,
        },
    )

if __name__ == "__main__":
    main()
