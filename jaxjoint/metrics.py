"""Per-pair metrics of a joint against the MLM's conditionals, and their aggregation.

Definitions are DESIGN.md §1. The per-pair core is jitted; the gold terms need one
row and one column of the joint, ``kl_all`` is ``joints.objective`` / 2V: one
streaming pass for the logsumexp of every row and column of the joint (its
normalised conditionals), a second for the 2V KL sums. No V x V array is allocated.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxjoint import ids
from jaxjoint.errors import UserError
from jaxjoint.joints import Joint, objective, resolve_mesh
from jaxjoint.joints.streaming import default_block_rows, kl_terms, sharded_take
from jaxjoint.tables import PairTables

METRICS = ("p_nll", "u_nll", "kl_gold", "kl_all")


def _kl(log_q: jax.Array, log_p: jax.Array) -> jax.Array:
    """``KL(q || p)`` of two float32[V] log-distributions."""
    return kl_terms(log_q, log_p).sum()


@functools.partial(jax.jit, static_argnames=("block_rows",))
def pair_metric_arrays(tables: PairTables, joint: Joint, a0: jax.Array, b0: jax.Array, *,
                       block_rows: int) -> dict[str, jax.Array]:
    """The jitted core of ``pair_metrics``: float32[] values keyed by ``METRICS``
    for gold tokens int32[] ``a0``, ``b0``; traceable (no host transfer). All four
    are NaN when a gold token is outside [0, V) (ids cannot be checked here)."""
    v = tables.vocab_size
    ok = ids.valid(a0, v) & ids.valid(b0, v)
    a0, b0 = ids.safe(a0, v), ids.safe(b0, v)
    log_qa = jax.nn.log_softmax(tables.logits_a[:, b0])[:v]  # qA(.|b0)
    log_qb = jax.nn.log_softmax(sharded_take(joint.mesh, tables.logits_b, a0))  # qB(.|a0)
    log_pa = joint.log_cond_a(b0)  # p(.|b0)
    log_pb = joint.log_cond_b(a0)  # p(.|a0)
    values = {
        "p_nll": -0.5 * joint.log_prob(a0, b0),
        "u_nll": -0.5 * (log_pa[a0] + log_pb[b0]),
        "kl_gold": 0.5 * (_kl(log_qa, log_pa) + _kl(log_qb, log_pb)),
        "kl_all": _j_of(joint, block_rows) / (2 * v),
    }
    return {key: jnp.where(ok, value, jnp.nan) for key, value in values.items()}


def _j_of(joint: Joint, block_rows: int) -> jax.Array:
    """J(p): AG computed it already (``joint.info``); other joints need two passes."""
    if "objective" in joint.info_arrays:
        return joint.info_arrays["objective"]
    return objective(joint, block_rows=block_rows)


def pair_metrics(
    tables: PairTables,
    joint: Joint,
    gold: Any,
    *,
    block_rows: int | None = None,
) -> dict[str, Any]:
    """``p_nll``, ``u_nll``, ``kl_gold`` and ``kl_all`` of ``joint`` for one pair.

    Args:
      tables: the ``PairTables`` (logits float32[Vp, V]) ``joint`` was derived from;
        its conditionals qA, qB are what the KL terms compare against.
      joint: from ``derive_joint(tables, ...)``.
      gold: the gold tokens (a0, b0): two ints in [0, V), or an int[2] array.
      block_rows: rows per block of the streaming passes (default as in ``derive_joint``).

    Returns:
      Python floats keyed by ``METRICS`` (in that order); KL terms with q = 0
      contribute 0. Composes with JAX: under ``jax.jit`` or ``jax.vmap`` (over gold
      pairs, say) the values are float32[] arrays, NaN for a gold token outside
      [0, V); outside, such a token is a one-line ``UserError``.
    """
    if tables.logits_a.shape != joint.tables.logits_a.shape or tables.vocab_size != joint.vocab_size:
        raise ValueError("pair_metrics: the joint was derived from tables of another shape")
    a0, b0 = _gold(gold, tables.vocab_size)
    if block_rows is None:
        block_rows = default_block_rows(tables, joint.mesh)
    values = pair_metric_arrays(tables, joint, a0, b0, block_rows=block_rows)
    return _as_numbers({key: values[key] for key in METRICS})


@functools.partial(jax.jit, static_argnames=("mesh",))
def mlm_unary_nll_array(tables: PairTables, a0: jax.Array, b0: jax.Array, *, mesh: Mesh) -> jax.Array:
    """The jitted core of ``mlm_unary_nll``: float32[] for gold tokens int32[] a0, b0,
    with the tables row-sharded on ``mesh``; NaN for a gold token outside [0, V)."""
    v = tables.vocab_size
    ok = ids.valid(a0, v) & ids.valid(b0, v)
    a0, b0 = ids.safe(a0, v), ids.safe(b0, v)
    log_qa = jax.nn.log_softmax(tables.logits_a[:, b0])[a0]
    log_qb = jax.nn.log_softmax(sharded_take(mesh, tables.logits_b, a0))[b0]
    return jnp.where(ok, -0.5 * (log_qa + log_qb), jnp.nan)


def mlm_unary_nll(tables: PairTables, gold: Any, *, mesh: Mesh | None = None) -> Any:
    """``mlm_unary_u_nll = -1/2 [log qA(a0|b0) + log qB(b0|a0)]``: the MLM's own
    conditionals at the gold pair; O(V) work. tables: logits float32[Vp, V];
    gold as for ``pair_metrics``; mesh: as for ``derive_joint`` (default: the one
    the tables are sharded on; pass it under jit for tables on several devices).
    A Python float; a float32[] array under ``jax.jit``/``vmap`` (as ``pair_metrics``)."""
    a0, b0 = _gold(gold, tables.vocab_size)
    mesh = resolve_mesh(tables, mesh)
    return _as_numbers(mlm_unary_nll_array(tables, a0, b0, mesh=mesh))


def _gold(gold: Any, vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """(a0, b0) as int32[] arrays; ``UserError`` for concrete ones that are not
    ints in [0, V) (traced ones are masked in the jitted cores)."""
    a0, b0 = gold
    for token in (a0, b0):
        ids.check_range(token, vocab_size, "gold tokens")
        if jnp.ndim(token) != 0:
            raise UserError(f"gold tokens must be two scalars (a0, b0); got shape {jnp.shape(token)}")
    return jnp.asarray(a0, jnp.int32), jnp.asarray(b0, jnp.int32)


def _as_numbers(values: Any) -> Any:
    """Python floats where ``values`` are concrete; the arrays themselves while traced."""
    if ids.is_traced(values):
        return values
    host = jax.device_get(values)
    if isinstance(values, dict):  # in the caller's key order (pytrees sort dict keys)
        return {key: float(host[key]) for key in values}
    return float(host)


def aggregate(records: Iterable[Mapping]) -> dict[str, dict[str, float]]:
    """Corpus-level numbers per method from per-pair records.

    Args:
      records: mappings with ``method`` and the ``METRICS`` fields (one per pair
        and method), optionally ``mlm_unary_u_nll``.

    Returns:
      ``{method: {"n", "p_ppl", "u_ppl", "kl_gold", "kl_all"[, "mlm_unary_u_ppl"]}}``:
      P-PPL = exp(mean p_nll), U-PPL = exp(mean u_nll), KLs are means, and
      ``mlm_unary_u_ppl`` = exp(mean mlm_unary_u_nll) over the same pairs.
    """
    groups: dict[str, list[Mapping]] = defaultdict(list)
    for record in records:
        groups[record["method"]].append(record)

    def mean(rows: list[Mapping], key: str) -> float:
        return math.fsum(float(r[key]) for r in rows) / len(rows)

    out = {}
    for method, rows in groups.items():
        summary = {
            "n": len(rows),
            "p_ppl": math.exp(mean(rows, "p_nll")),
            "u_ppl": math.exp(mean(rows, "u_nll")),
            "kl_gold": mean(rows, "kl_gold"),
            "kl_all": mean(rows, "kl_all"),
        }
        if all("mlm_unary_u_nll" in r for r in rows):
            summary["mlm_unary_u_ppl"] = math.exp(mean(rows, "mlm_unary_u_nll"))
        out[method] = summary
    return out
