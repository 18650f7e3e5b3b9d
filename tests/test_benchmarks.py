"""The benchmarks run from the repository and report every field they promise.

Nothing here checks a time: the numbers are whatever this machine gives.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("mlm", "mrf", "mrf_logit", "hcb", "ag")


@pytest.mark.slow
def test_end_to_end_json_has_every_field(tmp_path):
    out = tmp_path / "e2e.json"
    # Optimised, as a user runs it: most of its time runs the V = 4096 tables (56 -> 50 s of CPU).
    env = {k: v for k, v in os.environ.items() if k != "JAX_DISABLE_MOST_OPTIMIZATIONS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.end_to_end", "--shape", "default", "--length", "16",
         "--repeats", "1", "--ag-iters", "5", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"backend", "device", "device_count", "cpu", "jax", "flax", "date"} <= set(report["machine"])
    assert report["matmul_peak_flop_per_s"]["float32"] > 0 and report["bandwidth_bytes_per_s"] > 0
    (row,) = report["results"]
    assert row["shape"] == "default" and row["V"] == 4096 and row["devices"] == 2
    per_stage = ["s_tables", *[f"s_joint_{m}" for m in METHODS], "s_metrics"]
    for key in per_stage + ["s_total", "pairs_per_s", "flops_per_pair", "tables_flop_per_s",
                            "fraction_of_peak", "ag_bytes_per_s", "ag_fraction_of_bandwidth",
                            "baseline_s_tables", "baseline_s_joints", "baseline_s_metrics",
                            "baseline_s_total", "speedup_vs_baseline"]:
        assert row[key] > 0, key
    assert abs(row["s_total"] - sum(row[k] for k in per_stage)) < 1e-9
    assert abs(row["speedup_vs_baseline"] - row["baseline_s_total"] / row["s_total"]) < 1e-9
    assert "speedup_vs_baseline" in run.stdout


@pytest.fixture(scope="module")
def tiny_word_ckpt(tmp_path_factory):
    """A tiny random BERT (hidden 32, V = 512) whose WordPiece tokenizer holds the embedded
    model's first words and pieces: the default sentences split into 17 to 47 tokens,
    several length buckets under either rule, at a fraction of the embedded model's cost."""
    from jaxjoint.tools.random_checkpoint import random_checkpoint, small_hf_config

    return random_checkpoint(tmp_path_factory.mktemp("tiny_words"),
                             small_hf_config("bert", vocab_size=512, max_positions=128))


@pytest.mark.slow
def test_buckets_benchmark_compares_both_rules_on_both_mixes(tmp_path, tiny_word_ckpt):
    out = tmp_path / "buckets.json"
    # As a user starts it: JAX chooses the platforms (conftest pins the CPU for this process).
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    # The plumbing, on a tiny model (the embedded one's V = 4096 tables took 250 s here).
    run = subprocess.run([sys.executable, "-m", "benchmarks.buckets", "--model", str(tiny_word_ckpt), "--sentences",
                          "3", "--repeats", "1", "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr  # the installed CUDA plugin and libtpu are not probed
    report = json.loads(out.read_text())
    assert report["model"] == str(tiny_word_ckpt)
    rows = {(r["mix"], r["rule"]): r for r in report["results"]}
    assert set(rows) == {(mix, rule) for mix in ("snli-like", "xsum-like")
                         for rule in ("multiples of 8", "powers of two")}
    for mix in ("snli-like", "xsum-like"):
        new, old = rows[mix, "multiples of 8"], rows[mix, "powers of two"]
        assert new["pairs"] == old["pairs"] == 3 and new["mean_tokens"] == old["mean_tokens"]
        assert all(b % 8 == 0 for b in new["buckets"]) and new["max_padding"] < 8
        assert new["mean_padding"] <= old["mean_padding"]
        assert new["tables_flops_per_pair"] <= old["tables_flops_per_pair"]
        assert old["tables_speedup"] == 1 and old["main_job_speedup"] == 1
        for key in ("tables_s_per_pair", "main_job_s", "tables_speedup", "main_job_speedup"):
            assert new[key] > 0, key


@pytest.mark.slow
def test_run_gpu_script_runs_every_step_at_tiny_shapes(tmp_path):
    """benchmarks/run_gpu.sh as a GPU lease runs it, on this CPU at tiny shapes: every
    step finishes and writes what it promises, at most 8 files, with no `datasets`
    importable (the GPU image has none)."""
    stub = tmp_path / "stub" / "datasets"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('datasets is not installed on the GPU machine')\n")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as on one GPU
    # a shared 2-core host compiles slower than a GPU host runs: roomier limits
    env.update(PYTHON=sys.executable, OUT=str(out), JAXJOINT_GPU_SMOKE="1", JAXJOINT_GPU_BUDGET_S="3000",
               JAXJOINT_GPU_STEP_SCALE="8",
               PYTHONPATH=os.pathsep.join([str(stub.parent), env.get("PYTHONPATH", "")]))
    run = subprocess.run(["bash", "benchmarks/run_gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=3100)
    log = (out / "log.txt").read_text()
    assert run.returncode == 0, log[-4000:]
    assert "every step passed" in run.stdout and "SKIPPED" not in log
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["ag_iteration.json", "end_to_end.json", "log.txt", "machine.txt", "modes.json", "parity.json"]
    assert "jax" in (out / "machine.txt").read_text()
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["platform"] == "cpu"
    assert {(r["family"], r["dtype"], r["matmul_precision"]) for r in parity["results"]} == {
        ("bert", d, m) for d, m in
        (("float32", "float32"), ("float32", "tensorfloat32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16"))}
    for r in parity["results"]:
        assert (r["rel_err_vs_torch"] < 1e-4) == (r["matmul_precision"] == "float32"), r
    modes = json.loads((out / "modes.json").read_text())["results"]
    assert [(r["dtype"], r["matmul_precision"], r["arithmetic"]) for r in modes] == [
        ("float32", "float32", "f32"), ("float32", "tensorfloat32", "tf32"), ("float32", "bfloat16", "bf16"),
        ("bfloat16", "bfloat16", "bf16")]
    for r in modes:
        assert r["seconds_per_pair"] > 0 and r["matmul_flop_per_s"] > 0 and r["shape"] == "default"
    (e2e,) = [json.loads((out / "end_to_end.json").read_text())]
    assert {r["dtype"] for r in e2e["results"]} == {"float32", "bfloat16"}
    assert all(r["s_total"] > 0 for r in e2e["results"])
    ag = json.loads((out / "ag_iteration.json").read_text())
    assert ag["results"]


BENCHMARK_MODULES = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", BENCHMARK_MODULES)
def test_every_benchmark_module_imports(module):
    """Every module under benchmarks/ imports (a renamed jaxjoint name fails here, not on the GPU)."""
    importlib.import_module(f"benchmarks.{module}")


@pytest.mark.slow
def test_ag_iteration_benchmark_runs_on_tiny_tables(tmp_path):
    out = tmp_path / "ag.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.ag_iteration", "--vocab", "64", "--extra", "2",
                          "--repeats", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["vocab"] == 64 and report["copy_bandwidth_bytes_per_s"] > 0
    assert {r["implementation"] for r in report["results"]} >= {"jaxjoint (streaming, one table)"}
    assert report["max_abs_difference"]["dense_log"] < 1e-4
    # one pass by the compiled kernel, against XLA's pass at the same marginals (row and column logsumexps)
    assert report["pass"]["s_per_pass"] > 0 and report["pass"]["xla_s_per_pass"] > 0
    assert report["pass"]["max_abs_lse_difference"] < 1e-4


@pytest.mark.slow
def test_ag_pass_bytes_benchmark_compiles_a_tiny_pass(tmp_path):
    out = tmp_path / "bytes.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.ag_pass_bytes", "--targets", "v5e:2x2", "--vocab", "512",
                          "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["target"] == "v5e:2x2" and row["devices"] == 4 and row["one_read_bytes"] == 4 * 128 * 512
    assert row["ratio"] >= 1


@pytest.mark.slow
def test_tables_throughput_benchmark_runs_on_tiny_shapes(tmp_path):
    out = tmp_path / "tables.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.tables_throughput", "--shape", "default", "--length",
                          "16", "--rows", "8", "--chunk", "8", "--json", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(out.read_text())["results"]


@pytest.mark.slow
def test_ag_methods_benchmark_runs_on_a_tiny_corner(tmp_path):
    out = tmp_path / "methods.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.ag_methods", "--pairs", "1", "--corner", "64",
                          "--cap", "20", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert {r["solver"] for r in rows} >= {"plain", "squarem", "anderson m=8, sqrt(p)", "newton-cg"}
    assert all(r["seconds"] > 0 for r in rows)


@pytest.mark.slow
def test_ag_solvers_benchmark_scores_evaluates_pairs_as_derive_joint_does(tmp_path, tiny_word_ckpt):
    """benchmarks.ag_solvers on a tiny random BERT: evaluate's pairs and its 40-iteration
    AG numbers, each (solver, tol) run's passes as ``derive_joint`` gives them on the same
    tables, and summary counts that follow from the rows."""
    from jaxjoint import derive_joint, load_mlm
    from jaxjoint.config import resolve_config
    from jaxjoint.run import evaluate
    from jaxjoint.sharding import local_mesh
    from jaxjoint.tables import iter_pair_tables

    out = tmp_path / "solvers.json"
    tols = (1e-3, 1e-5)
    run = subprocess.run([sys.executable, "-m", "benchmarks.ag_solvers", "--model", str(tiny_word_ckpt),
                          "--max-sentences", "2", "--plain-max-sentences", "1", "--tols", ",".join(map(str, tols)),
                          "--max-iters", "300", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    runs = [(r["pair"], r["solver"], r["tol"]) for r in rows]
    assert runs == [(0, "paper (40 iterations)", None), *((0, s, t) for s in ("plain", "accelerated") for t in tols),
                    (1, "paper (40 iterations)", None), *((1, "accelerated", t) for t in tols)]

    # The pairs and 40-iteration AG of `jaxjoint evaluate` on the same model and sentences.
    config = resolve_config({"model": str(tiny_word_ckpt), "max_sentences": 2, "methods": "ag",
                             "out": str(tmp_path / "run")})
    evaluate(config, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "pairs.jsonl").read_text().splitlines()]
    papers = [r for r in rows if r["tol"] is None]
    assert [(r["sentence"], r["positions"]) for r in papers] == [(r["index"], r["positions"]) for r in records]
    for row, record in zip(papers, records):
        ag = record["metrics"]["ag"]
        assert row["iters"] == ag["iters"] == 40 and row["map_passes"] == 40 and row["converged"] is None
        for key in ("p_nll", "u_nll", "kl_gold", "kl_all", "objective"):
            assert row[key] == pytest.approx(ag[key], rel=1e-5, abs=1e-7), key

    # Each run to a tol as derive_joint gives it, on the pair's tables built as evaluate builds them.
    mlm, mesh = load_mlm(str(tiny_word_ckpt)), local_mesh()
    stream = iter_pair_tables(mlm, [(r["input_ids"], *r["positions"]) for r in records], mesh=mesh, prefetch=0)
    for record, tables in zip(records, stream):
        for row in (r for r in rows if r["sentence"] == record["index"] and r["tol"] is not None):
            info = derive_joint(tables, "ag", mesh=mesh, tol=row["tol"], solver=row["solver"], max_iters=300).info
            assert (row["iters"], row["map_passes"]) == (info["iters"], info["map_passes"]), row
            assert row["delta"] == pytest.approx(info["delta"], rel=1e-5)
            assert row["converged"] == (row["delta"] < row["tol"]) and row["iters"] <= 300

    summary = report["summary"]
    for entry in summary["runs"]:
        mine = [r for r in rows if (r["solver"], r["tol"]) == (entry["solver"], entry["tol"])]
        assert entry["pairs"] == len(mine) and entry["iters_max"] == max(r["iters"] for r in mine)
        assert entry["converged"] == (None if entry["tol"] is None else sum(r["delta"] < r["tol"] for r in mine))
    assert [(e["tol"], e["pairs"]) for e in summary["plain_vs_accelerated"]] == [(t, 1) for t in tols]
    # The fixed point of a pair: its tightest converged accelerated run.
    for paper in papers:
        converged = [r["tol"] for r in rows if r["pair"] == paper["pair"] and r["solver"] == "accelerated"
                     and r["converged"]]
        if converged:
            assert paper["reference"] == f"accelerated tol={min(converged):g}"
    kl_all = next(c for c in summary["change_40_vs_fixed_point"] if c["metric"] == "kl_all")
    assert kl_all["max_abs"] > 0 and kl_all["max_abs"] >= abs(kl_all["mean_change"])
