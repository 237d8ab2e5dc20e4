"""DPM-Solver-v3 and its empirical model statistics (dpmjax.ems, dpmjax.v3).

What is measured:

* EMS of a Gaussian data distribution (exact noise predictor, linear in x) against their
  closed forms ``l = 1/(1 + e^{2 lambda} std^2)``, ``s = 0``, ``b = -l' mu``;
* with those EMS the first-order v3 step is exact (the remaining model term is constant):
  the error to the exact ODE solution is the quadrature's, orders of magnitude below DDIM's;
* with the degenerate EMS ``l = 1, s = b = 0`` v3 reduces to data-prediction solvers: its
  predictor of order 1 and 2 to ``dpmjax.sample``'s DPM-Solver++ (``solver_type="taylor"``),
  order 3 and the corrector to UniPC's formulas with the Vandermonde weights at every order
  (a numpy loop below, which reproduces ``dpmjax.sample(method="unipc")`` when given
  UniPC's hard-coded 1/2 weights). The only difference is v3's trapezoid rule on the EMS
  grid, O(dlambda^2): Richardson extrapolation over two grids removes it to 1e-9;
* convergence orders on the Gaussian with perturbed (non-optimal) EMS;
* the authors' file layout round trip, and errors on bad input.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.ems import EMS, check_ems, compute_ems, degenerate_ems, load_ems, save_ems
from dpmjax.v3 import v3_indexes, v3_orders, v3_plan

MEAN = (0.5, -1.0)
STD = (0.3, 1.5)


def _gaussian():
    gm = dpmjax.GaussianMixture.gaussian(jnp.asarray(MEAN), jnp.asarray(STD))
    return gm, gm.model_fn(dpmjax.VPLinear())


def _sample_v3(model_fn, params, key_or_noise, shape, **kw):
    """``dpmjax.sample(method="v3")`` from a starting noise (or a key), the authors' defaults."""
    kw = dict(dict(order=3, steps=10, skip_type="logSNR"), **kw)
    if jnp.issubdtype(jnp.asarray(key_or_noise).dtype, jax.dtypes.prng_key):
        return dpmjax.sample(model_fn, params, key_or_noise, shape, method="v3", **kw)
    return dpmjax.sample(model_fn, params, None, shape, noise=key_or_noise, method="v3", **kw)


def _x_T(b=8):
    return jax.random.normal(jax.random.key(0), (b, 2), jnp.result_type(float))


def _gaussian_ems(lambdas):
    """Closed-form EMS of N(MEAN, diag(STD^2)): eps(x) = sigma (x - alpha mu)/(alpha^2 std^2 + sigma^2),
    so sigma d eps/dx = sigma^2/(alpha^2 std^2 + sigma^2) = 1/(1 + e^{2 lambda} std^2) = l, f = -l mu."""
    lam = np.asarray(lambdas, np.float64)[:, None]
    sd, mu = np.asarray(STD), np.asarray(MEAN)
    l = 1.0 / (1.0 + np.exp(2 * lam) * sd**2)
    dl = -2.0 * sd**2 * np.exp(2 * lam) * l**2
    return l, np.zeros_like(l), -dl * mu


# --------------------------------------------------------------------------- EMS


@pytest.mark.slow
def test_compute_ems_gaussian_closed_form(x64):
    sched = dpmjax.VPLinear()
    gm, model_fn = _gaussian()
    data = gm.sample(jax.random.key(1), 64)
    ems = compute_ems(model_fn, gm, jax.random.key(0), (2,), schedule=sched, data=data, n_lambdas=201, batch_size=24,
                      smooth_dl=0)
    l, s, b = _gaussian_ems(ems.lambdas)
    # l: the Jacobian is constant and diagonal, so the Rademacher estimator is exact.
    np.testing.assert_allclose(ems.l, l, atol=1e-12)
    # s is not identified (f is deterministic); the ridge makes it 0.
    assert np.max(np.abs(ems.s)) < 1e-9
    # b = -l' mu; l' by finite differences on a grid of dlambda = 0.047: error O(dlambda^2).
    dlam = float(ems.lambdas[1] - ems.lambdas[0])
    err = np.max(np.abs(np.asarray(ems.b) - b))
    assert err < 0.25 * dlam**2, (err, dlam)
    # Deterministic for a key, whatever the chunking of the grid.
    again = compute_ems(model_fn, gm, jax.random.key(0), (2,), schedule=sched, data=data, n_lambdas=201,
                        batch_size=24, lambdas_per_call=50, smooth_dl=0)
    for a, c in zip(ems, again):
        np.testing.assert_array_equal(a, c)
    # The default smooths l' (only the "- l' y" term of f' uses it): the same l, another b.
    smooth = compute_ems(model_fn, gm, jax.random.key(0), (2,), schedule=sched, data=data, n_lambdas=201,
                         batch_size=24)
    np.testing.assert_array_equal(smooth.l, ems.l)
    assert np.max(np.abs(np.asarray(smooth.b) - np.asarray(ems.b))) > 1e-3


def test_moving_average_of_dl_truncates_at_the_ends():
    """``l'`` is smoothed by the mean over ``|j - i| <= w`` grid points, the window cut at
    the ends (the authors' 11-point average for ``w = 5``): against a direct loop."""
    from dpmjax.ems import _moving_average

    v = np.random.default_rng(0).standard_normal((23, 3, 2))
    for w in (0, 1, 5, 22):
        want = np.stack([v[max(i - w, 0):i + w + 1].mean(0) for i in range(v.shape[0])])
        np.testing.assert_allclose(_moving_average(jnp.asarray(v), w), want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_compute_ems_regression_matches_lstsq(x64):
    """For a two-component mixture (nonlinear model): ``l`` equals the mean diagonal of the
    Jacobian computed column by column with jax.jacfwd, and (s, b) equal a per-dimension
    least-squares fit of ``f'`` on ``f`` where ``f'`` is a central finite difference of
    ``f`` along an accurately integrated ODE trajectory."""
    sched = dpmjax.VPLinear()
    gm = dpmjax.GaussianMixture.isotropic(jnp.array([[-1.0, 0.5], [1.0, -0.5]]), 0.4)
    model_fn = gm.model_fn(sched)
    data = gm.sample(jax.random.key(3), 32)
    ems = compute_ems(model_fn, gm, jax.random.key(4), (2,), schedule=sched, data=data, n_lambdas=41,
                      batch_size=32, ridge=0.0, smooth_dl=0)
    lam = np.asarray(ems.lambdas)
    row = 20
    lam0 = float(lam[row])
    key_row = jax.random.fold_in(jax.random.key(4), row)
    # Rebuild the very samples of pass 2 (one batch): the same keys as compute_ems.
    perm = jax.random.permutation(jax.random.fold_in(key_row, 0), 32)
    k_eps, _ = jax.random.split(jax.random.fold_in(key_row, 1))
    x0 = data[perm]
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    y = x0 + math.exp(-lam0) * eps

    def u_of(yy, la):
        t = sched.inverse_lambda(la)
        a = sched.alpha(t)
        return jnp.exp(-la) * gm.eps(a * yy, a, sched.sigma(t))

    # l: exact Jacobian diagonal, averaged over the same x (the probes v differ, but for
    # 2-D the estimator v*Jv = diag J + off-diagonal terms; compare against the mean of both).
    J = jax.vmap(jax.jacfwd(lambda yy: u_of(yy[None], lam0)[0]))(y)  # (B, 2, 2)
    diag = np.mean(np.diagonal(np.asarray(J), axis1=1, axis2=2), 0)
    off = np.mean(np.abs(np.asarray(J)[:, 0, 1]) + np.abs(np.asarray(J)[:, 1, 0]))
    assert np.max(np.abs(np.asarray(ems.l[row]) - diag)) < off + 1e-12

    # f' by finite differences along the ODE dy/dlambda = -u (RK4, tiny steps).
    l_vals = np.asarray(ems.l)
    dl = np.gradient(l_vals, lam, axis=0, edge_order=2)[row]
    l_row = l_vals[row]

    def rk4(yy, la, h, n=8):
        dh = h / n
        for _ in range(n):
            k1 = -u_of(yy, la)
            k2 = -u_of(yy + 0.5 * dh * k1, la + 0.5 * dh)
            k3 = -u_of(yy + 0.5 * dh * k2, la + 0.5 * dh)
            k4 = -u_of(yy + dh * k3, la + dh)
            yy = yy + dh / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            la = la + dh
        return yy

    d = 1e-4
    l_at = lambda la: l_row + dl * (la - lam0)  # noqa: E731  (l along the step, to first order)
    f_of = lambda yy, la: np.asarray(u_of(yy, la)) - l_at(la) * np.asarray(yy)  # noqa: E731
    f = f_of(y, lam0)
    f1 = (f_of(rk4(y, lam0, d), lam0 + d) - f_of(rk4(y, lam0, -d), lam0 - d)) / (2 * d)
    for k in range(2):
        A = np.stack([f[:, k], np.ones(f.shape[0])], 1)
        s_ref, b_ref = np.linalg.lstsq(A, f1[:, k], rcond=None)[0]
        assert abs(float(ems.s[row, k]) - s_ref) < 1e-5 * (1 + abs(s_ref)), (k, float(ems.s[row, k]), s_ref)
        assert abs(float(ems.b[row, k]) - b_ref) < 1e-5 * (1 + abs(b_ref)), (k, float(ems.b[row, k]), b_ref)


@pytest.mark.slow
def test_v3_with_gaussian_ems_is_exact_at_first_order(x64):
    """With the Gaussian's EMS, ``G`` is constant and the order-1 v3 step is exact up to
    the trapezoid rule: 5 steps land within 1e-5 of the exact ODE solution (DDIM: 0.48),
    and the error falls as dlambda^2. Also with EMS computed by compute_ems."""
    sched = dpmjax.VPLinear()
    gm, model_fn = _gaussian()
    x_T = _x_T()
    errs = []
    for n in (500, 1000):
        lam = degenerate_ems(sched, (2,), n=n).lambdas
        ems = EMS(lam, *(jnp.asarray(a) for a in _gaussian_ems(lam)))
        exact = gm.ode_solution(x_T, sched, sched.inverse_lambda(lam[0]), sched.inverse_lambda(lam[-1]))
        x = _sample_v3(model_fn, gm, x_T, x_T.shape, schedule=sched, ems=ems, order=1, steps=5, use_corrector=False)
        errs.append(float(jnp.max(jnp.abs(x - exact))))
    ddim = dpmjax.sample(model_fn, gm, None, x_T.shape, schedule=sched, noise=x_T, order=1, steps=5,
                         timesteps=sched.inverse_lambda(lam[np.arange(0, 1001, 200)]))
    assert float(jnp.max(jnp.abs(ddim - exact))) > 0.1
    assert errs[1] < 1e-5 and 3.5 < errs[0] / errs[1] < 4.5, errs

    data = gm.sample(jax.random.key(1), 64)
    ems = compute_ems(model_fn, gm, jax.random.key(0), (2,), schedule=sched, data=data, n_lambdas=401, batch_size=32)
    exact = gm.ode_solution(x_T, sched, sched.inverse_lambda(ems.lambdas[0]), sched.inverse_lambda(ems.lambdas[-1]))
    x = _sample_v3(model_fn, gm, x_T, x_T.shape, schedule=sched, ems=ems, order=1, steps=5, use_corrector=False)
    assert float(jnp.max(jnp.abs(x - exact))) < 1e-3


# --------------------------------------------------------------------------- degenerate EMS


def _unipc_reference(x0_fn, ts, lam, alpha, sigma, x_T, p_orders, c_orders, rule):
    """UniPC (data prediction, B = expm1(-h)) as a plain loop, from the formulas of
    docs/algorithms.md "UniPC": predictor UniP-p from ``p`` points, corrector UniC-k from ``k`` earlier
    points and the new evaluation. ``rule="unipc"``: UniPC's rho = 1/2 for UniP-2 and UniC-1;
    ``rule="exact"``: the Vandermonde solve at every order."""

    def coefs(h, rs, k_total):
        hh = -h
        B = math.expm1(hh)
        g, bvec, fact = math.expm1(hh) / hh - 1.0, [], 1
        for i in range(1, k_total + 1):
            fact *= i
            bvec.append(g * fact / B)
            g = g / hh - 1.0 / math.factorial(i + 1)
        R = np.array([[r ** (i) for r in rs] for i in range(len(rs))]) if rs else np.zeros((0, 0))
        return B, np.array(bvec), R

    def step(x_s, i_s, i_t, ms, lams_m, m_t=None):
        """ms[0] at lam[i_s], ms[j] at lams_m[j]; optional m_t (corrector)."""
        h = lam[i_t] - lam[i_s]
        base = sigma[i_t] / sigma[i_s] * x_s - alpha[i_t] * math.expm1(-h) * ms[0]
        rs = [(lj - lam[i_s]) / h for lj in lams_m[1:]]
        D = [(mj - ms[0]) / r for mj, r in zip(ms[1:], rs)]
        if m_t is not None:
            rs = rs + [1.0]
            D = D + [m_t - ms[0]]
        if not D:
            return base
        B, bvec, R = coefs(h, rs, len(rs))
        if rule == "unipc" and len(rs) == 1:
            rho = np.array([0.5])
        else:
            rho = np.linalg.solve(R, bvec[: len(rs)])
        return base - alpha[i_t] * B * sum(r * d for r, d in zip(rho, D))

    x, x_prev, ms = x_T, None, []
    for n in range(len(p_orders)):
        ms.append(x0_fn(x, ts[n]))
        k = c_orders[n]
        if k:
            hist = [ms[-2]] + [ms[-2 - j] for j in range(1, k)]
            x = step(x_prev, n - 1, n, hist, [lam[n - 1 - j] for j in range(k)], m_t=ms[-1])
        p = p_orders[n]
        x_prev = x
        x = step(x, n, n + 1, [ms[-1 - j] for j in range(p)], [lam[n - j] for j in range(p)])
    return x


def _ref_inputs(sched, ems, steps):
    idx = v3_indexes(sched, ems, steps)
    lam = np.asarray(ems.lambdas)[idx]
    ts = sched.inverse_lambda(jnp.asarray(lam))
    return idx, lam, ts, np.asarray(sched.alpha(ts)), np.asarray(sched.sigma(ts))


def _x0_fn(model_fn, gm, sched):
    def x0(x, t):
        eps = model_fn(gm, x, jnp.full((x.shape[0],), t))
        return np.asarray((x - sched.sigma(t) * eps) / sched.alpha(t))

    return x0


@pytest.mark.slow
def test_unipc_reference_matches_library(x64):
    """The loop reference with UniPC's 1/2 weights is dpmjax.sample(method="unipc", variant="bh2")."""
    sched = dpmjax.VPLinear()
    gm, model_fn = _gaussian()
    x_T = _x_T()
    ems = degenerate_ems(sched, (2,), n=600)
    idx, lam, ts, a, s = _ref_inputs(sched, ems, 6)
    for order in (2, 3):
        p = dpmjax.timesteps.multistep_orders(order, 6, True, final_below=None)
        c = (0,) + p[:-1]
        ref = _unipc_reference(_x0_fn(model_fn, gm, sched), ts, lam, a, s, np.asarray(x_T), p, c, "unipc")
        lib = dpmjax.sample(model_fn, gm, None, x_T.shape, schedule=sched, noise=x_T, method="unipc", variant="bh2",
                            order=order, steps=6, timesteps=ts)
        np.testing.assert_allclose(lib, ref, atol=1e-10)


def _richardson(run, n):
    """``(4 x(2n) - x(n)) / 3``: removes the O(dlambda^2) trapezoid error of v3's integrals."""
    x1, x2 = run(n), run(2 * n)
    return x2, (4 * x2 - x1) / 3


@pytest.mark.slow
@pytest.mark.parametrize("order", [1, 2])
def test_degenerate_predictor_is_dpmsolverpp(x64, order):
    sched = dpmjax.VPLinear()
    gm, model_fn = _gaussian()
    x_T = _x_T()
    steps = 6

    def run(n):
        ems = degenerate_ems(sched, (2,), n=n)
        return _sample_v3(model_fn, gm, x_T, x_T.shape, schedule=sched, ems=ems, order=order, steps=steps,
                         use_corrector=False)

    x, x_extrapolated = _richardson(run, 1200)
    _, _, ts, _, _ = _ref_inputs(sched, degenerate_ems(sched, (2,), n=1200), steps)
    ref = dpmjax.sample(model_fn, gm, None, x_T.shape, schedule=sched, noise=x_T, algorithm="dpmsolver++",
                        order=order, steps=steps, solver_type="taylor", timesteps=ts)
    assert float(jnp.max(jnp.abs(x - ref))) < 3e-5
    np.testing.assert_allclose(x_extrapolated, ref, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize(
    "order, use_corrector, c_pseudo",
    [(3, False, False), (1, True, True), (3, True, False)],
    ids=["UniP-3", "UniP-1+UniC-1", "UniP-3+UniC"],
)
def test_degenerate_v3_is_unipc_with_exact_weights(x64, order, use_corrector, c_pseudo):
    sched = dpmjax.VPLinear()
    gm, model_fn = _gaussian()
    x_T = _x_T()
    steps = 6

    def run(n):
        ems = degenerate_ems(sched, (2,), n=n)
        return _sample_v3(model_fn, gm, x_T, x_T.shape, schedule=sched, ems=ems, order=order, steps=steps,
                         use_corrector=use_corrector, c_pseudo=c_pseudo)

    x, x_extrapolated = _richardson(run, 1200)
    idx, lam, ts, a, s = _ref_inputs(sched, degenerate_ems(sched, (2,), n=1200), steps)
    p, c = v3_orders(order, steps, True, use_corrector, c_pseudo)
    # v3's corrector with c points (s, t, earlier) is UniC with c - 1 earlier points.
    ref = _unipc_reference(_x0_fn(model_fn, gm, sched), ts, lam, a, s, np.asarray(x_T), p,
                           tuple(max(k - 1, 0) for k in c), "exact")
    assert float(jnp.max(jnp.abs(x - ref))) < 3e-5
    np.testing.assert_allclose(x_extrapolated, ref, atol=1e-9)


# --------------------------------------------------------------------------- general EMS


def _perturbed_gaussian_ems(sched, n):
    """The Gaussian's EMS plus smooth perturbations that vanish near t = T (so the order-1
    warm-up step stays exact and the asymptotic order is the solver's own)."""
    lam = degenerate_ems(sched, (2,), n=n).lambdas
    L = np.asarray(lam)[:, None]
    l, s, b = _gaussian_ems(lam)
    w = 1.0 / (1.0 + np.exp(-4.0 * (L - L[0] - 3.0)))
    return EMS(lam, jnp.asarray(l + 0.3 * w * np.sin(L)), jnp.asarray(s + 0.2 * w * np.cos(L)),
               jnp.asarray(b + 0.1 * w))




def _cumtrapz(y, x):
    inc = 0.5 * (x[1:] - x[:-1]).reshape((-1,) + (1,) * (y.ndim - 1)) * (y[1:] + y[:-1])
    return np.concatenate([np.zeros_like(y[:1]), np.cumsum(inc, 0)], 0)


def _v3_loop_reference(x0_fn, ems, idx, times, alphas, x_T, order, use_corrector, p_pseudo, c_pseudo,
                       lower_order_final):
    """DPM-Solver-v3 as a plain loop over steps, in the paper's anchored form: cumulative
    integrals ``L, S, I = int e^{L+S}, B = int e^-S b, C = int e^{L+S} B`` over the whole
    grid, ``g_i = e^{S_s - S_i} f_i - e^{S_s} (B_i - B_s)`` relative to each step's anchor,
    derivatives of ``g`` at ``lambda_s`` by a Vandermonde solve (or divided differences,
    pseudo) and the high-order integrals ``int e^{L+S-L_s-S_s} (lambda - lambda_s)^m / m!`` on the
    grid slice of the step."""
    lam = np.asarray(ems.lambdas)
    l, s, b = (np.asarray(a) for a in (ems.l, ems.s, ems.b))
    L, S = _cumtrapz(l, lam), _cumtrapz(s, lam)
    I = _cumtrapz(np.exp(L + S), lam)
    B = _cumtrapz(np.exp(-S) * b, lam)
    C = _cumtrapz(np.exp(L + S) * B, lam)

    def update(x_s, nodes, k_s, k_t, pseudo):
        """nodes: [(time-step index k, f)], nodes[0] the anchor (time step k_s)."""
        i_s, i_t = idx[k_s], idx[k_t]
        a_s, a_t = alphas[k_s], alphas[k_t]
        g = [np.exp(S[i_s] - S[idx[k]]) * f - np.exp(S[i_s]) * (B[idx[k]] - B[i_s]) for k, f in nodes]
        x = (a_t / a_s * np.exp(L[i_s] - L[i_t]) * x_s
             - a_t * np.exp(-L[i_t] - S[i_s]) * (I[i_t] - I[i_s]) * g[0]
             - a_t * np.exp(-L[i_t]) * (C[i_t] - C[i_s] - B[i_s] * (I[i_t] - I[i_s])))
        n = len(nodes) - 1
        if n == 0:
            return x
        lams = np.array([lam[idx[k]] for k, _ in nodes])
        if pseudo:
            D = [list(g)]
            for i in range(1, n + 1):
                D.append([(D[i - 1][j] - D[i - 1][j + 1]) / (lams[j] - lams[i + j]) for j in range(n - i + 1)])
            derivs = [D[i][0] * math.factorial(i) for i in range(1, n + 1)]
        else:
            R = np.array([[(lams[j] - lams[0]) ** i for i in range(1, n + 1)] for j in range(1, n + 1)])
            rhs = np.stack([gj - g[0] for gj in g[1:]]).reshape(n, -1)
            sol = np.linalg.solve(R, rhs).reshape((n,) + g[0].shape)
            derivs = [sol[i - 1] * math.factorial(i) for i in range(1, n + 1)]
        sl = slice(i_s, i_t + 1)
        ex = np.exp(L[sl] + S[sl] - L[i_s] - S[i_s])
        u = (lam[sl] - lam[i_s]).reshape((-1,) + (1,) * (l.ndim - 1))
        for m in range(1, n + 1):
            y = ex * u**m / math.factorial(m)
            coef = np.sum(0.5 * (u[1:] - u[:-1]) * (y[1:] + y[:-1]), 0)
            x = x - a_t * np.exp(L[i_s] - L[i_t]) * coef * derivs[m - 1]
        return x

    steps = len(idx) - 1
    xs, fs = [], []
    x, p_prev = np.asarray(x_T), 0
    for i in range(1, steps + 1):
        k = i - 1
        x0 = x0_fn(x, times[k])
        fs.append((1.0 - l[idx[k]]) * x / alphas[k] - x0)
        xs.append(x)
        c = p_prev + int(c_pseudo)
        if use_corrector and c > 1:
            nodes = [(k - 1, fs[k - 1]), (k, fs[k])] + [(k - j, fs[k - j]) for j in range(2, c)]
            xs[k] = update(xs[k - 1], nodes, k - 1, k, c_pseudo)
        p = min(i, order)
        if lower_order_final:
            p = min(p, steps + 1 - i)
        x = update(xs[k], [(k - j, fs[k - j]) for j in range(p)], k, k + 1, p_pseudo)
        p_prev = p
    return x


@pytest.mark.slow
@pytest.mark.parametrize(
    "order, use_corrector, p_pseudo, c_pseudo, lower_order_final",
    [(3, True, True, True, False), (3, True, False, False, True), (2, True, True, True, True),
     (3, False, True, False, True)],
)
def test_matches_loop_reference_with_general_ems(x64, order, use_corrector, p_pseudo, c_pseudo, lower_order_final):
    """The table-driven scan equals the step-by-step loop on non-trivial EMS (every option)."""
    sched = dpmjax.VPLinear()
    gm, model_fn = _gaussian()
    x_T = _x_T()
    ems = _perturbed_gaussian_ems(sched, 300)
    steps = 6
    idx, lam, ts, a, _ = _ref_inputs(sched, ems, steps)
    x = _sample_v3(model_fn, gm, x_T, x_T.shape, schedule=sched, ems=ems, order=order, steps=steps,
                  use_corrector=use_corrector, p_pseudo=p_pseudo, c_pseudo=c_pseudo,
                  lower_order_final=lower_order_final)
    ref = _v3_loop_reference(_x0_fn(model_fn, gm, sched), ems, idx, ts, a, x_T, order, use_corrector, p_pseudo,
                             c_pseudo, lower_order_final)
    np.testing.assert_allclose(x, ref, atol=1e-9)


# --------------------------------------------------------------------------- one implementation


def _table_loop(x0_fn, plan, x_T, c_orders):
    """The v3 rows of :class:`dpmjax.updates.Plan` from :func:`dpmjax.v3.v3_plan` run by a
    plain NumPy loop (their documented recurrence), independent of the solver's step:
    carry ``(x_prev, x_cur)``."""
    P = jax.tree_util.tree_map(np.asarray, plan)
    K = P.cx.shape[1]
    x_prev = x_cur = np.asarray(x_T)
    hist = np.zeros((K,) + x_cur.shape)
    for n in range(P.t_eval.shape[0]):
        hist[P.slot[n]] = P.g_p[n] * x0_fn(x_cur, P.t_eval[n]) + P.g_q[n] * x_cur + P.g_r[n]
        if c_orders[n]:
            x_cur = P.ax[n] * x_prev + P.bx[n] * x_cur + sum(P.cx[n, k] * hist[k] for k in range(K)) + P.rx[n]
        x_prev, x_cur = x_cur, P.ay[n] * x_cur + sum(P.cy[n, k] * hist[k] for k in range(K)) + P.ry[n]
    return x_cur


V3_CONFIGS = [
    # order, use_corrector, p_pseudo, c_pseudo, lower_order_final, skip_type
    (1, False, False, False, True, "logSNR"),
    (1, True, False, True, True, "time_uniform"),
    (2, True, False, False, True, "logSNR"),
    (2, False, True, False, False, "time_quadratic"),
    (3, True, True, True, False, "logSNR"),
    (3, True, False, False, True, "karras"),
    (3, False, False, True, True, "logSNR"),
]


@pytest.mark.slow
@pytest.mark.parametrize("order, use_corrector, p_pseudo, c_pseudo, lower_order_final, skip_type", V3_CONFIGS)
def test_sample_v3_runs_the_v3_table(x64, order, use_corrector, p_pseudo, c_pseudo, lower_order_final, skip_type):
    """``sample(method="v3")`` (the shared solver step over per-dimension rows) equals the
    v3 coefficient table run by its own recurrence, on non-trivial EMS, to 1e-10."""
    sched = dpmjax.VPLinear()
    gm, model_fn = _gaussian()
    x_T = _x_T()
    ems = _perturbed_gaussian_ems(sched, 300)
    steps = 7
    idx = v3_indexes(sched, ems, steps, skip_type)
    p, c = v3_orders(order, steps, lower_order_final, use_corrector, c_pseudo)
    plan, _ = v3_plan(sched, ems, idx, p, c, p_pseudo=p_pseudo, c_pseudo=c_pseudo)
    ref = _table_loop(_x0_fn(model_fn, gm, sched), plan, x_T, c)
    x = dpmjax.sample(model_fn, gm, None, x_T.shape, schedule=sched, noise=x_T, method="v3", ems=ems, order=order,
                      steps=steps, skip_type=skip_type, use_corrector=use_corrector, p_pseudo=p_pseudo,
                      c_pseudo=c_pseudo, lower_order_final=lower_order_final)
    np.testing.assert_allclose(x, ref, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_v3_on_given_timesteps_snaps_them_to_the_ems_grid(x64):
    """``timesteps=`` (e.g. a fitted grid) with ``method="v3"``: each time is snapped to the
    nearest EMS grid point, so times off the points by less than half an interval give the
    table of those points (run by its own recurrence), to 1e-10."""
    sched = dpmjax.VPLinear()
    gm, model_fn = _gaussian()
    x_T = _x_T()
    ems = _perturbed_gaussian_ems(sched, 300)
    lam = np.asarray(ems.lambdas)
    idx = np.array([0, 20, 70, 130, 200, 260, 300])
    steps = idx.shape[0] - 1
    jitter = np.random.default_rng(0).uniform(-0.4, 0.4, steps + 1) * (lam[1] - lam[0])
    ts = np.array(sched.inverse_lambda(jnp.asarray(lam[idx] + jitter)))
    ts[0], ts[-1] = dpmjax.solvers.v3_range(sched, ems)
    assert not np.any(np.isin(np.asarray(sched.lambda_(jnp.asarray(ts[1:-1]))), lam))  # off the grid points
    p, c = v3_orders(3, steps, True, True, False)
    plan, _ = v3_plan(sched, ems, idx, p, c, p_pseudo=False, c_pseudo=False)
    ref = _table_loop(_x0_fn(model_fn, gm, sched), plan, x_T, c)
    x = dpmjax.sample(model_fn, gm, None, x_T.shape, schedule=sched, noise=x_T, method="v3", ems=ems, order=3,
                      steps=steps, timesteps=ts, c_pseudo=False)
    np.testing.assert_allclose(x, ref, rtol=0, atol=1e-10)
    # and the time steps differ from the logSNR grid's (this is not skip_type's table)
    assert not np.array_equal(idx, v3_indexes(sched, ems, steps, "logSNR"))


def test_step_api_hand_loop_equals_sample(x64):
    """``dpmjax.solver(method="v3")`` driven by a Python loop gives sample()'s result and
    intermediate states; the exported tables run by their documented recurrence agree too."""
    sched = dpmjax.VPLinear()
    gm, model_fn = _gaussian()
    x_T = _x_T()
    ems = _perturbed_gaussian_ems(sched, 300)
    kw = dict(method="v3", ems=ems, order=3, steps=6, skip_type="logSNR", use_corrector=True, c_pseudo=False)
    x, states = dpmjax.sample(model_fn, gm, None, x_T.shape, schedule=sched, noise=x_T, return_intermediate=True, **kw)
    solver = dpmjax.solver(sched, **kw)
    assert solver.num_evals == 6
    step = jax.jit(lambda st, out: solver.step(st, out))
    state = solver.init(x_T)
    seen = [np.asarray(solver.current(state)[0])]
    for _ in range(solver.num_evals):
        x_in, t_in = solver.model_inputs(state)
        state = step(state, model_fn(gm, x_in, t_in))
        seen.append(np.asarray(solver.current(state)[0]))
    np.testing.assert_allclose(solver.result(state), x, rtol=0, atol=1e-12)
    # states: x_T, the corrected states at t_1 .. t_5, the result (current() lags one row).
    assert states.shape == (7, 8, 2)
    np.testing.assert_allclose(states[:-1], np.stack(seen[:1] + seen[2:]), rtol=0, atol=1e-12)
    # current() reports the time of the state it returns: the EMS grid point of step n.
    t_grid = sched.inverse_lambda(jnp.asarray(ems.lambdas)[v3_indexes(sched, ems, 6)])
    np.testing.assert_allclose(solver.current(state)[1], t_grid[5], rtol=1e-12)

    e = solver.export()
    assert e["g_p"].shape == (6, 2) and e["cx"].shape[:2] == (6, e["slot"].max() + 1)
    xs, ys = np.asarray(x_T) * e["start_scale"], np.asarray(x_T) * e["start_scale"]
    hist = np.zeros((e["cx"].shape[1],) + xs.shape)
    for r in range(6):
        out = np.asarray(model_fn(gm, ys / e["in_scale"][r], np.full((8,), e["t_model"][r])))
        m = e["out_coef"][r] * out + e["x_coef"][r] * ys
        hist[e["slot"][r]] = e["g_p"][r] * m + e["g_q"][r] * ys + e["g_r"][r]
        xs = e["ax"][r] * xs + e["bx"][r] * ys + sum(e["cx"][r, k] * hist[k] for k in range(hist.shape[0])) + e["rx"][r]
        ys = e["ay"][r] * xs + sum(e["cy"][r, k] * hist[k] for k in range(hist.shape[0])) + e["ry"][r]
    np.testing.assert_allclose(ys / e["end_scale"], x, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_v3_option_errors():
    sched = dpmjax.VPLinear()
    gm, model_fn = _gaussian()
    ems = degenerate_ems(sched, (2,), n=50)
    args = (model_fn, gm, jax.random.key(0), (4, 2))
    with pytest.raises(ValueError, match="method='v3' needs ems="):
        dpmjax.sample(*args, schedule=sched, method="v3", steps=5)
    with pytest.raises(ValueError, match="method='v3' needs ems="):
        dpmjax.solver(sched, method="v3", steps=5)
    for method in ("multistep", "unipc", "singlestep", "adaptive"):
        with pytest.raises(ValueError, match="ems does not apply to method"):
            dpmjax.sample(*args, schedule=sched, method=method, ems=ems)
    with pytest.raises(ValueError, match="ems does not apply to method"):
        dpmjax.solver(sched, method="multistep", ems=ems)
    for name, value in (("use_corrector", False), ("p_pseudo", True), ("c_pseudo", False)):
        with pytest.raises(ValueError, match=f"{name}={value} does not apply to method='unipc'"):
            dpmjax.sample(*args, schedule=sched, method="unipc", **{name: value})
        with pytest.raises(ValueError, match=f"{name}={value} does not apply to method='adaptive'"):
            dpmjax.sample(*args, schedule=sched, method="adaptive", order=2, **{name: value})
    kw = dict(schedule=sched, method="v3", ems=ems, steps=5)
    for bad, match in (
        (dict(algorithm="dpmsolver"), r"algorithm='dpmsolver\+\+'"),
        (dict(t_start=0.9), "t_start does not apply to method='v3'"),
        (dict(t_end=0.01), "t_end does not apply to method='v3'"),
        (dict(timesteps=np.linspace(1.0, 0.01, 6)), "timesteps of method='v3' must start and end at the EMS grid"),
        (dict(timesteps=np.r_[1.0, 0.9999, 0.5, 0.2, 0.1, 1e-3]), "two time steps on the same point of the EMS grid"),
        (dict(denoise_to_zero=True), "denoise_to_zero does not apply to method='v3'"),
        (dict(variant="bh1"), "variant='bh1' does not apply to method='v3'"),
        (dict(orders=(1, 2, 3, 3, 3)), "does not apply to method='v3'"),
        (dict(skip_type="edm"), "skip_type must be one of"),
        (dict(steps=2, order=3), "steps must be >= order"),
        (dict(p_pseudo=1), "p_pseudo must be"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            dpmjax.sample(*args, **dict(kw, **bad))
    with pytest.raises(ValueError, match="sample shape"):
        dpmjax.sample(model_fn, gm, jax.random.key(0), (4, 3), **kw)
    solver = dpmjax.solver(**kw)
    with pytest.raises(ValueError, match="EMS' sample shape"):
        solver.init(jnp.zeros((4, 1)))
    with pytest.raises(ValueError, match="invert supports"):
        dpmjax.invert(model_fn, gm, jnp.zeros((4, 2)), schedule=sched, method="v3")


# --------------------------------------------------------------------------- convergence


CONVERGENCE = [
    # order, use_corrector, p_pseudo, c_pseudo, steps, expected order
    (1, False, False, False, (10, 20, 40), 1),
    (2, False, False, False, (10, 20, 40), 2),
    (3, False, False, False, (40, 80, 160), 3),
    (1, True, False, True, (10, 20, 40), 2),
    (2, True, False, False, (10, 20, 40), 2),  # corrector from 2 points (c_pseudo=False): no gain in order
    (3, True, False, False, (40, 80, 160), 3),
]


@pytest.mark.slow
@pytest.mark.parametrize("order, use_corrector, p_pseudo, c_pseudo, steps, expected", CONVERGENCE)
def test_convergence_order(x64, order, use_corrector, p_pseudo, c_pseudo, steps, expected):
    """Error to the exact ODE solution vs steps with perturbed EMS (lower_order_final=False).

    Predictor alone: fitted order within 0.35 of the expected one (order 3 at 40..160 steps
    measures 2.76, its ratios rising towards 8). With the corrector: at least the expected
    order less 0.35 (order 3 with its 3-point corrector measures ~3.8 over 40..160 steps,
    its error changing sign near 80). The EMS grid (48000 intervals) keeps the trapezoid
    error far below the solver's (doubling it changes no error by more than 1e-6 relative)."""
    sched = dpmjax.VPLinear()
    gm, model_fn = _gaussian()
    x_T = _x_T()
    ems = _perturbed_gaussian_ems(sched, 48000)
    exact = gm.ode_solution(x_T, sched, sched.inverse_lambda(ems.lambdas[0]), sched.inverse_lambda(ems.lambdas[-1]))
    errors = []
    for n in steps:
        x = _sample_v3(model_fn, gm, x_T, x_T.shape, schedule=sched, ems=ems, order=order, steps=n,
                      use_corrector=use_corrector, p_pseudo=p_pseudo, c_pseudo=c_pseudo, lower_order_final=False)
        errors.append(float(jnp.sqrt(jnp.mean((x - exact) ** 2))))
    p = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    print(order, use_corrector, p_pseudo, c_pseudo, errors, p)
    assert p > expected - 0.35, (p, errors)
    if not use_corrector:
        assert p < expected + 0.35, (p, errors)


# --------------------------------------------------------------------------- files and errors


def test_save_load_round_trip_authors_layout(tmp_path, x64):
    sched = dpmjax.VPLinear()
    rng = np.random.default_rng(0)
    lam = degenerate_ems(sched, (3, 2), n=20).lambdas
    ems = EMS(lam, *(jnp.asarray(rng.normal(size=(21, 3, 2))) for _ in range(3)))
    d = tmp_path / "stats"
    save_ems(d, ems)
    assert sorted(os.listdir(d)) == ["ems.json", "l.npz", "lambdas.npy", "sb.npz"]  # the authors' files + manifest
    with np.load(d / "l.npz") as z:
        assert z.files == ["l"] and z["l"].shape == (21, 3, 2)
    with np.load(d / "sb.npz") as z:
        assert sorted(z.files) == ["b", "s"]
        np.testing.assert_array_equal(z["s"], ems.s)
    back = load_ems(d)
    for a, b in zip(ems, back):
        np.testing.assert_array_equal(a, b)
    # The authors' files carry no grid (and no manifest): rebuilt from the schedule's default range.
    os.remove(d / "lambdas.npy")
    os.remove(d / "ems.json")
    with pytest.raises(ValueError, match="schedule="):
        load_ems(d)
    np.testing.assert_allclose(load_ems(d, sched).lambdas, lam, rtol=1e-12)
    # A grid that disagrees with the schedule's range is refused.
    save_ems(d, ems)
    with pytest.raises(ValueError, match="spans lambda"):
        load_ems(d, sched, t_end=0.01)


def test_load_rejects_bad_files(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    with pytest.raises(FileNotFoundError, match="l.npz"):
        load_ems(d)
    (d / "l.npz").write_bytes(b"not a zip")
    np.savez(d / "sb.npz", s=np.zeros((3, 2)), b=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="not a readable"):
        load_ems(d, dpmjax.VPLinear())
    np.savez(d / "l.npz", x=np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"lacks the arrays \['l'\]"):
        load_ems(d, dpmjax.VPLinear())
    np.savez(d / "l.npz", l=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="shape"):
        load_ems(d, dpmjax.VPLinear())


def test_argument_errors():
    sched = dpmjax.VPLinear()
    gm, model_fn = _gaussian()
    ems = degenerate_ems(sched, (2,), n=10)
    kw = dict(schedule=sched, ems=ems)
    with pytest.raises(ValueError, match="same point of the EMS grid"):
        _sample_v3(model_fn, gm, jax.random.key(0), (4, 2), steps=20, **kw)
    with pytest.raises(ValueError, match="sample shape"):
        _sample_v3(model_fn, gm, jax.random.key(0), (4, 3), steps=5, **kw)
    with pytest.raises(ValueError, match=r"order must be in 1\.\.3"):
        _sample_v3(model_fn, gm, jax.random.key(0), (4, 2), order=4, steps=5, **kw)
    with pytest.raises(ValueError, match="skip_type"):
        _sample_v3(model_fn, gm, jax.random.key(0), (4, 2), steps=5, skip_type="quadratic", **kw)
    with pytest.raises(TypeError, match="dpmjax.EMS"):
        check_ems((ems.lambdas, ems.l, ems.s, ems.b))
    with pytest.raises(ValueError, match="data must have shape"):
        compute_ems(model_fn, gm, jax.random.key(0), (2,), schedule=sched, data=jnp.zeros((8, 3)))
    with pytest.raises(ValueError, match="n_samples"):
        compute_ems(model_fn, gm, jax.random.key(0), (2,), schedule=sched, data=jnp.zeros((8, 2)), n_samples=9)
