"""The ``jaxjoint`` command: errors as one line, resume after a kill, pair, plot, configs."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jaxjoint import UserError, cli, load_mlm, scoring
from jaxjoint.cli import build_parser, main
from jaxjoint.config import KEYS, LaunchOptions, PlanOptions, read_config_file, resolve_config, resolve_options
from jaxjoint.explain import explain_pair

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "jaxjoint.cli"]


def run_args(sharp_ckpt, data, out, *extra):
    return ["evaluate", "--model", str(sharp_ckpt), "--data", str(data), "--out", str(out), "--devices", "1",
            "--quiet", *extra]


# --- bad input: one line on stderr, non-zero exit, nothing written --------------------------

ERROR_CASES = {
    "missing model path": (["--model", "{tmp}/no/such/checkpoint"], r"model path .*no/such/checkpoint does not exist"),
    "unknown dataset name": (["--data", "snlii"], r"unknown data 'snlii': give one of default, default-news, snli"),
    "hub model with no network": (["--model", "bert-base-cased"], r"cannot fetch 'bert-base-cased' .*offline"),
    "empty data file": (["--data", "{tmp}/empty.txt"], r"holds no sentences"),
    "unknown method": (["--methods", "mlm,foo"], r"unknown method 'foo'; choose from mlm, mrf, mrf_logit, hcb, ag"),
    "unknown config key": (["--config", "{tmp}/bad.yaml"],
                           r"unknown config key 'maskng' in .*; valid keys: model, data"),
    "max sentences 0": (["--max-sentences", "0"], r"max_sentences must be >= 1, got 0"),
    "out under a file": (["--out", "{tmp}/empty.txt/run"], r"--out .*empty.txt/run is under .*empty.txt, a file"),
}


@pytest.fixture(scope="module")
def error_runs(sharp_ckpt, sentences, tmp_path_factory):
    """All error cases, run concurrently as real processes: {case: (returncode, stdout, stderr, out)}."""
    tmp = tmp_path_factory.mktemp("errors")
    (tmp / "empty.txt").write_text("\n\n")
    (tmp / "bad.yaml").write_text("model: default\nmaskng: random\n")
    procs = {}
    for i, (case, (extra, _)) in enumerate(ERROR_CASES.items()):
        out = tmp / f"out{i}"
        args = [*run_args(sharp_ckpt, sentences, out), *(a.replace("{tmp}", str(tmp)) for a in extra)]
        procs[case] = (subprocess.Popen([*CLI, *args], cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env={**os.environ, "PYTHONPATH": str(REPO)}), out)
    return {case: (p.wait(timeout=240), p.stdout.read(), p.stderr.read(), out) for case, (p, out) in procs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_is_one_line_and_writes_nothing(error_runs, case):
    code, stdout, stderr, out = error_runs[case]
    lines = stderr.strip().splitlines()
    assert code == 2 and stdout == "", stderr
    assert len(lines) == 1 and lines[0].startswith("jaxjoint: error: "), stderr
    assert re.search(ERROR_CASES[case][1], lines[0]), lines[0]
    assert not out.exists()


@pytest.mark.parametrize("extra,message", [
    (["--data", "snli"], r"cannot load 'snli' \(stanfordnlp/snli\): the Hugging Face Hub is not reachable"),
    (["--max-sentences", "ten"],
     r"argument --max-sentences: invalid int value: 'ten' \(see jaxjoint evaluate --help\)"),
    (["--devices", "99"], r"asked for 99 devices; this host has 8"),
])
def test_more_bad_input(sharp_ckpt, sentences, tmp_path, capsys, extra, message):
    assert main([*run_args(sharp_ckpt, sentences, tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


# --- resume after a kill ------------------------------------------------------------------------


def test_interrupt_exits_130_and_says_how_to_resume(sharp_ckpt, sentences, tmp_path, monkeypatch, capsys):
    real = scoring.score_tables
    calls = []

    def interrupt_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "score_tables", interrupt_at_third)
    args = run_args(sharp_ckpt, sentences, tmp_path / "run", "--methods", "mlm", "--max-sentences", "5")
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "2 finished pairs are saved" in err and "run the same command again to resume" in err
    monkeypatch.setattr(scoring, "score_tables", real)
    # The stored config.yaml is itself a config file that resumes the run.
    assert main(["evaluate", "--config", str(tmp_path / "run" / "config.yaml"), "--quiet"]) == 0
    assert len((tmp_path / "run" / "pairs.jsonl").read_text().splitlines()) == 5


@pytest.mark.slow
def test_killed_run_resumes_without_repeating_or_losing_a_pair(sharp_ckpt, sentences, tmp_path):
    out = tmp_path / "killed"
    args = run_args(sharp_ckpt, sentences, out, "--methods", "mlm")
    proc = subprocess.Popen([*CLI, *args], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    pairs = out / "pairs.jsonl"
    deadline = time.monotonic() + 180
    while not (pairs.exists() and pairs.read_bytes().count(b"\n") >= 2):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done_before = pairs.read_bytes().count(b"\n")
    assert 2 <= done_before < 90  # killed mid-way

    assert main(args) == 0  # resumed in this process
    assert main(run_args(sharp_ckpt, sentences, tmp_path / "whole", "--methods", "mlm")) == 0
    resumed = [json.loads(line) for line in pairs.read_text().splitlines()]
    whole = [json.loads(line) for line in (tmp_path / "whole" / "pairs.jsonl").read_text().splitlines()]
    assert len({r["index"] for r in resumed}) == len(resumed)
    assert resumed == whole
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_pairs"] == len(whole) and summary["methods"] == json.loads(
        (tmp_path / "whole" / "summary.json").read_text())["methods"]


def test_progress_bar_and_table(sharp_ckpt, sentences, tmp_path, capsys):
    args = run_args(sharp_ckpt, sentences, tmp_path / "run", "--methods", "mlm", "--max-sentences", "3")
    args.remove("--quiet")
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "pairs 3/3" in captured.err and "pairs/s" in captured.err and "ETA" in captured.err
    assert captured.out.startswith("## ") and "| MLM |" in captured.out


# --- configs --------------------------------------------------------------------------------------


def test_command_line_overrides_config_file(sharp_ckpt, sentences, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": str(sharp_ckpt), "data": str(sentences), "masking": "contiguous",
                                      "max_sentences": 2, "methods": ["mlm"], "out": str(tmp_path / "a")}))
    assert main(["evaluate", "--config", str(config), "--masking", "random", "--out", str(tmp_path / "b"),
                 "--devices", "1", "--quiet"]) == 0
    assert not (tmp_path / "a").exists()
    stored = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert stored["masking"] == "random" and stored["max_sentences"] == 2 and stored["methods"] == ["mlm"]


def test_unknown_key_lists_the_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: snli\nmodels: x\nag_iter: 3\n")
    with pytest.raises(UserError) as err:
        read_config_file(path)
    assert "unknown config keys 'models', 'ag_iter'" in str(err.value)
    assert str(err.value).endswith("valid keys: " + ", ".join(KEYS))


@pytest.mark.parametrize("values,message", [
    ({"masking": "block"}, "unknown masking 'block'; choose one of random, contiguous"),
    ({"dtype": "float16"}, "unknown dtype 'float16'"),
    ({"methods": ["mlm", "mlm"]}, "lists a method twice"),
    ({"methods": ""}, "methods is empty"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"seed": "x"}, "'seed' must be an integer"),
    ({"ag_iters": 0}, "ag_iters must be >= 1"),
    ({"ag_max_iters": 0}, "ag_max_iters must be >= 1"),
    ({"ag_tol": 0}, "ag_tol must be > 0"),
    ({"ag_tol": "tight"}, "'ag_tol' must be a number"),
    ({"chunk_size": True}, "'chunk_size' must be an integer"),
    ({"model": ""}, "'model' must be a non-empty string"),
])
def test_invalid_values(values, message):
    with pytest.raises(UserError, match=message):
        resolve_config(values)


def test_value_forms():
    config = resolve_config({"methods": "ag, mlm", "ag_tol": "1e-6", "max_sentences": "12", "data": "xsum"},
                            {"seed": None})
    assert config.methods == ("ag", "mlm") and config.ag_tol == 1e-6 and config.max_sentences == 12
    assert config.ag_options() == {"tol": 1e-6, "max_iters": 10_000} and config.seed == 0
    assert resolve_config({"ag_tol": 1e-3, "ag_max_iters": 7}).ag_options() == {"tol": 1e-3, "max_iters": 7}
    # A file's fixed count (every shipped config has ag_iters: 40) does not cap a tolerance.
    assert resolve_config({"ag_iters": 40}, {"ag_tol": 1e-6}).ag_options() == {"tol": 1e-6, "max_iters": 10_000}
    assert resolve_config({"ag_tol": 1e-3, "ag_iters": 7}).ag_options() == {"tol": 1e-3, "max_iters": 10_000}
    # On the command line, each AG option needs its mode.
    for args, message in ((["--ag-tol", "1e-6", "--ag-iters", "2000"], "with --ag-tol give the cap as --ag-max-iters"),
                          (["--ag-max-iters", "50"], "--ag-max-iters caps AG under --ag-tol")):
        with pytest.raises(UserError, match=message):
            cli._config(build_parser().parse_args(["evaluate", *args]))
    assert resolve_config({}).ag_options() == {"iters": 40}


def test_names_that_are_not_paths_stay_names(tmp_path, monkeypatch):
    """A target or a coordinator address is never taken for a file of the same name."""
    monkeypatch.chdir(tmp_path)
    for name in ("local", "h100", "v5e:2x2", "host:1234"):
        (tmp_path / name).mkdir()
    for target in ("local", "h100", "v5e:2x2"):
        assert resolve_options(PlanOptions, {"target": target}).target == target
    assert resolve_options(LaunchOptions, {"coordinator": "host:1234"}).coordinator == "host:1234"
    assert resolve_config({"model": "local"}).model == str(tmp_path / "local")  # a model may be a path


def test_embedded_sets_default_to_a_sample(tmp_path):
    """The first command answers in minutes: an embedded set runs its first sentences
    unless a count is given; other data runs whole."""
    from jaxjoint.data import EMBEDDED_SAMPLE

    assert resolve_config({}).max_sentences == EMBEDDED_SAMPLE < 300
    assert resolve_config({"data": "default-news"}).max_sentences == EMBEDDED_SAMPLE
    assert resolve_config({"max_sentences": 300}).max_sentences == 300
    assert resolve_config({"data": str(tmp_path / "mine.txt")}).max_sentences is None
    assert resolve_config({"data": "snli"}).max_sentences is None


def test_shipped_configs():
    files = sorted((REPO / "configs").glob("*.yaml"))
    configs = {f.stem: resolve_config(read_config_file(f)) for f in files}
    paper = {(c.model, c.data, c.masking) for name, c in configs.items() if name.startswith("bert-")}
    assert paper == {(m, d, k) for m in ("bert-base-cased", "bert-large-cased") for d in ("snli", "xsum")
                     for k in ("random", "contiguous")}
    for name, c in configs.items():
        assert c.methods == ("mlm", "mrf", "mrf_logit", "hcb", "ag") and c.ag_iters == 40 and c.ag_tol is None
        assert c.dtype == "float32" and c.out.endswith(f"runs/{name}")
        if name.startswith("bert-"):
            assert c.max_sentences == 1000 and c.seed == 0
    assert configs["default"].model == "default" and configs["default"].data == "default"
    assert {"default", "local"} <= set(configs) and len(configs) == 10


def test_train_mlm_is_a_subcommand():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {"evaluate", "pair", "plan", "plot", "table", "train-mlm"}  # plan: issue 13; table: 22


# --- pair, plot -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pair_with_positions(sharp_ckpt, capsys):
    assert main(["pair", "the cat sat on the mat", "--positions", "2", "5", "--model", str(sharp_ckpt),
                 "--top-k", "3", "--devices", "1"]) == 0
    out = capsys.readouterr().out
    assert "A = 2 (gold 'cat'), B = 5 (gold 'the')" in out
    mlm = load_mlm(sharp_ckpt)
    ids = mlm.tokenizer("the cat sat on the mat")["input_ids"]
    result = explain_pair(mlm, ids, 2, 5, methods=("mlm", "mrf", "mrf_logit", "hcb", "ag"), top_k=3,
                          gold=(ids[2], ids[5]))
    tokens = mlm.tokenizer.convert_ids_to_tokens
    for top in result["top"].values():
        a, b, p = top[0]
        assert f"{tokens(a)} {tokens(b)}  {p:.4f}" in out
    assert re.search(rf"\nAG +{result['metrics']['ag']['p_nll']:.4f} ", out)
    assert "MLM conditionals" in out and "kl_all" in out


def test_pair_with_masks(sharp_ckpt, capsys):
    assert main(["pair", "the [MASK] sat on the [MASK]", "--model", str(sharp_ckpt), "--methods", "mrf,ag",
                 "--top-k", "2", "--devices", "1"]) == 0
    out = capsys.readouterr().out
    assert "A = 2, B = 6 (masked: no gold tokens)" in out and "MRF" in out and "kl_all" not in out


@pytest.mark.parametrize("args,message", [
    (["the cat sat"], "TEXT has 0 mask tokens"),
    (["the cat sat", "--positions", "0", "2"], r"position 0 is the special token \[CLS\]"),
    (["the cat sat", "--positions", "1", "9"], "position 9 is outside the 5 tokens"),
    (["the cat sat", "--positions", "1", "1"], "must differ"),
    (["the cat sat", "--top-k", "0"], "top_k must be >= 1, got 0"),
])
def test_pair_errors(sharp_ckpt, capsys, args, message):
    assert main(["pair", *args, "--model", str(sharp_ckpt)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1


def test_plot_command(sharp_ckpt, sentences, tmp_path, capsys):
    assert main(run_args(sharp_ckpt, sentences, tmp_path / "run", "--methods", "mlm", "--max-sentences", "4")) == 0
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "run")]) == 0
    png = Path(capsys.readouterr().out.strip())
    assert png == tmp_path / "run" / "nll_by_distance.png" and png.read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "no finished pairs" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "run"), "--output", str(tmp_path / "plot.xyz")]) == 2
    assert capsys.readouterr().err.startswith(f"jaxjoint: error: cannot write {tmp_path / 'plot.xyz'}: Format 'xyz'")


def test_the_cli_loads_no_training_code_and_no_torch():
    """`jaxjoint evaluate` starts without optax, the training tools or PyTorch."""
    probe = ("import sys, jaxjoint.cli; heavy = ('optax', 'torch', 'jaxjoint.tools.train_mlm', "
             "'jaxjoint.tools.corpus', 'matplotlib'); print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
