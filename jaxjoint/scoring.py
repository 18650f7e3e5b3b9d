"""One pair scored: every method's joint from its tables, and each joint's metrics.

This is the per-pair unit of work that ``jaxjoint evaluate`` repeats over a data
set (``jaxjoint.run``) and that ``jaxjoint pair`` shows for one sentence
(``jaxjoint.explain``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax.sharding import Mesh

from jaxjoint.data import MaskedPair
from jaxjoint.joints import Joint, derive_joint
from jaxjoint.metrics import METRICS, mlm_unary_nll, pair_metrics
from jaxjoint.tables import PairTables

# The per-pair record of AG's run (``Joint.info`` holds the same keys).
AG_DIAGNOSTICS = ("iters", "map_passes", "delta", "objective")


def derive_all(tables: PairTables, methods: Sequence[str], ag_options: dict[str, Any],
               mesh: Mesh | None) -> dict[str, Joint]:
    """``{method: derive_joint(tables, method)}``, AG with ``ag_options`` (``EvalConfig.ag_options``:
    ``ag_converged``'s under that key)."""
    ag = {k: v for k, v in ag_options.items() if k != "ag_converged"}
    options = {"ag": ag, "ag_converged": ag_options.get("ag_converged", {})}
    return {m: derive_joint(tables, m, mesh=mesh, **options.get(m, {})) for m in methods}


def score_joints(
    tables: PairTables, joints: dict[str, Joint], gold: tuple[int, int]
) -> tuple[dict[str, dict[str, float]], float]:
    """Each joint's metrics for one pair, and the MLM's own unary U-NLL.

    tables: the pair's ``PairTables`` (logits float32[Vp, V]) the joints were derived from.
    Returns ``({method: {p_nll, u_nll, kl_gold, kl_all[, iters, delta, objective]}},
    mlm_unary_u_nll)``; the three extra fields are AG's iterations, the L1 change of
    its last step and its objective J.
    """
    metrics = {}
    for method, joint in joints.items():
        values = pair_metrics(tables, joint, gold)
        values = {key: values[key] for key in METRICS}  # jit returns dicts in sorted key order
        if method in ("ag", "ag_converged"):
            values.update(ag_diagnostics(joint))
        metrics[method] = values
    return metrics, mlm_unary_nll(tables, gold)


def ag_diagnostics(joint: Joint) -> dict[str, float | int]:
    """AG's ``iters`` and ``map_passes`` (ints), ``delta`` (estimated distance from the
    fixed point) and ``objective`` J."""
    return {key: (int if key in ("iters", "map_passes") else float)(joint.info[key]) for key in AG_DIAGNOSTICS}


def score_tables(
    tables: PairTables,
    gold: tuple[int, int],
    methods: Sequence[str],
    ag_options: dict[str, Any],
    mesh: Mesh | None,
) -> tuple[dict[str, dict[str, float]], float]:
    """``score_joints`` of every method's joint derived from ``tables`` (sharded on ``mesh``)."""
    return score_joints(tables, derive_all(tables, methods, ag_options, mesh), gold)


def pair_record(pair: MaskedPair, metrics: dict[str, dict[str, float]], unary: float) -> dict[str, Any]:
    """The ``pairs.jsonl`` line of one finished pair; ``id`` (after ``index``) only for
    a FASTA record, so that a text run's lines are what they always were."""
    record: dict[str, Any] = {"index": pair.index}
    if pair.id is not None:
        record["id"] = pair.id
    record.update({
        "text": pair.text,
        "input_ids": list(pair.input_ids),
        "positions": [pair.a, pair.b],
        "gold": list(pair.gold),
        "metrics": metrics,
        "mlm_unary_u_nll": unary,
    })
    return record
