"""``jaxjoint table``: finished runs as the paper's table, against an independent NumPy bootstrap."""

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxjoint import UserError
from jaxjoint.cli import main
from jaxjoint.config import resolve_config
from jaxjoint.data import Skipped
from jaxjoint.run.reports import summarize, summary_files
from jaxjoint.run.table import make_table, table_csv, write_table

METHODS = ("mlm", "hcb", "ag")
PPL = {"p_ppl": "p_nll", "u_ppl": "u_nll"}
KL = ("kl_gold", "kl_all")


def fake_run(directory: Path, *, n: int, seed: int, methods=METHODS, data="default", masking="random",
             extra=None) -> Path:
    """A finished run directory as evaluate writes it, with synthetic per-pair numbers
    (AG better than HCB better than MLM on every pair's KLs, noisy NLLs)."""
    rng = np.random.default_rng(seed)
    config = resolve_config({"data": data, "masking": masking, "methods": ",".join(methods),
                             "out": str(directory), **(extra or {})})
    records = []
    for i in range(n):
        base = rng.gamma(4.0, 1.0)
        metrics = {}
        for k, m in enumerate(methods):
            scale = 1.0 + 0.3 * (len(methods) - 1 - k)
            metrics[m] = {"p_nll": float(base * scale + rng.normal(0, 0.5)),
                          "u_nll": float(base * scale * 0.9 + rng.normal(0, 0.5)),
                          "kl_gold": float(rng.gamma(2.0, 0.05) * scale),
                          "kl_all": float(rng.gamma(2.0, 0.02) * scale ** 2)}
            if m == "ag":
                metrics[m].update(iters=40, delta=1e-3, objective=0.1)
        records.append({"index": i, "text": f"s{i}", "input_ids": [1, 5, 6, 2], "positions": [1, 2],
                        "gold": [5, 6], "metrics": metrics, "mlm_unary_u_nll": float(base + rng.normal(0, 0.3))})
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    (directory / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = summarize(config, records, [Skipped(n, "1 maskable token, fewer than two")], max_length=128)
    for name, text in summary_files(summary).items():
        (directory / name).write_text(text)
    return directory


@pytest.fixture
def runs(tmp_path):
    return [fake_run(tmp_path / "short", n=40, seed=1),
            fake_run(tmp_path / "news", n=25, seed=2, data="default-news")]


# --- an independent bootstrap ----------------------------------------------------------------


def percentile(sorted_values, q):
    """NumPy's default (linear) percentile, written out."""
    position = q / 100 * (len(sorted_values) - 1)
    lo = math.floor(position)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (position - lo)


def reference_bootstrap(records, resamples, seed):
    """{(method, metric): (low, high)} and {(method, metric): (low, high)} of method − AG, a resample at a time."""
    rng = np.random.default_rng(seed)
    n = len(records)
    stats = {}
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n)  # one row of the documented draws
        chosen = [records[i] for i in idx]
        for m in METHODS:
            for key in (*PPL, *KL):
                field = PPL.get(key, key)
                mean = sum(r["metrics"][m][field] for r in chosen) / n
                stats.setdefault((m, key), []).append(math.exp(mean) if key in PPL else mean)
        stats.setdefault(("mlm_unary", "u_ppl"), []).append(math.exp(sum(r["mlm_unary_u_nll"] for r in chosen) / n))

    def bounds(samples):
        s = sorted(samples)
        return percentile(s, 2.5), percentile(s, 97.5)

    intervals = {k: bounds(v) for k, v in stats.items()}
    versus = {(m, key): bounds(np.array(stats[m, key]) - np.array(stats["ag", key]))
              for m in METHODS if m != "ag" for key in (*PPL, *KL)}
    return intervals, versus


def read_records(directory):
    return [json.loads(line) for line in (directory / "pairs.jsonl").read_text().splitlines()]


def test_values_are_the_summary_and_intervals_the_numpy_bootstrap(runs):
    table = make_table(runs, resamples=300, seed=7)
    for row, directory in zip(table.rows, runs):
        summary = json.loads((directory / "summary.json").read_text())
        intervals, versus = reference_bootstrap(read_records(directory), 300, 7)
        for (method, key), e in row.estimates.items():
            expect = summary["mlm_unary_u_ppl"] if method == "mlm_unary" else summary["methods"][method][key]
            assert e.value == expect
            assert (e.low, e.high) == pytest.approx(intervals[method, key], rel=1e-10, abs=1e-12)
            assert e.low < e.value < e.high
        assert set(row.versus) == set(versus)
        for (method, key), e in row.versus.items():
            assert e.value == pytest.approx(summary["methods"][method][key] - summary["methods"]["ag"][key],
                                            rel=0, abs=0)
            assert (e.low, e.high) == pytest.approx(versus[method, key], rel=1e-10, abs=1e-12)


def test_interval_of_a_mean_has_the_normal_width(tmp_path):
    """Independent of the draws: for a mean of N values the 95% interval is about ±1.96 sd/√N."""
    run = fake_run(tmp_path / "big", n=400, seed=3)
    row = make_table([run], resamples=4000, seed=0).rows[0]
    x = np.array([r["metrics"]["hcb"]["kl_gold"] for r in read_records(run)])
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    e = row.estimates["hcb", "kl_gold"]
    assert (e.high - e.low) / 2 == pytest.approx(half, rel=0.1)
    assert (e.low + e.high) / 2 == pytest.approx(x.mean(), abs=0.15 * half)


def test_seeded_and_independent_of_the_other_runs(runs):
    one = make_table(runs, resamples=200, seed=0)
    assert table_csv(one) == table_csv(make_table(runs, resamples=200, seed=0))
    assert make_table(runs[1:], resamples=200, seed=0).rows[0].estimates == one.rows[1].estimates
    assert make_table(runs, resamples=200, seed=1).rows[0].estimates != one.rows[0].estimates


def test_csv_has_a_row_per_run_method_metric(runs, tmp_path):
    out = tmp_path / "t.csv"
    assert main(["table", *map(str, runs), "--output", str(out), "--resamples", "200"]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == len(runs) * (len(METHODS) * 4 + 1)
    for directory in runs:
        summary = json.loads((directory / "summary.json").read_text())
        mine = [r for r in rows if r["run"] == str(directory)]
        assert {(r["method"], r["metric"]) for r in mine} == {
            *((m, k) for m in METHODS for k in ("p_ppl", "u_ppl", "kl_gold", "kl_all")), ("mlm_unary", "u_ppl")}
        for r in mine:
            expect = summary["mlm_unary_u_ppl"] if r["method"] == "mlm_unary" else summary["methods"][r["method"]][
                r["metric"]]
            assert float(r["value"]) == expect and float(r["low"]) < expect < float(r["high"])
            has_versus = r["method"] not in ("ag", "mlm_unary")
            assert bool(r["minus_ag"]) == has_versus
            if has_versus:
                assert float(r["minus_ag_low"]) <= float(r["minus_ag"]) <= float(r["minus_ag_high"])


def test_markdown_latex_and_png(runs, tmp_path, capsys):
    assert main(["table", *map(str, runs), "--resamples", "200"]) == 0
    md = capsys.readouterr().out
    assert "| Model | Data | Masking | Pairs | MLM P-PPL |" in md and "## Each method against AG" in md
    assert md.count("\n| default | default | random | 40 |") == 2  # a row in each of the two tables
    assert md.count("\n| default | default-news | random | 25 |") == 2
    tex = tmp_path / "t.tex"
    assert main(["table", *map(str, runs), "--output", str(tex), "--resamples", "200"]) == 0
    text = tex.read_text()
    assert text.count(r"\begin{tabular}") == 2 and all(rule in text for rule in (r"\toprule", r"\midrule",
                                                                                   r"\bottomrule", r"\cmidrule"))
    assert r"\multicolumn{4}{c}{HCB}" in text and "default-news" in text
    assert text.count("{") == text.count("}")
    for block in text.split(r"\begin{tabular}{")[1:]:  # every row has as many cells as the column spec
        spec, body = block.split("}", 1)
        rows = [line for line in body.split(r"\end{tabular}")[0].splitlines() if line.endswith(r"\\")]
        assert len(rows) == 2 + len(runs)  # the group titles, the metric titles, a row per run
        for row in rows:
            spans = [int(w) for w in re.findall(r"\\multicolumn\{(\d+)\}", row)]
            assert row.count(" & ") + 1 + sum(spans) - len(spans) == len(spec)
    png = tmp_path / "t.png"
    assert main(["table", *map(str, runs), "--output", str(png), "--resamples", "200"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 1000 and height > 700


def test_settings_that_differ_become_columns(tmp_path):
    a = fake_run(tmp_path / "a", n=10, seed=1)
    b = fake_run(tmp_path / "b", n=10, seed=1, extra={"dtype": "bfloat16"})
    c = fake_run(tmp_path / "c", n=10, seed=1, extra={"matmul_precision": "tensorfloat32"})
    old = fake_run(tmp_path / "old", n=10, seed=1)  # written before matmul_precision existed
    config = yaml.safe_load((old / "config.yaml").read_text())
    del config["matmul_precision"]
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    table = make_table([a, b, c, old], resamples=100)
    labels = dict(table.labels)
    assert labels["dtype"] == ["float32", "bfloat16", "float32", "float32"]
    assert labels["precision"] == ["float32", "bfloat16", "tensorfloat32", "float32"]  # absent: float32
    assert "seed" not in labels
    assert labels["Run"] == ["a", "b", "c", "old"]  # a and old have the same settings: told apart by directory
    assert "Run" not in dict(make_table([a, b, c], resamples=100).labels)
    same = make_table([a, fake_run(tmp_path / "a2", n=10, seed=4)], resamples=100)
    assert dict(same.labels)["Run"] == ["a", "a2"]  # identical settings: told apart by directory


def test_without_ag_there_is_no_comparison(tmp_path, capsys):
    run = fake_run(tmp_path / "r", n=10, seed=1, methods=("mlm", "hcb"))
    assert main(["table", str(run), "--resamples", "100"]) == 0
    assert "No AG among these runs' methods: no paired comparison." in capsys.readouterr().out
    assert all(not r["minus_ag"] for r in csv.DictReader(io.StringIO(table_csv(make_table([run], resamples=100)))))


@pytest.mark.parametrize("breakage,message", [
    ("summary", r"is not a finished jaxjoint run \(no summary.json\)"),
    ("extra pair", r"is not finished: pairs.jsonl holds 11 pairs, summary.json 10"),
    ("edited value", r"summary.json's hcb kl_all is not that of pairs.jsonl"),
    ("file", r"is not a directory"),
    ("methods", r"the runs have different methods"),
])
def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys, breakage, message):
    good = fake_run(tmp_path / "good", n=10, seed=1)
    bad = fake_run(tmp_path / "bad", n=10, seed=2, methods=("mlm", "ag") if breakage == "methods" else METHODS)
    if breakage == "summary":
        (bad / "summary.json").unlink()
    elif breakage == "extra pair":
        with open(bad / "pairs.jsonl", "a") as f:
            f.write(json.dumps({**read_records(bad)[0], "index": 99}) + "\n")
    elif breakage == "edited value":
        summary = json.loads((bad / "summary.json").read_text())
        summary["methods"]["hcb"]["kl_all"] *= 1.01
        (bad / "summary.json").write_text(json.dumps(summary))
    elif breakage == "file":
        bad = tmp_path / "notes.txt"
        bad.write_text("x")
    out = tmp_path / "table.csv"
    out.write_text("old\n")
    assert main(["table", str(good), str(bad), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("jaxjoint: error: ")
    assert re.search(message, err)
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_unknown_output_format(runs):
    with pytest.raises(UserError, match=r"give a file ending in .md, .csv, .tex or .png"):
        write_table(runs, "table.xlsx")


@pytest.mark.slow
@pytest.mark.usefixtures("optimised_compiles")
def test_two_runs_of_the_embedded_model(tmp_path):
    """The issue's check: default and default-news on the embedded model, then the table in every format."""
    from jaxjoint.run import evaluate

    runs = []
    for data in ("default", "default-news"):
        out = tmp_path / data
        evaluate(resolve_config({"data": data, "max_sentences": 4, "methods": "mlm,hcb,ag", "out": str(out)}),
                 quiet=True)
        runs.append(out)
    csv_path = tmp_path / "t.csv"
    assert main(["table", *map(str, runs), "--output", str(csv_path)]) == 0
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert len(rows) == 2 * (3 * 4 + 1)
    for directory in runs:
        summary = json.loads((directory / "summary.json").read_text())
        for r in (r for r in rows if r["run"] == str(directory)):
            expect = summary["mlm_unary_u_ppl"] if r["method"] == "mlm_unary" else summary["methods"][r["method"]][
                r["metric"]]
            assert float(r["value"]) == expect and float(r["low"]) <= expect <= float(r["high"])
            assert float(r["high"]) > float(r["low"])
    assert {r["method"] for r in rows if r["minus_ag"]} == {"mlm", "hcb"}
    tex = tmp_path / "t.tex"
    assert main(["table", *map(str, runs), "--output", str(tex)]) == 0
    assert r"\begin{tabular}" in tex.read_text() and r"\toprule" in tex.read_text()
    png = tmp_path / "t.png"
    assert main(["table", *map(str, runs), "--output", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
