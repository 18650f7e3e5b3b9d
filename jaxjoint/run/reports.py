"""Reports of a finished run: the summary (P-PPL, U-PPL, KLs per method) as JSON, Markdown and CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxjoint.config import EvalConfig, matmul_precision_of
from jaxjoint.data import Skipped
from jaxjoint.joints import LABELS
from jaxjoint.metrics import aggregate
from jaxjoint.run.rundir import SUMMARY_FILES

Record = dict[str, Any]


def summarize(config: EvalConfig, records: Sequence[Record], skipped: Sequence[Skipped], *,
              unit: str = "sentence", max_length: int | None = None,
              truncated: Sequence[tuple[int, int]] | None = None) -> dict[str, Any]:
    """The ``summary.json`` content from the records of a finished run.

    skipped: the sentences without a pair (``data.make_pairs``); unit: what the data
    holds, ``sentence`` or ``sequence`` (proteins); max_length: the model's maximum
    in tokens; truncated: ``(index, whole length)`` of each sentence cut to it (default:
    the records' ``truncated_from``, which records from before that field lack).
    """
    if truncated is None:
        truncated = [(r["index"], r["truncated_from"]) for r in records if "truncated_from" in r]
    flat = [
        {"method": m, **values, "mlm_unary_u_nll": r["mlm_unary_u_nll"]}
        for r in records for m, values in r["metrics"].items()
    ]
    per_method = aggregate(flat)
    summary: dict[str, Any] = {
        "config": config.to_dict(),
        "n_pairs": len(records),
        "unit": unit,
        "n_skipped": len(skipped),
        "skipped": [{"index": s.index, "reason": s.reason} for s in skipped],
        "max_tokens": max_length,
        "n_truncated": len(truncated),
        "truncated": [{"index": index, "tokens": tokens} for index, tokens in truncated],
        "methods": {m: {k: per_method[m][k] for k in ("p_ppl", "u_ppl", "kl_gold", "kl_all")}
                    for m in config.methods},
        "mlm_unary_u_ppl": per_method[config.methods[0]]["mlm_unary_u_ppl"],  # the same for every method
    }
    for method in ("ag", "ag_converged"):
        if method not in config.methods:
            continue
        ag = [r["metrics"][method] for r in records]
        summary[method] = {
            "iters_mean": float(np.mean([x["iters"] for x in ag])),
            "iters_max": int(max(x["iters"] for x in ag)),
            "delta_max": float(max(x["delta"] for x in ag)),
            "objective_mean": float(np.mean([x["objective"] for x in ag])),
        }
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    """The paper-style table of a summary, as Markdown."""
    c = summary["config"]
    ag = summary.get("ag")
    lines = [
        f"## {c['model']} on {c['data']}, {c['masking']} masking",
        "",
        f"{_count(summary['n_pairs'], 'pair')}, seed {c['seed']}, {c['dtype']}, {matmul_precision_of(c)} products"
        + (f"; AG: {ag['iters_mean']:g} iterations on average, "
           f"estimated L1 distance from the fixed point up to {ag['delta_max']:.2g}"
           if ag else ""),
        "",
        *_accounts(summary),
        "",
        "| Method | P-PPL | U-PPL | KL (gold) | KL (all) |",
        "|:--|--:|--:|--:|--:|",
    ]
    for method, m in summary["methods"].items():
        lines.append(f"| {LABELS[method]} | {m['p_ppl']:.2f} | {m['u_ppl']:.2f} | {m['kl_gold']:.3f} "
                     f"| {m['kl_all']:.3f} |")
    lines.append(f"| MLM conditionals | – | {summary['mlm_unary_u_ppl']:.2f} | – | – |")
    return "\n".join(lines) + "\n"


LISTED = 10  # indices listed in summary.md; summary.json lists all


def _accounts(summary: dict[str, Any]) -> list[str]:
    """One line: the sentences skipped and why, and those cut to the model's maximum (by index)."""
    unit = summary.get("unit", "sentence")
    skipped, cut = summary.get("skipped", []), summary.get("truncated", [])
    maximum = f"the model's maximum of {summary['max_tokens']} tokens" if summary.get("max_tokens") else (
        "the model's maximum")

    def listed(items: list[str]) -> str:
        more = f"; {len(items) - LISTED} more in summary.json" if len(items) > LISTED else ""
        return " (" + "; ".join(items[:LISTED]) + more + ")"

    parts = [f"{_count(len(skipped), unit)} skipped" + listed([f"{s['index']}: {s['reason']}" for s in skipped])
             if skipped else f"no {unit} skipped",
             f"{_count(len(cut), unit)} cut to {maximum}" + listed([f"{t['index']}: {t['tokens']} tokens" for t in cut])
             if cut else f"none cut to {maximum}"]
    line = "; ".join(parts) + "."
    return [line[0].upper() + line[1:]]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def summary_csv(summary: dict[str, Any]) -> str:
    """One row per method (and one for the MLM's own conditionals) as CSV."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "label", "p_ppl", "u_ppl", "kl_gold", "kl_all", "n_pairs"])
    n = summary["n_pairs"]
    for method, m in summary["methods"].items():
        writer.writerow([method, LABELS[method], repr(m["p_ppl"]), repr(m["u_ppl"]),
                         repr(m["kl_gold"]), repr(m["kl_all"]), n])
    writer.writerow(["mlm_unary", "MLM conditionals", "", repr(summary["mlm_unary_u_ppl"]), "", "", n])
    return buffer.getvalue()


def summary_files(summary: dict[str, Any]) -> dict[str, str]:
    """``{file name: text}`` of ``summary.json``, ``summary.md`` and ``summary.csv``."""
    texts = (json.dumps(summary, indent=2) + "\n", summary_markdown(summary), summary_csv(summary))
    return dict(zip(SUMMARY_FILES, texts))
