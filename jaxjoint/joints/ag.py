"""The Arnold-Gokhale solver: the fixed-point iteration of DESIGN.md §1 on sharded tables.

State is two V-vectors (the marginals of the current iterate); each iteration is
one fused pass over one loop-invariant table ``qA + qB`` (``invariant_table``),
elementwise work plus row and column sums, with the column sums one all-reduce
of V floats. The pass runs in scaled probability space (a division per cell
instead of four exps) and is redone in log space whenever float32 underflow
could have touched its sums (``iteration_sums``). To a tolerance, the accelerated
solver is Newton's method on AG's convex objective (``ag_newton``), and both
solvers stop on its estimate of the distance from the fixed point.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxjoint.errors import UserError
from jaxjoint.joints import ag_newton, cpu_pass, gpu_pass
from jaxjoint.joints.cells import block_cell, exp_gap, neg_inf_to_zero
from jaxjoint.joints.streaming import (
    REPLICATED,
    ROWS,
    fold_rows,
    local_row_col_lse,
    logsumexp_across_devices,
    shard,
)
from jaxjoint.models.precision import platform_of
from jaxjoint.sharding import VOCAB_AXIS

ITERS = 40  # the paper's fixed iteration count
MAX_ITERS = 10_000  # cap when iterating to a tolerance
SOLVERS = ("plain", "accelerated")
ESTIMATE_EVERY = 32  # plain passes between the stopping rule's (Newton) estimates (each ~8 passes)
_CLEAN_SECANT = 2.0**-17  # ~32 x float32's rounding of a residual's L1 norm
# CPU: cells per block of a pass (4 MiB, in cache between a block's two sums)
PASS_BLOCK_CELLS = 1 << 20


def schedule(iters: int | None = None, tol: float | None = None, max_iters: int | None = None,
             solver: str | None = None) -> tuple[jax.Array, jax.Array, bool]:
    """(pass cap int32[], tolerance float32[], accelerated) for the AG while loop from
    ``derive_joint``'s options; tolerance 0 means a fixed count of plain iterations.

    Raises ``UserError`` for contradictory or out-of-range options.
    """
    if solver is not None and solver not in SOLVERS:
        raise UserError(f"ag solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if tol is None:
        if max_iters is not None:
            raise UserError("ag option max_iters only applies with tol=")
        if solver == "accelerated":
            raise UserError("ag's fixed count (iters=) is the plain iteration; solver='accelerated' needs tol=")
        iters = ITERS if iters is None else iters
        if iters < 1:
            raise UserError(f"ag needs iters >= 1, got {iters}")
        return jnp.int32(iters), jnp.float32(0.0), False
    if iters is not None:
        raise UserError("ag takes either iters= (fixed count) or tol= (to convergence), not both")
    max_iters = MAX_ITERS if max_iters is None else max_iters
    if not tol > 0 or max_iters < 1:
        raise UserError(f"ag needs tol > 0 and max_iters >= 1, got tol={tol}, max_iters={max_iters}")
    return jnp.int32(max_iters), jnp.float32(tol), solver != "plain"


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


def pass_block_rows(mesh, vocab: int) -> int | None:
    """Rows per block of AG's pass on ``mesh``'s platform (``iteration_sums``): on CPU,
    blocks of about ``PASS_BLOCK_CELLS`` cells; on GPU and TPU, None: the whole local
    table in one fused pass (a loop of small blocks would be thousands of kernel
    launches a pass at bert-base size)."""
    if platform_of(mesh.devices.flat[0]) != "cpu":
        return None
    return max(1, PASS_BLOCK_CELLS // vocab)


def iteration_sums(table, log_pa, log_pb, exact: Callable, block_rows: int | None, *, kernel: bool = True):
    """One AG pass, inside ``shard_map``: (row logsumexps of the local rows
    float32[n], column logsumexps over all devices float32[V]) of
    ``p~(a, b) = (qA + qB) / (1/pA + 1/pB)``.

    table: ``invariant_table``'s (E float32[n, V], s float32[n]); log_pa float32[n],
    log_pb float32[V]. block_rows: rows per block (CPU), or None: the whole local
    table at once (GPU, TPU; ``pass_block_rows``). On CPU, ``kernel`` runs the pass
    as the compiled kernel of ``cpu_pass`` (one read of E) where it is available,
    else as XLA's row blocks.

    In probability space, scaled so that nothing overflows: with c = max log pB,
    u = e^(c - log pA) >= 1/V and w = e^(c - log pB) >= 1,
    ``p~ = E[a, b] / (u[a] + w[b]) x e^(s[a] + c)``, every term of the sums at
    most 1: a division per cell, no transcendental. The column sums weight row a by
    e^(s[a] - max s). On CPU the kernel computes each cell once, in registers, and
    adds it to its row's and (weighted) its column's sum; by XLA's row blocks, a
    block's cells are computed once into a buffer that XLA's reductions read. Whole (GPU, TPU), the
    weight goes into every cell first, so that both sums sum the same cells: XLA then
    fuses the cells into the two reductions and reads E once (TPU: one fusion; with
    two different cells for the two sums a GPU would write them out), and a row's sum
    is brought back to its own scale before its log.
    A term that underflows there is below float32's smallest normal; when a row sum,
    or a column's total over all devices, is not 2^24 times the most such terms can
    add up to (marginals or conditionals more than ~60 nats apart), every device
    redoes the pass with ``exact()`` (its local rows and columns, in log space, four
    exps per cell). The decision is taken on all-reduced values, so it is the same
    on every device and does not depend on how the rows are split.
    """
    e, s = table
    c = log_pb.max()
    w = jnp.exp(c - log_pb)
    valid = jnp.isfinite(s)
    s_max = neg_inf_to_zero(jnp.where(valid, s, -jnp.inf).max())
    weight = jnp.exp(s - s_max)  # per row, for the column sums; 0 on padding
    u = jnp.exp(c - log_pa)
    if block_rows is None:
        def whole(e, u, w, weight):
            x = e * (weight[:, None] / (u[:, None] + w[None, :]))
            col_sum, scaled_row_sum = x.sum(axis=0), x.sum(axis=1)
            # the row sums in their rows' own scales (each row's largest cell 1, as by blocks)
            return scaled_row_sum * jnp.exp(s_max - neg_inf_to_zero(s)), col_sum, scaled_row_sum

        def gpu_kernel(e, u, w, weight):
            row_sum, col_sum = gpu_pass.pass_sums(e, u, w, weight)
            return row_sum, col_sum, row_sum

        branches = {"cuda": gpu_kernel} if kernel else {}
        row_sum, col_sum, scaled_row_sum = lax.platform_dependent(e, u, w, weight, default=whole, **branches)
    elif kernel and cpu_pass.available():
        row_sum, col_sum = cpu_pass.pass_sums(e, u, w, weight)
        scaled_row_sum = row_sum
    else:
        def step(col_sum, block):
            e, u, weight = block
            x = e / (u[:, None] + w[None, :])
            return col_sum + (x * weight[:, None]).sum(axis=0), x.sum(axis=1)

        init = lax.pcast(jnp.zeros(w.shape), VOCAB_AXIS, to="varying")
        col_sum, row_sum = fold_rows(step, init, (e, u, weight), block_rows)
        scaled_row_sum = row_sum
    n, v = e.shape
    # (in the scale of the summed cells, where each lost term is below the smallest normal)
    rows_lost = ~jnp.all((scaled_row_sum >= _TRUST * v * _SMALLEST_NORMAL) | ~valid)
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


def one_pass(mesh, block_rows: int, table, fa, fb, norm_a, norm_b, log_pa, log_pb, *, fallback: bool = True,
             kernel: bool = True):
    """One AG pass on ``mesh`` as the loop runs it (``iteration_sums``, with its
    log-space fall-back): (row logsumexps float32[Vp], column logsumexps float32[V]).
    Without ``fallback`` the log-space recomputation is NaN: the probability-space
    pass alone, the one that runs unless float32 underflow reaches its sums.

    table: ``invariant_table``'s (E float32[Vp, V], s float32[Vp]), row-sharded; fa, fb,
    norm_a, norm_b as for ``solve`` (the fall-back reads
    them); log_pa float32[Vp] row-sharded, log_pb float32[V]. For measuring a pass
    (``plan``, ``benchmarks/ag_iteration.py``); ``solve`` builds the table itself.
    """
    pass_rows = pass_block_rows(mesh, fa.shape[1])
    cell = block_cell("ag")

    def local(e, s, fa, fb, norm_b, log_pa, norm_a, log_pb):
        def exact():
            if not fallback:
                return jnp.full_like(log_pa, jnp.nan), jnp.full_like(log_pb, jnp.nan)
            return local_row_col_lse(cell, (fa, fb, norm_b, log_pa), (norm_a, log_pb), block_rows)

        return iteration_sums((e, s), log_pa, log_pb, exact, pass_rows, kernel=kernel)

    specs = (ROWS,) * 6 + (REPLICATED, REPLICATED)
    e, s = table
    return shard(mesh, local, specs, (ROWS, REPLICATED))(e, s, fa, fb, norm_b, log_pa, norm_a, log_pb)


def solve(mesh, block_rows, fa, fb, norm_a, norm_b, valid, max_steps, tol, *, accelerated: bool = False):
    """Arnold-Gokhale from the uniform joint: at most ``max_steps`` passes over the
    table, until the estimated L1 distance of the reported marginals from the fixed
    point is below ``tol`` (0: a fixed count of plain iterations).

    fa, fb: logit tables float32[Vp, V], row-sharded on ``mesh``; norm_a, norm_b:
    their ``Normaliser``s ([V] and [Vp]); valid: bool[Vp], False on padding rows.
    accelerated: Newton's method on AG's convex objective (``ag_newton``, DESIGN.md §1)
    instead of the plain iteration, then one AG pass from its point.
    Returns (log pA of the last iterate x [Vp], log pB of it [V], log Z, log pA [Vp],
    log pB [V] of F(x), passes, passes of AG's map, delta): the joint is ``cell("ag")`` with x's
    marginals minus log Z, and its marginals are F(x), the reported ones; delta
    estimates their L1 distance from the fixed point (DESIGN.md §1, the stopping rule).
    """
    v = fa.shape[1]
    cell = block_cell("ag")
    pass_rows = pass_block_rows(mesh, v)

    def local(fa, fb, norm_b, log_pa, norm_a, log_pb, max_steps, tol):
        # One local table more than the inputs, so each iteration reads one table. (XLA's CPU
        # backend holds a second table-sized temporary here; plans read the real peak per target.)
        table = invariant_table(fa, fb, norm_a, norm_b)
        prob = ag_newton.problem(table, (fa, fb, norm_a, norm_b), tol > 0)

        def apply(x):
            """One pass: F(x) as log marginals, log Z, and the residual F(x) - x in probability space."""
            log_pa, log_pb = x

            def exact():
                return local_row_col_lse(cell, (fa, fb, norm_b, log_pa), (norm_a, log_pb), block_rows)

            row_lse, col_lse = iteration_sums(table, log_pa, log_pb, exact, pass_rows)
            log_z = jax.nn.logsumexp(col_lse)
            fx = (row_lse - log_z, col_lse - log_z)
            res = jax.tree.map(lambda f, x: jnp.exp(f) - jnp.exp(x), fx, x)
            return fx, log_z, res

        def estimate(i, x):
            """(passes, delta): the Newton estimate of x's distance from the fixed point."""
            _, passes, delta = ag_newton.distance_estimate(prob, *x, max_steps - i, block_rows)
            return passes, delta

        def step(s):
            fx, log_z, res = apply(s["x"])
            l1 = _l1(res)
            i = s["i"] + 1
            # A fixed count reports a free estimate from secants of F - I against an anchor,
            # an earlier point (DESIGN.md §1): kappa, the largest |dx| / |dr| seen, where dr has
            # grown beyond float32's rounding of the residual, times the residual.
            dx = _l1(jax.tree.map(lambda a, b: jnp.exp(a) - jnp.exp(b), s["x"], s["anchor_x"]))
            dr = _l1(jax.tree.map(jnp.subtract, res, s["anchor_r"]))
            clean = (s["i"] > 0) & (dr > _CLEAN_SECANT)
            kappa = jnp.maximum(s["kappa"], jnp.where(clean, dx / dr, 0.0))
            move = clean | (s["i"] == 0)
            anchor_x = jax.tree.map(lambda a, b: jnp.where(move, a, b), s["x"], s["anchor_x"])
            anchor_r = jax.tree.map(lambda a, b: jnp.where(move, a, b), res, s["anchor_r"])
            delta = jnp.where(kappa > 0, jnp.maximum(kappa - 1, 0.0) * l1, jnp.inf)
            # To a tolerance, every ESTIMATE_EVERY map passes: the Newton estimate, its passes counted.
            due = s["estimating"] & ((s["n"] + 1) % ESTIMATE_EVERY == 0) & (i + 2 < max_steps)
            passes, newton_delta = lax.cond(due, lambda: estimate(i, fx), lambda: (jnp.int32(0), s["delta"]))
            delta = jnp.where(s["estimating"], newton_delta, delta)
            return dict(s, i=i + passes, n=s["n"] + 1, x=fx, x_prev=s["x"], fx=fx, log_z=log_z, delta=delta,
                        kappa=kappa, anchor_x=anchor_x, anchor_r=anchor_r)

        def keep_going(s):
            return (s["i"] < s["target"]) & ~(s["delta"] < tol)  # a NaN estimate stops nothing

        zero = jnp.zeros((), jnp.float32)
        x = (log_pa, log_pb)
        zeros = jax.tree.map(jnp.zeros_like, x)
        init = dict(i=jnp.int32(0), n=jnp.int32(0), target=max_steps, estimating=tol > 0, x=x, fx=x, x_prev=x,
                    log_z=zero, delta=jnp.float32(jnp.inf), kappa=zero, anchor_x=x, anchor_r=zeros)
        if accelerated:
            i, theta, phi, delta, _ = ag_newton.newton_solve(prob, log_pa, log_pb, max_steps, tol, block_rows)
            # The joint is one AG pass from Newton's point; out of passes before tol, the passes
            # left go to plain AG. (Stopped at float32's floor, delta above tol says so.)
            target = jnp.where(i + 2 < max_steps, i + 1, max_steps)
            init = dict(init, i=i, target=target, estimating=jnp.bool_(False), x=(theta, phi))
            s = dict(lax.while_loop(lambda s: s["i"] < s["target"], step, init), delta=delta)
        else:
            s = lax.while_loop(keep_going, step, init)
        # x_prev: the point the last pass was applied to (x is already the next one)
        return s["i"], s["n"], s["x_prev"], s["fx"], s["log_z"], s["delta"]

    uniform = jnp.float32(-math.log(v))
    log_pa = jnp.where(valid, uniform, -jnp.inf)
    log_pb = jnp.full((v,), uniform)
    specs = (ROWS, ROWS, ROWS, ROWS, REPLICATED, REPLICATED, REPLICATED, REPLICATED)
    out = (REPLICATED, REPLICATED, (ROWS, REPLICATED), (ROWS, REPLICATED), REPLICATED, REPLICATED)
    i, n, (prev_pa, prev_pb), (log_pa, log_pb), log_z, delta = shard(mesh, local, specs, out)(
        fa, fb, norm_b, log_pa, norm_a, log_pb, max_steps, tol
    )
    return prev_pa, prev_pb, log_z, log_pa, log_pb, i, n, delta


def _l1(pair) -> jax.Array:
    """L1 norm of a (row part [n], column part [V]) pair of vectors, rows summed over devices."""
    a, b = pair
    return lax.psum(jnp.abs(a).sum(), VOCAB_AXIS) + jnp.abs(b).sum()
