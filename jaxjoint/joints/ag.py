"""The Arnold-Gokhale solver: the fixed-point iteration of DESIGN.md §1 on sharded tables.

State is two V-vectors (the marginals of the current iterate); each iteration is
one fused pass over one loop-invariant table ``qA + qB`` (``invariant_table``),
elementwise work plus row and column sums, with the column sums one all-reduce
of V floats. The pass runs in scaled probability space (a division per cell
instead of four exps) and is redone in log space whenever float32 underflow
could have touched its sums (``iteration_sums``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxjoint.errors import UserError
from jaxjoint.joints.cells import block_cell, exp_gap, neg_inf_to_zero
from jaxjoint.joints.streaming import (
    REPLICATED,
    ROWS,
    fold_rows,
    local_row_col_lse,
    logsumexp_across_devices,
    shard,
)
from jaxjoint.sharding import VOCAB_AXIS

ITERS = 40  # the paper's fixed iteration count
MAX_ITERS = 10_000  # cap when iterating to a tolerance


def schedule(iters: int | None = None, tol: float | None = None,
             max_iters: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(iteration cap int32[], tolerance float32[]) for the AG while loop from
    ``derive_joint``'s options; tolerance 0 means a fixed count.

    Raises ``UserError`` for contradictory or out-of-range options.
    """
    if tol is None:
        if max_iters is not None:
            raise UserError("ag option max_iters only applies with tol=")
        iters = ITERS if iters is None else iters
        if iters < 1:
            raise UserError(f"ag needs iters >= 1, got {iters}")
        return jnp.int32(iters), jnp.float32(0.0)
    if iters is not None:
        raise UserError("ag takes either iters= (fixed count) or tol= (to convergence), not both")
    max_iters = MAX_ITERS if max_iters is None else max_iters
    if not tol > 0 or max_iters < 1:
        raise UserError(f"ag needs tol > 0 and max_iters >= 1, got tol={tol}, max_iters={max_iters}")
    return jnp.int32(max_iters), jnp.float32(tol)


# Bound on one term dropped by float32 underflow in AG's sums: the smallest
# normal number (terms below it are flushed to zero or lose precision).
_SMALLEST_NORMAL = float(jnp.finfo(jnp.float32).tiny)
# A sum is trusted when its dropped terms cannot change it by more than float32's
# own resolution: sum >= 2^24 x (their bound).
_TRUST = 2.0**24


def invariant_table(fa, fb, norm_a, norm_b):
    """AG's loop-invariant part, once per pair: ``qA(a|b) + qB(b|a) = E[a, b] e^s[a]``.

    fa, fb: local rows of the logit tables float32[n, V]; norm_a of float32[V],
    norm_b of float32[n]. Returns E float32[n, V] (each row scaled to a maximum of
    1) and s float32[n] (-inf on padding rows, where E is 0).
    """
    log_qa, log_qb = norm_a[None, :].log_q(fa), norm_b[:, None].log_q(fb)
    hi, lo = jnp.maximum(log_qa, log_qb), jnp.minimum(log_qa, log_qb)
    log_s = hi + jnp.log(1 + exp_gap(lo, hi))
    row_max = log_s.max(axis=1)
    return jnp.exp(log_s - neg_inf_to_zero(row_max)[:, None]), row_max


def iteration_sums(table, log_pa, log_pb, exact: Callable, block_rows: int):
    """One AG pass, inside ``shard_map``: (row logsumexps of the local rows
    float32[n], column logsumexps over all devices float32[V]) of
    ``p~(a, b) = (qA + qB) / (1/pA + 1/pB)``.

    In probability space, scaled so that nothing overflows: with c = max log pB,
    u = e^(c - log pA) >= 1/V and w = e^(c - log pB) >= 1,
    ``p~ = E[a, b] / (u[a] + w[b]) x e^(s[a] + c)``, every term of the sums at
    most 1: a division per cell, no transcendental. A term that underflows there
    is below float32's smallest normal; when a row sum, or a column's total over
    all devices, is not 2^24 times the most such terms can add up to (marginals
    or conditionals more than ~60 nats apart), every device redoes the pass with
    ``exact()`` (its local rows and columns, in log space, four exps per cell).
    The decision is taken on all-reduced values, so it is the same on every
    device and does not depend on how the rows are split.
    """
    e, s = table
    c = log_pb.max()
    w = jnp.exp(c - log_pb)
    valid = jnp.isfinite(s)
    s_max = neg_inf_to_zero(jnp.where(valid, s, -jnp.inf).max())
    weight = jnp.exp(s - s_max)  # per row, for the column sums; 0 on padding

    def step(col_sum, block):
        e, log_pa, weight = block
        x = e / (jnp.exp(c - log_pa)[:, None] + w[None, :])
        return col_sum + (x * weight[:, None]).sum(axis=0), x.sum(axis=1)

    init = lax.pcast(jnp.zeros(w.shape), VOCAB_AXIS, to="varying")
    col_sum, row_sum = fold_rows(step, init, (e, log_pa, weight), block_rows)
    n, v = e.shape
    rows_lost = ~jnp.all((row_sum >= _TRUST * v * _SMALLEST_NORMAL) | ~valid)
    # One all-reduce carries the columns, the bound on what they may have lost,
    # and (as log of a count) whether any device lost a row sum.
    local = jnp.concatenate([
        jnp.log(col_sum) + s_max + c,
        jnp.where(jnp.any(valid), math.log(n * _SMALLEST_NORMAL) + s_max + c, -jnp.inf)[None],
        jnp.where(rows_lost, 0.0, -jnp.inf)[None],
    ])
    total = logsumexp_across_devices(local)
    col_lse, lost, any_rows_lost = total[:v], total[v], total[v + 1]
    trusted = jnp.all(col_lse >= lost + jnp.log(_TRUST)) & jnp.isneginf(any_rows_lost)

    def redo():
        row_lse, col_lse = exact()
        return row_lse, logsumexp_across_devices(col_lse)

    return lax.cond(trusted, lambda: (jnp.log(row_sum) + s + c, col_lse), redo)


def solve(mesh, block_rows, fa, fb, norm_a, norm_b, valid, max_steps, tol):
    """Arnold-Gokhale from the uniform joint, for at most ``max_steps`` iterations
    and until the L1 change of the two marginals is below ``tol`` (0: a fixed count).

    fa, fb: logit tables float32[Vp, V], row-sharded on ``mesh``; norm_a, norm_b:
    their ``Normaliser``s ([V] and [Vp]); valid: bool[Vp], False on padding rows.
    Returns (log pA of the previous iterate [Vp], log pB of it [V], log Z,
    log pA [Vp], log pB [V] of the last iterate, iterations, last L1 change):
    the last joint is ``cell("ag")`` with the previous marginals, minus log Z.
    """
    v = fa.shape[1]
    cell = block_cell("ag")

    def local(fa, fb, norm_b, log_pa, norm_a, log_pb, max_steps, tol):
        # One local table more than the inputs, so each iteration reads one table. (XLA's CPU
        # backend holds a second table-sized temporary here; plans read the real peak per target.)
        table = invariant_table(fa, fb, norm_a, norm_b)

        def step(state):
            i, _, _, log_pa, log_pb, _, _ = state

            def exact():
                return local_row_col_lse(cell, (fa, fb, norm_b, log_pa), (norm_a, log_pb), block_rows)

            row_lse, col_lse = iteration_sums(table, log_pa, log_pb, exact, block_rows)
            log_z = jax.nn.logsumexp(col_lse)
            new_pa, new_pb = row_lse - log_z, col_lse - log_z
            l1 = lax.psum(jnp.abs(jnp.exp(new_pa) - jnp.exp(log_pa)).sum(), VOCAB_AXIS)
            l1 += jnp.abs(jnp.exp(new_pb) - jnp.exp(log_pb)).sum()
            return i + 1, log_pa, log_pb, new_pa, new_pb, log_z, l1

        def keep_going(state):
            i, *_, l1 = state
            return (i < max_steps) & (l1 >= tol)

        zero = jnp.zeros((), jnp.float32)
        init = (jnp.int32(0), log_pa, log_pb, log_pa, log_pb, zero, jnp.float32(jnp.inf))
        return lax.while_loop(keep_going, step, init)

    uniform = jnp.float32(-math.log(v))
    log_pa = jnp.where(valid, uniform, -jnp.inf)
    log_pb = jnp.full((v,), uniform)
    specs = (ROWS, ROWS, ROWS, ROWS, REPLICATED, REPLICATED, REPLICATED, REPLICATED)
    out = (REPLICATED, ROWS, REPLICATED, ROWS, REPLICATED, REPLICATED, REPLICATED)
    i, prev_pa, prev_pb, log_pa, log_pb, log_z, l1 = shard(mesh, local, specs, out)(
        fa, fb, norm_b, log_pa, norm_a, log_pb, max_steps, tol
    )
    return prev_pa, prev_pb, log_z, log_pa, log_pb, i, l1
