"""One-step updates of DPM-Solver, DPM-Solver++ and UniPC as coefficient tables.

Every update of these solvers is *linear* in the current state and the stored model
outputs: e.g. multistep DPM-Solver++(2M) is ``x_t = A x_s + c0 m_0 + c1 m_1``. The
coefficients depend only on the time grid, so they are computed here once, before
the sampling loop, vectorised over all steps (the traced program does not grow with
``steps``). The loop body in :mod:`dpmjax.sampler` is then the same for every step
and every method:

.. code-block:: text

    m    = model(y, t_eval)          # one NFE at the evaluation point y
    hist = hist.at[slot].set(m)      # ring buffer of model outputs
    x    = ax x + bx y + sum_k cx[k] hist[k] + nz z   # state update (z ~ N(0, I): SDE only)
    y    = ay x + sum_k cy[k] hist[k]                 # next evaluation point

Multistep methods evaluate at the state itself (no ``y``, ``bx``, ``ay``, ``cy``: those
fields are ``None``); singlestep methods need ``y`` for their intermediate stages, UniPC
for its prediction. A final grid point ``t = 0`` (sigma = 0, the clean data) is allowed:
the step to it is the first-order update's limit (see :func:`zero_limit`), and no
schedule is ever evaluated at ``t = 0``.

Notation (docs/algorithms.md "Notation"; Lu et al. 2022, arXiv:2206.00927; 2022b,
arXiv:2211.01095; Zhao et al. 2023, arXiv:2302.04867). A step goes from
``s`` to ``t < s`` with ``h = lambda_t - lambda_s > 0``. For data prediction
("dpmsolver++") ``hh = -h``, ``A = sigma_t / sigma_s``, ``c = alpha_t``; for noise
prediction ("dpmsolver") ``hh = h``, ``A = alpha_t / alpha_s``, ``c = sigma_t``. With
``phi1 = expm1(hh)``, ``psi2 = phi1 / hh - 1``, ``psi3 = psi2 / hh - 1/2`` the
published formulas of both algorithms read the same (``psi2``, ``psi3`` evaluated by
:func:`psi`, which switches to their Taylor series at small ``|hh|``, where these
differences cancel):

* order 1 (DDIM):        ``x_t = A x_s - c phi1 m_s``;
* 2nd-order corrections: ``- 0.5 c phi1 D`` ("dpmsolver") or ``- c psi2 D`` ("taylor");
* 3rd-order corrections: ``- c psi2 D1 - c psi3 D2``.

(The papers write ``phi_2 = phi1/h + 1 = -psi2`` and ``phi_3 = psi3`` for "++".)
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

__all__ = [
    "Plan",
    "Layout",
    "psi",
    "step_terms",
    "zero_limit",
    "multistep_coefficients",
    "singlestep_coefficients",
    "multistep_plan",
    "singlestep_plan",
    "unipc_plan",
]


class Plan(NamedTuple):
    """Per-evaluation tables of a fixed-step solver (leading axis: model evaluations).

    Every field is an array (or ``None`` where the method does not use it), so a plan is a
    pytree of traced values; its static layout (which rows complete a step) is a
    :class:`Layout`. The conversion rows (``t_model`` ... ``in_scale``) are filled in by
    :func:`dpmjax.solver`.
    """

    t_eval: jnp.ndarray  # (n,) solver time of the model evaluation
    slot: jnp.ndarray  # (n,) int32, ring-buffer slot the output is written to
    ax: jnp.ndarray  # (n,) state update: x <- ax x + bx y + cx . hist + nz z
    cx: jnp.ndarray  # (n, K)
    t_state: jnp.ndarray  # (n,) time of x after the row
    bx: Optional[jnp.ndarray] = None  # (n,)
    ay: Optional[jnp.ndarray] = None  # (n,) next evaluation point: y <- ay x + cy . hist
    cy: Optional[jnp.ndarray] = None  # (n, K)
    nz: Optional[jnp.ndarray] = None  # (n,) coefficient of fresh N(0, I) noise (SDE solvers)
    t_y: Optional[jnp.ndarray] = None  # (n,) time of y after the row
    t_model: Optional[jnp.ndarray] = None  # (n,) network time input, schedule.model_time(.)
    alpha: Optional[jnp.ndarray] = None  # (n,) alpha at t_eval (output conversion)
    sigma: Optional[jnp.ndarray] = None  # (n,) sigma at t_eval
    in_scale: Optional[jnp.ndarray] = None  # (n,) network input = y / in_scale (EDM: alpha)
    x_scale: Optional[jnp.ndarray] = None  # (n,) state scale at t_state (user x = x / x_scale)
    y_scale: Optional[jnp.ndarray] = None  # (n,) state scale at t_y
    # DPM-Solver-v3 (dpmjax.v3): per-dimension rows. The ring buffer stores the affine map
    # G = g_p m + g_q y + g_r of the model output instead of m; the updates gain additive
    # constants, x <- ... + rx and y <- ... + ry; and ax, bx, ay are then (n, *shape), cx, cy
    # (n, K, *shape) (a row's coefficient broadcasts against the batch (B, *shape)).
    g_p: Optional[jnp.ndarray] = None  # (n, *shape)
    g_q: Optional[jnp.ndarray] = None  # (n, *shape)
    g_r: Optional[jnp.ndarray] = None  # (n, *shape)
    rx: Optional[jnp.ndarray] = None  # (n, *shape)
    ry: Optional[jnp.ndarray] = None  # (n, *shape)


class Layout(NamedTuple):
    """Static structure of a plan (Python tuples, one entry per row).

    ``x_step[r] > 0``: after row ``r`` the state ``x`` completes that step (1-based) at
    ``t_state[r]``; ``y_step[r] > 0``: after row ``r`` the evaluation point ``y`` completes
    that step at ``t_y[r]`` (UniPC's last, uncorrected step). These drive
    ``correcting_xt_fn`` and the saved intermediate states for every method alike.
    """

    x_step: tuple
    y_step: tuple


def _series_terms(k: int, bound: float, eps: float) -> int:
    """Fewest Taylor terms ``n`` of ``psi_k(x) / x = sum_m x^m / (m + k)!`` whose truncation
    error is at most ``eps / 4`` relative to the sum, for ``|x| <= bound``: the first omitted
    term relative to the leading one is ``k! |x|^n / (n + k)!``, and the terms after it fall
    at least geometrically by ``|x| / (n + k + 1) < 1/2``, so the whole tail is under twice it."""
    n = 1
    while 2.0 * math.factorial(k) * bound**n / math.factorial(n + k) > eps / 4:
        n += 1
    return n


def psi(x, k: int, xp=jnp):
    """The exponential remainder ``psi_k(x) = (e^x - sum_{j<k} x^j / j!) / x^(k-1)``, accurate
    to the rounding of ``x``'s dtype for every ``x`` (``xp``: ``jax.numpy`` or ``numpy``).

    ``psi_1 = expm1(x)``, ``psi_2 = expm1(x)/x - 1`` (the module's ``psi2``), ``psi_3 = psi_2/x
    - 1/2`` (``psi3``), ``psi_4 = psi_3/x - 1/6`` (UniPC's ``g3``): in general ``psi_k =
    psi_(k-1)/x - 1/(k-1)!``, and ``psi_k(x) = x sum_m x^m / (m + k)! ~ x / k!`` at small ``x``.

    Formed that way (the *direct* form), each division by ``x`` followed by the subtraction of
    a constant cancels the leading digits: ``psi_2`` has an absolute error of about ``eps`` where
    it is only ``x/2``, and every further step divides that error by ``|x|`` again, so ``psi_k``'s
    relative error is about ``2 k! u / |x|^(k-1)`` (``u = eps/2``; measured: float32 ``psi_4``
    at ``x = 1e-2`` has none of its digits right). For ``|x| < T_k`` the sum is evaluated
    instead (Horner), whose only error is its truncation. The switch point
    ``T_k = (k!/2)^(1/(k-1))`` (1 for ``psi_2``, 1.73 for ``psi_3``, 2.29 for ``psi_4``) is where
    the direct form's error has fallen to about ``2 eps`` (measured at most 3.5 eps in float32
    and float64 beyond it); the number of terms is chosen for ``x``'s dtype so the truncation
    error at ``|x| = T_k`` is under ``eps/4`` (float32: 10, 12, 13 terms; float64: 17, 20, 22).

    The two branches are evaluated at guarded arguments (the series at 0 where it is not
    used, the direct form at ``T_k``): no division by zero, no overflowing power, and no NaN
    in the gradient from the branch ``where`` discards.
    """
    if k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    x = xp.asarray(x)
    if k == 1:
        return xp.expm1(x)
    dtype = x.dtype if xp.issubdtype(x.dtype, xp.floating) else xp.result_type(float)
    eps = float(jnp.finfo(dtype).eps)
    bound = (math.factorial(k) / 2.0) ** (1.0 / (k - 1))
    small = xp.abs(x) < bound
    xs = xp.where(small, x, 0.0)  # the series' argument, 0 where the direct form is used
    xd = xp.where(small, bound, x)  # the direct form's argument, never 0
    n = _series_terms(k, bound, eps)
    acc = xp.zeros_like(xs) + 1.0 / math.factorial(n - 1 + k)
    for m in range(n - 2, -1, -1):
        acc = acc * xs + 1.0 / math.factorial(m + k)
    direct = psi(xd, k - 1, xp) / xd - 1.0 / math.factorial(k - 1)
    return xp.where(small, xs * acc, direct)


def step_terms(la_s, ls_s, la_t, ls_t, predict_data: bool, xp=jnp):
    """``A, c, hh, phi1, psi2, psi3`` of the step ``s -> t`` (arrays broadcast; ``xp`` is
    ``jax.numpy`` or ``numpy``, for tables computed on the host in float64). ``psi2``, ``psi3``
    are :func:`psi` of order 2, 3: accurate at every step size, also at thousands of steps in
    float32."""
    lam_s, lam_t = la_s - ls_s, la_t - ls_t
    h = lam_t - lam_s
    if predict_data:
        hh, A, c = -h, xp.exp(ls_t - ls_s), xp.exp(la_t)
    else:
        hh, A, c = h, xp.exp(la_t - la_s), xp.exp(ls_t)
    return A, c, hh, xp.expm1(hh), psi(hh, 2, xp), psi(hh, 3, xp)


def zero_limit(la_s, ls_s, *, predict_data: bool, stochastic: bool = False, xp=jnp):
    """``(A, c0, nz)`` of the first-order step ``s -> 0`` in the limit ``sigma_t -> 0``
    (``alpha_t -> 1``, ``h -> inf``): ``x_0 = A x_s + c0 m_s + nz z``.

    * data prediction (ODE and SDE): ``x_0 = m_s`` (the data prediction itself);
    * noise prediction, ODE: ``x_0 = (x_s - sigma_s eps_s) / alpha_s``;
    * noise prediction, SDE: ``x_0 = (x_s - 2 sigma_s eps_s + sigma_s z) / alpha_s``
      (``sigma_t (e^h - 1)`` and ``sigma_t sqrt(e^2h - 1)`` both tend to ``sigma_s/alpha_s``).

    Higher orders have no finite limit (their ``r = h_prev / h`` tends to 0), so a step
    to ``t = 0`` is always first order.
    """
    zero = xp.zeros_like(la_s)
    if predict_data:
        return zero, zero + 1.0, zero
    inv_alpha = xp.exp(-la_s)
    ratio = xp.exp(ls_s - la_s)
    if stochastic:
        return inv_alpha, -2.0 * ratio, ratio
    return inv_alpha, -ratio, zero


def _safe_end(ts, xp=jnp):
    """``(ts', zero_end)``: a final ``t = 0`` replaced by ``ts[-2] / 2`` (any time strictly
    between keeps every formula finite; the rows that use it are replaced by
    :func:`zero_limit`)."""
    zero_end = ts[..., -1] <= 0
    last = xp.where(zero_end, 0.5 * ts[..., -2], ts[..., -1])
    if xp is np:
        ts = ts.copy()
        ts[..., -1] = last
        return ts, zero_end
    return ts.at[..., -1].set(last), zero_end


def _extend_back(v, n, xp=jnp):
    """Prepend ``n`` linearly extrapolated values (keeps padded ratios finite and distinct)."""
    d = v[1] - v[0]
    pad = v[0] - d * xp.arange(n, 0, -1, dtype=v.dtype)
    return xp.concatenate([pad, v])


def _select(orders, *by_order, xp=jnp):
    """Pick per row the value computed for that row's order (orders static)."""
    orders = np.asarray(orders)
    out = by_order[0]
    for k, v in enumerate(by_order[1:], start=2):
        mask = xp.asarray(orders == k).reshape((-1,) + (1,) * (v.ndim - 1))
        out = xp.where(mask, v, out)
    return out


def _to_slots(coefs, grid_index, K, xp=jnp):
    """Scatter coefficients of ``m_j`` (model output at grid index ``grid_index - j``)
    to ring-buffer slots ``(grid_index - j) % K``; returns ``(n, K)``."""
    n = grid_index.shape[0]
    out = xp.zeros((n, K), coefs[0].dtype)
    for j, c in enumerate(coefs):
        onehot = np.eye(K, dtype=bool)[(grid_index - j) % K]
        out = out + xp.where(xp.asarray(onehot), c[:, None], 0.0)
    return out


def _solve_vandermonde3(r1, r2, b1, b2, b3):
    """Solve ``[[1, 1, 1], [r1, r2, 1], [r1^2, r2^2, 1]] u = b`` elementwise (Cramer's rule;
    a batched ``linalg.solve`` costs far more compile time for the same numbers)."""

    def det(a, b, c):  # columns a, b, c of a 3x3 matrix
        return (
            a[0] * (b[1] * c[2] - b[2] * c[1])
            - b[0] * (a[1] * c[2] - a[2] * c[1])
            + c[0] * (a[1] * b[2] - a[2] * b[1])
        )

    one = r1 * 0 + 1
    col1, col2, col3, rhs = (one, r1, r1**2), (one, r2, r2**2), (one, one, one), (b1, b2, b3)
    d = det(col1, col2, col3)
    return det(rhs, col2, col3) / d, det(col1, rhs, col3) / d, det(col1, col2, rhs) / d


def _schedule_logs(schedule, ts):
    return schedule.log_alpha(ts), schedule.log_sigma(ts)


def multistep_coefficients(la_s, ls_s, la_t, ls_t, lam_1, lam_2, *, predict_data, solver_type, stochastic=False,
                           xp=jnp):
    """Coefficients of one multistep step ``s -> t`` for each order (arrays broadcast).

    ``lam_1``, ``lam_2`` are lambda at the two earlier grid points (``m_1``, ``m_2``).
    Returns ``(A, nz, (o1, o2, o3))``: the step is
    ``x_t = A x_s + o[0] m_0 + o[1] m_1 + o[2] m_2 (+ nz z)`` for the order's tuple ``o``.
    Formulas: see :func:`multistep_plan`.
    """
    A, c, _, phi1, psi2, psi3 = step_terms(la_s, ls_s, la_t, ls_t, predict_data, xp)
    lam_s = la_s - ls_s
    h = (la_t - ls_t) - lam_s
    r0 = (lam_s - lam_1) / h
    r1 = (lam_1 - lam_2) / h
    zero = xp.zeros_like(h * r0 * r1)
    base = -c * phi1
    if solver_type in ("dpmsolver", "midpoint"):
        k2 = -0.5 * c * phi1
    else:
        k2 = -c * psi2
    nz = zero
    k2_3, k3 = -c * psi2, -c * psi3  # 3rd order: the D1 (taylor) and D2 coefficients
    if stochastic:
        if predict_data:
            A = A * xp.exp(-h)
            base = -c * xp.expm1(-2.0 * h)
            k2_3 = -c * psi(-2.0 * h, 2, xp)  # = alpha_t (expm1(-2h)/(2h) + 1), without the cancellation
            k2 = 0.5 * base if solver_type in ("dpmsolver", "midpoint") else k2_3
            # the h^2 term of the same integral, 2 alpha_t int_0^h e^-2u ((h - u)/h)^2 / 2 du
            # in the 3M D2 convention: alpha_t ((1 - e^-2h - 2h)/(2h)^2 - 1/2) = -alpha_t (psi_3(-2h) + 1)
            k3 = -c * (psi(-2.0 * h, 3, xp) + 1.0)
            nz = xp.exp(ls_t) * xp.sqrt(-xp.expm1(-2.0 * h))
        else:
            base = -2.0 * c * xp.expm1(h)
            k2 = -c * xp.expm1(h) if solver_type in ("dpmsolver", "midpoint") else -2.0 * c * psi(h, 2, xp)
            nz = c * xp.sqrt(xp.expm1(2.0 * h))
    o1 = (base + zero, zero, zero)
    o2 = (base + k2 / r0, -k2 / r0, zero)
    d10 = (1 / r0, -1 / r0, zero)
    d11 = (zero, 1 / r1, -1 / r1)
    w = r0 / (r0 + r1)
    D1 = tuple(a + w * (a - b) for a, b in zip(d10, d11))
    D2 = tuple((a - b) / (r0 + r1) for a, b in zip(d10, d11))
    o3 = tuple(b0 + k2_3 * d1 + k3 * d2 for b0, d1, d2 in zip(o1, D1, D2))
    return A + zero, nz + zero, (o1, o2, o3)


def multistep_plan(
    schedule, ts, orders, *, predict_data: bool, solver_type: str, stochastic: bool = False
) -> tuple[Plan, Layout]:
    """Multistep DPM-Solver(++) of the given per-step orders on the grid ``ts`` (steps + 1).

    Step ``i`` (``ts[i] -> ts[i+1]``) uses the outputs at ``ts[i], ts[i-1], ts[i-2]``
    (``m_0, m_1, m_2``): with ``r0 = h_0 / h``, ``r1 = h_1 / h``,
    ``D1_0 = (m_0 - m_1)/r0``, ``D1_1 = (m_1 - m_2)/r1``, order 2 adds the 2nd-order
    correction of ``D1_0``; order 3 adds ``- c psi2 D1 - c psi3 D2`` with
    ``D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1)``, ``D2 = (D1_0 - D1_1)/(r0 + r1)``.

    ``stochastic=True`` gives SDE-DPM-Solver(++) (Lu et al. 2022b, Sec. 5; orders 1, 2, and
    order 3 for data prediction, whose D2 term ``alpha_t ((1 - e^-2h - 2h)/(2h)^2 - 1/2) D2``
    is the next term of the same integral, as in diffusers' SDE-DPM-Solver++(3M)),
    the exact solution of the diffusion SDE's linear part with the model term expanded
    to first order in lambda, ``m(lam) ~ m_0 + (lam - lam_s) D1_0 / h``:

    * data:  ``x_t = (sigma_t/sigma_s) e^-h x + alpha_t (1 - e^-2h) m_0
      + K D1_0 + sigma_t sqrt(1 - e^-2h) z`` with ``K = alpha_t (1 - e^-2h)/2`` ("dpmsolver",
      midpoint) or ``K = alpha_t (1 + expm1(-2h)/(2h))`` ("taylor", the exact integral
      ``2 alpha_t int_0^h e^-2u (h - u)/h du``);
    * noise: ``x_t = (alpha_t/alpha_s) x - 2 sigma_t (e^h - 1) m_0 + K D1_0
      + sigma_t sqrt(e^2h - 1) z`` with ``K = -sigma_t (e^h - 1)`` ("dpmsolver") or
      ``K = -2 sigma_t (expm1(h)/h - 1)`` ("taylor").

    A last grid point ``ts[-1] = 0`` makes the last step :func:`zero_limit`.
    """
    steps = len(orders)
    K = max(orders)
    t_end = ts[-1]
    ts, zero_end = _safe_end(ts)
    la, ls = _schedule_logs(schedule, ts)
    lam = _extend_back(la - ls, 2)  # lam[k + 2] is lambda at ts[k]
    A, nz, (o1, o2, o3) = multistep_coefficients(
        la[:-1], ls[:-1], la[1:], ls[1:], lam[1:-2], lam[:-3],
        predict_data=predict_data, solver_type=solver_type, stochastic=stochastic,
    )
    coefs = [_select(orders, o1[j], o2[j], o3[j]) for j in range(K)]
    A0, c0, nz0 = zero_limit(la[-2], ls[-2], predict_data=predict_data, stochastic=stochastic)
    last = jnp.asarray(np.arange(steps) == steps - 1) & zero_end
    A = jnp.where(last, A0, A)
    nz = jnp.where(last, nz0, nz)
    coefs = [jnp.where(last, c0 if j == 0 else 0.0, c) for j, c in enumerate(coefs)]
    idx = np.arange(steps)
    plan = Plan(
        t_eval=ts[:-1],
        slot=jnp.asarray(idx % K, jnp.int32),
        ax=A,
        cx=_to_slots(coefs, idx, K),
        t_state=jnp.concatenate([ts[1:-1], t_end[None]]),
        nz=nz if stochastic else None,
    )
    return plan, Layout(x_step=tuple(int(i) + 1 for i in idx), y_step=(0,) * steps)


def singlestep_coefficients(la_s, ls_s, la_t, ls_t, la_1, ls_1, la_2, ls_2, *, predict_data, solver_type, xp=jnp):
    """Coefficients of one singlestep DPM-Solver(++) step ``s -> t`` with inner points
    ``s1``, ``s2`` (lambda fractions ``r1``, ``r2``), for orders 1, 2 and 3 (arrays broadcast).

    Returns ``(A, F, E1, E2)``:

    * ``F = (f1, f2, f3)``: the final update of each order, ``x_t = A x_s + f[0] m_s +
      f[1] m_s1 + f[2] m_s2``;
    * ``E1 = (a, (e0, e1, e2))``: the stage-1 point ``x_s1 = a x_s + e . m`` (order-1 step);
    * ``E2``: the stage-2 point ``x_s2``: order-1 step to ``s2`` ``- (r2/r1) c_s2 psi2(s -> s2)
      (m_s1 - m_s)`` (``solver_type="midpoint"``: ``+ (r2/r1) c_s2 phi1(s -> s2) (m_s1 - m_s) / 2``,
      the midpoint second-order step, as diffusers' ``DPMSolverSinglestepScheduler`` takes it).

    Order 2 ("dpmsolver"): ``- (0.5/r1) c phi1 D``; ("taylor"): ``- (1/r1) c psi2 D``,
    ``D = m_s1 - m_s``. Order 3 ("dpmsolver"): ``- (1/r2) c psi2 (m_s2 - m_s)``;
    ("taylor"): ``- c psi2 D1 - c psi3 D2`` with ``D1_0 = (m_s1 - m_s)/r1``,
    ``D1_1 = (m_s2 - m_s)/r2``, ``D1 = (r2 D1_0 - r1 D1_1)/(r2 - r1)``,
    ``D2 = 2 (D1_1 - D1_0)/(r2 - r1)``. :func:`dpmjax.sample`'s adaptive solver uses the same
    coefficients with ``r1 = 1/2`` (order 2) or ``1/3, 2/3`` (order 3).
    """
    h = (la_t - ls_t) - (la_s - ls_s)
    r1 = ((la_1 - ls_1) - (la_s - ls_s)) / h
    r2 = ((la_2 - ls_2) - (la_s - ls_s)) / h
    A, c, _, phi1, psi2, psi3 = step_terms(la_s, ls_s, la_t, ls_t, predict_data, xp)
    A1, c1, _, phi1_1, _, _ = step_terms(la_s, ls_s, la_1, ls_1, predict_data, xp)
    A2, c2, _, phi1_2, psi2_2, _ = step_terms(la_s, ls_s, la_2, ls_2, predict_data, xp)
    zero = xp.zeros_like(h * r1 * r2)
    base = -c * phi1
    f1 = (base + zero, zero, zero)
    k2 = -0.5 * c * phi1 if solver_type in ("dpmsolver", "midpoint") else -c * psi2
    f2 = (base - k2 / r1, k2 / r1, zero)
    if solver_type in ("dpmsolver", "midpoint"):
        f3 = (base + c * psi2 / r2, zero, -c * psi2 / r2)
    else:
        d10 = (-1 / r1, 1 / r1, zero)
        d11 = (-1 / r2, zero, 1 / r2)
        D1 = tuple((r2 * a - r1 * b) / (r2 - r1) for a, b in zip(d10, d11))
        D2 = tuple(2 * (b - a) / (r2 - r1) for a, b in zip(d10, d11))
        f3 = tuple(b0 - c * psi2 * d1 - c * psi3 * d2 for b0, d1, d2 in zip(f1, D1, D2))
    # DPM-Solver-3's second stage is the "taylor" second-order step to s2; "midpoint"
    # (diffusers' singlestep scheduler) takes its own second-order step there.
    q = (r2 / r1) * (0.5 * c2 * phi1_2 if solver_type == "midpoint" else c2 * psi2_2)
    E1 = (A1 + zero, (-c1 * phi1_1 + zero, zero, zero))
    E2 = (A2 + zero, (-c2 * phi1_2 + q, -q, zero))
    return A + zero, (f1, f2, f3), E1, E2


def singlestep_plan(schedule, t_outer, s1, s2, orders, *, predict_data: bool, solver_type: str) -> tuple[Plan, Layout]:
    """Singlestep DPM-Solver(++) ("DPM-Solver-fast", "singlestep_fixed").

    Outer step ``j`` goes ``t_outer[j] -> t_outer[j+1]`` with ``orders[j]`` model
    evaluations: at ``s`` and at the inner points ``s1[j]`` (``s2[j]``), whose lambda
    fractions are ``r1``, ``r2`` (:func:`singlestep_coefficients`; entries an order does
    not use are ignored but must be finite times strictly inside the step). Stage outputs
    are stored in slots 0, 1, 2. A last outer point ``0`` makes the last outer step
    :func:`zero_limit` from its first evaluation.
    """
    M = len(orders)
    K = max(orders)
    t_end = t_outer[-1]
    t_outer, zero_end = _safe_end(t_outer)
    s, t = t_outer[:-1], t_outer[1:]
    la_s, ls_s = _schedule_logs(schedule, s)
    A, F, (E1a, E1c), (E2a, E2c) = singlestep_coefficients(
        la_s, ls_s, *_schedule_logs(schedule, t), *_schedule_logs(schedule, s1), *_schedule_logs(schedule, s2),
        predict_data=predict_data, solver_type=solver_type,
    )
    Fc = jnp.stack([_select(orders, F[0][j], F[1][j], F[2][j]) for j in range(3)], axis=-1)  # (M, 3)
    A0, c0, _ = zero_limit(la_s[-1], ls_s[-1], predict_data=predict_data)
    lastj = jnp.asarray(np.arange(M) == M - 1) & zero_end
    A = jnp.where(lastj, A0, A)
    Fc = jnp.where(lastj[:, None], jnp.asarray([1.0, 0.0, 0.0], Fc.dtype) * c0, Fc)
    E1c, E2c = jnp.stack(E1c, -1), jnp.stack(E2c, -1)

    # Expand outer steps into stages (static index arrays).
    o = np.asarray(orders)
    outer = np.concatenate([np.full(k, j) for j, k in enumerate(orders)])
    stage = np.concatenate([np.arange(k) for k in orders])
    final = stage == o[outer] - 1
    nxt = np.where(final, 0, stage + 1)
    t_eval = jnp.stack([s, s1, s2], axis=-1)[outer, stage]
    t_after = jnp.concatenate([t[:-1], t_end[None]])

    fin = jnp.asarray(final)
    n1, n2 = jnp.asarray(nxt == 1), jnp.asarray(nxt == 2)
    ay = jnp.where(n1, E1a[outer], jnp.where(n2, E2a[outer], 1.0))
    plan = Plan(
        t_eval=t_eval,
        slot=jnp.asarray(stage, jnp.int32),
        ax=jnp.where(fin, A[outer], 1.0),
        cx=jnp.where(fin[:, None], Fc[outer], 0.0)[:, :K],
        t_state=jnp.where(fin, t_after[outer], s[outer]),
        ay=ay,
        cy=jnp.where(n1[:, None], E1c[outer], jnp.where(n2[:, None], E2c[outer], 0.0))[:, :K],
        t_y=jnp.where(n1, s1[outer], jnp.where(n2, s2[outer], jnp.where(fin, t_after[outer], s[outer]))),
    )
    return plan, Layout(x_step=tuple(int(j) + 1 if f else 0 for j, f in zip(outer, final)),
                        y_step=(0,) * len(stage))


def unipc_plan(
    schedule, ts, orders, *, predict_data: bool, variant: str, use_corrector
) -> tuple[Plan, Layout]:
    """UniPC (Zhao et al. 2023): UniP predictor + UniC corrector, variants ``bh1``/``bh2``.

    Step ``i`` goes ``ts[i-1] -> ts[i]`` with order ``k = orders[i-1]``, history
    ``m_0`` (at ``ts[i-1]``), ``m_j`` (at ``ts[i-1-j]``), ``r_j = (lambda_j - lambda_0)/h``,
    ``D_j = (m_j - m_0)/r_j``. With ``B = hh`` (bh1) or ``expm1(hh)`` (bh2) and
    ``b_i = g_i i! / B`` (``g_1 = psi2``, ``g_2 = psi3``, ``g_3 = g_2/hh - 1/6``):

    * predictor ``x_pred = A x - c phi1 m_0 - c B sum_j rho_p_j D_j``,
      ``rho_p = solve(R[:-1, :-1], b[:-1])`` (``[0.5]`` for ``k = 2``);
    * corrector ``x_t = A x - c phi1 m_0 - c B (sum_j rho_c_j D_j + rho_c_k (m_t - m_0))``,
      ``rho_c = solve(R, b)`` (``[0.5]`` for ``k = 1``), with ``m_t`` the model output at
      ``x_pred``, which is kept in the history: the corrector costs no model call.

    ``R[i-1] = [r_1, ..., r_{k-1}, 1] ** (i-1)``. Row ``n`` evaluates the model at the
    prediction ``y`` for ``ts[n]``, corrects it into ``x`` (``use_corrector[n]``, never for
    ``n = 0``; without a corrector ``x = y``) and predicts ``y`` for ``ts[n+1]``. The ring
    buffer has ``max(orders) + 1`` slots. The last step is never corrected: its state is
    ``y`` after the last row (``Layout.y_step``). A last grid point ``0`` makes the last
    prediction :func:`zero_limit` (bh1's ``B = hh`` has no finite limit there; the
    first-order limit has none of it).
    """
    steps = len(orders)
    K = max(orders) + 1
    t_end = ts[-1]
    ts, zero_end = _safe_end(ts)
    la, ls = _schedule_logs(schedule, ts)
    # Step i = 1..steps, from ts[i-1] to ts[i] (arrays over i, index i - 1).
    A, c, hh, phi1, psi2, psi3 = step_terms(la[:-1], ls[:-1], la[1:], ls[1:], predict_data)
    lam = _extend_back(la - ls, 2)  # lam[k + 2] is lambda at ts[k]
    h = lam[3:] - lam[2:-1]
    r1 = (lam[1:-2] - lam[2:-1]) / h  # lambda at ts[i-2]
    r2 = (lam[:-3] - lam[2:-1]) / h  # lambda at ts[i-3]
    B = hh if variant == "bh1" else jnp.expm1(hh)
    g3 = psi(hh, 4)  # = psi3 / hh - 1/6, without the cancellation
    b1, b2, b3 = psi2 / B, psi3 * 2.0 / B, g3 * 6.0 / B
    zero = jnp.zeros_like(h)
    base = -c * phi1
    cB = c * B

    # Predictor coefficients on (m0, m1, m2).
    p1 = (base, zero, zero)
    p2 = (base + 0.5 * cB / r1, -0.5 * cB / r1, zero)
    rho1 = (b2 - r2 * b1) / (r1 - r2)  # solve [[1, 1], [r1, r2]] rho = [b1, b2]
    rho2 = b1 - rho1
    p3 = (base + cB * (rho1 / r1 + rho2 / r2), -cB * rho1 / r1, -cB * rho2 / r2)
    P = [_select(orders, p1[j], p2[j], p3[j]) for j in range(3)]
    A0, c0, _ = zero_limit(la[-2], ls[-2], predict_data=predict_data)
    last = jnp.asarray(np.arange(steps) == steps - 1) & zero_end
    A = jnp.where(last, A0, A)
    P = [jnp.where(last, c0 if j == 0 else 0.0, p) for j, p in enumerate(P)]

    # Corrector coefficients on (m_t, m0, m1, m2).
    c1 = (-0.5 * cB, base + 0.5 * cB, zero, zero)
    q1 = (b1 - b2) / (1.0 - r1)  # solve [[1, 1], [r1, 1]] rho = [b1, b2]
    q2 = b1 - q1
    c2 = (-cB * q2, base + cB * (q1 / r1 + q2), -cB * q1 / r1, zero)
    u1, u2, u3 = _solve_vandermonde3(r1, r2, b1, b2, b3)
    c3 = (-cB * u3, base + cB * (u1 / r1 + u2 / r2 + u3), -cB * u1 / r1, -cB * u2 / r2)
    C = [_select(orders, c1[j], c2[j], c3[j]) for j in range(4)]

    # Row n = 0..steps-1: evaluate at ts[n] (slot n % K); correct step n (arrays index
    # n - 1); predict step n + 1 (arrays index n).
    n_idx = np.arange(steps)
    corr = np.asarray(use_corrector, bool).copy()
    corr[0] = False
    # Corrector of step n uses arrays at index n - 1; shift by one (row 0 unused).
    C_shift = [jnp.concatenate([v[:1], v[:-1]]) for v in C]
    A_shift = jnp.concatenate([A[:1], A[:-1]])
    cmask = jnp.asarray(corr)
    plan = Plan(
        t_eval=ts[:-1],
        slot=jnp.asarray(n_idx % K, jnp.int32),
        ax=jnp.where(cmask, A_shift, 0.0),
        cx=_to_slots([jnp.where(cmask, v, 0.0) for v in C_shift[:K]], n_idx, K),
        t_state=ts[:-1],
        bx=jnp.where(cmask, 0.0, 1.0).astype(A.dtype),
        ay=A,
        cy=_to_slots(P[: K - 1], n_idx, K),
        t_y=jnp.concatenate([ts[1:-1], t_end[None]]),
    )
    return plan, Layout(
        x_step=tuple(int(n) for n in n_idx),  # row 0 completes nothing (x = x_T)
        y_step=tuple(steps if n == steps - 1 else 0 for n in n_idx),
    )
