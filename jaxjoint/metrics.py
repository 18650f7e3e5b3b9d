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

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

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
    for gold tokens int32[] ``a0``, ``b0``; traceable (no host transfer)."""
    v = tables.vocab_size
    log_qa = jax.nn.log_softmax(tables.logits_a[:, b0])[:v]  # qA(.|b0)
    log_qb = jax.nn.log_softmax(sharded_take(joint.mesh, tables.logits_b, a0))  # qB(.|a0)
    log_pa = joint.log_cond_a(b0)  # p(.|b0)
    log_pb = joint.log_cond_b(a0)  # p(.|a0)
    return {
        "p_nll": -0.5 * joint.log_prob(a0, b0),
        "u_nll": -0.5 * (log_pa[a0] + log_pb[b0]),
        "kl_gold": 0.5 * (_kl(log_qa, log_pa) + _kl(log_qb, log_pb)),
        "kl_all": _j_of(joint, block_rows) / (2 * v),
    }


def _j_of(joint: Joint, block_rows: int) -> jax.Array:
    """J(p): AG computed it already (``joint.info``); other joints need two passes."""
    if "objective" in joint.info:
        return joint.info["objective"]
    return objective(joint, block_rows=block_rows)


def pair_metrics(
    tables: PairTables,
    joint: Joint,
    gold: tuple[int, int],
    *,
    block_rows: int | None = None,
) -> dict[str, float]:
    """``p_nll``, ``u_nll``, ``kl_gold`` and ``kl_all`` of ``joint`` for one pair.

    Args:
      tables: the ``PairTables`` (logits float32[Vp, V]) ``joint`` was derived from;
        its conditionals qA, qB are what the KL terms compare against.
      joint: from ``derive_joint(tables, ...)``.
      gold: the gold tokens (a0, b0), ints in [0, V).
      block_rows: rows per block of the streaming passes (default as in ``derive_joint``).

    Returns:
      Python floats keyed by ``METRICS``; KL terms with q = 0 contribute 0.
    """
    if tables.logits_a.shape != joint.tables.logits_a.shape or tables.vocab_size != joint.vocab_size:
        raise ValueError("pair_metrics: the joint was derived from tables of another shape")
    a0, b0 = _check_gold(gold, tables.vocab_size)
    if block_rows is None:
        block_rows = default_block_rows(tables, joint.mesh)
    values = pair_metric_arrays(tables, joint, jnp.int32(a0), jnp.int32(b0), block_rows=block_rows)
    return {key: float(values[key]) for key in METRICS}


@functools.partial(jax.jit, static_argnames=("mesh",))
def mlm_unary_nll_array(tables: PairTables, a0: jax.Array, b0: jax.Array, *, mesh: Mesh) -> jax.Array:
    """The jitted core of ``mlm_unary_nll``: float32[] for gold tokens int32[] a0, b0,
    with the tables row-sharded on ``mesh``."""
    log_qa = jax.nn.log_softmax(tables.logits_a[:, b0])[a0]
    log_qb = jax.nn.log_softmax(sharded_take(mesh, tables.logits_b, a0))[b0]
    return -0.5 * (log_qa + log_qb)


def mlm_unary_nll(tables: PairTables, gold: tuple[int, int], *, mesh: Mesh | None = None) -> float:
    """``mlm_unary_u_nll = -1/2 [log qA(a0|b0) + log qB(b0|a0)]``: the MLM's own
    conditionals at the gold pair; O(V) work. tables: logits float32[Vp, V];
    mesh: as for ``derive_joint`` (default: the one the tables are sharded on)."""
    a0, b0 = _check_gold(gold, tables.vocab_size)
    mesh = resolve_mesh(tables, mesh)
    return float(mlm_unary_nll_array(tables, jnp.int32(a0), jnp.int32(b0), mesh=mesh))


def _check_gold(gold: tuple[int, int], vocab_size: int) -> tuple[int, int]:
    a0, b0 = (int(g) for g in gold)
    if not (0 <= a0 < vocab_size and 0 <= b0 < vocab_size):
        raise UserError(f"gold tokens {(a0, b0)} are outside the vocabulary [0, {vocab_size})")
    return a0, b0


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
