"""Which extrapolation for AG: table passes of candidate solvers, float64, on embedded-model pairs.

    python -m benchmarks.ag_methods [--pairs 2] [--corner 1024] [--cap 600]

The measurement behind DESIGN.md §1's choice of solver. For the first ``--pairs``
held-out pairs of the embedded model, the conditionals of the top-left
``--corner`` x ``--corner`` block (renormalised; the full V = 4096 is 16 times
slower per pass in float64 NumPy on 2 cores), and each candidate's passes until the
L1 residual of AG's map falls below 1e-5, 1e-7 and 1e-9 (None: not within ``--cap``
passes; plain gets ten times the cap): plain iteration, SQUAREM (3 passes a cycle),
Anderson (type II) with memory 3, 5 and 8 on log marginals, unweighted and weighted
by sqrt(p), and Newton-CG on AG's convex objective (``newton-cg``, the float64 twin of
``joints/ag_newton``: its Hessian-vector products count as passes). ``--solvers``
picks some. Prints a table and writes JSON; not a test.
"""

from __future__ import annotations

import argparse
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.lax import Precision

from benchmarks.common import machine, print_table, write_json

TOLS = (1e-5, 1e-7, 1e-9)
HIGHEST = Precision.HIGHEST  # float64 here, stated all the same


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

    def count(passes: int):
        """Passes that are not the map's (Newton's Hessian-vector products)."""
        state["n"] += passes
        if state["n"] >= cap:
            raise Passes

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

    return apply, count, state


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


def newton_cg(log_q: np.ndarray, count, cg_max: int = 50, cg_rtol: float = 0.01, step_cap: float = 10.0):
    """Newton's method on AG's convex objective Phi (DESIGN.md §1), as ``joints/ag_newton``
    runs it in float32: each step one pass (the map, whose pass also gives the gradient
    and the Hessian's diagonal), then Jacobi-preconditioned CG with one pass per
    Hessian-vector product (``count``), the step centred and clipped to ``step_cap``
    nats; a step that raises Phi is replaced by the map's (plain) step."""
    e = jnp.asarray(np.exp(log_q))
    alpha, beta = e.sum(1) - 1, e.sum(0) - 1
    v = e.shape[0]

    @jax.jit
    def parts(u):
        th, ph = u[:v], u[v:]
        sig = jax.nn.sigmoid(th[:, None] - ph[None, :])
        w = e * sig * (1 - sig)
        g = jnp.concatenate([(e * sig).sum(1) - alpha, (e * (1 - sig)).sum(0) - beta])
        value = (e * jnp.logaddexp(th[:, None], ph[None, :])).sum() - (alpha * th).sum() - (beta * ph).sum()
        return g, jnp.concatenate([w.sum(1), w.sum(0)]), w, value

    @jax.jit
    def hessian_times(w, diag, x):
        return diag * x - jnp.concatenate([jnp.dot(w, x[v:], precision=HIGHEST), jnp.dot(x[:v], w, precision=HIGHEST)])

    def solve(apply, u, v):
        best_value, accepted = np.inf, None
        while True:
            fu, _ = apply(u)
            g, diag, w, value = parts(u)
            if float(value) > best_value + 1e-12 * abs(best_value):  # Phi rose: back, and the plain step from there
                u = accepted[1]
                continue
            best_value, accepted = float(value), (u, fu)
            r = -(g - jnp.sum(g) / jnp.sum(diag) * diag)  # without its part along H's null vector
            z = r / diag
            d, p, rz0 = jnp.zeros_like(u), z, float((r * z).sum())
            rz = rz0
            for _ in range(cg_max):
                if rz <= cg_rtol**2 * rz0:
                    break
                count(1)
                hp = hessian_times(w, diag, p)
                a = rz / float((p * hp).sum())
                d, r = d + a * p, r - a * hp
                z = r / diag
                rz_new = float((r * z).sum())
                p, rz = z + rz_new / rz * p, rz_new
            t, s = jnp.exp(u[:v]), jnp.exp(u[v:])
            centre = float((t * d[:v]).sum() + (s * d[v:]).sum()) / 2
            u = normalised(u + jnp.clip(d - centre, -step_cap, step_cap), v)

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
    parser.add_argument("--solvers", default=",".join([*SOLVERS, "newton-cg"]),
                        help="comma-separated, of: " + ", ".join([*SOLVERS, "newton-cg"]))
    parser.add_argument("--json", default="benchmarks/results/ag_methods.json")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    rows = []
    for index, log_q in enumerate(corner_tables(args.pairs, args.corner)):
        v = log_q.shape[0]
        for name in re.split(r",(?! )", args.solvers):  # (a name's own ", " stays)
            apply, count, state = counting_map(log_q, args.cap * (10 if name == "plain" else 1))
            solver = newton_cg(log_q, count) if name == "newton-cg" else SOLVERS[name]
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
