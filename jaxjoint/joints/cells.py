"""The cell algebra: unnormalised ``log p(a, b)`` of each method from the tables' pieces.

A joint's cell is built from the logit tables ``fA[a, b]``, ``fB[a, b]``, their
normalisers (``Normaliser``) and two vectors ``row[a]``, ``col[b]`` that each
method defines (``Joint``). Cells are returned as ``(top, ratio)`` with ``ratio``
in [1/2, 2] (None for 1), so that the maximum of ``top`` along a row or column is
a safe shift for its logsumexp and the streaming passes take no log per cell.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp


def neg_inf_to_zero(x):
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

    def __getitem__(self, index) -> Normaliser:
        return Normaliser(self.shift[index], self.log_sum[index])

    def log_q(self, logits: jax.Array) -> jax.Array:
        """Log-probabilities of ``logits`` (broadcastable against the normaliser)."""
        return (logits - self.shift) - self.log_sum

    @staticmethod
    def of(logits: jax.Array, axis: int) -> Normaliser:
        """The normaliser of ``logits`` along ``axis`` (removed from the shape)."""
        shift = neg_inf_to_zero(logits.max(axis=axis))
        log_sum = jnp.log(jnp.exp(logits - jnp.expand_dims(shift, axis)).sum(axis=axis))
        return Normaliser(shift, neg_inf_to_zero(log_sum))


def cell_parts(method: str, fa, fb, na, nb, row, col):
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
    return hi_q + lo_p, (1 + exp_gap(lo_q, hi_q)) / (1 + exp_gap(lo_p, hi_p))


def exp_gap(lo, hi):
    """``exp(lo - hi)`` in [0, 1] for lo <= hi; 0 when both are -inf (a zero pair)."""
    return jnp.exp(jnp.where(hi > -jnp.inf, lo - hi, -jnp.inf))


def combine(top, ratio):
    """``top + log(ratio)``; log, not log1p: ~1e-7 absolute, float32's own resolution."""
    return top if ratio is None else top + jnp.log(ratio)


def log_cell(method: str, fa, fb, na, nb, row, col):
    """Unnormalised ``log p(a, b)``; arguments as for ``cell_parts``."""
    return combine(*cell_parts(method, fa, fb, na, nb, row, col))


def block_cell(method: str) -> Callable:
    """Cells of a row block as ``(top, ratio)`` (``cell_parts``): rows =
    (fa[c,V], fb[c,V], nb[c], row[c]), cols = (na[V], col[V]) -> float32[c, V] each."""

    def cell(rows, cols):
        fa, fb, nb, row = rows
        na, col = cols
        return cell_parts(method, fa, fb, na[None, :], nb[:, None], row[:, None], col[None, :])

    return cell
