"""The exponential remainders ``psi_k`` and the coefficient tables built from them, in float32.

``psi_2 = expm1(h)/h - 1``, ``psi_3 = psi_2/h - 1/2`` and UniPC's ``g_3 = psi_3/h - 1/6`` lose
about ``-log2 |h|`` bits per division when formed that way; :func:`dpmjax.updates.psi` switches
to their Taylor series at small ``|h|``. Checked here against 80-digit ``decimal`` values, and
through the tables: a float32 table must equal the float64 one

* to a few float32 eps (row-wise, relative to the row's largest coefficient) when both are
  built from the same exactly representable log-alpha / log-sigma values, so that the only
  difference is the tables' own arithmetic (measured <= 9.3 eps; the direct forms gave up to
  3.6e10 eps for UniPC-3, 1.9e6 for DPM-Solver++(3M), 7.6e7 for singlestep order 3);
* to the conditioning of the grid itself when float32 builds its own grid from a real
  schedule: a step ``h = lambda_t - lambda_s`` of rounded lambdas carries a relative error of
  about ``eps max|lambda| / h``, which no formula downstream can remove (measured 5-6.6 times
  that bound on VPLinear's logSNR grids; UniPC-3's corrector table was 1.1x its own size off
  at 1000 steps and 54x at 4000 with the direct forms).
"""

from __future__ import annotations

import decimal
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax import updates as up

EPS32 = float(np.finfo(np.float32).eps)


def _series(x: float, k: int, weight, times_x: bool) -> float:
    """``sum_m weight(m) x^m / (m + k)!`` (times ``x`` if ``times_x``) in 100-digit decimal
    arithmetic, summed until the terms are negligible (|x| <= 60: the largest term, ~1e25,
    leaves 75 digits after cancellation)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 100
        X = decimal.Decimal(float(x))
        total, term, m = decimal.Decimal(0), decimal.Decimal(1) / math.factorial(k), 0
        while m < 60 or abs(term) > decimal.Decimal(10) ** -60:
            total += weight(m) * term
            m += 1
            term = term * X / (m + k)
        return float(X * total if times_x else total)


def _psi_exact(x: float, k: int) -> float:
    """``psi_k(x) = x sum_m x^m / (m + k)!`` (``= (e^x - sum_{j<k} x^j/j!) / x^(k-1)``)."""
    if k == 1:
        with decimal.localcontext() as ctx:
            ctx.prec = 100
            return float(decimal.Decimal(float(x)).exp() - 1)
    return _series(x, k, lambda m: 1, times_x=True)


def _psi_derivative_exact(x: float, k: int) -> float:
    """``psi_k'(x) = sum_m (m + 1) x^m / (m + k)!``."""
    return _series(x, k, lambda m: m + 1, times_x=False)


XS = np.concatenate([-np.logspace(-8, 1, 200), np.logspace(-8, 1, 200), np.linspace(-10.0, 10.0, 321), [0.0]])


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_psi_against_high_precision(k, x64):
    dtype = np.float64 if x64 else np.float32
    eps = float(np.finfo(dtype).eps)
    x = XS.astype(dtype)
    exact = np.array([_psi_exact(v, k) for v in x])
    with jax.enable_x64(x64):
        for xp in (jnp, np):
            got = up.psi(xp.asarray(x), k, xp)
            assert got.dtype == dtype, (xp.__name__, got.dtype)
            got = np.asarray(got, np.float64)
            err = np.abs(got - exact) / np.where(exact == 0, 1.0, np.abs(exact))
            i = int(np.argmax(err))
            # measured at most 3.5 eps (psi_4 just past its switch point, where the direct form takes over)
            assert err[i] <= 6 * eps, (xp.__name__, float(x[i]), err[i] / eps)
            assert np.all(got[x == 0] == 0.0)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_psi_gradient_is_finite_and_right(k):
    """The branch ``where`` discards never poisons the gradient (the double-``where`` guard)."""
    bound = (math.factorial(k) / 2.0) ** (1.0 / (k - 1))
    pts = [0.0, 1e-30, -1e-8, 1e-3, -0.5, bound * (1 - 1e-9), -bound, bound * (1 + 1e-9), 3.0, -7.5, 9.0, -60.0]
    with jax.enable_x64(True):
        x = jnp.asarray(pts, jnp.float64)
        g = np.asarray(jax.vmap(jax.grad(lambda v: up.psi(v, k)))(x))
        exact = np.array([_psi_derivative_exact(v, k) for v in pts])
        np.testing.assert_allclose(g, exact, rtol=1e-12, atol=0)
    g32 = np.asarray(jax.vmap(jax.grad(lambda v: up.psi(v, k)))(jnp.asarray(pts, jnp.float32)))
    assert np.all(np.isfinite(g32))
    np.testing.assert_allclose(g32, exact, rtol=1e-5, atol=0)


def test_psi_rejects_order_below_one():
    with pytest.raises(ValueError, match="k must be a positive integer"):
        up.psi(jnp.ones(3), 0)


# ------------------------------------------------------------------ tables from exact inputs

TICK = 2.0**-16


class _Exact:
    """A log-linear "schedule" that float32 evaluates exactly on a ``2^-16`` lattice of times:
    ``log alpha = -t/2``, ``log sigma = 2t - 3``, so ``lambda = 3 - 5t/2`` and every step ``h``
    are the same numbers in float32 and float64 (only the formulas' arithmetic differs)."""

    def log_alpha(self, t):
        return -0.5 * t

    def log_sigma(self, t):
        return 2.0 * t - 3.0


def _ticks(steps):
    """``steps + 1`` strictly decreasing lattice indices from 1.0 to 0.05 (non-uniform spacing)."""
    u = np.linspace(0.0, 1.0, steps + 1)
    k = np.round((1.0 - 0.95 * (0.3 * u + 0.7 * u**2)) / TICK).astype(np.int64)
    assert np.all(np.diff(k) < 0)
    return k


def _exact_input_tables(name, steps, dtype):
    sch = _Exact()
    ts = jnp.asarray(_ticks(steps) * TICK, dtype)
    o3 = [1, 2] + [3] * (steps - 2)
    o2 = [1] + [2] * (steps - 1)
    if name.startswith("unipc3"):
        plan = up.unipc_plan(sch, ts, o3, predict_data=True, variant=name[-3:], use_corrector=[True] * steps)[0]
    elif name == "dpmsolver++3M-taylor":
        plan = up.multistep_plan(sch, ts, o3, predict_data=True, solver_type="taylor")[0]
    elif name == "dpmsolver3M-taylor":
        plan = up.multistep_plan(sch, ts, o3, predict_data=False, solver_type="taylor")[0]
    elif name == "dpmsolver++2M-taylor":
        plan = up.multistep_plan(sch, ts, o2, predict_data=True, solver_type="taylor")[0]
    elif name == "sde-dpmsolver++3M-taylor":
        plan = up.multistep_plan(sch, ts, o3, predict_data=True, solver_type="taylor", stochastic=True)[0]
    elif name == "sde-dpmsolver2M-taylor":
        plan = up.multistep_plan(sch, ts, o2, predict_data=False, solver_type="taylor", stochastic=True)[0]
    else:  # singlestep order 3: outer gaps of a multiple of 3 ticks, inner points at 1/3 and 2/3
        k = _ticks(steps // 3)
        k = k - (k - k[-1]) % 3
        assert np.all(np.diff(k) < 0)
        gap = k[:-1] - k[1:]
        outer, s1, s2 = (jnp.asarray(v * TICK, dtype) for v in (k, k[:-1] - gap // 3, k[:-1] - 2 * gap // 3))
        predict_data = name.endswith("data")
        solver_type = "taylor" if "taylor" in name else "dpmsolver"
        plan = up.singlestep_plan(sch, outer, s1, s2, [3] * (steps // 3), predict_data=predict_data,
                                  solver_type=solver_type)[0]
    fields = ("ax", "bx", "cx", "ay", "cy", "nz")
    return {f: np.asarray(getattr(plan, f), np.float64) for f in fields if getattr(plan, f) is not None}


def _row_errors(got: dict, ref: dict):
    """Per field: the largest ``|got - ref|`` of a row relative to the row's largest ``|ref|``."""
    out = {}
    for f in ref:
        a, b = got[f].reshape(len(got[f]), -1), ref[f].reshape(len(ref[f]), -1)
        scale = np.max(np.abs(b), axis=1, keepdims=True)
        out[f] = np.max(np.abs(a - b) / np.where(scale == 0, 1.0, scale))
    return out


EXACT_CASES = ["unipc3-bh1", "unipc3-bh2", "dpmsolver++3M-taylor", "dpmsolver3M-taylor", "dpmsolver++2M-taylor",
               "sde-dpmsolver++3M-taylor", "sde-dpmsolver2M-taylor", "singlestep3-taylor-data",
               "singlestep3-taylor-noise", "singlestep3-dpmsolver-data"]


@pytest.mark.parametrize("steps", [1000, 4000])
@pytest.mark.parametrize("name", EXACT_CASES)
def test_float32_table_equals_float64_on_exact_inputs(name, steps):
    t32 = _exact_input_tables(name, steps, jnp.float32)
    with jax.enable_x64(True):
        t64 = _exact_input_tables(name, steps, jnp.float64)
    assert set(t32) == set(t64)
    errs = _row_errors(t32, t64)
    # measured <= 9.3 eps (singlestep "taylor"'s D1/D2 combination), <= 4 eps for the others
    assert all(e <= 16 * EPS32 for e in errs.values()), {f: e / EPS32 for f, e in errs.items()}


# ------------------------------------------------------------------ tables of real solvers

SOLVER_CASES = {
    "unipc3-bh1": dict(method="unipc", order=3, variant="bh1"),
    "unipc3-bh2": dict(method="unipc", order=3, variant="bh2"),
    "dpmsolver++3M-taylor": dict(algorithm="dpmsolver++", method="multistep", order=3, solver_type="taylor"),
    "singlestep3-taylor": dict(algorithm="dpmsolver++", method="singlestep", order=3, solver_type="taylor"),
}


def _solver_table(cfg, steps):
    s = dpmjax.VPLinear()  # built inside the caller's precision
    e = dpmjax.solver(s, steps=steps, skip_type="logSNR", **cfg).export()
    t = jnp.asarray(e["t_eval"])
    lam = np.asarray(s.log_alpha(t) - s.log_sigma(t), np.float64)
    return {f: np.asarray(e[f], np.float64) for f in ("ax", "cx", "ay", "cy")}, lam


@pytest.mark.parametrize("steps", [1000, 4000])
@pytest.mark.parametrize("name", list(SOLVER_CASES))
def test_float32_solver_table_within_grid_conditioning(name, steps):
    t32, _ = _solver_table(SOLVER_CASES[name], steps)
    with jax.enable_x64(True):
        t64, lam = _solver_table(SOLVER_CASES[name], steps)
    assert t64["cx"].dtype == np.float64
    # a float32 step h = lambda_t - lambda_s of rounded lambdas is off by ~eps max|lambda| / h
    # relative; the tables inherit that and nothing more (measured 5-6.6 times it)
    bound = EPS32 * np.max(np.abs(lam)) / np.min(np.abs(np.diff(lam)))
    errs = _row_errors(t32, t64)
    assert all(e <= 16 * bound for e in errs.values()), {f: e / bound for f, e in errs.items()}
