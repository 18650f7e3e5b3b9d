"""Joint constructions against dense float64 NumPy references of DESIGN.md §1.

The references here are written straight from the formulas: dense V x V, log space
(so that peaked tables have finite references too), and AG materialising the joint
every iteration. ``tests/test_metrics.py`` reuses them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax
import pytest
from scipy.special import log_softmax, logsumexp

from jaxjoint import joints
from jaxjoint.errors import UserError
from jaxjoint.joints import METHODS, derive_joint, objective
from jaxjoint.sharding import make_mesh, padded_size, replicated, row_sharding
from jaxjoint.tables import PairTables, tables_from_logits

SIZES = (7, 33, 100)
# Peaked tables: logits of size ~200-600, probabilities far below float32's range.
SCALES = (1.0, 200.0)


# --- float64 references ------------------------------------------------------------


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


def assert_close(actual, expected, rtol=1e-5, atol=0.0):
    actual = np.asarray(actual, np.float64)
    assert np.all(np.isfinite(actual)), "non-finite values"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# --- agreement with the references -------------------------------------------------


@pytest.mark.parametrize("v", SIZES)
@pytest.mark.parametrize("method", METHODS)
def test_joint_matches_reference(method, v):
    for scale in SCALES:
        raw = random_raw(v, scale, seed=v)
        expected = ref_joint(raw, method)
        dense = derive_joint(raw.tables(), method).to_dense()
        assert dense.shape == (v, v)
        assert_close(dense, expected, atol=float32_atol(raw))


@pytest.mark.parametrize("method", METHODS)
def test_joint_queries(method):
    """Cells, conditionals, several row blocks with a short last one, padded rows."""
    v = 33
    raw = random_raw(v, SCALES[-1], seed=1)
    expected = ref_joint(raw, method)
    atol = float32_atol(raw)
    joint = derive_joint(raw.tables(padded_vocab_size=40), method, block_rows=5)
    assert_close(joint.to_dense(), expected, atol=atol)

    a = np.arange(v) % 5
    b = (3 * np.arange(v) + 1) % v
    assert_close(joint.log_prob(a, b), expected[a, b], atol=atol)
    assert_close(joint.log_prob(3, 4), expected[3, 4], atol=atol)
    cond_a = expected - logsumexp(expected, axis=0, keepdims=True)
    cond_b = expected - logsumexp(expected, axis=1, keepdims=True)
    assert_close(joint.log_cond_a(7), cond_a[:, 7], atol=atol)
    assert_close(joint.log_cond_b(32), cond_b[32, :], atol=atol)


def test_ag_info_matches_reference():
    raw = random_raw(33, 3.0, seed=2)
    joint = derive_joint(raw.tables(), "ag", iters=25)
    iterates = ref_ag_iterates(raw, 25)
    assert int(joint.info["iterations"]) == 25
    marg = lambda lp: np.concatenate([np.exp(logsumexp(lp, axis=1)), np.exp(logsumexp(lp, axis=0))])
    expected_l1 = np.abs(marg(iterates[-1]) - marg(iterates[-2])).sum()
    np.testing.assert_allclose(float(joint.info["l1_change"]), expected_l1, rtol=1e-3, atol=1e-7)
    assert_close(joint.info["objective"], ref_objective(raw, iterates[-1]))
    assert_close(objective(joint), ref_objective(raw, iterates[-1]))


# --- properties --------------------------------------------------------------------


def test_compatible_conditionals_are_recovered():
    rng = np.random.default_rng(3)
    log_p = normalise(rng.normal(size=(12, 12)))
    raw = raw_from_joint(log_p)
    tables = raw.tables()
    for method in ("hcb", "ag"):
        options = {"tol": 1e-7} if method == "ag" else {}
        dense = np.asarray(derive_joint(tables, method, **options).to_dense())
        np.testing.assert_allclose(dense, log_p, atol=1e-5, err_msg=method)
    mrf = np.asarray(derive_joint(tables, "mrf").to_dense())
    assert np.abs(mrf - log_p).max() > 1e-2


@pytest.mark.parametrize("pivot", [None, 4])
def test_hcb_keeps_qa(pivot):
    raw = random_raw(20, 2.0, seed=4)
    options = {} if pivot is None else {"pivot": pivot}
    joint = derive_joint(raw.tables(), "hcb", **options)
    assert int(joint.info["pivot"]) == (np.argmax(raw.ma) if pivot is None else pivot)
    lqa, _ = raw.log_q()
    for b in (0, 7, 19):
        assert_close(joint.log_cond_a(b), lqa[:, b], atol=1e-5)
    assert_close(joint.to_dense(), ref_joint(raw, "hcb", pivot=pivot), atol=1e-5)


def test_ag_objective_never_increases():
    raw = random_raw(33, 3.0, seed=5)
    tables = raw.tables()
    values = [float(derive_joint(tables, "ag", iters=t).info["objective"]) for t in range(1, 31)]
    reference = [ref_objective(raw, lp) for lp in ref_ag_iterates(raw, 30)]
    np.testing.assert_allclose(values, reference, rtol=1e-5)
    steps = np.diff(values)
    assert np.all(steps <= 1e-6 * abs(values[0])), steps
    assert values[-1] < values[0]


def test_ag_tolerance_reaches_the_minimiser_of_j():
    raw = random_raw(6, 1.5, seed=6)
    joint = derive_joint(raw.tables(), "ag", tol=1e-7)
    assert 1 < int(joint.info["iterations"]) < 10_000
    assert float(joint.info["l1_change"]) < 1e-7

    lqa, lqb = raw.log_q()
    with jax.enable_x64(True):
        lqa, lqb = jnp.asarray(lqa), jnp.asarray(lqb)

        def j(theta):  # J as a function of the logits of p, through its conditionals
            kl_a = jnp.sum(jnp.exp(lqa) * (lqa - jax.nn.log_softmax(theta, axis=0)))
            kl_b = jnp.sum(jnp.exp(lqb) * (lqb - jax.nn.log_softmax(theta, axis=1)))
            return kl_a + kl_b

        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(j)

        @jax.jit
        def minimise(theta):
            def step(_, carry):
                theta, state = carry
                value, grad = value_and_grad(theta, state=state)
                updates, state = opt.update(grad, state, theta, value=value, grad=grad, value_fn=j)
                return optax.apply_updates(theta, updates), state

            theta, _ = lax.fori_loop(0, 200, step, (theta, opt.init(theta)))
            return theta

        theta = minimise(jnp.zeros((6, 6), jnp.float64))
        assert float(jnp.abs(jax.grad(j)(theta)).max()) < 1e-9
        best = np.asarray(theta - jax.nn.logsumexp(theta))
        best_j = float(j(theta))

    np.testing.assert_allclose(np.asarray(joint.to_dense()), best, atol=1e-5)
    np.testing.assert_allclose(float(joint.info["objective"]), best_j, rtol=1e-5)


def test_fixed_count_is_the_papers():
    raw = random_raw(7, 1.0, seed=7)
    assert int(derive_joint(raw.tables(), "ag").info["iterations"]) == 40


def ag_pass(raw: Raw, log_pa, log_pb, mesh, vp: int, *, fallback: bool = True):
    """One pass of AG's loop (``joints._ag_sums``) at the marginals given:
    (row logsumexps [Vp], column logsumexps [V]) of its unnormalised cells. Without
    ``fallback`` the exact log-space recomputation returns NaN, so that a result
    shows which path made it."""
    tables = shard_tables(raw.tables(padded_vocab_size=vp), mesh)
    v = raw.fa.shape[0]
    log_pa = jax.device_put(np.pad(log_pa, (0, vp - v), constant_values=-np.inf).astype(np.float32),
                            row_sharding(mesh))
    rows, repl = row_sharding(mesh).spec, replicated(mesh).spec

    def local(fa, fb, norm_b, norm_a, log_pa, log_pb):
        def exact():
            row, col = joints._local_row_col_lse(joints._block_cell("ag"), (fa, fb, norm_b, log_pa),
                                                 (norm_a, log_pb), block_rows=3)
            return (row, col) if fallback else (row * jnp.nan, col * jnp.nan)

        table = joints._ag_table(fa, fb, norm_a, norm_b)
        return joints._ag_sums(table, log_pa, log_pb, exact, block_rows=3)

    norm_a, norm_b = joints._normalisers(tables)
    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, repl, rows, repl),
                               out_specs=(rows, repl)))
    return fn(tables.logits_a, tables.logits_b, norm_b, norm_a, log_pa, jnp.asarray(log_pb, jnp.float32))


@pytest.mark.parametrize("devices", [1, 8])
def test_ag_pass_in_and_beyond_float32_range(devices, monkeypatch):
    """Marginals within e^-3 of each other: the probability-space pass alone is
    exact. A marginal of e^-150 at row 7, then also e^-200 at column 5: their
    cells underflow there, the pass detects each and recomputes in log space;
    without that recomputation row 7 and column 5 are lost."""
    v = 33
    mesh = make_mesh(jax.devices()[:devices])
    vp = padded_size(v, mesh)
    raw = random_raw(v, 1.0, seed=9)
    lqa, lqb = raw.log_q()
    rng = np.random.default_rng(9)
    log_pa, log_pb = -3 * rng.random(v), -3 * rng.random(v)

    def check(row_lse, col_lse):
        cells = np.logaddexp(lqa, lqb) - np.logaddexp(-log_pa[:, None], -log_pb[None, :])
        assert np.all(np.isneginf(np.asarray(row_lse)[v:]))
        assert_close(np.asarray(row_lse)[:v], logsumexp(cells, axis=1), rtol=1e-6)
        assert_close(col_lse, logsumexp(cells, axis=0), rtol=1e-6)

    check(*ag_pass(raw, log_pa, log_pb, mesh, vp, fallback=False))
    log_pa[7] = -150.0
    check(*ag_pass(raw, log_pa, log_pb, mesh, vp))
    log_pb[5] = -200.0
    check(*ag_pass(raw, log_pa, log_pb, mesh, vp))

    monkeypatch.setattr(joints, "_TRUST", 0.0)  # trust every sum: never recompute
    row_lse, col_lse = ag_pass(raw, log_pa, log_pb, mesh, vp)
    assert not np.isfinite(np.asarray(row_lse)[7]) and not np.isfinite(np.asarray(col_lse)[5])


# --- device count ------------------------------------------------------------------


def test_results_do_not_depend_on_the_mesh():
    """37 rows padded to 40 over 8 devices, in blocks of 2 local rows plus a tail.

    On peaked tables float32 rounding alone moves AG's 40th iterate by ~1e-6
    relative (against float64 as much as between device counts), so this uses
    moderate logits.
    """
    mesh = make_mesh()
    assert mesh.size == 8
    raw = random_raw(37, 1.0, seed=8)
    single = raw.tables()
    sharded = shard_tables(raw.tables(padded_vocab_size=padded_size(37, mesh)), mesh)
    assert sharded.padded_vocab_size == 40
    for method in METHODS:
        one = derive_joint(single, method)
        many = derive_joint(sharded, method, mesh=mesh, block_rows=2)
        np.testing.assert_allclose(many.to_dense(), one.to_dense(), rtol=1e-6, atol=1e-6, err_msg=method)
        for key, value in one.info.items():
            np.testing.assert_allclose(many.info[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    # Without mesh=, the joint runs on the mesh the tables are sharded on.
    implied = derive_joint(sharded, "hcb", block_rows=2)
    assert implied.mesh == mesh
    np.testing.assert_allclose(implied.to_dense(), derive_joint(single, "hcb").to_dense(), rtol=1e-6, atol=1e-6)


# --- user errors -------------------------------------------------------------------


def test_user_errors():
    tables = random_raw(7).tables()
    with pytest.raises(UserError, match="mlm, mrf, mrf_logit, hcb, ag"):
        derive_joint(tables, "gibbs")
    with pytest.raises(UserError, match="iters"):
        derive_joint(tables, "mrf", iters=3)
    with pytest.raises(UserError, match="either"):
        derive_joint(tables, "ag", iters=3, tol=1e-3)
    with pytest.raises(UserError, match="pivot"):
        derive_joint(tables, "hcb", pivot=7)
    with pytest.raises(UserError, match="iters >= 1"):
        derive_joint(tables, "ag", iters=0)
    with pytest.raises(UserError, match="multiple"):
        derive_joint(tables, "mrf", mesh=make_mesh())
    joint = derive_joint(tables, "mrf")
    for query in (lambda: joint.log_prob(7, 0), lambda: joint.log_prob(np.array([0, -1]), 2),
                  lambda: joint.log_cond_a(7), lambda: joint.log_cond_b(-1)):
        with pytest.raises(UserError, match=r"token ids must be in \[0, 7\)"):
            query()
