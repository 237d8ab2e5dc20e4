"""An independent float64 numpy reference of the samplers, written from docs/algorithms.md alone.

Plain Python loops, one formula per line, no JAX and no import from :mod:`dpmjax`: the
tests compare ``dpmjax.sample`` against this to ~1e-9, so a slip in the library's
precomputed coefficient tables (``dpmjax/updates.py``) cannot hide behind the same
slip here. Everything is float64 and every time argument is a Python float.

Conventions (docs/algorithms.md "Notation"): one step goes from ``s`` to ``t < s``,
``h = lambda_t - lambda_s > 0``; ``m`` is the model output of the kind the algorithm
integrates (``x0`` for "dpmsolver++", ``eps`` for "dpmsolver").
"""

from __future__ import annotations

import math

import numpy as np

# --------------------------------------------------------------------------- schedules


class _VP:
    """``log_sigma = 0.5 log(-expm1(2 log_alpha))``; lambda = log_alpha - log_sigma."""

    T = 1.0
    t_eps = 1e-3

    def log_alpha(self, t):
        raise NotImplementedError

    def alpha(self, t):
        return math.exp(self.log_alpha(t))

    def log_sigma(self, t):
        return 0.5 * math.log(-math.expm1(2.0 * self.log_alpha(t)))

    def sigma(self, t):
        return math.exp(self.log_sigma(t))

    def lambda_(self, t):
        return self.log_alpha(t) - self.log_sigma(t)

    @staticmethod
    def log_alpha_of_lambda(lam):
        # alpha^2 = sigmoid(2 lam) -> log alpha = -0.5 log(1 + exp(-2 lam))
        return -0.5 * np.logaddexp(0.0, -2.0 * lam)


class Linear(_VP):
    def __init__(self, b0=0.1, b1=20.0):
        self.b0, self.b1 = b0, b1

    def log_alpha(self, t):
        return -0.25 * t**2 * (self.b1 - self.b0) - 0.5 * t * self.b0

    def inverse_lambda(self, lam):
        b0, b1 = self.b0, self.b1
        tmp = 2.0 * (b1 - b0) * np.logaddexp(-2.0 * lam, 0.0)
        return float(tmp / (math.sqrt(b0**2 + tmp) + b0) / (b1 - b0))


class Cosine(_VP):
    T = 0.9946

    def __init__(self, s=0.008):
        self.s = s
        self.la0 = math.log(math.cos(s / (1.0 + s) * math.pi / 2.0))

    def log_alpha(self, t):
        return math.log(math.cos((t + self.s) / (1.0 + self.s) * math.pi / 2.0)) - self.la0

    def inverse_lambda(self, lam):
        la = self.log_alpha_of_lambda(lam)
        return float(2.0 * (1.0 + self.s) / math.pi * math.acos(math.exp(la + self.la0)) - self.s)


def _lin_interp(x, xp, fp):
    """Piecewise linear through increasing knots ``xp``, extrapolated linearly at both ends."""
    n = len(xp)
    i = int(np.searchsorted(xp, x))
    i = min(max(i, 1), n - 1)
    return float(fp[i - 1] + (x - xp[i - 1]) * (fp[i] - fp[i - 1]) / (xp[i] - xp[i - 1]))


class Discrete(_VP):
    """Knots ``t_i = (i + 1)/N``, ``log_alpha_i = 0.5 cumsum(log(1 - beta))``; entries with
    ``lambda < -5.1`` dropped from the end first."""

    def __init__(self, betas, lambda_min=-5.1):
        la = 0.5 * np.cumsum(np.log(1.0 - np.asarray(betas, np.float64)))
        lam = la - 0.5 * np.log(-np.expm1(2.0 * la))
        if lambda_min is not None:
            la = la[lam >= lambda_min]
        self.log_alphas = la
        self.N = len(la)
        self.t_knots = (np.arange(self.N) + 1.0) / self.N
        self.t_eps = 1.0 / self.N

    @classmethod
    def named(cls, name, n=1000):
        if name == "linear":
            betas = np.linspace(1e-4, 0.02, n)
        elif name == "scaled_linear":
            betas = np.linspace(0.00085**0.5, 0.012**0.5, n) ** 2
        elif name == "squaredcos_cap_v2":
            abar = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
            i = np.arange(n)
            betas = np.minimum(1.0 - abar((i + 1) / n) / abar(i / n), 0.999)
        else:
            raise ValueError(name)
        return cls(betas)

    def log_alpha(self, t):
        return _lin_interp(t, self.t_knots, self.log_alphas)

    def inverse_lambda(self, lam):
        la = float(self.log_alpha_of_lambda(lam))
        return _lin_interp(la, self.log_alphas[::-1], self.t_knots[::-1])


# --------------------------------------------------------------------------- data models


def gaussian_eps(mean, std):
    """Exact noise predictor of ``N(mean, diag(std^2))``: ``eps = sigma (x - alpha mu) / (alpha^2 s^2 + sigma^2)``."""
    mean = np.asarray(mean, np.float64)
    std = np.asarray(std, np.float64)

    def eps(x, alpha, sigma):
        return sigma * (x - alpha * mean) / (alpha**2 * std**2 + sigma**2)

    return eps


def mixture_eps(weights, means, stds):
    """Exact noise predictor of a diagonal Gaussian mixture, ``-sigma grad log p_t``."""
    w = np.asarray(weights, np.float64)
    mu = np.asarray(means, np.float64)
    sd = np.asarray(stds, np.float64)

    def eps(x, alpha, sigma):
        var = alpha**2 * sd**2 + sigma**2  # (K, D)
        diff = x[:, None, :] - alpha * mu[None]  # (B, K, D)
        logp = np.log(w) - 0.5 * np.sum(diff**2 / var + np.log(var), axis=-1)
        logp -= logp.max(axis=1, keepdims=True)
        resp = np.exp(logp)
        resp /= resp.sum(axis=1, keepdims=True)
        score = -np.sum(resp[..., None] * diff / var, axis=1)
        return -sigma * score

    return eps


def gaussian_ode_solution(x, sched, t_from, t_to, mean, std):
    """Exact probability-flow ODE map of a single Gaussian: the standardised value is constant."""
    a0, s0 = sched.alpha(t_from), sched.sigma(t_from)
    a1, s1 = sched.alpha(t_to), sched.sigma(t_to)
    z = (x - a0 * mean) / np.sqrt(a0**2 * std**2 + s0**2)
    return a1 * mean + np.sqrt(a1**2 * std**2 + s1**2) * z


# --------------------------------------------------------------------------- grids and plans


def time_grid(sched, skip_type, t0, t1, n):
    """``n + 1`` times from ``t0`` down to ``t1`` (docs/algorithms.md "Time grids")."""
    if skip_type == "logSNR":
        l0, l1 = sched.lambda_(t0), sched.lambda_(t1)
        ts = [sched.inverse_lambda(l0 + (l1 - l0) * i / n) for i in range(n + 1)]
    elif skip_type == "time_uniform":
        ts = [t0 + (t1 - t0) * i / n for i in range(n + 1)]
    elif skip_type == "time_quadratic":
        a, b = math.sqrt(t0), math.sqrt(t1)
        ts = [(a + (b - a) * i / n) ** 2 for i in range(n + 1)]
    else:
        raise ValueError(skip_type)
    ts[0], ts[-1] = t0, t1
    return ts


def multistep_orders(order, steps, lower_order_final):
    out = []
    for i in range(1, steps + 1):
        k = min(order, i)
        if lower_order_final and steps < 10:
            k = min(k, steps + 1 - i)
        out.append(k)
    return out


def unipc_orders(order, steps, lower_order_final):
    out = []
    for i in range(1, steps + 1):
        k = min(order, i)
        if lower_order_final:
            k = min(k, steps + 1 - i)
        out.append(k)
    return out


def singlestep_orders(order, steps):
    if order == 3:
        K = steps // 3 + 1
        if steps % 3 == 0:
            return [3] * (K - 2) + [2, 1]
        if steps % 3 == 1:
            return [3] * (K - 1) + [1]
        return [3] * (K - 1) + [2]
    if order == 2:
        return [2] * (steps // 2) if steps % 2 == 0 else [2] * (steps // 2) + [1]
    return [1] * steps


# --------------------------------------------------------------------------- the sampler


class Reference:
    """``Reference(eps, sched, ...).sample(x_T)`` following docs/algorithms.md formula by formula.

    ``eps(x, alpha, sigma)`` is the exact noise predictor (numpy, batch-first ``x``).
    ``nfe`` counts model evaluations of the last call.
    """

    def __init__(self, eps, sched, *, algorithm="dpmsolver++", method="multistep", order=2, steps=20,
                 skip_type="time_uniform", t_start=None, t_end=None, lower_order_final=True,
                 denoise_to_zero=False, solver_type="dpmsolver", variant="bh2", thresholding=False,
                 ratio=0.995, max_val=1.0, disable_corrector=(), exact_warmup=None):
        self.eps_fn, self.sch = eps, sched
        self.data = algorithm == "dpmsolver++"
        self.method, self.order, self.steps = method, order, steps
        self.skip_type, self.solver_type, self.variant = skip_type, solver_type, variant
        self.t_start = sched.T if t_start is None else float(t_start)
        self.t_end = sched.t_eps if t_end is None else float(t_end)
        self.lower_order_final, self.denoise_to_zero = lower_order_final, denoise_to_zero
        self.thresholding, self.ratio, self.max_val = thresholding, ratio, max_val
        self.disable_corrector = set(disable_corrector)
        # exact_warmup(x_T, t) -> the exact ODE state at t: multistep only, replaces the
        # lower-order warm-up steps by exact states (to expose the steady-state order).
        self.exact_warmup = exact_warmup
        self.nfe = 0

    # ---- model
    def x0(self, x, t):
        a, s = self.sch.alpha(t), self.sch.sigma(t)
        self.nfe += 1
        x0 = (x - s * self.eps_fn(x, a, s)) / a
        if self.thresholding:
            b = x0.shape[0]
            q = np.quantile(np.abs(x0).reshape(b, -1), self.ratio, axis=1)
            q = np.maximum(q, self.max_val).reshape((b,) + (1,) * (x0.ndim - 1))
            x0 = np.clip(x0, -q, q) / q
        return x0

    def model(self, x, t):
        if self.data:
            return self.x0(x, t)
        a, s = self.sch.alpha(t), self.sch.sigma(t)
        self.nfe += 1
        return self.eps_fn(x, a, s)

    # ---- one-step formulas (docs/algorithms.md "DPM-Solver and DPM-Solver++", "UniPC")
    def lam(self, t):
        return self.sch.lambda_(t)

    def phi1(self, h):
        return math.expm1(-h) if self.data else math.expm1(h)

    def first_order(self, x, s, t, m_s):
        sch = self.sch
        h = self.lam(t) - self.lam(s)
        if self.data:
            return (sch.sigma(t) / sch.sigma(s)) * x - sch.alpha(t) * math.expm1(-h) * m_s
        return math.exp(sch.log_alpha(t) - sch.log_alpha(s)) * x - sch.sigma(t) * math.expm1(h) * m_s

    def multistep_2(self, x, t_hist, m_hist, t):
        (t1, t0), (m1, m0) = t_hist[-2:], m_hist[-2:]
        h = self.lam(t) - self.lam(t0)
        h0 = self.lam(t0) - self.lam(t1)
        r0 = h0 / h
        D1_0 = (m0 - m1) / r0
        phi1 = self.phi1(h)
        base = self.first_order(x, t0, t, m0)
        a_t, s_t = self.sch.alpha(t), self.sch.sigma(t)
        if self.data:
            if self.solver_type == "dpmsolver":
                return base - 0.5 * a_t * phi1 * D1_0
            return base + a_t * (phi1 / h + 1.0) * D1_0
        if self.solver_type == "dpmsolver":
            return base - 0.5 * s_t * phi1 * D1_0
        return base - s_t * (phi1 / h - 1.0) * D1_0

    def multistep_3(self, x, t_hist, m_hist, t):
        (t2, t1, t0), (m2, m1, m0) = t_hist[-3:], m_hist[-3:]
        h = self.lam(t) - self.lam(t0)
        h0 = self.lam(t0) - self.lam(t1)
        h1 = self.lam(t1) - self.lam(t2)
        r0, r1 = h0 / h, h1 / h
        D1_0 = (m0 - m1) / r0
        D1_1 = (m1 - m2) / r1
        D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
        D2 = (D1_0 - D1_1) / (r0 + r1)
        phi1 = self.phi1(h)
        base = self.first_order(x, t0, t, m0)
        if self.data:
            phi2 = phi1 / h + 1.0
            phi3 = phi2 / h - 0.5
            a_t = self.sch.alpha(t)
            return base + a_t * phi2 * D1 - a_t * phi3 * D2
        phi2 = phi1 / h - 1.0
        phi3 = phi2 / h - 0.5
        s_t = self.sch.sigma(t)
        return base - s_t * phi2 * D1 - s_t * phi3 * D2

    def singlestep_2(self, x, s, t, s1):
        m_s = self.model(x, s)
        h = self.lam(t) - self.lam(s)
        r1 = (self.lam(s1) - self.lam(s)) / h
        x_s1 = self.first_order(x, s, s1, m_s)
        m_s1 = self.model(x_s1, s1)
        D = m_s1 - m_s
        phi1 = self.phi1(h)
        base = self.first_order(x, s, t, m_s)
        a_t, s_t = self.sch.alpha(t), self.sch.sigma(t)
        if self.data:
            if self.solver_type == "dpmsolver":
                return base - (0.5 / r1) * a_t * phi1 * D
            return base + (1.0 / r1) * a_t * (phi1 / h + 1.0) * D
        if self.solver_type == "dpmsolver":
            return base - (0.5 / r1) * s_t * phi1 * D
        return base - (1.0 / r1) * s_t * (phi1 / h - 1.0) * D

    def singlestep_3(self, x, s, t, s1, s2):
        sch = self.sch
        m_s = self.model(x, s)
        h = self.lam(t) - self.lam(s)
        r1 = (self.lam(s1) - self.lam(s)) / h
        r2 = (self.lam(s2) - self.lam(s)) / h
        phi1 = self.phi1(h)
        if self.data:
            phi2 = phi1 / h + 1.0
            phi22 = math.expm1(-r2 * h) / (r2 * h) + 1.0
        else:
            phi2 = phi1 / h - 1.0
            phi22 = math.expm1(r2 * h) / (r2 * h) - 1.0
        phi3 = phi2 / h - 0.5
        x_s1 = self.first_order(x, s, s1, m_s)
        m_s1 = self.model(x_s1, s1)
        x_s2 = self.first_order(x, s, s2, m_s)
        if self.data:
            x_s2 = x_s2 + (r2 / r1) * sch.alpha(s2) * phi22 * (m_s1 - m_s)
        else:
            x_s2 = x_s2 - (r2 / r1) * sch.sigma(s2) * phi22 * (m_s1 - m_s)
        m_s2 = self.model(x_s2, s2)
        base = self.first_order(x, s, t, m_s)
        a_t, s_t = sch.alpha(t), sch.sigma(t)
        if self.solver_type == "dpmsolver":
            if self.data:
                return base + (1.0 / r2) * a_t * phi2 * (m_s2 - m_s)
            return base - (1.0 / r2) * s_t * phi2 * (m_s2 - m_s)
        D1_0 = (m_s1 - m_s) / r1
        D1_1 = (m_s2 - m_s) / r2
        D1 = (r2 * D1_0 - r1 * D1_1) / (r2 - r1)
        D2 = 2.0 * (D1_1 - D1_0) / (r2 - r1)
        if self.data:
            return base + a_t * phi2 * D1 - a_t * phi3 * D2
        return base - s_t * phi2 * D1 - s_t * phi3 * D2

    def unipc_step(self, x, t_hist, m_hist, t, k, use_corrector):
        """One UniPC step of order k from the most recent history entry; returns (x_t, m_t or None)."""
        sch = self.sch
        t0, m0 = t_hist[-1], m_hist[-1]
        lam0 = self.lam(t0)
        h = self.lam(t) - lam0
        rks, D = [], []
        for i in range(1, k):
            r = (self.lam(t_hist[-1 - i]) - lam0) / h
            rks.append(r)
            D.append((m_hist[-1 - i] - m0) / r)
        rks.append(1.0)
        rks = np.array(rks)
        hh = -h if self.data else h
        hphi1 = math.expm1(hh)
        B = hh if self.variant == "bh1" else math.expm1(hh)
        R, b = [], []
        g = hphi1 / hh - 1.0
        for i in range(1, k + 1):
            R.append(rks ** (i - 1))
            b.append(g * math.factorial(i) / B)
            g = g / hh - 1.0 / math.factorial(i + 1)
        R, b = np.array(R), np.array(b)
        if self.data:
            base = (sch.sigma(t) / sch.sigma(t0)) * x - sch.alpha(t) * hphi1 * m0
            c_t = sch.alpha(t)
        else:
            base = math.exp(sch.log_alpha(t) - sch.log_alpha(t0)) * x - sch.sigma(t) * hphi1 * m0
            c_t = sch.sigma(t)
        if k == 1:
            x_pred = base
        else:
            rho_p = np.array([0.5]) if k == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
            x_pred = base - c_t * B * sum(rho_p[i] * D[i] for i in range(k - 1))
        if not use_corrector:
            return x_pred, None
        m_t = self.model(x_pred, t)
        rho_c = np.array([0.5]) if k == 1 else np.linalg.solve(R, b)
        corr = sum((rho_c[i] * D[i] for i in range(k - 1)), np.zeros_like(x))
        x_t = base - c_t * B * (corr + rho_c[-1] * (m_t - m0))
        return x_t, m_t

    # ---- procedures (docs/algorithms.md "Orders per step", "Adaptive step size", "UniPC")
    def sample(self, x_T):
        self.nfe = 0
        x = np.array(x_T, np.float64)
        if self.method == "multistep":
            x = self._multistep(x)
        elif self.method == "unipc":
            x = self._unipc(x)
        else:
            x = self._singlestep(x)
        if self.denoise_to_zero:
            x = self.x0(x, self.t_end)
        return x

    def _multistep(self, x):
        ts = time_grid(self.sch, self.skip_type, self.t_start, self.t_end, self.steps)
        orders = multistep_orders(self.order, self.steps, self.lower_order_final)
        t_hist, m_hist = [ts[0]], [self.model(x, ts[0])]
        x_T = x
        for i in range(1, self.steps + 1):
            k, t = orders[i - 1], ts[i]
            if self.exact_warmup is not None and i < self.order:
                x = self.exact_warmup(x_T, t)
            elif k == 1:
                x = self.first_order(x, t_hist[-1], t, m_hist[-1])
            elif k == 2:
                x = self.multistep_2(x, t_hist, m_hist, t)
            else:
                x = self.multistep_3(x, t_hist, m_hist, t)
            if i < self.steps:
                t_hist.append(t)
                m_hist.append(self.model(x, t))
        return x

    def _unipc(self, x):
        ts = time_grid(self.sch, self.skip_type, self.t_start, self.t_end, self.steps)
        orders = unipc_orders(self.order, self.steps, self.lower_order_final)
        t_hist, m_hist = [ts[0]], [self.model(x, ts[0])]
        for i in range(1, self.steps + 1):
            k, t = orders[i - 1], ts[i]
            use_corrector = i < self.steps and i not in self.disable_corrector
            x, m_t = self.unipc_step(x, t_hist, m_hist, t, k, use_corrector)
            if i < self.steps:
                if m_t is None:
                    m_t = self.model(x, t)
                t_hist.append(t)
                m_hist.append(m_t)
        return x

    def outer_grid(self):
        if self.method == "singlestep":
            orders = singlestep_orders(self.order, self.steps)
            if self.skip_type == "logSNR":
                outer = time_grid(self.sch, "logSNR", self.t_start, self.t_end, len(orders))
            else:
                fine = time_grid(self.sch, self.skip_type, self.t_start, self.t_end, self.steps)
                outer = [fine[j] for j in np.cumsum([0] + orders)]
        else:  # singlestep_fixed
            n = self.steps // self.order
            orders = [self.order] * n
            outer = time_grid(self.sch, self.skip_type, self.t_start, self.t_end, n)
        return orders, outer

    def _singlestep(self, x):
        orders, outer = self.outer_grid()
        for j, k in enumerate(orders):
            s, t = outer[j], outer[j + 1]
            inner = time_grid(self.sch, self.skip_type, s, t, k)
            if k == 1:
                x = self.first_order(x, s, t, self.model(x, s))
            elif k == 2:
                x = self.singlestep_2(x, s, t, inner[1])
            else:
                x = self.singlestep_3(x, s, t, inner[1], inner[2])
        return x
