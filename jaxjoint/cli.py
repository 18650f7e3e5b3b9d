"""The ``jaxjoint`` command: evaluate, pair, plot, train-mlm.

Errors a user can fix are one line on stderr (``jaxjoint: error: ...``) and exit
status 2; an interrupt exits 130 after saying how to resume. A process of a
multi-process run that lost another process, was interrupted, or hit an
unexpected error exits at once (``distributed.exit_now``).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import NoReturn, Sequence

import jax

from jaxjoint import distributed, train
from jaxjoint.config import KEYS, EvalConfig, read_config_file, resolve_config
from jaxjoint.errors import UserError

EPILOG = "Paths in a config file are relative to the current directory; command-line values override it."


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors raised as ``UserError``: one line, like every other error."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def _config_arguments(p: argparse.ArgumentParser, *, evaluation: bool) -> None:
    """The options shared by evaluate and pair; every default is None ("not given")."""
    p.add_argument("--config", metavar="FILE", help="YAML config file (keys as in configs/*.yaml)")
    p.add_argument("--model", metavar="PATH|NAME", help="checkpoint directory, hub name, or 'default'")
    if evaluation:
        p.add_argument("--data", metavar="NAME|PATH",
                       help="default, default-news, snli, xsum, or a .txt / .jsonl file")
        p.add_argument("--masking", metavar="KIND", help="random (default) or contiguous")
        p.add_argument("--max-sentences", type=int, metavar="N", help="use the first N sentences (default all)")
        p.add_argument("--seed", type=int, metavar="S", help="seed of the masked positions (default 0)")
    p.add_argument("--methods", metavar="LIST", help="comma-separated subset of mlm,mrf,mrf_logit,hcb,ag")
    p.add_argument("--ag-iters", type=int, metavar="N",
                   help="AG's fixed iteration count (default 40, the paper's), when no --ag-tol is given")
    p.add_argument("--ag-tol", type=float, metavar="TOL",
                   help="iterate AG until the L1 change of its marginals is below TOL")
    p.add_argument("--ag-max-iters", type=int, metavar="N",
                   help="with --ag-tol, the most AG iterations (default 10000)")
    p.add_argument("--dtype", metavar="DTYPE", help="float32 (default) or bfloat16 forward passes")
    p.add_argument("--chunk-size", type=int, metavar="N", help="sequences per device per step")
    p.add_argument("--devices", type=int, metavar="N", help="use the first N local devices (default all)")
    if evaluation:
        p.add_argument("--distributed", metavar="MODE",
                       help="none (default: one process), or several processes started with the same command: "
                       "pairs (each process scores its own pairs on its devices: throughput) or global "
                       "(all devices of all processes on each pair: latency)")
        p.add_argument("--coordinator", metavar="HOST:PORT",
                       help="process 0's address, reachable by every process (not needed on TPU VMs, SLURM, "
                       "Open MPI)")
        p.add_argument("--num-processes", type=int, metavar="N", help="number of processes in the run")
        p.add_argument("--process-id", type=int, metavar="K", help="this process's number, 0 to N-1")


def _resolve(args: argparse.Namespace) -> EvalConfig:
    file_values = read_config_file(args.config) if args.config else {}
    config = resolve_config(file_values, {k: getattr(args, k) for k in KEYS if hasattr(args, k)})
    # A config file's ag_iters (the shipped ones say 40) is simply unused under a
    # tolerance; on the command line either option without its mode is a mistake.
    if args.ag_iters is not None and config.ag_tol is not None:
        raise UserError("--ag-iters is AG's fixed count; with --ag-tol give the cap as --ag-max-iters")
    if args.ag_max_iters is not None and config.ag_tol is None:
        raise UserError("--ag-max-iters caps AG under --ag-tol; give --ag-tol too, or --ag-iters for a fixed count")
    return config


# --- evaluate ---------------------------------------------------------------------------


def _run_evaluate(args: argparse.Namespace) -> int:
    from jaxjoint.evaluate import PAIRS_FILE, count_pairs, evaluate

    config = _resolve(args)
    launch = (args.coordinator, args.num_processes, args.process_id)
    if config.distributed == "none":
        if any(v is not None for v in launch):
            raise UserError("--coordinator, --num-processes and --process-id need --distributed pairs or global")
    else:
        distributed.initialize(*launch)
    try:
        evaluate(config, quiet=args.quiet)
    except KeyboardInterrupt:
        if not distributed.is_initialized():
            n = count_pairs(config.out)
            print(f"\njaxjoint: interrupted; {n} finished pairs are saved in {config.out}/{PAIRS_FILE}; "
                  "run the same command again to resume", file=sys.stderr)
            return 130
        saved = f"{count_pairs(config.out)} finished pairs are saved" if jax.process_index() == 0 else (
            "process 0 keeps the finished pairs")
        print(f"\njaxjoint: interrupted; {saved} in {config.out}/{PAIRS_FILE}; "
              "run the same command on every process to resume", file=sys.stderr)
        distributed.exit_now(130)
    except UserError:
        raise
    except Exception:
        # Exiting normally would wait in the runtime's shutdown handshake for
        # processes that may be blocked waiting for this one.
        if distributed.is_initialized():
            traceback.print_exc()
            distributed.exit_now(1)
        raise
    return 0


# --- pair ---------------------------------------------------------------------------------


def _run_pair(args: argparse.Namespace) -> int:
    from jaxjoint.data import max_tokens
    from jaxjoint.evaluate import LABELS, device_mesh, explain_pair, model_source
    from jaxjoint.models.mlm import load_mlm

    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    config = _resolve(args)
    mlm = load_mlm(model_source(config.model), dtype=config.dtype)
    tok = mlm.tokenizer
    if tok is None:
        raise UserError("the checkpoint has no tokenizer files; `jaxjoint pair` needs one to read TEXT")
    encoded = tok(args.text, truncation=True, max_length=max_tokens(mlm.config), return_special_tokens_mask=True)
    ids, special = list(encoded["input_ids"]), list(encoded["special_tokens_mask"])
    tokens = tok.convert_ids_to_tokens(ids)
    a, b = _pair_positions(args.positions, ids, special, tokens, mlm.mask_token_id)
    gold = None if mlm.mask_token_id in (ids[a], ids[b]) else (ids[a], ids[b])

    result = explain_pair(mlm, ids, a, b, methods=config.methods, top_k=args.top_k, gold=gold,
                          ag_options=config.ag_options(), mesh=device_mesh(config.devices),
                          chunk_size=config.chunk_size)

    print("tokens: " + " ".join(f"{i}:{t}" for i, t in enumerate(tokens)))
    if gold is None:
        print(f"A = {a}, B = {b} (masked: no gold tokens)")
    else:
        print(f"A = {a} (gold {tokens[a]!r}), B = {b} (gold {tokens[b]!r})")
    print(f"\ntop {args.top_k} pairs (token at A, token at B, p):")
    columns = {
        LABELS[m]: [f"{tok.convert_ids_to_tokens(x)} {tok.convert_ids_to_tokens(y)}  {p:.4f}" for x, y, p in top]
        for m, top in result["top"].items()
    }
    print(_table(["#", *columns], [[str(i + 1), *(c[i] for c in columns.values())]
                                   for i in range(min(len(c) for c in columns.values()))]))
    if result["ag"] is not None:
        ag = result["ag"]
        print(f"\nAG: {int(ag['iterations'])} iterations, last L1 change {ag['l1_change']:.3g}, "
              f"J = {ag['objective']:.4g}")
    if gold is not None:
        rows = [[LABELS[m], *(f"{v[k]:.4f}" for k in ("p_nll", "u_nll", "kl_gold", "kl_all"))]
                for m, v in result["metrics"].items()]
        rows.append(["MLM conditionals", "–", f"{result['mlm_unary_u_nll']:.4f}", "–", "–"])
        print("\n" + _table(["method", "p_nll", "u_nll", "kl_gold", "kl_all"], rows))
    return 0


def _pair_positions(positions: Sequence[int] | None, ids: list[int], special: list[int], tokens: list[str],
                    mask_id: int) -> tuple[int, int]:
    if positions is None:
        masks = [i for i, t in enumerate(ids) if t == mask_id]
        if len(masks) != 2:
            raise UserError(f"TEXT has {len(masks)} mask tokens; write exactly two, or give --positions I J")
        return masks[0], masks[1]
    a, b = positions
    for p in (a, b):
        if not 0 <= p < len(ids):
            raise UserError(f"position {p} is outside the {len(ids)} tokens [0, {len(ids)})")
        if special[p]:
            raise UserError(f"position {p} is the special token {tokens[p]}; choose a word position")
    if a == b:
        raise UserError("the two positions must differ")
    return a, b


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


# --- plot -----------------------------------------------------------------------------------


def _run_plot(args: argparse.Namespace) -> int:
    from jaxjoint.plot import plot_run

    print(plot_run(args.directory, args.output))
    return 0


# --- main ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxjoint`` argument parser with all subcommands."""
    parser = _Parser(prog="jaxjoint", description="Exact pairwise joints derived from masked language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ev = sub.add_parser("evaluate", help="score joint constructions on a data set (resumable)",
                        description="Derive each method's joint for one masked pair per sentence and score it "
                        "against the MLM's conditionals; rerun with the same --out to resume.", epilog=EPILOG)
    _config_arguments(ev, evaluation=True)
    ev.add_argument("--out", metavar="DIR", help="output directory (pairs.jsonl, summary.*)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar, no table on stdout")
    ev.set_defaults(func=_run_evaluate)

    pr = sub.add_parser("pair", help="top joint pairs of one sentence under each method",
                        description="TEXT with two mask tokens, or TEXT and --positions I J (token indices, "
                        "[CLS] = 0; the gold tokens there give the metrics too).", epilog=EPILOG)
    pr.add_argument("text", metavar="TEXT")
    pr.add_argument("--positions", type=int, nargs=2, metavar=("I", "J"), help="token positions A and B")
    pr.add_argument("--top-k", type=int, default=10, metavar="K", help="pairs to list per method (default 10)")
    _config_arguments(pr, evaluation=False)
    pr.set_defaults(func=_run_pair)

    pl = sub.add_parser("plot", help="PNG of NLL against token distance for an evaluate directory")
    pl.add_argument("directory", metavar="DIR")
    pl.add_argument("--output", metavar="PNG", help="where to write (default DIR/nll_by_distance.png)")
    pl.set_defaults(func=_run_plot)

    train.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jaxjoint`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    # jaxjoint uses transformers for tokenizers only: its "PyTorch was not found" advice is noise here.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as err:
        print(f"jaxjoint: error: {' '.join(str(err).split())}", file=sys.stderr)
        if isinstance(err, distributed.ProcessFailure):
            distributed.exit_now(2)
        return 2
    except KeyboardInterrupt:
        print("\njaxjoint: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
