"""The computation behind ``jaxjoint pair``: the most probable cells of each joint for one sentence."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxjoint.joints import Joint
from jaxjoint.models.mlm import MaskedLM
from jaxjoint.scoring import ag_diagnostics, derive_all, score_joints
from jaxjoint.tables import pair_tables


def top_pairs(joint: Joint, k: int, *, block_rows: int = 256) -> list[tuple[int, int, float]]:
    """The ``k`` most probable cells ``(a, b, p(a, b))`` of a joint, best first.

    Walks the rows in blocks of ``block_rows``, keeping each block's top k on the
    device, so no V x V array exists at once and only k cells a block leave it.
    """
    v = joint.vocab_size
    block_rows = min(block_rows, v)
    k = min(k, block_rows * v)
    starts = range(0, v, block_rows)
    blocks = [_block_top_k(joint, jnp.int32(start), k=k, block_rows=block_rows) for start in starts]
    log_p = np.concatenate([np.asarray(lp, np.float64) for lp, _ in blocks])
    # Flat cells in int64 on the host: V^2 overflows int32 for V > 46340 (RoBERTa's 50265).
    cells = np.concatenate([start * v + np.asarray(c, np.int64) for start, (_, c) in zip(starts, blocks)])
    best = np.argsort(-log_p, kind="stable")[:k]
    return [(int(cells[i] // v), int(cells[i] % v), float(np.exp(log_p[i]))) for i in best]


@functools.partial(jax.jit, static_argnames=("k", "block_rows"))
def _block_top_k(joint: Joint, start: jax.Array, *, k: int, block_rows: int) -> tuple[jax.Array, jax.Array]:
    """float32[k] log-probabilities and int32[k] cells ``(a - start) * V + b`` of the
    best cells in rows ``[start, start + block_rows)``; rows past V are never chosen."""
    v = joint.vocab_size
    rows = start + jnp.arange(block_rows)
    # A fixed block shape compiles once; rows past V are clipped for the gather, then masked.
    log_p = joint.log_prob(jnp.minimum(rows, v - 1)[:, None], jnp.arange(v)[None, :])
    log_p = jnp.where((rows < v)[:, None], log_p, -jnp.inf)
    return jax.lax.top_k(log_p.ravel(), k)


def explain_pair(
    mlm: MaskedLM,
    input_ids: Sequence[int],
    a: int,
    b: int,
    *,
    methods: Sequence[str],
    top_k: int = 10,
    gold: tuple[int, int] | None = None,
    ag_options: dict[str, Any] | None = None,
    mesh: Mesh | None = None,
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """The ``jaxjoint pair`` computation for one sentence.

    input_ids: int[L] with special tokens; the tokens at ``a`` and ``b`` are not used.
    Returns ``{"top": {method: [(a, b, p), ...]}, "metrics": ..., "mlm_unary_u_nll": ...}``;
    the last two (as in ``score_tables``) only when ``gold`` is given, else None.
    """
    ag_options = {} if ag_options is None else ag_options
    tables = pair_tables(mlm, np.asarray(input_ids), a, b, mesh=mesh, chunk_size=chunk_size)
    joints = derive_all(tables, methods, ag_options, mesh)
    result: dict[str, Any] = {
        "top": {m: top_pairs(j, top_k) for m, j in joints.items()},
        "metrics": None,
        "mlm_unary_u_nll": None,
        "ag": ag_diagnostics(joints["ag"]) if "ag" in joints else None,
    }
    if gold is not None:
        result["metrics"], result["mlm_unary_u_nll"] = score_joints(tables, joints, gold)
    return result
