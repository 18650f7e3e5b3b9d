"""Planned against measured on the same shapes: ``jaxjoint plan``'s estimates beside
``benchmarks.end_to_end``'s timings (run both on the GPU first; benchmarks/run_gpu.sh).

    python -m benchmarks.plan_vs_measured PLAN.json END_TO_END.json [...]

Matches each measured (shape, length, dtype) with the plan of that model at that
bucket and dtype, and prints estimated against measured seconds per pair and the
tables stage alone (the roofline is a floor: measured / estimated is what the
compiled kernels miss of the published peaks).
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import print_table, write_json
from jaxjoint.tables import bucket_length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", help="JSON written by benchmarks.plan_table")
    parser.add_argument("measured", nargs="+", help="JSON written by benchmarks.end_to_end")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    plans = {}
    for r in json.load(open(args.plan))["results"]:
        p = r["plan"]
        precision = p.get("matmul_precision") or _precision_of(p["dtype"])
        for b in p["buckets"]:
            plans[(p["model"], b["bucket"], p["dtype"], precision, r["target"])] = b
    rows = []
    for path in args.measured:
        for m in json.load(open(path))["results"]:
            bucket = bucket_length(m["length"], 512)
            measured = (m["shape"], bucket, m["dtype"], m.get("matmul_precision") or _precision_of(m["dtype"]))
            for (model, b, dtype, precision, target), plan in plans.items():
                if (model, b, dtype, precision) != measured or plan["estimated_seconds_per_pair"] is None:
                    continue
                measured_total = m["s_total"]
                rows.append({
                    "shape": model, "length": m["length"], "bucket": bucket, "dtype": dtype,
                    "matmul_precision": precision, "plan_target": target,
                    "chunk_planned": plan["chunk_size"], "est_s_tables": plan["estimated_tables_seconds"],
                    "measured_s_tables": m["s_tables"], "est_s_pair": plan["estimated_seconds_per_pair"],
                    "measured_s_pair": measured_total,
                    "measured_over_estimated": measured_total / plan["estimated_seconds_per_pair"],
                    "planned_peak_gib": plan["peak_bytes_per_device"] / 2**30,
                })
    print_table(rows, ["shape", "length", "dtype", "matmul_precision", "plan_target", "chunk_planned", "est_s_tables",
                       "measured_s_tables", "est_s_pair", "measured_s_pair", "measured_over_estimated",
                       "planned_peak_gib"])
    if args.json:
        write_json(args.json, {"kind": "estimated (compiled, not run) against measured", "results": rows})


def _precision_of(dtype: str) -> str:
    """The matmul precision a run of ``dtype`` has when none is named (``config.matmul_precision_of``)."""
    return "bfloat16" if dtype == "bfloat16" else "float32"


if __name__ == "__main__":
    main()
