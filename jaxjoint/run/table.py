"""``jaxjoint table RUN_DIR...``: finished runs as the paper's Table 1, with bootstrap intervals.

One row per run (model, data, masking, and every other setting that differs
between the runs), one column group per method (P-PPL, U-PPL, KL (gold),
KL (all)) and the MLM's own U-PPL. Each value is the run's ``summary.json``
(``metrics.aggregate`` of its pairs, checked against ``pairs.jsonl``), with a 95 %
percentile-bootstrap interval over the run's pairs: ``resamples`` resamples of the
N pairs, drawn with replacement by ``numpy.random.default_rng(seed).integers(0, N,
size=(resamples, N))``, the same resamples for every method of the run (so the
comparison between methods is paired). A perplexity is exp of a mean: each
resample's mean NLL is taken, then exp. Every run draws from ``seed`` afresh, so a
run's row does not depend on which other runs are in the table.

The paired comparison: for each method other than AG, method − AG on every
resample (a difference of perplexities for P-PPL and U-PPL, of means for the
KLs), its value the difference of the summaries. Runs without AG get no
comparison (the table says so).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jaxjoint.config import matmul_precision_of
from jaxjoint.errors import UserError
from jaxjoint.joints import LABELS
from jaxjoint.metrics import aggregate
from jaxjoint.run.rundir import CONFIG_FILE, PAIRS_FILE, read_pairs, write_atomic

# (summary key, column title, per-pair field, exp of the mean?)
METRICS = (("p_ppl", "P-PPL", "p_nll", True), ("u_ppl", "U-PPL", "u_nll", True),
           ("kl_gold", "KL (gold)", "kl_gold", False), ("kl_all", "KL (all)", "kl_all", False))
UNARY = "mlm_unary"  # the MLM's own conditionals: a U-PPL, no joint
UNARY_LABEL = "MLM conditionals"
REFERENCE = "ag"  # the method every other one is compared with
LEVEL = 0.95
RESAMPLES = 2000
FORMATS = {".md": "markdown", ".markdown": "markdown", ".csv": "csv", ".tex": "latex", ".png": "png"}
# Settings shown as columns when they differ between the runs (model, data, masking always are).
VARYING = (("dtype", "dtype"), ("matmul_precision", "precision"), ("seed", "seed"), ("ag", "AG"))


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A number and its bootstrap interval ``[low, high]``."""

    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


@dataclasses.dataclass(frozen=True)
class RunRow:
    """One finished run in the table.

    settings: its ``config.yaml`` (``matmul_precision`` as ``config.matmul_precision_of`` reads it:
      a run written before the key existed computed float32 products).
    estimates: ``{(method, metric): Estimate}``, with ``(UNARY, "u_ppl")``.
    versus: ``{(method, metric): Estimate}`` of method − AG; empty without AG.
    """

    directory: Path
    settings: dict[str, Any]
    n_pairs: int
    methods: tuple[str, ...]
    estimates: dict[tuple[str, str], Estimate]
    versus: dict[tuple[str, str], Estimate]


@dataclasses.dataclass(frozen=True)
class Table:
    """The runs' rows, their label columns (``[(title, [value per run])]``), and how the intervals were made."""

    rows: list[RunRow]
    labels: list[tuple[str, list[str]]]
    methods: tuple[str, ...]
    resamples: int
    seed: int

    @property
    def reference(self) -> str | None:
        return REFERENCE if REFERENCE in self.methods else None


# --- reading runs -------------------------------------------------------------------------------


def read_run(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """``(config, summary, records)`` of a finished run; ``UserError`` in one line otherwise.

    Finished: ``config.yaml``, ``summary.json`` and ``pairs.jsonl`` are there, the
    summary counts the pairs the file holds, and its numbers are ``metrics.aggregate``
    of those pairs (so a table never mixes a stale summary with newer pairs).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; give the --out directory of a finished jaxjoint evaluate run")
    missing = [n for n in (CONFIG_FILE, "summary.json", PAIRS_FILE) if not (directory / n).is_file()]
    if missing:
        raise UserError(f"{directory} is not a finished jaxjoint run (no {missing[0]}); finish it with "
                        "jaxjoint evaluate, or leave it out")
    try:
        config = yaml.safe_load((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        summary = json.loads((directory / "summary.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        raise UserError(f"cannot read {directory}'s config.yaml or summary.json ({type(err).__name__})") from None
    if not isinstance(config, dict) or not isinstance(summary, dict) or "methods" not in summary:
        raise UserError(f"{directory} is not a jaxjoint run (its config.yaml or summary.json is not one)")
    first: dict[int, dict[str, Any]] = {}
    for r in read_pairs(directory / PAIRS_FILE)[0]:
        first.setdefault(r["index"], r)  # a sentence recorded twice counts once, as evaluate keeps it
    records = list(first.values())
    if len(records) != summary.get("n_pairs"):
        raise UserError(f"{directory} is not finished: pairs.jsonl holds {len(records)} pairs, summary.json "
                        f"{summary.get('n_pairs')}; run its jaxjoint evaluate command again to finish it")
    methods = list(summary["methods"])
    if list(config.get("methods") or []) != methods:
        raise UserError(f"{directory}: summary.json's methods differ from config.yaml's; run evaluate again")
    flat = []
    for r in records:
        if set(r["metrics"]) != set(methods):
            raise UserError(f"{directory}: pair {r['index']} has methods {sorted(r['metrics'])}, not {methods}")
        flat += [{"method": m, **r["metrics"][m], "mlm_unary_u_nll": r["mlm_unary_u_nll"]} for m in methods]
    recomputed = aggregate(flat)
    for m in methods:
        for key, *_ in METRICS:
            if recomputed[m][key] != summary["methods"][m][key]:
                raise UserError(f"{directory}: summary.json's {m} {key} is not that of pairs.jsonl; "
                                "run its jaxjoint evaluate command again to rewrite the summary")
    if recomputed[methods[0]]["mlm_unary_u_ppl"] != summary.get("mlm_unary_u_ppl"):
        raise UserError(f"{directory}: summary.json's mlm_unary_u_ppl is not that of pairs.jsonl; "
                        "run its jaxjoint evaluate command again to rewrite the summary")
    return config, summary, records


# --- the bootstrap ----------------------------------------------------------------------------------


def resample_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of ``values`` over bootstrap resamples of its rows.

    values: float[N, K], one row per pair. Resample r takes the rows
    ``default_rng(seed).integers(0, N, size=(resamples, N))[r]`` (with replacement).
    Returns float64[resamples, K].
    """
    values = np.asarray(values, np.float64)
    n = values.shape[0]
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    # Counts of each pair in each resample: the means are one product, without a [resamples, N, K] gather.
    counts = np.bincount((draws + n * np.arange(resamples)[:, None]).ravel(), minlength=resamples * n)
    return counts.reshape(resamples, n).astype(np.float64) @ values / n


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval of bootstrap ``samples`` float[R, ...] along axis 0: ``(low, high)``."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    return low, high


def run_row(directory: str | Path, *, resamples: int = RESAMPLES, seed: int = 0) -> RunRow:
    """A finished run's values (its ``summary.json``), their intervals and the comparisons with AG."""
    config, summary, records = read_run(directory)
    methods = tuple(summary["methods"])
    columns = [(m, key, field, log) for m in methods for key, _, field, log in METRICS]
    columns.append((UNARY, "u_ppl", "mlm_unary_u_nll", True))

    def per_pair(method: str, field: str) -> list[float]:
        return [r[field] if method == UNARY else r["metrics"][method][field] for r in records]

    means = resample_means(np.array([per_pair(m, f) for m, _, f, _ in columns]).T, resamples, seed)
    stats = {(m, key): np.exp(means[:, j]) if log else means[:, j] for j, (m, key, _, log) in enumerate(columns)}
    values = {(m, key): summary["methods"][m][key] for m in methods for key, *_ in METRICS}
    values[UNARY, "u_ppl"] = summary["mlm_unary_u_ppl"]
    estimates = {c: Estimate(values[c], *map(float, interval(stats[c]))) for c in stats}
    versus = {}
    if REFERENCE in methods:
        for m in methods:
            if m == REFERENCE:
                continue
            for key, *_ in METRICS:
                low, high = interval(stats[m, key] - stats[REFERENCE, key])
                versus[m, key] = Estimate(values[m, key] - values[REFERENCE, key], float(low), float(high))
    settings = {**config, "matmul_precision": matmul_precision_of(config)}
    return RunRow(Path(directory), settings, len(records), methods, estimates, versus)


def make_table(directories: Sequence[str | Path], *, resamples: int = RESAMPLES, seed: int = 0) -> Table:
    """The table of the finished runs in ``directories`` (in that order; methods in the first run's order).

    ``UserError`` (one line) when a directory is not a finished run or the runs
    do not have the same methods.
    """
    if not directories:
        raise UserError("give at least one run directory")
    rows = [run_row(d, resamples=resamples, seed=seed) for d in directories]
    for row in rows[1:]:
        if set(row.methods) != set(rows[0].methods):
            raise UserError(f"the runs have different methods ({rows[0].directory}: {','.join(rows[0].methods)}; "
                            f"{row.directory}: {','.join(row.methods)}); a table compares runs of the same methods")
    return Table(rows, _labels(rows), rows[0].methods, resamples, seed)


def _labels(rows: list[RunRow]) -> list[tuple[str, list[str]]]:
    def shown(key: str, settings: dict[str, Any]) -> str:
        if key == "ag":
            tol = settings.get("ag_tol")
            return f"tol {tol:g}" if tol is not None else f"{settings.get('ag_iters')} iters"
        value = str(settings.get(key))
        if key in ("model", "data"):
            name, _, path = value.partition("=")
            if path and key == "data":
                return f"{name} (local copy)"
            if Path(value).is_absolute():
                return Path(value).name
        return value

    labels = [(title, [shown(key, r.settings) for r in rows])
              for key, title in (("model", "Model"), ("data", "Data"), ("masking", "Masking"))]
    for key, title in VARYING:
        column = [shown(key, r.settings) for r in rows]
        if len(set(column)) > 1:
            labels.append((title, column))
    if len(set(zip(*(c for _, c in labels)))) < len(rows):
        labels.insert(0, ("Run", [r.directory.name for r in rows]))
    return labels


# --- formats --------------------------------------------------------------------------------------------


def _decimals(e: Estimate) -> int:
    """Enough decimals for two significant digits of the interval's width (of the value when it has none)."""
    scale = (e.high - e.low) or abs(e.value)
    if scale == 0 or not math.isfinite(scale):
        return 2
    return int(min(6, max(0, 1 - math.floor(math.log10(scale)))))


def _cell(e: Estimate, signed: bool = False) -> tuple[str, str, str]:
    d = _decimals(e)
    # An interval that excludes 0 must not print a bound as 0.
    while e.excludes_zero() and d < 8 and round(min(abs(e.low), abs(e.high)), d) == 0:
        d += 1
    sign = "+" if signed else ""

    def text(x: float, spec: str = "") -> str:
        out = f"{x:{spec}.{d}f}"
        return out[1:] if out.startswith("-") and float(out) == 0 else out  # no "-0"

    return text(e.value, sign), text(e.low), text(e.high)


def _method_label(method: str) -> str:
    return UNARY_LABEL if method == UNARY else LABELS.get(method, method)


def _groups(table: Table) -> list[tuple[str, list[tuple[str, str]]]]:
    """Column groups of the main table: ``[(method, [(metric key, title)])]``."""
    groups = [(m, [(key, title) for key, title, *_ in METRICS]) for m in table.methods]
    return [*groups, (UNARY, [("u_ppl", "U-PPL")])]


def _versus_groups(table: Table) -> list[tuple[str, list[tuple[str, str]]]]:
    return [(m, [(key, title) for key, title, *_ in METRICS]) for m in table.methods if m != REFERENCE]


def _caption(table: Table) -> str:
    return (f"{int(LEVEL * 100)}% percentile-bootstrap intervals over each run's pairs "
            f"({table.resamples} resamples, seed {table.seed}); P-PPL and U-PPL are exp of the mean NLL of "
            "each resample.")


def _versus_caption(table: Table) -> str:
    return ("Paired comparison with AG on the same pairs: method − AG (differences of perplexities, of mean "
            f"KLs) with {int(LEVEL * 100)}% bootstrap intervals over the same resamples; in bold where the "
            "interval excludes 0 (negative: lower than AG's).")


def table_markdown(table: Table) -> str:
    """The table as Markdown: values with ``[low, high]``, then the comparison with AG."""

    def render(groups: list, cells: Any) -> list[str]:
        head = [t for t, _ in table.labels] + ["Pairs"]
        head += [f"{_method_label(m)} {title}" for m, cols in groups for _, title in cols]
        align = "|" + ":--|" * len(table.labels) + "--:|" * (len(head) - len(table.labels))
        lines = ["| " + " | ".join(head) + " |", align]
        for i, row in enumerate(table.rows):
            out = [values[i] for _, values in table.labels] + [str(row.n_pairs)]
            out += [cells(row, m, key) for m, cols in groups for key, _ in cols]
            lines.append("| " + " | ".join(out) + " |")
        return lines

    def value(row: RunRow, m: str, key: str) -> str:
        v, lo, hi = _cell(row.estimates[m, key])
        return f"{v} [{lo}, {hi}]"

    def diff(row: RunRow, m: str, key: str) -> str:
        e = row.versus[m, key]
        v, lo, hi = _cell(e, signed=True)
        return f"**{v}** [{lo}, {hi}]" if e.excludes_zero() else f"{v} [{lo}, {hi}]"

    lines = ["## P-PPL, U-PPL and KLs per method", "", _caption(table), "", *render(_groups(table), value), ""]
    lines += ["## Each method against AG", ""]
    if table.reference is None:
        lines += ["No AG among these runs' methods: no paired comparison.", ""]
    else:
        lines += [_versus_caption(table), "", *render(_versus_groups(table), diff), ""]
    return "\n".join(lines)


def table_csv(table: Table) -> str:
    """One row per run × method × metric: the value, its interval, and (but for AG and the
    MLM's conditionals) the difference from AG with its interval."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    label_keys = ["run", "model", "data", "masking", "dtype", "matmul_precision", "seed"]
    writer.writerow([*label_keys, "pairs", "method", "metric", "value", "low", "high",
                     "minus_ag", "minus_ag_low", "minus_ag_high"])
    for row in table.rows:
        labels = [str(row.directory)] + [str(row.settings.get(k)) for k in label_keys[1:]]
        for (method, key), e in row.estimates.items():
            versus = row.versus.get((method, key))
            diff = [repr(versus.value), repr(versus.low), repr(versus.high)] if versus else ["", "", ""]
            writer.writerow([*labels, row.n_pairs, method, key, repr(e.value), repr(e.low), repr(e.high), *diff])
    return buffer.getvalue()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def table_latex(table: Table) -> str:
    """The table as LaTeX (booktabs; ``\\resizebox`` needs graphicx), then the comparison with AG."""

    def render(groups: list, cells: Any, caption: str) -> list[str]:
        n_labels = len(table.labels) + 1
        widths = [len(cols) for _, cols in groups]
        spec = "l" * len(table.labels) + "r" + "".join("c" * w for w in widths)
        top, rules, start = [""] * n_labels, [], n_labels + 1
        for (m, _), w in zip(groups, widths):
            top.append(rf"\multicolumn{{{w}}}{{c}}{{{_tex(_method_label(m))}}}")
            rules.append(rf"\cmidrule(lr){{{start}-{start + w - 1}}}")
            start += w
        head = [_tex(t) for t, _ in table.labels] + ["Pairs"] + [_tex(title) for _, cols in groups for _, title in cols]
        lines = [r"\begin{table}[t]", r"\centering", r"\resizebox{\linewidth}{!}{%",
                 rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(top) + r" \\", "".join(rules),
                 " & ".join(head) + r" \\", r"\midrule"]
        for i, row in enumerate(table.rows):
            out = [_tex(values[i]) for _, values in table.labels] + [str(row.n_pairs)]
            out += [cells(row, m, key) for m, cols in groups for key, _ in cols]
            lines.append(" & ".join(out) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}}", rf"\caption{{{_tex(caption)}}}", r"\end{table}"]
        return lines

    def value(row: RunRow, m: str, key: str) -> str:
        v, lo, hi = _cell(row.estimates[m, key])
        return rf"{v} {{\scriptsize[{lo}, {hi}]}}"

    def diff(row: RunRow, m: str, key: str) -> str:
        e = row.versus[m, key]
        v, lo, hi = _cell(e, signed=True)
        v = rf"\textbf{{{v}}}" if e.excludes_zero() else v
        return rf"{v} {{\scriptsize[{lo}, {hi}]}}"

    lines = ["% jaxjoint table: \\usepackage{booktabs,graphicx}", *render(_groups(table), value, _caption(table))]
    if table.reference is not None:
        lines += ["", *render(_versus_groups(table), diff, _versus_caption(table))]
    return "\n".join(lines) + "\n"


def table_png(table: Table) -> bytes:
    """A figure: one panel per metric, each method's value per run with its interval; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [" · ".join(values[i] for _, values in table.labels) for i in range(len(table.rows))]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    width = 0.8 / len(runs)
    for ax, (key, title, _, is_ppl) in zip(axes.flat, METRICS):
        methods = [*table.methods, UNARY] if key == "u_ppl" else list(table.methods)
        lows = []
        for k, (row, run) in enumerate(zip(table.rows, runs)):
            x = np.arange(len(methods)) - 0.4 + width * (k + 0.5)
            e = [row.estimates[m, key] for m in methods]
            y = np.array([v.value for v in e])
            err = np.array([[v.value - v.low for v in e], [v.high - v.value for v in e]])
            ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, markersize=4, label=run)
            lows += [v.low for v in e]
        ax.set_xticks(np.arange(len(methods)), [_method_label(m).replace(" ", "\n") for m in methods])
        highs = [row.estimates[m, key].high for row in table.rows for m in methods]
        if min(lows) > 0 and max(highs) / min(lows) > 20:  # perplexities and KLs can span decades
            ax.set_yscale("log")
        ax.set_title(title + (" (exp of mean NLL)" if is_ppl else " (mean, nats)"))
        ax.grid(alpha=0.3, axis="y")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(runs), 3), fontsize="small", frameon=False)
    fig.suptitle(f"{int(LEVEL * 100)}% bootstrap intervals over each run's pairs "
                 f"({table.resamples} resamples, seed {table.seed})")
    rows_of_legend = math.ceil(len(runs) / 3)
    fig.tight_layout(rect=(0, 0.03 * rows_of_legend + 0.01, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def output_format(output: str | Path | None) -> str:
    """The format an output path asks for by its extension (None: Markdown to stdout)."""
    if output is None:
        return "markdown"
    suffix = Path(output).suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"--output {output}: give a file ending in .md, .csv, .tex or .png")
    return FORMATS[suffix]


def render(table: Table, fmt: str) -> str | bytes:
    """The table in ``fmt`` (``markdown``, ``csv``, ``latex`` or ``png``)."""
    return {"markdown": table_markdown, "csv": table_csv, "latex": table_latex, "png": table_png}[fmt](table)


def write_table(directories: Sequence[str | Path], output: str | Path | None = None, *,
                resamples: int = RESAMPLES, seed: int = 0) -> str | None:
    """Make the table of ``directories`` and write it to ``output`` whole (an atomic
    replace), or return it as Markdown when ``output`` is None. Nothing is written
    when a run is refused."""
    fmt = output_format(output)
    content = render(make_table(directories, resamples=resamples, seed=seed), fmt)
    if output is None:
        return content
    try:
        write_atomic(Path(output), content)
    except OSError as err:
        raise UserError(f"cannot write {output} ({err.strerror or err})") from None
    return None
