"""Helpers for tests that run ``jaxjoint evaluate`` in child processes, two of them
forming one distributed run (test_distributed.py, test_proteins.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "jaxjoint.cli"]
WAIT_S = 300  # bound on any one run, so that a hang fails the test instead of stalling CI


def process_env(jax_cache: Path) -> dict[str, str]:
    """The environment of a child process: two host CPU devices, offline, and a
    persistent compilation cache in ``jax_cache`` shared by the processes of a test."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",  # replaces the 8 devices of conftest
        "JAX_PLATFORMS": "cpu",
        "HF_HUB_OFFLINE": "1",
        "JAX_COMPILATION_CACHE_DIR": str(jax_cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def evaluate_args(setup, out, *extra):
    ckpt, data, _ = setup
    return ["evaluate", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--ag-iters", "5",
            "--quiet", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(setup, out, mode, *, extra=((), ()), env=None, cli=CLI):
    """Two processes of one run; ``extra[k]``: more arguments for process k."""
    port = free_port()
    return [
        subprocess.Popen(
            [*cli, *evaluate_args(setup, out, "--distributed", mode, "--coordinator", f"localhost:{port}",
                                  "--num-processes", "2", "--process-id", str(k), *extra[k])],
            cwd=REPO, env=setup[2] if env is None else env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        for k in range(2)
    ]


def finish(procs, timeout=WAIT_S):
    """[(exit status, stderr)] of each process; kills all of them past ``timeout``."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"a distributed run took more than {timeout} s: " + " | ".join(p.stderr.read() for p in procs))
    finally:
        for p in procs:
            p.stdout.close()
    results = [(p.returncode, p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    return results


def jaxjoint_lines(stderr: str) -> list[str]:
    """Our lines of a process's stderr (Gloo and XLA log their own lines there too)."""
    return [line for line in stderr.splitlines() if line.startswith("jaxjoint")]
