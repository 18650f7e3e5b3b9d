"""One Arnold-Gokhale pass and iteration at vocabulary size V, against the memory bandwidth.

    python -m benchmarks.ag_iteration [--vocab 4096] [--json PATH]

One pass (``ag.one_pass``: the row and column sums of one AG map, on the
loop-invariant table, at fixed marginals, as AG's loop runs it) is timed alone: by
jaxjoint's kernel (CPU: ``joints/cpu_pass.cc``; NVIDIA GPU: ``joints/gpu_pass.py``)
and by XLA (the baseline: what ran before the kernels, and on CPU what runs without
a C++ compiler; row blocks on CPU, the whole table on GPU),
beside a large array copy, a bare read of the table (XLA's sum of it: what any
pass over it costs at least) and XLA's arithmetic of the pass on one cache-resident
block (``cached_block_pass``: what XLA's pass costs when reading the table is
free), interleaved round by round with the same warm-up and repeats, so that all
of them see the same load. Its bytes are one read of the float32 table, 4 V^2.
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
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine, measured_bandwidth, print_table, write_json
from jaxjoint.joints import ag, derive_joint, resolve_mesh
from jaxjoint.joints.streaming import (
    REPLICATED,
    ROWS,
    default_block_rows,
    normalisers,
    shard,
)
from jaxjoint.tables import tables_from_logits


def pass_programs(tables, block_rows: int):
    """Jitted (kernel pass, XLA pass, bare read) on one device: ``ag.one_pass`` as AG's
    loop runs it, by jaxjoint's kernel and by XLA alone, and XLA's sum of the table
    (no arithmetic: what reading it costs); the passes take (log pA [V], log pB [V])
    and return (row lse, column lse). The table is built once, here."""
    mesh = resolve_mesh(tables, None)
    norm_a, norm_b = normalisers(tables)
    fa, fb = tables.logits_a, tables.logits_b

    def new_table(fa, fb, norm_b, norm_a):
        return ag.invariant_table(fa, fb, norm_a, norm_b)

    table = jax.jit(shard(mesh, new_table, (ROWS, ROWS, ROWS, REPLICATED), (ROWS, ROWS)))(fa, fb, norm_b, norm_a)

    def program(kernel: bool):
        run = jax.jit(functools.partial(ag.one_pass, mesh, block_rows, kernel=kernel))
        return lambda lp_a, lp_b: run(table, fa, fb, norm_a, norm_b, lp_a, lp_b)

    read = jax.jit(lambda e: e.sum())  # a bare read of the table: the ceiling of any pass
    return program(True), program(False), lambda: read(table[0]), ag.pass_block_rows(mesh, tables.vocab_size)


def cached_block_pass(v: int, block_rows: int):
    """The arithmetic of one pass without its memory traffic: ``ag.iteration_sums``'
    block step (the cells, their row sums, their weighted column sums)
    applied to one block of ``block_rows`` x V cells held in cache, once for each block
    of a V x V table. Its time is what a pass costs on this CPU when reading the table
    is free. Returns a function of no arguments."""
    n = max(1, v // block_rows)
    e = jax.random.uniform(jax.random.PRNGKey(1), (block_rows, v), jnp.float32)
    u = jnp.linspace(1.0, 2.0, block_rows, dtype=jnp.float32)
    w = jnp.linspace(1.0, 3.0, v, dtype=jnp.float32)
    weight = jnp.linspace(0.5, 1.0, block_rows, dtype=jnp.float32)

    @jax.jit
    def run(e, u, w):
        def body(i, carry):
            col, row = carry
            # i enters the cells so that XLA cannot hoist them out of the loop
            x = e / (u[:, None] + (w + i.astype(jnp.float32) * 1e-30)[None, :])
            return col + (x * weight[:, None]).sum(axis=0), row + x.sum(axis=1)
        return jax.lax.fori_loop(0, n, body, (jnp.zeros(v), jnp.zeros(block_rows)))

    return lambda: run(e, u, w)


def interleaved(fns: dict, rounds: int, per_round: int = 3) -> dict:
    """Median seconds of each ``fns[k]()`` (after one warm-up call each), timed in
    ``rounds`` rounds of ``per_round`` calls each, the functions taking turns, so
    that a change of the machine's load touches all of them alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(per_round):
                start = time.perf_counter()
                jax.block_until_ready(fn())
                samples[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


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


def time_one_pass(tables, block_rows: int, rounds: int) -> tuple[dict, float, float, int | None]:
    """(median seconds of the kernel pass, XLA's pass, the copy and, on CPU, XLA's
    cache-resident arithmetic; the copy's bytes/s; the largest |difference|
    between the two passes' logsumexps; the pass's block rows). The tables built
    here are freed on return, before the dense baselines."""
    v = tables.vocab_size
    kernel_pass, xla_pass, read, pass_rows = pass_programs(tables, block_rows)
    rng = np.random.default_rng(0)  # marginals of a mid-run iterate: random, within float32's easy range
    log_pa = jnp.asarray(np.log(rng.dirichlet(np.ones(v))), jnp.float32)
    log_pb = jnp.asarray(np.log(rng.dirichlet(np.ones(v))), jnp.float32)
    copy_bytes = 1 << 28
    scale = jax.jit(lambda x: x * 1.0001, donate_argnums=0)
    buffer = [scale(jnp.ones(copy_bytes // 4, jnp.float32))]

    def copy():
        buffer[0] = scale(buffer[0])
        return buffer[0]

    fns = {"kernel": lambda: kernel_pass(log_pa, log_pb), "xla": lambda: xla_pass(log_pa, log_pb), "read": read,
           "copy": copy}
    if pass_rows is not None:
        fns["cached"] = cached_block_pass(v, min(pass_rows, v))
    passes = interleaved(fns, rounds)
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(kernel_pass(log_pa, log_pb), xla_pass(log_pa, log_pb)))
    return passes, 2 * copy_bytes / passes["copy"], diff, pass_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=4096, help="V")
    parser.add_argument("--extra", type=int, default=10, help="iterations timed beyond the first")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-rows", type=int, default=None, help="rows per streaming block")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the interleaved pass timing")
    parser.add_argument("--json", default="benchmarks/results/ag_iteration.json")
    args = parser.parse_args()
    v = args.vocab

    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    logits_a = 3 * jax.random.normal(key_a, (v, v), jnp.float32)
    logits_b = 3 * jax.random.normal(key_b, (v, v), jnp.float32)
    tables = tables_from_logits(logits_a, logits_b, jnp.zeros(v), jnp.zeros(v))
    block_rows = args.block_rows or default_block_rows(tables, None)

    passes, pass_bandwidth, pass_diff, pass_rows = time_one_pass(tables, block_rows, args.rounds)
    if not pass_diff <= 1e-4:  # (also NaN) the kernel is wrong here: its time would mean nothing
        raise SystemExit(f"ag_iteration: jaxjoint's pass and XLA's differ by {pass_diff:.3g} in a logsumexp "
                         "(at most 1e-4 expected)")

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

    pass_rows_out = [
        {"pass": name, "ms": 1e3 * passes[key], "bytes": fused_bytes, "GB_per_s": fused_bytes / passes[key] / 1e9,
         "fraction_of_copy_bw": fused_bytes / passes[key] / pass_bandwidth}
        for name, key in (("jaxjoint pass (kernel)", "kernel"), ("XLA's pass", "xla"),
                          ("a bare read of the table (XLA's sum)", "read"),
                          ("XLA's arithmetic, cache-resident", "cached")) if key in passes]
    print(f"One pass, V = {v} (XLA's pass in blocks of {pass_rows} rows; None: whole), copy bandwidth "
          f"{pass_bandwidth / 1e9:.4g} GB/s in the same rounds; max |lse difference| {pass_diff:.2g}")
    print_table(pass_rows_out, list(pass_rows_out[0]))
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
            "pass": {"xla_block_rows": pass_rows, "rounds": args.rounds,
                     "copy_bandwidth_bytes_per_s": pass_bandwidth, "s_per_pass": passes["kernel"],
                     "xla_s_per_pass": passes["xla"], "xla_cache_resident_s_per_pass": passes.get("cached"),
                     "read_s": passes["read"],
                     "read_fraction_of_copy_bandwidth": fused_bytes / passes["read"] / pass_bandwidth,
                     "fraction_of_copy_bandwidth": fused_bytes / passes["kernel"] / pass_bandwidth,
                     "xla_fraction_of_copy_bandwidth": fused_bytes / passes["xla"] / pass_bandwidth,
                     "max_abs_lse_difference": pass_diff, "results": pass_rows_out},
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
