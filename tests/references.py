"""float64 NumPy references of DESIGN.md §1, written straight from the formulas.

Dense V x V, in log space (so that peaked tables have finite references too), and
AG materialising the joint every iteration. ``test_joints`` and ``test_metrics``
compare jaxjoint against these.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from scipy.special import log_softmax, logsumexp

from jaxjoint.sharding import replicated, row_sharding
from jaxjoint.tables import PairTables, tables_from_logits

SIZES = (7, 33, 100)
# Peaked tables: logits of size ~200-600, probabilities far below float32's range.
SCALES = (1.0, 200.0)


@dataclasses.dataclass
class Raw:
    """Unpadded logits, float32 as the tables hold them: fA, fB [V, V]; mA, mB [V]."""

    fa: np.ndarray
    fb: np.ndarray
    ma: np.ndarray
    mb: np.ndarray

    def tables(self, padded_vocab_size: int | None = None) -> PairTables:
        return tables_from_logits(self.fa, self.fb, self.ma, self.mb, padded_vocab_size=padded_vocab_size)

    def log_q(self) -> tuple[np.ndarray, np.ndarray]:
        """float64 log qA(a|b), log qB(b|a), both indexed [a, b]."""
        return log_softmax(self.fa.astype(np.float64), axis=0), log_softmax(self.fb.astype(np.float64), axis=1)


def random_raw(v: int, scale: float = 1.0, seed: int = 0) -> Raw:
    rng = np.random.default_rng(seed)
    draw = lambda *shape: (scale * rng.normal(size=shape)).astype(np.float32)
    return Raw(draw(v, v), draw(v, v), draw(v), draw(v))


def raw_from_joint(log_p: np.ndarray, seed: int = 0) -> Raw:
    """Compatible conditionals: qA = p(a,b)/p(b), qB = p(a,b)/p(a) (softmax of log p)."""
    rng = np.random.default_rng(seed)
    v = log_p.shape[0]
    f = log_p.astype(np.float32)
    return Raw(f, f.copy(), rng.normal(size=v).astype(np.float32), rng.normal(size=v).astype(np.float32))


def normalise(x: np.ndarray) -> np.ndarray:
    return x - logsumexp(x)


def ref_ag_iterates(raw: Raw, iters: int) -> list[np.ndarray]:
    """log p_1 .. log p_iters of AG from the uniform joint, each materialised."""
    lqa, lqb = raw.log_q()
    v = lqa.shape[0]
    log_p = np.full((v, v), -2 * np.log(v))
    out = []
    for _ in range(iters):
        lpa, lpb = logsumexp(log_p, axis=1), logsumexp(log_p, axis=0)
        # (qA + qB) / (1/pA + 1/pB)
        log_p = normalise(np.logaddexp(lqa, lqb) - np.logaddexp(-lpa[:, None], -lpb[None, :]))
        out.append(log_p)
    return out


def ref_joint(raw: Raw, method: str, iters: int = 40, pivot: int | None = None) -> np.ndarray:
    """float64 log p(a, b) [V, V] of DESIGN.md §1."""
    lqa, lqb = raw.log_q()
    if method == "mlm":
        return log_softmax(raw.ma.astype(np.float64))[:, None] + log_softmax(raw.mb.astype(np.float64))[None, :]
    if method == "mrf":
        return normalise(lqa + lqb)
    if method == "mrf_logit":
        return normalise(raw.fa.astype(np.float64) + raw.fb)
    if method == "hcb":
        s = int(np.argmax(raw.ma)) if pivot is None else pivot
        return normalise(lqa - lqa[s][None, :] + lqb[s][None, :])
    if method == "ag":
        return ref_ag_iterates(raw, iters)[-1]
    raise ValueError(method)


def ref_kl(log_q: np.ndarray, log_p: np.ndarray, axis: int) -> np.ndarray:
    """KL(q || p) along ``axis``; q = 0 terms are 0."""
    q = np.exp(log_q)
    return np.where(q > 0, q * (log_q - np.where(q > 0, log_p, 0.0)), 0.0).sum(axis=axis)


def ref_objective(raw: Raw, log_p: np.ndarray) -> float:
    """J(p) = sum_b KL(qA(.|b) || p(.|b)) + sum_a KL(qB(.|a) || p(.|a))."""
    lqa, lqb = raw.log_q()
    p_a_given_b = log_p - logsumexp(log_p, axis=0, keepdims=True)
    p_b_given_a = log_p - logsumexp(log_p, axis=1, keepdims=True)
    return float(ref_kl(lqa, p_a_given_b, axis=0).sum() + ref_kl(lqb, p_b_given_a, axis=1).sum())


def shard_tables(tables: PairTables, mesh) -> PairTables:
    """Place tables as the tables stage does: rows over the mesh, mB replicated."""
    rows = row_sharding(mesh)
    return dataclasses.replace(
        tables,
        logits_a=jax.device_put(tables.logits_a, rows),
        logits_b=jax.device_put(tables.logits_b, rows),
        both_masked_a=jax.device_put(tables.both_masked_a, rows),
        both_masked_b=jax.device_put(tables.both_masked_b, replicated(mesh)),
    )


def float32_atol(raw: Raw) -> float:
    """Absolute tolerance for log-probabilities derived from ``raw``'s float32 logits.

    float32 resolves a logit f to 6e-8 |f|, and each method adds or subtracts a few
    numbers as large as the logits (MRF-L's fA + fB, HCB's pivot terms): 4 units of
    the largest logit, with a floor of 1e-6. Cells far in the tail are held to the
    relative tolerance instead.
    """
    largest = max(float(np.abs(x).max()) for x in (raw.fa, raw.fb, raw.ma, raw.mb))
    return 1e-6 + 4 * float(np.spacing(np.float32(largest)))


def ref_metrics(raw: Raw, log_p: np.ndarray, a0: int, b0: int) -> dict[str, float]:
    """float64 p_nll, u_nll, kl_gold, kl_all of the dense joint ``log_p`` [V, V]."""
    lqa, lqb = raw.log_q()
    cond_a = log_p - logsumexp(log_p, axis=0, keepdims=True)  # log p(a|b)
    cond_b = log_p - logsumexp(log_p, axis=1, keepdims=True)  # log p(b|a)
    v = log_p.shape[0]
    return {
        "p_nll": -0.5 * log_p[a0, b0],
        "u_nll": -0.5 * (cond_a[a0, b0] + cond_b[a0, b0]),
        "kl_gold": 0.5 * (ref_kl(lqa[:, b0], cond_a[:, b0], 0) + ref_kl(lqb[a0], cond_b[a0], 0)),
        "kl_all": ref_objective(raw, log_p) / (2 * v),
    }
