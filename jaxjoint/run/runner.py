"""The evaluation run: data -> tables -> joints -> metrics -> records, resumable.

``evaluate(config)`` checks every input, resumes what the run directory holds
(``rundir``), scores the remaining pairs (``jaxjoint.scoring``), one record each,
and writes the reports (``reports``). With ``distributed: pairs`` or ``global`` the
run spans several processes (``distributed``); process 0 alone touches the output
directory, and it holds what a single-process run writes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from jaxjoint import scoring
from jaxjoint.config import EvalConfig, shared_settings
from jaxjoint.data import FastaRecord, MaskedPair, Skipped, load_sentences, make_pairs, max_tokens
from jaxjoint.default import model_source
from jaxjoint.errors import UserError
from jaxjoint.models.mlm import MaskedLM, load_mlm
from jaxjoint.run.distributed import Processes, ProcessFailure, describe, processes
from jaxjoint.run.progress import progress_bar
from jaxjoint.run.reports import summarize, summary_files, summary_markdown
from jaxjoint.run.rundir import PairWriter, Record, RunDir
from jaxjoint.sharding import global_mesh, local_mesh, mesh_memory_limit
from jaxjoint.tables import MAX_CHUNK, PREFETCH, bucket_length, iter_pair_tables


def evaluate(config: EvalConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) an evaluation and write its outputs in ``config.out``.

    Every input is checked (output directory, data, model) before anything is
    written. Returns the summary (as in ``summary.json``); ``summary.md`` is
    printed to stdout unless ``quiet``.

    With ``config.distributed`` ``pairs`` or ``global``, every process of the run
    calls this with the same config (``jaxjoint.run.distributed`` describes the
    modes); each returns the summary, and only process 0 writes files and prints.
    An error on any process raises ``UserError`` on all of them, ``ProcessFailure``
    when a process stopped answering.
    """
    if config.out is None:
        raise ValueError("config.out is None; build the config with resolve_config or give out=DIR")
    rundir = RunDir(config.out)
    procs = processes(config.distributed)
    # Process 0 holds the directory for the whole run, before it reads anything there.
    lock = procs.agree(lambda: rundir.lock() if procs.leader else None)
    try:
        return _run(config, rundir, procs, quiet)
    finally:
        if lock is not None:
            lock.release()


def _run(config: EvalConfig, rundir: RunDir, procs: Processes, quiet: bool) -> dict[str, Any]:
    """``evaluate`` once the run directory is this run's."""
    run = procs.agree(lambda: _load_run(config, rundir, read_out=procs.leader))
    shared = procs.gather({"fingerprint": _fingerprint(config, run), "memory": mesh_memory_limit(run.mesh)})
    for k, theirs in enumerate(shared):
        if theirs["fingerprint"] != shared[0]["fingerprint"]:
            raise UserError(f"process {k} made other pairs, or has another model or settings, than process 0; "
                            "start every process with the same command, data and model")
    finished = {r["index"]: r for r in procs.broadcast(run.records)}
    todo = [p for p in run.pairs if p.index not in finished]
    # Before any pair: does a pair fit the devices, with which chunk and prefetch.
    limits = [s["memory"] for s in shared] if config.distributed == "global" else [shared[procs.index]["memory"]]
    chunk_size, prefetch = procs.agree(lambda: _memory_plan(config, run, todo, limits, quiet=quiet or not procs.leader))

    writer = procs.agree(lambda: rundir.start(config) if procs.leader else None)
    progress = progress_bar(len(run.pairs), len(run.pairs) - len(todo), enabled=procs.leader and not quiet)
    try:
        _score_pairs(config, run, todo, procs, chunk_size, prefetch, finished, writer, progress)
    except UserError as err:
        if procs.count == 1:
            raise
        raise type(err)(f"{err}; the {len(finished)} finished pairs are saved in {rundir.pairs_path}: "
                        "run the same command on every process to resume") from err
    finally:
        if writer is not None:
            writer.close()
        progress.close()

    summary = summarize(config, [finished[p.index] for p in run.pairs], run.skipped, unit=run.unit,
                        max_length=max_tokens(run.mlm.config),
                        truncated=[(p.index, p.truncated_from) for p in run.pairs if p.truncated_from is not None])
    if procs.leader:
        rundir.sort_pairs()
        rundir.write_files(summary_files(summary))
        if not quiet:
            print(summary_markdown(summary), end="")
    return summary


@dataclasses.dataclass(frozen=True)
class _Run:
    """What one process loaded for a run: the finished records it read (process 0
    only), the model, the pairs of the data, the sentences skipped, its mesh, and
    what the data holds ("sentence", or "sequence" for proteins)."""

    records: list[Record]
    mlm: MaskedLM
    pairs: list[MaskedPair]
    skipped: list[Skipped]
    mesh: Mesh
    unit: str = "sentence"


def _load_run(config: EvalConfig, rundir: RunDir, *, read_out: bool) -> _Run:
    """Load and check everything a run needs; writes nothing. Only the process
    with ``read_out`` looks at the output directory."""
    records = rundir.finished_records(config) if read_out else []
    sentences = load_sentences(config.data, config.max_sentences)
    mlm = load_mlm(model_source(config.model), dtype=config.dtype, matmul_precision=config.matmul_precision)
    pairs, skipped = make_pairs(sentences, mlm.tokenizer, masking=config.masking, seed=config.seed,
                                max_length=max_tokens(mlm.config))
    if not pairs:
        unit = "FASTA records" if isinstance(sentences[0], FastaRecord) else "sentences"
        raise UserError(f"none of the {len(sentences)} {unit} of {config.data} has two maskable tokens")
    stored = {r["index"]: r for r in records}
    for pair in pairs:
        old = stored.get(pair.index)
        if old is not None and (old["positions"] != [pair.a, pair.b] or old["input_ids"] != list(pair.input_ids)):
            raise UserError(f"{rundir.pairs_path} has another pair for sentence {pair.index}: "
                            "the data or tokenizer changed; use a new --out")
    mesh = global_mesh(config.devices) if config.distributed == "global" else local_mesh(config.devices)
    unit = "sequence" if isinstance(sentences[0], FastaRecord) else "sentence"
    return _Run(records, mlm, pairs, skipped, mesh, unit)


def _memory_plan(config: EvalConfig, run: _Run, todo: list[MaskedPair], limits: list[int | None], *,
                 quiet: bool) -> tuple[int | None, int]:
    """(chunk_size, prefetch) for the run, or ``UserError`` before any pair when a
    pair cannot fit.

    limits: the memory limit of each process's devices (one entry but in global mode).
    On devices that report their memory (GPU, TPU), the run's programs are compiled
    for its mesh and composed as ``jaxjoint.plan`` does (``make_plan`` on the
    ``local`` target, cached on disk): the chunk of each length bucket is the largest
    that fits beside the queued pair (``plan.chunks.planned_chunk_size`` takes the same
    per bucket), without prefetching when only that fits, and a run that fits in
    neither way stops with the plan's one-line reason. On CPU (no limit) nothing is
    compiled: the chunk comes from ``DEFAULT_CPU_BUDGET_BYTES``, as in ``pair_tables``.
    With ``--distributed global`` every process must compile the same program: one
    chunk, for the longest sentence and the smallest limit.
    """
    one_chunk = config.distributed == "global"
    if not todo:
        return config.chunk_size, PREFETCH
    buckets = sorted({bucket_length(len(p.input_ids), run.mlm.config.max_positions) for p in todo})
    if any(limit is None for limit in limits):
        if one_chunk and config.chunk_size is None:
            from jaxjoint.plan.chunks import DEFAULT_CPU_BUDGET_BYTES, default_chunk_size


            return default_chunk_size(run.mlm.config, buckets[-1], config.dtype, DEFAULT_CPU_BUDGET_BYTES), PREFETCH
        return config.chunk_size, PREFETCH

    from jaxjoint.plan import fit, make_plan, target_for_devices

    target = target_for_devices(run.mesh.devices.flat, usable_bytes=min(limits))
    plan = functools.partial(make_plan, target, run.mlm.config, lengths=buckets, dtype=config.dtype,
                             matmul_precision=config.matmul_precision,
                             methods=config.methods, ag_options=config.ag_options(),
                             max_chunk=config.chunk_size or MAX_CHUNK)
    prefetch, report = PREFETCH, plan(prefetch=PREFETCH, suggest=False)
    if not report.fits and all(b.fits or b.fits_without_prefetch for b in report.buckets):
        prefetch, report = 0, plan(prefetch=0, suggest=False)
    if not report.fits:
        raise UserError(plan(prefetch=0, suggest=True).reason)
    if prefetch != PREFETCH and not quiet:
        print(f"note: the next pair's tables do not fit beside this one's on {target.chip.name}: "
              "scoring without prefetching", file=sys.stderr)
    if config.chunk_size is not None:
        for bucket in buckets:
            if not fit.chunk_fits(target.mesh(), run.mlm.config, bucket, config.dtype, config.chunk_size,
                                  usable_bytes=target.usable_bytes_per_device, prefetch=prefetch,
                                  matmul_precision=config.matmul_precision):
                best = next(b for b in report.buckets if b.bucket == bucket).chunk_size
                raise UserError(f"--chunk-size {config.chunk_size} does not fit {bucket}-token sentences on "
                                f"{target.chip.name} (compiled); {best} does, or leave the chunk to the run")
        return config.chunk_size, prefetch
    if one_chunk:
        return min(b.chunk_size for b in report.buckets), prefetch
    return None, prefetch


def _fingerprint(config: EvalConfig, run: _Run) -> str:
    """A digest of what must be equal on every process: the pairs, the model's
    shape, and the settings (paths may differ from host to host)."""
    values = shared_settings(config)
    values["model"] = dataclasses.asdict(run.mlm.config)
    values["pairs"] = [[p.index, list(p.input_ids), p.a, p.b] for p in run.pairs]
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def _score_pairs(config: EvalConfig, run: _Run, todo: list[MaskedPair], procs: Processes, chunk_size: int | None,
                 prefetch: int, finished: dict[int, Record], writer: PairWriter | None, progress: Any) -> None:
    """Score ``todo``, adding each record to ``finished`` (and ``writer``) in order.

    ``pairs`` and ``none``: in rounds of one pair per process, process k scoring
    the k-th, results gathered after each round. ``global``: every process scores
    every pair on the global mesh and holds the same (replicated) numbers.
    """
    k, n = procs.index, procs.count
    spread = config.distributed != "global"
    rounds = [todo[i:i + n] for i in range(0, len(todo), n)] if spread else [[p] for p in todo]
    mine = [r[k] for r in rounds if k < len(r)] if spread else todo
    stream = iter_pair_tables(run.mlm, ((p.input_ids, p.a, p.b) for p in mine), mesh=run.mesh,
                              chunk_size=chunk_size, prefetch=prefetch)

    def score(pair: MaskedPair) -> dict[str, Any]:
        metrics, unary = scoring.score_tables(next(stream), pair.gold, config.methods, config.ag_options(),
                                              run.mesh)
        return {"metrics": metrics, "unary": unary}

    for batch in rounds:
        if spread:
            exchange = procs.exchange(lambda batch=batch: score(batch[k]) if k < len(batch) else None)
            results = exchange.results
        else:
            results = [_score_together(score, batch[0], procs)]
        # Only process 0 writes: a write failure (a full disk) is exchanged, so that
        # every process stops with it instead of waiting for process 0.
        procs.agree(lambda batch=batch, results=results: _keep_round(batch, results, finished, writer, progress))
        if spread:
            exchange.check(lambda j, batch=batch: f"process {j} on sentence {batch[j].index}")


def _keep_round(batch: list[MaskedPair], results: list[dict[str, Any] | None], finished: dict[int, Record],
                writer: PairWriter | None, progress: Any) -> None:
    """Add the round's finished pairs to ``finished`` and, on process 0, to ``pairs.jsonl``."""
    for pair, result in zip(batch, results):
        if result is not None:
            record = scoring.pair_record(pair, result["metrics"], result["unary"])
            if pair.truncated_from is not None:
                record["truncated_from"] = pair.truncated_from
            finished[pair.index] = record
            if writer is not None:
                writer.append(record)
            progress.update()


def _score_together(score: Callable[[MaskedPair], dict[str, Any]], pair: MaskedPair,
                    procs: Processes) -> dict[str, Any]:
    """``score(pair)`` in global mode. An error here cannot be reported to the other
    processes (they may be waiting inside a collective of this pair), so with
    several processes it ends the run as a ``ProcessFailure``."""
    try:
        return score(pair)
    except Exception as err:
        if procs.count == 1:
            raise
        # A runtime error is most often a collective whose peer died: its message says so, a traceback would not.
        if not isinstance(err, (UserError, jax.errors.JaxRuntimeError)):
            traceback.print_exc()
        raise ProcessFailure(f"sentence {pair.index} failed on process {procs.index} ({describe(err)}); "
                             "if another process stopped, its output says why") from err
