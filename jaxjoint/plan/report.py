"""A plan's numbers: the roofline estimate, the report, its table and JSON.

Every time here is an estimate from published peaks, not a measurement: the
tables stage at the chip's dense matmul rate for the arithmetic its products
compile to (``priced_arithmetic``: three TF32 passes for ``float32`` on an NVIDIA
GPU, six bfloat16 passes on a TPU, ...) for the counted FLOPs it executes (padding
included), each whole-table pass of the joints and metrics at the chip's HBM
bandwidth. It is a floor: a run is slower by whatever the compiled kernels miss of
the peaks.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jaxjoint.models.precision import ARITHMETIC
from jaxjoint.plan.compile import ProgramCost
from jaxjoint.plan.fit import Phase
from jaxjoint.plan.hardware import Chip

GIB = 2**30

# What each arithmetic of ``precision.ARITHMETIC`` computes, for the printed plan.
ARITHMETIC_NAMES = {
    "f32": "float32",
    "tf32": "one TF32 pass",
    "tf32_x3": "three TF32 passes",
    "bf16": "one bfloat16 pass",
    "bf16_x3": "three bfloat16 passes",
    "bf16_x6": "six bfloat16 passes",
}


def priced_arithmetic(platform: str, dtype: str, matmul_precision: str) -> str:
    """The arithmetic a run's matrix products compile to on ``platform`` (``gpu``,
    ``tpu``, ``cpu``; ``cuda``/``rocm`` count as ``gpu``): one bfloat16 pass with
    ``dtype`` bfloat16, else what ``matmul_precision`` asks of that backend."""
    if dtype == "bfloat16":
        return "bf16"
    platform = "gpu" if platform in ("gpu", "cuda", "rocm") else platform if platform == "tpu" else "cpu"
    return ARITHMETIC[platform, matmul_precision]


def table_passes(methods: tuple[str, ...], ag_iterations: int, ag_converged_iterations: int = 0) -> float:
    """Whole-table reads and writes per pair, in units of one V x V float32 table,
    for the assembly, joints and metrics of ``methods`` (the code's passes:
    jaxjoint.joints, jaxjoint.metrics).

    assembly: reads the two tables the forward passes wrote and writes the pair (4);
    every joint: its normalisers read both tables (2); mlm, mrf, mrf_logit, hcb: one logsumexp pass
    over both (2), metrics' J: two passes over both (4); ag and ag_converged: qA + qB built
    once (read 2, write 1), each of their passes (``ag_iterations``, ``ag_converged_iterations``;
    0 where a plan prices them apart, at a compiled pass's bytes) reads it once, J read both (2).
    """
    passes = 4.0
    for method in methods:
        passes += 2
        if method in ("ag", "ag_converged"):
            passes += 3 + (ag_iterations if method == "ag" else ag_converged_iterations) + 2
        else:
            passes += 2 + 4
    return passes


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Seconds per pair on the whole mesh, estimated (not measured); the tables
    stage priced at ``flop_per_s``, the chip's rate for ``arithmetic``."""

    tables_seconds: float
    joints_seconds: float
    xla_tables_seconds: float | None  # the TPU compiler's own estimate, where it gives one
    arithmetic: str
    flop_per_s: float

    @property
    def seconds_per_pair(self) -> float:
        return self.tables_seconds + self.joints_seconds


def roofline(chip: Chip, arithmetic: str, *, executed_flops_per_device: float, tables_bytes_per_device: float,
             table_bytes: int, passes: float, xla_tables_seconds: float | None, ag_passes: float = 0.0,
             ag_pass_bytes: float | None = None) -> Estimate | None:
    """The roofline estimate for one pair with the tables stage's products in
    ``arithmetic`` (``priced_arithmetic``), or None without a published rate for it.
    ``passes`` whole-table passes at ``table_bytes`` each, plus ``ag_passes`` AG passes
    at ``ag_pass_bytes`` each (a compiled pass's bytes; None: the ideal, ``table_bytes``)."""
    peak = chip.peak_flop_per_s.get(arithmetic)
    bandwidth = chip.hbm_bandwidth_bytes_per_s
    if not peak or not bandwidth:
        return None
    tables = max(executed_flops_per_device / peak, tables_bytes_per_device / bandwidth)
    moved = passes * table_bytes + ag_passes * (table_bytes if ag_pass_bytes is None else ag_pass_bytes)
    return Estimate(tables, moved / bandwidth, xla_tables_seconds, arithmetic, peak)


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """The plan for sentences padded to one length bucket (per device unless named)."""

    length: int
    bucket: int
    fits: bool
    chunk_size: int | None
    n_chunks: int | None
    chunk: int | None
    peak_bytes: int | None
    peak_program: str | None
    phases: tuple[Phase, ...]
    flops_per_pair: float | None  # counted (jaxjoint.flops.pair_flops), XLA's count for your own model
    xla_flops_per_pair: float | None  # XLA's count per sequence x 2V, plus the both-masked pass
    executed_flops_per_pair: float | None  # what the devices run, padded rows included (counted per sequence)
    ag_bytes_per_iteration: int | None  # the ideal: the local qA + qB table read once
    estimate: Estimate | None
    programs: tuple[ProgramCost, ...]
    next_chunk_up: ProgramCost | None
    fits_without_prefetch: bool | None = None
    # Programs the compiler refused as over memory; peak_bytes then counts what
    # they said they need (a lower bound).
    refused_programs: tuple[str, ...] = ()
    # Who counted flops_per_pair: "jaxjoint.flops" (the formula of a checkpoint's
    # family) or "XLA" (your own model: its compiled programs' cost analysis).
    flops_counted_by: str = "jaxjoint.flops"
    # One compiled AG pass (compile.ag_pass_program): XLA's count of its bytes per device
    ag_pass_bytes: float | None = None


@dataclasses.dataclass(frozen=True)
class PlanReport:
    """Everything ``jaxjoint plan`` prints; ``to_json()`` for ``--json``."""

    target: str
    chip: Chip
    devices: int
    hosts: int
    usable_bytes_per_device: int | None
    memory_note: str
    model: str
    vocab_size: int
    dtype: str
    matmul_precision: str
    arithmetic: str  # what the products compile to (priced_arithmetic)
    methods: tuple[str, ...]
    ag_iterations: int
    prefetch: int
    params_bytes: int
    buckets: tuple[BucketPlan, ...]
    reason: str | None
    versions: dict[str, str]
    compile_seconds: float
    # Your own model (an MLMProtocol): its products are its function's, and
    # matmul_precision only prices them.
    own_model: bool = False
    ag_converged_passes: int | None = None  # the passes ag_converged is priced at (None: not run)

    @property
    def fits(self) -> bool:
        return all(b.fits for b in self.buckets)

    @property
    def worst(self) -> BucketPlan:
        """The longest bucket: the one that needs the most."""
        return max(self.buckets, key=lambda b: b.bucket)

    def to_json(self) -> dict[str, Any]:
        worst = self.worst
        est = worst.estimate
        return {
            "target": self.target,
            "chip": self.chip.name,
            "devices": self.devices,
            "hosts": self.hosts,
            "model": self.model,
            "vocab_size": self.vocab_size,
            "dtype": self.dtype,
            "matmul_precision": self.matmul_precision,
            "own_model": self.own_model,
            "arithmetic": self.arithmetic,
            "priced_flop_per_s": self.chip.peak_flop_per_s.get(self.arithmetic),
            "methods": list(self.methods),
            "ag_iterations": self.ag_iterations,
            "ag_converged_passes": self.ag_converged_passes,
            "prefetch": self.prefetch,
            "fits": self.fits,
            "reason": self.reason,
            "chunk_size": worst.chunk_size,
            "peak_bytes_per_device": worst.peak_bytes if self.fits else max(
                (b.peak_bytes or 0) for b in self.buckets),
            "peak_is_lower_bound": any(b.refused_programs for b in self.buckets),
            "hbm_bytes_per_device": self.chip.memory_bytes,
            "usable_bytes_per_device": self.usable_bytes_per_device,
            "usable_memory_note": self.memory_note,
            "params_bytes": self.params_bytes,
            "flops_per_pair": worst.flops_per_pair,
            "flops_counted_by": worst.flops_counted_by,
            "xla_flops_per_pair": worst.xla_flops_per_pair,
            "estimated_seconds_per_pair": None if est is None else est.seconds_per_pair,
            "estimated_hours_per_1000_pairs": None if est is None else est.seconds_per_pair * 1000 / 3600,
            "estimate_kind": (f"estimated (roofline at the published {self.arithmetic} rate and HBM bandwidth; "
                              "compiled, not run)"),
            "buckets": [_bucket_json(b) for b in self.buckets],
            "peaks": {"flop_per_s": self.chip.peak_flop_per_s, "flop_per_s_sources": self.chip.peak_sources,
                      "hbm_bytes_per_s": self.chip.hbm_bandwidth_bytes_per_s, "sources": list(self.chip.sources)},
            "versions": self.versions,
            "compile_seconds": self.compile_seconds,
        }


def chunk_bound(b: BucketPlan) -> str | None:
    """What stopped the chunk growing: ``memory`` (the next size up does not fit),
    ``all rows`` (one chunk holds every row of the device) or ``cap`` (``MAX_CHUNK``)."""
    if b.chunk_size is None:
        return None
    if b.next_chunk_up is not None:
        return "memory"
    return "all rows" if b.n_chunks == 1 else "cap"


def _bucket_json(b: BucketPlan) -> dict[str, Any]:
    est = b.estimate
    return {
        "length": b.length, "bucket": b.bucket, "fits": b.fits, "fits_without_prefetch": b.fits_without_prefetch,
        "chunk_size": b.chunk_size, "chunk_bound": chunk_bound(b), "n_chunks": b.n_chunks, "chunk": b.chunk,
        "peak_bytes_per_device": b.peak_bytes, "peak_program": b.peak_program,
        "peak_is_lower_bound": bool(b.refused_programs), "refused_programs": list(b.refused_programs),
        "flops_per_pair": b.flops_per_pair, "flops_counted_by": b.flops_counted_by,
        "xla_flops_per_pair": b.xla_flops_per_pair,
        "executed_flops_per_pair": b.executed_flops_per_pair,
        "ag_bytes_per_iteration_ideal": b.ag_bytes_per_iteration,
        "ag_pass_bytes_compiled": b.ag_pass_bytes,
        "estimated_seconds_per_pair": None if est is None else est.seconds_per_pair,
        "estimated_tables_seconds": None if est is None else est.tables_seconds,
        "priced_arithmetic": None if est is None else est.arithmetic,
        "priced_flop_per_s": None if est is None else est.flop_per_s,
        "estimated_joints_metrics_seconds": None if est is None else est.joints_seconds,
        "xla_estimated_tables_seconds": None if est is None else est.xla_tables_seconds,
        "phases": [{"program": p.program, "held_bytes": p.held_bytes, "program_bytes": p.program_bytes,
                    "total_bytes": p.total_bytes} for p in b.phases],
        "programs": [dataclasses.asdict(p) for p in b.programs],
        "next_chunk_up": None if b.next_chunk_up is None else dataclasses.asdict(b.next_chunk_up),
    }


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def format_plan(report: PlanReport) -> str:
    """The printed plan: a header, one row per length bucket, the verdict."""
    chip = report.chip
    rate = chip.peak_flop_per_s.get(report.arithmetic)
    priced = (f"at {rate / 1e12:,.4g} TFLOP/s a device ({chip.peak_sources.get(report.arithmetic, 'published')})"
              if rate else f"no published rate for {report.arithmetic} on this chip")
    lines = [
        f"plan: {report.model} (V = {report.vocab_size:,}) on {report.target}: {report.devices} x {chip.name}"
        f"{f' over {report.hosts} hosts' if report.hosts > 1 else ''}, {report.dtype}, "
        f"methods {','.join(report.methods)}, {_ag_passes_text(report)}, prefetch {report.prefetch}",
        (f"products: as your model's function asks; priced as matmul precision {report.matmul_precision}, "
         f"{report.arithmetic} ({ARITHMETIC_NAMES[report.arithmetic]}), {priced}" if report.own_model else
         f"products: matmul precision {report.matmul_precision} compiles to {report.arithmetic} "
         f"({ARITHMETIC_NAMES[report.arithmetic]}); priced {priced}"),
        f"memory per device: {_gib(chip.memory_bytes)}, usable {_gib(report.usable_bytes_per_device)} "
        f"({report.memory_note}); parameters {_gib(report.params_bytes)}",
        "compiled, not run: memory is XLA's analysis of the compiled programs; times are estimated "
        "(roofline at published peaks), not measured",
        "",
    ]
    header = ["length", "bucket", "fits", "chunk", "peak/device", "at", "PFLOP/pair", "XLA PFLOP/pair",
              "est. s/pair", "est. h/1000 pairs"]
    rows = []
    for b in report.buckets:
        est = b.estimate
        rows.append([
            str(b.length), str(b.bucket), "yes" if b.fits else "NO",
            "-" if b.chunk_size is None else f"{b.chunk_size} ({b.n_chunks} x {b.chunk}; {chunk_bound(b)})",
            (">= " if b.refused_programs else "") + _gib(b.peak_bytes), b.peak_program or "-",
            "-" if b.flops_per_pair is None else f"{b.flops_per_pair / 1e15:.3f}",
            "-" if b.xla_flops_per_pair is None else f"{b.xla_flops_per_pair / 1e15:.3f}",
            "-" if est is None else f"{est.seconds_per_pair:.3g}",
            "-" if est is None else f"{est.seconds_per_pair * 1000 / 3600:.3g}",
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines.append("")
    worst = report.worst
    if worst.flops_counted_by != "jaxjoint.flops":
        lines.append(f"FLOPs counted by {worst.flops_counted_by} (your own model: no formula for its function)")
    if worst.estimate is not None:
        est = worst.estimate
        xla = "" if est.xla_tables_seconds is None else (
            f"; the TPU compiler's own estimate of the tables stage {_duration(est.xla_tables_seconds)}")
        lines.append(
            f"estimated per pair at bucket {worst.bucket}: tables stage {_duration(est.tables_seconds)}, joints and "
            f"metrics {_duration(est.joints_seconds)}; 1000 pairs {_duration(est.seconds_per_pair * 1000)}{xla}")
    if worst.ag_bytes_per_iteration:
        compiled = "" if worst.ag_pass_bytes is None else (
            f", {_gib(worst.ag_pass_bytes)} compiled ({worst.ag_pass_bytes / worst.ag_bytes_per_iteration:.2f}x; "
            "XLA's count of one pass, its costliest branch, with a Pallas kernel's operands and results; "
            "the estimate prices AG passes at this)")
        lines.append(f"AG pass: {_gib(worst.ag_bytes_per_iteration)} per device at the ideal (the local "
                     f"qA + qB table read once){compiled}")
    lines.append("fits" if report.fits else f"does not fit: {report.reason}")
    return "\n".join(lines)


def _ag_passes_text(report: PlanReport) -> str:
    """``AG 40 passes`` / ``AG 40 passes, AG (converged) 500 passes (assumed)``: what AG is priced at."""
    parts = []
    if "ag" in report.methods or report.ag_converged_passes is None:
        parts.append(f"AG {report.ag_iterations} passes")
    if report.ag_converged_passes is not None:
        parts.append(f"AG (converged) {report.ag_converged_passes} passes (assumed: --ag-passes)")
    return ", ".join(parts)


def write_json(report: PlanReport, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report.to_json(), f, indent=2)
        f.write("\n")
