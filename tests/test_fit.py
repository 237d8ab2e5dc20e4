"""dpmjax.fit_timesteps: grids fitted to the model (dynamic programming + gradient refinement)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.fit import _dynamic_program

SCHED = dpmjax.VPLinear()


# One sharp Gaussian: exact noise predictor and exact probability-flow ODE solution (built
# on first use, kept for the process: nothing is computed with JAX at collection).
@functools.cache
def _gm():
    return dpmjax.GaussianMixture.gaussian(jnp.array([0.5, -1.0]), 0.1)


@functools.cache
def _model():
    return _gm().model_fn(SCHED)


STEPS = 4


def _rms(a, b):
    return float(jnp.sqrt(jnp.mean((a - b) ** 2)))


def test_dynamic_program_finds_the_cheapest_path():
    # 4 candidates, 2 edges, order 1: costs c[i, j]; best path 0 -> 1 -> 3 (1 + 1 = 2).
    inf = np.inf
    c = np.array([[inf, 1.0, 5.0, 9.0], [inf, inf, 4.0, 1.0], [inf, inf, inf, 0.5], [inf] * 4])
    path, cost = _dynamic_program({1: c}, (1, 1), 4)
    assert path == [0, 1, 3] and cost == pytest.approx(2.0)
    # three edges must visit 1 and 2: 1 + 4 + 0.5
    path, cost = _dynamic_program({1: c}, (1, 1, 1), 4)
    assert path == [0, 1, 2, 3] and cost == pytest.approx(5.5)


def test_dynamic_program_order2_uses_history():
    # Order-2 cost depends on (k, i, j): make the path through 2 expensive only when coming from 1.
    n1 = 4
    c1 = np.full((n1, n1), np.inf)
    c1[0, 1], c1[0, 2] = 1.0, 1.0
    c2 = np.full((n1, n1, n1), np.inf)
    c2[0, 1, 3] = 3.0
    c2[0, 2, 3] = 1.0
    path, cost = _dynamic_program({1: c1, 2: c2}, (1, 2), n1)
    assert path == [0, 2, 3] and cost == pytest.approx(2.0)


def _fit(model_times):
    xT_fit = jax.random.normal(jax.random.key(1), (64, 2))
    return dpmjax.fit_timesteps(
        _model(), _gm(), None, xT_fit.shape, schedule=SCHED, noise=xT_fit, steps=STEPS, order=2,
        n_candidates=16, fine_steps=128, refine_iters=40, model_times=model_times, return_info=True,
    )


@pytest.fixture(scope="module")
def fitted():
    """Grid and network times (the default)."""
    return _fit(True)


@pytest.fixture(scope="module")
def fitted_grid_only():
    return _fit(False)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["fitted", "fitted_grid_only"])
def test_fitted_grid_is_valid_and_not_worse_on_its_fitting_set(which, request):
    grid, info = request.getfixturevalue(which)
    assert isinstance(grid, dpmjax.FittedGrid)
    ts = np.asarray(grid.timesteps)
    assert ts.shape == (STEPS + 1,)
    assert ts[0] == pytest.approx(SCHED.T) and ts[-1] == pytest.approx(SCHED.t_eps)
    assert np.all(np.diff(ts) < 0)
    if which == "fitted":  # one network time per evaluation, inside the sampling interval
        mts = np.asarray(grid.model_timesteps)
        assert mts.shape == (STEPS,) and np.all((mts >= ts[-1] - 1e-7) & (mts <= ts[0] + 1e-7))
        assert np.abs(mts - ts[:-1]).max() > 1e-4  # they were fitted, not left at the grid's times
    else:
        assert grid.model_timesteps is None
    # Measured, on starting noises the fit never saw: the fitted grid beats the grid the
    # refinement started from (the best of the DP grid and the fixed grids on the fitting set).
    xT = jax.random.normal(jax.random.key(8), (128, 2))
    exact = _gm().ode_solution(xT, SCHED, SCHED.T, SCHED.t_eps)
    start = {"timesteps": info["dp_grid"]} if info["start"] == "dp" else {"skip_type": info["start"]}
    err = {name: _rms(dpmjax.sample(_model(), _gm(), None, xT.shape, schedule=SCHED, noise=xT, steps=STEPS, order=2,
                                    **g),
                      exact) for name, g in (("fitted", {"timesteps": grid}), ("start", start))}
    assert err["fitted"] < 0.7 * err["start"], (info["start"], err)


@pytest.mark.slow
def test_fitting_reduces_the_exact_error_on_fresh_noise(fitted, fitted_grid_only):
    # Exact error against the closed-form ODE solution, on starting noises the fit never saw.
    grid, info = fitted
    xT = jax.random.normal(jax.random.key(7), (256, 2))
    exact = _gm().ode_solution(xT, SCHED, SCHED.T, SCHED.t_eps)

    def error(**grid):
        x = dpmjax.sample(_model(), _gm(), None, xT.shape, schedule=SCHED, noise=xT, steps=STEPS, order=2, **grid)
        return _rms(x, exact)

    fixed = {sk: error(skip_type=sk) for sk in dpmjax.timesteps.SKIP_TYPES}
    # Measured: grid only 4.0e-3 against 2.5e-2 for the best fixed grid (edm), 4.1e-2 for
    # logSNR; grid and network times 1.3e-3.
    grid_only = error(timesteps=fitted_grid_only[0])
    assert grid_only < 0.5 * min(fixed.values()), fixed
    assert error(timesteps=grid) < 0.5 * grid_only, (grid_only, fixed)
    # The dynamic program alone (one-step errors along the reference trajectories) already
    # beats the logSNR grid it selects its points from (measured 1.5e-2).
    assert error(timesteps=info["dp_grid"]) < fixed["logSNR"]


@pytest.mark.slow
def test_fit_for_unipc_lowers_the_exact_error_on_fresh_noise():
    """fit_timesteps(method="unipc"): the grid fitted for UniPC, run by UniPC on noise the
    fit never saw, is closer to the exact ODE solution than the logSNR grid."""
    xT_fit = jax.random.normal(jax.random.key(2), (64, 2))
    grid = dpmjax.fit_timesteps(_model(), _gm(), None, xT_fit.shape, schedule=SCHED, noise=xT_fit, steps=STEPS, order=2,
                                method="unipc", n_candidates=16, fine_steps=128, refine_iters=40)
    xT = jax.random.normal(jax.random.key(9), (256, 2))
    exact = _gm().ode_solution(xT, SCHED, SCHED.T, SCHED.t_eps)

    def error(**g):
        return _rms(dpmjax.sample(_model(), _gm(), None, xT.shape, schedule=SCHED, noise=xT, steps=STEPS, order=2,
                                  method="unipc", **g), exact)

    fitted, log_snr = error(timesteps=grid), error(skip_type="logSNR")
    assert fitted < 0.1 * log_snr, (fitted, log_snr)


@pytest.mark.slow
def test_save_load_round_trip(tmp_path, fitted):
    grid, _ = fitted
    dpmjax.save_timesteps(tmp_path / "grid.json", grid, steps=STEPS)
    back = dpmjax.load_timesteps(tmp_path / "grid.json")
    np.testing.assert_allclose(back.timesteps, np.asarray(grid.timesteps), rtol=1e-7)
    np.testing.assert_allclose(back.model_timesteps, np.asarray(grid.model_timesteps), rtol=1e-7)
    # a plain grid (array) round-trips through both formats, without network times
    for name in ("plain.json", "plain.npy"):
        dpmjax.save_timesteps(tmp_path / name, grid.timesteps)
        back = dpmjax.load_timesteps(tmp_path / name)
        np.testing.assert_allclose(back.timesteps, np.asarray(grid.timesteps), rtol=1e-7)
        assert back.model_timesteps is None
    with pytest.raises(ValueError, match=".json"):
        dpmjax.save_timesteps(tmp_path / "grid.npy", grid)


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        dpmjax.load_timesteps(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"timesteps": [0.5, 0.9]}')
    with pytest.raises(ValueError, match="strictly decreasing"):
        dpmjax.load_timesteps(bad)
    bad.write_text("not json")
    with pytest.raises(ValueError, match="not a dpmjax grid"):
        dpmjax.load_timesteps(bad)
    bad.write_text('{"timesteps": [0.9, 0.5, 0.1], "model_timesteps": [0.9]}')
    with pytest.raises(ValueError, match="model_timesteps"):
        dpmjax.load_timesteps(bad)


def test_fit_argument_errors():
    with pytest.raises(ValueError, match="steps"):
        dpmjax.fit_timesteps(_model(), _gm(), jax.random.key(0), (8, 2), schedule=SCHED, steps=50, n_candidates=10)
    with pytest.raises(ValueError, match="fine_steps"):
        dpmjax.fit_timesteps(_model(), _gm(), jax.random.key(0), (8, 2), schedule=SCHED, steps=4, n_candidates=10,
                             fine_steps=25)
    with pytest.raises(ValueError, match="method"):
        dpmjax.fit_timesteps(_model(), _gm(), jax.random.key(0), (8, 2), schedule=SCHED, steps=4, method="singlestep")
    with pytest.raises(ValueError, match="algorithm"):
        dpmjax.fit_timesteps(_model(), _gm(), jax.random.key(0), (8, 2), schedule=SCHED, steps=4,
                             algorithm="sde-dpmsolver++")


@pytest.mark.parametrize("method,guidance", [
    pytest.param(dpmjax.DPMSolverPP(), "none", id="multistep-none"),
    pytest.param(dpmjax.UniPC(), "cfg-1", id="unipc-cfg-1"),
    pytest.param(dpmjax.DPMSolverPP(), "cfg-2.5", id="multistep-cfg-2.5", marks=pytest.mark.slow),
    pytest.param(dpmjax.UniPC(), "classifier", id="unipc-classifier", marks=pytest.mark.slow),
])
def test_unrolled_loss_and_gradient_equal_the_sampler(x64, method, guidance):
    """The refinement's unrolled sampler (what it differentiates on CPU) gives the loss of
    ``dpmjax.sample`` and the same gradient, under every guidance (classifier-free guidance
    is then always the batched guided call: at scale 1 the conditional output to rounding)."""
    from dpmjax import fit

    schedule = dpmjax.VPLinear()
    gm = dpmjax.GaussianMixture.isotropic(jnp.array([[-1.0, 0.5], [1.0, -0.5]]), 0.2)
    base = gm.model_fn(schedule)
    x0 = jax.random.normal(jax.random.key(0), (16, 2), jnp.float64)
    x_ref = jax.random.normal(jax.random.key(1), (16, 2), jnp.float64)
    def conditional(params, x, t, c):  # the mixture shifted by the condition
        return base(params, x - schedule.alpha(t)[:, None] * c[:, None], t)

    def classifier(x, t, c):  # log p(c | x): logistic on the first coordinate
        return jax.nn.log_sigmoid(2.0 * x[:, 0] * c)

    model_fn, cond, unc, scale, kind, clf = conditional, jnp.full((16,), 0.5), None, jnp.asarray(1.0), "none", None
    if guidance.startswith("cfg"):
        kind, unc, scale = "cfg", jnp.zeros((16,)), jnp.asarray(float(guidance[4:]))
    elif guidance == "classifier":
        model_fn, cond, kind, clf, scale = base, jnp.ones((16,)), "classifier", classifier, jnp.asarray(1.5)
    ts0 = jnp.asarray(dpmjax.time_grid(schedule, "logSNR", 1.0, 1e-3, 5))

    def loss(shift, unroll):
        ts = ts0.at[1:-1].add(shift)
        return fit._loss((lambda: model_fn, (lambda: clf) if clf else None), (method, "noise", kind), schedule, gm,
                         x0, x_ref, ts, None, cond, unc, scale, unroll)

    shift = jnp.array([0.01, -0.02, 0.005, 0.0])
    (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(shift, u) for u in (False, True))
    np.testing.assert_allclose(float(b), float(a), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(gb), np.asarray(ga), rtol=1e-9, atol=1e-14)
    assert float(jnp.max(jnp.abs(ga))) > 1e-3
