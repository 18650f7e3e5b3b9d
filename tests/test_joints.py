"""Joint constructions against the dense float64 NumPy references of DESIGN.md §1 (``references``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from scipy.special import logsumexp

from jaxjoint.errors import UserError
from jaxjoint.joints import METHODS, ag, cells, cpu_pass, derive_joint, objective, streaming
from jaxjoint.sharding import make_mesh, padded_size, replicated, row_sharding
from tests.references import (
    SCALES,
    SIZES,
    Raw,
    float32_atol,
    normalise,
    random_raw,
    raw_from_joint,
    ref_ag_iterates,
    ref_joint,
    ref_objective,
    shard_tables,
)


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
    assert int(joint.info["iters"]) == 25
    marg = lambda lp: np.concatenate([np.exp(logsumexp(lp, axis=1)), np.exp(logsumexp(lp, axis=0))])
    step = np.abs(marg(iterates[-1]) - marg(iterates[-2])).sum()
    # delta estimates the distance from the fixed point (tests/test_ag.py), beyond the last step
    assert float(joint.info["delta"]) > step
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
    # tol 1e-6: the stopping rule's Newton estimate floors at ~2e-7 here (float32), so 1e-7
    # cannot be certified honestly; what J reaches is still held to float64's minimum below.
    joint = derive_joint(raw.tables(), "ag", tol=1e-6)
    assert 1 < int(joint.info["iters"]) < 10_000
    assert float(joint.info["delta"]) < 1e-6

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
    assert int(derive_joint(raw.tables(), "ag").info["iters"]) == 40


def ag_pass(raw: Raw, log_pa, log_pb, mesh, vp: int, *, fallback: bool = True, block_rows: int | None = 3,
            kernel: bool = True):
    """One pass of AG's loop (``ag.iteration_sums``) at the marginals given:
    (row logsumexps [Vp], column logsumexps [V]) of its unnormalised cells. Without
    ``fallback`` the exact log-space recomputation returns NaN, so that a result
    shows which path made it. block_rows: the CPU's row blocks, or None (the
    whole local table at once, as on GPU and TPU)."""
    tables = shard_tables(raw.tables(padded_vocab_size=vp), mesh)
    v = raw.fa.shape[0]
    log_pa = jax.device_put(np.pad(log_pa, (0, vp - v), constant_values=-np.inf).astype(np.float32),
                            row_sharding(mesh))
    rows, repl = row_sharding(mesh).spec, replicated(mesh).spec

    def local(fa, fb, norm_b, norm_a, log_pa, log_pb):
        def exact():
            row, col = streaming.local_row_col_lse(cells.block_cell("ag"), (fa, fb, norm_b, log_pa),
                                                   (norm_a, log_pb), block_rows=3)
            return (row, col) if fallback else (row * jnp.nan, col * jnp.nan)

        table = ag.invariant_table(fa, fb, norm_a, norm_b)
        return ag.iteration_sums(table, log_pa, log_pb, exact, block_rows=block_rows, kernel=kernel)

    norm_a, norm_b = streaming.normalisers(tables)
    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, repl, rows, repl),
                               out_specs=(rows, repl)))
    return fn(tables.logits_a, tables.logits_b, norm_b, norm_a, log_pa, jnp.asarray(log_pb, jnp.float32))


@pytest.mark.parametrize("layout", ["kernel", "xla blocks", "whole"])
@pytest.mark.parametrize("devices", [pytest.param(1, marks=pytest.mark.slow), 8])
def test_ag_pass_in_and_beyond_float32_range(devices, layout, monkeypatch):
    """Marginals within e^-3 of each other: the probability-space pass alone is
    exact. A marginal of e^-150 at row 7, then also e^-200 at column 5: their
    cells underflow there, the pass detects each and recomputes in log space;
    without that recomputation row 7 and column 5 are lost. Layouts: CPU's
    compiled kernel, XLA's row blocks (CPU without a compiler), the whole local
    table (GPU, TPU)."""
    assert cpu_pass.available()
    block_rows = None if layout == "whole" else 3
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

    run = functools.partial(ag_pass, raw, mesh=mesh, vp=vp, block_rows=block_rows, kernel=layout == "kernel")
    check(*run(log_pa, log_pb, fallback=False))
    log_pa[7] = -150.0
    check(*run(log_pa, log_pb))
    log_pb[5] = -200.0
    check(*run(log_pa, log_pb))

    monkeypatch.setattr(ag, "_TRUST", 0.0)  # trust every sum: never recompute
    row_lse, col_lse = run(log_pa, log_pb)
    assert not np.isfinite(np.asarray(row_lse)[7]) and not np.isfinite(np.asarray(col_lse)[5])


# --- device count ------------------------------------------------------------------


def test_results_do_not_depend_on_the_mesh():
    """37 rows padded to 64 over 8 devices (8 rows a device since issue 13; the last
    three hold padding only), in blocks of 3 local rows plus a tail.

    On peaked tables float32 rounding alone moves AG's 40th iterate by ~1e-6
    relative (against float64 as much as between device counts), so this uses
    moderate logits.
    """
    mesh = make_mesh()
    assert mesh.size == 8
    raw = random_raw(37, 1.0, seed=8)
    single = raw.tables()
    sharded = shard_tables(raw.tables(padded_vocab_size=padded_size(37, mesh)), mesh)
    assert sharded.padded_vocab_size == 64
    for method in METHODS:
        one = derive_joint(single, method)
        many = derive_joint(sharded, method, mesh=mesh, block_rows=3)
        np.testing.assert_allclose(many.to_dense(), one.to_dense(), rtol=1e-6, atol=1e-6, err_msg=method)
        for key, value in one.info.items():
            np.testing.assert_allclose(many.info[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    # Without mesh=, the joint runs on the mesh the tables are sharded on.
    implied = derive_joint(sharded, "hcb", block_rows=3)
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
