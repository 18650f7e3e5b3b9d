"""The evaluation config: one dataclass, read from YAML and overridden by the command line.

Paths in a config file (``model``, ``data``, ``out``) are taken relative to the
current directory, like the same values given on the command line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import yaml

from jaxjoint.data import MASKINGS, is_data_name
from jaxjoint.distributed import MODES as DISTRIBUTED_MODES
from jaxjoint.errors import UserError
from jaxjoint.joints import AG_ITERS, AG_MAX_ITERS, METHODS
from jaxjoint.models.mlm import DTYPES

DEFAULT_MODEL = "default"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Everything that defines an evaluation run (see ``jaxjoint evaluate --help``).

    model: a checkpoint directory, a hub name, or ``default`` (the embedded model).
    data: ``default``, ``default-news``, ``snli``, ``xsum``, or a .txt/.jsonl path.
    masking: ``random`` or ``contiguous`` (DESIGN.md §2).
    max_sentences: use the first N sentences of the data (None: all).
    seed: seeds each sentence's masked positions together with its index.
    methods: joint constructions, a subset of ``joints.METHODS``.
    ag_iters: AG's fixed iteration count (the paper's 40), used when ``ag_tol`` is None.
    ag_tol: iterate AG until the L1 change of its marginals is below this (None: fixed count).
    ag_max_iters: with ``ag_tol``, the most iterations AG may run.
    dtype: compute dtype of the forward passes, ``float32`` or ``bfloat16``.
    chunk_size: sequences per device per step (None: from the device's memory).
    devices: use the first N local devices (None: all); in ``global`` mode, of each process.
    distributed: ``none`` (one process), ``pairs`` or ``global`` (several processes,
      see ``jaxjoint.distributed``).
    out: output directory (default ``runs/<model>_<data>_<masking>`` under the
      current directory, see ``default_out``).
    """

    model: str = DEFAULT_MODEL
    data: str = "default"
    masking: str = "random"
    max_sentences: int | None = None
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    ag_iters: int = AG_ITERS
    ag_tol: float | None = None
    ag_max_iters: int = AG_MAX_ITERS
    dtype: str = "float32"
    chunk_size: int | None = None
    devices: int | None = None
    distributed: str = "none"
    out: str | None = None

    def ag_options(self) -> dict[str, Any]:
        """Keyword options for ``derive_joint(tables, "ag", ...)``."""
        return ag_options(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-ready values (``methods`` as a list)."""
        values = dataclasses.asdict(self)
        values["methods"] = list(self.methods)
        return values


KEYS = tuple(f.name for f in dataclasses.fields(EvalConfig))
# Keys that change what a pair's record holds; the rest may differ when a run resumes.
# AG's keys count through the options AG runs with (``result_settings``).
RESULT_KEYS = ("model", "data", "masking", "seed", "methods", "dtype")


def ag_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """``derive_joint`` options for AG from config values (``EvalConfig.to_dict()``
    or a stored ``config.yaml``: one written before ``ag_max_iters`` existed kept
    the cap under a tolerance in ``ag_iters``)."""
    if values.get("ag_tol") is None:
        return {"iters": values.get("ag_iters")}
    return {"tol": values["ag_tol"], "max_iters": values.get("ag_max_iters", values.get("ag_iters"))}


def result_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """What a run's records depend on, from config values as in ``ag_options``:
    the ``RESULT_KEYS`` and, when AG is among the methods, its options."""
    settings = {key: values.get(key) for key in RESULT_KEYS}
    if "ag" in (values.get("methods") or ()):
        settings["ag"] = ag_options(values)
    return settings


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The key/value mapping of a YAML config file, keys checked against ``KEYS``."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read config file {path} ({err})") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"config file {path} is not valid YAML{line}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must be a mapping of keys to values")
    unknown = [str(k) for k in values if k not in KEYS]
    if unknown:
        raise UserError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"in {path}; valid keys: {', '.join(KEYS)}")
    return values


def resolve_config(*layers: Mapping[str, Any]) -> EvalConfig:
    """Merge ``layers`` (later wins; None values are "not given"), check every value,
    and make local paths absolute so a run is identified the same from any directory."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in KEYS:
                raise UserError(f"unknown config key {key!r}; valid keys: {', '.join(KEYS)}")
            if value is not None:
                merged[key] = value
    values = {key: _check(key, value) for key, value in merged.items()}
    config = EvalConfig(**values)
    if config.out is None:
        config = dataclasses.replace(config, out=_absolute("out", default_out(config)))
    return config


def default_out(config: EvalConfig) -> str:
    """``runs/<model>_<data>_<masking>``: the output directory when none is given.

    Named after what the run is, so that two different runs started without
    ``--out`` do not collide (a second run with other settings in the same
    directory would be refused).
    """
    def name(value: str) -> str:
        return Path(value.rstrip("/")).stem.replace("/", "-") or value

    return str(Path("runs") / f"{name(config.model)}_{name(config.data)}_{config.masking}")


def _check(key: str, value: Any) -> Any:
    """The canonical form of one config value; ``UserError`` when it is invalid."""
    if key in ("model", "data", "out"):
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"config key {key!r} must be a non-empty string")
        return _absolute(key, value.strip())
    if key == "masking":
        return _choice(key, value, MASKINGS)
    if key == "dtype":
        return _choice(key, value, tuple(DTYPES))
    if key == "distributed":
        return _choice(key, value, DISTRIBUTED_MODES)
    if key == "methods":
        return _methods(value)
    if key == "ag_tol":
        number = _number(key, value)
        if not number > 0:
            raise UserError(f"ag_tol must be > 0, got {value}")
        return number
    minimum = 0 if key == "seed" else 1
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value), 10)
        except ValueError:
            raise UserError(f"config key {key!r} must be an integer, got {value!r}") from None
    if value < minimum:
        raise UserError(f"{key} must be >= {minimum}, got {value}")
    return value


def _absolute(key: str, value: str) -> str:
    if (key == "data" and is_data_name(value)) or (key == "model" and value == DEFAULT_MODEL):
        return value
    path = Path(value).expanduser()
    if key == "out" or path.exists():
        return str(path.resolve())
    return value  # a hub model name, or a missing path the loader reports


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UserError(f"unknown {key} {value!r}; choose one of {', '.join(choices)}")
    return value


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise UserError(f"config key {key!r} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"config key {key!r} must be a number, got {value!r}") from None


def _methods(value: Any) -> tuple[str, ...]:
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)):
        raise UserError("methods must be a list or a comma-separated string")
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise UserError(f"methods is empty; choose from {', '.join(METHODS)}")
    for name in names:
        if name not in METHODS:
            raise UserError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if len(set(names)) < len(names):
        raise UserError(f"methods lists a method twice: {', '.join(names)}")
    return tuple(names)
