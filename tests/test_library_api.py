"""jaxjoint as a JAX library (issue 23): ids checked whatever their type, metrics under
jit and vmap, tables whose lifetime explains itself, and your own model in.

The model here is defined in plain JAX (no HF files) and checked against the same
model written in float64 NumPy; every method's metrics against the float64
references of DESIGN.md §1 (``references``, ``references.ref_metrics``).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax

import jaxjoint
import jaxjoint.default
from jaxjoint import FunctionMLM, UserError, derive_joint, iter_pair_tables, mlm_unary_nll, pair_metrics, pair_tables
from jaxjoint.explain import explain_pair
from jaxjoint.metrics import METRICS
from tests.own_model import CLS, MASK, MAX_LEN, PAD, SEP, H, V, tiny_apply, tiny_params
from tests.references import Raw, random_raw, ref_joint, ref_metrics

# --- the small masked LM in plain JAX (tests/own_model.py), and the same model in float64 NumPy


def numpy_logits(params, ids: np.ndarray) -> np.ndarray:
    """float64[L, V]: ``tiny_apply`` of one unpadded sentence, at every position."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    x = p["embed"][ids] + p["pos"][: len(ids)]
    scores = (x @ p["wq"]) @ (x @ p["wk"]).T / math.sqrt(H)
    attn = np.exp(scores - scores.max(axis=1, keepdims=True))
    x = x + attn / attn.sum(axis=1, keepdims=True) @ (x @ p["wv"])
    return np.tanh(x @ p["w1"]) @ p["embed"].T + p["bias"]


def numpy_tables(params, ids: np.ndarray, a: int, b: int) -> tuple[np.ndarray, ...]:
    """float64 fA[a, b], fB[a, b], mA, mB straight from DESIGN.md §1: one forward a cell."""
    fa, fb = np.empty((V, V)), np.empty((V, V))
    for t in range(V):
        sub = ids.copy()
        sub[a], sub[b] = MASK, t
        fa[:, t] = numpy_logits(params, sub)[a]
        sub[a], sub[b] = t, MASK
        fb[t] = numpy_logits(params, sub)[b]
    both = ids.copy()
    both[[a, b]] = MASK
    logits = numpy_logits(params, both)
    return fa, fb, logits[a], logits[b]


@pytest.fixture(scope="module")
def model() -> FunctionMLM:
    return FunctionMLM(tiny_apply, tiny_params(), vocab_size=V, mask_token_id=MASK, pad_token_id=PAD,
                       special_token_ids={CLS, SEP, PAD}, max_positions=MAX_LEN, chunk_size=16)


SENTENCE = np.array([CLS, 7, 12, 30, 5, 21, 9, 32, 14, SEP])  # 10 tokens: bucket 16, 6 of them padding


def test_own_model_tables_and_every_method_match_float64_numpy(model):
    a, b = 3, 6
    tables = pair_tables(model, SENTENCE, a, b)
    assert tables.logits_a.shape == (40, V) and tables.vocab_size == V
    ref = numpy_tables(tiny_params(), SENTENCE, a, b)
    for got, want in zip((tables.logits_a[:V], tables.logits_b[:V], tables.both_masked_a[:V],
                          tables.both_masked_b), ref):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(tables.logits_a[V:]) == -np.inf)
    # Every method's metrics against the float64 references on the float64 tables.
    raw = Raw(*ref)
    gold = (int(SENTENCE[a]), int(SENTENCE[b]))
    for method in jaxjoint.METHODS:
        got = pair_metrics(tables, derive_joint(tables, method), gold)
        want = ref_metrics(raw, ref_joint(raw, method), *gold)
        for key in METRICS:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=f"{method} {key}")
    lqa, lqb = log_softmax(ref[0], axis=0), log_softmax(ref[1], axis=1)
    np.testing.assert_allclose(mlm_unary_nll(tables, gold), -0.5 * (lqa[gold] + lqb[gold]), rtol=1e-5)


def test_own_model_through_the_stream_and_explain(model):
    """``iter_pair_tables`` (evaluate's core) and ``explain_pair`` (pair's) take it too."""
    pairs = [(SENTENCE, 3, 6), (SENTENCE[:7], 1, 5)]
    singles = [pair_tables(model, *p) for p in pairs]
    for one, streamed in zip(singles, iter_pair_tables(model, pairs, prefetch=1)):
        np.testing.assert_allclose(streamed.logits_b, one.logits_b, rtol=1e-6, atol=1e-6)
    out = explain_pair(model, SENTENCE, 3, 6, methods=("mrf", "ag"), top_k=3, gold=(30, 9))
    assert len(out["top"]["mrf"]) == 3 and set(out["metrics"]) == {"mrf", "ag"}


def test_readme_own_model_example_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = text.split("Your own model, in plain JAX", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len(example.strip().splitlines()) <= 16
    exec(compile(example, "README.md", "exec"), {})
    printed = eval(capsys.readouterr().out, {})  # the metrics dict
    assert list(printed) == list(METRICS) and all(math.isfinite(v) for v in printed.values())


@pytest.mark.slow  # the v5e compiles of the model's programs, two joints and their metrics: about 7 s
def test_readme_own_model_plan_runs(capsys, monkeypatch):
    monkeypatch.setenv("JAXJOINT_PLAN_CACHE", "off")
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = text.split("Your own model, in plain JAX", 1)[1].split("```python\n")[1:3]
    model, plan = (block.split("```", 1)[0] for block in blocks)
    assert "make_plan" in plan and len(plan.strip().splitlines()) <= 3
    scope: dict = {}
    exec(compile(model, "README.md", "exec"), scope)
    capsys.readouterr()
    exec(compile(plan, "README.md", "exec"), scope)
    printed = capsys.readouterr().out
    assert "apply_fn (your model) (V = 33) on v5e:2x2: 4 x TPU v5e" in printed
    assert "FLOPs counted by XLA" in printed and printed.rstrip().endswith("fits")


def test_own_model_user_errors(model):
    assert isinstance(model, jaxjoint.MLMProtocol)
    with pytest.raises(UserError, match=r"position 0 is the special token id 1; choose a word position"):
        pair_tables(model, SENTENCE, 0, 4)
    with pytest.raises(UserError, match="input_ids must be in"):
        pair_tables(model, jnp.array([CLS, 7, V, SEP]), 1, 2)
    with pytest.raises(UserError, match="positions must be integers"):
        pair_tables(model, SENTENCE, 2.0, 4)
    with pytest.raises(UserError, match="computes in float32"):
        pair_tables(model, SENTENCE, 2, 4, dtype="bfloat16")
    wrong = FunctionMLM(tiny_apply, tiny_params(), vocab_size=V + 1, mask_token_id=MASK)
    with pytest.raises(UserError, match=r"shape \(40, 1, 33\).*expected \(40, 1, 34\)"):
        pair_tables(wrong, SENTENCE, 2, 4)
    with pytest.raises(UserError, match="mask_token_id 99 is outside"):
        FunctionMLM(tiny_apply, tiny_params(), vocab_size=V, mask_token_id=99)
    # concrete JAX positions are read like ints
    assert pair_tables(model, SENTENCE, jnp.int32(2), np.int64(4)).vocab_size == V


# --- ids checked whatever their type ----------------------------------------------


@pytest.fixture(scope="module")
def esm_like():
    """V = 33 tables padded to 40 rows, as an ESM checkpoint's on one device."""
    tables = random_raw(33, seed=4).tables(padded_vocab_size=40)
    return tables, derive_joint(tables, "mrf")


@pytest.mark.parametrize("bad", [33, 35, 39, 40, -1, -8])
def test_out_of_range_ids_are_one_line_errors_for_every_type(esm_like, bad):
    _, joint = esm_like
    for value in (bad, np.int32(bad), np.array([0, bad]), jnp.array(bad), jnp.array([bad, 1])):
        for query in (lambda v=value: joint.log_prob(v, 5), lambda v=value: joint.log_prob(5, v),
                      lambda v=value: joint.log_cond_a(v), lambda v=value: joint.log_cond_b(v)):
            with pytest.raises(UserError, match=r"token ids must be in \[0, 33\)"):
                query()
    for gold in ((bad, 0), (jnp.array(0), jnp.array(bad)), jnp.array([bad, 2])):
        with pytest.raises(UserError, match=r"gold tokens must be in \[0, 33\)"):
            pair_metrics(joint.tables, joint, gold)
        with pytest.raises(UserError, match="gold tokens"):
            mlm_unary_nll(joint.tables, gold)


def test_non_integer_ids_are_refused(esm_like):
    _, joint = esm_like
    for value in (2.0, np.float32(2), jnp.array(2.5)):
        with pytest.raises(UserError, match="must be integers"):
            joint.log_prob(value, 1)
    with pytest.raises(UserError, match="must be integers"):
        pair_metrics(joint.tables, joint, (1.0, 2))


def test_under_jit_invalid_ids_give_nan_never_another_tokens_value(esm_like):
    tables, joint = esm_like
    log_prob, cond_a, cond_b = (jax.jit(f) for f in (joint.log_prob, joint.log_cond_a, joint.log_cond_b))
    eager = np.asarray(joint.to_dense())
    for bad in (33, 35, 40, -1, -8):
        assert np.isnan(log_prob(bad, 5)) and np.isnan(log_prob(5, bad))
        assert np.all(np.isnan(cond_a(bad))) and np.all(np.isnan(cond_b(bad)))
    np.testing.assert_allclose(log_prob(32, 5), eager[32, 5], rtol=1e-6)
    np.testing.assert_allclose(cond_b(4), eager[4] - np.logaddexp.reduce(eager[4]), rtol=1e-5, atol=1e-6)
    batch = np.asarray(jax.jit(joint.log_prob)(jnp.array([0, 33, -8, 32]), 7))
    assert np.isnan(batch[1]) and np.isnan(batch[2])
    np.testing.assert_allclose(batch[[0, 3]], eager[[0, 32], 7], rtol=1e-6)
    metrics = jax.jit(lambda g: pair_metrics(tables, joint, g))(jnp.array([33, 1]))
    assert all(np.isnan(metrics[key]) for key in METRICS)
    assert np.isnan(jax.jit(lambda g: mlm_unary_nll(tables, g))(jnp.array([1, -1])))


# --- metrics compose with JAX -----------------------------------------------------


# mlm, mrf and mrf_logit share their metrics path; hcb adds a pivot, ag its objective.
@pytest.mark.parametrize("method", ["mrf", "hcb", "ag"])
def test_metrics_under_jit_equal_eager(method):
    tables = random_raw(33, 3.0, seed=5).tables(padded_vocab_size=40)
    eager = pair_metrics(tables, derive_joint(tables, method), (32, 7))
    assert all(type(v) is float for v in eager.values()) and list(eager) == list(METRICS)
    jitted = jax.jit(lambda t, gold: pair_metrics(t, derive_joint(t, method), gold))(tables, jnp.array([32, 7]))
    for key in METRICS:
        np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_metrics_vmap_over_gold_pairs():
    tables = random_raw(33, 3.0, seed=5).tables(padded_vocab_size=40)
    joint = derive_joint(tables, "hcb")
    golds = np.array([[0, 1], [32, 7], [11, 11]])
    batched = jax.vmap(lambda g: pair_metrics(tables, joint, g))(golds)
    unary = jax.vmap(lambda g: mlm_unary_nll(tables, g))(golds)
    for i, gold in enumerate(golds):
        one = pair_metrics(tables, joint, tuple(gold))
        for key in METRICS:
            np.testing.assert_allclose(batched[key][i], one[key], rtol=1e-6, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(unary[i], mlm_unary_nll(tables, tuple(gold)), rtol=1e-6, atol=1e-6)


def test_info_holds_python_numbers_as_the_records_do():
    tables = random_raw(33, seed=1).tables(padded_vocab_size=40)
    ag = derive_joint(tables, "ag", iters=5)
    assert type(ag.info["iters"]) is int and ag.info["iters"] == 5
    assert type(ag.info["delta"]) is float and type(ag.info["objective"]) is float
    assert type(derive_joint(tables, "hcb").info["pivot"]) is int
    traced = jax.jit(lambda t: derive_joint(t, "ag", iters=5).info["objective"])(tables)
    np.testing.assert_allclose(traced, ag.info["objective"], rtol=1e-6)


# --- lifetimes that explain themselves --------------------------------------------


def test_tables_used_after_the_stream_moved_on_say_why(model):
    pairs = [(SENTENCE, 3, 6), (SENTENCE, 2, 4)]
    stream = iter_pair_tables(model, pairs, prefetch=0)
    first = next(stream)
    joint = derive_joint(first, "mrf")
    kept = pair_metrics(first, joint, (30, 9))
    second = next(stream)
    assert np.isfinite(pair_metrics(second, derive_joint(second, "mrf"), (12, 5))["p_nll"])
    for use in (lambda: derive_joint(first, "mrf"), lambda: pair_metrics(first, joint, (30, 9)),
                lambda: joint.log_prob(1, 2), lambda: np.asarray(first.logits_a), lambda: first.log_q_a,
                lambda: first.logits_b.shape):
        with pytest.raises(UserError, match="freed: iter_pair_tables frees each pair's tables"):
            use()
    assert np.isfinite(kept["kl_all"])
    # list() asks for every pair, so every one it holds is freed
    for tables in list(iter_pair_tables(model, pairs)):
        with pytest.raises(UserError, match="freed"):
            derive_joint(tables, "mlm")


def test_an_invalid_pair_raises_after_the_pairs_before_it(model):
    pairs = [(SENTENCE, 3, 6), (SENTENCE, 2, 4), (SENTENCE, 0, 4), (SENTENCE, 1, 2)]
    stream = iter_pair_tables(model, pairs, prefetch=1)
    next(stream)
    second = next(stream)  # before the error: the pair queued ahead of it
    assert np.isfinite(np.asarray(second.logits_a[5, 7]))
    with pytest.raises(UserError, match="pair 2 of the stream: position 0 is the special token"):
        next(stream)


@pytest.mark.slow  # one pair's 8193 forward passes at V = 4096
def test_embedded_model_ids_and_jitted_metrics():
    """The issue's own checks on the embedded model."""
    mlm = jaxjoint.load_mlm(jaxjoint.default.MODEL_DIR)
    ids = np.array(mlm.tokenizer("the river rose after the storm")["input_ids"])
    tables = pair_tables(mlm, ids, 2, 3)
    joint = derive_joint(tables, "mrf")
    with pytest.raises(UserError, match=r"token ids must be in \[0, 4096\)"):
        joint.log_prob(jnp.array(4096), jnp.array(0))
    with pytest.raises(UserError, match=r"token ids must be in \[0, 4096\)"):
        joint.log_cond_b(jnp.array(-1))
    gold = (int(ids[2]), int(ids[3]))
    eager = pair_metrics(tables, joint, gold)
    jitted = jax.jit(lambda t, g: pair_metrics(t, derive_joint(t, "mrf"), g))(tables, jnp.array(gold))
    for key in METRICS:
        np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-6, atol=1e-6, err_msg=key)
