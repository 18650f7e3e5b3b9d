"""Streaming reductions over a pair's row-sharded V x V tables.

Whole-table work (log Z, each AG iteration, the KL sums of J) is a pass that walks
the rows in blocks of ``block_rows``: a block of cells exists only while it is
reduced, and one pass gives both the row and the column logsumexps. On a mesh the
passes run under ``jax.shard_map`` over ``VOCAB_AXIS``: each device reduces its own
rows; only per-column results (V floats: a pmax and a psum) and scalars cross
devices. The ``local_*`` functions run inside ``shard_map``; ``row_col_lse`` and
``kl_sum`` wrap them for a mesh. Single rows and cells are read with ``sharded_take``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxjoint.joints.cells import Normaliser, combine, neg_inf_to_zero
from jaxjoint.sharding import VOCAB_AXIS, mesh_size
from jaxjoint.tables import PairTables

# Cells per block of a streaming pass: large enough to amortise the per-block
# column merge (V log-add-exps), small enough to stay in cache on CPU.
BLOCK_CELLS = 1 << 18
ROWS = P(VOCAB_AXIS)
REPLICATED = P()


def default_block_rows(tables: PairTables, mesh: Mesh | None) -> int:
    """Rows per block of a streaming pass: about ``BLOCK_CELLS`` cells."""
    local_rows = tables.padded_vocab_size // mesh_size(mesh)
    return max(1, min(local_rows, BLOCK_CELLS // tables.vocab_size))


# --- local passes (called inside shard_map) ------------------------------------------


def fold_rows(step: Callable, carry: Any, rows: tuple, block_rows: int):
    """Run ``step(carry, row_block) -> (carry, out[c])`` over consecutive row blocks.

    rows: a tuple of pytrees of arrays with a common leading dimension n. Returns
    the final carry and the per-row outputs (float32[n], or a tuple of them when
    ``step`` gives a tuple). Full blocks go through
    ``lax.scan`` on dynamic slices (no copy of the tables); a shorter last block is
    handled once after it.
    """
    n = rows[0].shape[0]
    c = min(block_rows, n)
    full, tail = divmod(n, c)

    def body(carry, i):
        return step(carry, jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, i * c, c), rows))

    carry, outs = lax.scan(body, carry, jnp.arange(full))
    outs = jax.tree.map(lambda o: o.reshape(full * c), outs)
    if tail:
        carry, last = step(carry, jax.tree.map(lambda x: x[full * c :], rows))
        outs = jax.tree.map(lambda o, t: jnp.concatenate([o, t]), outs, last)
    return carry, outs


def logsumexp_across_devices(x: jax.Array) -> jax.Array:
    """Elementwise logsumexp of ``x`` over the devices of ``VOCAB_AXIS``.

    A shared shift first (pmax), then one psum: shifting each column by an a-priori
    bound instead would save the pmax but lets peaked columns underflow to -inf.
    """
    shift = lax.pmax(x, VOCAB_AXIS)
    shift = neg_inf_to_zero(shift)
    return jnp.log(lax.psum(jnp.exp(x - shift), VOCAB_AXIS)) + shift


def logsumexp_parts(top, ratio, axis: int):
    """logsumexp of ``top + log(ratio)`` along ``axis``, shifted by the max of ``top``."""
    shift = top.max(axis=axis, keepdims=True)
    shift = neg_inf_to_zero(shift)
    w = jnp.exp(top - shift)
    if ratio is not None:
        w = w * ratio
    return jnp.log(w.sum(axis=axis)) + shift.squeeze(axis)


def local_row_col_lse(cell: Callable, rows: tuple, cols: tuple, block_rows: int):
    """One pass over the local rows: logsumexp of the cells over b for each local
    row (float32[n]) and over this device's rows for each column b (float32[V]).
    ``cell(block, cols)`` gives a block's cells as ``(top, ratio)`` (``cells.cell_parts``)."""
    v = rows[0].shape[1]

    def step(col_lse, block):
        top, ratio = cell(block, cols)
        block_col = logsumexp_parts(top, ratio, 0)
        return jnp.logaddexp(col_lse, block_col), logsumexp_parts(top, ratio, 1)

    init = lax.pcast(jnp.full((v,), -jnp.inf), VOCAB_AXIS, to="varying")
    col_lse, row_lse = fold_rows(step, init, rows, block_rows)
    return row_lse, col_lse


def kl_terms(log_q: jax.Array, log_p: jax.Array) -> jax.Array:
    """Elementwise ``q (log q - log p)`` of broadcastable log-probabilities, the
    summands of ``KL(q || p)``; 0 where q = 0 (padding, underflow), never NaN."""
    q = jnp.exp(log_q)
    return jnp.where(q > 0, q * (log_q - log_p), 0.0)


def local_kl_sum(cell: Callable, rows: tuple, cols: tuple, row_lse, col_lse, block_rows: int):
    """``sum_b KL(qA(.|b) || p(.|b)) + sum_a KL(qB(.|a) || p(.|a))`` over all devices.

    ``row_lse`` (local rows) and ``col_lse`` are the logsumexps of the cells along b
    and along a, so ``cell - col_lse`` is ``log p(a|b)`` and ``cell - row_lse`` is
    ``log p(b|a)``. rows = (fa, fb, nb, row) and cols = (na, col) as for ``cell``.
    """

    def step(carry, block):
        fa, fb, nb = block[:3]
        r = block[-1]
        x = combine(*cell(block[:-1], cols))
        kl = kl_terms(cols[0][None, :].log_q(fa), x - col_lse[None, :])
        kl += kl_terms(nb[:, None].log_q(fb), x - r[:, None])
        return carry, kl.sum(axis=1)

    _, per_row = fold_rows(step, (), rows + (row_lse,), block_rows)
    return lax.psum(per_row.sum(), VOCAB_AXIS)


# --- sharded wrappers --------------------------------------------------------------


def shard(mesh: Mesh, fn: Callable, in_specs, out_specs) -> Callable:
    """``fn`` under ``jax.shard_map`` on ``mesh`` with the given partition specs."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def row_col_lse(mesh, block_rows, cell, rows, cols):
    """float32[Vp], float32[V]: logsumexp of the (top, ratio) cells along b and along a."""
    def fn(rows, cols):
        row_lse, col_lse = local_row_col_lse(cell, rows, cols, block_rows)
        return row_lse, logsumexp_across_devices(col_lse)

    return shard(mesh, fn, (ROWS, REPLICATED), (ROWS, REPLICATED))(rows, cols)


def kl_sum(mesh, block_rows, cell, rows, cols, row_lse, col_lse):
    """float32[]: the sum of the 2V KL terms of DESIGN.md §1 (J(p) when p is AG's)."""
    fn = functools.partial(local_kl_sum, cell, block_rows=block_rows)
    return shard(mesh, fn, (ROWS, REPLICATED, ROWS, REPLICATED), REPLICATED)(rows, cols, row_lse, col_lse)


def sharded_take(mesh: Mesh, table: jax.Array, a, b=None) -> jax.Array:
    """``table[a]`` (``b`` None) or ``table[a, b]`` of a table sharded by rows on
    ``mesh``, replicated; each row read by the device that holds it.

    table: float[Vp, ...] (row-sharded, ``ROWS``); a, b: int arrays (or ints) that
    broadcast against each other, indices as jnp takes them (negative ones from the
    end, out-of-range ones clamped). Returns ``a``'s shape + ``table.shape[1:]``, or
    the broadcast shape of a and b.

    Plain indexing, ``table[a]``, makes XLA's partitioner gather the whole table
    onto every device first (temporaries of one full table per device, for each
    table read): here each device reads its own rows of ``a`` (clamped elsewhere),
    zeroes the rest and one psum of the result's size combines them. A column,
    ``table[:, b]``, needs none of this.
    """
    vp = table.shape[0]
    a = jnp.asarray(a, jnp.int32)
    a = jnp.clip(jnp.where(a < 0, a + vp, a), 0, vp - 1)
    extra = () if b is None else (jnp.asarray(b, jnp.int32),)

    def local(t, a, *b):
        n = t.shape[0]
        j = a - lax.axis_index(VOCAB_AXIS) * n
        mine = (j >= 0) & (j < n)
        j = jnp.clip(j, 0, n - 1)
        if b:
            values = t[j, b[0]]
        else:
            values = t[j]
            mine = mine.reshape(mine.shape + (1,) * (t.ndim - 1))
        return lax.psum(jnp.where(mine, values, jnp.zeros((), values.dtype)), VOCAB_AXIS)

    specs = (ROWS, REPLICATED) + (REPLICATED,) * len(extra)
    return shard(mesh, local, specs, REPLICATED)(table, a, *extra)


def normalisers(tables: PairTables) -> tuple[Normaliser, Normaliser]:
    """norm_a of float32[V] (logsumexp of logits_a over a) and norm_b of float32[Vp]
    (logsumexp of logits_b over b; padding rows stay -inf).

    Plain reductions of the tables themselves: on a mesh the partitioner adds the
    all-reduce for norm_a, and nothing V x V is produced.
    """
    return Normaliser.of(tables.logits_a, 0), Normaliser.of(tables.logits_b, 1)
