"""Evaluation: data -> tables -> joints -> metrics -> records, resumable.

An output directory holds:

- ``config.yaml``: the resolved config (also usable as ``--config``), written first;
- ``pairs.jsonl``: one line per finished pair, appended, flushed and fsynced as
  soon as the pair is done, so a killed run loses at most the pair in flight; in
  sentence order once the run is complete;
- ``summary.json``, ``summary.md``, ``summary.csv``: written when all pairs are done.

Running again with the same directory resumes: finished pairs are kept, a torn
last line (a kill during the write) is dropped and that pair recomputed, and a
run whose config differs in a setting that changes the records
(``config.result_settings``) is refused.

With ``distributed: pairs`` or ``global`` the run spans several processes
(``jaxjoint.distributed``); process 0 alone touches the output directory, and it
holds what a single-process run writes.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.sharding import Mesh

from jaxjoint.config import DEFAULT_MODEL, EvalConfig, result_settings
from jaxjoint.data import MaskedPair, load_sentences, make_pairs, max_tokens
from jaxjoint.default import MODEL_DIR as DEFAULT_MODEL_DIR
from jaxjoint.distributed import Processes, ProcessFailure, describe, global_mesh, processes
from jaxjoint.errors import UserError
from jaxjoint.joints import Joint, derive_joint
from jaxjoint.metrics import METRICS, aggregate, mlm_unary_nll, pair_metrics
from jaxjoint.models.mlm import MaskedLM, load_mlm
from jaxjoint.sharding import make_mesh
from jaxjoint.tables import (
    PairTables,
    bucket_length,
    default_chunk_size,
    iter_pair_tables,
    memory_budget_bytes,
    pair_tables,
)

CONFIG_FILE = "config.yaml"
PAIRS_FILE = "pairs.jsonl"
SUMMARY_FILES = ("summary.json", "summary.md", "summary.csv")
LABELS = {"mlm": "MLM", "mrf": "MRF", "mrf_logit": "MRF-L", "hcb": "HCB", "ag": "AG"}
_RECORD_KEYS = {"index", "text", "input_ids", "positions", "gold", "metrics", "mlm_unary_u_nll"}


# --- model, devices -------------------------------------------------------------------


def model_source(model: str) -> str:
    """The directory or hub name ``load_mlm`` gets for a config's ``model``."""
    if model != DEFAULT_MODEL:
        return model
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise UserError(f"the embedded default model is missing ({DEFAULT_MODEL_DIR}); "
                        "reinstall jaxjoint or give --model PATH")
    return str(DEFAULT_MODEL_DIR)


def device_mesh(devices: int | None) -> Mesh:
    """A mesh over the first ``devices`` local devices (all when None)."""
    available = jax.local_devices()
    if devices is not None and devices > len(available):
        raise UserError(f"asked for {devices} devices; this host has {len(available)}")
    return make_mesh(available if devices is None else available[:devices])


# --- one pair ---------------------------------------------------------------------------


def score_tables(
    tables: PairTables,
    gold: tuple[int, int],
    methods: Sequence[str],
    ag_options: dict[str, Any],
    mesh: Mesh | None,
) -> tuple[dict[str, dict[str, float]], float]:
    """Each method's metrics for one pair, and the MLM's unary U-NLL.

    tables: the pair's ``PairTables`` (logits float32[Vp, V], sharded on ``mesh``).
    Returns ``({method: {p_nll, u_nll, kl_gold, kl_all[, iters, delta, objective]}},
    mlm_unary_u_nll)``; the three extra fields are AG's iterations, the L1 change of
    its last step and its objective J.
    """
    return score_joints(tables, derive_all(tables, methods, ag_options, mesh), gold)


def score_joints(
    tables: PairTables, joints: dict[str, Joint], gold: tuple[int, int]
) -> tuple[dict[str, dict[str, float]], float]:
    """``score_tables`` for joints already derived from ``tables``."""
    metrics = {}
    for method, joint in joints.items():
        values = pair_metrics(tables, joint, gold)
        values = {key: values[key] for key in METRICS}  # jit returns dicts in sorted key order
        if method == "ag":
            values.update(
                iters=int(joint.info["iterations"]),
                delta=float(joint.info["l1_change"]),
                objective=float(joint.info["objective"]),
            )
        metrics[method] = values
    return metrics, mlm_unary_nll(tables, gold)


def derive_all(tables: PairTables, methods: Sequence[str], ag_options: dict[str, Any],
               mesh: Mesh | None) -> dict[str, Joint]:
    """``{method: derive_joint(tables, method)}``, AG with ``ag_options``."""
    return {m: derive_joint(tables, m, mesh=mesh, **(ag_options if m == "ag" else {})) for m in methods}


def pair_record(pair: MaskedPair, metrics: dict[str, dict[str, float]], unary: float) -> dict[str, Any]:
    """The ``pairs.jsonl`` line of one finished pair."""
    return {
        "index": pair.index,
        "text": pair.text,
        "input_ids": list(pair.input_ids),
        "positions": [pair.a, pair.b],
        "gold": list(pair.gold),
        "metrics": metrics,
        "mlm_unary_u_nll": unary,
    }


def top_pairs(joint: Joint, k: int, *, block_rows: int = 256) -> list[tuple[int, int, float]]:
    """The ``k`` most probable cells ``(a, b, p(a, b))`` of a joint, best first.

    Walks the rows in blocks of ``block_rows``, keeping each block's top k on the
    device, so no V x V array exists at once and only k cells a block leave it.
    """
    v = joint.vocab_size
    block_rows = min(block_rows, v)
    k = min(k, block_rows * v)
    starts = range(0, v, block_rows)
    blocks = [_block_top_k(joint, jnp.int32(start), k=k, block_rows=block_rows) for start in starts]
    log_p = np.concatenate([np.asarray(lp, np.float64) for lp, _ in blocks])
    # Flat cells in int64 on the host: V^2 overflows int32 for V > 46340 (RoBERTa's 50265).
    cells = np.concatenate([start * v + np.asarray(c, np.int64) for start, (_, c) in zip(starts, blocks)])
    best = np.argsort(-log_p, kind="stable")[:k]
    return [(int(cells[i] // v), int(cells[i] % v), float(np.exp(log_p[i]))) for i in best]


@functools.partial(jax.jit, static_argnames=("k", "block_rows"))
def _block_top_k(joint: Joint, start: jax.Array, *, k: int, block_rows: int) -> tuple[jax.Array, jax.Array]:
    """float32[k] log-probabilities and int32[k] cells ``(a - start) * V + b`` of the
    best cells in rows ``[start, start + block_rows)``; rows past V are never chosen."""
    v = joint.vocab_size
    rows = start + jnp.arange(block_rows)
    # A fixed block shape compiles once; rows past V are clipped for the gather, then masked.
    log_p = joint.log_prob(jnp.minimum(rows, v - 1)[:, None], jnp.arange(v)[None, :])
    log_p = jnp.where((rows < v)[:, None], log_p, -jnp.inf)
    return jax.lax.top_k(log_p.ravel(), k)


def explain_pair(
    mlm: MaskedLM,
    input_ids: Sequence[int],
    a: int,
    b: int,
    *,
    methods: Sequence[str],
    top_k: int = 10,
    gold: tuple[int, int] | None = None,
    ag_options: dict[str, Any] | None = None,
    mesh: Mesh | None = None,
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """The ``jaxjoint pair`` computation for one sentence.

    input_ids: int[L] with special tokens; the tokens at ``a`` and ``b`` are not used.
    Returns ``{"top": {method: [(a, b, p), ...]}, "metrics": ..., "mlm_unary_u_nll": ...}``;
    the last two (as in ``score_tables``) only when ``gold`` is given, else None.
    """
    ag_options = {} if ag_options is None else ag_options
    tables = pair_tables(mlm, np.asarray(input_ids), a, b, mesh=mesh, chunk_size=chunk_size)
    joints = derive_all(tables, methods, ag_options, mesh)
    result: dict[str, Any] = {
        "top": {m: top_pairs(j, top_k) for m, j in joints.items()},
        "metrics": None,
        "mlm_unary_u_nll": None,
        "ag": {k: float(v) for k, v in joints["ag"].info.items()} if "ag" in joints else None,
    }
    if gold is not None:
        result["metrics"], result["mlm_unary_u_nll"] = score_joints(tables, joints, gold)
    return result


# --- the output directory ---------------------------------------------------------------


def read_pairs(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete records of a ``pairs.jsonl`` and the byte length they span.

    A last line without its newline is a write cut short by a kill: it is not
    returned, and the caller truncates the file to the returned length.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    end = data.rfind(b"\n") + 1
    records = []
    for number, line in enumerate(data[:end].splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not _RECORD_KEYS <= set(record):
            raise UserError(f"{path}:{number} is not a jaxjoint pair record; move the file away to start over")
        records.append(record)
    return records, end


def _check_out_dir(out: Path, config: EvalConfig) -> list[dict[str, Any]]:
    """The finished records in ``out``, after checking it belongs to this run. Writes nothing."""
    _check_writable(out)
    stored_path = out / CONFIG_FILE
    if not stored_path.is_file():
        ours = [n for n in (PAIRS_FILE, *SUMMARY_FILES) if (out / n).exists()]
        if ours:
            raise UserError(f"{out} holds {ours[0]} but no {CONFIG_FILE}; choose a new --out directory")
        return []
    try:
        stored = yaml.safe_load(stored_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read {stored_path} ({type(err).__name__}); choose a new --out directory") from None
    theirs, ours = result_settings(stored), result_settings(config.to_dict())
    changed = [k for k in (*ours, *theirs) if theirs.get(k) != ours.get(k)]
    if changed:
        k = changed[0]
        raise UserError(
            f"{out} holds a run with another config ({k}: {theirs.get(k)!r} there, {ours.get(k)!r} now); "
            "use a new --out, or the same settings to resume")
    return read_pairs(out / PAIRS_FILE)[0]


def _check_writable(out: Path) -> None:
    """``UserError`` unless ``out`` is, or can be made as, a writable directory."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == out else f"is under {existing}, a file"
        raise UserError(f"--out {out} {what}; give a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {existing} is not writable; give another directory")


class PairWriter:
    """Appends records to ``pairs.jsonl``, each one durable before the next pair starts."""

    def __init__(self, out: Path, config: EvalConfig):
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
        path = out / PAIRS_FILE
        _, end = read_pairs(path)
        self._file = open(path, "ab")
        if self._file.tell() != end:
            self._file.truncate(end)
            self._file.seek(end)
            os.fsync(self._file.fileno())

    def append(self, record: dict[str, Any]) -> None:
        self._file.write((json.dumps(record) + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _sort_pairs_file(path: Path) -> None:
    """Put the records of ``path`` in sentence order. They are out of order only
    when a multi-process round failed after a later pair of it finished; sorting
    makes a completed run's file the same however often it was resumed."""
    records, _ = read_pairs(path)
    indices = [r["index"] for r in records]
    if indices != sorted(indices):
        _write_atomic(path, "".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: r["index"])))


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a kill leaves the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- progress -----------------------------------------------------------------------------


class Progress:
    """``pairs done/total, pairs/s, ETA`` on one stderr line (a fresh line every 30 s
    when stderr is not a terminal)."""

    def __init__(self, total: int, done: int, *, enabled: bool = True, stream: TextIO | None = None):
        self.total, self.done, self.enabled = total, done, enabled
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self.start = self.last = time.monotonic()
        self.new = 0
        self._show(force=True)

    def update(self) -> None:
        self.done += 1
        self.new += 1
        self._show(force=self.done == self.total)

    def _show(self, force: bool) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < (0.2 if self.tty else 30.0)):
            return
        self.last = now
        rate = self.new / (now - self.start) if self.new else 0.0
        eta = _duration((self.total - self.done) / rate) if rate else "?"
        line = f"pairs {self.done}/{self.total}  {rate:.2f} pairs/s  ETA {eta}"
        self.stream.write(f"\r{line:<60}" if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# --- the run ----------------------------------------------------------------------------------


def evaluate(config: EvalConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) an evaluation and write its outputs in ``config.out``.

    Every input is checked (output directory, data, model) before anything is
    written. Returns the summary (as in ``summary.json``); ``summary.md`` is
    printed to stdout unless ``quiet``.

    With ``config.distributed`` ``pairs`` or ``global``, every process of the run
    calls this with the same config (``jaxjoint.distributed`` describes the modes);
    each returns the summary, and only process 0 writes files and prints. An error
    on any process raises ``UserError`` on all of them, ``ProcessFailure`` when a
    process stopped answering.
    """
    if config.out is None:
        raise UserError("no output directory; build the config with resolve_config or give out=DIR")
    out = Path(config.out)
    procs = processes(config.distributed)
    run = procs.agree(lambda: _prepare(config, out, read_out=procs.leader))
    shared = procs.gather({
        "fingerprint": _fingerprint(config, run),
        "budget": memory_budget_bytes(jax.local_devices()[0]) if config.distributed == "global" else None,
    })
    for k, theirs in enumerate(shared):
        if theirs["fingerprint"] != shared[0]["fingerprint"]:
            raise UserError(f"process {k} made other pairs, or has another model or settings, than process 0; "
                            "start every process with the same command, data and model")
    finished = {r["index"]: r for r in procs.broadcast(run.records)}
    todo = [p for p in run.pairs if p.index not in finished]
    chunk_size = config.chunk_size
    if config.distributed == "global" and chunk_size is None and todo:
        # Every process must compile the same program: one chunk size from the
        # smallest device budget, sized for the longest sentence.
        length = max(bucket_length(len(p.input_ids), run.mlm.config.max_positions) for p in todo)
        chunk_size = default_chunk_size(run.mlm.config, length, config.dtype, min(s["budget"] for s in shared))

    writer = procs.agree(lambda: PairWriter(out, config) if procs.leader else None)
    progress = Progress(len(run.pairs), len(run.pairs) - len(todo), enabled=procs.leader and not quiet)
    try:
        _score_pairs(config, run, todo, procs, chunk_size, finished, writer, progress)
    except UserError as err:
        if procs.count == 1:
            raise
        raise type(err)(f"{err}; the {len(finished)} finished pairs are saved in {out / PAIRS_FILE}: "
                        "run the same command on every process to resume") from err
    finally:
        if writer is not None:
            writer.close()
        progress.close()

    summary = summarize(config, [finished[p.index] for p in run.pairs], run.skipped)
    if procs.leader:
        _sort_pairs_file(out / PAIRS_FILE)
        write_summary(out, summary)
        if not quiet:
            print(summary_markdown(summary), end="")
    return summary


@dataclasses.dataclass(frozen=True)
class _Run:
    """What one process loaded for a run: the finished records it read (process 0
    only), the model, the pairs of the data, the sentences skipped, its mesh."""

    records: list[dict[str, Any]]
    mlm: MaskedLM
    pairs: list[MaskedPair]
    skipped: int
    mesh: Mesh


def _prepare(config: EvalConfig, out: Path, *, read_out: bool) -> _Run:
    """Load and check everything a run needs; writes nothing. Only the process
    with ``read_out`` looks at the output directory."""
    records = _check_out_dir(out, config) if read_out else []
    sentences = load_sentences(config.data, config.max_sentences)
    mlm = load_mlm(model_source(config.model), dtype=config.dtype)
    pairs, skipped = make_pairs(sentences, mlm.tokenizer, masking=config.masking, seed=config.seed,
                                max_length=max_tokens(mlm.config))
    if not pairs:
        raise UserError(f"none of the {len(sentences)} sentences of {config.data} has two maskable tokens")
    stored = {r["index"]: r for r in records}
    for pair in pairs:
        old = stored.get(pair.index)
        if old is not None and (old["positions"] != [pair.a, pair.b] or old["input_ids"] != list(pair.input_ids)):
            raise UserError(f"{out / PAIRS_FILE} has another pair for sentence {pair.index}: "
                            "the data or tokenizer changed; use a new --out")
    mesh = global_mesh(config.devices) if config.distributed == "global" else device_mesh(config.devices)
    return _Run(records, mlm, pairs, skipped, mesh)


def _fingerprint(config: EvalConfig, run: _Run) -> str:
    """A digest of what must be equal on every process: the pairs, the model's
    shape, and the settings (paths may differ from host to host)."""
    values = {k: v for k, v in config.to_dict().items() if k not in ("model", "data", "out", "max_sentences")}
    values["model"] = dataclasses.asdict(run.mlm.config)
    values["pairs"] = [[p.index, list(p.input_ids), p.a, p.b] for p in run.pairs]
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def _score_pairs(config: EvalConfig, run: _Run, todo: list[MaskedPair], procs: Processes, chunk_size: int | None,
                 finished: dict[int, dict[str, Any]], writer: PairWriter | None, progress: Progress) -> None:
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
                              chunk_size=chunk_size)

    def score(pair: MaskedPair) -> dict[str, Any]:
        metrics, unary = score_tables(next(stream), pair.gold, config.methods, config.ag_options(), run.mesh)
        return {"metrics": metrics, "unary": unary}

    for batch in rounds:
        if spread:
            exchange = procs.exchange(lambda: score(batch[k]) if k < len(batch) else None)
            results = exchange.results
        else:
            results = [_score_together(score, batch[0], procs)]
        for pair, result in zip(batch, results):
            if result is not None:
                record = pair_record(pair, result["metrics"], result["unary"])
                finished[pair.index] = record
                if writer is not None:
                    writer.append(record)
                progress.update()
        if spread:
            exchange.check(lambda j: f"process {j} on sentence {batch[j].index}")


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


# --- summaries ----------------------------------------------------------------------------------


def summarize(config: EvalConfig, records: Sequence[dict[str, Any]], n_skipped: int) -> dict[str, Any]:
    """The ``summary.json`` content from the records of a finished run."""
    flat = [
        {"method": m, **values, "mlm_unary_u_nll": r["mlm_unary_u_nll"]}
        for r in records for m, values in r["metrics"].items()
    ]
    per_method = aggregate(flat)
    summary: dict[str, Any] = {
        "config": config.to_dict(),
        "n_pairs": len(records),
        "n_skipped": n_skipped,
        "methods": {m: {k: per_method[m][k] for k in ("p_ppl", "u_ppl", "kl_gold", "kl_all")}
                    for m in config.methods},
        "mlm_unary_u_ppl": math.exp(math.fsum(r["mlm_unary_u_nll"] for r in records) / len(records)),
    }
    if "ag" in config.methods:
        ag = [r["metrics"]["ag"] for r in records]
        summary["ag"] = {
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
        f"{_count(summary['n_pairs'], 'pair')} ({_count(summary['n_skipped'], 'sentence')} skipped), "
        f"seed {c['seed']}, {c['dtype']}"
        + (f"; AG: {ag['iters_mean']:g} iterations on average, last-step L1 change up to {ag['delta_max']:.2g}"
           if ag else ""),
        "",
        "| Method | P-PPL | U-PPL | KL (gold) | KL (all) |",
        "|:--|--:|--:|--:|--:|",
    ]
    for method, m in summary["methods"].items():
        lines.append(f"| {LABELS[method]} | {m['p_ppl']:.2f} | {m['u_ppl']:.2f} | {m['kl_gold']:.3f} | {m['kl_all']:.3f} |")
    lines.append(f"| MLM conditionals | – | {summary['mlm_unary_u_ppl']:.2f} | – | – |")
    return "\n".join(lines) + "\n"


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


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """``summary.json``, ``summary.md`` and ``summary.csv`` in ``out``."""
    _write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _write_atomic(out / "summary.md", summary_markdown(summary))
    _write_atomic(out / "summary.csv", summary_csv(summary))


def count_pairs(out: str | Path) -> int:
    """How many finished pairs ``out/pairs.jsonl`` holds (0 when there is none)."""
    return len(read_pairs(Path(out) / PAIRS_FILE)[0])
