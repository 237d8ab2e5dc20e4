"""dpmjax.fit_timesteps: grids fitted to the model (dynamic programming + gradient refinement)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.fit import _dynamic_program

SCHED = dpmjax.VPLinear()
GM = dpmjax.GaussianMixture.isotropic(jnp.array([[-1.5, 0.5], [1.5, -0.5], [0.0, 2.0]]), 0.3)
MODEL = GM.model_fn(SCHED)
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


@pytest.fixture(scope="module")
def fitted():
    xT_fit = jax.random.normal(jax.random.key(1), (64, 2))
    ts, info = dpmjax.fit_timesteps(
        MODEL, GM, None, xT_fit.shape, schedule=SCHED, noise=xT_fit, steps=STEPS, order=2,
        n_candidates=16, fine_steps=128, refine_iters=40, return_info=True,
    )
    return ts, info


def test_fitted_grid_is_valid_and_not_worse_on_its_fitting_set(fitted):
    ts, info = fitted
    ts = np.asarray(ts)
    assert ts.shape == (STEPS + 1,)
    assert ts[0] == pytest.approx(SCHED.T) and ts[-1] == pytest.approx(SCHED.t_eps)
    assert np.all(np.diff(ts) < 0)
    # The refinement starts from the best of the DP grid and the fixed grids and keeps
    # only improvements: the fitted loss is at most the best start's.
    assert info["fit_loss"] <= min(info["start_losses"].values()) + 1e-7


def test_fitted_grid_generalises_to_fresh_noise(fitted):
    ts, _ = fitted
    xT = jax.random.normal(jax.random.key(7), (256, 2))
    ref = dpmjax.sample(MODEL, GM, None, xT.shape, schedule=SCHED, noise=xT, steps=400, order=3, skip_type="time_uniform")
    fitted_err = _rms(dpmjax.sample(MODEL, GM, None, xT.shape, schedule=SCHED, noise=xT, steps=STEPS, timesteps=ts), ref)
    logsnr_err = _rms(dpmjax.sample(MODEL, GM, None, xT.shape, schedule=SCHED, noise=xT, steps=STEPS, skip_type="logSNR"), ref)
    assert fitted_err < logsnr_err


def test_save_load_round_trip(tmp_path, fitted):
    ts, _ = fitted
    for name in ("grid.json", "grid.npy"):
        dpmjax.save_timesteps(tmp_path / name, ts, steps=STEPS)
        np.testing.assert_allclose(dpmjax.load_timesteps(tmp_path / name), np.asarray(ts), rtol=1e-7)


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


def test_fit_argument_errors():
    with pytest.raises(ValueError, match="steps"):
        dpmjax.fit_timesteps(MODEL, GM, jax.random.key(0), (8, 2), schedule=SCHED, steps=50, n_candidates=10)
    with pytest.raises(ValueError, match="fine_steps"):
        dpmjax.fit_timesteps(MODEL, GM, jax.random.key(0), (8, 2), schedule=SCHED, steps=4, n_candidates=10, fine_steps=25)
    with pytest.raises(ValueError, match="algorithm"):
        dpmjax.fit_timesteps(MODEL, GM, jax.random.key(0), (8, 2), schedule=SCHED, steps=4, algorithm="sde-dpmsolver++")
