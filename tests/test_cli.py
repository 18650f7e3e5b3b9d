"""The ``jaxjoint`` command: errors as one line, resume after a kill, pair, plot, configs."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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
                           r"unknown config key 'maskng' \(did you mean 'masking'\?\) in .*; valid keys: model, data"),
    "max sentences 0": (["--max-sentences", "0"], r"--max-sentences must be >= 1, got 0"),
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
    assert "unknown config keys 'models' (did you mean 'model'?), 'ag_iter' (did you mean 'ag_iters'?) in" in str(
        err.value)
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
    assert set(sub.choices) == {"evaluate", "pair", "plan", "plot", "table", "random-checkpoint",
                                "train-mlm"}  # plan: issue 13; table: 22


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    want = f"jaxjoint {version('jaxjoint')} (jax {version('jax')}, jaxlib {version('jaxlib')})\n"
    assert capsys.readouterr().out == want


def test_errors_name_the_flag_on_the_command_line_and_the_key_in_a_file(tmp_path):
    with pytest.raises(UserError, match=r"^--max-sentences must be >= 1, got 0$"):
        cli._config(build_parser().parse_args(["evaluate", "--max-sentences", "0"]))
    with pytest.raises(UserError, match=r"^--ag-tol must be > 0, got -1.0$"):
        cli._config(build_parser().parse_args(["evaluate", "--ag-tol", "-1"]))
    with pytest.raises(UserError, match=r"^unknown --masking value 'block'; choose one of random, contiguous$"):
        cli._config(build_parser().parse_args(["evaluate", "--masking", "block"]))
    (tmp_path / "c.yaml").write_text("max_sentences: 0\n")
    with pytest.raises(UserError, match=r"^max_sentences must be >= 1, got 0$"):
        cli._config(build_parser().parse_args(["evaluate", "--config", str(tmp_path / "c.yaml")]))
    (tmp_path / "d.yaml").write_text("sead: 3\n")
    (tmp_path / "e.yaml").write_text("zzz: 3\n")  # nothing close: no suggestion
    with pytest.raises(UserError, match=r"^unknown config key 'sead' \(did you mean 'seed'\?\) in "):
        read_config_file(tmp_path / "d.yaml")
    with pytest.raises(UserError, match=r"^unknown config key 'zzz' in "):
        read_config_file(tmp_path / "e.yaml")


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
    assert "A = 2 (masked), B = 6 (masked): a masked position has no gold token, so no metrics" in out
    assert "MRF" in out and "kl_all" not in out
    # One position masked, the other a word: its token is shown as what it is.
    assert main(["pair", "the [MASK] sat on the [MASK]", "--positions", "2", "3", "--model", str(sharp_ckpt),
                 "--methods", "mrf", "--top-k", "1", "--devices", "1"]) == 0
    assert "A = 2 (masked), B = 3 (gold 'sat'): a masked position has no gold token" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["the cat sat"], r"TEXT has 0 \[MASK\] tokens; write exactly two, or give --positions I J"),
    (["the [mask] sat on the [mask]"], r"TEXT has 0 \[MASK\] tokens; write exactly two \(this model's mask token "
     r"is \[MASK\], not \[mask\]\), or give"),
    (["the <mask> sat on the [MASK]"], r"TEXT has 1 \[MASK\] tokens; .*\(this model's mask token is \[MASK\], "
     r"not <mask>\)"),
    (["the cat sat", "--positions", "0", "2"], r"position 0 is the special token \[CLS\]"),
    (["the cat sat", "--positions", "1", "9"], "position 9 is outside the 5 tokens"),
    (["the cat sat", "--positions", "1", "1"], "must differ"),
    (["the cat sat", "--top-k", "0"], "--top-k must be >= 1, got 0"),
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
    assert f"{tmp_path / 'empty'} has no pairs.jsonl: not the --out directory" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'} does not exist; give the --out directory" in capsys.readouterr().err
    assert main(["plot", str(png)]) == 2
    err = capsys.readouterr().err
    assert f"{png} is a file; give the --out directory" in err and "disk" not in err
    (tmp_path / "empty" / "pairs.jsonl").write_text("")
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "pairs.jsonl holds no finished pair yet" in capsys.readouterr().err
    # A rerun with a smaller --max-sentences summarises fewer pairs, and says so.
    assert main(run_args(sharp_ckpt, sentences, tmp_path / "run", "--methods", "mlm", "--max-sentences", "2")) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["n_pairs"] == 2
    assert re.fullmatch(r"jaxjoint: note: the summary covers the 2 pairs of the first 2 sentences \(--max-sentences\); "
                        r".*pairs\.jsonl keeps 4 finished pairs: give a larger --max-sentences to summarise them all\n",
                        capsys.readouterr().err)
    assert main(["plot", str(tmp_path / "run"), "--output", str(tmp_path / "plot.xyz")]) == 2
    assert capsys.readouterr().err.startswith(f"jaxjoint: error: cannot write {tmp_path / 'plot.xyz'}: Format 'xyz'")


def test_the_cli_loads_no_training_code_and_no_torch():
    """`jaxjoint evaluate` starts without optax, the training tools or PyTorch."""
    probe = ("import sys, jaxjoint.cli; heavy = ('optax', 'torch', 'jaxjoint.tools.train_mlm', "
             "'jaxjoint.tools.corpus', 'matplotlib'); print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


# --- random-checkpoint ------------------------------------------------------------------------------

RANDOM_FAMILIES = ["bert", "roberta", "xlm-roberta", "distilbert", "electra", "modernbert", "esm"]


@pytest.mark.parametrize("family", RANDOM_FAMILIES)
def test_random_checkpoint_loads_in_transformers_and_gives_its_logits(family, tmp_path, capsys):
    from tests.hf_fixtures import torch_logits, torch_model

    out = tmp_path / family
    assert main(["random-checkpoint", "--family", family, "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote a random {family} checkpoint")
    mlm = load_mlm(out)
    tok = mlm.tokenizer
    text = "MKTAYIAKQRQISF" if family == "esm" else f"the river rose after the {tok.mask_token} storm"
    ids = np.array([tok(text)["input_ids"]])
    assert ids[0, 0] == tok.cls_token_id and ids[0, -1] in (tok.sep_token_id, tok.eos_token_id)
    assert (family == "esm") or mlm.mask_token_id in ids[0]
    reference = torch_model(out)  # transformers reads config.json, weights and all
    got = np.asarray(mlm.logits_at(ids, np.array([3])))
    np.testing.assert_allclose(got, torch_logits(reference, ids)[:, 3], rtol=1e-4, atol=1e-4)


def test_random_checkpoint_like_a_shipped_model(tmp_path, capsys):
    from jaxjoint.models.config import encoder_config_from_hf, shipped_hub_configs

    out = tmp_path / "esm8m"
    assert main(["random-checkpoint", "--like", "esm2_t6_8M_UR50D", "--out", str(out)]) == 0
    shipped = json.loads(shipped_hub_configs()["facebook/esm2_t6_8M_UR50D"].read_text())
    assert load_mlm(out).config == encoder_config_from_hf(shipped)
    for args, message in (
            (["--family", "bert", "--out", str(out)], "exists and is not an empty directory"),
            (["--like", "nosuch-model", "--out", str(tmp_path / "x")], "--like nosuch-model: not a shipped model"),
            (["--family", "bert", "--like", "esm2_t6_8M_UR50D", "--out", str(tmp_path / "y")],
             "is a esm model, not bert"),
            (["--out", str(tmp_path / "z")], r"give --family FAMILY \(or --like HUB-NAME\)")):
        assert main(["random-checkpoint", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(message, err), err


@pytest.mark.slow
def test_readme_protein_commands_on_a_random_esm_checkpoint(tmp_path, capsys):
    """The README's protein section, offline: random-checkpoint, pair, evaluate on a FASTA file."""
    model = str(tmp_path / "esm")
    assert main(["random-checkpoint", "--family", "esm", "--out", model]) == 0
    assert main(["pair", "MKTAYIAKQRQISFVKSHFSRQ", "--positions", "3", "7", "--model", model, "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "A = 3 (wild type T), B = 7 (wild type A)" in out and "double mutants" in out
    fasta = tmp_path / "proteins.fasta"
    fasta.write_text(">P1\nMKTAYIAKQRQISFVKSHFSRQ\n>P2\nMQIFVKTLTGKTITLEVEPSDT\n>P3\nGSHMLEDPVDAFQLG\n>P4\nMKVLAAG\n")
    assert main(["evaluate", "--model", model, "--data", str(fasta), "--max-sentences", "3", "--out",
                 str(tmp_path / "run"), "--quiet"]) == 0
    records = (tmp_path / "run" / "pairs.jsonl").read_text().splitlines()
    assert [json.loads(r)["id"] for r in records] == ["P1", "P2", "P3"]


# --- quiet on a CPU, fast hub failures ------------------------------------------------------------

QUIET_SCRIPT = """
import os
import numpy as np
import jaxjoint
import jaxjoint.default

mlm = jaxjoint.load_mlm(jaxjoint.default.MODEL_DIR)
ids = np.array(mlm.tokenizer("the river rose after the storm")["input_ids"])
tables = jaxjoint.pair_tables(mlm, ids, 2, 3)
print(os.environ.get("JAX_PLATFORMS"), tables.logits_a.shape[1])
"""


@pytest.mark.slow
def test_a_library_script_prints_nothing_on_stderr(tmp_path):
    """With the plan extra's CUDA plugin and libtpu installed and no JAX_PLATFORMS set,
    the README's library use is silent: the installed jaxjoint-cpu-default.pth starts
    JAX on its CPU where this machine has no accelerator, and leaves it alone where it has."""
    from jaxjoint.cpu_default import has_accelerator

    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "PYTHONPATH")}
    script = tmp_path / "script.py"
    script.write_text(QUIET_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    if has_accelerator():
        assert proc.stdout.split()[0] == "None"  # JAX chooses, and loads its plugins as usual
    else:
        assert proc.stdout.split() == ["cpu", "4096"] and proc.stderr == ""


def test_cpu_default_sets_jax_platforms_only_without_an_accelerator(monkeypatch):
    from jaxjoint import cpu_default

    for present, preset, want in ((False, None, "cpu"), (True, None, None), (False, "", ""), (False, "tpu", "tpu")):
        monkeypatch.setattr(cpu_default, "has_accelerator", lambda present=present: present)
        if preset is None:
            monkeypatch.delenv("JAX_PLATFORMS", raising=False)
        else:
            monkeypatch.setenv("JAX_PLATFORMS", preset)
        cpu_default.apply()
        assert os.environ.get("JAX_PLATFORMS") == want, (present, preset)


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_an_unreachable_hub_fails_at_once_in_one_line_from_every_command(sharp_ckpt, tmp_path):
    port = closed_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": f"http://127.0.0.1:{port}",
           "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE")
    name = "nosuchorg/nosuchmodel"
    commands = {"plan": ["plan", "--target", "h100", "--model", name],
                "pair": ["pair", "the [MASK] sat on the [MASK]", "--model", name],
                "evaluate": ["evaluate", "--model", name, "--out", str(tmp_path / "run")]}
    procs = {c: subprocess.Popen([*CLI, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for c, args in commands.items()}
    for command, p in procs.items():
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 2 and stdout == "", (command, stderr)
        lines = stderr.splitlines()
        assert len(lines) == 1, (command, stderr)  # no "Retrying in 8s" lines
        assert re.match(rf"jaxjoint: error: cannot fetch (the config.json of )?'{name}' from the Hugging Face hub "
                        rf"\(127\.0\.0\.1:{port}: Connection refused; not in the local cache\)", lines[0]), lines[0]
    assert not (tmp_path / "run").exists()


HUB_PROBE = "from jaxjoint.plan.models import planning_config; print(planning_config({name!r})[1].vocab_size)"


@pytest.mark.slow
def test_the_hub_path_downloads_when_reachable_and_reads_the_cache_when_not(tmp_path):
    """A local stand-in for the hub serves one config.json: fetched online, then read
    from the cache once the hub is gone; a name never fetched then fails in one line."""
    import http.server
    import threading

    config = json.dumps({"model_type": "bert", "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 1,
                         "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64}).encode()
    requests = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def _headers(self) -> bool:
            requests.append(self.path)
            found = self.path == "/someorg/tiny/resolve/main/config.json"
            self.send_response(200 if found else 404)
            if found:
                self.send_header("X-Repo-Commit", "0" * 40)
                self.send_header("ETag", '"c0ffee"')
            else:
                self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", str(len(config) if found else 0))
            self.end_headers()
            return found

        def do_HEAD(self):
            self._headers()

        def do_GET(self):
            if self._headers():
                self.wfile.write(config)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": f"http://127.0.0.1:{port}",
           "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE")

    def probe(name):
        return subprocess.run([sys.executable, "-c", HUB_PROBE.format(name=name)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    try:
        online = probe("someorg/tiny")
        assert online.returncode == 0 and online.stdout.strip() == "99", online.stderr
        assert "/someorg/tiny/resolve/main/config.json" in requests
        unknown = probe("someorg/other")
        assert unknown.returncode == 1 and "no model named 'someorg/other'" in unknown.stderr, unknown.stderr
    finally:
        server.shutdown()
        server.server_close()
    cached = probe("someorg/tiny")
    assert cached.returncode == 0 and cached.stdout.strip() == "99", cached.stderr
    gone = probe("someorg/never-fetched")
    assert gone.returncode == 1 and f"127.0.0.1:{port}: Connection refused; not in the local cache" in gone.stderr


def test_jaxjoints_warnings_print_as_one_line():
    """The command prints jaxjoint's own warnings (e.g. AG's CPU kernel falling back to
    XLA's pass) as their one line; other packages' warnings keep Python's format."""
    ours = cli._one_line_warning(RuntimeWarning("jaxjoint: no C++ compiler found"), RuntimeWarning, "x.py", 7, "src")
    assert ours == "jaxjoint: no C++ compiler found\n"
    theirs = cli._one_line_warning(UserWarning("something else"), UserWarning, "x.py", 7, "src")
    assert "x.py:7" in theirs and "something else" in theirs
