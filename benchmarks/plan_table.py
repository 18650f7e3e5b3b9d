"""The paper's settings planned for accelerators that are not here: compiled, not run.

    python -m benchmarks.plan_table                       # every setting x target x precision below
    python -m benchmarks.plan_table --targets h100 --rows bert-base-cased/32 --precisions float32

For each setting (model, bucket length), target and precision, ``jaxjoint.plan.make_plan``
compiles the run's programs for compile-only devices and reports whether a pair
fits, the chunk, the peak memory per device and a roofline estimate of the time
per pair at the published dense rate of the arithmetic the products compile to
(``float32``: three TF32 passes on NVIDIA, six bfloat16 passes on TPU), beside the
published approach's ~2 GPU-days per 1000 pairs (DESIGN.md §2). Prints a Markdown
table and writes JSON. Nothing is measured: every time here is an estimate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

from jaxjoint.plan import format_plan, make_plan
from jaxjoint.plan.cache import compiler_versions

# The paper's eight settings differ in model and data; masking does not change a
# pair's shapes. SNLI sentences fit the 32-token bucket, XSUM summaries the 64 one.
ROWS = {
    "bert-base-cased/32": ("bert-base-cased", 32, "bert-base-cased, SNLI (random, contiguous)"),
    "bert-base-cased/64": ("bert-base-cased", 64, "bert-base-cased, XSUM (random, contiguous)"),
    "bert-large-cased/32": ("bert-large-cased", 32, "bert-large-cased, SNLI (random, contiguous)"),
    "bert-large-cased/64": ("bert-large-cased", 64, "bert-large-cased, XSUM (random, contiguous)"),
    "xlm-roberta-large/32": ("xlm-roberta-large", 32, "xlm-roberta-large, 32 tokens"),
}
TARGETS = ("h100", "h100x8", "h200", "v5e:2x2", "v5p:2x2x1")
# (dtype, matmul precision) by name: the paper's float32, TF32-class products, and
# bfloat16 compute (--dtype bfloat16).
PRECISIONS = {
    "float32": ("float32", "float32"),
    "tensorfloat32": ("float32", "tensorfloat32"),
    "bfloat16": ("bfloat16", "bfloat16"),
}
PAPER_HOURS_PER_1000 = 48.0  # ~2 GPU-days per 1000 pairs (DESIGN.md §2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS),
                        help="MODEL/LENGTH settings (default: the paper's, and XLM-R large)")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS),
                        help="float32 (the paper's), tensorfloat32, bfloat16 (--dtype bfloat16)")
    parser.add_argument("--json", default="benchmarks/results/plan/plan_table.json")
    args = parser.parse_args()
    out = Path(args.json)
    results = json.loads(out.read_text())["results"] if out.is_file() else []
    done = {_key(r) for r in results}
    for precision in args.precisions:
        dtype, matmul_precision = PRECISIONS[precision]
        for row in args.rows:
            model, length, label = ROWS.get(row) or (row.rsplit("/", 1)[0], int(row.rsplit("/", 1)[1]), row)
            for target in args.targets:
                if (row, target, dtype, matmul_precision) in done:
                    continue
                start = time.perf_counter()
                report = make_plan(target, model, lengths=[length], dtype=dtype, matmul_precision=matmul_precision,
                                   suggest=False)
                print(format_plan(report), flush=True)
                entry = {"row": row, "label": label, "target": target, "dtype": dtype,
                         "matmul_precision": matmul_precision, "wall_seconds": time.perf_counter() - start,
                         "plan": report.to_json()}
                results = _save(out, entry)
    print(markdown(results))


def _key(r: dict) -> tuple:
    return r["row"], r["target"], r["dtype"], r.get("matmul_precision")


def _save(out: Path, entry: dict) -> list[dict]:
    """Add ``entry`` to the JSON at ``out`` (read again first: several runs may add
    to one file) and return every result, in setting then target order."""
    results = json.loads(out.read_text())["results"] if out.is_file() else []
    results = [r for r in results if _key(r) != _key(entry)] + [entry]
    rows = {row: i for i, row in enumerate(ROWS)}
    targets = {target: i for i, target in enumerate(TARGETS)}
    precisions = {value: i for i, value in enumerate(PRECISIONS.values())}
    results.sort(key=lambda r: (rows.get(r["row"], len(rows)), r["row"], targets.get(r["target"], len(targets)),
                                r["target"], precisions.get((r["dtype"], r["matmul_precision"]), len(precisions))))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"kind": "compiled, not run", "date": datetime.date.today().isoformat(),
                               "versions": compiler_versions(), "results": results}, indent=1) + "\n")
    return results


def markdown(results: list[dict]) -> str:
    """The RESULTS.md table of ``results``."""
    lines = ["| setting | target | precision | priced at (TFLOP/s a device) | fits | chunk (bound) | "
             "peak / usable per device | at | est. s/pair | est. h per 1000 pairs | est. device-h per 1000 pairs | "
             "vs the paper's ~48 GPU-h |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r["plan"]
        bucket = max(p["buckets"], key=lambda b: b["bucket"])
        fits = p["fits"]
        chunk = "-"
        if fits:
            bound = "all rows" if bucket["n_chunks"] == 1 else ("memory" if bucket["next_chunk_up"] else "cap")
            chunk = f"{p['chunk_size']} ({bound})"
        at_least = ">= " if bucket.get("peak_is_lower_bound") else ""
        peak = f"{at_least}{p['peak_bytes_per_device'] / 2**30:,.1f} / {p['usable_bytes_per_device'] / 2**30:,.1f} GiB"
        seconds = hours = device_hours = ratio = "-"
        if fits and p["estimated_seconds_per_pair"] is not None:
            h = p["estimated_hours_per_1000_pairs"]
            seconds, hours = f"{p['estimated_seconds_per_pair']:.3g}", f"{h:.3g}"
            device_hours = f"{h * p['devices']:.3g}"
            ratio = f"{PAPER_HOURS_PER_1000 / (h * p['devices']):,.0f}x fewer"
        precision = next((name for name, v in PRECISIONS.items() if v == (r["dtype"], r["matmul_precision"])),
                         f"{r['dtype']}/{r['matmul_precision']}")
        rate = p["priced_flop_per_s"]
        priced = f"{p['arithmetic']} at {rate / 1e12:,.4g}" if rate else p["arithmetic"]
        lines.append(f"| {r['label']} | {r['target']} | {precision} | {priced} | {'yes' if fits else '**no**'} | "
                     f"{chunk} | {peak} | {bucket['peak_program']} | {seconds} | {hours} | {device_hours} | "
                     f"{ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
