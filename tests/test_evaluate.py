"""End-to-end evaluation on tiny checkpoints against a float64 NumPy reference, and resume."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxjoint import UserError, load_mlm, scoring
from jaxjoint.config import resolve_config
from jaxjoint.explain import explain_pair, top_pairs
from jaxjoint.joints import METHODS, derive_joint
from jaxjoint.run import evaluate
from jaxjoint.run.plot import nll_by_distance, plot_run
from jaxjoint.tables import pair_tables
from tests.hf_fixtures import torch_model
from tests.record_reference import (
    KL_FLOAT32,
    assert_matches_reference,
    assert_summary_matches_references,
    close,
    reference_record,
)

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
        # Small KLs to float32's measured resolution (record_reference.KL_FLOAT32): the
        # random-checkpoint maker's sharp_ckpt puts the MLM's kl_gold of sentence 5 2.7e-7 off.
        assert_matches_reference(r, ref, METHODS, kl_floor=KL_FLOAT32)
        assert r["metrics"]["ag"]["iters"] == 40
        refs.append(ref)

    assert summary["n_pairs"] == 7 and summary["n_skipped"] == 1
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["config"]["methods"] == list(METHODS) and summary["config"]["out"] == str(out)
    assert_summary_matches_references(summary, refs, METHODS, kl_floor=KL_FLOAT32)

    md = (out / "summary.md").read_text()
    assert "| Method | P-PPL | U-PPL | KL (gold) | KL (all) |" in md
    for label in ("| MLM |", "| MRF |", "| MRF-L |", "| HCB |", "| AG |", "| MLM conditionals |"):
        assert label in md
    csv_rows = (out / "summary.csv").read_text().splitlines()
    assert csv_rows[0] == "method,label,p_ppl,u_ppl,kl_gold,kl_all,n_pairs" and len(csv_rows) == 7
    assert float(csv_rows[1].split(",")[2]) == summary["methods"]["mlm"]["p_ppl"]


def test_contiguous_masking_and_ag_to_tolerance(sharp_ckpt, data_file, tmp_path, torch_double, capsys):
    config = run_config(sharp_ckpt, data_file, tmp_path / "run", masking="contiguous", methods="hcb,ag",
                        ag_tol=1e-3, max_sentences=4, ag_solver="plain")  # the reference replays plain passes
    assert config.ag_options() == {"tol": 1e-3, "max_iters": 10_000, "solver": "plain"}
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
        # the honest stopping rule runs more passes, near float32's floor: J to its 2V-KL resolution
        assert_matches_reference(r, reference_record(torch_double, r, mask_id, ag_iters=ag["map_passes"],
                                                      to_tolerance=True), ("hcb", "ag"),
                                 floor_objective=True)


@pytest.mark.slow
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
    with pytest.raises(UserError, match="matmul_precision: 'float32' there, 'tensorfloat32' now"):
        evaluate(run_config(sharp_ckpt, data_file, out, matmul_precision="tensorfloat32"), quiet=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_settings_that_do_not_change_the_records_may_change(full_run, sharp_ckpt, data_file, tmp_path):
    """A cap that a fixed count never reaches, in a config.yaml written before the
    key existed or with another value now, does not block a resume; nor does a
    config.yaml from before matmul_precision existed (its runs computed float32)."""
    out = tmp_path / "run"
    shutil.copytree(full_run[0], out)
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert stored["matmul_precision"] == "float32"
    del stored["ag_max_iters"], stored["matmul_precision"]
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
    assert set(result["metrics"]["ag"]) == {"p_nll", "u_nll", "kl_gold", "kl_all", "iters", "map_passes", "delta",
                                            "objective"}
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
