"""The ``jaxjoint`` command: evaluate, pair, plan, plot, table, random-checkpoint, train-mlm.

Each subcommand is a thin layer: its flags come from the config declaration
(``config.add_arguments``), its work from the library. Errors a user can fix are
one line on stderr (``jaxjoint: error: ...``) and exit status 2; an interrupt
(Ctrl-C) exits 130 and SIGTERM (a preempted VM, a SLURM time limit) 143, each
after saying how to resume. A process of a multi-process run that lost
another process, was interrupted, or hit an unexpected error exits at once
(``distributed.exit_now``). Importing this module loads no model, no training
code and no PyTorch: subcommands import what they need when they run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from jaxjoint.config import (
    EvalConfig,
    LaunchOptions,
    PairOptions,
    PlanOptions,
    TableOptions,
    add_arguments,
    check_ag_flags,
    check_value,
    read_config_file,
    resolve_config,
    resolve_options,
)
from jaxjoint.errors import UserError
from jaxjoint.sharding import use_cpu_when_no_accelerator

EPILOG = "Paths in a config file are relative to the current directory; command-line values override it."
TRAIN_HELP = "train a small BERT-style masked LM (how the default model was made)"


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors raised as ``UserError``: one line, like every other error."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def _config(args: argparse.Namespace) -> EvalConfig:
    """The run's config: the ``--config`` file, overridden by the flags given."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig) if hasattr(args, f.name)}
    check_ag_flags(given)
    for key, value in given.items():  # first, so that an error names the flag, not the config key
        if value is not None:
            check_value(key, value, as_flag=True)
    return resolve_config(read_config_file(args.config) if args.config else {}, given)


# --- evaluate ---------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python next runs so that it stops a run as Ctrl-C does."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def _run_evaluate(args: argparse.Namespace) -> int:
    import jax

    from jaxjoint.run import distributed
    from jaxjoint.run.rundir import count_pairs
    from jaxjoint.run.runner import evaluate

    config = _config(args)
    launch = (args.coordinator, args.num_processes, args.process_id)
    use_cpu_when_no_accelerator()
    if config.distributed == "none":
        if any(v is not None for v in launch):
            raise UserError("--coordinator, --num-processes and --process-id need --distributed pairs or global")
    else:
        distributed.initialize(*launch)
    pairs_file = f"{config.out}/pairs.jsonl"
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        summary = evaluate(config, quiet=args.quiet)
        if not distributed.is_initialized() or jax.process_index() == 0:
            _note_pairs_left_out(summary, config)
    except KeyboardInterrupt as stop:
        what, code = ("terminated (SIGTERM)", 143) if isinstance(stop, Terminated) else ("interrupted", 130)
        if not distributed.is_initialized():
            print(f"\njaxjoint: {what}; {count_pairs(config.out)} finished pairs are saved in {pairs_file}; "
                  "run the same command again to resume", file=sys.stderr)
            return code
        saved = f"{count_pairs(config.out)} finished pairs are saved" if jax.process_index() == 0 else (
            "process 0 keeps the finished pairs")
        print(f"\njaxjoint: {what}; {saved} in {pairs_file}; "
              "run the same command on every process to resume", file=sys.stderr)
        distributed.exit_now(code)
    except UserError:
        raise
    except Exception:
        # Exiting normally would wait in the runtime's shutdown handshake for
        # processes that may be blocked waiting for this one.
        if distributed.is_initialized():
            traceback.print_exc()
            distributed.exit_now(1)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _note_pairs_left_out(summary: dict, config: EvalConfig) -> None:
    """One line when ``pairs.jsonl`` keeps more pairs than the summary covers: a rerun
    with a smaller ``--max-sentences`` summarises its first sentences only (the others
    stay on disk, and a larger count summarises them again without recomputing)."""
    from jaxjoint.run.rundir import PAIRS_FILE, read_pairs

    kept = len({r["index"] for r in read_pairs(Path(config.out) / PAIRS_FILE)[0]})
    if kept > summary["n_pairs"]:
        print(f"jaxjoint: note: the summary covers the {summary['n_pairs']} pairs of the first "
              f"{config.max_sentences} sentences (--max-sentences); {config.out}/pairs.jsonl keeps {kept} "
              "finished pairs: give a larger --max-sentences to summarise them all", file=sys.stderr)


# --- pair ---------------------------------------------------------------------------------


def _run_pair(args: argparse.Namespace) -> int:
    from jaxjoint.default import model_source
    from jaxjoint.explain import explain_text, format_explanation
    from jaxjoint.models.mlm import load_mlm
    from jaxjoint.sharding import local_mesh

    options = resolve_options(PairOptions, vars(args))
    config = _config(args)
    use_cpu_when_no_accelerator()
    mlm = load_mlm(model_source(config.model), dtype=config.dtype, matmul_precision=config.matmul_precision)
    explanation = explain_text(mlm, args.text, args.positions, methods=config.methods, top_k=options.top_k,
                               ag_options=config.ag_options(), mesh=local_mesh(config.devices),
                               chunk_size=config.chunk_size)
    print(format_explanation(explanation, mlm.tokenizer))
    return 0


# --- plan ------------------------------------------------------------------------------------


def _run_plan(args: argparse.Namespace) -> int:
    """Print the plan; exit 0 when a pair fits the target, 1 when it does not."""
    from jaxjoint.default import model_source

    options = resolve_options(PlanOptions, vars(args))
    config = _config(args)
    if options.target.strip().lower() == "local":
        use_cpu_when_no_accelerator()  # other targets start JAX on its CPU alone
    from jaxjoint.plan import format_plan, make_plan, write_json

    report = make_plan(options.target, model_source(config.model), lengths=options.length, dtype=config.dtype,
                       matmul_precision=config.matmul_precision,
                       methods=config.methods, ag_options=config.ag_options(), prefetch=options.prefetch,
                       max_chunk=options.max_chunk, suggest=not options.no_suggest, ag_passes=options.ag_passes)
    print(format_plan(report))
    if options.json:
        try:
            write_json(report, options.json)
        except OSError as err:
            raise UserError(f"cannot write {options.json} ({err.strerror})") from None
    return 0 if report.fits else 1


# --- plot -----------------------------------------------------------------------------------


def _run_plot(args: argparse.Namespace) -> int:
    from jaxjoint.run.plot import plot_run

    print(plot_run(args.directory, args.output))
    return 0


# --- table ----------------------------------------------------------------------------------


def _run_table(args: argparse.Namespace) -> int:
    from jaxjoint.run.table import write_table

    options = resolve_options(TableOptions, vars(args))
    text = write_table(args.directories, options.output, resamples=options.resamples, seed=options.bootstrap_seed)
    if text is not None:
        print(text, end="")
    return 0


# --- main ------------------------------------------------------------------------------------


def _config_flag(parser: argparse.ArgumentParser, used: str = "keys as in configs/*.yaml") -> None:
    """``--config FILE``: a run's settings as YAML, below the flags given with it."""
    parser.add_argument("--config", metavar="FILE", help=f"YAML config file ({used})")


def _version() -> str:
    """The installed jaxjoint's version, and JAX's (the numbers depend on both)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"{of('jaxjoint')} (jax {of('jax')}, jaxlib {of('jaxlib')})"


def build_parser(*, with_tools: bool = False) -> argparse.ArgumentParser:
    """The ``jaxjoint`` argument parser with all subcommands.

    ``train-mlm``'s own flags are registered only ``with_tools``: they live with the
    training code, which the other commands never import.
    """
    parser = _Parser(prog="jaxjoint", description="Exact pairwise joints derived from masked language models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ev = sub.add_parser("evaluate", help="score joint constructions on a data set (resumable)",
                        description="Derive each method's joint for one masked pair per sentence and score it "
                        "against the MLM's conditionals; rerun with the same --out to resume.", epilog=EPILOG)
    _config_flag(ev)
    add_arguments(ev, EvalConfig, "evaluate")
    add_arguments(ev, LaunchOptions, "evaluate")
    ev.add_argument("--quiet", action="store_true", help="no progress bar, no table on stdout")
    ev.set_defaults(func=_run_evaluate)

    pr = sub.add_parser("pair", help="top joint pairs of one sentence under each method",
                        description="TEXT with two mask tokens, or TEXT and --positions I J (token indices, "
                        "[CLS] = 0; for a protein model, TEXT is the sequence and I J are residue numbers from 1; "
                        "the tokens there are the gold pair and give the metrics too).", epilog=EPILOG)
    pr.add_argument("text", metavar="TEXT")
    pr.add_argument("--positions", type=int, nargs=2, metavar=("I", "J"),
                    help="token positions A and B (residue numbers for a protein)")
    _config_flag(pr)
    add_arguments(pr, PairOptions, "pair")
    add_arguments(pr, EvalConfig, "pair")
    pr.set_defaults(func=_run_pair)

    pn = sub.add_parser("plan", help="will a run fit a GPU or TPU (present or not), with which chunk, how fast",
                        description="Compile, without the hardware, the programs a run executes for TARGET and "
                        "report per device: peak memory against the device's, the largest chunk that fits, FLOPs "
                        "per pair, and an estimated (not measured) time per pair from a roofline. Exit status 1 "
                        "when a pair does not fit.", epilog=EPILOG)
    _config_flag(pn, "its model, methods, dtype and AG options")
    add_arguments(pn, PlanOptions, "plan")
    add_arguments(pn, EvalConfig, "plan")
    pn.set_defaults(func=_run_plan)

    pl = sub.add_parser("plot", help="PNG of NLL against token distance for an evaluate directory")
    pl.add_argument("directory", metavar="DIR")
    pl.add_argument("--output", metavar="PNG", help="where to write (default DIR/nll_by_distance.png)")
    pl.set_defaults(func=_run_plot)

    tb = sub.add_parser("table", help="the paper's table from finished runs, with bootstrap intervals",
                        description="One row per run (model, data, masking, and any setting that differs), per "
                        "method P-PPL, U-PPL, KL (gold), KL (all), and the MLM's own U-PPL, each with a 95% "
                        "bootstrap interval over the run's pairs, and each method's paired difference from AG.")
    tb.add_argument("directories", metavar="RUN_DIR", nargs="+", help="the --out directory of a finished evaluate")
    add_arguments(tb, TableOptions, "table")
    tb.set_defaults(func=_run_table)

    from jaxjoint.tools import random_checkpoint

    rc = random_checkpoint.add_parser(sub, help="write a random-weight checkpoint of any supported family "
                                      "(try pair, evaluate and the benchmarks offline)")
    rc.set_defaults(func=random_checkpoint.run)

    if with_tools:
        from jaxjoint.tools import train_mlm

        train_mlm.add_parser(sub, help=TRAIN_HELP)
    else:
        sub.add_parser("train-mlm", help=TRAIN_HELP, add_help=False)
    return parser


_DEFAULT_FORMAT = warnings.formatwarning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """jaxjoint's own warnings as the one line they say ("jaxjoint: ..."), without
    the file, line and source that Python prints for a programmer; others as usual."""
    if str(message).startswith("jaxjoint: "):
        return f"{message}\n"
    return _DEFAULT_FORMAT(message, category, filename, lineno, line)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jaxjoint`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    from jaxjoint.run import distributed

    argv = list(sys.argv[1:] if argv is None else argv)
    # jaxjoint uses transformers for tokenizers only: its "PyTorch was not found" advice is noise here.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.formatwarning = _one_line_warning
    try:
        args = build_parser(with_tools=argv[:1] == ["train-mlm"]).parse_args(argv)
        return args.func(args)
    except UserError as err:
        print(f"jaxjoint: error: {' '.join(str(err).split())}", file=sys.stderr)
        if isinstance(err, distributed.ProcessFailure) or distributed.is_initialized():
            # A normal exit would wait in the runtime's shutdown handshake for every
            # process, including any that stopped before reaching it.
            distributed.exit_now(2)
        return 2
    except KeyboardInterrupt:
        print("\njaxjoint: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
