"""``make_plan``: compile a run's programs for a target and decide whether it fits."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from jaxjoint.errors import UserError
from jaxjoint.flops import pair_flops, sequence_flops
from jaxjoint.joints import AG_ITERS, AG_MAX_ITERS, ALL_METHODS, METHODS
from jaxjoint.models.config import EncoderConfig
from jaxjoint.models.mlm import DTYPES, MaskedLM
from jaxjoint.models.precision import check_mode
from jaxjoint.models.protocol import MLMProtocol
from jaxjoint.plan import fit
from jaxjoint.plan.cache import compiler_versions
from jaxjoint.plan.compile import ProgramCost, local_rows, params_bytes
from jaxjoint.plan.models import OwnModel, PlannedModel, own_model, planning_config
from jaxjoint.plan.report import BucketPlan, PlanReport, priced_arithmetic, roofline, table_passes
from jaxjoint.plan.targets import Target, resolve_target, target_for_devices
from jaxjoint.sharding import local_mesh, mesh_size
from jaxjoint.tables import CHUNK_STEP, MAX_CHUNK, PREFETCH, bucket_length, chunking

DEFAULT_LENGTHS = (32,)


# AG to a tolerance: the passes a plan assumes per pair unless told (--ag-passes). The
# accelerated (Newton) solver's median to tol 1e-6 on the embedded model's 300 pairs is
# 60 (p90 85, max 112); on a V = 8192 random model 126 (benchmarks/RESULTS.md,
# 2026-12-07/08). Larger vocabularies may need more: pass --ag-passes.
AG_CONVERGED_PASSES = 60


def _ag_iterations(ag: dict[str, Any], assumed: int | None = None) -> int:
    """The AG passes a plan prices ``ag`` at: its fixed count, or under a tolerance
    ``assumed`` (``--ag-passes``; default ``AG_CONVERGED_PASSES``), never more than the cap."""
    if "tol" not in ag:
        return ag.get("iters") or AG_ITERS
    return min(assumed or AG_CONVERGED_PASSES, ag.get("max_iters") or AG_MAX_ITERS)


def _ag_converged_passes(ag: dict[str, Any], methods: tuple[str, ...], assumed: int | None) -> int | None:
    """The passes ``ag_converged`` is priced at (None when it is not run)."""
    if "ag_converged" not in methods:
        return None
    return _ag_iterations({"tol": None, **ag.get("ag_converged", {})}, assumed)


def make_plan(
    target: str | Target,
    model: str | EncoderConfig | MLMProtocol,
    *,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    dtype: str | None = None,
    matmul_precision: str = "float32",
    methods: Sequence[str] = METHODS,
    ag_options: dict[str, Any] | None = None,
    prefetch: int = PREFETCH,
    max_chunk: int = MAX_CHUNK,
    suggest: bool = True,
    ag_passes: int | None = None,
) -> PlanReport:
    """Compile, without the hardware, the programs a run executes and report per
    device whether a pair fits, with which chunk, and how long it should take.

    target: a TARGET string (``h100``, ``h100x8``, ``v5e:2x2``, ``local``; see
      ``targets.resolve_target``) or a resolved ``Target``.
    model: a shipped name, hub name or checkpoint directory (``models.planning_config``),
      an ``EncoderConfig``, a ``MaskedLM``, or your own JAX model: any
      ``MLMProtocol`` (``FunctionMLM``; its parameters may be ``jax.ShapeDtypeStruct``
      leaves). Your own model's programs are compiled and analysed like a
      checkpoint's; its FLOPs are XLA's count (no formula for a function).
    lengths: sentence lengths in tokens (special tokens included); each is planned
      at its bucket (``tables.bucket_length``).
    dtype: compute dtype, ``float32`` or ``bfloat16``; default the model's own
      (``float32`` for a name or config).
    matmul_precision: the arithmetic of float32 products, ``float32``,
      ``tensorfloat32`` or ``bfloat16`` (``jaxjoint.models.precision``). For your
      own model it only prices the estimate: its function's products compute as
      its own precision arguments say.
    methods: the joints to derive (their programs and metrics are compiled).
    ag_options: AG's ``iters`` or ``tol``/``max_iters`` (as ``derive_joint`` takes them).
    prefetch: pairs queued on the devices behind the one being scored.
    max_chunk: the largest chunk to consider.
    suggest: when it does not fit, compile alternatives (bfloat16, more devices)
      to name one that fits in ``reason``.
    ag_passes: the passes over the table a pair's AG to a tolerance takes
      (``ag`` with ``tol``, ``ag_converged``); default ``AG_CONVERGED_PASSES``. AG is
      priced at these passes x the bytes of one compiled pass / HBM bandwidth.

    Raises ``UserError`` for an unknown target, model, dtype or method.
    """
    name, config = _planned_model(model)
    if dtype is None:
        dtype = (config.dtype if isinstance(config, OwnModel) else model.dtype if isinstance(model, MaskedLM)
                 else "float32")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if isinstance(config, OwnModel) and dtype != config.dtype:
        config = own_model(config.mlm.with_dtype(dtype))  # a FunctionMLM refuses: its dtype is its function's
    check_mode(matmul_precision)
    methods = tuple(methods)
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise UserError(f"unknown method {unknown[0]!r}; choose from {', '.join(ALL_METHODS)}")
    if prefetch < 0:
        raise UserError(f"prefetch must be >= 0, got {prefetch}")
    if not lengths:
        raise UserError("give at least one sentence length")
    if ag_passes is not None and ag_passes < 1:
        raise UserError(f"ag_passes must be >= 1, got {ag_passes}")
    resolved = target if isinstance(target, Target) else resolve_target(target)
    ag = dict(ag_options or {})
    if ag_passes is not None:
        ag["passes"] = ag_passes  # carried to every bucket's pricing (not a derive_joint option)
    start = time.perf_counter()
    buckets = tuple(_plan_bucket(resolved, config, length, dtype, matmul_precision, methods, ag, prefetch, max_chunk)
                    for length in lengths)
    report = PlanReport(
        target=resolved.name, chip=resolved.chip, devices=resolved.device_count, hosts=resolved.hosts,
        usable_bytes_per_device=resolved.usable_bytes_per_device, memory_note=resolved.memory_note,
        model=name, vocab_size=config.vocab_size, dtype=dtype, matmul_precision=matmul_precision,
        arithmetic=priced_arithmetic(resolved.chip.platform, dtype, matmul_precision), methods=methods,
        ag_iterations=_ag_iterations(ag, ag.get("passes")),
        ag_converged_passes=_ag_converged_passes(ag, methods, ag.get("passes")),
        prefetch=prefetch, params_bytes=params_bytes(config), buckets=buckets, reason=None,
        versions=compiler_versions(), compile_seconds=0.0, own_model=isinstance(config, OwnModel))
    reason = None
    if not report.fits:
        reason = _reason(report, resolved, config, lengths, dtype, matmul_precision, methods, ag, prefetch, max_chunk,
                         suggest)
    return dataclasses.replace(report, reason=reason, compile_seconds=time.perf_counter() - start)


def _planned_model(model: Any) -> tuple[str, PlannedModel]:
    """(display name, what the programs are built from) for ``make_plan``'s ``model``."""
    if isinstance(model, EncoderConfig):
        return "config", model
    if isinstance(model, OwnModel):
        return model.name, model
    if isinstance(model, MaskedLM):  # a checkpoint: its config, with the counted FLOPs
        return f"{model.config.family} checkpoint", model.config
    if isinstance(model, (str, os.PathLike)):
        return planning_config(str(model))
    planned = own_model(model)
    return planned.name, planned


def _plan_bucket(target: Target, config: PlannedModel, length: int, dtype: str, matmul_precision: str,
                 methods: tuple[str, ...], ag: dict[str, Any], prefetch: int, max_chunk: int) -> BucketPlan:
    mesh = target.mesh()
    n = mesh_size(mesh)
    bucket = bucket_length(length, config.max_positions)
    converged = ag.get("ag_converged", {})  # EvalConfig.ag_options() carries ag_converged's inside
    options = {"ag": {k: v for k, v in ag.items() if k not in ("ag_converged", "passes")}, "ag_converged": converged}
    both, assemble, joints, metrics, unary = fit.other_programs(mesh, config, bucket, dtype, methods, options,
                                                                matmul_precision=matmul_precision)
    tables_cost = functools.partial(fit.tables_cost, mesh, config, bucket, dtype, matmul_precision=matmul_precision)
    params = params_bytes(config)
    usable = target.usable_bytes_per_device
    if usable is None:  # no memory limit known: the largest candidate
        cost = tables_cost(max_chunk)
        n_chunks, chunk = chunking(local_rows(mesh, config.vocab_size), max_chunk)
        choice = fit.ChunkChoice(min(max_chunk, chunk), n_chunks, chunk, cost, None, 1)
    else:
        choice = fit.run_chunk(mesh, config, bucket, dtype, usable_bytes=usable, prefetch=prefetch,
                               max_chunk=max_chunk, matmul_precision=matmul_precision)
    tables = choice.cost if choice else tables_cost(CHUNK_STEP)
    stage = fit.StagePrograms(tables, both, assemble, joints, metrics, unary)
    table_bytes = 4 * local_rows(mesh, config.vocab_size) * config.vocab_size
    phases = fit.phases(stage, params, prefetch, table_bytes)
    refused = any(p.refused for p in phases)
    known = [p for p in phases if p.total_bytes is not None]
    worst = max(known, key=lambda p: p.total_bytes, default=None)
    peak = None if worst is None else worst.total_bytes
    fits = choice is not None and not refused and (usable is None or peak <= usable)
    fits_without = None
    if not fits and prefetch > 0 and usable is not None and not refused:
        bare = fit.phases(stage, params, 0, table_bytes)
        fits_without = all(p.total_bytes <= usable for p in bare if not p.program.startswith("tables")) and (
            fit.tables_fit(tables_cost(CHUNK_STEP), usable))

    n_chunks, chunk = (choice.n_chunks, choice.chunk) if choice else chunking(
        local_rows(mesh, config.vocab_size), CHUNK_STEP)
    xla = None
    if tables.flops and both.flops:
        # XLA counts the chunk loop's body, one chunk, once: per sequence = flops / chunk.
        xla = 2 * config.vocab_size * tables.flops / chunk + both.flops
    if isinstance(config, OwnModel):  # no formula for a function: XLA's count is the count
        counted = xla
        per_sequence, both_masked = (tables.flops / chunk, both.flops) if xla else (None, None)
    else:
        counted = pair_flops(config, bucket)
        per_sequence, both_masked = sequence_flops(config, bucket), sequence_flops(config, bucket, 2)
    executed_per_device = None if per_sequence is None else 2 * n_chunks * chunk * per_sequence + both_masked
    table_bytes = tables.output_bytes or table_bytes
    # Parameters are read once per chunk step, the table written once.
    tables_bytes = 2 * n_chunks * params + 2 * table_bytes
    xla_seconds = None
    if tables.optimal_seconds and both.optimal_seconds:
        xla_seconds = 2 * n_chunks * tables.optimal_seconds + both.optimal_seconds
    ag_runs = [m for m in methods if m in ("ag", "ag_converged")]
    ag_pass = fit.ag_pass_cost(mesh, config.vocab_size) if ag_runs else None
    ag_pass_bytes = None if ag_pass is None or ag_pass.refused else ag_pass.bytes_accessed
    ag_passes = (_ag_iterations(ag, ag.get("passes")) if "ag" in methods else 0) + (
        _ag_converged_passes(ag, methods, ag.get("passes")) or 0)
    estimate = None if executed_per_device is None else roofline(
        target.chip, priced_arithmetic(target.chip.platform, dtype, matmul_precision),
        executed_flops_per_device=executed_per_device, tables_bytes_per_device=tables_bytes,
        table_bytes=table_bytes, passes=table_passes(methods, 0), xla_tables_seconds=xla_seconds,
        ag_passes=ag_passes, ag_pass_bytes=ag_pass_bytes)
    programs: list[ProgramCost] = [tables, both, assemble, *joints.values(), *metrics.values(), unary]
    return BucketPlan(
        length=length, bucket=bucket, fits=fits, chunk_size=choice.chunk_size if choice else None,
        n_chunks=choice.n_chunks if choice else None, chunk=choice.chunk if choice else None,
        peak_bytes=peak, peak_program=None if worst is None else worst.program, phases=tuple(phases),
        refused_programs=tuple(p.program for p in phases if p.refused),
        flops_per_pair=counted, xla_flops_per_pair=xla,
        executed_flops_per_pair=None if executed_per_device is None else n * executed_per_device,
        ag_bytes_per_iteration=table_bytes if ag_runs else None, ag_pass_bytes=ag_pass_bytes, estimate=estimate,
        programs=tuple(programs), next_chunk_up=choice.next_up if choice else None,
        fits_without_prefetch=fits_without,
        flops_counted_by="XLA" if isinstance(config, OwnModel) else "jaxjoint.flops")


def _reason(report: PlanReport, target: Target, config: PlannedModel, lengths, dtype, matmul_precision, methods,
            ag, prefetch, max_chunk, suggest: bool) -> str:
    """One line: what does not fit, and what would (compiled, when ``suggest``)."""
    worst = max((b for b in report.buckets if not b.fits), key=lambda b: b.peak_bytes or 0)
    v = config.vocab_size
    pair_gb = 2 * 4 * v * v / 1e9
    usable = target.usable_bytes_per_device
    at_least = "at least " if worst.refused_programs else ""
    where = (f"peak {at_least}{_size(worst.peak_bytes)} per device at '{worst.peak_program}'"
             if worst.peak_bytes is not None else "the compiler refused programs as too large")
    if worst.refused_programs:
        where += f"; the compiler refused {len(worst.refused_programs)} of its programs as over memory"
    tables = f"{pair_gb:,.1f} GB" if pair_gb >= 0.1 else f"{pair_gb * 1e3:,.1f} MB"
    head = (f"{report.model} at {worst.bucket} tokens needs more than the {_size(usable)} usable on each of "
            f"{target.device_count} x {target.chip.name} ({where}; one pair's two V x V float32 tables are "
            f"{tables} at V = {v:,})")
    if not suggest:
        return head
    tables_only = all(p.total_bytes is not None and p.total_bytes <= usable
                      for p in worst.phases if not p.program.startswith(("tables", "both")))
    if tables_only and dtype == "float32" and not isinstance(config, OwnModel):  # a function's dtype is its own
        alt = make_plan(target, config, lengths=lengths, dtype="bfloat16", matmul_precision="bfloat16",
                        methods=methods, ag_options=ag,
                        prefetch=prefetch, max_chunk=max_chunk, suggest=False)
        if alt.fits:
            return f"{head}; fits with --dtype bfloat16 (chunk {alt.worst.chunk_size})"
    if worst.fits_without_prefetch:
        return f"{head}; fits without prefetching the next pair (prefetch 0)"
    if target.name == "local":
        local = _more_local_devices(target, worst, report.params_bytes, config, lengths=lengths, dtype=dtype,
                                    matmul_precision=matmul_precision, methods=methods, ag_options=ag,
                                    prefetch=prefetch, max_chunk=max_chunk)
        return head if local is None else f"{head}; {local}"
    candidates = _more_devices(target, worst, report.params_bytes)
    if not candidates:
        return head
    for more in candidates:
        alt = make_plan(resolve_target(more), config, lengths=lengths, dtype=dtype,
                        matmul_precision=matmul_precision, methods=methods, ag_options=ag,
                        prefetch=prefetch, max_chunk=max_chunk, suggest=False)
        if alt.fits:
            if alt.hosts > 1:
                return (f"{head}; fits on {alt.devices} devices ({more}: --distributed global over {alt.hosts} "
                        f"hosts), chunk {alt.worst.chunk_size}")
            return f"{head}; fits on {alt.devices} devices ({more}), chunk {alt.worst.chunk_size}"
    w = max(alt.buckets, key=lambda b: b.peak_bytes or 0)
    at = "" if w.peak_bytes is None else f": peak {_size(w.peak_bytes)} per device at '{w.peak_program}'"
    return f"{head}; not even on {more} ({alt.devices} devices{at})"


def _size(n: int) -> str:
    """Bytes in GiB, or MiB below 0.1 GiB (small models, test budgets)."""
    return f"{n / 2**30:,.1f} GiB" if n >= 0.1 * 2**30 else f"{n / 2**20:,.1f} MiB"


# TPU slice shapes by chip count, smallest first (libtpu topology names).
_TPU_SHAPES = {
    "v5e": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
    "v6e": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
    "v5p": ("1x1x1", "2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"),
    "v4": ("1x1x1", "2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"),
}


def _should_fit(target: Target, worst: BucketPlan, params: int) -> Callable[[int], bool] | None:
    """Whether ``count`` devices of the target's kind should hold the run, estimated
    from the compiled peak: table-sized memory shrinks with the device count,
    parameters do not. None without a known memory."""
    usable = target.usable_bytes_per_device
    if usable is None:
        return None
    n = target.device_count
    peak = worst.peak_bytes
    if peak is None:  # refused: assume the largest table-sized phase is at least the usable memory
        peak = 2 * usable
    scaled = peak - params  # grows as 1 / devices
    return lambda count: params + scaled * n / count <= 0.9 * usable


def _more_local_devices(target: Target, worst: BucketPlan, params: int, config: PlannedModel,
                        **options: Any) -> str | None:
    """For a run's own devices: more of this host's devices, compiled on them when
    the host has them (``--devices N``), else an estimated count; None when no
    count of such devices would do."""
    need = _should_fit(target, worst, params)
    if need is None:
        return None
    n = target.device_count
    count = next((c for c in range(n + 1, 64 * n + 1) if need(c)), None)
    if count is None:
        return None
    here = local_mesh().size
    if target.hosts == 1:
        for tried in sorted({c for c in (count, here) if n < c <= here}):
            alt = make_plan(target_for_devices(local_mesh(tried).devices.flat,  # what --devices N runs on
                                               usable_bytes=target.usable_bytes_per_device), config,
                            suggest=False, **options)
            if alt.fits:
                return (f"fits on {tried} of this host's {here} devices (--devices {tried}), "
                        f"chunk {alt.worst.chunk_size}")
    return f"would need about {count} such devices (estimated from the compiled peak, not compiled)"


def _more_devices(target: Target, worst: BucketPlan, params: int, tries: int = 3) -> list[str]:
    """Up to ``tries`` targets of the same chip, smallest first, from the smallest
    whose devices should hold the run (``_should_fit``), as TARGET strings: the
    estimate ignores what a program adds per device (AG's loop table), so the next
    sizes up are candidates too."""
    need = _should_fit(target, worst, params)
    if need is None or target.name == "local":
        return []
    n = target.device_count
    chip = target.chip
    if chip.platform == "gpu":
        counts = [c for c in (2, 4, 8, *range(16, 4097, 8)) if c > n]
        names = [f"{chip.key}x{c}" for c in counts]
    else:
        counts = [math.prod(int(d) for d in shape.split("x")) for shape in _TPU_SHAPES.get(chip.key, ())]
        names = [f"{chip.key}:{shape}" for shape in _TPU_SHAPES.get(chip.key, ())]
    first = next((i for i, c in enumerate(counts) if c > n and need(c)), None)
    return [] if first is None else names[first:first + tries]


__all__ = ["DEFAULT_LENGTHS", "make_plan"]
