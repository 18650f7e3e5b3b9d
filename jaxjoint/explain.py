"""``jaxjoint pair``: the most probable cells of each joint for one sentence, and their display."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxjoint.data import max_tokens
from jaxjoint.errors import UserError
from jaxjoint.joints import LABELS, Joint
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
    Returns ``{"top": {method: [(a, b, p), ...]}, "metrics": ..., "mlm_unary_u_nll": ...,
    "ag": ...}``: metrics and unary NLL (as in ``score_tables``) only when ``gold`` is
    given, AG's diagnostics (``scoring.ag_diagnostics``) when AG is among the methods;
    None otherwise.
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


def explain_text(
    mlm: MaskedLM,
    text: str,
    positions: Sequence[int] | None,
    *,
    top_k: int = 10,
    **options: Any,
) -> dict[str, Any]:
    """``explain_pair`` for a text: its two mask tokens, or the token ``positions``
    (A, B) given, whose tokens are then the gold pair. ``options`` as for
    ``explain_pair``. Adds ``tokens`` (str[L]), ``a``, ``b``, ``gold`` (or None) and ``top_k``."""
    tok = mlm.tokenizer
    if tok is None:
        raise UserError("the checkpoint has no tokenizer files; `jaxjoint pair` needs one to read TEXT")
    encoded = tok(text, truncation=True, max_length=max_tokens(mlm.config), return_special_tokens_mask=True)
    ids, special = list(encoded["input_ids"]), list(encoded["special_tokens_mask"])
    tokens = tok.convert_ids_to_tokens(ids)
    a, b = _pair_positions(positions, ids, special, tokens, mlm.mask_token_id)
    gold = None if mlm.mask_token_id in (ids[a], ids[b]) else (ids[a], ids[b])
    result = explain_pair(mlm, ids, a, b, gold=gold, top_k=top_k, **options)
    return {**result, "tokens": tokens, "a": a, "b": b, "gold": gold, "top_k": top_k}


def _pair_positions(positions: Sequence[int] | None, ids: list[int], special: list[int], tokens: list[str],
                    mask_id: int) -> tuple[int, int]:
    if positions is None:
        masks = [i for i, t in enumerate(ids) if t == mask_id]
        if len(masks) != 2:
            raise UserError(f"TEXT has {len(masks)} mask tokens; write exactly two, or give --positions I J")
        return masks[0], masks[1]
    a, b = positions
    for p in (a, b):
        if not 0 <= p < len(ids):
            raise UserError(f"position {p} is outside the {len(ids)} tokens [0, {len(ids)})")
        if special[p]:
            raise UserError(f"position {p} is the special token {tokens[p]}; choose a word position")
    if a == b:
        raise UserError("the two positions must differ")
    return a, b


def format_explanation(explanation: dict[str, Any], tokenizer: Any) -> str:
    """The text ``jaxjoint pair`` prints for an ``explain_text`` result."""
    tokens, a, b, gold = (explanation[k] for k in ("tokens", "a", "b", "gold"))
    name = tokenizer.convert_ids_to_tokens
    lines = ["tokens: " + " ".join(f"{i}:{t}" for i, t in enumerate(tokens))]
    if gold is None:
        lines.append(f"A = {a}, B = {b} (masked: no gold tokens)")
    else:
        lines.append(f"A = {a} (gold {tokens[a]!r}), B = {b} (gold {tokens[b]!r})")
    lines.append(f"\ntop {explanation['top_k']} pairs (token at A, token at B, p):")
    columns = {LABELS[m]: [f"{name(x)} {name(y)}  {p:.4f}" for x, y, p in top]
               for m, top in explanation["top"].items()}
    lines.append(_table(["#", *columns], [[str(i + 1), *(c[i] for c in columns.values())]
                                          for i in range(min(len(c) for c in columns.values()))]))
    ag = explanation["ag"]
    if ag is not None:
        lines.append(f"\nAG: {ag['iters']} iterations, last L1 change {ag['delta']:.3g}, J = {ag['objective']:.4g}")
    if gold is not None:
        rows = [[LABELS[m], *(f"{v[k]:.4f}" for k in ("p_nll", "u_nll", "kl_gold", "kl_all"))]
                for m, v in explanation["metrics"].items()]
        rows.append(["MLM conditionals", "–", f"{explanation['mlm_unary_u_nll']:.4f}", "–", "–"])
        lines.append("\n" + _table(["method", "p_nll", "u_nll", "kl_gold", "kl_all"], rows))
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])
