"""Does a run fit, and with which chunk: the compiled programs' memory, composed.

A run holds, on each device, the parameters (replicated), the tables of the pair
being scored and of the ``prefetch`` pairs queued behind it, and runs one program
at a time. Its peak is the largest, over the programs it runs, of what is held
beside a program plus that program's own peak (XLA's: its arguments, outputs and
temporaries):

- tables stage of a queued pair: ``prefetch`` pairs held (the one being scored
  and those queued before it; the pair scored before is deleted first,
  ``tables.iter_pair_tables``); the second table's call also holds the first
  table; then the assembly of the two, which reuses their buffers;
- joint, metrics and unary-NLL programs of the scored pair: ``prefetch`` complete
  pairs held beside the program, which holds the scored pair itself.

Only the tables programs depend on the chunk (sequences per device per step), so
the largest chunk that fits is searched for by compiling them alone
(``largest_fitting_chunk``); ``run_chunk`` is that search for a run, which
``make_plan`` reports and ``chunks.planned_chunk_size`` runs on devices that report
their memory.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jax.sharding import Mesh

from jaxjoint.plan import compile as programs
from jaxjoint.plan.cache import cached
from jaxjoint.plan.compile import ProgramCost
from jaxjoint.plan.models import OwnModel, PlannedModel
from jaxjoint.sharding import mesh_size
from jaxjoint.tables import CHUNK_STEP, MAX_CHUNK, chunking


def _mesh_key(mesh: Mesh) -> tuple[str, int]:
    return (mesh.devices.flat[0].device_kind, mesh_size(mesh))


def _model_key(model: PlannedModel, mesh: Mesh, length: int) -> Any:
    """A config as it is; your own model by a digest of its lowered function."""
    return model.cache_key(mesh, length) if isinstance(model, OwnModel) else model


def tables_cost(mesh: Mesh, config: PlannedModel, length: int, dtype: str, chunk_size: int, *,
                matmul_precision: str = "float32") -> ProgramCost:
    """The compiled tables program for ``chunk_size`` (cached per device kind, mesh
    size, model, bucket length, dtype, matmul precision and the chunking it gives)."""
    n_chunks, chunk = chunking(programs.local_rows(mesh, config.vocab_size), chunk_size)
    key = ("tables", _mesh_key(mesh), _model_key(config, mesh, length), length, dtype, matmul_precision, n_chunks,
           chunk)
    return cached(key, lambda: (programs.tables_program(
        mesh, config, length, dtype, n_chunks=n_chunks, chunk=chunk, matmul_precision=matmul_precision),))[0]


def assemble_cost(mesh: Mesh, vocab: int) -> ProgramCost:
    """The compiled assembly of a pair's tables; its outputs are one pair's tables as
    a device holds them (cached per device kind, mesh size and V)."""
    return cached(("assemble", _mesh_key(mesh), vocab), lambda: (programs.assemble_program(mesh, vocab),))[0]


def ag_pass_cost(mesh: Mesh, vocab: int) -> ProgramCost:
    """One compiled AG pass (``compile.ag_pass_program``; cached per device kind, mesh size and V)."""
    return cached(("ag pass", _mesh_key(mesh), vocab), lambda: (programs.ag_pass_program(mesh, vocab),))[0]


def run_chunk(mesh: Mesh, config: PlannedModel, length: int, dtype: str, *, usable_bytes: int, prefetch: int,
              max_chunk: int = MAX_CHUNK, matmul_precision: str = "float32") -> ChunkChoice | None:
    """The chunk a run takes on ``mesh`` for sentences padded to ``length``: the
    largest whose tables programs fit ``usable_bytes`` per device beside ``prefetch``
    pairs' tables (``largest_fitting_chunk``); None when none does. The one rule:
    ``make_plan`` reports it, ``chunks.planned_chunk_size`` runs it."""
    budget = tables_budget(mesh, config, usable_bytes=usable_bytes, prefetch=prefetch)
    if budget <= 0:
        return None
    return largest_fitting_chunk(mesh, config, length, dtype, budget_bytes=budget, max_chunk=max_chunk,
                                 matmul_precision=matmul_precision)


def chunk_fits(mesh: Mesh, config: PlannedModel, length: int, dtype: str, chunk_size: int, *, usable_bytes: int,
               prefetch: int, matmul_precision: str = "float32") -> bool:
    """Whether a run's tables programs at ``chunk_size`` (given by the user) fit, as ``run_chunk`` decides."""
    budget = tables_budget(mesh, config, usable_bytes=usable_bytes, prefetch=prefetch)
    cost = tables_cost(mesh, config, length, dtype, chunk_size, matmul_precision=matmul_precision)
    return budget > 0 and tables_fit(cost, budget)


def tables_budget(mesh: Mesh, config: PlannedModel, *, usable_bytes: int, prefetch: int) -> int:
    """What the tables stage of a pair may use per device: ``usable_bytes`` less the
    tables of the ``prefetch`` pairs held meanwhile."""
    return usable_bytes - prefetch * assemble_cost(mesh, config.vocab_size).output_bytes


def tables_fit(cost: ProgramCost, budget_bytes: int) -> bool:
    """The pair's two table calls fit ``budget_bytes``: the second runs while the
    first one's table (an output of the same size) is held."""
    return cost.refused is None and cost.peak_bytes + cost.output_bytes <= budget_bytes


@dataclasses.dataclass(frozen=True)
class ChunkChoice:
    """The largest ``chunk_size`` (a multiple of 8, at most ``MAX_CHUNK`` and the
    rows per device) whose tables program fits, as compiled.

    chunk_size: what to pass as ``chunk_size`` (the largest giving this program);
    n_chunks, chunk: the program it runs; cost: that program's analysis;
    next_up: the analysis for ``chunk_size + 8`` (None when chunk_size is the
    largest candidate), which does not fit; compiles: tables programs analysed in
    the search (cache hits too).
    """

    chunk_size: int
    n_chunks: int
    chunk: int
    cost: ProgramCost
    next_up: ProgramCost | None
    compiles: int


def largest_fitting_chunk(mesh: Mesh, config: PlannedModel, length: int, dtype: str, *, budget_bytes: int,
                          max_chunk: int = MAX_CHUNK, matmul_precision: str = "float32") -> ChunkChoice | None:
    """The largest ``chunk_size`` whose tables programs fit ``budget_bytes`` per
    device (``tables_fit``), found by compiling; None when not even 8 sequences fit.

    ``budget_bytes`` is what the tables stage may use: the device's usable memory
    less what the run holds beside it (pairs in flight). Works on a mesh of real
    devices as well as compile-only ones. Many chunk sizes run the same program
    (the rows are split into even chunks), so the search runs over the distinct
    programs, ordered by chunk. Memory grows about linearly with the chunk: each
    probe is where the line through the nearest fitting and failing programs meets
    the budget (bisection when that makes no progress); typically 3 to 6 compiles,
    each cached.
    """
    rows = programs.local_rows(mesh, config.vocab_size)
    top = max(CHUNK_STEP, min(max_chunk, math.ceil(rows / CHUNK_STEP) * CHUNK_STEP))
    # Distinct programs, smallest chunk first, each with the largest chunk_size giving it.
    largest_size: dict[tuple[int, int], int] = {}
    for m in range(CHUNK_STEP, top + 1, CHUNK_STEP):
        largest_size[chunking(rows, m)] = m
    candidates = sorted(largest_size, key=lambda p: p[1])
    seen: dict[int, ProgramCost] = {}

    def cost(i: int) -> ProgramCost:
        if i not in seen:
            seen[i] = tables_cost(mesh, config, length, dtype, largest_size[candidates[i]],
                                  matmul_precision=matmul_precision)
        return seen[i]

    def fits(i: int) -> bool:
        return tables_fit(cost(i), budget_bytes)

    def choice(i: int) -> ChunkChoice:
        n_chunks, chunk = candidates[i]
        next_up = cost(i + 1) if i + 1 < len(candidates) else None
        return ChunkChoice(largest_size[candidates[i]], n_chunks, chunk, cost(i), next_up, len(seen))

    last = len(candidates) - 1
    if not fits(0):
        return None
    if fits(last):
        return choice(last)
    lo, hi = 0, last  # lo fits, hi does not
    while hi - lo > 1:
        i = _interpolate(lo, hi, cost(lo), cost(hi), budget_bytes, [c for _, c in candidates])
        if fits(i):
            lo = i
        else:
            hi = i
    return choice(lo)


def _interpolate(lo: int, hi: int, at_lo: ProgramCost, at_hi: ProgramCost, budget: int,
                 chunks: list[int]) -> int:
    """An index strictly between lo and hi: the candidate nearest below where the
    line through the two known costs (memory against chunk) meets the budget, else
    the midpoint. chunks: each candidate's chunk, ascending."""
    def used(c: ProgramCost) -> float | None:
        return None if c.refused else c.peak_bytes + c.output_bytes

    guess = (lo + hi) // 2
    y_lo, y_hi = used(at_lo), used(at_hi)
    if y_lo is not None and y_hi is not None and y_hi > y_lo:
        c_star = chunks[lo] + (budget - y_lo) * (chunks[hi] - chunks[lo]) / (y_hi - y_lo)
        guess = max(i for i in range(lo, hi) if chunks[i] <= c_star)
        if guess == lo:  # the line says lo itself: probe its neighbour, which settles it
            guess = lo + 1
    return min(max(guess, lo + 1), hi - 1)


@dataclasses.dataclass(frozen=True)
class StagePrograms:
    """Every program of one pair, analysed: ``tables`` at the chosen chunk,
    ``both_masked``, ``assemble``, per method ``joints[m]`` and ``metrics[m]``, and
    ``unary`` (the MLM's own unary NLL, once a pair)."""

    tables: ProgramCost
    both_masked: ProgramCost
    assemble: ProgramCost
    joints: dict[str, ProgramCost]
    metrics: dict[str, ProgramCost]
    unary: ProgramCost


def other_programs(mesh: Mesh, config: PlannedModel, length: int, dtype: str, methods: tuple[str, ...],
                   options: dict[str, dict[str, Any]], *, matmul_precision: str = "float32"
                   ) -> tuple[ProgramCost, ProgramCost, dict, dict, ProgramCost]:
    """The chunk-independent programs: both-masked pass, assembly, each method's
    joint and metrics programs, and the MLM's unary NLL (cached)."""
    vocab = config.vocab_size
    both = cached(("both_masked", _mesh_key(mesh), _model_key(config, mesh, length), length, dtype, matmul_precision),
                  lambda: (programs.both_masked_program(mesh, config, length, dtype,
                                                        matmul_precision=matmul_precision),))[0]
    assemble = assemble_cost(mesh, vocab)
    unary = cached(("mlm unary", _mesh_key(mesh), vocab), lambda: (programs.unary_program(mesh, vocab),))[0]
    joints, metrics = {}, {}
    for method in methods:
        opts = options.get(method, {})

        def compute(method=method, opts=opts):
            joint_cost, joint = programs.derive_program(mesh, vocab, method, opts)
            if joint_cost.refused:
                return joint_cost, ProgramCost(f"metrics {method}", refused="not compiled: its joint was refused")
            return joint_cost, programs.metrics_program(mesh, joint)

        joints[method], metrics[method] = cached(
            ("joint+metrics", _mesh_key(mesh), vocab, method, sorted(opts.items())), compute)
    return both, assemble, joints, metrics, unary


@dataclasses.dataclass(frozen=True)
class Phase:
    """One moment of a run: a program and what is held beside it, per device.

    program_bytes: the program's peak; for a program the compiler refused, the
    temporaries it said it needs (a lower bound: ``refused`` is True), or None
    when it said nothing.
    """

    program: str
    held_bytes: int
    program_bytes: int | None
    refused: bool = False

    @property
    def total_bytes(self) -> int | None:
        return None if self.program_bytes is None else self.held_bytes + self.program_bytes


def phases(stage: StagePrograms, params_bytes: int, prefetch: int, table_bytes: int) -> list[Phase]:
    """The run's per-device memory at each program (module docstring).

    table_bytes: one table's rows on a device, float32; used where the compiler
    refused the program that would have said (its layout may pad it)."""
    # one pair's tables, as the tables stage leaves them
    pair = stage.assemble.output_bytes or 2 * table_bytes
    table = stage.tables.output_bytes or table_bytes
    held = prefetch * pair

    def phase(name: str, held_bytes: int, c: ProgramCost, duplicate: int = 0) -> Phase:
        if c.refused:
            return Phase(name, held_bytes, c.temp_bytes or None, refused=True)
        return Phase(name, held_bytes, c.peak_bytes - duplicate)

    out = [
        phase(stage.tables.name + ", first table", held, stage.tables),
        phase(stage.tables.name + ", second table", held + table, stage.tables),
        phase("both masked", held + 2 * table, stage.both_masked),
        phase("assemble", held + params_bytes, stage.assemble),
    ]
    for method, cost in stage.joints.items():
        out.append(phase(f"joint {method}", held + params_bytes, cost))
    for method, cost in stage.metrics.items():
        # The metrics core takes the tables twice (directly and inside the joint):
        # one buffer in a run, two arguments to XLA.
        out.append(phase(f"metrics {method}", held + params_bytes, cost, duplicate=pair))
    out.append(phase("mlm unary", held + params_bytes, stage.unary))
    return out
