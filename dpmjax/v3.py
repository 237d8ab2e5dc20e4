"""DPM-Solver-v3 (Zheng, Lu, Chen, Zhu, NeurIPS 2023, arXiv:2310.13268) as a coefficient table.

Use it through ``dpmjax.sample(..., method="v3", ems=ems)`` or the one-step API
``dpmjax.solver(schedule, method="v3", ems=ems)``: the table below becomes per-dimension
rows of :class:`dpmjax.updates.Plan` (:func:`v3_plan`), run by the same solver step
as every other method. Example::

    ems = dpmjax.compute_ems(model_fn, params, key, (2,), schedule=schedule, data=train_data)
    x = dpmjax.sample(model_fn, params, key, (16, 2), schedule=schedule, method="v3", ems=ems,
                      order=3, steps=6, skip_type="logSNR")

**The update.** With the EMS ``l, s, b`` of :mod:`dpmjax.ems` on a uniform lambda grid
(``lambdas[0]`` at the start), let ``L, S`` be the cumulative integrals of ``l, s`` and
``B`` that of ``e^-S b`` from ``lambdas[0]`` (all per dimension). The exact solution of the
ODE ``d(x/alpha)/dlambda = -(f + l x/alpha)`` from ``s`` to ``t`` is (paper Sec. 3.1-3.3)

    x_t = (alpha_t/alpha_s) e^{L_s - L_t} x_s - alpha_t int_s^t e^{L + S - L_t} (G + B) dlambda

with ``f = (sigma eps - l x)/alpha = (1 - l) x/alpha - x0`` and the model-dependent part

    G = e^-S f - B = p x0 + q x + r,   p = -e^-S,  q = e^-S (1 - l)/alpha,  r = -B,

which the EMS make nearly constant (``G`` is the paper's ``g`` up to the step's
anchor factor ``e^{S_s}`` and shift ``B_s``). The solver stores ``G`` of every model
evaluation (an affine map of the data prediction and the evaluation point) and
approximates ``G`` between the ``k`` points ``lambda_0 = lambda_s, lambda_1, ...`` by a
polynomial ``sum_j G_j P_j(lambda - lambda_s)``:

* ``pseudo=False``: ``P_j`` is the Lagrange basis polynomial (the interpolant, whose
  derivatives at ``lambda_s`` the authors obtain with a Vandermonde solve);
* ``pseudo=True`` ("pseudo-order"): ``G(lambda) ~ G_0 + sum_m G[0..m] (lambda - lambda_s)^m``
  with the Newton divided differences ``G[0..m]``;

so the step is linear in the state and the stored ``G``:

    x_t = a x_s + sum_j c_j G_j + r_step,   a = (alpha_t/alpha_s) e^{L_s - L_t},
    c_j = -alpha_t int_s^t e^{L + S - L_t} P_j dlambda,   r_step = -alpha_t int_s^t e^{L + S - L_t} B dlambda,

all per dimension. The integrals use the trapezoid rule on the EMS grid (as the authors
do), which is why the time steps are snapped to grid points.

**The procedure** (the authors' multistep predictor-corrector). Step ``i = 1..steps``
evaluates the model at the current point ``t_{i-1}``; if ``use_corrector`` and the
corrector order ``c_i = p_{i-1} + c_pseudo`` exceeds 1, it redoes the previous step
``t_{i-2} -> t_{i-1}`` with the points ``(t_{i-2}, t_{i-1}, t_{i-3}, ...)``
(``c_i`` of them, including the new evaluation), keeping the stored ``G`` at ``t_{i-1}``
(no extra model call); then it predicts ``t_i`` with order
``p_i = min(i, order)`` (``min(., steps + 1 - i)`` with ``lower_order_final``) from
the points ``t_{i-1}, t_{i-2}, ...``. NFE = ``steps``.

With ``l = 1, s = b = 0`` (:func:`dpmjax.degenerate_ems`) ``G = -x0`` and the predictor is
the exact integral of the interpolant of the data prediction: order 1 is DDIM, order 2
is DPM-Solver++(2M) with ``solver_type="taylor"``, order 3 is UniPC's UniP-3
(not DPM-Solver++(3M), whose second-derivative term differs), and the corrector is
UniC with the Vandermonde weights at every order (UniPC hard-codes 1/2 for its order-1
corrector and order-2 predictor).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import timesteps as _ts
from . import updates as _up
from .ems import EMS, check_ems
from .schedules import NoiseSchedule

__all__ = ["v3_indexes", "v3_orders", "v3_plan", "V3_SKIP_TYPES"]

V3_SKIP_TYPES = ("logSNR", "time_uniform", "time_quadratic", "karras")


def v3_orders(order: int, steps: int, lower_order_final: bool, use_corrector: bool, c_pseudo: bool):
    """Per-iteration predictor orders ``p`` and corrector orders ``c`` (0: no corrector), as the authors' loop."""
    p, c = [], []
    prev = 0
    for i in range(1, steps + 1):
        ci = prev + int(bool(c_pseudo))
        c.append(ci if (use_corrector and ci > 1) else 0)
        k = min(i, order)
        if lower_order_final:
            k = min(k, steps + 1 - i)
        p.append(k)
        prev = k
    return tuple(p), tuple(c)


def _nearest_indexes(lam, lam_ts):
    """The EMS grid index nearest to each of the lambdas ``lam_ts``: ``round(n (lambda -
    lambda_0) / (lambda_n - lambda_0))``, the authors' rule."""
    n = lam.shape[0] - 1
    return np.rint(n * (lam_ts - lam[0]) / (lam[-1] - lam[0])).astype(np.int64)


def _check_distinct(idx, what, remedy):
    if np.any(np.diff(idx) <= 0):
        raise ValueError(f"{what} puts two time steps on the same point of the EMS grid (n = {idx[-1]} intervals; "
                         f"indexes {idx.tolist()}): {remedy}")
    return idx


def v3_indexes(schedule: NoiseSchedule, ems: EMS, steps: int, skip_type: str = "logSNR") -> np.ndarray:
    """The ``steps + 1`` grid indices of the time steps: the ``skip_type`` grid between the
    EMS grid's end points, snapped to the nearest EMS lambda (``round(n (lambda - lambda_0) /
    (lambda_n - lambda_0))``, the authors' rule). Host-side (static)."""
    check_ems(ems)
    if skip_type not in V3_SKIP_TYPES:
        raise ValueError(f"skip_type must be one of {', '.join(map(repr, V3_SKIP_TYPES))}; got {skip_type!r}")
    lam = np.asarray(ems.lambdas, np.float64)
    n = lam.shape[0] - 1
    if skip_type == "logSNR":
        idx = np.rint(np.linspace(0.0, n, steps + 1)).astype(np.int64)
    else:
        t0 = schedule.inverse_lambda(jnp.asarray(lam[0], jnp.result_type(float)))
        t1 = schedule.inverse_lambda(jnp.asarray(lam[-1], jnp.result_type(float)))
        ts = _ts.time_grid(schedule, skip_type, t0, t1, steps)
        idx = _nearest_indexes(lam, np.asarray(schedule.lambda_(ts), np.float64))
    idx[0], idx[-1] = 0, n
    return _check_distinct(idx, f"steps={steps} with skip_type={skip_type!r}", "use fewer steps or EMS on a finer grid")


def v3_grid_indexes(schedule: NoiseSchedule, ems: EMS, timesteps) -> np.ndarray:
    """The EMS grid indices of given time steps (e.g. a grid fitted by
    :func:`dpmjax.fit_timesteps`): each time's lambda snapped to the nearest EMS lambda by
    the rule of :func:`v3_indexes`. The first and last must land on the grid's ends (v3
    integrates over the EMS range) and no two on the same point. Host-side (static)."""
    check_ems(ems)
    if isinstance(timesteps, jax.core.Tracer):
        raise ValueError("timesteps of method='v3' must be concrete (NumPy or Python numbers): they are snapped to "
                         "EMS grid points, which fix the solver's tables")
    lam = np.asarray(ems.lambdas, np.float64)
    ts = jnp.asarray(np.asarray(timesteps, np.float64), jnp.result_type(float))
    lam_ts = np.asarray(schedule.lambda_(ts), np.float64)
    idx = _nearest_indexes(lam, lam_ts)
    if idx[0] != 0 or idx[-1] != lam.shape[0] - 1:
        raise ValueError(
            f"timesteps of method='v3' must start and end at the EMS grid's ends (lambda {lam[0]:.4g} and "
            f"{lam[-1]:.4g}, within half a grid interval); got lambdas {lam_ts[0]:.4g} and {lam_ts[-1]:.4g}"
        )
    return _check_distinct(idx, "timesteps", "use EMS on a finer grid")


# --------------------------------------------------------------------------- the table


def _poly_mul(a, b):
    out = [0.0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] = out[i + j] + x * y
    return out


def _basis(u, k, pseudo):
    """Polynomial coefficients ``P[j][m]`` (lists of arrays over rows) of the ``k`` node
    weights, nodes ``u[0] = 0, u[1], ...`` (arrays over rows)."""
    P = []
    for j in range(k):
        if pseudo:
            coef = [1.0 if j == 0 else 0.0] + [0.0] * (k - 1)
            for m in range(max(j, 1), k):
                den = 1.0
                for i in range(m + 1):
                    if i != j:
                        den = den * (u[j] - u[i])
                coef[m] = coef[m] + 1.0 / den
        else:
            coef = [1.0]
            for i in range(k):
                if i != j:
                    d = u[j] - u[i]
                    coef = _poly_mul(coef, [-u[i] / d, 1.0 / d])
        P.append(coef)
    return P


def _cumtrapz(y, lam):
    """Cumulative trapezoid integral along axis 0 from ``lam[0]`` (``y``: ``(n + 1, ...)``)."""
    dl = (lam[1:] - lam[:-1]).reshape((-1,) + (1,) * (y.ndim - 1))
    inc = 0.5 * dl * (y[1:] + y[:-1])
    return jnp.concatenate([jnp.zeros_like(y[:1]), jnp.cumsum(inc, 0)], 0)


def _segments(schedule, ems, idx, max_power):
    """Per step ``idx[j] -> idx[j+1]``: ``a``, the moments ``M_m = alpha_t int e^{L+S-L_t} u^m``
    (``m = 0..max_power``, ``u = lambda - lambda_s``) and ``R = alpha_t int e^{L+S-L_t} B``."""
    dtype = jnp.result_type(float)
    lam = jnp.asarray(ems.lambdas, dtype)
    l, s, b = (jnp.asarray(a, dtype) for a in (ems.l, ems.s, ems.b))
    L = _cumtrapz(l, lam)
    S = _cumtrapz(s, lam)
    B = _cumtrapz(jnp.exp(-S) * b, lam)
    E = L + S
    i_s, i_t = idx[:-1], idx[1:]
    width = int(np.max(i_t - i_s))
    win = np.minimum(i_s[:, None] + np.arange(width + 1)[None, :], i_t[:, None])  # (steps, W+1), padded with i_t
    ex = (E[win] - L[i_t][:, None])  # (steps, W+1, *shape)
    lw = lam[win]
    u = lw - lam[i_s][:, None]
    dlw = (lw[:, 1:] - lw[:, :-1]).reshape(lw.shape[:1] + (width,) + (1,) * (l.ndim - 1))
    shp = (len(i_s), width + 1) + (1,) * (l.ndim - 1)
    u = u.reshape(shp)
    w = jnp.exp(ex)

    def trap(y):
        return jnp.sum(0.5 * dlw * (y[:, 1:] + y[:, :-1]), axis=1)

    times = schedule.inverse_lambda(lam[idx])
    log_alpha = schedule.log_alpha(times)
    alpha_t = jnp.exp(log_alpha[1:]).reshape((-1,) + (1,) * (l.ndim - 1))
    a = jnp.exp((log_alpha[1:] - log_alpha[:-1]).reshape((-1,) + (1,) * (l.ndim - 1)) + L[i_s] - L[i_t])
    M = [alpha_t * trap(w * u**m) for m in range(max_power + 1)]
    R = alpha_t * trap(w * B[win])
    return a, M, R, (L, S, B), times, jnp.exp(log_alpha)


def _row_coefs(lam_nodes, k_max, orders, pseudo, M_rows):
    """History weights of rows whose nodes have lambdas ``lam_nodes[j]`` (arrays over rows,
    ``j = 0..k_max-1``, node 0 the anchor). Returns ``[c_j]`` (rows, *shape) for the row's order."""
    u = [lam_nodes[j] - lam_nodes[0] for j in range(k_max)]
    shp = lambda v: jnp.reshape(v, jnp.shape(v) + (1,) * (M_rows[0].ndim - 1))  # noqa: E731
    out = [jnp.zeros_like(M_rows[0]) for _ in range(k_max)]
    orders = np.asarray(orders)
    for k in range(1, k_max + 1):
        if not np.any(orders == k):
            continue
        P = _basis(u, k, pseudo)
        mask = jnp.asarray(orders == k).reshape((-1,) + (1,) * (M_rows[0].ndim - 1))
        for j in range(k):
            c = -sum(shp(P[j][m] * jnp.ones_like(u[0])) * M_rows[m] for m in range(k))
            out[j] = jnp.where(mask, c, out[j])
    return out


def _extend(v, n):
    """Prepend ``n`` linearly extrapolated values (keeps unused padded nodes distinct)."""
    d = v[1] - v[0]
    return jnp.concatenate([v[0] - d * jnp.arange(n, 0, -1, dtype=v.dtype), v])


def v3_plan(schedule: NoiseSchedule, ems: EMS, indexes, p_orders, c_orders, *, p_pseudo: bool = False,
            c_pseudo: bool = True) -> tuple[_up.Plan, _up.Layout]:
    """The coefficient table of DPM-Solver-v3 as the rows of a :class:`dpmjax.Solver`.

    ``indexes`` are the EMS grid points of the time steps (``steps + 1`` static ints, from
    :func:`v3_indexes`), ``p_orders`` the per-iteration predictor orders and ``c_orders`` the
    corrector orders (0: none; both from :func:`v3_orders`). Returns ``(Plan, Layout)``
    (:class:`dpmjax.updates.Plan` with its per-dimension rows ``g_p, g_q, g_r, rx, ry``), run by
    the same ``step`` as every method. Pure: traceable in ``ems.l/s/b`` and the schedule; see
    the module docstring for the formulas.

    The carry is UniPC's: ``y`` is the evaluation point and ``x`` the state at the previous
    evaluation, corrected. Row ``n`` evaluates the data prediction ``m`` at ``y`` (time
    ``t_n``), stores ``G = g_p m + g_q y + g_r`` in ring slot ``slot[n]``, corrects
    ``x = ax x + bx y + sum_k cx[k] G_k + rx`` (the state at ``t_n``; ``ax = 0, bx = 1``,
    ``cx = rx = 0`` without a corrector) and predicts ``y = ay x + sum_k cy[k] G_k + ry`` at
    ``t_{n+1}``. Coefficients have shape ``(steps, *sample_shape)`` (``(steps, K,
    *sample_shape)`` for the history weights) and broadcast against a batch
    ``(B, *sample_shape)``.
    """
    idx = np.asarray(indexes, np.int64)
    steps = len(p_orders)
    if idx.shape != (steps + 1,):
        raise ValueError(f"indexes must have steps + 1 = {steps + 1} entries; got {idx.shape}")
    if len(c_orders) != steps:
        raise ValueError(f"c_orders must have steps = {steps} entries; got {len(c_orders)}")
    if c_orders[0] != 0:
        raise ValueError("c_orders[0] must be 0 (nothing to correct before the first step)")
    for n, (p, c) in enumerate(zip(p_orders, c_orders)):
        if not 1 <= p <= min(n + 1, 3):
            raise ValueError(f"p_orders[{n}] must be in 1..{min(n + 1, 3)}; got {p}")
        if c != 0 and not 2 <= c <= min(n + 1, 4):
            raise ValueError(f"c_orders[{n}] must be 0 or in 2..{min(n + 1, 4)}; got {c}")
    K = max(max(p_orders), max(c_orders))
    dtype = jnp.result_type(float)
    a, M, R, (L, S, B), times, alphas = _segments(schedule, ems, idx, max_power=K - 1)
    lam = jnp.asarray(ems.lambdas, dtype)
    lam_pts = _extend(lam[idx], 3)  # lam_pts[i + 3]: lambda at time step i
    rows = np.arange(steps)
    l_pts = jnp.asarray(ems.l, dtype)[idx]
    shp = lambda v: jnp.reshape(v, (-1,) + (1,) * (l_pts.ndim - 1))  # noqa: E731

    # Stored quantity at each evaluation point ts[n]: G = g_p x0 + g_q x + g_r.
    eS = jnp.exp(-S[idx[:-1]])
    g_p = -eS
    g_q = eS * (1.0 - l_pts[:-1]) / shp(alphas[:-1])
    g_r = -B[idx[:-1]]

    def scatter(coefs, points):
        """Weights of nodes at time-step indices ``points[j]`` (int arrays over rows) into ring slots."""
        out = jnp.zeros((steps, K) + M[0].shape[1:], dtype)
        for c, pt in zip(coefs, points):
            onehot = np.eye(K, dtype=bool)[np.asarray(pt) % K]  # (steps, K)
            mask = jnp.asarray(onehot).reshape(onehot.shape + (1,) * (M[0].ndim - 1))
            out = out + jnp.where(mask, c[:, None], 0.0)
        return out

    # Predictor of iteration n: step n -> n + 1 from nodes n, n-1, n-2 (segment n).
    kp = max(p_orders)
    pts_p = [rows - j for j in range(kp)]
    cp = _row_coefs([lam_pts[pt + 3] for pt in pts_p], kp, p_orders, p_pseudo, M)
    cy = scatter(cp, pts_p)

    # Corrector of iteration n >= 1: step n-1 -> n again, nodes (n-1, n, n-2, n-3) (segment n-1).
    corr = np.asarray(c_orders) > 0
    if np.any(corr):
        kc = max(c_orders)
        pts_c = [rows - 1, rows] + [rows - j for j in range(2, kc)]
        prev = np.maximum(rows - 1, 0)
        M_prev = [m[prev] for m in M]
        cc = _row_coefs([lam_pts[pt + 3] for pt in pts_c], kc, np.maximum(c_orders, 1), c_pseudo, M_prev)
        cmask = jnp.asarray(corr).reshape((-1,) + (1,) * (M[0].ndim - 1))
        cx = scatter([jnp.where(cmask, c, 0.0) for c in cc], pts_c)
        ax = jnp.where(cmask, a[prev], 0.0)
        bx = jnp.where(cmask, 0.0, 1.0) * jnp.ones_like(ax)
        rx = jnp.where(cmask, -R[prev], 0.0)
    else:
        cx = jnp.zeros_like(cy)
        ax = jnp.zeros_like(a)
        bx = jnp.ones_like(a)
        rx = jnp.zeros_like(a)
    plan = _up.Plan(
        t_eval=times[:-1], slot=jnp.asarray(rows % K, jnp.int32),
        ax=ax, cx=cx, t_state=times[:-1], bx=bx, ay=a, cy=cy, t_y=times[1:],
        g_p=g_p, g_q=g_q, g_r=g_r, rx=rx, ry=-R,
    )
    # x completes step n (at t_n) in row n; y completes the last step after the last row.
    layout = _up.Layout(x_step=tuple(range(steps)), y_step=(0,) * (steps - 1) + (steps,))
    return plan, layout
