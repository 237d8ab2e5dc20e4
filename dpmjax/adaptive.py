"""Adaptive step size DPM-Solver-12 and -23 (Lu et al. 2022, Sec. 4.3 and App. C.2).

Each attempted step ``s -> t`` (``lambda_t = lambda_s + h``) computes a lower- and a
higher-order singlestep solution that share their model evaluations:

* order 2: lower = DPM-Solver-1, higher = DPM-Solver-2 (``r1 = 1/2``): 2 NFE;
* order 3: lower = DPM-Solver-2 (``r1 = 1/3``), higher = DPM-Solver-3
  (``r1 = 1/3, r2 = 2/3``): 3 NFE.

The stage and update coefficients are those of the fixed-step singlestep solver
(:func:`dpmjax.updates.singlestep_coefficients`), evaluated for the attempted step.
With ``delta = max(atol, rtol max(|x_lower|, |x_prev|))`` and ``E`` the largest per-sample
RMS of ``(x_higher - x_lower)/delta``, the step is accepted when ``E <= 1``; then
``h <- min(theta h E^(-1/order), lambda_end - lambda_s)``. The loop is a
``lax.while_loop`` that stops at ``|s - t_end| <= t_err``, when ``max_nfe`` would be
exceeded, or when the error estimate stops being finite (a model returning NaN): the
last two are reported as unfinished (``info["finished"]`` is False) and
:func:`dpmjax.sample` then returns NaN rather than an unfinished state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .updates import singlestep_coefficients

__all__ = ["adaptive_solve"]


def _rms_per_sample(v):
    return jnp.sqrt(jnp.mean(v.reshape(v.shape[0], -1) ** 2, axis=1))


def _dot(coefs, ms):
    out = coefs[0] * ms[0]
    for c, m in zip(coefs[1:], ms[1:]):
        out = out + c * m
    return out


def adaptive_solve(predict, schedule, x, t_start, t_end, *, order, predict_data, solver_type,
                   atol, rtol, h_init, theta, t_err, max_nfe):
    """Returns ``(x, info)``; ``info`` has ``nfe``, ``accepted``, ``rejected``,
    ``hit_max_nfe``, ``finished`` and ``t_final`` (the time ``x`` is at)."""
    dtype = x.dtype
    lam_end = schedule.lambda_(t_end)

    def logs(t):
        return schedule.log_alpha(t), schedule.log_sigma(t)

    def attempt(x, s, h):
        lam_s = schedule.lambda_(s)
        t = schedule.inverse_lambda(lam_s + h)
        r1, r2 = (0.5, 1.0) if order == 2 else (1.0 / 3.0, 2.0 / 3.0)
        s1 = schedule.inverse_lambda(lam_s + r1 * h)
        s2 = t if order == 2 else schedule.inverse_lambda(lam_s + r2 * h)
        A, (f1, f2, f3), (a1, e1), (a2, e2) = singlestep_coefficients(
            *logs(s), *logs(t), *logs(s1), *logs(s2), predict_data=predict_data, solver_type=solver_type)
        m_s = predict(x, s)
        m_1 = predict(a1 * x + e1[0] * m_s, s1)
        if order == 2:
            return t, A * x + f1[0] * m_s, A * x + _dot(f2[:2], (m_s, m_1))
        m_2 = predict(a2 * x + _dot(e2[:2], (m_s, m_1)), s2)
        return t, A * x + _dot(f2[:2], (m_s, m_1)), A * x + _dot(f3, (m_s, m_1, m_2))

    def cond(state):
        _, _, s, h, nfe, _, _ = state
        return (jnp.abs(s - t_end) > t_err) & (nfe + order <= max_nfe) & jnp.isfinite(h)

    def body(state):
        x, x_prev, s, h, nfe, acc, rej = state
        t, x_low, x_high = attempt(x, s, h)
        delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(x_prev)))
        E = jnp.max(_rms_per_sample((x_high - x_low) / delta))
        ok = E <= 1.0
        x = jnp.where(ok, x_high, x)
        x_prev = jnp.where(ok, x_low, x_prev)
        s = jnp.where(ok, t, s)
        # E = 0 (identical solutions) would give an infinite factor: cap the growth. A
        # non-finite E makes h non-finite, which ends the loop as unfinished.
        factor = jnp.where(E > 0, E, jnp.asarray(1e-10, dtype)) ** (-1.0 / order)
        factor = jnp.where(jnp.isfinite(E), factor, jnp.nan)
        h = jnp.minimum(theta * h * factor, lam_end - schedule.lambda_(s))
        return x, x_prev, s, h, nfe + order, acc + ok, rej + (~ok)

    zero = jnp.zeros((), jnp.int32)
    h0 = jnp.minimum(jnp.asarray(h_init, dtype), lam_end - schedule.lambda_(t_start))
    state = (x, x, jnp.asarray(t_start, dtype), h0, zero, zero, zero)
    x, _, s, _, nfe, acc, rej = jax.lax.while_loop(cond, body, state)
    finished = jnp.abs(s - t_end) <= t_err
    info = {
        "nfe": nfe,
        "accepted": acc,
        "rejected": rej,
        "hit_max_nfe": (~finished) & (nfe + order > max_nfe),
        "finished": finished,
        "t_final": s,
    }
    return x, info
