"""Runs that cannot corrupt each other: one run per directory, repeated records,
a full disk, SIGTERM. Every run here scores the ``mlm`` joint only: the run
directory's behaviour does not depend on the method."""

import builtins
import errno
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxjoint import scoring
from jaxjoint.cli import main
from jaxjoint.run import rundir

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "jaxjoint.cli"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def run_args(ckpt, data, out, *extra):
    return ["evaluate", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--devices", "1",
            "--methods", "mlm", "--quiet", *extra]


def lines(out) -> list[str]:
    return (Path(out) / "pairs.jsonl").read_text().splitlines()


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxjoint: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def clean_run(sharp_ckpt, sentences, tmp_path_factory):
    """An uninterrupted run of the first 5 sentences: what every stopped run must end as."""
    out = tmp_path_factory.mktemp("clean") / "run"
    assert main(run_args(sharp_ckpt, sentences, out, "--max-sentences", "5")) == 0
    return out


def wait_for_pairs(proc, pairs: Path, n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not (pairs.exists() and pairs.read_bytes().count(b"\n") >= n):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"fewer than {n} pairs after {timeout} s"
        time.sleep(0.01)


# --- one run per directory ------------------------------------------------------------------


def test_a_directory_held_by_a_live_process_is_refused(sharp_ckpt, sentences, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom jaxjoint.run.rundir import RunDir\n"
         "lock = RunDir(sys.argv[1]).lock()\nprint('locked', flush=True)\ntime.sleep(120)", str(out)],
        env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(run_args(sharp_ckpt, sentences, out, "--max-sentences", "2")) == 2
        line = error_line(capsys)
        assert f"{out} is in use by another jaxjoint run (host {socket.gethostname()}, pid {holder.pid})" in line
        assert sorted(p.name for p in out.iterdir()) == [rundir.LOCK_FILE]  # nothing of this run written
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    # The operating system dropped the dead holder's lock: no stale lock to clear.
    assert main(run_args(sharp_ckpt, sentences, out, "--max-sentences", "2")) == 0
    assert len(lines(out)) == 2


def test_a_filesystem_without_locks_runs_with_a_warning(sharp_ckpt, sentences, tmp_path, capsys, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    out = tmp_path / "run"
    assert main(run_args(sharp_ckpt, sentences, out, "--max-sentences", "2")) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("jaxjoint")]
    assert warning == [f"jaxjoint: warning: cannot lock {out / rundir.LOCK_FILE} ({os.strerror(errno.ENOLCK)}); "
                       "nothing stops a second run on this --out meanwhile"]
    assert len(lines(out)) == 2


def test_a_directory_with_a_foreign_config_yaml_is_refused(sharp_ckpt, sentences, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("- a list, not a run's settings\n")
    assert main(run_args(sharp_ckpt, sentences, out, "--max-sentences", "2")) == 2
    assert error_line(capsys) == f"jaxjoint: error: {out / 'config.yaml'} is not a jaxjoint run's config; " \
                                 "choose a new --out directory"


def test_bad_input_leaves_no_directory_behind(sharp_ckpt, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert main(run_args(sharp_ckpt, tmp_path / "missing.txt", out)) == 2
    assert "does not exist" in error_line(capsys)
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_finishes(sharp_ckpt, sentences, tmp_path, capsys):
    out = tmp_path / "run"
    args = run_args(sharp_ckpt, sentences, out, "--max-sentences", "40")
    first = subprocess.Popen([*CLI, *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_pairs(first, out / "pairs.jsonl", 1)
    assert main(args) == 2
    assert f"is in use by another jaxjoint run (host {socket.gethostname()}, pid {first.pid})" in error_line(capsys)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    first.stderr.close()
    indices = [json.loads(line)["index"] for line in lines(out)]
    assert indices == list(range(40))  # every pair once, in order


# --- records written twice ---------------------------------------------------------------------


def test_repeated_records_are_kept_once(sharp_ckpt, sentences, clean_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(clean_run, out)
    clean = lines(clean_run)
    # A double-submitted job before the lock existed: sentences 0 and 1 twice.
    (out / "pairs.jsonl").write_text("\n".join(clean[:3] + clean[:2] + clean[3:4]) + "\n")
    (out / "summary.json").unlink()
    assert main(run_args(sharp_ckpt, sentences, out, "--max-sentences", "5")) == 0
    assert "recorded 2 sentence(s) twice; kept each once" in capsys.readouterr().err
    assert lines(out) == clean
    assert json.loads((out / "summary.json").read_text())["methods"] == json.loads(
        (clean_run / "summary.json").read_text())["methods"]


# --- a full disk ---------------------------------------------------------------------------------


class FullDisk:
    """The disk under ``rundir`` fills up: writes to files named ``name*`` fail with
    ENOSPC once ``budget`` bytes are written, after writing what fits, as a full disk
    does. Stands in for ``rundir``'s ``open`` (buffered files) and ``os`` (raw writes)."""

    def __init__(self, name: str, budget: int):
        self.name, self.left, self.fds = name, budget, set()

    def ours(self, path) -> bool:
        return Path(path).name.startswith(self.name)

    def open(self, path, mode="r", *args, encoding=None, **kwargs):
        if "r" in mode or not self.ours(path):
            return builtins.open(path, mode, *args, encoding=encoding, **kwargs)
        buffered = io.BufferedWriter(_LimitedRaw(path, mode.replace("b", "").replace("t", ""), self))
        return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding=encoding or "utf-8")

    def take(self, data) -> int:
        """How many of ``data``'s bytes fit; ENOSPC (after they are written) when not all do."""
        fits = min(len(data), self.left)
        self.left -= fits
        return fits


class _Os:
    """``os`` for ``rundir`` with ``open``/``write`` going through a ``FullDisk``."""

    def __init__(self, disk: FullDisk):
        self._disk = disk

    def open(self, path, flags, mode=0o777):
        fd = os.open(path, flags, mode)
        if self._disk.ours(path):
            self._disk.fds.add(fd)
        return fd

    def write(self, fd, data):
        if fd not in self._disk.fds:
            return os.write(fd, data)
        fits = self._disk.take(data)
        if fits < len(data):
            os.write(fd, bytes(data[:fits]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)

    def __getattr__(self, name):
        return getattr(os, name)


class _LimitedRaw(io.FileIO):
    """A raw file on the full disk: what a buffered file above it sees of a real one
    (bytes that did not fit stay in its buffer, as they do on a real disk)."""

    def __init__(self, path, mode: str, disk: FullDisk):
        super().__init__(path, mode)
        self._disk = disk

    def write(self, data):
        fits = self._disk.take(data)
        if fits < len(data):
            if fits:
                super().write(bytes(data)[:fits])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


@pytest.mark.parametrize("full_at", ["pairs.jsonl", "summary.md"])
def test_a_full_disk_ends_the_run_with_one_line_and_loses_nothing(
        sharp_ckpt, sentences, clean_run, tmp_path, capsys, monkeypatch, full_at):
    out = tmp_path / "run"
    clean = lines(clean_run)
    # pairs.jsonl: room for two records and part of the third. summary.md: none at all.
    budget = len(clean[0]) + len(clean[1]) + 2 + 40 if full_at == "pairs.jsonl" else 0
    disk = FullDisk(full_at, budget)
    monkeypatch.setattr(rundir, "open", disk.open, raising=False)
    monkeypatch.setattr(rundir, "os", _Os(disk))
    assert main(run_args(sharp_ckpt, sentences, out, "--max-sentences", "5")) == 2
    saved = 2 if full_at == "pairs.jsonl" else 5
    line = error_line(capsys)
    assert f"({os.strerror(errno.ENOSPC)}); {saved} finished pairs are safe in {out / 'pairs.jsonl'}" in line
    assert "run the same command again to resume" in line
    # Whole records only: the part of the third that fitted was cut off again.
    assert (out / "pairs.jsonl").read_text() == "".join(line + "\n" for line in clean[:saved])
    assert not any((out / name).exists() for name in rundir.SUMMARY_FILES)  # no summary, not even a part
    assert not list(out.glob("*.tmp"))
    monkeypatch.undo()
    # Resumed elsewhere (the directory copied to a disk with room), nothing is lost or repeated.
    moved = tmp_path / "elsewhere"
    shutil.copytree(out, moved)
    assert main(run_args(sharp_ckpt, sentences, moved, "--max-sentences", "5")) == 0
    assert lines(moved) == clean


# --- SIGTERM -----------------------------------------------------------------------------------


def test_sigterm_stops_a_run_as_ctrl_c_does(sharp_ckpt, sentences, clean_run, tmp_path, capsys, monkeypatch):
    real, calls = scoring.score_tables, []

    def terminated_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as a preempted VM or SLURM does
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "score_tables", terminated_at_third)
    out = tmp_path / "run"
    assert main(run_args(sharp_ckpt, sentences, out, "--max-sentences", "5")) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"jaxjoint: terminated (SIGTERM); 2 finished pairs are saved in {out}/pairs.jsonl; "
                       "run the same command again to resume")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the run's only
    monkeypatch.setattr(scoring, "score_tables", real)
    assert main(run_args(sharp_ckpt, sentences, out, "--max-sentences", "5")) == 0
    assert lines(out) == lines(clean_run)


@pytest.mark.slow
def test_sigterm_to_a_running_process(sharp_ckpt, sentences, tmp_path):
    out = tmp_path / "run"
    args = run_args(sharp_ckpt, sentences, out, "--max-sentences", "40")
    proc = subprocess.Popen([*CLI, *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_pairs(proc, out / "pairs.jsonl", 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    last = proc.stderr.read().strip().splitlines()[-1]
    proc.stderr.close()
    done = len(lines(out))
    assert last == (f"jaxjoint: terminated (SIGTERM); {done} finished pairs are saved in {out}/pairs.jsonl; "
                    "run the same command again to resume")
    assert 2 <= done < 40
    assert main(args) == 0
    assert [json.loads(line)["index"] for line in lines(out)] == list(range(40))
