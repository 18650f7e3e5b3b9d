"""``Joint``: a normalised joint over a pair's V x V cells, kept lazy, and ``derive_joint``.

Every method of DESIGN.md §1 (``mlm``, ``mrf``, ``mrf_logit``, ``hcb``, ``ag``) is a
``Joint``: the input ``PairTables`` plus a few vectors, evaluated cell by cell
(``cells``). Nothing V x V is allocated beyond the input tables unless
``Joint.to_dense`` is called, except AG's loop-invariant ``qA + qB`` while AG
iterates (``ag``). Whole-table work is a streaming pass (``streaming``); without a
mesh the same code runs on a one-device mesh: one code path.

Everything is in log space: log-probabilities of float32 logits never underflow,
so peaked (low-temperature) tables give finite log-probabilities, never NaN.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.typing import ArrayLike

from jaxjoint import ids
from jaxjoint.errors import UserError
from jaxjoint.ids import check_range, is_traced
from jaxjoint.joints import ag
from jaxjoint.joints.cells import Normaliser, block_cell, log_cell
from jaxjoint.joints.streaming import default_block_rows, kl_sum, normalisers, row_col_lse, sharded_take
from jaxjoint.sharding import VOCAB_AXIS, local_mesh, mesh_size
from jaxjoint.tables import PairTables

METHODS = ("mlm", "mrf", "mrf_logit", "hcb", "ag")  # the paper's, a run's default
# ag_converged: AG's fixed point (DESIGN.md §1), to score beside the paper's 40 iterations
ALL_METHODS = METHODS + ("ag_converged",)
# the paper's names, and the converged AG's
LABELS = {"mlm": "MLM", "mrf": "MRF", "mrf_logit": "MRF-L", "hcb": "HCB", "ag": "AG", "ag_converged": "AG (converged)"}
AG_METHODS = ("ag", "ag_converged")
CONVERGED_TOL = 1e-6  # ag_converged's default tolerance
OPTIONS = {
    "mlm": (),
    "mrf": (),
    "mrf_logit": (),
    "hcb": ("pivot",),
    "ag": ("iters", "tol", "max_iters", "solver"),
    "ag_converged": ("tol", "max_iters", "solver"),
}


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
      info_arrays: method-specific float32[]/int32[] arrays: ag has ``iters`` (every
        pass over the table), ``map_passes`` (those that applied AG's map),
        ``delta`` (estimated distance of its marginals from the fixed point, DESIGN.md
        §1) and ``objective`` (J(p)); hcb has ``pivot``. ``info`` reads
        them as Python numbers.
      method, mesh: static.
    """

    tables: PairTables
    norm_a: Normaliser
    norm_b: Normaliser
    row: jax.Array
    col: jax.Array
    log_z: jax.Array
    info_arrays: dict[str, jax.Array]
    method: str = dataclasses.field(metadata=dict(static=True))
    mesh: Mesh = dataclasses.field(metadata=dict(static=True))

    @property
    def vocab_size(self) -> int:
        return self.tables.vocab_size

    def log_prob(self, a_val: ArrayLike, b_val: ArrayLike) -> jax.Array:
        """``log p(a, b)`` for int tokens (or broadcastable int arrays) a_val, b_val
        in [0, V); float32 of their broadcast shape.

        Ids are checked whatever their type: a Python int, a NumPy value or a
        concrete JAX array outside [0, V) (padding rows included) is a one-line
        ``UserError``. Under ``jax.jit``/``vmap``, where ids are abstract, the
        result is NaN wherever an id is invalid: never another token's value.
        """
        a_val, b_val = self._tokens(a_val, "a_val"), self._tokens(b_val, "b_val")
        return _log_prob(self, a_val, b_val)

    def log_cond_a(self, b_val: ArrayLike) -> jax.Array:
        """float32[V]: ``log p(a | b)`` over a, for one int token b_val in [0, V)
        (checked as in ``log_prob``; all NaN for an invalid traced id)."""
        return _log_cond_a(self, self._tokens(b_val, "b_val"))

    def log_cond_b(self, a_val: ArrayLike) -> jax.Array:
        """float32[V]: ``log p(b | a)`` over b, for one int token a_val in [0, V)
        (checked as in ``log_prob``; all NaN for an invalid traced id)."""
        return _log_cond_b(self, self._tokens(a_val, "a_val"))

    @property
    def info(self) -> dict[str, Any]:
        """Method-specific numbers, as the records hold them: ag's ``iters`` and
        ``map_passes`` (ints), ``delta`` and ``objective`` (floats), hcb's ``pivot`` (int). Python numbers
        outside jit (read from the device when asked); arrays while traced."""
        if is_traced(self.info_arrays):
            return dict(self.info_arrays)
        return {key: jax.device_get(value).item() for key, value in self.info_arrays.items()}

    def _tokens(self, tokens: ArrayLike, name: str) -> jax.Array:
        """``tokens`` as an int32 array; ``UserError`` when concrete ones (Python,
        NumPy or JAX) are not integers in [0, V). Traced ones are masked later."""
        check_range(tokens, self.vocab_size, f"token ids ({name})")
        return jnp.asarray(tokens, jnp.int32)

    def to_dense(self) -> jax.Array:
        """float32[V, V]: ``log p(a, b)`` (log-probabilities, not p: their
        logsumexp is 0) for every real cell ``[a, b]``. Allocates V x V."""
        return _to_dense(self)


def _cell_at(joint: Joint, a, b) -> jax.Array:
    """Unnormalised cells at broadcastable index arrays a (rows) and b (columns)."""
    t = joint.tables
    return log_cell(
        joint.method,
        sharded_take(joint.mesh, t.logits_a, a, b),
        sharded_take(joint.mesh, t.logits_b, a, b),
        joint.norm_a[b],
        joint.norm_b[a],
        joint.row[a],
        joint.col[b],
    )


# Invalid ids (only possible while traced: concrete ones are refused) read cell 0,
# and their results are NaN: a gather alone would wrap or clamp to another token.


@jax.jit
def _log_prob(joint: Joint, a, b):
    v = joint.vocab_size
    ok = ids.valid(a, v) & ids.valid(b, v)
    return jnp.where(ok, _cell_at(joint, ids.safe(a, v), ids.safe(b, v)) - joint.log_z, jnp.nan)


@jax.jit
def _log_cond_a(joint: Joint, b):
    v = joint.vocab_size
    a = jnp.arange(joint.tables.padded_vocab_size)
    log_p = jax.nn.log_softmax(_cell_at(joint, a, ids.safe(b, v)))[:v]
    return jnp.where(ids.valid(b, v), log_p, jnp.nan)


@jax.jit
def _log_cond_b(joint: Joint, a):
    v = joint.vocab_size
    log_p = jax.nn.log_softmax(_cell_at(joint, ids.safe(a, v), jnp.arange(v)))
    return jnp.where(ids.valid(a, v), log_p, jnp.nan)


@jax.jit
def _to_dense(joint: Joint):
    a = jnp.arange(joint.vocab_size)[:, None]
    return _cell_at(joint, a, jnp.arange(joint.vocab_size)[None, :]) - joint.log_z


# --- streaming passes (local: called inside shard_map) ------------------------------


# --- deriving a joint ----------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("method", "mesh", "block_rows", "accelerated"))
def _derive(tables: PairTables, pivot, max_steps, tol, *, method, mesh, block_rows, accelerated):
    """Everything of a ``Joint`` except ``tables``, ``method`` and ``mesh``."""
    fa, fb = tables.logits_a, tables.logits_b
    norm_a, norm_b = normalisers(tables)
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
        log_qb_pivot = norm_b[pivot].log_q(sharded_take(mesh, fb, pivot))
        log_qa_pivot = norm_a.log_q(sharded_take(mesh, fa, pivot))
        row, col = jnp.zeros(vp), log_qb_pivot - log_qa_pivot
        info = {"pivot": pivot}
    if method not in AG_METHODS:
        rows, cols = (fa, fb, norm_b, row), (norm_a, col)
        _, col_lse = row_col_lse(mesh, block_rows, block_cell(method), rows, cols)
        log_z = jax.nn.logsumexp(col_lse)
        return norm_a, norm_b, row, col, log_z, info

    row, col, log_z, log_pa, log_pb, iters, map_passes, delta = ag.solve(
        mesh, block_rows, fa, fb, norm_a, norm_b, tables.row_valid, max_steps, tol, accelerated=accelerated
    )
    rows, cols = (fa, fb, norm_b, row), (norm_a, col)
    # The last iterate's marginals are its row and column sums: no extra lse pass.
    cell = block_cell("ag")
    objective = kl_sum(mesh, block_rows, cell, rows, cols, log_pa + log_z, log_pb + log_z)
    info = {"iters": iters, "map_passes": map_passes, "delta": delta, "objective": objective}
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
            mesh = local_mesh(1)
    k = mesh_size(mesh)
    if tables.padded_vocab_size % k:
        raise UserError(
            f"tables have {tables.padded_vocab_size} rows, not a multiple of the "
            f"{k}-device mesh; build them with padded_vocab_size=padded_size(V, mesh)"
        )
    return mesh


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
        ``streaming.BLOCK_CELLS`` cells per block).
      options:
        hcb: ``pivot`` (int token a*; default argmax of mA over real tokens).
        ag: ``iters`` (default 40, the paper's fixed count of plain iterations), or
          ``tol``: until the estimated distance of the marginals from the fixed point
          (``delta``, DESIGN.md §1) is < tol, at most ``max_iters`` (default 10000)
          passes, with ``solver`` "accelerated" (Newton, the default) or "plain".
          float32 puts a floor of a few 1e-7 (growing with V) under the estimate:
          below it, a run stops at the floor (accelerated) or at ``max_iters``.
          The loop holds one table beside the inputs, qA + qB of the local rows
          (row-scaled), so that each iteration reads one table, not two.

    Returns:
      A lazy ``Joint``; for ag, ``joint.info`` has ``iters``, ``map_passes``,
      ``delta`` and ``objective`` J(p).

    Raises:
      UserError: unknown method or option, or invalid option values.
      ValueError: block_rows < 1.
    """
    if method not in ALL_METHODS:
        raise UserError(f"unknown joint method {method!r}; choose one of {', '.join(ALL_METHODS)}")
    unknown = sorted(set(options) - set(OPTIONS[method]))
    if unknown:
        allowed = ", ".join(OPTIONS[method]) or "none"
        raise UserError(f"method {method!r} takes no option {', '.join(unknown)} (options: {allowed})")
    mesh = resolve_mesh(tables, mesh)
    if block_rows is None:
        block_rows = default_block_rows(tables, mesh)
    elif block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")

    pivot = options.get("pivot")
    if pivot is not None:
        check_range(pivot, tables.vocab_size, "hcb pivot")
    ag_options = {k: options[k] for k in OPTIONS["ag"] if k in options}
    if method == "ag_converged":
        ag_options.setdefault("tol", CONVERGED_TOL)
    max_steps, tol, accelerated = ag.schedule(**ag_options)

    norm_a, norm_b, row, col, log_z, info = _derive(
        tables, pivot, max_steps, tol, method=method, mesh=mesh, block_rows=block_rows, accelerated=accelerated
    )
    return Joint(tables, norm_a, norm_b, row, col, log_z, info, method=method, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("block_rows",))
def _objective_passes(joint: Joint, *, block_rows: int) -> jax.Array:
    """J of any joint: the row and column logsumexps of its cells, then the KL sums."""
    t = joint.tables
    rows = (t.logits_a, t.logits_b, joint.norm_b, joint.row)
    cols = (joint.norm_a, joint.col)
    row_lse, col_lse = row_col_lse(joint.mesh, block_rows, block_cell(joint.method), rows, cols)
    return kl_sum(joint.mesh, block_rows, block_cell(joint.method), rows, cols, row_lse, col_lse)


def objective(joint: Joint, *, block_rows: int | None = None) -> jax.Array:
    """float32[]: ``J(p) = sum_b KL(qA(.|b) || p(.|b)) + sum_a KL(qB(.|a) || p(.|a))``.

    qA, qB are the conditionals of ``joint.tables``. Two streaming passes: the
    logsumexps of every row and column of the joint's cells, then the KL sums.
    The AG fixed point minimises J; ``kl_all`` of DESIGN.md §1 is J / (2V).
    """
    if block_rows is None:
        block_rows = default_block_rows(joint.tables, joint.mesh)
    return _objective_passes(joint, block_rows=block_rows)

