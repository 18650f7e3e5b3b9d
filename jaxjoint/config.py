"""Every option of a run, declared once.

``EvalConfig`` is the single declaration: each field carries its default, its help
text and its check (``option``). From it derive

- the command line: ``add_arguments`` makes ``--max-sentences N`` from ``max_sentences``;
- YAML config files: ``read_config_file`` accepts exactly the field names;
- validation: ``resolve_config`` merges layers (file, then command line) and checks
  every value with ``check_value``;
- resuming: ``result_settings`` compares the fields marked ``result`` (plus AG's
  options) with those a run directory was made with;
- multi-process runs: ``shared_settings`` are the fields every process must agree on.

A small generator of our own rather than a library: the rules here (one-line
errors, ``None`` meaning "not given" so that a config file's value survives an
absent flag, paths made absolute) are a few lines each, and every option's whole
story stays in one place.

Paths in a config file (``model``, ``data``, ``out``) are taken relative to the
current directory, like the same values given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from jaxjoint import default
from jaxjoint.data import EMBEDDED_SAMPLE, MASKINGS, default_limit, is_data_name, local_copy
from jaxjoint.errors import UserError
from jaxjoint.joints import AG_ITERS, AG_MAX_ITERS, AG_SOLVERS, ALL_METHODS, CONVERGED_TOL, METHODS
from jaxjoint.models.mlm import DTYPES
from jaxjoint.models.precision import MODES as MATMUL_PRECISIONS
from jaxjoint.plan.planner import AG_CONVERGED_PASSES, DEFAULT_LENGTHS
from jaxjoint.tables import MAX_CHUNK, PREFETCH

DEFAULT_MODEL = default.NAME
DISTRIBUTED_MODES = ("none", "pairs", "global")


def option(default: Any, help: str, *, kind: str, metavar: str | None = None, choices: tuple[str, ...] = (),
           minimum: int | None = None, result: bool = False, per_host: bool = False,
           commands: tuple[str, ...] = ("evaluate", "pair", "plan"), many: bool = False,
           required: bool = False) -> Any:
    """A config field with everything the command line, YAML and checks need.

    kind: how a value is read and checked: ``int`` (with ``minimum``), ``positive``
      (a float > 0), ``choice`` (one of ``choices``), ``methods`` (a list or
      comma-separated subset of ``METHODS``), ``path`` (a file or directory; made
      absolute), ``source`` (a built-in name, a hub name, or a path), ``text`` (a
      non-empty string, never read as a path) or ``switch`` (a flag that takes no value).
    result: the value changes what a pair's record holds (a resumed run must match).
    per_host: may differ between the processes of one run (paths, the data slice).
    commands: the subcommands that take it as a flag; many: the flag takes one or
      more values; required: the command needs it.
    """
    return dataclasses.field(default=default, metadata=dict(
        help=help, kind=kind, metavar=metavar, choices=choices, minimum=minimum, result=result,
        per_host=per_host, commands=commands, many=many, required=required))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Everything that defines an evaluation run (``jaxjoint evaluate --help``)."""

    model: str = option(DEFAULT_MODEL, "checkpoint directory, hub name, or 'default' (the embedded model)",
                        kind="source", metavar="PATH|NAME", result=True, per_host=True)
    data: str = option("default", "default, default-news, snli, xsum, a local copy of one (snli=PATH, xsum=PATH: "
                       "Parquet, JSON Lines or a datasets directory), a .txt / .jsonl file, or a FASTA file "
                       "(.fa, .faa, .fasta) for a protein MLM",
                       kind="source", metavar="NAME|PATH", result=True, per_host=True, commands=("evaluate",))
    masking: str = option("random", "how the two positions are drawn: random or contiguous (DESIGN.md §2)",
                          kind="choice", choices=MASKINGS, metavar="KIND", result=True, commands=("evaluate",))
    max_sentences: int | None = option(None, "use the first N sentences (default all; the first "
                                       f"{EMBEDDED_SAMPLE} of an embedded set)", kind="int", minimum=1,
                                       metavar="N", per_host=True, commands=("evaluate",))
    seed: int = option(0, "seed of the masked positions, drawn per sentence from (seed, index)", kind="int",
                       minimum=0, metavar="S", result=True, commands=("evaluate",))
    methods: tuple[str, ...] = option(METHODS, f"comma-separated subset of {','.join(ALL_METHODS)}", kind="methods",
                                      metavar="LIST", result=True)
    ag_iters: int = option(AG_ITERS, "AG's fixed iteration count (40 is the paper's), used when no ag_tol is given",
                           kind="int", minimum=1, metavar="N")
    ag_tol: float | None = option(None, "iterate AG until the L1 change of its marginals is below TOL",
                                  kind="positive", metavar="TOL")
    ag_max_iters: int = option(AG_MAX_ITERS, "with ag_tol, the most AG iterations", kind="int", minimum=1,
                               metavar="N")
    ag_solver: str | None = option(None, "AG to a tolerance: plain or accelerated (the default; DESIGN.md §1)",
                                   kind="choice", choices=AG_SOLVERS, metavar="SOLVER")
    dtype: str = option("float32", "compute dtype of the forward passes: float32 or bfloat16", kind="choice",
                        choices=tuple(DTYPES), metavar="DTYPE", result=True)
    matmul_precision: str | None = option(
        None, "arithmetic of the float32 matrix products: float32 (the paper's, on every backend; the default), "
        "tensorfloat32 or bfloat16 (faster on GPUs and TPUs; README, Precision); bfloat16 with --dtype bfloat16",
        kind="choice", choices=MATMUL_PRECISIONS, metavar="MODE", result=True)
    chunk_size: int | None = option(None, "sequences per device per step (default: from the device's memory)",
                                    kind="int", minimum=1, metavar="N", commands=("evaluate", "pair"))
    devices: int | None = option(None, "use the first N local devices (default all); in global mode, of each "
                                 "process", kind="int", minimum=1, metavar="N", commands=("evaluate", "pair"))
    distributed: str = option("none", "none (one process), or several processes started with the same command: "
                              "pairs (each process scores its own pairs on its devices: throughput) or global "
                              "(all devices of all processes on each pair: latency)", kind="choice",
                              choices=DISTRIBUTED_MODES, metavar="MODE", commands=("evaluate",))
    out: str | None = option(None, "output directory (default runs/<model>_<data>_<masking>)", kind="path",
                             metavar="DIR", per_host=True, commands=("evaluate",))

    def ag_options(self) -> dict[str, Any]:
        """Keyword options for ``derive_joint(tables, "ag", ...)``; with ``ag_converged``
        among the methods, its options under the key ``"ag_converged"`` too."""
        options = ag_options(self.to_dict())
        if "ag_converged" in self.methods:
            options["ag_converged"] = ag_converged_options(self.to_dict())
        return options

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-ready values (``methods`` as a list)."""
        values = dataclasses.asdict(self)
        values["methods"] = list(self.methods)
        return values


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    """How this process joins a multi-process run; differs from process to process,
    so it is not part of the run's config (``jaxjoint.run.distributed.initialize``)."""

    coordinator: str | None = option(None, "process 0's address, reachable by every process (not needed on TPU "
                                     "VMs, SLURM, Open MPI)", kind="text", metavar="HOST:PORT",
                                     commands=("evaluate",))
    num_processes: int | None = option(None, "number of processes in the run", kind="int", minimum=1,
                                       metavar="N", commands=("evaluate",))
    process_id: int | None = option(None, "this process's number, 0 to N-1", kind="int", minimum=0,
                                    metavar="K", commands=("evaluate",))


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """What ``jaxjoint plan`` asks beyond the run's config (``jaxjoint.plan.make_plan``)."""

    target: str | None = option(None, "h100, h200, a100 or b200 with an optional xN device count (h100x8; more "
                                "than 8 means hosts of 8), a TPU slice (v5e:2x2, v5p:2x2x1, v6e:2x4, v4:2x2x1), "
                                "or local (this machine's devices)", kind="text", metavar="TARGET",
                                commands=("plan",), required=True)
    length: tuple[int, ...] = option(DEFAULT_LENGTHS, "sentence lengths in tokens, special tokens included; each "
                                     "is planned at its bucket", kind="int", minimum=1, metavar="N",
                                     commands=("plan",), many=True)
    prefetch: int = option(PREFETCH, "pairs queued on the devices behind the one being scored", kind="int", minimum=0,
                           metavar="N", commands=("plan",))
    max_chunk: int = option(MAX_CHUNK, "the largest chunk to consider", kind="int", minimum=8, metavar="N",
                            commands=("plan",))
    no_suggest: bool = option(False, "when it does not fit, do not compile alternatives to name one that does",
                              kind="switch", commands=("plan",))
    ag_passes: int | None = option(None, "passes over the table to price AG to a tolerance at (ag with ag_tol, "
                                   f"ag_converged); default {AG_CONVERGED_PASSES}, the accelerated solver's measured "
                                   "median to 1e-6 on the embedded model; ag's fixed count is priced at ag_iters",
                                   kind="int", minimum=1, metavar="N", commands=("plan",))
    json: str | None = option(None, "also write the report as JSON to FILE", kind="path", metavar="FILE",
                              commands=("plan",))


@dataclasses.dataclass(frozen=True)
class PairOptions:
    """What ``jaxjoint pair`` asks beyond the run's config (``jaxjoint.explain.explain_text``)."""

    top_k: int = option(10, "pairs to list per method", kind="int", minimum=1, metavar="K", commands=("pair",))


@dataclasses.dataclass(frozen=True)
class TableOptions:
    """What ``jaxjoint table`` asks beyond its run directories (``jaxjoint.run.table.write_table``)."""

    output: str | None = option(None, "write the table to FILE, its format by the extension: .md (Markdown), .csv, "
                                ".tex (LaTeX, booktabs) or .png (a figure); default Markdown on stdout",
                                kind="path", metavar="FILE", commands=("table",))
    resamples: int = option(2000, "bootstrap resamples of each run's pairs", kind="int", minimum=100, metavar="N",
                            commands=("table",))
    bootstrap_seed: int = option(0, "seed of the bootstrap resamples (the same runs give the same table)",
                                 kind="int", minimum=0, metavar="S", commands=("table",))


FIELDS = {f.name: f for f in dataclasses.fields(EvalConfig)}
KEYS = tuple(FIELDS)


# --- the command line -----------------------------------------------------------------------


def flag(name: str) -> str:
    """The command-line flag of a field: ``max_sentences`` -> ``--max-sentences``."""
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, options: type, command: str) -> None:
    """A flag for each field of the dataclass ``options`` that ``command`` takes.

    Every flag's default is None ("not given"), so that values from a config file
    survive; the help text names the real default.
    """
    for field in dataclasses.fields(options):
        meta = field.metadata
        if command not in meta["commands"]:
            continue
        if meta["kind"] == "switch":
            parser.add_argument(flag(field.name), dest=field.name, action="store_true", help=meta["help"])
            continue
        kind = {"int": int, "positive": float}.get(meta["kind"], str)
        shown = ",".join(map(str, field.default)) if isinstance(field.default, tuple) else field.default
        default = f" (default {shown})" if field.default is not None else ""
        parser.add_argument(flag(field.name), dest=field.name, type=kind, metavar=meta["metavar"],
                            nargs="+" if meta["many"] else None, required=meta["required"],
                            help=meta["help"] + default)


def check_ag_flags(given: Mapping[str, Any]) -> None:
    """AG's options on the command line name their mode: ``--ag-iters`` is the fixed
    count, ``--ag-max-iters`` the cap under ``--ag-tol``. (In a config file both may
    stand, as every shipped config has ``ag_iters: 40``: the unused one is ignored.)"""
    if given.get("ag_iters") is not None and given.get("ag_tol") is not None:
        raise UserError("--ag-iters is AG's fixed count; with --ag-tol give the cap as --ag-max-iters")
    if given.get("ag_max_iters") is not None and given.get("ag_tol") is None:
        raise UserError("--ag-max-iters caps AG under --ag-tol; give --ag-tol too, or --ag-iters for a fixed count")


# --- files and layers -------------------------------------------------------------------------


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
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(map(_suggested, unknown))} "
            f"in {path}; valid keys: {', '.join(KEYS)}")
    return values


def _suggested(key: str) -> str:
    """``'maskng' (did you mean 'masking'?)``: an unknown key and the closest valid one, if any is close."""
    close = difflib.get_close_matches(key, KEYS, n=1)
    return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)


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
    config = EvalConfig(**{key: check_value(key, value) for key, value in merged.items()})
    precision = matmul_precision_of(config.to_dict())
    if config.dtype == "bfloat16" and precision != "bfloat16":
        raise UserError(f"matmul precision {precision} needs dtype float32: with dtype bfloat16 every product "
                        "has bfloat16 operands and takes one bfloat16 pass")
    config = dataclasses.replace(config, matmul_precision=precision)
    if config.max_sentences is None:
        config = dataclasses.replace(config, max_sentences=default_limit(config.data))
    if config.out is None:
        config = dataclasses.replace(config, out=_absolute("path", default_out(config)))
    return config


def default_out(config: EvalConfig) -> str:
    """``runs/<model>_<data>_<masking>``: the output directory when none is given.

    Named after what the run is, so that two different runs started without
    ``--out`` do not collide (a second run with other settings in the same
    directory would be refused).
    """
    def name(value: str) -> str:
        copy = local_copy(value)
        if copy is not None:  # snli=PATH: named after both, so that copies of the two sets do not collide
            return f"{copy[0]}-{name(copy[1])}"
        return Path(value.rstrip("/")).stem.replace("/", "-") or value

    return str(Path("runs") / f"{name(config.model)}_{name(config.data)}_{config.masking}")


# --- settings a run is identified by ------------------------------------------------------------


def ag_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """``derive_joint`` options for AG from config values (``EvalConfig.to_dict()``
    or a stored ``config.yaml``: one written before ``ag_max_iters`` existed kept
    the cap under a tolerance in ``ag_iters``)."""
    if values.get("ag_tol") is None:
        return {"iters": values.get("ag_iters")}
    options = {"tol": values["ag_tol"], "max_iters": values.get("ag_max_iters", values.get("ag_iters"))}
    if values.get("ag_solver") is not None:
        options["solver"] = values["ag_solver"]
    return options


def ag_converged_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """``derive_joint`` options for ``ag_converged``: to ``ag_tol`` (default
    ``CONVERGED_TOL``), at most ``ag_max_iters`` passes, with ``ag_solver``."""
    options = {"tol": values.get("ag_tol") or CONVERGED_TOL, "max_iters": values.get("ag_max_iters") or AG_MAX_ITERS}
    if values.get("ag_solver") is not None:
        options["solver"] = values["ag_solver"]
    return options


def matmul_precision_of(values: Mapping[str, Any]) -> str:
    """The matmul precision of config values: as given, else ``bfloat16`` with dtype
    bfloat16 and ``float32`` otherwise (also for a ``config.yaml`` written before the
    key existed, whose runs computed float32 on the CPU, the only backend they ran on)."""
    return values.get("matmul_precision") or ("bfloat16" if values.get("dtype") == "bfloat16" else "float32")


def result_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """What a run's records depend on, from config values as in ``ag_options``:
    the fields marked ``result`` and, when AG is among the methods, its options."""
    settings = {key: values.get(key) for key, f in FIELDS.items() if f.metadata["result"]}
    settings["matmul_precision"] = matmul_precision_of(values)
    if "ag" in (values.get("methods") or ()):
        settings["ag"] = ag_options(values)
    if "ag_converged" in (values.get("methods") or ()):
        settings["ag_converged"] = ag_converged_options(values)
    return settings


def shared_settings(config: EvalConfig) -> dict[str, Any]:
    """The settings every process of a multi-process run must agree on: all but
    the ``per_host`` ones (paths and the data slice, which the processes check by
    comparing the pairs they made)."""
    return {key: value for key, value in config.to_dict().items() if not FIELDS[key].metadata["per_host"]}


# --- checking one value -------------------------------------------------------------------------


def resolve_options(options: type, given: Mapping[str, Any]) -> Any:
    """The dataclass ``options`` (``LaunchOptions``, ``PlanOptions``) from ``given``
    values (None: not given, so the field's default), each checked as ``check_value`` does."""
    values = {}
    for field in dataclasses.fields(options):
        value = given.get(field.name)
        if value is None or field.metadata["kind"] == "switch":
            values[field.name] = field.default if value is None else value
        elif field.metadata["many"]:
            values[field.name] = tuple(_checked(field, v, as_flag=True) for v in value)
        else:
            values[field.name] = _checked(field, value, as_flag=True)
    return options(**values)


def check_value(key: str, value: Any, *, as_flag: bool = False) -> Any:
    """The canonical form of config value ``key``; ``UserError`` when it is invalid,
    naming the command-line flag (``--max-sentences``) ``as_flag``, else the key."""
    return _checked(FIELDS[key], value, as_flag=as_flag)


def _checked(field: dataclasses.Field, value: Any, *, as_flag: bool = False) -> Any:
    key, meta = field.name, field.metadata
    kind = meta["kind"]
    # Errors name what the user wrote: the flag on the command line, the key in a file.
    name = flag(key) if as_flag else key
    label = name if as_flag else f"config key {key!r}"
    if kind in ("path", "source", "text"):
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{label} must be a non-empty string")
        text = value.strip()
        if kind == "text":
            return text
        builtin = (key == "model" and text == DEFAULT_MODEL) or (key == "data" and is_data_name(text))
        copy = local_copy(text) if key == "data" else None
        if copy is not None:  # snli=PATH: the path made absolute, as any other
            return f"{copy[0]}={_absolute('path', copy[1])}"
        return text if builtin else _absolute(kind, text)
    if kind == "choice":
        if value not in meta["choices"]:
            what = f"{name} value" if as_flag else key
            raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(meta['choices'])}")
        return value
    if kind == "methods":
        return _methods(value, name)
    if kind == "positive":
        number = _number(label, value)
        if not number > 0:
            raise UserError(f"{name} must be > 0, got {value}")
        return number
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value), 10)
        except ValueError:
            raise UserError(f"{label} must be an integer, got {value!r}") from None
    if value < meta["minimum"]:
        raise UserError(f"{name} must be >= {meta['minimum']}, got {value}")
    return value


def _absolute(kind: str, value: str) -> str:
    """A path made absolute; a hub name or a missing source as given."""
    path = Path(value).expanduser()
    if kind == "path" or path.exists():
        return str(path.resolve())
    return value  # a hub model name, or a missing path the loader reports


def _number(label: str, value: Any) -> float:
    if isinstance(value, bool):
        raise UserError(f"{label} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{label} must be a number, got {value!r}") from None


def _methods(value: Any, name: str = "methods") -> tuple[str, ...]:
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)):
        raise UserError(f"{name} must be a list or a comma-separated string")
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise UserError(f"{name} is empty; choose from {', '.join(ALL_METHODS)}")
    for name in names:
        if name not in ALL_METHODS:
            raise UserError(f"unknown method {name!r}; choose from {', '.join(ALL_METHODS)}")
    if len(set(names)) < len(names):
        raise UserError(f"{name} lists a method twice: {', '.join(names)}")
    return tuple(names)
