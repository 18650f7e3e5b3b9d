"""AG's fixed point as the minimiser of a convex function: Newton's method and the
distance estimate of the stopping rule (DESIGN.md §1).

With t = pA, s = pB, E = qA + qB, alpha[a] = sum_b qA(a|b), beta[b] = sum_a qB(b|a) and
sigma[a, b] = t[a] / (t[a] + s[b]), the fixed point's equations are
``sum_b E sigma = alpha`` and ``sum_a E (1 - sigma) = beta``: the gradient of

    Phi(theta, phi) = sum_ab E[a, b] log(e^theta[a] + e^phi[b]) - alpha.theta - beta.phi

in theta = log t, phi = log s. Phi is convex (a log-sum-exp of linear functions, weighted
by E >= 0), constant along theta + c, phi + c only, so the fixed point is its unique
minimiser up to normalisation, and Newton's method reaches it: the Hessian is the
Laplacian of the bipartite graph weighted by W = E sigma (1 - sigma), applied to a
vector in one pass over the table; each Newton direction is a few passes of
preconditioned conjugate gradients. Plain AG is the MM step of the same problem,
``theta += log(1 - gradient)``: a gradient step that crawls along tokens whose
curvature W vanishes (marginals far below their rows' mass), which Newton divides out.

Everything runs inside ``shard_map`` on the local rows. Row quantities (gradient,
curvature diagonal, CG vectors) are kept in the row's own units: the table holds
``E[a, b] = e[a, b] * omega[a]`` (``ag.invariant_table``), and row a's equation is
divided by omega[a], so nothing underflows with the row; inner products weight row
terms by omega.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxjoint.joints.streaming import fold_rows, logsumexp_across_devices
from jaxjoint.sharding import VOCAB_AXIS

CG_MAX = 50  # conjugate-gradient passes per Newton direction
CG_RTOL = 0.01  # relative (preconditioned) residual that ends a direction's CG
STEP_CAP = 10.0  # largest change of one log-marginal in one Newton step, in nats
FROZEN = -80.0  # log-marginals below this (normalised) are left where they are: their
# cells underflow float32, so their gradient is noise (and they carry < 1e-34 of the mass)
STALL = 6  # Newton steps without halving the best estimate: float32's floor is reached ...
LOCAL = 1e-3  # ... counted once the estimate is this small (far off, Newton may take many steps to halve it)


def sigmoid_parts(theta, phi):
    """sigma = t/(t+s), 1 - sigma and sigma (1 - sigma) of each cell [c, V] from
    theta [c] and phi [V]: one exp per cell, of a non-positive number (no overflow);
    theta = -inf (padding) gives sigma = 0."""
    d = phi[None, :] - theta[:, None]
    e = jnp.exp(-jnp.abs(d))
    inv = 1 / (1 + e)
    small = e * inv
    up = d > 0
    return jnp.where(up, small, inv), jnp.where(up, inv, small), small * inv


def problem(table, estimating):
    """The convex problem's constants on the local rows from AG's invariant table
    (e [n, V], row log-scale s [n]): (e, omega = e^s [n], the mean conditionals
    ([n], [V]), each summing to 1; zeros unless ``estimating``, bool[]).

    alpha and beta are taken from the table itself, alpha[a] = sum_b E[a, b] - 1 and
    beta[b] = sum_a E[a, b] - 1 (exact identities, as the conditionals sum to 1): Phi's
    minimiser is then the fixed point of AG's map on this same float32 table, not of a
    problem whose two sides are rounded differently (qA's exps and E's differ by
    float32's rounding of |log q|, ~1e-6 relative at log q = -10, and the fixed point
    moves by that times the problem's condition).
    """
    e, s = table
    omega = jnp.exp(s)
    v = e.shape[1]

    def mean_conditionals():
        """(1/V) sum_b qA(a|b), (1/V) sum_a qB(b|a): the stopping rule's weights."""
        mean_qa = jnp.maximum(omega * e.sum(axis=1) - 1, 0.0) / v
        return mean_qa, jnp.maximum(lax.psum((e * omega[:, None]).sum(axis=0), VOCAB_AXIS) - 1, 0.0) / v

    # a pass over the table, skipped by a run that never estimates (the paper's fixed count)
    means = lax.cond(estimating, mean_conditionals, lambda: (jnp.zeros_like(s), jnp.zeros(v)))
    return e, omega, means


def gradient(prob, theta, phi, block_rows: int):
    """One pass: Phi's gradient and the Hessian's diagonal at (theta, phi), each as
    (rows in their own units [n], columns [V]): 1 - sum_b E (1 - sigma) for a row,
    1 - sum_a E sigma for a column (DESIGN.md §1)."""
    e, omega = prob[:2]

    def step(cols, block):
        e, th, om = block
        sig, rest, w = sigmoid_parts(th, phi)
        ew = e * w
        col_g, col_d = cols
        cols = col_g + (e * sig * om[:, None]).sum(axis=0), col_d + (ew * om[:, None]).sum(axis=0)
        return cols, ((e * rest).sum(axis=1), ew.sum(axis=1))

    zeros = lax.pcast(jnp.zeros(phi.shape), VOCAB_AXIS, to="varying")
    cols, (row_g, row_d) = fold_rows(step, (zeros, zeros), (e, theta, omega), block_rows)
    col_g, col_d = lax.psum(jnp.stack(cols), VOCAB_AXIS)
    return (1 / omega - row_g, 1 - col_g), (row_d, col_d)


def hessian_times(prob, theta, phi, diag, vec, block_rows: int):
    """One pass: the Hessian of Phi at (theta, phi) times ``vec`` (rows [n], columns [V]),
    rows in their own units."""
    e, omega = prob[:2]
    vec_rows, vec_cols = vec

    def step(cols, block):
        e, th, om, vr = block
        ew = e * sigmoid_parts(th, phi)[2]
        return cols + (ew * (om * vr)[:, None]).sum(axis=0), (ew * vec_cols[None, :]).sum(axis=1)

    zeros = lax.pcast(jnp.zeros(phi.shape), VOCAB_AXIS, to="varying")
    cols, rows = fold_rows(step, zeros, (e, theta, omega, vec_rows), block_rows)
    return diag[0] * vec_rows - rows, diag[1] * vec_cols - lax.psum(cols, VOCAB_AXIS)


def newton_direction(prob, theta, phi, budget, block_rows: int):
    """Newton's direction at (theta, phi) by Jacobi-preconditioned conjugate gradients,
    at most ``budget`` passes (gradient included). Returns (direction as (rows [n],
    columns [V]), passes used)."""
    omega = prob[1]

    def dot(u, v):
        return lax.psum((omega * u[0] * v[0]).sum(), VOCAB_AXIS) + (u[1] * v[1]).sum()

    g, diag = gradient(prob, theta, phi, block_rows)
    norm = normalised_logs(theta, phi)
    active = jax.tree.map(lambda x, d, g: (x > FROZEN) & (d > 0) & jnp.isfinite(g), norm, diag, g)
    inverse = jax.tree.map(lambda a, d: jnp.where(a, 1 / jnp.where(a, d, 1.0), 0.0), active, diag)
    r = jax.tree.map(lambda a, g: jnp.where(a, -g, 0.0), active, g)
    # H's null vector is all ones (theta and phi shifted together): a rounding component of
    # the gradient along it is unreachable and would make CG grow along it. Removed along D.
    diag_active = jax.tree.map(lambda a, d: jnp.where(a, d, 0.0), active, diag)
    ones = (jnp.ones_like(r[0]), jnp.ones_like(r[1]))
    along = dot(ones, r) / dot(ones, diag_active)
    r = jax.tree.map(lambda r, d: r - along * d, r, diag_active)
    z = jax.tree.map(jnp.multiply, r, inverse)
    rz = dot(r, z)
    zero = jax.tree.map(jnp.zeros_like, r)

    def more(s):
        return (s["k"] < jnp.minimum(CG_MAX, budget - 1)) & (s["rz"] > CG_RTOL**2 * rz) & s["ok"]

    def step(s):
        hp = hessian_times(prob, theta, phi, diag, s["p"], block_rows)
        hp = jax.tree.map(lambda a, h: jnp.where(a, h, 0.0), active, hp)
        curvature = dot(s["p"], hp)
        ok = curvature > 0  # rounding can make a last direction non-positive: stop there
        a = jnp.where(ok, s["rz"] / jnp.where(ok, curvature, 1.0), 0.0)
        d = jax.tree.map(lambda d, p: d + a * p, s["d"], s["p"])
        r = jax.tree.map(lambda r, h: r - a * h, s["r"], hp)
        z = jax.tree.map(jnp.multiply, r, inverse)
        rz_new = dot(r, z)
        p = jax.tree.map(lambda z, p: z + rz_new / s["rz"] * p, z, s["p"])
        return dict(k=s["k"] + 1, d=d, r=r, p=p, rz=rz_new, ok=ok)

    s = lax.while_loop(more, step, dict(k=jnp.int32(0), d=zero, r=r, p=z, rz=rz, ok=rz > 0))
    return s["d"], 1 + s["k"]


def normalised_logs(theta, phi):
    """theta, phi shifted so that exp of each sums to 1 (rows over all devices)."""
    return theta - logsumexp_across_devices(jax.nn.logsumexp(theta)), phi - jax.nn.logsumexp(phi)


def normalised_probs(theta, phi):
    """The marginals exp(theta), exp(phi), each scaled to sum to 1 (rows over all devices)."""
    return jax.tree.map(jnp.exp, normalised_logs(theta, phi))


def change_after_step(theta, phi, d, mean_q):
    """How far the step d moves the normalised marginals at (theta, phi): each token's
    change |t' - t| = t |expm1(d - shift)|, weighted by max(1, qbar / t) with qbar its mean
    conditional (``problem``). Unweighted, the L1 distance; the weight also counts, at
    their conditional mass, tokens that the marginals make rare but the conditionals do
    not, whose log-marginals J and the metrics depend on and L1 does not see. The
    relative change is taken with expm1 so that a small step is not lost in the rounding
    of t (a difference of two exps has float32's rounding of the whole mass as floor)."""
    log_t, log_s = normalised_logs(theta, phi)
    t, s = jnp.exp(log_t), jnp.exp(log_s)
    d_t, d_s = jnp.where(jnp.isfinite(theta), d[0], 0.0), d[1]
    shift_t = jnp.log1p(lax.psum((t * jnp.expm1(d_t)).sum(), VOCAB_AXIS))
    shift_s = jnp.log1p((s * jnp.expm1(d_s)).sum())
    w_t, w_s = jnp.maximum(t, mean_q[0]), jnp.maximum(s, mean_q[1])
    return (lax.psum((w_t * jnp.abs(jnp.expm1(d_t - shift_t))).sum(), VOCAB_AXIS)
            + (w_s * jnp.abs(jnp.expm1(d_s - shift_s))).sum())


def distance_estimate(prob, theta, phi, budget, block_rows: int):
    """(Newton direction, its passes, ``change_after_step`` of the full Newton step): the
    stopping rule's estimate of the distance from the fixed point (an upper estimate of
    the L1 distance), exact to second order near it."""
    d, passes = newton_direction(prob, theta, phi, budget, block_rows)
    return d, passes, change_after_step(theta, phi, d, prob[2])


def newton_solve(prob, theta, phi, max_passes, tol, block_rows: int):
    """Newton steps from (theta, phi) until the estimated distance is below ``tol``, the
    passes run out (one is kept for the caller's last AG pass), or float32's floor
    (``STALL`` steps without halving the best estimate, once below ``LOCAL``). A step moves no log-marginal by
    more than ``STEP_CAP``. Returns (passes, theta, phi, delta): delta is the estimate
    at the point the last step started from (a Newton step only brings it closer)."""
    valid = jnp.isfinite(theta)

    def more(s):
        return (s["i"] + 2 <= max_passes - 1) & ~(s["delta"] < tol) & (s["stall"] < STALL)

    def step(s):
        d, passes, delta = distance_estimate(prob, s["theta"], s["phi"], max_passes - 1 - s["i"], block_rows)
        # Clipped per coordinate: a token of negligible mass whose float32 gradient is
        # noise may want a huge move; it must not shorten everyone's step.
        t, u = normalised_probs(s["theta"], s["phi"])
        centre = (lax.psum((t * jnp.where(valid, d[0], 0.0)).sum(), VOCAB_AXIS) + (u * d[1]).sum()) / 2
        d = jax.tree.map(lambda d: jnp.clip(d - centre, -STEP_CAP, STEP_CAP), d)
        theta = jnp.where(valid, s["theta"] + d[0], -jnp.inf)
        phi = s["phi"] + d[1]
        shift = logsumexp_across_devices(jax.nn.logsumexp(theta))
        theta, phi = theta - shift, phi - shift
        finite = jnp.isfinite(lax.psum(jnp.where(valid, theta, 0.0).sum(), VOCAB_AXIS) + phi.sum())
        improved = (delta < 0.5 * s["best"]) | (s["best"] > LOCAL)
        return dict(i=s["i"] + passes,
                    theta=jnp.where(finite, theta, s["theta"]), phi=jnp.where(finite, phi, s["phi"]),
                    delta=delta, best=jnp.minimum(s["best"], delta),
                    stall=jnp.where(finite, jnp.where(improved, 0, s["stall"] + 1), STALL))

    inf = jnp.float32(jnp.inf)
    s = lax.while_loop(more, step, dict(i=jnp.int32(0), theta=theta, phi=phi, delta=inf, best=inf,
                                        stall=jnp.int32(0)))
    return s["i"], s["theta"], s["phi"], s["delta"]
