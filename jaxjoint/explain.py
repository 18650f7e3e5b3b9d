"""``jaxjoint pair``: the most probable cells of each joint for one sentence, and their display."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxjoint.data import AMINO_ACIDS, check_residues, max_tokens, protein_alphabet
from jaxjoint.errors import UserError
from jaxjoint.joints import LABELS, Joint
from jaxjoint.models.mlm import MaskedLM
from jaxjoint.models.protocol import MLMProtocol
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
    mlm: MLMProtocol,
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
    residues: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The ``jaxjoint pair`` computation for one sentence.

    mlm: a ``MaskedLM`` or any ``MLMProtocol`` (``FunctionMLM``).
    input_ids: int[L] with special tokens; the tokens at ``a`` and ``b`` are not used.
    residues: for a protein, the token ids of the amino acids: ``top`` then lists
    mutants (``mutants``) and ``mass`` is filled.
    Returns ``{"top": {method: [(a, b, p), ...]}, "mass": ..., "metrics": ...,
    "mlm_unary_u_nll": ..., "ag": ...}``: metrics and unary NLL (as in
    ``score_tables``) only when ``gold`` is given, AG's diagnostics
    (``scoring.ag_diagnostics``) when AG is among the methods, ``mass`` for a
    protein with its wild type in ``gold``; None otherwise.
    """
    ag_options = {} if ag_options is None else ag_options
    tables = pair_tables(mlm, np.asarray(input_ids), a, b, mesh=mesh, chunk_size=chunk_size)
    joints = derive_all(tables, methods, ag_options, mesh)
    if residues is None:
        top, mass = {m: top_pairs(j, top_k) for m, j in joints.items()}, None
    else:
        summaries = {m: mutants(j, residues, gold, top_k) for m, j in joints.items()}
        top = {m: t for m, (t, _) in summaries.items()}
        mass = None if gold is None else {m: split for m, (_, split) in summaries.items()}
    result: dict[str, Any] = {
        "top": top,
        "mass": mass,
        "metrics": None,
        "mlm_unary_u_nll": None,
        "ag": ag_diagnostics(joints["ag"]) if "ag" in joints else None,
    }
    if gold is not None:
        result["metrics"], result["mlm_unary_u_nll"] = score_joints(tables, joints, gold)
    return result


def mutants(joint: Joint, residues: Sequence[int], wild_type: tuple[int, int] | None,
            k: int) -> tuple[list[tuple[int, int, float]], dict[str, float] | None]:
    """A protein pair's joint read as a distribution over mutants.

    residues: the token ids of the amino acids. Returns the ``k`` most probable
    cells ``(a, b, p(a, b))`` with amino acids at both positions, best first: with
    a ``wild_type`` ``(a0, b0)``, the double mutants (a != a0 and b != b0), else
    every such pair; and, with a wild type, the joint's mass split into
    ``wild_type`` (the cell (a0, b0)), ``single`` (one position changed to an
    amino acid), ``double`` and ``other`` (any other token at A or B: a
    non-standard code, a gap, a special token), which sum to 1.
    """
    # A protein MLM's V is tiny (33 for ESM-2): the dense joint is a few kB.
    p = np.exp(np.asarray(joint.to_dense(), np.float64))
    aa = np.zeros(p.shape[0], bool)
    aa[list(residues)] = True
    cells = aa[:, None] & aa[None, :]
    if wild_type is not None:
        a0, b0 = wild_type
        cells &= (np.arange(p.shape[0]) != a0)[:, None] & (np.arange(p.shape[1]) != b0)[None, :]
    flat = np.flatnonzero(cells)
    best = flat[np.argsort(-p.ravel()[flat], kind="stable")[:k]]
    v = p.shape[1]
    top = [(int(c // v), int(c % v), float(p.flat[c])) for c in best]
    if wild_type is None:
        return top, None
    single = np.zeros_like(cells)
    single[aa, b0] = True
    single[a0, aa] = True
    single[a0, b0] = False
    split = {"wild_type": float(p[a0, b0]), "single": float(p[single].sum()), "double": float(p[cells].sum())}
    split["other"] = float(p.sum()) - sum(split.values())
    return top, split


def is_protein_model(mlm: MaskedLM) -> bool:
    """Whether ``mlm`` reads protein sequences (the ESM family)."""
    return mlm.config.family == "esm"


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
    ``explain_pair``. Adds ``tokens`` (str[L]), ``a``, ``b``, ``gold`` (or None) and ``top_k``.

    For a protein model (``is_protein_model``), ``text`` is a protein sequence
    (whitespace ignored, lower case read as upper case, ``<mask>`` allowed) and
    ``positions`` are residue numbers, counted from 1 (for ESM the same numbers as
    the token indices: ``<cls>`` is token 0); the wild type is the gold pair and
    ``top`` lists double mutants (``mutants``). Adds ``protein``: ``residues``
    (A and B as residue numbers), ``length`` (residues read), ``first`` (the
    token index of residue 1), ``mass``, and the residues ``cut`` by truncation.
    """
    tok = mlm.tokenizer
    if tok is None:
        raise UserError("the checkpoint has no tokenizer files; `jaxjoint pair` needs one to read TEXT")
    if is_protein_model(mlm):
        return _explain_protein(mlm, text, positions, top_k=top_k, **options)
    encoded = tok(text, truncation=True, max_length=max_tokens(mlm.config), return_special_tokens_mask=True)
    ids, special = list(encoded["input_ids"]), list(encoded["special_tokens_mask"])
    tokens = tok.convert_ids_to_tokens(ids)
    a, b = _pair_positions(positions, ids, special, tokens, mlm.mask_token_id, text, tok.mask_token)
    gold = None if mlm.mask_token_id in (ids[a], ids[b]) else (ids[a], ids[b])
    result = explain_pair(mlm, ids, a, b, gold=gold, top_k=top_k, **options)
    return {**result, "tokens": tokens, "a": a, "b": b, "gold": gold, "top_k": top_k, "mask_token": tok.mask_token}


def _explain_protein(mlm: MaskedLM, text: str, positions: Sequence[int] | None, *, top_k: int,
                     **options: Any) -> dict[str, Any]:
    """``explain_text`` for a protein model."""
    tok = mlm.tokenizer
    alphabet = protein_alphabet(tok)
    # Each mask token stands for one residue; around them, the residues as typed.
    parts = ["".join(part.split()).upper() for part in text.split(tok.mask_token)]
    start = 0
    for part in parts:
        check_residues(part, alphabet, lambda i, s=start: f"TEXT, residue {s + i + 1}")
        start += len(part) + 1
    sequence = tok.mask_token.join(parts)
    encoded = tok(sequence, truncation=True, max_length=max_tokens(mlm.config), return_special_tokens_mask=True)
    ids, special = list(encoded["input_ids"]), list(encoded["special_tokens_mask"])
    read = [i for i, s in enumerate(special) if not s]  # read[r - 1]: the token of residue r
    cut = start - 1 - len(read)
    if positions is None:
        masks = [i for i, t in enumerate(ids) if t == mlm.mask_token_id]
        if len(masks) != 2:
            raise UserError(f"TEXT has {len(masks)} {tok.mask_token} tokens; write exactly two"
                            f"{_other_masks(text, tok.mask_token)}, or give --positions I J (residue numbers, from 1)")
        a, b = masks
    else:
        for r in positions:
            if not 1 <= r <= len(read):
                more = f" (the model reads the first {len(read)} of its {len(read) + cut})" if cut else ""
                raise UserError(f"residue {r} is outside the protein's residues 1..{len(read)}{more}")
        if positions[0] == positions[1]:
            raise UserError("the two positions must differ")
        a, b = (read[r - 1] for r in positions)
    gold = None if mlm.mask_token_id in (ids[a], ids[b]) else (ids[a], ids[b])
    residues = tok.convert_tokens_to_ids(list(AMINO_ACIDS))
    result = explain_pair(mlm, ids, a, b, gold=gold, top_k=top_k, residues=residues, **options)
    protein = {"residues": (read.index(a) + 1, read.index(b) + 1), "length": len(read), "first": read[0], "cut": cut}
    return {**result, "tokens": tok.convert_ids_to_tokens(ids), "a": a, "b": b, "gold": gold, "top_k": top_k,
            "protein": protein}


def _pair_positions(positions: Sequence[int] | None, ids: list[int], special: list[int], tokens: list[str],
                    mask_id: int, text: str = "", mask: str = "[MASK]") -> tuple[int, int]:
    if positions is None:
        masks = [i for i, t in enumerate(ids) if t == mask_id]
        if len(masks) != 2:
            raise UserError(f"TEXT has {len(masks)} {mask} tokens; write exactly two{_other_masks(text, mask)}, "
                            "or give --positions I J")
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


MASK_SPELLINGS = ("[MASK]", "<mask>")


def _other_masks(text: str, mask: str) -> str:
    """`` (this model's mask token is [MASK], not <mask>)`` when TEXT holds another
    spelling of a mask token (another family's, or other letter case); else ``""``."""
    rest = text.replace(mask, " ")
    others = []
    for spelling in MASK_SPELLINGS:
        at = rest.lower().find(spelling.lower())
        if at >= 0:
            others.append(rest[at:at + len(spelling)])
    if not others:
        return ""
    return f" (this model's mask token is {mask}, not {' or '.join(others)})"


def format_explanation(explanation: dict[str, Any], tokenizer: Any) -> str:
    """The text ``jaxjoint pair`` prints for an ``explain_text`` result."""
    tokens, a, b, gold = (explanation[k] for k in ("tokens", "a", "b", "gold"))
    name = tokenizer.convert_ids_to_tokens
    if "protein" in explanation:
        lines = _protein_lines(explanation, name)
    else:
        lines = ["tokens: " + " ".join(f"{i}:{t}" for i, t in enumerate(tokens))]
        if gold is None:
            lines.append(f"A = {a} ({_shown(tokens[a], explanation)}), B = {b} ({_shown(tokens[b], explanation)}): "
                         "a masked position has no gold token, so no metrics")
        else:
            lines.append(f"A = {a} (gold {tokens[a]!r}), B = {b} (gold {tokens[b]!r})")
        lines.append(f"\ntop {explanation['top_k']} pairs (token at A, token at B, p):")
        columns = {LABELS[m]: [f"{name(x)} {name(y)}  {p:.4f}" for x, y, p in top]
                   for m, top in explanation["top"].items()}
        lines.append(_columns(columns))
    ag = explanation["ag"]
    if ag is not None:
        lines.append(f"\nAG: {ag['iters']} passes, estimated distance from the fixed point {ag['delta']:.3g}, "
                     f"J = {ag['objective']:.4g}")
    if gold is not None:
        rows = [[LABELS[m], *(f"{v[k]:.4f}" for k in ("p_nll", "u_nll", "kl_gold", "kl_all"))]
                for m, v in explanation["metrics"].items()]
        rows.append(["MLM conditionals", "–", f"{explanation['mlm_unary_u_nll']:.4f}", "–", "–"])
        lines.append("\n" + _table(["method", "p_nll", "u_nll", "kl_gold", "kl_all"], rows))
    return "\n".join(lines)


def _shown(token: str, explanation: dict[str, Any]) -> str:
    """A position's token for the ``A = ..., B = ...`` line: ``masked`` or ``gold 'rose'``."""
    return "masked" if token == explanation.get("mask_token") else f"gold {token!r}"


def _protein_lines(explanation: dict[str, Any], name: Any) -> list[str]:
    """The protein part of ``format_explanation``: the pair in residue numbers and
    the top double mutants in the usual notation (K12R: K at residue 12 becomes R)."""
    tokens, a, b, gold, protein = (explanation[k] for k in ("tokens", "a", "b", "gold", "protein"))
    (ra, rb), length, first = protein["residues"], protein["length"], protein["first"]
    sequence = "".join(t if len(t) == 1 else "?" for t in tokens[first:first + length])
    numbering = "residue r is token r" if first == 1 else f"residue r is token r{first - 1:+d}"
    cut = f"; cut from {length + protein['cut']}: the model reads {length}" if protein["cut"] else ""
    lines = [f"protein: {sequence}", f"{length} residues ({numbering}{cut})"]
    if gold is None:
        lines.append(f"A = {ra}, B = {rb} (masked: no wild type)")
        lines.append(f"\ntop {explanation['top_k']} residue pairs at {ra} and {rb} (p):")
        wild = ("", "")
    else:
        lines.append(f"A = {ra} (wild type {tokens[a]}), B = {rb} (wild type {tokens[b]})")
        lines.append(f"\ntop {explanation['top_k']} double mutants (both residues changed) and their probability:")
        wild = (tokens[a], tokens[b])
    # Mutant probabilities span decades (a conserved site's mutants sit far below 1e-4): 3 significant digits.
    columns = {LABELS[m]: [f"{wild[0]}{ra}{name(x)} {wild[1]}{rb}{name(y)}  {p:.3g}" for x, y, p in top]
               for m, top in explanation["top"].items()}
    lines.append(_columns(columns))
    if explanation["mass"] is not None:
        header = ["method", f"wild type {wild[0]}{ra} {wild[1]}{rb}", "single mutants", "double mutants",
                  "other tokens"]
        rows = [[LABELS[m], *(f"{split[k]:.3g}" for k in ("wild_type", "single", "double", "other"))]
                for m, split in explanation["mass"].items()]
        lines.append("\nwhere each joint puts its mass (other tokens: a non-standard code, a gap or a special "
                     "token at A or B):")
        lines.append(_table(header, rows))
    return lines


def _columns(columns: dict[str, list[str]]) -> str:
    """One column of ranked cells per method, numbered."""
    return _table(["#", *columns], [[str(i + 1), *(c[i] for c in columns.values())]
                                    for i in range(min(len(c) for c in columns.values()))])


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])
