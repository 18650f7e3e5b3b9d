"""The run directory: what an evaluation writes, how it is resumed, and what it refuses.

A directory holds:

- ``config.yaml``: the resolved config (also usable as ``--config``), written first;
- ``pairs.jsonl``: one line per finished pair, appended, flushed and fsynced as
  soon as the pair is done, so a killed run loses at most the pair in flight; in
  sentence order once the run is complete;
- ``summary.json``, ``summary.md``, ``summary.csv``: written when all pairs are done
  (``reports``).

Running again with the same directory resumes: finished pairs are kept, a torn
last line (a kill during the write) is dropped and that pair recomputed, and a
run whose config differs in a setting that changes the records
(``config.result_settings``) is refused. Every file but ``pairs.jsonl`` is
replaced atomically, so a kill leaves the old or the new file, never half.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from jaxjoint.config import EvalConfig, result_settings
from jaxjoint.errors import UserError

CONFIG_FILE = "config.yaml"
PAIRS_FILE = "pairs.jsonl"
SUMMARY_FILES = ("summary.json", "summary.md", "summary.csv")
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


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a kill leaves the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class PairWriter:
    """Appends records to ``pairs.jsonl``, each one durable before the next pair starts."""

    def __init__(self, path: Path):
        _, end = read_pairs(path)
        self._file = open(path, "ab")
        if self._file.tell() != end:  # a torn last line
            self._file.truncate(end)
            self._file.seek(end)
            os.fsync(self._file.fileno())

    def append(self, record: Record) -> None:
        self._file.write((json.dumps(record) + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class RunDir:
    """The output directory ``path`` of one evaluation run."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.pairs_path = self.path / PAIRS_FILE

    def finished_records(self, config: EvalConfig) -> list[Record]:
        """The finished records here, after checking the directory can hold this
        run's results and belongs to no other run. Writes nothing."""
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
        theirs, ours = result_settings(stored), result_settings(config.to_dict())
        changed = [k for k in (*ours, *theirs) if theirs.get(k) != ours.get(k)]
        if changed:
            k = changed[0]
            raise UserError(
                f"{self.path} holds a run with another config ({k}: {theirs.get(k)!r} there, {ours.get(k)!r} now); "
                "use a new --out, or the same settings to resume")
        return read_pairs(self.pairs_path)[0]

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
        """Create the directory, store ``config`` and open ``pairs.jsonl`` for appending."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
        return PairWriter(self.pairs_path)

    def sort_pairs(self) -> None:
        """Put the records of ``pairs.jsonl`` in sentence order. They are out of order
        only when a multi-process round failed after a later pair of it finished;
        sorting makes a completed run's file the same however often it was resumed."""
        records, _ = read_pairs(self.pairs_path)
        indices = [r["index"] for r in records]
        if indices != sorted(indices):
            ordered = sorted(records, key=lambda r: r["index"])
            write_atomic(self.pairs_path, "".join(json.dumps(r) + "\n" for r in ordered))

    def write_files(self, files: dict[str, str]) -> None:
        """Write each ``{name: text}`` atomically (the summaries)."""
        for name, text in files.items():
            write_atomic(self.path / name, text)
