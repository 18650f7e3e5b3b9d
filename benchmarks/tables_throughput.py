"""Throughput of the tables stage: sequences/s, counted FLOP/s and the fraction of
the device's matmul peak measured in the same run, against two baselines on the
same substitutions: the last layer run at every row with the head only at the
masked position (jaxjoint before it trimmed its last layer), and the MLM head at
every position (the [batch, L, V] logits DESIGN.md §3.2 avoids).

    python -m benchmarks.tables_throughput --shape bert-base-cased --length 32 --rows 256

``--rows`` substitutions are timed (default: the full vocabulary); one pair costs 2·V
of them, so seconds per pair = 2·V / sequences per second.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine, measured_matmul_peak, model_shape, print_table, time_call, write_json
from jaxjoint.flops import sequence_flops
from jaxjoint.models.families import masked_lm_module
from jaxjoint.models.mlm import DTYPES, ModuleApply, random_params
from jaxjoint.sharding import make_mesh, mesh_size, padded_size, replicated
from jaxjoint.tables import bucket_length, substitution_table


def _full_last_layer(module, params, ids, mask, read_pos):
    """Every layer at every row, then the head at ``read_pos`` only."""
    hidden = module.apply({"params": params}, ids, mask, method="encode")
    return module.apply({"params": params}, hidden[:, read_pos], method="head")


def _head_everywhere(module, params, ids, mask, read_pos):
    """Logits at all L positions ([chunk, L, V]), then one row kept."""
    every = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return module.apply({"params": params}, ids, mask, every)[:, read_pos]


BASELINES = {
    "baseline: full last layer, head at masked position": _full_last_layer,
    "baseline: head at every position": _head_everywhere,
}


@functools.partial(jax.jit, static_argnames=("forward", "module", "n_chunks", "chunk"))
def baseline_table(forward, module, params, input_ids, attention_mask, read_pos, sub_pos, mask_id,
                   *, n_chunks, chunk):
    """The same substitutions as ``substitution_table``, on one device, through ``forward``."""
    base = input_ids.at[read_pos].set(mask_id)

    def one_chunk(values):
        ids = jnp.tile(base[None], (chunk, 1)).at[:, sub_pos].set(values)
        mask = jnp.tile(attention_mask[None], (chunk, 1))
        return forward(module, params, ids, mask, read_pos)

    tokens = jnp.arange(n_chunks * chunk, dtype=jnp.int32) % module.config.vocab_size
    return jax.lax.map(one_chunk, tokens.reshape(n_chunks, chunk))


def run(shape: str, length: int, rows: int | None, dtype: str, chunk: int, baseline: bool,
        peak: float) -> list[dict]:
    config = model_shape(shape)
    mesh = make_mesh()
    rows = padded_size(rows or config.vocab_size, mesh)
    module = masked_lm_module(config, DTYPES[dtype])
    params = jax.device_put(random_params(config), replicated(mesh))
    bucket = bucket_length(length, config.max_positions)
    rng = np.random.default_rng(0)
    ids = np.full(bucket, config.pad_token_id, np.int32)
    ids[:length] = rng.integers(1000 % config.vocab_size, config.vocab_size, size=length)
    mask = (np.arange(bucket) < length).astype(np.int32)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    a, b, mask_id = jnp.int32(1), jnp.int32(length - 2), jnp.int32(4)
    local = rows // mesh_size(mesh)
    n_chunks = -(-local // chunk)
    per_seq = sequence_flops(config, bucket)

    results = []
    variants = [("jaxjoint: last layer and head at masked position", lambda: substitution_table(
        ModuleApply(module), params, ids, mask, a, b, mask_id, vocab=config.vocab_size, mesh=mesh,
        n_chunks=n_chunks, chunk=-(-local // n_chunks),
        rows=rows))]
    if baseline:
        base_params = jax.device_put(params, jax.devices()[0])
        variants += [(name, functools.partial(
            baseline_table, forward, module, base_params, ids, mask, a, b, mask_id,
            n_chunks=-(-rows // chunk), chunk=chunk)) for name, forward in BASELINES.items()]
    for name, fn in variants:
        seconds = time_call(fn, repeats=3)
        seqs = rows / seconds
        flops = seqs * per_seq  # counted useful FLOPs (head at one position), at the bucket length
        results.append({
            "variant": name, "shape": shape, "length": length, "bucket": bucket, "dtype": dtype,
            "rows": rows, "chunk": chunk, "devices": mesh_size(mesh), "seconds": seconds,
            "sequences_per_s": seqs, "seconds_per_pair": 2 * config.vocab_size / seqs,
            "flops_per_sequence": per_seq, "flop_per_s": flops, "fraction_of_peak": flops / peak,
        })
    if baseline:  # against the head everywhere, the paper's approach
        for r in results:
            r["speedup_vs_baseline"] = results[-1]["seconds"] / r["seconds"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", default=["bert-base-cased"])
    parser.add_argument("--length", nargs="+", type=int, default=[32])
    parser.add_argument("--rows", type=int, default=None, help="substitutions timed (default V)")
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=list(DTYPES))
    parser.add_argument("--chunk", nargs="+", type=int, default=[64])
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/tables_throughput.json")
    args = parser.parse_args()

    peaks = {d: measured_matmul_peak(d) for d in args.dtype}
    rows = []
    for shape in args.shape:
        for length in args.length:
            for dtype in args.dtype:
                for chunk in args.chunk:
                    rows += run(shape, length, args.rows, dtype, chunk, not args.no_baseline, peaks[dtype])
    print_table(rows, ["variant", "shape", "length", "dtype", "chunk", "devices", "sequences_per_s",
                       "seconds_per_pair", "flop_per_s", "fraction_of_peak", "speedup_vs_baseline"])
    print("measured matmul peak (FLOP/s):", {d: f"{p:.4g}" for d, p in peaks.items()})
    write_json(args.json, {"machine": machine(), "matmul_peak_flop_per_s": peaks, "results": rows})


if __name__ == "__main__":
    main()
