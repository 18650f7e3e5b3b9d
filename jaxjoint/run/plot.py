"""``jaxjoint plot DIR``: pairwise and unary NLL against the distance between A and B."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxjoint.errors import UserError
from jaxjoint.joints import LABELS
from jaxjoint.run.rundir import PAIRS_FILE, read_pairs

PLOT_FILE = "nll_by_distance.png"


def nll_by_distance(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """Mean NLLs per token distance ``|B - A|``, per method.

    Returns ``{method: {"distance": int[D], "p_nll": float[D], "u_nll": float[D]}}``
    with distances ascending; the MLM's own conditionals appear as ``mlm_unary``
    (``u_nll`` only, ``p_nll`` all NaN).
    """
    sums: dict[str, dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        distance = abs(r["positions"][1] - r["positions"][0])
        for method, m in r["metrics"].items():
            sums[method][distance].append((m["p_nll"], m["u_nll"]))
        sums["mlm_unary"][distance].append((float("nan"), r["mlm_unary_u_nll"]))
    curves = {}
    for method, by_distance in sums.items():
        distances = sorted(by_distance)
        means = np.array([np.mean(by_distance[d], axis=0) for d in distances]).reshape(-1, 2)
        curves[method] = {"distance": np.array(distances), "p_nll": means[:, 0], "u_nll": means[:, 1]}
    return curves


def plot_run(directory: str | Path, path: str | Path | None = None) -> Path:
    """Draw ``nll_by_distance`` of an evaluation directory into a PNG.

    Two panels, pairwise NLL and unary NLL, one line per method; returns the PNG's
    path (default ``DIRECTORY/nll_by_distance.png``).
    """
    directory = Path(directory)
    # What is wrong with DIR, said as such (read_pairs' own advice is for a failing disk).
    if not directory.exists():
        raise UserError(f"{directory} does not exist; give the --out directory of a jaxjoint evaluate run")
    if not directory.is_dir():
        raise UserError(f"{directory} is a file; give the --out directory of a jaxjoint evaluate run "
                        f"(the one holding {PAIRS_FILE})")
    if not (directory / PAIRS_FILE).is_file():
        raise UserError(f"{directory} has no {PAIRS_FILE}: not the --out directory of a jaxjoint evaluate run, "
                        "or one that has not finished a pair yet")
    records, _ = read_pairs(directory / PAIRS_FILE)
    if not records:
        raise UserError(f"{directory / PAIRS_FILE} holds no finished pair yet; run jaxjoint evaluate first")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = nll_by_distance(records)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for method, c in curves.items():
        label = LABELS.get(method, "MLM conditionals")
        style = dict(marker="o", markersize=3, label=label)
        if method == "mlm_unary":
            right.plot(c["distance"], c["u_nll"], linestyle="--", color="black", **style)
            continue
        left.plot(c["distance"], c["p_nll"], **style)
        right.plot(c["distance"], c["u_nll"], **style)
    left.set_title("pairwise NLL  −½ log p(a₀, b₀)")
    right.set_title("unary NLL  −½ [log p(a₀|b₀) + log p(b₀|a₀)]")
    for ax in (left, right):
        ax.set_xlabel("token distance |B − A|")
        ax.set_ylabel("mean NLL (nats)")
        ax.grid(alpha=0.3)
    right.legend(fontsize="small")
    fig.suptitle(f"{directory.name}: {len(records)} pairs")
    fig.tight_layout()
    target = directory / PLOT_FILE if path is None else Path(path)
    try:
        fig.savefig(target, dpi=120)
    except OSError as err:
        raise UserError(f"cannot write {target} ({err.strerror})") from None
    except ValueError as err:  # matplotlib: an image format it does not know
        raise UserError(f"cannot write {target}: {err}") from None
    finally:
        plt.close(fig)
    return target
