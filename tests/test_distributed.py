"""Multi-process evaluation: two CPU processes on localhost against one process.

Every process here is a real ``jaxjoint evaluate`` with two host CPU devices. They
share a persistent compilation cache, so the programs the reference run compiles
are not compiled again by the distributed runs that use the same local mesh.
"""

import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxjoint.cli import main
from tests.process_fixtures import CLI, REPO, WAIT_S, evaluate_args, finish, jaxjoint_lines, process_env, start
from tests.words import WORDS


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sharp_ckpt):
    """(checkpoint, data file, environment of the child processes)."""
    tmp = tmp_path_factory.mktemp("distributed")
    rng = random.Random(1)
    data = tmp / "sentences.txt"
    # 4-10 words: one length bucket, so each mesh compiles one set of programs.
    data.write_text("\n".join(" ".join(rng.choices(WORDS, k=rng.randint(4, 10))) for _ in range(24)) + "\n")
    return sharp_ckpt, data, process_env(tmp / "jax_cache")


def error_line(stderr: str) -> str:
    """The one error line of a process's stderr."""
    lines = jaxjoint_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("jaxjoint: error: "), stderr
    return lines[0]


def records(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "pairs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """One process on two devices: the pairs and summary every distributed run must give."""
    out = tmp_path_factory.mktemp("single") / "run"
    proc = subprocess.run([*CLI, *evaluate_args(setup, out, "--devices", "2")], cwd=REPO, env=setup[2],
                          capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_pairs_mode_writes_what_one_process_writes(setup, reference, tmp_path):
    out = tmp_path / "run"
    for code, stderr in finish(start(setup, out, "pairs")):
        assert code == 0 and not jaxjoint_lines(stderr), stderr
    # Each process scores its pairs on the same two-device mesh as the reference:
    # the same programs, so the same bytes.
    assert (out / "pairs.jsonl").read_text() == (reference / "pairs.jsonl").read_text()
    summary, want = (json.loads((d / "summary.json").read_text()) for d in (out, reference))
    assert {k: v for k, v in summary.items() if k != "config"} == {k: v for k, v in want.items() if k != "config"}
    assert summary["config"]["distributed"] == "pairs"


@pytest.mark.slow
def test_global_mode_matches_one_process(setup, reference, tmp_path):
    # HCB gathers a pivot row across processes and AG all-reduces in its loop; the
    # other methods share their streaming passes. Two methods keep the compile short.
    methods = ("hcb", "ag")
    out = tmp_path / "run"
    extra = ("--methods", ",".join(methods))
    for code, stderr in finish(start(setup, out, "global", extra=(extra, extra))):
        assert code == 0 and not jaxjoint_lines(stderr), stderr
    got, want = records(out), records(reference)
    assert [r["index"] for r in got] == [r["index"] for r in want]
    for g, w in zip(got, want):
        assert {k: g[k] for k in ("text", "input_ids", "positions", "gold")} == {
            k: w[k] for k in ("text", "input_ids", "positions", "gold")}
        assert close(g["mlm_unary_u_nll"], w["mlm_unary_u_nll"])
        assert tuple(g["metrics"]) == methods
        for method in methods:
            assert g["metrics"][method].keys() == w["metrics"][method].keys()
            for key, value in w["metrics"][method].items():
                if key in ("objective", "delta"):
                    # J sums 2V KLs, each good to ~1e-6 in float32: against float64 it is
                    # off by up to 3e-5 relative on these tables, on any device count.
                    # delta, an estimate of the distance from the fixed point, divides
                    # differences of successive iterates: 1.1e-5 relative apart here.
                    assert math.isclose(g["metrics"][method][key], value, rel_tol=1e-4), (g["index"], key)
                else:
                    assert close(g["metrics"][method][key], value), (g["index"], method, key)
    summary, ref = (json.loads((d / "summary.json").read_text()) for d in (out, reference))
    assert summary["n_pairs"] == ref["n_pairs"] and summary["n_skipped"] == ref["n_skipped"]
    assert close(summary["mlm_unary_u_ppl"], ref["mlm_unary_u_ppl"])
    for method in methods:
        for key, value in ref["methods"][method].items():
            assert close(summary["methods"][method][key], value), (method, key)


def close(got: float, want: float) -> bool:
    # The tables are row-sharded over four devices in two processes instead of two
    # devices in one, so float32 sums run in another order. The KL terms are sums of
    # O(1) terms that nearly cancel: their error is about 1e-7 whatever their size.
    return math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6)


# Runs a jaxjoint command in which process FAIL_PROCESS raises on its FAIL_AT-th pair.
FAILING_CLI = """
import os, sys
import jax
import jaxjoint.scoring
from jaxjoint.cli import main

score_tables, calls = jaxjoint.scoring.score_tables, []

def failing(*args, **kwargs):
    calls.append(1)
    if jax.process_index() == int(os.environ["FAIL_PROCESS"]) and len(calls) == int(os.environ["FAIL_AT"]):
        raise RuntimeError("injected failure")
    return score_tables(*args, **kwargs)

jaxjoint.scoring.score_tables = failing
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_failures_stop_the_run_and_restarts_complete_it(setup, tmp_path):
    """An error on one process, then a killed process, then a restart that completes the run."""
    methods = ("--methods", "mlm,ag")  # fewer programs for process 1 to compile
    reference = tmp_path / "single"
    single = subprocess.run([*CLI, *evaluate_args(setup, reference, "--devices", "2", *methods)], cwd=REPO,
                            env=setup[2], capture_output=True, text=True, timeout=WAIT_S)
    assert single.returncode == 0, single.stderr
    want = (reference / "pairs.jsonl").read_text().splitlines(keepends=True)
    out = tmp_path / "run"
    pairs = out / "pairs.jsonl"
    saved = r"; the (\d+) finished pairs are saved in .*pairs\.jsonl: run the same command on every process to resume"

    # Process 0 fails on its second pair, the first of round 2: process 1's pair of that round is kept.
    (tmp_path / "failing_cli.py").write_text(FAILING_CLI)
    env = {**setup[2], "FAIL_PROCESS": "0", "FAIL_AT": "2"}
    for code, stderr in finish(start(setup, out, "pairs", extra=(methods, methods), env=env,
                                     cli=[sys.executable, str(tmp_path / "failing_cli.py")])):
        assert code == 2, stderr
        line = error_line(stderr)
        assert re.fullmatch(f"jaxjoint: error: process 0 on sentence 2 failed: RuntimeError: injected failure{saved}",
                            line), line
    assert pairs.read_text() == "".join(want[i] for i in (0, 1, 3))

    # Process 1 is killed mid-way: process 0 says so, and keeps every complete round.
    procs = start(setup, out, "pairs", extra=(methods, methods))
    deadline = time.monotonic() + WAIT_S
    try:
        while pairs.read_bytes().count(b"\n") < 5:
            assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs]
            assert time.monotonic() < deadline, "no round finished in time"
            time.sleep(0.005)
        os.kill(procs[1].pid, signal.SIGKILL)
    finally:
        (code, stderr), _ = finish(procs, timeout=120)
    # Which process, how many pairs are safe, how to resume; no traceback (Gloo's "Connection
    # closed by peer" surfaces as a ValueError or a JaxRuntimeError, depending on the collective).
    line = error_line(stderr)
    assert code == 2 and re.fullmatch(f"jaxjoint: error: process 1 of 2 stopped answering .*{saved}", line), line
    assert "Traceback" not in stderr, stderr
    kept = pairs.read_text().splitlines(keepends=True)
    assert kept[3:] == want[2:3] + want[4:len(kept)], "not the complete rounds in order"
    assert len(kept) < len(want), "the run was not stopped mid-way"
    assert not (out / "summary.json").exists()

    # A restart completes the run: the same file as one process writes, in sentence order.
    for code, stderr in finish(start(setup, out, "pairs", extra=(methods, methods))):
        assert code == 0, stderr
    assert pairs.read_text() == "".join(want)
    assert json.loads((out / "summary.json").read_text())["methods"] == json.loads(
        (reference / "summary.json").read_text())["methods"]


@pytest.mark.slow
def test_an_error_on_one_process_stops_all_with_one_line(setup, tmp_path):
    """Errors found while loading are exchanged: every process names the one that failed."""
    missing = start(setup, tmp_path / "a", "pairs", extra=((), ("--model", str(tmp_path / "no_model"))))
    other_pairs = start(setup, tmp_path / "b", "pairs", extra=((), ("--seed", "7")))
    (code0, err0), (code1, err1) = finish(missing)
    assert code0 == code1 == 2, (err0, err1)
    assert re.fullmatch(r"jaxjoint: error: process 1 failed: model path .*no_model does not exist",
                        error_line(err0)), err0
    assert re.fullmatch(r"jaxjoint: error: model path .*no_model does not exist", error_line(err1)), err1
    for code, stderr in finish(other_pairs):
        assert code == 2, stderr
        assert re.fullmatch(r"jaxjoint: error: process 1 made other pairs, or has another model or settings, "
                            r"than process 0; .*", error_line(stderr)), stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_sigterm_stops_every_process_and_a_restart_completes_the_run(setup, reference, tmp_path):
    """A preempted job: every process gets SIGTERM (as SLURM and TPU VMs send it)."""
    out = tmp_path / "run"
    pairs = out / "pairs.jsonl"
    procs = start(setup, out, "pairs")
    deadline = time.monotonic() + WAIT_S
    try:
        while not (pairs.exists() and pairs.read_bytes().count(b"\n") >= 2):
            assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs]
            assert time.monotonic() < deadline, "no round finished in time"
            time.sleep(0.005)
        for p in procs:
            p.send_signal(signal.SIGTERM)
    finally:
        results = finish(procs, timeout=120)
    done = len(records(out))
    resume = "; run the same command on every process to resume"
    for k, (code, stderr) in enumerate(results):
        assert code == 143, stderr
        saved = f"{done} finished pairs are saved" if k == 0 else "process 0 keeps the finished pairs"
        assert jaxjoint_lines(stderr)[-1] == f"jaxjoint: terminated (SIGTERM); {saved} in {pairs}{resume}", stderr
    assert 2 <= done < 24 and not (out / "summary.json").exists()
    for code, stderr in finish(start(setup, out, "pairs")):
        assert code == 0, stderr
    assert records(out) == records(reference)


FULL_DISK_CLI = """
import resource, sys
from jaxjoint.cli import main

if sys.argv[sys.argv.index("--process-id") + 1] == "0":
    limit = int(sys.argv.pop(1))  # a file this process writes cannot grow past it (EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
else:
    sys.argv.pop(1)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_write_failure_on_process_0_stops_every_process(setup, reference, tmp_path):
    """Only process 0 writes, so only it sees the disk fill: all stop at once, nothing lost."""
    out = tmp_path / "run"
    want = records(reference)
    three = sum(len(line) + 1 for line in (reference / "pairs.jsonl").read_text().splitlines()[:3])
    (tmp_path / "full_disk_cli.py").write_text(FULL_DISK_CLI)
    start_s = time.monotonic()
    results = finish(start(setup, out, "pairs", cli=[sys.executable, str(tmp_path / "full_disk_cli.py"),
                                                     str(three + 10)]), timeout=120)
    assert time.monotonic() - start_s < 90, "a process waited for the runtime's timeout"
    (code0, err0), (code1, err1) = results
    assert code0 == 2 and re.fullmatch(r"jaxjoint: error: cannot write .*pairs\.jsonl \(File too large\); "
                                       r"3 finished pairs are safe in .*", error_line(err0)), err0
    assert code1 == 2 and re.fullmatch(r"jaxjoint: error: process 0 failed: cannot write .*pairs\.jsonl "
                                       r"\(File too large\); .*", error_line(err1)), err1
    assert records(out) == want[:3] and not (out / "summary.json").exists()
    for code, stderr in finish(start(setup, out, "pairs")):
        assert code == 0, stderr
    assert records(out) == want


@pytest.mark.parametrize("extra,message", [
    (["--coordinator", "localhost:1234"], r"--coordinator, --num-processes and --process-id need --distributed"),
    (["--distributed", "pairs", "--coordinator", "localhost:1234"], r"give --coordinator HOST:PORT, "
     r"--num-processes N and --process-id K together"),
    (["--distributed", "pairs", "--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
     r"--coordinator must be HOST:PORT, got 'localhost'"),
    (["--distributed", "pairs", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     r"--process-id must be in \[0, 2\), got 2"),
    (["--distributed", "all"], r"unknown --distributed value 'all'; choose one of none, pairs, global"),
])
def test_launch_errors(setup, tmp_path, capsys, extra, message):
    assert main([*evaluate_args(setup, tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_coordinator_port_in_use(setup, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--distributed", "pairs", "--coordinator", f"localhost:{port}", "--num-processes", "2",
                "--process-id", "0"]
        assert main([*evaluate_args(setup, tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"process 0 cannot listen on port {port} (Address already in use)" in err, err
    assert not (tmp_path / "out").exists()


def test_lost_processes_are_those_that_do_not_note_themselves(monkeypatch):
    """Survivors of a broken exchange note themselves in the coordinator's store; the
    processes missing there are named. An unreachable store means process 0 is gone."""
    from jax._src import distributed as runtime

    from jaxjoint.run import distributed

    class Store:
        def __init__(self, others):
            self.keys = {f"{distributed.SURVIVORS}{k}": "1" for k in others}

        def key_value_set(self, key, value):
            self.keys[key] = value

        def key_value_dir_get(self, prefix):
            return [(k, v) for k, v in self.keys.items() if k.startswith(prefix)]

    class Gone:
        def key_value_set(self, key, value):
            raise RuntimeError("UNAVAILABLE: failed to connect")

    monkeypatch.setattr(distributed, "SURVIVOR_WAIT_S", 0.0)
    monkeypatch.setattr(runtime.global_state, "client", Store(others=[0, 3]))
    assert distributed._lost_processes(2, 4) == [1]
    monkeypatch.setattr(runtime.global_state, "client", Store(others=[]))
    assert distributed._lost_processes(0, 3) == [1, 2]
    monkeypatch.setattr(runtime.global_state, "client", Gone())
    assert distributed._lost_processes(2, 4) == [0]
    with pytest.raises(distributed.ProcessFailure, match=r"^process 0 of 4 stopped answering \(a lost host"):
        with distributed._lost_contact(2, 4):
            raise ValueError("UNKNOWN: Gloo AllGather failed: Connection closed by peer")
