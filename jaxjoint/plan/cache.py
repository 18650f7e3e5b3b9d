"""Compiled programs' analyses, kept in memory and on disk.

Compiling a bert-sized program for a TPU or GPU target takes seconds to a minute on
a small host, and its memory and cost analyses depend only on the program and the
compiler: they are kept per (compiler versions, the source that builds the
programs, chip, device count, model config, program and its sizes) as JSON under
``$JAXJOINT_PLAN_CACHE`` (default ``~/.cache/jaxjoint/plan``; ``off`` disables the
disk). ``evaluate`` reads the same cache to choose its chunk on a GPU or TPU.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from jaxjoint.plan.compile import ProgramCost

_memory: dict[str, tuple[ProgramCost, ...]] = {}


@functools.cache
def compiler_versions() -> dict[str, str]:
    """Versions of the packages whose compilers produced the numbers."""
    out = {}
    for name in ("jax", "jaxlib", "libtpu", "jax-cuda13-plugin", "jax-cuda13-pjrt", "nvidia-cuda-nvcc"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


# The modules whose code is compiled into the run's programs: an analysis on disk is
# of the programs as this code built them, so any change to them is a new key.
_PROGRAM_SOURCES = ("tables.py", "ids.py", "metrics.py", "sharding.py", "joints", "models", "plan/compile.py")


@functools.cache
def program_sources_digest() -> str:
    """A digest of the source files that build the run's programs (``_PROGRAM_SOURCES``)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for name in _PROGRAM_SOURCES:
        path = root / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(root).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def cache_dir() -> Path | None:
    """The disk cache's directory, or None when ``JAXJOINT_PLAN_CACHE=off``."""
    raw = os.environ.get("JAXJOINT_PLAN_CACHE")
    if raw == "off":
        return None
    return Path(raw) if raw else Path.home() / ".cache" / "jaxjoint" / "plan"


def cached(key: tuple, compute: Callable[[], tuple[ProgramCost, ...]]) -> tuple[ProgramCost, ...]:
    """``compute()``'s analyses for ``key`` (a tuple of JSON-able values and
    dataclasses), from memory, else disk, else computed and stored in both."""
    text = json.dumps([compiler_versions(), program_sources_digest(), _jsonable(key)], sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:32]
    if digest in _memory:
        return _memory[digest]
    directory = cache_dir()
    path = None if directory is None else directory / f"{digest}.json"
    if path is not None and path.is_file():
        try:
            costs = tuple(ProgramCost(**c) for c in json.loads(path.read_text())["costs"])
            _memory[digest] = costs
            return costs
        except (ValueError, TypeError, KeyError):
            pass  # a file from another version of this code: compile again
    costs = tuple(compute())
    _memory[digest] = costs
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            record = {"key": json.loads(text), "costs": [dataclasses.asdict(c) for c in costs]}
            tmp.write_text(json.dumps(record, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # an unwritable cache only costs time
    return costs


def clear_memory() -> None:
    """Forget the in-process results (tests)."""
    _memory.clear()


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value
