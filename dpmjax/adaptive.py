"""Adaptive step size DPM-Solver-12 and -23 (Lu et al. 2022, Sec. 4.3 and App. C.2).

Each attempted step ``s -> t`` (``lambda_t = lambda_s + h``) computes a lower- and a
higher-order singlestep solution that share their model evaluations:

* order 2: lower = DPM-Solver-1, higher = DPM-Solver-2 (``r1 = 1/2``): 2 NFE;
* order 3: lower = DPM-Solver-2 (``r1 = 1/3``), higher = DPM-Solver-3
  (``r1 = 1/3, r2 = 2/3``): 3 NFE.

With ``delta = max(atol, rtol max(|x_lower|, |x_prev|))`` and ``E`` the largest per-sample
RMS of ``(x_higher - x_lower)/delta``, the step is accepted when ``E <= 1``; then
``h <- min(theta h E^(-1/order), lambda_end - lambda_s)``. The loop is a
``lax.while_loop`` that stops at ``|s - t_end| <= t_err`` or when ``max_nfe`` would be
exceeded (reported, never a hang).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .updates import step_terms

__all__ = ["adaptive_solve"]


def _rms_per_sample(v):
    return jnp.sqrt(jnp.mean(v.reshape(v.shape[0], -1) ** 2, axis=1))


def adaptive_solve(predict, schedule, x, t_start, t_end, *, order, predict_data, solver_type,
                   atol, rtol, h_init, theta, t_err, max_nfe):
    """Returns ``(x, info)``; ``info`` has ``nfe``, ``accepted``, ``rejected``,
    ``hit_max_nfe`` and ``t_final`` (the time ``x`` is at)."""
    dtype = x.dtype
    lam_end = schedule.lambda_(t_end)

    def logs(t):
        return schedule.log_alpha(t), schedule.log_sigma(t)

    def order1(x, m, s, t):
        A, c, _, phi1, _, _ = step_terms(*logs(s), *logs(t), predict_data)
        return A * x - c * phi1 * m

    def correction2(m_s, m_1, s, t, r1):
        _, c, _, phi1, psi2, _ = step_terms(*logs(s), *logs(t), predict_data)
        k = -0.5 * c * phi1 if solver_type == "dpmsolver" else -c * psi2
        return (k / r1) * (m_1 - m_s)

    def attempt(x, s, h):
        lam_s = schedule.lambda_(s)
        t = schedule.inverse_lambda(lam_s + h)
        m_s = predict(x, s)
        if order == 2:
            r1 = 0.5
            s1 = schedule.inverse_lambda(lam_s + r1 * h)
            m_1 = predict(order1(x, m_s, s, s1), s1)
            x_low = order1(x, m_s, s, t)
            x_high = x_low + correction2(m_s, m_1, s, t, r1)
            return t, x_low, x_high
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        s1 = schedule.inverse_lambda(lam_s + r1 * h)
        s2 = schedule.inverse_lambda(lam_s + r2 * h)
        m_1 = predict(order1(x, m_s, s, s1), s1)
        x_base = order1(x, m_s, s, t)
        x_low = x_base + correction2(m_s, m_1, s, t, r1)
        _, c2, _, _, psi2_2, _ = step_terms(*logs(s), *logs(s2), predict_data)
        x_s2 = order1(x, m_s, s, s2) - (r2 / r1) * c2 * psi2_2 * (m_1 - m_s)
        m_2 = predict(x_s2, s2)
        _, c, _, _, psi2, psi3 = step_terms(*logs(s), *logs(t), predict_data)
        if solver_type == "dpmsolver":
            x_high = x_base - (c * psi2 / r2) * (m_2 - m_s)
        else:
            d10, d11 = (m_1 - m_s) / r1, (m_2 - m_s) / r2
            D1 = (r2 * d10 - r1 * d11) / (r2 - r1)
            D2 = 2.0 * (d11 - d10) / (r2 - r1)
            x_high = x_base - c * psi2 * D1 - c * psi3 * D2
        return t, x_low, x_high

    def cond(state):
        _, _, s, _, nfe, _, _ = state
        return (jnp.abs(s - t_end) > t_err) & (nfe + order <= max_nfe)

    def body(state):
        x, x_prev, s, h, nfe, acc, rej = state
        t, x_low, x_high = attempt(x, s, h)
        delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(x_prev)))
        E = jnp.max(_rms_per_sample((x_high - x_low) / delta))
        ok = E <= 1.0
        x = jnp.where(ok, x_high, x)
        x_prev = jnp.where(ok, x_low, x_prev)
        s = jnp.where(ok, t, s)
        # E = 0 (identical solutions) would give an infinite factor: cap the growth.
        factor = jnp.where(E > 0, E, jnp.asarray(1e-10, dtype)) ** (-1.0 / order)
        h = jnp.minimum(theta * h * factor, lam_end - schedule.lambda_(s))
        return x, x_prev, s, h, nfe + order, acc + ok, rej + (~ok)

    zero = jnp.zeros((), jnp.int32)
    h0 = jnp.minimum(jnp.asarray(h_init, dtype), lam_end - schedule.lambda_(t_start))
    state = (x, x, jnp.asarray(t_start, dtype), h0, zero, zero, zero)
    x, _, s, _, nfe, acc, rej = jax.lax.while_loop(cond, body, state)
    info = {
        "nfe": nfe,
        "accepted": acc,
        "rejected": rej,
        "hit_max_nfe": jnp.abs(s - t_end) > t_err,
        "t_final": s,
    }
    return x, info
