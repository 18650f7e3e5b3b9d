"""The run directory: what an evaluation writes, how it is resumed, and what it refuses.

A directory holds:

- ``config.yaml``: the resolved config (also usable as ``--config``), written first;
- ``pairs.jsonl``: one line per finished pair, appended, flushed and fsynced as
  soon as the pair is done, so a killed run loses at most the pair in flight; in
  sentence order once the run is complete;
- ``summary.json``, ``summary.md``, ``summary.csv``: written when all pairs are done
  (``reports``);
- ``.jaxjoint.lock``: locked (``flock``) by the run using the directory, and naming
  its host and pid. The operating system drops the lock when that process ends,
  however it ends, so a killed run never leaves a stale lock behind.

Running again with the same directory resumes: finished pairs are kept, a torn
last line (a kill during the write) is dropped and that pair recomputed, a
sentence recorded twice is kept once, and a run whose config differs in a setting
that changes the records (``config.result_settings``) is refused. Every file but
``pairs.jsonl`` is replaced atomically, so a kill leaves the old or the new file,
never half. A failed write (a full disk, a quota, an I/O error, a read-only
remount) ends the run with one line; the finished pairs stay valid.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from jaxjoint.config import EvalConfig, result_settings
from jaxjoint.errors import UserError

CONFIG_FILE = "config.yaml"
PAIRS_FILE = "pairs.jsonl"
SUMMARY_FILES = ("summary.json", "summary.md", "summary.csv")
LOCK_FILE = ".jaxjoint.lock"
_RECORD_KEYS = {"index", "text", "input_ids", "positions", "gold", "metrics", "mlm_unary_u_nll"}

Record = dict[str, Any]


def read_pairs(path: Path) -> tuple[list[Record], int]:
    """The complete records of a ``pairs.jsonl`` and the byte length they span.

    A last line without its newline is a write cut short by a kill: it is not
    returned, and the caller truncates the file to the returned length.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror}); the finished pairs there are not lost: "
                        "fix the disk and run the same command again") from None
    end = data.rfind(b"\n") + 1
    records = []
    for number, line in enumerate(data[:end].splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not _RECORD_KEYS <= set(record):
            raise UserError(f"{path}:{number} is not a jaxjoint pair record; move the file away to start over")
        records.append(record)
    return records, end


def count_pairs(out: str | Path) -> int:
    """How many finished pairs ``out/pairs.jsonl`` holds (0 when there is none)."""
    return len(read_pairs(Path(out) / PAIRS_FILE)[0])


def write_atomic(path: Path, text: str | bytes) -> None:
    """Replace ``path`` by ``text`` (or bytes) so that a kill leaves the old or the new file, never half."""
    write_all_atomic({path: text})


def write_all_atomic(files: dict[Path, str | bytes]) -> None:
    """Replace each file by its text: every new file is written and fsynced beside
    its target first, then each is renamed over it (a rename needs no space), so a
    full disk leaves every old file as it was. ``OSError`` on failure, with the
    temporary files removed. (A kill between two renames can leave one new file
    beside an old one; each is whole.)"""
    written = []
    try:
        for path, text in files.items():
            tmp = path.with_name(path.name + ".tmp")
            written.append(tmp)
            with (open(tmp, "wb") if isinstance(text, bytes) else open(tmp, "w", encoding="utf-8")) as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for tmp in written:
            tmp.unlink(missing_ok=True)
        raise
    for path, tmp in zip(files, written):
        os.replace(tmp, path)


def _unique(records: list[Record]) -> list[Record]:
    """``records`` with each sentence index kept once, at its first line."""
    first: dict[int, Record] = {}
    for record in records:
        first.setdefault(record["index"], record)
    return list(first.values())


class PairWriter:
    """Appends records to ``pairs.jsonl``, each one durable before the next pair starts.

    failure: turns an ``OSError`` into the run's one-line error (``RunDir.write_failure``).
    """

    def __init__(self, path: Path, failure: Callable[[OSError, Path], UserError]):
        self.path, self._failure = path, failure
        _, self._end = read_pairs(path)
        # Unbuffered: a failed write leaves no bytes in a buffer that a later flush
        # would append after the cut.
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if os.fstat(self._fd).st_size != self._end:  # a torn last line
            self._truncate()

    def append(self, record: Record) -> None:
        """Write one record and fsync it. When the write fails the file is cut back to
        its last whole record, as far as the disk allows, and ``UserError`` says so."""
        data = memoryview((json.dumps(record) + "\n").encode("utf-8"))
        try:
            while data:
                data = data[os.write(self._fd, data):]
            os.fsync(self._fd)
        except OSError as err:
            self._truncate()
            raise self._failure(err, self.path) from None
        self._end = os.fstat(self._fd).st_size

    def _truncate(self) -> None:
        try:
            os.ftruncate(self._fd, self._end)
            os.fsync(self._fd)
        except OSError:
            pass  # a torn last line is dropped when the run resumes

    def close(self) -> None:
        os.close(self._fd)


class RunLock:
    """This process's lock on a run directory (``RunDir.lock``)."""

    def __init__(self, fd: int, path: Path, created: list[Path]):
        self._fd, self._path, self._created = fd, path, created

    def release(self) -> None:
        """Drop the lock. When acquiring it created the directory and nothing else
        was written there since, remove the lock file and the directories again, so
        that a run stopped by bad input leaves nothing behind."""
        try:
            if self._created and [p.name for p in self._path.parent.iterdir()] == [LOCK_FILE]:
                self._path.unlink()
                for directory in reversed(self._created):
                    directory.rmdir()
        except OSError:
            pass
        finally:
            os.close(self._fd)


class RunDir:
    """The output directory ``path`` of one evaluation run."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.pairs_path = self.path / PAIRS_FILE
        self._duplicates = 0

    def lock(self) -> RunLock:
        """Take the directory for this run, creating it if needed; ``UserError`` naming
        the holder (host, pid) when another live run has it. Hold it for the whole run."""
        self._check_writable()
        created = [p for p in (self.path, *self.path.parents) if not p.exists()][::-1]
        path = self.path / LOCK_FILE
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"cannot create {path} ({err.strerror}); give another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            for _ in range(20):  # the holder writes its host and pid just after it locks
                holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
                if holder:
                    break
                time.sleep(0.025)
            holder = holder or "a process that just started"
            os.close(fd)
            raise UserError(f"{self.path} is in use by another jaxjoint run ({holder}); wait for it to finish, "
                            "or give another --out") from None
        except OSError as err:  # a filesystem without locks (some NFS and Lustre mounts): run, but say so
            print(f"jaxjoint: warning: cannot lock {path} ({err.strerror}); nothing stops a second run on this "
                  "--out meanwhile", file=sys.stderr)
        lock = RunLock(fd, path, created)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode(), 0)
        except OSError as err:
            lock.release()
            raise UserError(f"cannot write {path} ({err.strerror}); free space or give another --out") from None
        return lock

    def finished_records(self, config: EvalConfig) -> list[Record]:
        """The finished records here, each sentence once, after checking that the
        directory can hold this run's results and belongs to no other run. Writes nothing."""
        self._check_writable()
        stored_path = self.path / CONFIG_FILE
        if not stored_path.is_file():
            ours = [n for n in (PAIRS_FILE, *SUMMARY_FILES) if (self.path / n).exists()]
            if ours:
                raise UserError(f"{self.path} holds {ours[0]} but no {CONFIG_FILE}; choose a new --out directory")
            return []
        try:
            stored = yaml.safe_load(stored_path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise UserError(f"cannot read {stored_path} ({type(err).__name__}); "
                            "choose a new --out directory") from None
        if not isinstance(stored, dict):
            raise UserError(f"{stored_path} is not a jaxjoint run's config; choose a new --out directory")
        theirs, ours = result_settings(stored), result_settings(config.to_dict())
        changed = [k for k in (*ours, *theirs) if theirs.get(k) != ours.get(k)]
        if changed:
            k = changed[0]
            raise UserError(
                f"{self.path} holds a run with another config ({k}: {theirs.get(k)!r} there, {ours.get(k)!r} now); "
                "use a new --out, or the same settings to resume")
        records = read_pairs(self.pairs_path)[0]
        unique = _unique(records)
        self._duplicates = len(records) - len(unique)
        return unique

    def _check_writable(self) -> None:
        """``UserError`` unless the directory is, or can be made as, a writable directory."""
        existing = self.path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            what = "is a file" if existing == self.path else f"is under {existing}, a file"
            raise UserError(f"--out {self.path} {what}; give a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"--out {self.path}: {existing} is not writable; give another directory")

    def start(self, config: EvalConfig) -> PairWriter:
        """Store ``config`` and open ``pairs.jsonl`` for appending, first rewriting it
        without the repeated sentences ``finished_records`` found (and saying so)."""
        try:
            write_atomic(self.path / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
            if self._duplicates:
                write_atomic(self.pairs_path, "".join(json.dumps(r) + "\n" for r in
                                                      _unique(read_pairs(self.pairs_path)[0])))
                print(f"jaxjoint: {self.pairs_path} recorded {self._duplicates} sentence(s) twice; "
                      "kept each once", file=sys.stderr)
                self._duplicates = 0
            return PairWriter(self.pairs_path, self.write_failure)
        except OSError as err:
            raise self.write_failure(err) from None

    def sort_pairs(self) -> None:
        """Put the records of ``pairs.jsonl`` in sentence order. They are out of order
        only when a multi-process round failed after a later pair of it finished;
        sorting makes a completed run's file the same however often it was resumed."""
        records, _ = read_pairs(self.pairs_path)
        indices = [r["index"] for r in records]
        if indices != sorted(indices):
            ordered = sorted(records, key=lambda r: r["index"])
            try:
                write_atomic(self.pairs_path, "".join(json.dumps(r) + "\n" for r in ordered))
            except OSError as err:
                raise self.write_failure(err) from None

    def write_files(self, files: dict[str, str]) -> None:
        """Write each ``{name: text}`` atomically, all or none (the summaries)."""
        try:
            write_all_atomic({self.path / name: text for name, text in files.items()})
        except OSError as err:
            raise self.write_failure(err) from None

    def write_failure(self, err: OSError, path: Path | None = None) -> UserError:
        """The one-line error of a failed write: what failed, what is safe, what to do."""
        what = err.filename or path or self.path
        try:
            saved = f"{count_pairs(self.path)} finished pairs are"
        except OSError:
            saved = "the finished pairs are"
        return UserError(f"cannot write {what} ({err.strerror or err}); {saved} safe in {self.pairs_path}; "
                         "free space (or fix the disk, or copy the directory elsewhere and use it as --out) "
                         "and run the same command again to resume")
