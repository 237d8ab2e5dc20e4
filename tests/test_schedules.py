"""Noise schedules: closed forms, inverses, float32 accuracy, discrete tables, diffusers import, jit."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax


def _schedules():
    return {
        "linear": dpmjax.VPLinear(),
        "cosine": dpmjax.VPCosine(),
        "discrete-linear": dpmjax.VPDiscrete.from_named("linear", 1000),
        "discrete-cos": dpmjax.VPDiscrete.from_named("squaredcos_cap_v2", 1000),
    }


def _np_log_alphas(betas):
    return 0.5 * np.cumsum(np.log1p(-np.asarray(betas, np.float64)))


def _named_betas(name, n):
    if name == "linear":
        return np.linspace(1e-4, 0.02, n)
    if name == "scaled_linear":
        return np.linspace(0.00085**0.5, 0.012**0.5, n) ** 2
    i = np.arange(n)
    abar = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    return np.minimum(1.0 - abar((i + 1) / n) / abar(i / n), 0.999)


@pytest.mark.parametrize("name", ["linear", "cosine", "discrete-linear", "discrete-cos"])
def test_inverse_lambda_inverts_lambda(x64, name):
    sched = _schedules()[name]
    t = np.concatenate([np.geomspace(sched.t_eps, 0.1, 20), np.linspace(0.1, sched.T, 30)[1:]])
    lam = sched.lambda_(jnp.asarray(t))
    assert np.all(np.diff(np.asarray(lam)) < 0), "lambda must decrease strictly"
    np.testing.assert_allclose(np.asarray(sched.inverse_lambda(lam)), t, rtol=1e-9, atol=1e-12)
    # VP: alpha^2 + sigma^2 = 1 and lambda = log(alpha / sigma)
    a, s = np.asarray(sched.alpha(jnp.asarray(t))), np.asarray(sched.sigma(jnp.asarray(t)))
    np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(lam), np.log(a / s), rtol=1e-10, atol=1e-10)


def test_closed_forms(x64):
    t = np.linspace(1e-3, 1.0, 7)
    lin = dpmjax.VPLinear()
    np.testing.assert_allclose(np.asarray(lin.log_alpha(t)), -0.25 * t**2 * 19.9 - 0.05 * t, rtol=1e-13)
    cos = dpmjax.VPCosine()
    tc = t * 0.99
    want = np.log(np.cos((tc + 0.008) / 1.008 * np.pi / 2)) - np.log(np.cos(0.008 / 1.008 * np.pi / 2))
    np.testing.assert_allclose(np.asarray(cos.log_alpha(tc)), want, rtol=1e-12)
    assert (lin.T, lin.t_eps, cos.T, cos.t_eps) == (1.0, 1e-3, 0.9946, 1e-3)
    # discrete: the knots reproduce the table, linear in between, linear extrapolation
    d = dpmjax.VPDiscrete.from_named("linear", 1000)
    la = _np_log_alphas(_named_betas("linear", 1000))
    k = np.array([0, 1, 499, 998, 999])
    np.testing.assert_allclose(np.asarray(d.log_alpha((k + 1) / 1000)), la[k], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(d.log_alpha(0.0105)), 0.5 * (la[9] + la[10]), rtol=1e-12)
    slope = (la[1] - la[0]) * 1000
    np.testing.assert_allclose(np.asarray(d.log_alpha(0.0005)), la[0] - 0.0005 * slope, rtol=1e-12)


@pytest.mark.parametrize("t", [1e-3, 1e-4, 1e-5, 1e-6])
def test_float32_accuracy_near_zero(t):
    """float32 sigma/lambda agree with float64 near t = 0 (log-space formula).

    The naive float32 ``0.5 log(1 - exp(2 log_alpha))`` is shown to be far off at the same
    points, so the comparison can fail.
    """
    lin = dpmjax.VPLinear()
    lam32 = float(lin.lambda_(jnp.float32(t)))
    sig32 = float(lin.sigma(jnp.float32(t)))
    assert jnp.result_type(lin.lambda_(jnp.float32(t))) == jnp.float32
    with jax.enable_x64(True):
        lam64 = float(lin.lambda_(jnp.float64(t)))
        sig64 = float(lin.sigma(jnp.float64(t)))
    la32 = np.float32(-0.25 * t**2 * 19.9 - 0.05 * t)
    naive = float(la32 - np.float32(0.5) * np.log(np.float32(1) - np.exp(np.float32(2) * la32)))
    assert abs(lam32 - lam64) < 2e-6 * abs(lam64), (lam32, lam64)
    assert abs(sig32 - sig64) < 2e-6 * sig64, (sig32, sig64)
    assert abs(naive - lam64) > 1e-5, "the naive formula should lose accuracy here"


def test_from_betas_equals_from_alphas_cumprod(x64):
    betas = _named_betas("scaled_linear", 1000)
    a = dpmjax.VPDiscrete.from_betas(betas)
    b = dpmjax.VPDiscrete.from_alphas_cumprod(np.cumprod(1.0 - betas))
    assert a.N == b.N
    np.testing.assert_allclose(np.asarray(a.log_alphas), np.asarray(b.log_alphas), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(a.t_knots), np.asarray(b.t_knots), rtol=0)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_from_named_tables(x64, name):
    full = dpmjax.VPDiscrete.from_named(name, 1000, lambda_min=None)
    la = _np_log_alphas(_named_betas(name, 1000))
    assert full.N == 1000
    np.testing.assert_allclose(np.asarray(full.log_alphas), la, rtol=1e-12, atol=1e-14)


def test_lambda_min_truncation(x64):
    """squaredcos_cap_v2 at 1000: trailing entries with lambda < -5.1 are dropped, N and t_eps follow."""
    la = _np_log_alphas(_named_betas("squaredcos_cap_v2", 1000))
    lam = la - 0.5 * np.log(-np.expm1(2 * la))
    keep = int(np.sum(lam >= -5.1))
    assert keep < 1000 and np.all(lam[:keep] >= -5.1) and np.all(lam[keep:] < -5.1)
    s = dpmjax.VPDiscrete.from_named("squaredcos_cap_v2", 1000)
    assert s.N == keep
    assert s.t_eps == pytest.approx(1.0 / keep) and s.T == 1.0
    np.testing.assert_allclose(np.asarray(s.log_alphas), la[:keep], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(s.t_knots), (np.arange(keep) + 1.0) / keep, rtol=1e-14)
    # the linear table never reaches -5.1 at 1000 steps: nothing dropped
    assert dpmjax.VPDiscrete.from_named("linear", 1000).N == 1000


@pytest.mark.parametrize("name, n", [("linear", 1000), ("squaredcos_cap_v2", 1000), ("linear", 50)])
def test_model_time_round_trip(x64, name, n):
    s = dpmjax.VPDiscrete.from_named(name, n)
    N = s.N
    assert float(s.model_time(1.0 / N)) == pytest.approx(0.0, abs=1e-12)
    assert float(s.model_time(1.0)) == pytest.approx(N - 1, abs=1e-9)
    t = jnp.linspace(1.0 / N, 1.0, 17)
    np.testing.assert_allclose(np.asarray(s.solver_time(s.model_time(t))), np.asarray(t), rtol=1e-13)
    idx = jnp.arange(N, dtype=jnp.float64)
    np.testing.assert_allclose(np.asarray(s.model_time(s.solver_time(idx))), np.asarray(idx), atol=1e-9)
    lin = dpmjax.VPLinear()
    assert float(lin.model_time(0.3)) == 0.3 and float(lin.solver_time(0.3)) == 0.3


def test_from_diffusers_config_dict_and_file(x64, tmp_path):
    cfg = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
           "beta_end": 0.012, "prediction_type": "v_prediction"}
    s, model_type = dpmjax.VPDiscrete.from_diffusers_config(cfg)
    assert model_type == "v"
    want = dpmjax.VPDiscrete.from_named("scaled_linear", 1000)
    # diffusers builds its table in float32 (log alpha ~ 1e-3 there: ~1e-5 relative); so does the import
    np.testing.assert_allclose(np.asarray(s.log_alphas), np.asarray(want.log_alphas), rtol=1e-4)
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**cfg, "prediction_type": "sample"}))
    s2, mt2 = dpmjax.VPDiscrete.from_diffusers_config(str(path))
    assert mt2 == "x_start" and s2.N == s.N
    np.testing.assert_allclose(np.asarray(s2.log_alphas), np.asarray(s.log_alphas), rtol=1e-12)
    s3, mt3 = dpmjax.VPDiscrete.from_diffusers_config(path)  # PathLike too; default prediction type
    path.write_text(json.dumps({"beta_schedule": "linear"}))
    s3, mt3 = dpmjax.VPDiscrete.from_diffusers_config(path)
    assert mt3 == "noise" and s3.N == 1000
    np.testing.assert_allclose(np.asarray(s3.log_alphas), _np_log_alphas(_named_betas("linear", 1000)), rtol=1e-3)
    # trained_betas win over beta_schedule
    betas = np.linspace(2e-4, 0.03, 300)
    s4, mt4 = dpmjax.VPDiscrete.from_diffusers_config(
        {"trained_betas": betas.tolist(), "beta_schedule": "linear", "prediction_type": "epsilon"})
    assert mt4 == "noise" and s4.N == 300
    np.testing.assert_allclose(np.asarray(s4.log_alphas), _np_log_alphas(betas), rtol=1e-3)
    with pytest.raises(ValueError, match="prediction_type"):
        dpmjax.VPDiscrete.from_diffusers_config({"prediction_type": "flow"})


def test_schedules_pass_through_jit_as_arguments():
    """Schedules are pytree arguments: a discrete schedule with other table values reuses the
    compiled function and gives its own values (the tables are leaves, not constants)."""
    traces = []

    @jax.jit
    def f(sched, t):
        traces.append(1)
        return sched.lambda_(t), sched.inverse_lambda(sched.lambda_(t))

    t = jnp.asarray([0.01, 0.5, 0.9])
    for sched in (dpmjax.VPLinear(), dpmjax.VPCosine()):
        lam, back = f(sched, t)
        np.testing.assert_allclose(np.asarray(lam), np.asarray(sched.lambda_(t)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(back), np.asarray(t), rtol=1e-4)
    d1 = dpmjax.VPDiscrete.from_named("linear", 1000)
    d2 = dpmjax.VPDiscrete.from_named("linear", 1000, beta_start=2e-4, beta_end=0.015)
    n = len(traces)
    l1, _ = f(d1, t)
    l2, _ = f(d2, t)
    assert len(traces) == n + 1, "a second discrete schedule with the same N must not retrace"
    np.testing.assert_allclose(np.asarray(l1), np.asarray(d1.lambda_(t)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(l2), np.asarray(d2.lambda_(t)), rtol=1e-5)
    assert np.max(np.abs(np.asarray(l1 - l2))) > 1e-2
    leaves = jax.tree_util.tree_leaves(d1)
    assert len(leaves) == 2 and all(leaf.shape == (1000,) for leaf in leaves)
