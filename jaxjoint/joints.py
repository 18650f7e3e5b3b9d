"""Joint distributions over a pair of tokens, derived from a pair's conditional tables.

Every method of DESIGN.md §1 (``mlm``, ``mrf``, ``mrf_logit``, ``hcb``, ``ag``) is
represented lazily: a ``Joint`` keeps the input ``PairTables`` plus a few vectors and
evaluates ``log p(a, b)`` cell by cell from them. Nothing V x V is allocated beyond
the input tables unless ``Joint.to_dense`` is called, except AG's loop-invariant
``qA + qB`` while AG iterates.

Whole-table work (log Z, each AG iteration, the KL sums of J) is a streaming pass
that walks the rows in blocks of ``block_rows``: a block of cells exists only while
it is reduced, and one pass gives both the row and the column logsumexps. On a mesh
the passes run under ``jax.shard_map`` over ``VOCAB_AXIS``: each device reduces its
own rows; only per-column results (V floats: a pmax and a psum) and scalars cross
devices. Without a mesh the same code runs on a one-device mesh: one code path.

Everything is in log space: log-probabilities of float32 logits never underflow,
so peaked (low-temperature) tables give finite log-probabilities, never NaN. The
one exception is the inner loop of AG, which runs in scaled probability space (a
division per cell instead of four exps) and redoes an iteration in log space
whenever float32 underflow could have touched its sums (``_ag_sums``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxjoint.errors import UserError
from jaxjoint.sharding import VOCAB_AXIS, make_mesh, mesh_size
from jaxjoint.tables import PairTables

METHODS = ("mlm", "mrf", "mrf_logit", "hcb", "ag")

_OPTIONS = {
    "mlm": (),
    "mrf": (),
    "mrf_logit": (),
    "hcb": ("pivot",),
    "ag": ("iters", "tol", "max_iters"),
}
AG_ITERS = 40  # the paper's fixed iteration count
AG_MAX_ITERS = 10_000  # cap when iterating to a tolerance
# Cells per block of a streaming pass: large enough to amortise the per-block
# column merge (V log-add-exps), small enough to stay in cache on CPU.
BLOCK_CELLS = 1 << 18


# --- the cell function -------------------------------------------------------------


def _neg_inf_to_zero(x):
    """-inf (an empty row or column) -> 0; NaN stays NaN, so bad logits show."""
    return jnp.where(x == -jnp.inf, 0.0, x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Normaliser:
    """``logsumexp`` of logits along one axis, kept as ``shift + log_sum`` (shift the
    maximum): ``log q = (f - shift) - log_sum`` is exact to float32 near the
    maximum, where the probability is, while ``f - logsumexp`` inherits the
    rounding of a float32 number as large as the logits (6e-5 at |f| = 600).

    shift, log_sum: float32 arrays of one shape; both 0 where every logit is -inf
    (padding rows), so that ``log_q`` stays -inf there. Indexing indexes both.
    """

    shift: jax.Array
    log_sum: jax.Array

    def __getitem__(self, index) -> "Normaliser":
        return Normaliser(self.shift[index], self.log_sum[index])

    def log_q(self, logits: jax.Array) -> jax.Array:
        """Log-probabilities of ``logits`` (broadcastable against the normaliser)."""
        return (logits - self.shift) - self.log_sum

    @staticmethod
    def of(logits: jax.Array, axis: int) -> "Normaliser":
        """The normaliser of ``logits`` along ``axis`` (removed from the shape)."""
        shift = _neg_inf_to_zero(logits.max(axis=axis))
        log_sum = jnp.log(jnp.exp(logits - jnp.expand_dims(shift, axis)).sum(axis=axis))
        return Normaliser(shift, _neg_inf_to_zero(log_sum))


def _cell_parts(method: str, fa, fb, na, nb, row, col):
    """Unnormalised ``log p(a, b) = top + log(ratio)`` with ``ratio`` in [1/2, 2]
    (None for 1), from pieces that broadcast against each other.

    fa, fb: ``logits_a[a, b]``, ``logits_b[a, b]``; na: ``norm_a[b]``; nb:
    ``norm_b[a]`` (``Normaliser``); row: the joint's ``row[a]``; col: its ``col[b]``
    (see ``Joint``).
    Because ``ratio`` is bounded, the maximum of ``top`` along a row or column is a
    safe shift for its logsumexp, and the streaming passes take no log per cell.
    """
    if method == "mlm":
        return row + col, None
    log_qa = na.log_q(fa)
    log_qb = nb.log_q(fb)
    if method == "mrf":
        return log_qa + log_qb, None
    if method == "mrf_logit":
        return fa + fb, None
    if method == "hcb":
        return log_qa + col, None
    # ag: log[(qA + qB) / (1/pA + 1/pB)] = hi_q + lo_p + log[(1 + e^(lo_q - hi_q)) / (1 + e^(lo_p - hi_p))]
    # with hi/lo the larger/smaller of (log qA, log qB) and of (log pA, log pB).
    # Only exp, never log1p or logaddexp (several times slower on CPU).
    hi_q, lo_q = jnp.maximum(log_qa, log_qb), jnp.minimum(log_qa, log_qb)
    hi_p, lo_p = jnp.maximum(row, col), jnp.minimum(row, col)
    return hi_q + lo_p, (1 + _exp_gap(lo_q, hi_q)) / (1 + _exp_gap(lo_p, hi_p))


def _exp_gap(lo, hi):
    """``exp(lo - hi)`` in [0, 1] for lo <= hi; 0 when both are -inf (a zero pair)."""
    return jnp.exp(jnp.where(hi > -jnp.inf, lo - hi, -jnp.inf))


def _combine(top, ratio):
    """``top + log(ratio)``; log, not log1p: ~1e-7 absolute, float32's own resolution."""
    return top if ratio is None else top + jnp.log(ratio)


def _log_cell(method: str, fa, fb, na, nb, row, col):
    """Unnormalised ``log p(a, b)``; arguments as for ``_cell_parts``."""
    return _combine(*_cell_parts(method, fa, fb, na, nb, row, col))


def _block_cell(method: str) -> Callable:
    """Cells of a row block as ``(top, ratio)`` (``_cell_parts``): rows =
    (fa[c,V], fb[c,V], nb[c], row[c]), cols = (na[V], col[V]) -> float32[c, V] each."""

    def cell(rows, cols):
        fa, fb, nb, row = rows
        na, col = cols
        return _cell_parts(method, fa, fb, na[None, :], nb[:, None], row[:, None], col[None, :])

    return cell


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Joint:
    """A normalised joint ``p(a, b)`` over the V x V real cells, kept lazy.

    ``log p(a, b) = cell(a, b) - log_z`` where ``cell`` depends on ``method`` (DESIGN.md §1):

    - mlm: ``row[a] + col[b]`` with row = mA, col = mB;
    - mrf: ``log qA(a|b) + log qB(b|a)``;
    - mrf_logit: ``fA[a, b] + fB[a, b]``;
    - hcb: ``log qA(a|b) + col[b]``, col = ``log qB(b|a*) - log qA(a*|b)``;
    - ag: ``log(qA + qB) - log(1/pA(a) + 1/pB(b))`` with row = log pA, col = log pB,
      the marginals of the previous iterate.

    with ``log qA = norm_a[b].log_q(logits_a)`` and ``log qB = norm_b[a].log_q(logits_b)``.

    Fields:
      tables: the ``PairTables`` the joint was derived from (rows may be padded, Vp >= V).
      norm_a: ``Normaliser`` of float32[V]: logsumexp over a of ``logits_a[:, b]``.
      norm_b: ``Normaliser`` of float32[Vp]: logsumexp over b of ``logits_b[a, :]``.
      row: float32[Vp]; col: float32[V]; log_z: float32[] (see above).
      info: method-specific scalars: ag has ``iterations`` (int32), ``l1_change``
        (L1 change of the two marginals in the last iteration) and ``objective``
        (J(p) of DESIGN.md §1); hcb has ``pivot``.
      method, mesh: static.
    """

    tables: PairTables
    norm_a: Normaliser
    norm_b: Normaliser
    row: jax.Array
    col: jax.Array
    log_z: jax.Array
    info: dict[str, jax.Array]
    method: str = dataclasses.field(metadata=dict(static=True))
    mesh: Mesh = dataclasses.field(metadata=dict(static=True))

    @property
    def vocab_size(self) -> int:
        return self.tables.vocab_size

    def log_prob(self, a_val: ArrayLike, b_val: ArrayLike) -> jax.Array:
        """``log p(a, b)`` for int tokens (or broadcastable int arrays) a_val, b_val
        in [0, V); float32 of their broadcast shape."""
        return _log_prob(self, self._tokens(a_val), self._tokens(b_val))

    def log_cond_a(self, b_val: ArrayLike) -> jax.Array:
        """float32[V]: ``log p(a | b)`` over a, for one int token b_val."""
        return _log_cond_a(self, self._tokens(b_val))

    def log_cond_b(self, a_val: ArrayLike) -> jax.Array:
        """float32[V]: ``log p(b | a)`` over b, for one int token a_val."""
        return _log_cond_b(self, self._tokens(a_val))

    def _tokens(self, tokens: ArrayLike) -> jax.Array:
        """``tokens`` as an array; ``UserError`` when a Python or NumPy one is outside
        [0, V). JAX arrays are not checked (that would copy them to the host; inside
        jit they are traced): out-of-range ones are clamped, as JAX gathers are."""
        if not isinstance(tokens, jax.Array):
            values = np.asarray(tokens)
            if values.size and (values.min() < 0 or values.max() >= self.vocab_size):
                raise UserError(f"token ids must be in [0, {self.vocab_size}); got {values.min()}..{values.max()}")
        return jnp.asarray(tokens)

    def to_dense(self) -> jax.Array:
        """float32[V, V]: ``log p(a, b)`` for every real cell. Allocates V x V."""
        return _to_dense(self)


def _cell_at(joint: Joint, a, b) -> jax.Array:
    """Unnormalised cells at broadcastable index arrays a (rows) and b (columns)."""
    t = joint.tables
    return _log_cell(
        joint.method,
        t.logits_a[a, b],
        t.logits_b[a, b],
        joint.norm_a[b],
        joint.norm_b[a],
        joint.row[a],
        joint.col[b],
    )


@jax.jit
def _log_prob(joint: Joint, a, b):
    return _cell_at(joint, a, b) - joint.log_z


@jax.jit
def _log_cond_a(joint: Joint, b):
    a = jnp.arange(joint.tables.padded_vocab_size)
    return jax.nn.log_softmax(_cell_at(joint, a, b))[: joint.vocab_size]


@jax.jit
def _log_cond_b(joint: Joint, a):
    return jax.nn.log_softmax(_cell_at(joint, a, jnp.arange(joint.vocab_size)))


@jax.jit
def _to_dense(joint: Joint):
    a = jnp.arange(joint.vocab_size)[:, None]
    return _cell_at(joint, a, jnp.arange(joint.vocab_size)[None, :]) - joint.log_z


# --- streaming passes (local: called inside shard_map) ------------------------------


def _fold_rows(step: Callable, carry: Any, rows: tuple, block_rows: int):
    """Run ``step(carry, row_block) -> (carry, out[c])`` over consecutive row blocks.

    rows: a tuple of pytrees of arrays with a common leading dimension n. Returns
    the final carry and the per-row outputs, float32[n]. Full blocks go through
    ``lax.scan`` on dynamic slices (no copy of the tables); a shorter last block is
    handled once after it.
    """
    n = rows[0].shape[0]
    c = min(block_rows, n)
    full, tail = divmod(n, c)

    def body(carry, i):
        return step(carry, jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, i * c, c), rows))

    carry, outs = lax.scan(body, carry, jnp.arange(full))
    outs = outs.reshape(full * c)
    if tail:
        carry, last = step(carry, jax.tree.map(lambda x: x[full * c :], rows))
        outs = jnp.concatenate([outs, last])
    return carry, outs


def _logsumexp_across_devices(x: jax.Array) -> jax.Array:
    """Elementwise logsumexp of ``x`` over the devices of ``VOCAB_AXIS``.

    A shared shift first (pmax), then one psum: shifting each column by an a-priori
    bound instead would save the pmax but lets peaked columns underflow to -inf.
    """
    shift = lax.pmax(x, VOCAB_AXIS)
    shift = _neg_inf_to_zero(shift)
    return jnp.log(lax.psum(jnp.exp(x - shift), VOCAB_AXIS)) + shift


def _logsumexp_parts(top, ratio, axis: int):
    """logsumexp of ``top + log(ratio)`` along ``axis``, shifted by the max of ``top``."""
    shift = top.max(axis=axis, keepdims=True)
    shift = _neg_inf_to_zero(shift)
    w = jnp.exp(top - shift)
    if ratio is not None:
        w = w * ratio
    return jnp.log(w.sum(axis=axis)) + shift.squeeze(axis)


def _local_row_col_lse(cell: Callable, rows: tuple, cols: tuple, block_rows: int):
    """One pass over the local rows: logsumexp of the cells over b for each local
    row (float32[n]) and over this device's rows for each column b (float32[V]).
    ``cell(block, cols)`` gives a block's cells as ``(top, ratio)`` (``_cell_parts``)."""
    v = rows[0].shape[1]

    def step(col_lse, block):
        top, ratio = cell(block, cols)
        block_col = _logsumexp_parts(top, ratio, 0)
        return jnp.logaddexp(col_lse, block_col), _logsumexp_parts(top, ratio, 1)

    init = lax.pcast(jnp.full((v,), -jnp.inf), VOCAB_AXIS, to="varying")
    col_lse, row_lse = _fold_rows(step, init, rows, block_rows)
    return row_lse, col_lse


def kl_terms(log_q: jax.Array, log_p: jax.Array) -> jax.Array:
    """Elementwise ``q (log q - log p)`` of broadcastable log-probabilities, the
    summands of ``KL(q || p)``; 0 where q = 0 (padding, underflow), never NaN."""
    q = jnp.exp(log_q)
    return jnp.where(q > 0, q * (log_q - log_p), 0.0)


def _local_kl_sum(cell: Callable, rows: tuple, cols: tuple, row_lse, col_lse, block_rows: int):
    """``sum_b KL(qA(.|b) || p(.|b)) + sum_a KL(qB(.|a) || p(.|a))`` over all devices.

    ``row_lse`` (local rows) and ``col_lse`` are the logsumexps of the cells along b
    and along a, so ``cell - col_lse`` is ``log p(a|b)`` and ``cell - row_lse`` is
    ``log p(b|a)``. rows = (fa, fb, nb, row) and cols = (na, col) as for ``cell``.
    """

    def step(carry, block):
        fa, fb, nb = block[:3]
        r = block[-1]
        x = _combine(*cell(block[:-1], cols))
        kl = kl_terms(cols[0][None, :].log_q(fa), x - col_lse[None, :])
        kl += kl_terms(nb[:, None].log_q(fb), x - r[:, None])
        return carry, kl.sum(axis=1)

    _, per_row = _fold_rows(step, (), rows + (row_lse,), block_rows)
    return lax.psum(per_row.sum(), VOCAB_AXIS)


# --- sharded wrappers --------------------------------------------------------------

_ROWS = P(VOCAB_AXIS)
_REPL = P()


def _shard(mesh: Mesh, fn: Callable, in_specs, out_specs) -> Callable:
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def _row_col_lse(mesh, block_rows, cell, rows, cols):
    """float32[Vp], float32[V]: logsumexp of the (top, ratio) cells along b and along a."""
    def fn(rows, cols):
        row_lse, col_lse = _local_row_col_lse(cell, rows, cols, block_rows)
        return row_lse, _logsumexp_across_devices(col_lse)

    return _shard(mesh, fn, (_ROWS, _REPL), (_ROWS, _REPL))(rows, cols)


def _kl_sum(mesh, block_rows, cell, rows, cols, row_lse, col_lse):
    """float32[]: the sum of the 2V KL terms of DESIGN.md §1 (J(p) when p is AG's)."""
    fn = functools.partial(_local_kl_sum, cell, block_rows=block_rows)
    return _shard(mesh, fn, (_ROWS, _REPL, _ROWS, _REPL), _REPL)(rows, cols, row_lse, col_lse)


def _normalisers(tables: PairTables) -> tuple[Normaliser, Normaliser]:
    """norm_a of float32[V] (logsumexp of logits_a over a) and norm_b of float32[Vp]
    (logsumexp of logits_b over b; padding rows stay -inf).

    Plain reductions of the tables themselves: on a mesh the partitioner adds the
    all-reduce for norm_a, and nothing V x V is produced.
    """
    return Normaliser.of(tables.logits_a, 0), Normaliser.of(tables.logits_b, 1)


# Bound on one term dropped by float32 underflow in AG's sums: the smallest
# normal number (terms below it are flushed to zero or lose precision).
_SMALLEST_NORMAL = float(jnp.finfo(jnp.float32).tiny)
# A sum is trusted when its dropped terms cannot change it by more than float32's
# own resolution: sum >= 2^24 x (their bound).
_TRUST = 2.0**24


def _ag_table(fa, fb, norm_a, norm_b):
    """AG's loop-invariant part, once per pair: ``qA(a|b) + qB(b|a) = E[a, b] e^s[a]``.

    fa, fb: local rows of the logit tables float32[n, V]; norm_a of float32[V],
    norm_b of float32[n]. Returns E float32[n, V] (each row scaled to a maximum of
    1) and s float32[n] (-inf on padding rows, where E is 0).
    """
    log_qa, log_qb = norm_a[None, :].log_q(fa), norm_b[:, None].log_q(fb)
    hi, lo = jnp.maximum(log_qa, log_qb), jnp.minimum(log_qa, log_qb)
    log_s = hi + jnp.log(1 + _exp_gap(lo, hi))
    row_max = log_s.max(axis=1)
    return jnp.exp(log_s - _neg_inf_to_zero(row_max)[:, None]), row_max


def _ag_sums(table, log_pa, log_pb, exact: Callable, block_rows: int):
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
    s_max = _neg_inf_to_zero(jnp.where(valid, s, -jnp.inf).max())
    weight = jnp.exp(s - s_max)  # per row, for the column sums; 0 on padding

    def step(col_sum, block):
        e, log_pa, weight = block
        x = e / (jnp.exp(c - log_pa)[:, None] + w[None, :])
        return col_sum + (x * weight[:, None]).sum(axis=0), x.sum(axis=1)

    init = lax.pcast(jnp.zeros(w.shape), VOCAB_AXIS, to="varying")
    col_sum, row_sum = _fold_rows(step, init, (e, log_pa, weight), block_rows)
    n, v = e.shape
    rows_lost = ~jnp.all((row_sum >= _TRUST * v * _SMALLEST_NORMAL) | ~valid)
    # One all-reduce carries the columns, the bound on what they may have lost,
    # and (as log of a count) whether any device lost a row sum.
    local = jnp.concatenate([
        jnp.log(col_sum) + s_max + c,
        jnp.where(jnp.any(valid), math.log(n * _SMALLEST_NORMAL) + s_max + c, -jnp.inf)[None],
        jnp.where(rows_lost, 0.0, -jnp.inf)[None],
    ])
    total = _logsumexp_across_devices(local)
    col_lse, lost, any_rows_lost = total[:v], total[v], total[v + 1]
    trusted = jnp.all(col_lse >= lost + jnp.log(_TRUST)) & jnp.isneginf(any_rows_lost)

    def redo():
        row_lse, col_lse = exact()
        return row_lse, _logsumexp_across_devices(col_lse)

    return lax.cond(trusted, lambda: (jnp.log(row_sum) + s + c, col_lse), redo)


def _ag_loop(mesh, block_rows, fa, fb, norm_a, norm_b, valid, max_steps, tol):
    """Arnold-Gokhale from the uniform joint; see ``derive_joint``.

    Returns (log pA of the previous iterate [Vp], log pB of it [V], log Z,
    log pA [Vp], log pB [V] of the last iterate, iterations, last L1 change).
    """
    v = fa.shape[1]
    cell = _block_cell("ag")

    def local(fa, fb, norm_b, log_pa, norm_a, log_pb, max_steps, tol):
        # One local table more than the inputs, so each iteration reads one table.
        table = _ag_table(fa, fb, norm_a, norm_b)

        def step(state):
            i, _, _, log_pa, log_pb, _, _ = state
            exact = lambda: _local_row_col_lse(cell, (fa, fb, norm_b, log_pa), (norm_a, log_pb), block_rows)
            row_lse, col_lse = _ag_sums(table, log_pa, log_pb, exact, block_rows)
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
    specs = (_ROWS, _ROWS, _ROWS, _ROWS, _REPL, _REPL, _REPL, _REPL)
    out = (_REPL, _ROWS, _REPL, _ROWS, _REPL, _REPL, _REPL)
    i, prev_pa, prev_pb, log_pa, log_pb, log_z, l1 = _shard(mesh, local, specs, out)(
        fa, fb, norm_b, log_pa, norm_a, log_pb, max_steps, tol
    )
    return prev_pa, prev_pb, log_z, log_pa, log_pb, i, l1


@functools.partial(jax.jit, static_argnames=("method", "mesh", "block_rows"))
def _derive(tables: PairTables, pivot, max_steps, tol, *, method, mesh, block_rows):
    """Everything of a ``Joint`` except ``tables``, ``method`` and ``mesh``."""
    fa, fb = tables.logits_a, tables.logits_b
    norm_a, norm_b = _normalisers(tables)
    vp, v = fa.shape
    info = {}
    if method == "mlm":
        row, col = tables.log_m_a, tables.log_m_b
    elif method in ("mrf", "mrf_logit"):
        row, col = jnp.zeros(vp), jnp.zeros(v)
    elif method == "hcb":
        if pivot is None:
            pivot = jnp.argmax(tables.log_m_a)  # padding rows are -inf, never chosen
        pivot = jnp.asarray(pivot, jnp.int32)
        log_qb_pivot = norm_b[pivot].log_q(fb[pivot])
        log_qa_pivot = norm_a.log_q(fa[pivot])
        row, col = jnp.zeros(vp), log_qb_pivot - log_qa_pivot
        info = {"pivot": pivot}
    if method != "ag":
        rows, cols = (fa, fb, norm_b, row), (norm_a, col)
        _, col_lse = _row_col_lse(mesh, block_rows, _block_cell(method), rows, cols)
        log_z = jax.nn.logsumexp(col_lse)
        return norm_a, norm_b, row, col, log_z, info

    row, col, log_z, log_pa, log_pb, iters, l1 = _ag_loop(
        mesh, block_rows, fa, fb, norm_a, norm_b, tables.row_valid, max_steps, tol
    )
    rows, cols = (fa, fb, norm_b, row), (norm_a, col)
    # The last iterate's marginals are its row and column sums: no extra lse pass.
    cell = _block_cell("ag")
    objective = _kl_sum(mesh, block_rows, cell, rows, cols, log_pa + log_z, log_pb + log_z)
    info = {"iterations": iters, "l1_change": l1, "objective": objective}
    return norm_a, norm_b, row, col, log_z, info


# --- public API --------------------------------------------------------------------


def resolve_mesh(tables: PairTables, mesh: Mesh | None) -> Mesh:
    """The mesh the streaming passes run on: ``mesh``; when None, the mesh the
    tables are sharded on (as ``pair_tables`` leaves them), else one local device.

    Raises ``UserError`` when the padded rows do not split evenly over the mesh.
    """
    if mesh is None:
        sharding = getattr(tables.logits_a, "sharding", None)
        if isinstance(sharding, NamedSharding) and VOCAB_AXIS in sharding.mesh.axis_names:
            mesh = sharding.mesh
        else:
            mesh = make_mesh(jax.local_devices()[:1])
    k = mesh_size(mesh)
    if tables.padded_vocab_size % k:
        raise UserError(
            f"tables have {tables.padded_vocab_size} rows, not a multiple of the "
            f"{k}-device mesh; build them with padded_vocab_size=padded_size(V, mesh)"
        )
    return mesh


def default_block_rows(tables: PairTables, mesh: Mesh | None) -> int:
    """Rows per block of a streaming pass: about ``BLOCK_CELLS`` cells."""
    local_rows = tables.padded_vocab_size // mesh_size(mesh)
    return max(1, min(local_rows, BLOCK_CELLS // tables.vocab_size))


def derive_joint(
    tables: PairTables,
    method: str,
    *,
    mesh: Mesh | None = None,
    block_rows: int | None = None,
    **options: Any,
) -> Joint:
    """Derive the joint ``p(a, b)`` of ``method`` from a pair's conditional tables.

    Args:
      tables: ``PairTables`` with logits_a, logits_b float32[Vp, V]; on a mesh,
        row-sharded over ``VOCAB_AXIS`` (``sharding.row_sharding``).
      method: one of ``METHODS``: mlm, mrf, mrf_logit, hcb, ag (DESIGN.md §1).
      mesh: the 1-D mesh the tables are sharded on; None: the one their
        sharding names (one device for unsharded tables).
      block_rows: rows per block of the streaming passes (default: about
        ``BLOCK_CELLS`` cells per block).
      options:
        hcb: ``pivot`` (int token a*; default argmax of mA over real tokens).
        ag: ``iters`` (default 40, the paper's fixed count), or ``tol``: iterate
          until the L1 change of the two marginals is < tol, at most ``max_iters``
          (default 10000) iterations. float32 rounding puts a floor of about 1e-7
          (growing with V) under that change: a smaller tol runs to ``max_iters``.
          The loop holds one table beside the inputs, qA + qB of the local rows
          (row-scaled), so that each iteration reads one table, not two.

    Returns:
      A lazy ``Joint``; for ag, ``joint.info`` has ``iterations``, ``l1_change``
      and ``objective`` J(p).

    Raises:
      UserError: unknown method or option, or invalid option values.
    """
    if method not in METHODS:
        raise UserError(f"unknown joint method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = sorted(set(options) - set(_OPTIONS[method]))
    if unknown:
        allowed = ", ".join(_OPTIONS[method]) or "none"
        raise UserError(f"method {method!r} takes no option {', '.join(unknown)} (options: {allowed})")
    mesh = resolve_mesh(tables, mesh)
    if block_rows is None:
        block_rows = default_block_rows(tables, mesh)
    elif block_rows < 1:
        raise UserError(f"block_rows must be >= 1, got {block_rows}")

    pivot = options.get("pivot")
    if pivot is not None and not isinstance(pivot, jax.core.Tracer):
        pivot = int(pivot)
        if not 0 <= pivot < tables.vocab_size:
            raise UserError(f"hcb pivot {pivot} is outside the vocabulary [0, {tables.vocab_size})")
    max_steps, tol = _ag_schedule(**{k: options[k] for k in _OPTIONS["ag"] if k in options})

    norm_a, norm_b, row, col, log_z, info = _derive(
        tables, pivot, max_steps, tol, method=method, mesh=mesh, block_rows=block_rows
    )
    return Joint(tables, norm_a, norm_b, row, col, log_z, info, method=method, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("block_rows",))
def _objective(joint: Joint, *, block_rows: int) -> jax.Array:
    t = joint.tables
    rows = (t.logits_a, t.logits_b, joint.norm_b, joint.row)
    cols = (joint.norm_a, joint.col)
    row_lse, col_lse = _row_col_lse(joint.mesh, block_rows, _block_cell(joint.method), rows, cols)
    return _kl_sum(joint.mesh, block_rows, _block_cell(joint.method), rows, cols, row_lse, col_lse)


def objective(joint: Joint, *, block_rows: int | None = None) -> jax.Array:
    """float32[]: ``J(p) = sum_b KL(qA(.|b) || p(.|b)) + sum_a KL(qB(.|a) || p(.|a))``.

    qA, qB are the conditionals of ``joint.tables``. Two streaming passes: the
    logsumexps of every row and column of the joint's cells, then the KL sums.
    The AG fixed point minimises J; ``kl_all`` of DESIGN.md §1 is J / (2V).
    """
    if block_rows is None:
        block_rows = default_block_rows(joint.tables, joint.mesh)
    return _objective(joint, block_rows=block_rows)


def _ag_schedule(iters: int | None = None, tol: float | None = None, max_iters: int | None = None):
    """(iteration cap, tolerance) for the AG while loop; tol 0 means a fixed count."""
    if tol is None:
        if max_iters is not None:
            raise UserError("ag option max_iters only applies with tol=")
        iters = AG_ITERS if iters is None else iters
        if iters < 1:
            raise UserError(f"ag needs iters >= 1, got {iters}")
        return jnp.int32(iters), jnp.float32(0.0)
    if iters is not None:
        raise UserError("ag takes either iters= (fixed count) or tol= (to convergence), not both")
    max_iters = AG_MAX_ITERS if max_iters is None else max_iters
    if not tol > 0 or max_iters < 1:
        raise UserError(f"ag needs tol > 0 and max_iters >= 1, got tol={tol}, max_iters={max_iters}")
    return jnp.int32(max_iters), jnp.float32(tol)
