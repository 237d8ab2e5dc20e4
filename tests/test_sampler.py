"""Tests of ``dpmjax.sample`` that measure the mathematics.

* exact agreement (~1e-9, float64) with the independent numpy reference
  ``tests/reference_impl.py``, written from docs/algorithms.md alone;
* convergence order on a Gaussian whose probability-flow ODE is solved in closed form;
* a Gaussian-mixture accuracy table at NFE 10/20 against a converged reference;
* identities: order 1 is DDIM, the four parameterisations agree, guidance, thresholding,
  ``denoise_to_zero``;
* JAX transformations: jit, no recompilation, vmap, grad.

Budget: every distinct static configuration of ``sample`` is one XLA compilation
(~1-2 s on CPU), so configurations are reused where possible and shapes are tiny.
Set ``DPMJAX_FULL_MATRIX=1`` to run the reference comparison on the full
algorithm x method x order x solver_type x skip_type cross (~120 compilations).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from conftest import compiled_during
import reference_impl as R

# A 4-d Gaussian with distinct scales per dimension: each dimension is an independent
# 1-d problem, so error cancellations at particular step counts do not line up.
MEAN = np.array([0.5, -1.0, 1.5, 0.0])
STD = np.array([0.2, 0.4, 0.7, 1.2])
B, D = 8, 4
X_T = np.random.default_rng(0).standard_normal((B, D))
EPS = R.gaussian_eps(MEAN, STD)

SCHEDULES = ("linear", "cosine", "discrete")


_CACHE = {}


def make_schedules(name):
    """(library schedule, reference schedule), cached per x64 state.

    Caching matters: ``sample`` compiles once per (configuration, ``model_fn`` object),
    so reusing the schedule and its ``model_fn`` lets tests share compilations.
    """
    key = (name, bool(jax.config.jax_enable_x64))
    if key not in _CACHE:
        if name == "linear":
            pair = dpmjax.VPLinear(), R.Linear()
        elif name == "cosine":
            pair = dpmjax.VPCosine(), R.Cosine()
        elif name == "discrete":
            pair = dpmjax.VPDiscrete.from_named("linear", 1000), R.Discrete.named("linear", 1000)
        else:
            raise ValueError(name)
        _CACHE[key] = pair + (dpmjax.GaussianMixture.gaussian(MEAN, STD).model_fn(pair[0]),)
    return _CACHE[key][:2]


def model_fn_for(sched):
    """The cached ``GaussianMixture.model_fn`` of a schedule returned by make_schedules."""
    for k, v in _CACHE.items():
        if v[0] is sched:
            return v[2]
    raise KeyError(sched)


def gaussian():
    return dpmjax.GaussianMixture.gaussian(jnp.asarray(MEAN), jnp.asarray(STD))


#: the options of each method (sample() rejects the others unless they keep their defaults)
_OPTION_METHODS = {"variant": ("unipc",), "solver_type": ("multistep", "singlestep", "singlestep_fixed", "adaptive"),
                   "lower_order_final": ("multistep", "unipc")}


def applicable(kw):
    """``kw`` without the options its method does not take (the reference ignores them)."""
    method = kw.get("method", "multistep")
    return {k: v for k, v in kw.items() if method in _OPTION_METHODS.get(k, (method,))}


def lib_sample(sched, x_T=X_T, gm=None, model_fn=None, **kw):
    kw = applicable(kw)
    gm = gaussian() if gm is None else gm
    model_fn = model_fn_for(sched) if model_fn is None else model_fn
    out = dpmjax.sample(model_fn, gm, None, x_T.shape, schedule=sched, noise=jnp.asarray(x_T), **kw)
    return np.asarray(out)


def ref_sample(rsched, x_T=X_T, eps=EPS, **kw):
    return R.Reference(eps, rsched, **kw).sample(x_T)


def assert_close(x, ref, rtol=1e-9, what=""):
    err = np.max(np.abs(x - ref)) / max(1.0, np.max(np.abs(ref)))
    assert err <= rtol, f"{what}: max relative deviation {err:.3e} > {rtol:.0e}"


# --------------------------------------------------------------------------- 1. reference

# (method, order, solver_type, variant): solver_type matters for orders 2/3 of DPM-Solver
# (ignored by multistep order 3), variant only for UniPC.
CONFIGS = [
    ("multistep", 1, "dpmsolver", "bh2"),
    ("multistep", 2, "dpmsolver", "bh2"),
    ("multistep", 2, "taylor", "bh2"),
    ("multistep", 3, "dpmsolver", "bh2"),
    ("singlestep", 1, "dpmsolver", "bh2"),
    ("singlestep", 2, "dpmsolver", "bh2"),
    ("singlestep", 2, "taylor", "bh2"),
    ("singlestep", 3, "dpmsolver", "bh2"),
    ("singlestep", 3, "taylor", "bh2"),
    ("singlestep_fixed", 2, "dpmsolver", "bh2"),
    ("singlestep_fixed", 2, "taylor", "bh2"),
    ("singlestep_fixed", 3, "dpmsolver", "bh2"),
    ("singlestep_fixed", 3, "taylor", "bh2"),
    ("unipc", 1, "dpmsolver", "bh1"),
    ("unipc", 1, "dpmsolver", "bh2"),
    ("unipc", 2, "dpmsolver", "bh1"),
    ("unipc", 2, "dpmsolver", "bh2"),
    ("unipc", 3, "dpmsolver", "bh1"),
    ("unipc", 3, "dpmsolver", "bh2"),
]
# Default run: the full cross on "time_uniform" (non-uniform in lambda, so the step ratios
# r differ from 1 and every r-dependent term is exercised), plus a covering subset on the
# other grids (singlestep's outer/inner-grid rules depend on the skip type).
SUBSET = {
    # logSNR is also the grid of every test_convergence_order run (compared with the
    # reference there); here only the short-run DPM-Solver-fast splits ending in order 1.
    "logSNR": {
        ("singlestep", 2, "dpmsolver", "bh2"),
        ("singlestep", 3, "taylor", "bh2"),
    },
    "time_quadratic": {
        ("singlestep", 2, "taylor", "bh2"),
        ("singlestep", 3, "dpmsolver", "bh2"),
        ("singlestep_fixed", 2, "dpmsolver", "bh2"),
        ("singlestep_fixed", 3, "taylor", "bh2"),
        ("multistep", 2, "taylor", "bh2"),
        ("unipc", 2, "dpmsolver", "bh2"),
    },
}


def _reference_cases():
    full = os.environ.get("DPMJAX_FULL_MATRIX") == "1"
    cases = []
    i = 0
    for skip in ("time_uniform", "logSNR", "time_quadratic"):
        for algorithm in ("dpmsolver++", "dpmsolver"):
            for cfg in CONFIGS:
                if not (full or skip == "time_uniform" or cfg in SUBSET[skip]):
                    continue
                method, order, solver_type, variant = cfg
                # few steps: lower_order_final is active (multistep: steps < 10) and the
                # DPM-Solver-fast order splits cycle through steps % 3 = 0, 1, 2.
                steps = 7 if method in ("multistep", "unipc") else (6, 7, 8)[i % 3]
                sched = SCHEDULES[i % 3]
                kw = dict(algorithm=algorithm, method=method, order=order, steps=steps, skip_type=skip,
                          solver_type=solver_type, variant=variant)
                ident = (f"{method}-o{order}-{variant if method == 'unipc' else solver_type}-{algorithm}-{skip}"
                         f"-{sched}-N{steps}")
                cases.append(pytest.param(sched, kw, id=ident))
                i += 1
    extra = [
        ("linear", dict(method="multistep", order=3, steps=7, lower_order_final=False, algorithm="dpmsolver++")),
        ("cosine", dict(method="unipc", order=3, steps=7, lower_order_final=False, algorithm="dpmsolver",
                        variant="bh1")),
        ("discrete", dict(method="multistep", order=2, steps=12, skip_type="logSNR", algorithm="dpmsolver++",
                          t_start=0.8, t_end=0.01)),
        ("linear", dict(method="singlestep", order=3, steps=8, skip_type="logSNR", algorithm="dpmsolver",
                        denoise_to_zero=True)),
        ("cosine", dict(method="multistep", order=2, steps=7, algorithm="dpmsolver++", thresholding=True)),
        ("linear", dict(method="unipc", order=2, steps=7, algorithm="dpmsolver++", thresholding=True,
                        thresholding_max_val=1.2, dynamic_thresholding_ratio=0.6)),
    ]
    for sched, kw in extra:
        cases.append(pytest.param(sched, kw, id="extra-" + "-".join(f"{k}={v}" for k, v in kw.items())))
    return cases


def _first_of_each_method_quick(cases):
    """The first case of each method stays in the quick tier; the others are marked slow."""
    seen = set()
    out = []
    for case in cases:
        method = case.values[1]["method"]
        out.append(case if method not in seen else pytest.param(*case.values, id=case.id, marks=pytest.mark.slow))
        seen.add(method)
    return out


@pytest.mark.parametrize("sched_name, kw", _first_of_each_method_quick(_reference_cases()))
def test_matches_reference(x64, sched_name, kw):
    """``dpmjax.sample`` == the independent numpy reference to 1e-9 (float64)."""
    sched, rsched = make_schedules(sched_name)
    x = lib_sample(sched, **kw)
    rkw = {k: v for k, v in kw.items() if k not in ("dynamic_thresholding_ratio", "thresholding_max_val")}
    if "dynamic_thresholding_ratio" in kw:
        rkw["ratio"] = kw["dynamic_thresholding_ratio"]
        rkw["max_val"] = kw["thresholding_max_val"]
    ref = R.Reference(EPS, rsched, **rkw)
    x_ref = ref.sample(X_T)
    assert x.dtype == np.float64
    assert_close(x, x_ref, 1e-9, str(kw))
    # the reference's own NFE bookkeeping: the documented cost of each method
    m, o, n = kw["method"], kw["order"], kw["steps"]
    nfe = n // o * o if m == "singlestep_fixed" else n
    assert ref.nfe == nfe + bool(kw.get("denoise_to_zero"))
    if kw.get("thresholding"):  # the case must actually clip, or it tests nothing
        plain = R.Reference(EPS, rsched, **{**rkw, "thresholding": False}).sample(X_T)
        assert np.max(np.abs(plain - x_ref)) > 1e-3


def test_unipc_disable_corrector_skips_that_steps_corrector(x64):
    """``disable_corrector=(i,)`` skips the corrector of step i (1-based), i.e. the one that
    corrects step i's prediction (docs/algorithms.md "UniPC": "No corrector on the last step" names the
    corrector by the step it corrects). Only that step changes: the result equals the
    reference with step i's corrector skipped, and differs from the default.
    """
    sched, rsched = make_schedules("cosine")
    kw = dict(method="unipc", order=3, steps=7, lower_order_final=False, algorithm="dpmsolver", variant="bh1")
    x = lib_sample(sched, disable_corrector=(2, 4), **kw)
    assert np.max(np.abs(x - ref_sample(rsched, **kw))) > 1e-3
    assert_close(x, ref_sample(rsched, disable_corrector=(2, 4), **kw), 1e-9, "disable_corrector=(2, 4)")


# --------------------------------------------------------------------------- 2. convergence

# (method, order, steps list, expected global order). See test_convergence_order.
SERIES = [
    ("multistep", 1, (16, 32, 64), 1),
    ("multistep", 2, (16, 32, 64), 2),
    ("multistep", 3, (24, 48, 96), 2),
    ("singlestep", 2, (16, 32, 64), 2),
    ("singlestep", 3, (95, 191, 383), 3),
    ("singlestep_fixed", 2, (16, 32, 64), 2),
    ("singlestep_fixed", 3, (96, 192, 384), 3),
    ("unipc", 1, (16, 32, 64), 2),
    ("unipc", 2, (16, 32, 64), 3),
    ("unipc", 3, (64, 128, 256), 4),
]


def _series_cases():
    # One library run per series (compilations are the budget): algorithm, schedule,
    # solver_type and variant rotate so that each appears across the series. The full
    # cross runs on the numpy reference (test_reference_convergence_full_cross), which the
    # library matches to 1e-9 at every point measured here.
    cases = []
    for j, (method, order, steps, expected) in enumerate(SERIES):
        algorithm = ("dpmsolver++", "dpmsolver")[j % 2]
        sched = SCHEDULES[j % 3]
        solver_type = ("dpmsolver", "taylor")[(j // 2) % 2]
        variant = ("bh2", "bh1")[j % 2]
        cases.append(pytest.param(method, order, steps, expected, algorithm, sched, solver_type, variant,
                                  id=f"{method}-o{order}-{algorithm}-{sched}"))
    return cases


def fitted_order(steps, errors):
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


@pytest.mark.slow
@pytest.mark.parametrize("method, order, steps, expected, algorithm, sched_name, solver_type, variant", _series_cases())
def test_convergence_order(x64, method, order, steps, expected, algorithm, sched_name, solver_type, variant):
    """Global error vs the exact ODE solution decays as ``steps^-p``; fitted ``p`` within 0.3.

    Grid logSNR, ``lower_order_final=False`` (a final order-1 step would cap the
    asymptotic order at 2). Every run is also compared with the numpy reference.
    One library run per (method, order); algorithm, schedule and solver_type/variant
    rotate (_series_cases); the full cross runs on the reference.

    What is measured, and why these step counts:

    * DPM-Solver order k: p = k. Singlestep order 3 uses steps = 2 mod 3 (the
      DPM-Solver-fast split then ends with an order-2 step, not an order-1 one), order 2
      even steps. For the data prediction the Gaussian's third-order error has a
      cancellation near 24-48 steps, so order 3 is measured beyond it (95..384 steps).
    * UniPC order k: p = k + 1 (the corrector raises the order). The order-1 warm-up
      step, with its corrector, has local error O(h^3) and would eventually cap UniPC-3
      at 3, but near t = T its constant carries alpha_T^2 ~ e^-10 and order 4 is what
      is seen up to 256 steps (and beyond, in the reference).
    * **Multistep order 3: p = 2.** This is easily attributed to the order-1 warm-up
      step. It is not the warm-up: with an *exact* warm-up the reference still converges
      at order 2 (``test_multistep3_formula_is_second_order``). The published multistep
      order-3 update (as in the authors' code) uses ``D2 = (D1_0 - D1_1)/(r0 + r1)``,
      which is ``h^2 m''/2``, with the coefficient ``phi_3`` that needs ``h^2 m''``:
      a local error of O(h^3). (Slope ~3 on time_uniform for 48..384 steps is a
      pre-asymptotic effect.)
    """
    sched, rsched = make_schedules(sched_name)
    errors = []
    for n in steps:
        kw = dict(algorithm=algorithm, method=method, order=order, steps=n, skip_type="logSNR",
                  lower_order_final=False, solver_type=solver_type, variant=variant)
        x = lib_sample(sched, **kw)
        assert_close(x, ref_sample(rsched, **kw), 1e-9, f"reference at steps={n}")
        exact = R.gaussian_ode_solution(X_T, rsched, rsched.T, rsched.t_eps, MEAN, STD)
        errors.append(np.sqrt(np.mean((x - exact) ** 2)))
    p = fitted_order(steps, errors)
    print(f"{method} order {order} {algorithm} {sched_name}: errors {errors} -> order {p:.2f}")
    assert abs(p - expected) < 0.3, (p, errors)


def test_reference_convergence_full_cross():
    """The numpy reference converges at the orders of test_convergence_order on the *full*
    cross schedule x algorithm x method x order x solver_type/variant (pure numpy, ~3 s CPU).

    The library runs a rotating subset of this cross (compilations are the budget), and
    it equals the reference to 1e-9 wherever both run (test_matches_reference and every
    point of test_convergence_order), so the orders carry over.
    """
    bad = []
    for sched_name in SCHEDULES:
        rsched = (R.Linear() if sched_name == "linear" else R.Cosine() if sched_name == "cosine"
                  else R.Discrete.named("linear"))
        exact = R.gaussian_ode_solution(X_T, rsched, rsched.T, rsched.t_eps, MEAN, STD)
        for method, order, steps, expected in SERIES:
            solver_types = (("dpmsolver", "taylor") if (method != "unipc" and order == 2) or method.startswith("single")
                            else ("dpmsolver",))
            for algorithm in ("dpmsolver++", "dpmsolver"):
                variants = ("bh1", "bh2") if method == "unipc" else ("bh2",)
                for solver_type, variant in [(st, v) for st in solver_types for v in variants]:
                    errors = [np.sqrt(np.mean((ref_sample(rsched, algorithm=algorithm, method=method, order=order,
                                                          steps=n, skip_type="logSNR", lower_order_final=False,
                                                          solver_type=solver_type, variant=variant) - exact) ** 2))
                              for n in steps]
                    p = fitted_order(steps, errors)
                    if abs(p - expected) >= 0.3:
                        bad.append((sched_name, method, order, algorithm, solver_type, variant, round(p, 2)))
    assert not bad, bad


def test_exact_solution_agrees_with_library(x64):
    """The test oracle: the numpy exact ODE map equals ``GaussianMixture.ode_solution``."""
    sched, rsched = make_schedules("cosine")
    ex = np.asarray(gaussian().ode_solution(jnp.asarray(X_T), sched, 0.9, 0.02))
    np.testing.assert_allclose(ex, R.gaussian_ode_solution(X_T, rsched, 0.9, 0.02, MEAN, STD), rtol=1e-12)


def test_multistep3_formula_is_second_order():
    """The multistep order-3 update (docs/algorithms.md "Multistep") converges at order 2 even from an exact warm-up.

    Pure numpy (no compilation). Replacing the first two (lower-order) steps by exact
    ODE states leaves the error unchanged, so the warm-up is not the cause; doubling
    ``D2`` (so that it estimates ``h^2 m''`` as ``phi_3`` requires, as the singlestep
    order-3 "taylor" formula's ``D2 = 2 (D1_1 - D1_0)/(r2 - r1)`` does) gives order >= 3.
    This documents a property of the specified algorithm (and the authors' code), which
    the library reproduces exactly (test_matches_reference).
    """
    rsched = R.Linear()
    steps = (24, 48, 96, 192)
    exact = R.gaussian_ode_solution(X_T, rsched, 1.0, 1e-3, MEAN, STD)

    def warm(x_T, t):
        return R.gaussian_ode_solution(x_T, rsched, 1.0, t, MEAN, STD)

    class DoubledD2(R.Reference):
        def multistep_3(self, x, t_hist, m_hist, t):
            # the specified update, minus one more phi_3 D2 term (D2 doubled)
            (t2, t1, t0), (m2, m1, m0) = t_hist[-3:], m_hist[-3:]
            h0 = self.lam(t0) - self.lam(t1)
            h1 = self.lam(t1) - self.lam(t2)
            h = self.lam(t) - self.lam(t0)
            r0, r1 = h0 / h, h1 / h
            D1_0, D1_1 = (m0 - m1) / r0, (m1 - m2) / r1
            x_orig = super().multistep_3(x, t_hist, m_hist, t)
            phi1 = self.phi1(h)
            if self.data:
                phi3 = (phi1 / h + 1.0) / h - 0.5
                return x_orig - self.sch.alpha(t) * phi3 * (D1_0 - D1_1) / (r0 + r1)
            phi3 = (phi1 / h - 1.0) / h - 0.5
            return x_orig - self.sch.sigma(t) * phi3 * (D1_0 - D1_1) / (r0 + r1)

    for algorithm in ("dpmsolver++", "dpmsolver"):
        kw = dict(algorithm=algorithm, method="multistep", order=3, skip_type="logSNR", lower_order_final=False)
        err = {}
        for name, cls, extra in [("spec", R.Reference, {}), ("spec+exact warm-up", R.Reference, {"exact_warmup": warm}),
                                 ("D2 doubled", DoubledD2, {})]:
            err[name] = [np.sqrt(np.mean((cls(EPS, rsched, steps=n, **kw, **extra).sample(X_T) - exact) ** 2))
                         for n in steps]
        assert abs(fitted_order(steps, err["spec"]) - 2) < 0.3
        assert abs(fitted_order(steps, err["spec+exact warm-up"]) - 2) < 0.3
        assert fitted_order(steps, err["D2 doubled"]) > 3.3
        assert err["D2 doubled"][-1] < 0.05 * err["spec"][-1]


@pytest.mark.slow
@pytest.mark.parametrize("order, algorithm, solver_type", [(1, "dpmsolver++", "dpmsolver"), (2, "dpmsolver", "taylor"),
                                                          (3, "dpmsolver++", "taylor"), (3, "dpmsolver", "dpmsolver")])
def test_local_error_order(x64, order, algorithm, solver_type):
    """One singlestep update of order k from an exact state has local error O(h^(k+1)).

    ``singlestep_fixed`` with ``steps = order`` is exactly one update; the interval is
    varied through ``t_end`` (traced: one compilation for all h).
    """
    sched, rsched = make_schedules("linear")
    s = 0.5
    x_s = R.gaussian_ode_solution(X_T, rsched, 1.0, s, MEAN, STD)
    hs = np.array([0.2, 0.1, 0.05, 0.025])
    errors = []
    for h in hs:
        t = rsched.inverse_lambda(rsched.lambda_(s) + h)
        x = lib_sample(sched, x_T=x_s, algorithm=algorithm, method="singlestep_fixed", order=order, steps=order,
                       skip_type="logSNR", t_start=s, t_end=t, solver_type=solver_type)
        errors.append(np.sqrt(np.mean((x - R.gaussian_ode_solution(x_s, rsched, s, t, MEAN, STD)) ** 2)))
    p = -fitted_order(hs, errors)
    assert abs(p - (order + 1)) < 0.3, (p, errors)


# --------------------------------------------------------------------------- 3. mixture

MIX_MEANS = np.array([[-2.0, 0.0, 1.0], [2.0, 1.0, 0.0], [0.0, -2.0, -1.0], [1.0, 2.0, -2.0]])
MIX_STD = 0.3
# (method, order) at NFE 10 and 20 with dpmsolver++ / logSNR (singlestep_fixed uses order 2
# so that NFE is exactly 10/20), and the bounds on the RMS error vs the converged solution.
# Measured (float64, 16 samples of a 4-component 3-d mixture, components 4 apart, std 0.3):
# multistep-3 2.7e-2/1.2e-2, singlestep-3 4.3e-2/2.2e-2, singlestep_fixed-2 1.3e-1/3.1e-2,
# UniPC-3 8.7e-2/1.4e-2. Bounds are ~2x those: a solver that loses an order of accuracy
# (e.g. DDIM: 1.7e-1/7.9e-2) or a broken warm-up fails, the solvers as specified pass.
MIX_CASES = {
    ("multistep", 3): (0.06, 0.025),
    ("singlestep", 3): (0.09, 0.045),
    ("singlestep_fixed", 2): (0.26, 0.062),
    ("unipc", 3): (0.17, 0.03),
}


@pytest.mark.slow
def test_mixture_accuracy_nfe_10_20(x64, record_property):
    """Errors at NFE 10/20 on a Gaussian mixture against a converged float64 solution.

    The converged solution is the numpy reference's UniPC-3 (global order 4) with 1000
    steps, checked against 2000 steps (self-consistent to < 1e-6, errors measured are
    > 1e-3). It is independent of the library code.
    """
    x_T = np.random.default_rng(1).standard_normal((16, 3))
    rsched = R.Linear()
    eps = R.mixture_eps(np.full(4, 0.25), MIX_MEANS, np.full_like(MIX_MEANS, MIX_STD))
    conv = {n: ref_sample(rsched, x_T=x_T, eps=eps, algorithm="dpmsolver++", method="unipc", order=3, steps=n,
                          skip_type="logSNR", lower_order_final=False) for n in (1000, 2000)}
    assert np.sqrt(np.mean((conv[1000] - conv[2000]) ** 2)) < 1e-6
    x_star = conv[2000]

    sched, _ = make_schedules("linear")
    gm = dpmjax.GaussianMixture.isotropic(jnp.asarray(MIX_MEANS), MIX_STD)
    mfn = _mixture_model_fn(sched)
    table = {}
    for (method, order), bounds in MIX_CASES.items():
        errs = []
        for nfe in (10, 20):
            x = lib_sample(sched, x_T=x_T, gm=gm, model_fn=mfn, algorithm="dpmsolver++", method=method, order=order,
                           steps=nfe, skip_type="logSNR")
            errs.append(float(np.sqrt(np.mean((x - x_star) ** 2))))
        table[f"{method}-{order}"] = errs
        print(f"mixture RMS error {method} order {order}: NFE10 {errs[0]:.3e}  NFE20 {errs[1]:.3e}")
        record_property(f"mixture_rms_{method}_{order}", errs)
        assert errs[0] < bounds[0] and errs[1] < bounds[1], (method, order, errs, bounds)
        assert errs[1] < errs[0], (method, order, errs)


_MIX_FN = {}


def _mixture_model_fn(sched):
    if id(sched) not in _MIX_FN:
        _MIX_FN[id(sched)] = dpmjax.GaussianMixture.isotropic(jnp.asarray(MIX_MEANS), MIX_STD).model_fn(sched)
    return _MIX_FN[id(sched)]


# --------------------------------------------------------------------------- 4. identities


def test_order1_is_ddim_for_both_algorithms(x64):
    """Order 1 is DDIM: ``x_t = alpha_t x0 + sigma_t eps`` with (x0, eps) predicted at x_s.

    DDIM is written here independently; "dpmsolver" and "dpmsolver++" coincide at order 1.
    """
    sched, rsched = make_schedules("linear")
    steps = 7
    ts = np.linspace(1.0, 1e-3, steps + 1)  # time_uniform, the default grid
    x = X_T.copy()
    for s, t in zip(ts[:-1], ts[1:]):
        a_s, s_s, a_t, s_t = rsched.alpha(s), rsched.sigma(s), rsched.alpha(t), rsched.sigma(t)
        e = EPS(x, a_s, s_s)
        x = a_t * (x - s_s * e) / a_s + s_t * e
    out = {alg: lib_sample(sched, algorithm=alg, method="multistep", order=1, steps=steps)
           for alg in ("dpmsolver++", "dpmsolver")}
    for alg, v in out.items():
        assert_close(v, x, 1e-9, f"DDIM vs {alg}")
    np.testing.assert_allclose(out["dpmsolver"], out["dpmsolver++"], rtol=0, atol=1e-12)


def _converted_net(kind, sched):
    """A network of ``kind`` built from the exact eps (so every kind is exact)."""

    def net(params, x, t_model):
        t = sched.solver_time(t_model)
        alpha, sigma = sched.alpha(t), sched.sigma(t)
        e = params.eps(x, alpha, sigma)
        a, s = alpha[:, None], sigma[:, None]
        x0 = (x - s * e) / a
        if kind == "noise":
            return e
        if kind == "x_start":
            return x0
        if kind == "v":
            return a * e - s * x0
        return -e / s  # score

    return net


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
def test_model_types_agree(x64, algorithm):
    """"noise", "x_start", "v" and "score" networks that encode the same eps give the same samples."""
    sched, rsched = make_schedules("discrete")
    kw = dict(algorithm=algorithm, method="multistep", order=2, steps=6, skip_type="logSNR")
    base = lib_sample(sched, model_fn=_converted_net("noise", sched), model_type="noise", **kw)
    assert_close(base, ref_sample(rsched, **kw), 1e-9, "noise")
    for kind in ("x_start", "v", "score"):
        x = lib_sample(sched, model_fn=_converted_net(kind, sched), model_type=kind, **kw)
        assert_close(x, base, 1e-10, kind)


# conditional Gaussian: mean MEAN + c, so guidance has a closed form
def _cond_eps(x, t_model, c, sched):
    t = sched.solver_time(t_model)
    a, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    # in x's dtype: the module-level float64 constants are shared by float32 and float64 tests
    return s * (x - a * (jnp.asarray(MEAN, x.dtype) + c)) / (a**2 * jnp.asarray(STD, x.dtype) ** 2 + s**2)


_CALLS = []


def _record_batch(b):
    _CALLS.append(int(b))


def _cond_model(sched):
    def model(params, x, t_model, c):
        jax.debug.callback(_record_batch, x.shape[0])  # runtime: one record per executed call
        return _cond_eps(x, t_model, c, sched) * params

    return model


_COND = {}


def cond_setup():
    """(schedule, conditional model, condition, unconditional condition), cached per x64 state."""
    key = bool(jax.config.jax_enable_x64)
    if key not in _COND:
        sched, _ = make_schedules("linear")
        c = jnp.asarray(np.random.default_rng(2).normal(size=(B, D)))
        _COND[key] = (sched, _cond_model(sched), c, jnp.zeros((B, D)))
    return _COND[key]


GKW = dict(method="multistep", order=2, steps=5, skip_type="logSNR")


def _cond_sample(model, sched, params=1.0, noise=X_T, **kw):
    return np.asarray(dpmjax.sample(model, jnp.asarray(params), None, (B, D), schedule=sched,
                                    noise=jnp.asarray(noise), **GKW, **kw))


def test_cfg_scale_one_is_conditional_and_calls_batch_b(x64):
    """Guidance scale 1 equals the conditional model, and executes the model on batch B only."""
    sched, model, c, u = cond_setup()
    _CALLS.clear()
    guided = _cond_sample(model, sched, condition=c, unconditional_condition=u, guidance_scale=1.0)
    jax.effects_barrier()
    calls_guided = list(_CALLS)
    _CALLS.clear()
    plain = _cond_sample(model, sched, condition=c)
    jax.effects_barrier()
    np.testing.assert_allclose(guided, plain, rtol=0, atol=1e-12)
    assert calls_guided == [B] * GKW["steps"], calls_guided  # NFE = steps, batch B each
    assert _CALLS == [B] * GKW["steps"]
    _CALLS.clear()
    _cond_sample(model, sched, condition=c, unconditional_condition=u, guidance_scale=3.0)
    jax.effects_barrier()
    assert _CALLS == [2 * B] * GKW["steps"], _CALLS  # one batched call on [uncond, cond]


def test_cfg_equals_manual_combination(x64):
    """CFG at scale s == a model returning ``eps_u + s (eps_c - eps_u)``."""
    sched, model, c, u = cond_setup()
    s = 3.5
    guided = _cond_sample(model, sched, condition=c, unconditional_condition=u, guidance_scale=s)

    def manual(params, x, t_model, cond):
        e_u, e_c = _cond_eps(x, t_model, u, sched), _cond_eps(x, t_model, cond, sched)
        return params * (e_u + s * (e_c - e_u))

    np.testing.assert_allclose(guided, _cond_sample(manual, sched, condition=c), rtol=0, atol=1e-10)
    assert np.max(np.abs(guided - _cond_sample(model, sched, condition=c))) > 1e-2  # guidance did something


def test_classifier_guidance_equals_modified_eps(x64):
    """Classifier guidance == a model returning ``eps - s sigma_t grad_x log p(c | x_t)``."""
    sched, model, c, _ = cond_setup()
    s, w = 2.0, 0.7

    def classifier(x, t_model, cond):
        return -0.5 * w * jnp.sum((x - cond) ** 2, axis=-1)  # per-sample log-probabilities

    def base(params, x, t_model, cond=None):  # the classifier gets the condition, the model ignores it
        return _cond_eps(x, t_model, jnp.zeros_like(x), sched) * params

    def manual(params, x, t_model):
        sigma = sched.sigma(sched.solver_time(t_model))[:, None]
        grad = -w * (x - c)
        return base(params, x, t_model) - s * sigma * grad

    for algorithm in ("dpmsolver++", "dpmsolver"):
        guided = np.asarray(dpmjax.sample(base, jnp.asarray(1.0), None, (B, D), schedule=sched, noise=jnp.asarray(X_T),
                                          algorithm=algorithm, condition=c, classifier_fn=classifier,
                                          guidance_scale=s, **GKW))
        want = np.asarray(dpmjax.sample(manual, jnp.asarray(1.0), None, (B, D), schedule=sched,
                                        noise=jnp.asarray(X_T), algorithm=algorithm, **GKW))
        np.testing.assert_allclose(guided, want, rtol=0, atol=1e-10)


def test_dynamic_threshold_uses_fraction():
    """``dynamic_threshold(x0, 0.995)``: ``q = max(quantile(|x0|, 0.995), 1)``, clip to q, divide.

    Per-sample values 0..10: the right q is ~9.95. Misusing percentile units
    (``percentile(|x0|, 0.995)`` ~ 0.1, so q = max_val = 1) would clip everything above 1.
    """
    x = np.stack([np.linspace(-10.0, 10.0, 801), np.linspace(-0.5, 0.5, 801)]).reshape(2, 1, 801)
    got = np.asarray(dpmjax.dynamic_threshold(jnp.asarray(x), 0.995, 1.0))
    q = np.maximum(np.quantile(np.abs(x).reshape(2, -1), 0.995, axis=1), 1.0).reshape(2, 1, 1)
    want = np.clip(x, -q, q) / q
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert abs(q[0, 0, 0] - 9.95) < 0.01 and q[1, 0, 0] == 1.0
    wrong_q = np.maximum(np.percentile(np.abs(x[0]), 0.995), 1.0)
    assert np.max(np.abs(got[0] - np.clip(x[0], -wrong_q, wrong_q) / wrong_q)) > 0.5


def test_denoise_to_zero_returns_data_prediction_with_one_more_nfe(x64):
    sched, rsched = make_schedules("linear")
    gm = gaussian()
    calls = []

    def counting(params, x, t_model):
        jax.debug.callback(lambda: calls.append(1))
        return params.eps(x, sched.alpha(sched.solver_time(t_model)), sched.sigma(sched.solver_time(t_model)))

    kw = dict(algorithm="dpmsolver", method="singlestep", order=3, steps=8, skip_type="logSNR", model_fn=counting)
    x = lib_sample(sched, gm=gm, **kw)
    jax.effects_barrier()
    n_plain, calls[:] = len(calls), []
    x0 = lib_sample(sched, gm=gm, denoise_to_zero=True, **kw)
    jax.effects_barrier()
    assert (n_plain, len(calls)) == (8, 9)
    t0 = rsched.t_eps
    a, s = rsched.alpha(t0), rsched.sigma(t0)
    np.testing.assert_allclose(x0, (x - s * EPS(x, a, s)) / a, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- 5. transformations


def test_user_jit_matches_eager_call(x64):
    sched, _ = make_schedules("cosine")
    mfn = model_fn_for(sched)
    kw = dict(schedule=sched, method="unipc", order=2, steps=6)
    f = jax.jit(lambda params, noise: dpmjax.sample(mfn, params, None, (B, D), noise=noise, **kw))
    gm = gaussian()
    np.testing.assert_allclose(np.asarray(f(gm, jnp.asarray(X_T))), lib_sample(sched, **kw_no_schedule(kw)),
                               rtol=0, atol=1e-12)


def kw_no_schedule(kw):
    return {k: v for k, v in kw.items() if k != "schedule"}


def test_no_recompilation_for_new_values():
    """A second call with new key / noise / params / guidance scale / condition values compiles nothing."""
    sched, model, c, u = cond_setup()  # float32 (default) here
    kw = dict(schedule=sched, condition=c, unconditional_condition=u, **GKW)
    noise2 = jnp.asarray(np.random.default_rng(5).normal(size=(B, D)), jnp.float32)
    c2, u2 = c + 1.0, u - 0.5
    p1, p2, s1, s2 = jnp.asarray(1.0), jnp.asarray(0.9), jnp.asarray(2.0), jnp.asarray(4.0)
    k1, k2 = jax.random.key(0), jax.random.key(1)
    jax.block_until_ready(dpmjax.sample(model, p1, None, (B, D), noise=jnp.asarray(X_T, jnp.float32),
                                        guidance_scale=s1, **kw))
    jax.block_until_ready(dpmjax.sample(model, p1, k1, (B, D), guidance_scale=s1, **kw))
    msgs = compiled_during(lambda: [
        dpmjax.sample(model, p2, None, (B, D), noise=noise2, guidance_scale=s2, **kw),
        dpmjax.sample(model, p2, None, (B, D), noise=noise2, guidance_scale=s1,
                      **{**kw, "condition": c2, "unconditional_condition": u2}),
        dpmjax.sample(model, p1, k2, (B, D), guidance_scale=s2, **kw),
    ])
    assert msgs == [], msgs
    # and the counter does see compilations
    assert compiled_during(lambda: dpmjax.sample(model, p1, k2, (B, D), guidance_scale=s2, **{**kw, "steps": 4}))


def test_vmap_over_keys_and_guidance_scale():
    sched, model, c, u = cond_setup()
    kw = dict(schedule=sched, condition=c, unconditional_condition=u, **GKW)
    keys = jax.random.split(jax.random.key(3), 3)
    batched = jax.vmap(lambda k: dpmjax.sample(model, jnp.asarray(1.0), k, (B, D), guidance_scale=jnp.asarray(2.0),
                                               **kw))(keys)
    for i in range(3):
        one = dpmjax.sample(model, jnp.asarray(1.0), keys[i], (B, D), guidance_scale=jnp.asarray(2.0), **kw)
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(one), rtol=1e-5, atol=1e-5)
    scales = jnp.asarray([1.0, 2.0, 5.0])
    noise = jnp.asarray(X_T, jnp.float32)
    batched = jax.vmap(lambda s: dpmjax.sample(model, jnp.asarray(1.0), None, (B, D), noise=noise, guidance_scale=s,
                                               **kw))(scales)
    for i in range(3):
        one = dpmjax.sample(model, jnp.asarray(1.0), None, (B, D), noise=noise, guidance_scale=scales[i], **kw)
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(one), rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(np.asarray(batched[0] - batched[2]))) > 1e-2


def test_grad_matches_finite_differences(x64):
    """``jax.grad`` w.r.t. the data means (params) and the starting noise == central differences."""
    sched, _ = make_schedules("linear")
    mfn = model_fn_for(sched)
    weights = jnp.asarray(np.random.default_rng(4).normal(size=(B, D)))
    kw = dict(schedule=sched, method="multistep", order=2, steps=6, skip_type="logSNR")

    def loss(gm, noise):
        return jnp.sum(weights * dpmjax.sample(mfn, gm, None, (B, D), noise=noise, **kw))

    gm, noise = gaussian(), jnp.asarray(X_T)
    g_gm, g_noise = jax.grad(loss, argnums=(0, 1))(gm, noise)
    f = jax.jit(loss)
    h = 1e-6
    for j in range(D):
        e = np.zeros((1, D))
        e[0, j] = h
        up = dataclass_replace(gm, means=gm.means + e)
        dn = dataclass_replace(gm, means=gm.means - e)
        fd = (float(f(up, noise)) - float(f(dn, noise))) / (2 * h)
        assert abs(fd - float(g_gm.means[0, j])) < 1e-6 * max(1.0, abs(fd)), (j, fd, g_gm.means)
    for (i, j) in [(0, 0), (3, 2), (7, 3)]:
        e = np.zeros((B, D))
        e[i, j] = h
        fd = (float(f(gm, noise + e)) - float(f(gm, noise - e))) / (2 * h)
        assert abs(fd - float(g_noise[i, j])) < 1e-6 * max(1.0, abs(fd)), (i, j, fd, g_noise[i, j])


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)
