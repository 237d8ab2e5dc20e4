"""Fast unit tests (no sampler compilation) of the parameterisation maps and the order plans.

* ``to_noise``/``to_data``: from ``x = alpha x0 + sigma eps`` each model type's output is
  written from its definition (noise ``eps``, x_start/edm ``x0``, ``v = alpha eps - sigma
  x0``, score ``-eps / sigma``, flow ``eps - x0`` with ``alpha = 1 - sigma``); both maps
  must return ``eps`` and ``x0``.
* ``dynamic_threshold``: hand-computed quantiles.
* order plans: the rules stated in the DPM-Solver and UniPC papers/reference code
  (DPM-Solver-fast's mixtures, warm-up, ``lower_order_final`` with DPM-Solver's
  ``steps < 10`` gate and UniPC's without it), written out as tables.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax import timesteps as ts

RNG = np.random.default_rng(3)
X0 = RNG.standard_normal((3, 2, 2))
EPS = RNG.standard_normal((3, 2, 2))
ALPHA = np.array([0.9, 0.5, 0.1])
SIGMA = np.sqrt(1 - ALPHA**2)
FLOW_SIGMA = np.array([0.2, 0.5, 0.9])


def _outputs(alpha, sigma):
    a, s = alpha[:, None, None], sigma[:, None, None]
    return {
        "noise": EPS,
        "x_start": X0,
        "edm": X0,
        "v": a * EPS - s * X0,
        "score": -EPS / s,
        "flow": EPS - X0,
    }


@pytest.mark.parametrize("model_type", dpmjax.MODEL_TYPES)
@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "scalar"])
def test_parameterisations_recover_eps_and_x0(model_type, per_sample):
    alpha, sigma = (1 - FLOW_SIGMA, FLOW_SIGMA) if model_type == "flow" else (ALPHA, SIGMA)
    if not per_sample:
        alpha, sigma = np.full(3, alpha[1]), np.full(3, sigma[1])
    x = alpha[:, None, None] * X0 + sigma[:, None, None] * EPS
    out = _outputs(alpha, sigma)[model_type]
    a, s = (alpha, sigma) if per_sample else (alpha[1], sigma[1])  # scalar coefficients broadcast too
    eps = dpmjax.to_noise(jnp.asarray(out), jnp.asarray(x), a, s, model_type)
    x0 = dpmjax.to_data(jnp.asarray(out), jnp.asarray(x), a, s, model_type)
    chex.assert_shape((eps, x0), X0.shape)
    np.testing.assert_allclose(np.asarray(eps), EPS, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(x0), X0, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("fn", [dpmjax.to_noise, dpmjax.to_data])
def test_unknown_model_type_is_named(fn):
    assert dpmjax.MODEL_TYPES == ("noise", "x_start", "v", "score", "edm", "flow")
    with pytest.raises(ValueError, match=r"^model_type must be one of .*'flow'.*got 'epsilon'$"):
        fn(jnp.zeros((1, 2)), jnp.zeros((1, 2)), 0.5, 0.5, "epsilon")


def test_dynamic_threshold_by_hand():
    x0 = jnp.asarray([[0.5, -3.0, 1.0, 2.0], [0.1, -0.2, 0.3, 0.4]])
    # row 0: |x| sorted 0.5, 1, 2, 3; quantile 0.5 -> 1.5 (linear interpolation) -> q = 1.5
    # row 1: quantile 0.5 = 0.25 < max_val = 1 -> q = 1: unchanged
    got = np.asarray(dpmjax.dynamic_threshold(x0, ratio=0.5, max_val=1.0))
    want = np.array([[0.5 / 1.5, -1.0, 1.0 / 1.5, 1.0], [0.1, -0.2, 0.3, 0.4]])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # the defaults are DPM-Solver++'s: ratio 0.995, max_val 1
    row = jnp.asarray([[0.0, 1.0, 2.0, 3.0]])  # quantile 0.995 = 2 + 0.985 = 2.985
    np.testing.assert_allclose(np.asarray(dpmjax.dynamic_threshold(row)),
                               np.array([[0.0, 1.0, 2.0, 2.985]]) / 2.985, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dpmjax.dynamic_threshold(x0[1:])), np.asarray(x0[1:]), rtol=1e-6)
    # max_val above every quantile: only division by max_val
    np.testing.assert_allclose(np.asarray(dpmjax.dynamic_threshold(x0, 0.5, 4.0)), np.asarray(x0) / 4.0, rtol=1e-6)


# (order, steps) -> outer orders of DPM-Solver-fast (sum = steps)
SINGLESTEP = {
    (1, 4): (1, 1, 1, 1),
    (2, 5): (2, 2, 1),
    (2, 6): (2, 2, 2),
    (3, 5): (3, 2),
    (3, 6): (3, 2, 1),
    (3, 7): (3, 3, 1),
    (3, 8): (3, 3, 2),
    (3, 9): (3, 3, 2, 1),
    (3, 10): (3, 3, 3, 1),
}


@pytest.mark.parametrize("order, steps", sorted(SINGLESTEP))
def test_singlestep_orders(order, steps):
    assert ts.singlestep_orders(order, steps) == SINGLESTEP[(order, steps)]


MULTISTEP = {
    # (order, steps, lower_order_final) -> orders
    (1, 4, True): (1, 1, 1, 1),
    (2, 4, True): (1, 2, 2, 1),
    (2, 4, False): (1, 2, 2, 2),
    (3, 5, True): (1, 2, 3, 2, 1),
    (3, 5, False): (1, 2, 3, 3, 3),
    (3, 9, True): (1, 2, 3, 3, 3, 3, 3, 2, 1),
    # DPM-Solver lowers the final orders only for steps < 10
    (3, 10, True): (1, 2, 3, 3, 3, 3, 3, 3, 3, 3),
    (2, 12, True): (1,) + (2,) * 11,
}


@pytest.mark.parametrize("order, steps, lof", sorted(MULTISTEP))
def test_multistep_orders(order, steps, lof):
    assert ts.multistep_orders(order, steps, lof) == MULTISTEP[(order, steps, lof)]


UNIPC = {
    (2, 4, True): (1, 2, 2, 1),
    (3, 5, True): (1, 2, 3, 2, 1),
    (3, 5, False): (1, 2, 3, 3, 3),
    # no steps < 10 gate for UniPC
    (3, 10, True): (1, 2, 3, 3, 3, 3, 3, 3, 2, 1),
    (2, 12, True): (1,) + (2,) * 10 + (1,),
}


@pytest.mark.parametrize("order, steps, lof", sorted(UNIPC))
def test_unipc_orders(order, steps, lof):
    assert ts.multistep_orders(order, steps, lof, final_below=None) == UNIPC[(order, steps, lof)]


@pytest.mark.slow
def test_time_grids_closed_forms():
    """Each skip type's closed form on VPLinear (float32, to rounding)."""
    s = dpmjax.VPLinear()
    a, b, n = 0.8, 0.01, 4
    u = np.linspace(0, 1, n + 1)
    np.testing.assert_allclose(np.asarray(ts.time_grid(s, "time_uniform", a, b, n)), a + u * (b - a), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ts.time_grid(s, "time_quadratic", a, b, n)),
                               (np.sqrt(a) + u * (np.sqrt(b) - np.sqrt(a))) ** 2, rtol=1e-6)
    lam = lambda t: float(s.lambda_(t))  # noqa: E731
    got = np.asarray(ts.time_grid(s, "logSNR", a, b, n))
    np.testing.assert_allclose([lam(t) for t in got], lam(a) + u * (lam(b) - lam(a)), rtol=1e-5, atol=1e-5)
    rho = 7.0  # Karras et al. (2022), Eq. 5
    np.testing.assert_allclose(np.asarray(ts.time_grid(s, "edm", a, b, n)),
                               (a ** (1 / rho) + u * (b ** (1 / rho) - a ** (1 / rho))) ** rho, rtol=1e-5)
    sig = lambda t: np.exp(-lam(t))  # noqa: E731 - VE noise level sigma/alpha
    got = np.asarray(ts.time_grid(s, "karras", a, b, n))
    want = (sig(a) ** (1 / rho) + u * (sig(b) ** (1 / rho) - sig(a) ** (1 / rho))) ** rho
    np.testing.assert_allclose([sig(t) for t in got], want, rtol=1e-4)
    # vectorised over several intervals, end points exact
    g = np.asarray(ts.time_grid(s, "logSNR", np.array([0.9, 0.5]), np.array([0.5, 0.1]), 3))
    chex.assert_shape(g, (2, 4))
    np.testing.assert_array_equal(g[:, 0], np.float32([0.9, 0.5]))
    np.testing.assert_array_equal(g[:, -1], np.float32([0.5, 0.1]))
