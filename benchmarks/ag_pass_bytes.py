"""XLA's count of the bytes one AG pass moves, compiled deviceless for GPU and TPU targets.

    python -m benchmarks.ag_pass_bytes [--targets h100 v5e:2x2] [--vocab 1024 4096 28996] [--json PATH]

Compiles one pass (``plan.compile.ag_pass_program``: ``ag.iteration_sums`` on the
loop-invariant table, without the log-space fall-back) for each target and V, and
sets XLA's "bytes accessed" per device against one read of the local float32 table.
Compiled, not run: no GPU or TPU is needed (JAX's CUDA plugin and libtpu build
compile-only devices). Prints a table and writes JSON; not a test.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin must not look for a GPU

from benchmarks.common import machine, print_table, write_json  # noqa: E402
from jaxjoint.plan.compile import ag_pass_program, local_rows  # noqa: E402
from jaxjoint.plan.targets import resolve_target  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=["h100", "v5e:2x2"])
    parser.add_argument("--vocab", nargs="+", type=int, default=[1024, 2048, 4096, 28996])
    parser.add_argument("--json", default="benchmarks/results/ag_pass_bytes.json")
    args = parser.parse_args()
    rows = []
    for name in args.targets:
        target = resolve_target(name)
        mesh = target.mesh()
        for v in args.vocab:
            start = time.perf_counter()
            cost = ag_pass_program(mesh, v)
            one_read = 4 * local_rows(mesh, v) * v
            rows.append({"target": name, "devices": target.device_count, "vocab": v,
                         "bytes_per_device": cost.bytes_accessed, "one_read_bytes": one_read,
                         "ratio": cost.bytes_accessed / one_read, "peak_bytes": cost.peak_bytes,
                         "compile_s": time.perf_counter() - start})
    print("One AG pass, compiled, not run: XLA's bytes accessed per device / one read of the local table")
    print_table(rows, list(rows[0]))
    write_json(args.json, {"benchmark": "ag_pass_bytes", "kind": "compiled, not run", "machine": machine(),
                           "results": rows})


if __name__ == "__main__":
    main()
