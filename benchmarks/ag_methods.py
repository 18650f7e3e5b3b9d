"""Which extrapolation for AG: table passes of candidate solvers, float64, on embedded-model pairs.

    python -m benchmarks.ag_methods [--pairs 2] [--corner 1024] [--cap 600]

The measurement behind DESIGN.md §1's choice of solver. For the first ``--pairs``
held-out pairs of the embedded model, the conditionals of the top-left
``--corner`` x ``--corner`` block (renormalised; the full V = 4096 is 16 times
slower per pass in float64 NumPy on 2 cores), and each candidate's passes until the
L1 residual of AG's map falls below 1e-5, 1e-7 and 1e-9 (None: not within ``--cap``
passes; plain gets ten times the cap): plain iteration, SQUAREM (3 passes a cycle),
Anderson (type II) with memory 3, 5 and 8 on log marginals, unweighted and weighted
by sqrt(p). Prints a table and writes JSON; not a test.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine, print_table, write_json

TOLS = (1e-5, 1e-7, 1e-9)


class Passes(Exception):
    """Raised out of a solver when every tolerance is met or the cap is reached."""


def counting_map(log_q: np.ndarray, cap: int):
    """AG's map on concatenated log marginals [2V] (float64), counting passes and
    recording the first pass at which the L1 residual is below each of ``TOLS``."""
    q = jnp.asarray(np.exp(log_q))
    v = q.shape[0]

    @jax.jit
    def f(u):
        p = q / (1 / jnp.exp(u[:v])[:, None] + 1 / jnp.exp(u[v:])[None, :])
        p = p / p.sum()
        return jnp.log(jnp.concatenate([p.sum(1), p.sum(0)]))

    state = {"n": 0, "hit": {}}

    def apply(u):
        if state["n"] >= cap:
            raise Passes
        fu = f(u)
        state["n"] += 1
        r = float(jnp.abs(jnp.exp(fu) - jnp.exp(u)).sum())
        for t in TOLS:
            state["hit"].setdefault(t, state["n"]) if r < t else None
        if len(state["hit"]) == len(TOLS):
            raise Passes
        return fu, r

    return apply, state


def normalised(u, v):
    return jnp.concatenate([u[:v] - jax.nn.logsumexp(u[:v]), u[v:] - jax.nn.logsumexp(u[v:])])


def plain(apply, u, v):
    while True:
        u, _ = apply(u)


def squarem(apply, u, v):
    while True:
        u1, _ = apply(u)
        u2, r2 = apply(u1)
        r, w = u1 - u, u2 - 2 * u1 + u
        a = -max(1.0, float(jnp.linalg.norm(r) / jnp.linalg.norm(w)))
        up = normalised(u - 2 * a * r + a * a * w, v)
        u3, r3 = apply(up)
        u = u3 if r3 < r2 else u2


def anderson(memory: int, weight_power: float):
    def solve(apply, u, v, restart=10.0):
        xs, gs, best = [], [], np.inf
        while True:
            fu, res = apply(u)
            g = fu - u
            if res > restart * best:
                xs, gs = [], []
            best = min(best, res)
            xs, gs = (xs + [u])[-(memory + 1):], (gs + [g])[-(memory + 1):]
            if len(xs) == 1:
                u = fu
                continue
            dx, dg = jnp.diff(jnp.stack(xs), axis=0).T, jnp.diff(jnp.stack(gs), axis=0).T
            w = jnp.exp(weight_power * u)
            gamma = jnp.linalg.lstsq(dg * w[:, None], g * w)[0]
            u = normalised(u + g - (dx + dg) @ gamma, v)
    return solve


SOLVERS = {
    "plain": plain,
    "squarem": squarem,
    "anderson m=3": anderson(3, 0.0),
    "anderson m=5": anderson(5, 0.0),
    "anderson m=3, sqrt(p)": anderson(3, 0.5),
    "anderson m=5, sqrt(p)": anderson(5, 0.5),
    "anderson m=8, sqrt(p)": anderson(8, 0.5),
}


def corner_tables(pairs: int, corner: int) -> list[np.ndarray]:
    """log(qA + qB) [corner, corner] of the first ``pairs`` embedded-model pairs."""
    from jaxjoint.data import load_sentences, make_pairs, max_tokens
    from jaxjoint.default import model_source
    from jaxjoint.models.mlm import load_mlm
    from jaxjoint.tables import pair_tables

    mlm = load_mlm(model_source("default"), dtype="float32")
    found, _ = make_pairs(load_sentences("default", pairs), mlm.tokenizer, masking="random", seed=0,
                          max_length=max_tokens(mlm.config))
    out = []
    for p in found[:pairs]:
        t = pair_tables(mlm, p.input_ids, p.a, p.b)
        la = np.asarray(t.logits_a, np.float64)[:corner, :corner]
        lb = np.asarray(t.logits_b, np.float64)[:corner, :corner]
        la = la - np.log(np.exp(la - la.max(0)).sum(0)) - la.max(0)
        lb = lb - (np.log(np.exp(lb - lb.max(1, keepdims=True)).sum(1, keepdims=True)) + lb.max(1, keepdims=True))
        out.append(np.logaddexp(la, lb))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--corner", type=int, default=1024)
    parser.add_argument("--cap", type=int, default=600)
    parser.add_argument("--json", default="benchmarks/results/ag_methods.json")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    rows = []
    for index, log_q in enumerate(corner_tables(args.pairs, args.corner)):
        v = log_q.shape[0]
        for name, solver in SOLVERS.items():
            apply, state = counting_map(log_q, args.cap * (10 if name == "plain" else 1))
            start = time.perf_counter()
            try:
                solver(apply, jnp.full(2 * v, -np.log(v)), v)
            except Passes:
                pass
            rows.append({"pair": index, "solver": name, **{f"passes_to_{t:g}": state["hit"].get(t) for t in TOLS},
                         "seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)
    print_table(rows, list(rows[0]))
    write_json(args.json, {"benchmark": "ag_methods", "machine": machine(), "corner": args.corner,
                           "cap": args.cap, "results": rows})


if __name__ == "__main__":
    main()
