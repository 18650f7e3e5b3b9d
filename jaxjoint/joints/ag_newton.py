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
SLACK = 2.0**-20  # a rise of Phi below this times its terms' magnitude is float32's rounding, not a rise


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


def problem(table, logits, estimating):
    """The convex problem on the local rows: (e, omega = e^s [n], the mean conditionals
    ([n], [V]), each summing to 1, zeros unless ``estimating`` (bool[]), logits).

    table: AG's invariant table (e [n, V], row log-scale s [n]), read by the Hessian's
    passes. logits: (fa, fb [n, V], norm_a [V], norm_b [n]), read by the gradient's
    pass, which takes qA and qB apart (``gradient``): a rare token's equation is the
    balance of two small sums, which the table's qA + qB would give only as differences
    from 1 (float32 keeps ~6e-8 of 1: percent errors in marginals below ~1e-8).
    """
    e, s = table
    fa, fb, norm_a, norm_b = logits
    v = e.shape[1]

    def mean_conditionals():
        """(1/V) sum_b qA(a|b), (1/V) sum_a qB(b|a): the stopping rule's weights."""
        mean_qa = jnp.exp(norm_a[None, :].log_q(fa)).sum(axis=1) / v
        return mean_qa, lax.psum(jnp.exp(norm_b[:, None].log_q(fb)).sum(axis=0), VOCAB_AXIS) / v

    # a pass over the tables, skipped by a run that never estimates (the paper's fixed count)
    means = lax.cond(estimating, mean_conditionals, lambda: (jnp.zeros_like(s), jnp.zeros(v)))
    return e, jnp.exp(s), means, logits


def gradient(prob, theta, phi, block_rows: int, objective: bool = False):
    """One pass over the logit tables: Phi's gradient, the Hessian's diagonal and AG's map
    at (theta, phi).

    Returns (gradient, diagonal, map_step[, (Phi, its magnitude)]), each of the first
    three as (rows [n], columns [V]), rows in their own units (divided by omega). The
    gradient is 1 - sum_b E (1 - sigma) for a row and 1 - sum_a E sigma for a column
    (DESIGN.md §1), summed as sum_b (qB sigma - qA (1 - sigma)) and
    sum_a (qA (1 - sigma) - qB sigma) (the conditionals sum to 1): no difference from 1,
    so each token's equation keeps float32's relative precision however rare it is.
    ``map_step`` is the log of one minus the gradient, what plain AG's map (the MM step)
    adds to theta and phi before normalising (0 where the sum underflowed: the token
    stays). With ``objective``, also Phi = sum E (log(e^theta + e^phi) - theta - phi) +
    sum theta + sum phi (the same function; the form needs no alpha, beta) and the sum
    of its terms' magnitudes, the scale of its float32 rounding (one log1p more per cell).
    """
    omega = prob[1]
    fa, fb, norm_a, norm_b = prob[3]
    scale = jnp.log(omega)  # the table's row scale s (-inf on padding rows)
    valid = jnp.isfinite(theta)

    def step(cols, block):
        fa, fb, norm_b, th, om, sc = block
        shift = jnp.where(jnp.isfinite(sc), sc, 0.0)[:, None]
        qa = jnp.exp(norm_a[None, :].log_q(fa) - shift)  # qA, qB in the row's units
        qb = jnp.exp(norm_b[:, None].log_q(fb) - shift)
        e = qa + qb
        sig, rest, w = sigmoid_parts(th, phi)
        balance = qb * sig - qa * rest
        ew = e * w
        col_g, col_d, col_m = cols
        cols = (col_g - (balance * om[:, None]).sum(axis=0), col_d + (ew * om[:, None]).sum(axis=0),
                col_m + (e * sig * om[:, None]).sum(axis=0))
        rows = balance.sum(axis=1), ew.sum(axis=1), (e * rest).sum(axis=1)
        if objective:
            # log(e^th + e^phi) - th - phi = -min(th, phi) + log1p(e^-|th - phi|); 0 on padding rows
            low = jnp.minimum(th[:, None], phi[None, :])
            brk = jnp.log1p(jnp.exp(-jnp.abs(phi[None, :] - th[:, None]))) - low
            brk = jnp.where(jnp.isfinite(th)[:, None], brk, 0.0)
            rows = rows + ((e * brk).sum(axis=1), (e * jnp.abs(brk)).sum(axis=1))
        return cols, rows

    zeros = lax.pcast(jnp.zeros(phi.shape), VOCAB_AXIS, to="varying")
    cols, rows = fold_rows(step, (zeros, zeros, zeros), (fa, fb, norm_b, theta, omega, scale), block_rows)
    row_g, row_d, row_m = rows[:3]
    col_g, col_d, col_m = lax.psum(jnp.stack(cols), VOCAB_AXIS)
    row_g = jnp.where(valid, row_g, 0.0)

    def log_positive(x):
        return jnp.where(x > 0, jnp.log(jnp.where(x > 0, x, 1.0)), 0.0)

    map_step = (jnp.where(row_m > 0, log_positive(row_m) + scale, 0.0), log_positive(col_m))
    if not objective:
        return (row_g, col_g), (row_d, col_d), map_step
    row_obj, row_mag = (jnp.where(valid, omega * r, 0.0) for r in rows[3:])
    th = jnp.where(valid, theta, 0.0)
    value = lax.psum(jnp.stack([row_obj.sum() + th.sum(), row_mag.sum() + jnp.abs(th).sum()]), VOCAB_AXIS)
    return (row_g, col_g), (row_d, col_d), map_step, (value[0] + phi.sum(), value[1] + jnp.abs(phi).sum())


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


def newton_direction(prob, theta, phi, g, diag, budget, block_rows: int):
    """Newton's direction at (theta, phi) from ``gradient``'s g and diag there, by
    Jacobi-preconditioned conjugate gradients, at most ``budget`` passes. Returns
    (direction as (rows [n], columns [V]), passes used)."""
    omega = prob[1]

    def dot(u, v):
        return lax.psum((omega * u[0] * v[0]).sum(), VOCAB_AXIS) + (u[1] * v[1]).sum()

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
        return (s["k"] < jnp.minimum(CG_MAX, budget)) & (s["rz"] > CG_RTOL**2 * rz) & s["ok"]

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
    return s["d"], s["k"]


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
    g, diag, _ = gradient(prob, theta, phi, block_rows)
    d, passes = newton_direction(prob, theta, phi, g, diag, budget - 1, block_rows)
    return d, 1 + passes, change_after_step(theta, phi, d, prob[2])


def normalised_step(theta, phi, d):
    """(theta + d[0], phi + d[1]) shifted so that the rows' marginal sums to 1 (padding
    rows stay -inf)."""
    valid = jnp.isfinite(theta)
    theta = jnp.where(valid, theta + d[0], -jnp.inf)
    phi = phi + d[1]
    shift = logsumexp_across_devices(jax.nn.logsumexp(theta))
    return theta - shift, phi - shift


def newton_solve(prob, theta, phi, max_passes, tol, block_rows: int):
    """Newton steps from (theta, phi) until the estimated distance is below ``tol``, the
    passes run out (one is kept for the caller's last AG pass), or float32's floor
    (``STALL`` steps without halving the best estimate, once below ``LOCAL``).

    Safeguarded: a step moves no log-marginal by more than ``STEP_CAP``; each point's
    first pass (the gradient's) also gives Phi there, and a point where Phi rose above
    the last accepted point's by more than float32's rounding (``SLACK`` of its terms'
    magnitude) is refused: the iterate goes back and takes plain AG's step from the
    accepted point instead (its MM step, which never raises Phi; free, from that point's
    gradient pass), as it does where a Newton step is not finite.
    Returns (passes, theta, phi, delta, fall-backs): delta is the estimate at the point
    the last Newton step started from (a Newton step only brings it closer).
    """

    def more(s):
        return (s["i"] + 2 <= max_passes - 1) & ~(s["delta"] < tol) & (s["stall"] < STALL)

    def step(s):
        theta, phi = s["theta"], s["phi"]
        g, diag, map_step, (value, magnitude) = gradient(prob, theta, phi, block_rows, objective=True)
        raised = value > s["ref_value"] + SLACK * magnitude  # (first point: reference +inf)

        def newton():
            d, k = newton_direction(prob, theta, phi, g, diag, max_passes - 2 - s["i"], block_rows)
            delta = change_after_step(theta, phi, d, prob[2])
            # Clipped per coordinate: a token of negligible mass whose float32 gradient is
            # noise may want a huge move; it must not shorten everyone's step.
            t, u = normalised_probs(theta, phi)
            valid = jnp.isfinite(theta)
            centre = (lax.psum((t * jnp.where(valid, d[0], 0.0)).sum(), VOCAB_AXIS) + (u * d[1]).sum()) / 2
            d = jax.tree.map(lambda d: jnp.clip(d - centre, -STEP_CAP, STEP_CAP), d)
            # (clipped, a step is finite unless NaN; NaN anywhere makes this sum NaN)
            finite = jnp.isfinite(lax.psum(jnp.where(valid, d[0], 0.0).sum(), VOCAB_AXIS) + d[1].sum())
            d = jax.tree.map(lambda d, m: jnp.where(finite, d, m), d, map_step)
            return (*normalised_step(theta, phi, d), delta, k, ~finite)

        def fall_back():
            return (*normalised_step(s["ref_theta"], s["ref_phi"], s["ref_step"]), s["delta"], jnp.int32(0),
                    jnp.bool_(True))

        new_theta, new_phi, delta, k, fell_back = lax.cond(raised, fall_back, newton)
        improved = (delta < 0.5 * s["best"]) | (s["best"] > LOCAL)
        keep = lambda old, new: jax.tree.map(lambda o, n: jnp.where(raised, o, n), old, new)  # noqa: E731
        return dict(i=s["i"] + 1 + k, theta=new_theta, phi=new_phi, delta=delta, best=jnp.minimum(s["best"], delta),
                    stall=jnp.where(improved & ~fell_back, 0, s["stall"] + 1),
                    fallbacks=s["fallbacks"] + fell_back.astype(jnp.int32),
                    ref_theta=keep(s["ref_theta"], theta), ref_phi=keep(s["ref_phi"], phi),
                    ref_step=keep(s["ref_step"], map_step), ref_value=keep(s["ref_value"], value))

    inf = jnp.float32(jnp.inf)
    zero_step = (jnp.zeros_like(theta), jnp.zeros_like(phi))
    s = lax.while_loop(more, step, dict(i=jnp.int32(0), theta=theta, phi=phi, delta=inf, best=inf,
                                        stall=jnp.int32(0), fallbacks=jnp.int32(0), ref_theta=theta,
                                        ref_phi=phi, ref_step=zero_step, ref_value=inf))
    return s["i"], s["theta"], s["phi"], s["delta"], s["fallbacks"]
