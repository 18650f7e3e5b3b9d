"""Per-pair metrics and aggregation against float64 references of DESIGN.md §1."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import logsumexp

from jaxjoint.errors import UserError
from jaxjoint.joints import METHODS, derive_joint
from jaxjoint.metrics import METRICS, aggregate, mlm_unary_nll, pair_metrics
from jaxjoint.sharding import make_mesh, padded_size
from tests.references import (
    SCALES,
    SIZES,
    float32_atol,
    random_raw,
    raw_from_joint,
    ref_joint,
    ref_metrics,
    shard_tables,
)


def assert_metrics_close(actual: dict, expected: dict, atol: float, rtol: float = 1e-5):
    assert set(actual) == set(METRICS)
    for key in METRICS:
        assert isinstance(actual[key], float) and math.isfinite(actual[key]), key
        np.testing.assert_allclose(actual[key], expected[key], rtol=rtol, atol=atol, err_msg=key)


@pytest.mark.parametrize("v", SIZES)
@pytest.mark.parametrize("method", METHODS)
def test_pair_metrics_match_reference(method, v):
    a0, b0 = v // 3, v // 2
    for scale in SCALES:
        raw = random_raw(v, scale, seed=v)
        log_p = ref_joint(raw, method)
        tables = raw.tables()
        got = pair_metrics(tables, derive_joint(tables, method), (a0, b0))
        assert_metrics_close(got, ref_metrics(raw, log_p, a0, b0), atol=float32_atol(raw))


def test_exact_joint_scores_zero_kl():
    """On compatible conditionals HCB and AG recover the joint: both KLs vanish."""
    rng = np.random.default_rng(3)
    log_p = rng.normal(size=(12, 12))
    log_p -= logsumexp(log_p)
    raw = raw_from_joint(log_p)
    tables = raw.tables()
    expected = ref_metrics(raw, log_p, 5, 9)
    assert expected["kl_all"] < 1e-12
    for method, options in (("hcb", {}), ("ag", {"tol": 1e-7})):
        got = pair_metrics(tables, derive_joint(tables, method, **options), (5, 9))
        assert_metrics_close(got, expected, atol=1e-5)


def test_mlm_unary_nll():
    for scale in SCALES:
        raw = random_raw(33, scale, seed=2)
        lqa, lqb = raw.log_q()
        expected = -0.5 * (lqa[4, 30] + lqb[4, 30])
        for tables in (raw.tables(), raw.tables(padded_vocab_size=40)):
            got = mlm_unary_nll(tables, (4, 30))
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=float32_atol(raw))


def test_metrics_do_not_depend_on_the_mesh():
    mesh = make_mesh()
    raw = random_raw(37, 1.0, seed=8)
    single = raw.tables()
    sharded = shard_tables(raw.tables(padded_vocab_size=padded_size(37, mesh)), mesh)
    for method in ("hcb", "ag"):
        one = pair_metrics(single, derive_joint(single, method), (36, 0))
        joint = derive_joint(sharded, method, mesh=mesh, block_rows=2)
        many = pair_metrics(sharded, joint, (36, 0), block_rows=2)
        assert_metrics_close(many, one, atol=1e-7, rtol=1e-6)


def test_aggregate():
    records = [
        {"method": "ag", "p_nll": 1.0, "u_nll": 0.5, "kl_gold": 0.1, "kl_all": 0.2, "mlm_unary_u_nll": 0.4},
        {"method": "ag", "p_nll": 3.0, "u_nll": 1.5, "kl_gold": 0.3, "kl_all": 0.4, "mlm_unary_u_nll": 0.6},
        {"method": "mrf", "p_nll": 2.0, "u_nll": 1.0, "kl_gold": 0.2, "kl_all": 0.3},
    ]
    out = aggregate(records)
    assert out["ag"] == pytest.approx(
        {"n": 2, "p_ppl": math.exp(2.0), "u_ppl": math.exp(1.0), "kl_gold": 0.2, "kl_all": 0.3,
         "mlm_unary_u_ppl": math.exp(0.5)}
    )
    assert out["mrf"] == pytest.approx(
        {"n": 1, "p_ppl": math.exp(2.0), "u_ppl": math.exp(1.0), "kl_gold": 0.2, "kl_all": 0.3}
    )


def test_gold_out_of_range():
    tables = random_raw(7).tables(padded_vocab_size=8)
    joint = derive_joint(tables, "mlm")
    with pytest.raises(UserError, match="gold"):
        pair_metrics(tables, joint, (7, 0))
    with pytest.raises(UserError, match="gold"):
        mlm_unary_nll(tables, (0, -1))
