"""Both AG solvers to three tolerances on real pairs: passes, seconds, and what 40 iterations miss.

    python -m benchmarks.ag_solvers                        # embedded model, evaluate's default 60 sentences
    python -m benchmarks.ag_solvers --max-sentences 300    # all its held-out sentences (many hours)
    python -m benchmarks.ag_solvers --max-sentences 6 --plain-max-sentences 2
    python -m benchmarks.ag_solvers --model DIR --max-sentences 20 --plain-max-sentences 2
    python -m benchmarks.ag_solvers --solvers accelerated --tols 1e-6 --json out.json

The pairs are those ``jaxjoint evaluate`` scores for the same ``--model`` (a checkpoint
directory, or ``default``: the embedded model; ``jaxjoint random-checkpoint`` builds
random ones, e.g. a V >= 8192 BERT), ``--data`` and ``--max-sentences``: its own code
loads the sentences, draws the random positions and builds the tables (no prefetch, so
that no forward pass runs while AG is timed). Each pair's tables are computed once;
from them: AG with the paper's fixed 40 iterations, and for each solver of
``--solvers`` (plain, accelerated) and each tol of ``--tols``,
``derive_joint(tables, "ag", tol=..., solver=..., max_iters=--max-iters)`` and its
``pair_metrics``. ``--plain-max-sentences K`` runs plain on the first K pairs only: a
plain run that does not converge uses all of ``--max-iters`` (10,000 passes: 80-240 s
per run at V = 4096 on the 2-core CPU VM shared with other jobs, 2026-12-07, so several
minutes per pair), and below float32's floor (a few 1e-7) it never
converges (a run that misses one tol is the same run at every tighter one: its row is
reused, marked ``same_run_as``); ``--max-sentences 6 --plain-max-sentences 2`` took 14-15 minutes there.

Reported per (solver, tol): table passes (``iters``) and seconds per pair (each
program compiled before anything is timed; the joint is waited for) as median, 90th
percentile and max; the pairs that converged (delta < tol) of those run; median
``map_passes``. Per metric (p_nll, u_nll, kl_gold, kl_all, objective J): the change
from the fixed point to the 40-iteration AG, signed mean, and mean and max of its
absolute and relative size. Each pair's fixed point is its accelerated run at the
tightest tol that converged (each pair's record names it; without one, plain's; a
pair none of whose runs converged uses its run of smallest delta and says so). And,
per tol, the largest relative difference of each metric between the two solvers over
the pairs both ran.

Prints the tables; the JSON (``--json``) is rewritten after every pair with the
per-pair rows and the summary so far, so an interrupted run keeps its finished pairs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from benchmarks.common import machine, print_table, write_json
from jaxjoint.config import DEFAULT_MODEL, EvalConfig, resolve_config
from jaxjoint.data import MaskedPair
from jaxjoint.joints import AG_ITERS, AG_MAX_ITERS, AG_SOLVERS, Joint, derive_joint
from jaxjoint.metrics import METRICS, pair_metrics
from jaxjoint.run import runner
from jaxjoint.tables import PairTables, iter_pair_tables

PAPER = "paper (40 iterations)"
CHANGED = METRICS + ("objective",)  # the numbers compared between runs


def evaluate_pairs(model: str, data: str, max_sentences: int | None) -> tuple[EvalConfig, Any]:
    """(config, run) as ``jaxjoint evaluate`` loads them: the model, its pairs, its mesh."""
    config = resolve_config({"model": model, "data": data, "max_sentences": max_sentences})
    # evaluate's own loader (no output directory is read: read_out=False), so that the
    # sentences, positions and model settings are the ones a run scores.
    return config, runner._load_run(config, None, read_out=False)


def timed_joint(tables: PairTables, mesh: Mesh, **options: Any) -> tuple[Joint, float]:
    """(joint, seconds) of ``derive_joint(tables, "ag", **options)``, waited for."""
    start = time.perf_counter()
    joint = jax.block_until_ready(derive_joint(tables, "ag", mesh=mesh, **options))
    return joint, time.perf_counter() - start


def warm_up(tables: PairTables, mesh: Mesh, solvers: list[str], tol: float) -> None:
    """Compile every program the timed runs use (tol and the pass cap are traced
    arguments: one pass compiles the same program as a full run)."""
    jax.block_until_ready(derive_joint(tables, "ag", mesh=mesh, iters=1))
    for solver in solvers:
        jax.block_until_ready(derive_joint(tables, "ag", mesh=mesh, tol=tol, solver=solver, max_iters=1))


def run_pair(number: int, pair: MaskedPair, tables: PairTables, mesh: Mesh, solvers: list[str], tols: list[float],
             max_iters: int) -> list[dict]:
    """One row per AG run on this pair: the paper's 40 iterations, then every (solver, tol)."""
    runs = [(PAPER, None, {"iters": AG_ITERS})]
    runs += [(s, t, {"tol": t, "solver": s, "max_iters": max_iters}) for s in solvers
             for t in sorted(tols, reverse=True)]
    rows, missed = [], {}
    for solver, tol, options in runs:
        if solver in missed:
            # tol only decides when a run stops: one that never got below a looser tol is,
            # pass for pass, the same run at a tighter one (not rerun; its row says so)
            rows.append(dict(missed[solver], tol=tol, same_run_as=f"tol={missed[solver]['tol']:g}"))
            continue
        joint, seconds = timed_joint(tables, mesh, **options)
        info = joint.info
        row = {"pair": number, "sentence": pair.index, "positions": [pair.a, pair.b], "solver": solver, "tol": tol,
               "iters": int(info["iters"]), "map_passes": int(info["map_passes"]), "delta": float(info["delta"]),
               "converged": None if tol is None else bool(info["delta"] < tol), "seconds": seconds}
        row.update(pair_metrics(tables, joint, pair.gold))
        row["objective"] = float(info["objective"])
        rows.append(row)
        if row["converged"] is False:
            missed[solver] = row
    reference = fixed_point(rows)
    rows[0]["reference"] = label(reference) + ("" if reference["converged"] else " (not converged)")
    return rows


def fixed_point(rows: list[dict]) -> dict:
    """This pair's best estimate of the fixed point: its accelerated run at the tightest
    tol that converged; failing that, the other solver's; failing that, its run (to a
    tol) of smallest delta."""
    to_tol = [r for r in rows if r["tol"] is not None]
    converged = sorted((r for r in to_tol if r["converged"]), key=lambda r: (r["solver"] != "accelerated", r["tol"]))
    return converged[0] if converged else min(to_tol, key=lambda r: r["delta"])


def label(row: dict) -> str:
    return row["solver"] if row["tol"] is None else f"{row['solver']} tol={row['tol']:g}"


def relative(change: float, reference: float) -> float:
    return abs(change) / abs(reference) if reference else float("inf") if change else 0.0


def spread(values: list[float]) -> dict[str, float]:
    return {"median": whole(statistics.median(values)), "p90": whole(np.percentile(values, 90)),
            "max": whole(max(values))}


def whole(value: float) -> float | int:
    """An int where ``value`` is one (pass counts print as 10000, not 1e+04)."""
    value = float(value)
    return int(value) if value.is_integer() else value


def summarise(rows: list[dict]) -> dict[str, Any]:
    """The three tables of the module docstring, from the per-pair rows."""
    runs = []
    for key in dict.fromkeys((r["solver"], r["tol"]) for r in rows):
        mine = [r for r in rows if (r["solver"], r["tol"]) == key]
        iters, seconds = spread([r["iters"] for r in mine]), spread([r["seconds"] for r in mine])
        runs.append({"solver": key[0], "tol": key[1], "pairs": len(mine),
                     "converged": None if key[1] is None else sum(r["converged"] for r in mine),
                     **{f"iters_{k}": v for k, v in iters.items()}, **{f"s_{k}": v for k, v in seconds.items()},
                     "map_passes_median": whole(statistics.median(r["map_passes"] for r in mine)),
                     "delta_max": max(r["delta"] for r in mine)})

    by_pair: dict[int, list[dict]] = {}
    for r in rows:
        by_pair.setdefault(r["pair"], []).append(r)
    change = []
    for metric in CHANGED:
        signed, rel = [], []
        for pair_rows in by_pair.values():
            paper, ref = pair_rows[0], fixed_point(pair_rows)
            signed.append(paper[metric] - ref[metric])
            rel.append(relative(signed[-1], ref[metric]))
        change.append({"metric": metric, "mean_change": float(np.mean(signed)),
                       "mean_abs": float(np.mean(np.abs(signed))), "max_abs": float(np.max(np.abs(signed))),
                       "mean_rel": float(np.mean(rel)), "max_rel": float(np.max(rel))})
    references: dict[str, int] = {}
    for pair_rows in by_pair.values():
        references[pair_rows[0]["reference"]] = references.get(pair_rows[0]["reference"], 0) + 1

    agreement = []
    for tol in dict.fromkeys(r["tol"] for r in rows if r["tol"] is not None):
        both = [(p, a) for pair_rows in by_pair.values()
                for p in pair_rows if (p["solver"], p["tol"]) == ("plain", tol)
                for a in pair_rows if (a["solver"], a["tol"]) == ("accelerated", tol)]
        if both:
            agreement.append({"tol": tol, "pairs": len(both),
                              "both_converged": sum(p["converged"] and a["converged"] for p, a in both),
                              **{f"max_rel_{m}": max(relative(p[m] - a[m], a[m]) for p, a in both)
                                 for m in CHANGED}})
    return {"runs": runs, "change_40_vs_fixed_point": change, "fixed_point_from": references,
            "plain_vs_accelerated": agreement}


def show(rows: list[dict]) -> None:
    """``print_table`` of ``rows``, a missing value (the 40-iteration run's tol) as '-'."""
    print_table([{k: "-" if v is None else v for k, v in r.items()} for r in rows], list(rows[0]))


def floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t]


def names(text: str) -> list[str]:
    chosen = [t for t in text.split(",") if t]
    unknown = set(chosen) - set(AG_SOLVERS)
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"solvers are {', '.join(AG_SOLVERS)}, got {text!r}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory, or default (embedded model)")
    parser.add_argument("--data", default="default", help="as evaluate's --data (default: the embedded held-out set)")
    parser.add_argument("--max-sentences", type=int, default=None,
                        help="the first N sentences (default as evaluate: 60 of an embedded set)")
    parser.add_argument("--plain-max-sentences", type=int, default=None, metavar="K",
                        help="run the plain solver on the first K pairs only (default all)")
    parser.add_argument("--solvers", type=names, default=list(AG_SOLVERS), help="comma-separated (plain,accelerated)")
    parser.add_argument("--tols", type=floats, default=[1e-4, 1e-6, 1e-8], help="comma-separated tolerances")
    parser.add_argument("--max-iters", type=int, default=AG_MAX_ITERS, help="pass cap of a run to a tol")
    parser.add_argument("--json", default="benchmarks/results/ag_solvers.json")
    args = parser.parse_args()

    config, run = evaluate_pairs(args.model, args.data, args.max_sentences)
    stream = iter_pair_tables(run.mlm, ((p.input_ids, p.a, p.b) for p in run.pairs), mesh=run.mesh,
                              chunk_size=config.chunk_size, prefetch=0)
    payload: dict[str, Any] = {"benchmark": "ag_solvers", "machine": machine(), "model": args.model,
                               "data": args.data, "max_sentences": config.max_sentences,
                               "plain_max_sentences": args.plain_max_sentences, "solvers": args.solvers,
                               "tols": args.tols, "max_iters": args.max_iters, "V": run.mlm.config.vocab_size,
                               "pairs": len(run.pairs), "skipped": len(run.skipped), "rows": []}
    rows: list[dict] = payload["rows"]
    for number, pair in enumerate(run.pairs):
        tables = jax.block_until_ready(next(stream))
        if number == 0:
            warm_up(tables, run.mesh, args.solvers, args.tols[0])
        plain_too = args.plain_max_sentences is None or number < args.plain_max_sentences
        solvers = [s for s in args.solvers if s != "plain" or plain_too]
        new = run_pair(number, pair, tables, run.mesh, solvers, args.tols, args.max_iters)
        rows.extend(new)
        payload["summary"] = summarise(rows)
        write_json(args.json, payload, quiet=True)
        print(f"pair {number} (sentence {pair.index}): "
              + ", ".join(f"{label(r)} {r['iters']} passes {r['seconds']:.2f} s" for r in new), flush=True)

    summary = payload["summary"]
    print(f"\n{len(run.pairs)} pairs, V = {payload['V']}, model {args.model}; passes and seconds per pair")
    show(summary["runs"])
    print("\nfrom the fixed point to the 40-iteration AG (fixed point from: "
          + ", ".join(f"{k} for {n}" for k, n in summary["fixed_point_from"].items()) + ")")
    show(summary["change_40_vs_fixed_point"])
    if summary["plain_vs_accelerated"]:
        print("\nlargest relative difference between plain and accelerated on the same pair and tol")
        show(summary["plain_vs_accelerated"])
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
