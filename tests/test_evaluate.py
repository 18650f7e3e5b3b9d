"""End-to-end evaluation on tiny checkpoints against a float64 NumPy reference, and resume."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from jaxjoint import UserError, load_mlm, scoring
from jaxjoint.config import resolve_config
from jaxjoint.explain import explain_pair, top_pairs
from jaxjoint.joints import METHODS, derive_joint
from jaxjoint.run import evaluate
from jaxjoint.run.plot import nll_by_distance, plot_run
from jaxjoint.tables import pair_tables
from tests.hf_fixtures import torch_model

V = 53
SENTENCES = [
    "the cat sat on the mat",
    "a dog ran to the park",
    "it",  # one maskable token: skipped
    "the man saw a bird in the tree",
    "the quick brown fox jumps over the lazy dog",
    "she ate food with water by the house",
    "they was big and small",
    "we eat under a red tree at night",
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sentences.txt"
    path.write_text("\n".join(SENTENCES) + "\n")
    return path


@pytest.fixture(scope="module")
def torch_double(sharp_ckpt):
    return torch_model(sharp_ckpt).double()


def run_config(sharp_ckpt, data_file, out, **overrides):
    values = {"model": str(sharp_ckpt), "data": str(data_file), "out": str(out), "devices": 1}
    return resolve_config({**values, **overrides})


# --- float64 reference ------------------------------------------------------------------


def log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def logsumexp(x, axis=None):
    m = np.max(x, axis=axis, keepdims=True)
    s = m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))
    return s.squeeze() if axis is None else np.squeeze(s, axis)


def reference_tables(model, ids, a, b, mask_id):
    """float64 fA[a, b], fB[a, b], and the both-masked logits at A and B, from PyTorch."""
    ids = np.asarray(ids)

    def forward(batch):
        with torch.no_grad():
            return model(input_ids=torch.as_tensor(batch)).logits.double().numpy()

    def substituted(read, sub):
        batch = np.tile(ids, (V, 1))
        batch[:, read] = mask_id
        batch[:, sub] = np.arange(V)
        return forward(batch)[:, read]  # [token at sub, token at read]

    both = ids.copy()
    both[[a, b]] = mask_id
    out = forward(both[None])[0]
    return substituted(a, b).T, substituted(b, a), out[a], out[b]


def reference_joints(fa, fb, ma, mb, *, ag_iters=40):
    """Dense float64 log-joints of every method (DESIGN.md §1) and AG's diagnostics."""
    lqa, lqb = log_softmax(fa, 0), log_softmax(fb, 1)
    log_ma, log_mb = log_softmax(ma, 0), log_softmax(mb, 0)
    norm = lambda x: x - logsumexp(x)  # noqa: E731
    pivot = int(np.argmax(log_ma))
    joints = {
        "mlm": log_ma[:, None] + log_mb[None, :],
        "mrf": norm(lqa + lqb),
        "mrf_logit": norm(fa + fb),
        "hcb": norm(lqa - lqa[pivot][None, :] + lqb[pivot][None, :]),
    }
    qa, qb = np.exp(lqa), np.exp(lqb)
    p = np.full((V, V), 1.0 / V**2)
    for _ in range(ag_iters):
        pa, pb = p.sum(1), p.sum(0)
        new = (qa + qb) / (1 / pa[:, None] + 1 / pb[None, :])
        new /= new.sum()
        delta = np.abs(new.sum(1) - pa).sum() + np.abs(new.sum(0) - pb).sum()
        p = new
    joints["ag"] = np.log(p)
    info = {"iters": ag_iters, "delta": delta, "objective": kl_sums(lqa, lqb, np.log(p)).sum()}
    return joints, info


def kl_sums(lqa, lqb, lp):
    """float64[2V]: KL(qA(.|b) || p(.|b)) for every b, then KL(qB(.|a) || p(.|a)) for every a."""
    cond_a, cond_b = lp - logsumexp(lp, 0)[None, :], lp - logsumexp(lp, 1)[:, None]
    kl_a = (np.exp(lqa) * (lqa - cond_a)).sum(0)
    kl_b = (np.exp(lqb) * (lqb - cond_b)).sum(1)
    return np.concatenate([kl_a, kl_b])


def reference_record(model, record, mask_id, *, ag_iters=40):
    """Every number of a pairs.jsonl record, recomputed in float64."""
    a, b = record["positions"]
    a0, b0 = record["gold"]
    fa, fb, ma, mb = reference_tables(model, record["input_ids"], a, b, mask_id)
    lqa, lqb = log_softmax(fa, 0), log_softmax(fb, 1)
    joints, info = reference_joints(fa, fb, ma, mb, ag_iters=ag_iters)
    metrics = {}
    for method, lp in joints.items():
        cond_a, cond_b = lp - logsumexp(lp, 0)[None, :], lp - logsumexp(lp, 1)[:, None]
        kls = kl_sums(lqa, lqb, lp)
        metrics[method] = {
            "p_nll": -0.5 * lp[a0, b0],
            "u_nll": -0.5 * (cond_a[a0, b0] + cond_b[a0, b0]),
            "kl_gold": 0.5 * (kls[b0] + kls[V + a0]),
            "kl_all": kls.mean(),
        }
    metrics["ag"].update(info)
    return {"metrics": metrics, "mlm_unary_u_nll": -0.5 * (lqa[a0, b0] + lqb[a0, b0])}


def close(key, got, want, rel_tol):
    # delta is the difference of two successive iterates (marginals summing to 2):
    # float32 rounds each to about 1e-7, whatever the size of the difference. A KL
    # is a q-weighted sum of log-probability differences of size up to ~4 here,
    # each rounded to ~6e-8 relative in float32: about 2e-7, however small the KL.
    abs_tol = {"delta": 1e-6, "kl_gold": 2e-7, "kl_all": 2e-7}.get(key, 0.0)
    return math.isclose(got, want, rel_tol=rel_tol, abs_tol=abs_tol)


def assert_matches_reference(record, ref, methods):
    assert sorted(record["metrics"]) == sorted(methods)
    for method in methods:
        got, want = record["metrics"][method], ref["metrics"][method]
        expected_keys = {"p_nll", "u_nll", "kl_gold", "kl_all"} | ({"iters", "delta", "objective"}
                                                                  if method == "ag" else set())
        assert set(got) == expected_keys
        for key in expected_keys:
            assert close(key, got[key], want[key], 1e-4), (record["index"], method, key, got[key], want[key])
    assert math.isclose(record["mlm_unary_u_nll"], ref["mlm_unary_u_nll"], rel_tol=1e-4)


def read_lines(out):
    return (Path(out) / "pairs.jsonl").read_text().splitlines()


# --- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(sharp_ckpt, data_file, tmp_path_factory):
    """One uninterrupted run with every method: the reference for the resume tests."""
    out = tmp_path_factory.mktemp("full") / "run"
    summary = evaluate(run_config(sharp_ckpt, data_file, out), quiet=True)
    return out, summary


def test_every_number_matches_float64_pytorch_reference(full_run, torch_double, sharp_ckpt):
    out, summary = full_run
    mask_id = load_mlm(sharp_ckpt).mask_token_id
    records = [json.loads(line) for line in read_lines(out)]
    assert [r["index"] for r in records] == [0, 1, 3, 4, 5, 6, 7]
    refs = []
    for r in records:
        assert r["text"] == SENTENCES[r["index"]]
        ids, (a, b) = r["input_ids"], r["positions"]
        assert ids[0] == 2 and ids[-1] == 3 and r["gold"] == [ids[a], ids[b]]
        ref = reference_record(torch_double, r, mask_id)
        assert_matches_reference(r, ref, METHODS)
        assert r["metrics"]["ag"]["iters"] == 40
        refs.append(ref)

    assert summary["n_pairs"] == 7 and summary["n_skipped"] == 1
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["config"]["methods"] == list(METHODS) and summary["config"]["out"] == str(out)
    for method in METHODS:
        mean = lambda key: np.mean([ref["metrics"][method][key] for ref in refs])  # noqa: B023 - used in this loop
        got = summary["methods"][method]
        assert math.isclose(got["p_ppl"], math.exp(mean("p_nll")), rel_tol=1e-4)
        assert math.isclose(got["u_ppl"], math.exp(mean("u_nll")), rel_tol=1e-4)
        assert math.isclose(got["kl_gold"], mean("kl_gold"), rel_tol=1e-4)
        assert math.isclose(got["kl_all"], mean("kl_all"), rel_tol=1e-4)
    unary = math.exp(np.mean([ref["mlm_unary_u_nll"] for ref in refs]))
    assert math.isclose(summary["mlm_unary_u_ppl"], unary, rel_tol=1e-4)
    # The methods differ on this model, so the comparison above discriminates them.
    assert len({round(summary["methods"][m]["p_ppl"], 3) for m in METHODS}) == len(METHODS)

    md = (out / "summary.md").read_text()
    assert "| Method | P-PPL | U-PPL | KL (gold) | KL (all) |" in md
    for label in ("| MLM |", "| MRF |", "| MRF-L |", "| HCB |", "| AG |", "| MLM conditionals |"):
        assert label in md
    csv_rows = (out / "summary.csv").read_text().splitlines()
    assert csv_rows[0] == "method,label,p_ppl,u_ppl,kl_gold,kl_all,n_pairs" and len(csv_rows) == 7
    assert float(csv_rows[1].split(",")[2]) == summary["methods"]["mlm"]["p_ppl"]


def test_contiguous_masking_and_ag_to_tolerance(sharp_ckpt, data_file, tmp_path, torch_double, capsys):
    config = run_config(sharp_ckpt, data_file, tmp_path / "run", masking="contiguous", methods="hcb,ag",
                        ag_tol=1e-3, max_sentences=4)
    assert config.ag_options() == {"tol": 1e-3, "max_iters": 10_000}
    summary = evaluate(config)
    assert "| HCB |" in capsys.readouterr().out  # the table goes to stdout
    mask_id = load_mlm(sharp_ckpt).mask_token_id
    records = [json.loads(line) for line in read_lines(tmp_path / "run")]
    assert [r["index"] for r in records] == [0, 1, 3] and summary["n_skipped"] == 1
    for r in records:
        a, b = r["positions"]
        assert b == a + 1
        ag = r["metrics"]["ag"]
        assert ag["delta"] < 1e-3 and 1 <= ag["iters"] < 10_000
        assert_matches_reference(r, reference_record(torch_double, r, mask_id, ag_iters=ag["iters"]), ("hcb", "ag"))


def test_sharded_run_matches_one_device(sharp_ckpt, data_file, tmp_path, full_run):
    # AG is the method with collectives in its loop; V = 53 pads to 54 rows on 3 devices.
    evaluate(run_config(sharp_ckpt, data_file, tmp_path / "run", devices=3, methods="ag", max_sentences=4),
             quiet=True)
    full = {json.loads(line)["index"]: json.loads(line) for line in read_lines(full_run[0])}
    for line in read_lines(tmp_path / "run"):
        r = json.loads(line)
        for key, value in r["metrics"]["ag"].items():
            assert close(key, value, full[r["index"]]["metrics"]["ag"][key], 1e-4), key


# --- resume -----------------------------------------------------------------------------------


def test_interrupted_run_resumes_to_the_same_lines(sharp_ckpt, data_file, tmp_path, full_run, monkeypatch):
    out = tmp_path / "run"
    real = scoring.score_tables
    calls = []

    def interrupt_at_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "score_tables", interrupt_at_fourth)
    with pytest.raises(KeyboardInterrupt):
        evaluate(run_config(sharp_ckpt, data_file, out), quiet=True)
    assert len(read_lines(out)) == 3 and not (out / "summary.json").exists()
    monkeypatch.setattr(scoring, "score_tables", real)
    evaluate(run_config(sharp_ckpt, data_file, out), quiet=True)
    assert read_lines(out) == read_lines(full_run[0])
    assert json.loads((out / "summary.json").read_text())["methods"] == full_run[1]["methods"]


def test_torn_last_line_is_recomputed(sharp_ckpt, data_file, tmp_path, full_run):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(full_run[0] / "config.yaml", out / "config.yaml")
    text = (full_run[0] / "pairs.jsonl").read_text()
    lines = text.splitlines(keepends=True)
    (out / "pairs.jsonl").write_text("".join(lines[:2]) + lines[2][:40])  # killed mid-write
    # Sentences 0-2 (2 is skipped): the torn line, sentence 3's, is dropped.
    evaluate(run_config(sharp_ckpt, data_file, out, max_sentences=3), quiet=True)
    assert (out / "pairs.jsonl").read_text() == "".join(lines[:2])
    evaluate(run_config(sharp_ckpt, data_file, out), quiet=True)  # extending max_sentences continues
    assert (out / "pairs.jsonl").read_text() == text


def test_other_config_for_existing_out_is_refused(sharp_ckpt, data_file, full_run):
    out = full_run[0]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="masking: 'random' there, 'contiguous' now"):
        evaluate(run_config(sharp_ckpt, data_file, out, masking="contiguous"), quiet=True)
    with pytest.raises(UserError, match="methods"):
        evaluate(run_config(sharp_ckpt, data_file, out, methods="mlm"), quiet=True)
    with pytest.raises(UserError, match=r"ag: \{'iters': 40\} there, \{'iters': 5\} now"):
        evaluate(run_config(sharp_ckpt, data_file, out, ag_iters=5), quiet=True)
    with pytest.raises(UserError, match=r"ag: \{'iters': 40\} there, \{'tol': 0.001, 'max_iters': 10000\} now"):
        evaluate(run_config(sharp_ckpt, data_file, out, ag_tol=1e-3), quiet=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_settings_that_do_not_change_the_records_may_change(full_run, sharp_ckpt, data_file, tmp_path):
    """A cap that a fixed count never reaches, in a config.yaml written before the
    key existed or with another value now, does not block a resume."""
    out = tmp_path / "run"
    shutil.copytree(full_run[0], out)
    stored = yaml.safe_load((out / "config.yaml").read_text())
    del stored["ag_max_iters"]
    (out / "config.yaml").write_text(yaml.safe_dump(stored))
    lines = read_lines(out)
    summary = evaluate(run_config(sharp_ckpt, data_file, out, ag_max_iters=7), quiet=True)
    assert summary["methods"] == full_run[1]["methods"] and summary["config"]["ag_max_iters"] == 7
    assert read_lines(out) == lines


def test_foreign_or_finished_out_dirs(sharp_ckpt, data_file, tmp_path, full_run):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "pairs.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="no config.yaml"):
        evaluate(run_config(sharp_ckpt, data_file, foreign), quiet=True)
    assert (foreign / "pairs.jsonl").read_text() == "{}\n"
    shutil.copy(full_run[0] / "config.yaml", foreign / "config.yaml")
    with pytest.raises(UserError, match=r"pairs.jsonl:1 is not a jaxjoint pair record"):
        evaluate(run_config(sharp_ckpt, data_file, foreign), quiet=True)
    assert (foreign / "pairs.jsonl").read_text() == "{}\n"
    # A finished run run again recomputes nothing and rewrites the same summary.
    out = tmp_path / "again"
    shutil.copytree(full_run[0], out)
    again = evaluate(run_config(sharp_ckpt, data_file, out), quiet=True)
    assert read_lines(out) == read_lines(full_run[0])
    assert again["methods"] == full_run[1]["methods"]


def test_no_pair_at_all_writes_nothing(sharp_ckpt, tmp_path):
    data = tmp_path / "short.txt"
    data.write_text("it\nthe\n")
    with pytest.raises(UserError, match="none of the 2 sentences"):
        evaluate(run_config(sharp_ckpt, data, tmp_path / "run"), quiet=True)
    assert not (tmp_path / "run").exists()


# --- pair command core, plot ---------------------------------------------------------------------


def test_top_pairs_match_the_dense_joint(sharp_ckpt):
    mlm = load_mlm(sharp_ckpt)
    ids = np.array([2, 5, 7, 9, 10, 5, 11, 3])
    tables = pair_tables(mlm, ids, 2, 6)
    for method in METHODS:
        joint = derive_joint(tables, method)
        dense = np.asarray(joint.to_dense(), np.float64)
        order = np.argsort(-dense.ravel(), kind="stable")[:7]
        got = top_pairs(joint, 7, block_rows=16)  # several blocks, the last one partial
        assert [(a, b) for a, b, _ in got] == [(int(c // V), int(c % V)) for c in order]
        np.testing.assert_allclose([p for *_, p in got], np.exp(dense.ravel()[order]), rtol=1e-5)
    result = explain_pair(mlm, ids, 2, 6, methods=("mlm", "ag"), top_k=3, gold=(7, 11))
    assert set(result["top"]) == {"mlm", "ag"} and len(result["top"]["ag"]) == 3
    assert set(result["metrics"]["ag"]) == {"p_nll", "u_nll", "kl_gold", "kl_all", "iters", "delta", "objective"}
    assert explain_pair(mlm, ids, 2, 6, methods=("mrf",), top_k=2)["metrics"] is None


def test_plot(full_run):
    out, _ = full_run
    records = [json.loads(line) for line in read_lines(out)]
    curves = nll_by_distance(records)
    assert set(curves) == set(METHODS) | {"mlm_unary"}
    d = abs(records[0]["positions"][1] - records[0]["positions"][0])
    same = [r for r in records if abs(r["positions"][1] - r["positions"][0]) == d]
    i = list(curves["mrf"]["distance"]).index(d)
    assert math.isclose(curves["mrf"]["p_nll"][i], np.mean([r["metrics"]["mrf"]["p_nll"] for r in same]))
    png = plot_run(out, out.parent / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
