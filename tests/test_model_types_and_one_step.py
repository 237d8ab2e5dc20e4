"""Which network output types go with which schedule (and their conversions), the loop
position of the one-step API, and options that would otherwise be silently ignored.

The ``v`` conversion is checked against a closed form: for one Gaussian the
probability-flow ODE is solved exactly (``GaussianMixture.ode_solution``), and a network
returning ``v = alpha eps - sigma x0`` of the exact noise prediction must give the sample
of the noise network itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax


def never_called(params, x, t):
    raise AssertionError("the model must not be called: the input is refused first")


# --------------------------------------------------------------------------- model types


def test_v_conversion_inverts_the_forward_process_for_any_alpha_sigma():
    """``v = alpha eps - sigma x0`` with ``x = alpha x0 + sigma eps`` for alpha^2 + sigma^2 != 1
    (a rectified flow's ``alpha = 1 - t``, ``sigma = t``): to_data / to_noise recover x0 / eps."""
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 5, 3))
    t = np.array([0.05, 0.3, 0.5, 0.8, 0.97])
    alpha, sigma = 1 - t, t
    x = alpha[:, None] * x0 + sigma[:, None] * eps
    v = alpha[:, None] * eps - sigma[:, None] * x0
    with jax.enable_x64(True):
        np.testing.assert_allclose(dpmjax.to_data(v, x, alpha, sigma, "v"), x0, rtol=0, atol=1e-12)
        np.testing.assert_allclose(dpmjax.to_noise(v, x, alpha, sigma, "v"), eps, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_v_network_on_a_rectified_flow_gives_the_exact_sample():
    """An exact ``v`` network of N([1, -1], 0.5^2) on ``RectifiedFlow``: the same sample as the
    exact noise network (the conversion is the only difference) and the exact ODE solution."""
    schedule = dpmjax.RectifiedFlow()
    gm = dpmjax.GaussianMixture.gaussian(jnp.array([1.0, -1.0]), 0.5)
    noise_fn = gm.model_fn(schedule)

    def v_fn(params, x, t_model):
        t = schedule.solver_time(t_model)[:, None]
        a, s = schedule.alpha(t), schedule.sigma(t)
        eps = noise_fn(params, x, t_model)
        return a * eps - s * (x - s * eps) / a

    z = jax.random.normal(jax.random.key(0), (256, 2))
    kw = dict(schedule=schedule, noise=z, steps=50, order=3, skip_type="logSNR")
    x_v = dpmjax.sample(v_fn, gm, None, z.shape, model_type="v", **kw)
    x_eps = dpmjax.sample(noise_fn, gm, None, z.shape, model_type="noise", **kw)
    exact = gm.ode_solution(z, schedule, schedule.T, schedule.t_eps)
    np.testing.assert_allclose(x_v, x_eps, rtol=0, atol=2e-5)
    np.testing.assert_allclose(x_v, exact, rtol=0, atol=1e-2)  # the solver's own error: 3e-3
    np.testing.assert_allclose(np.mean(np.asarray(x_v), 0), [1.0, -1.0], atol=0.1)


@pytest.mark.parametrize("model_type", ["v", "score", "flow"])
def test_edm_refuses_types_defined_on_another_scale(model_type):
    """An EDM network sees variance-exploding inputs; its v and score are not the VP ones the
    solver would convert with, so they are refused (as is the flow velocity)."""
    with pytest.raises(ValueError, match=r"EDM takes model_type 'noise', 'x_start', 'edm'"):
        dpmjax.solver(dpmjax.EDM(), model_type=model_type, steps=4)
    with pytest.raises(ValueError, match=r"EDM takes model_type"):
        dpmjax.sample(never_called, None, None, (2, 2), schedule=dpmjax.EDM(), model_type=model_type,
                      noise=np.zeros((2, 2), np.float32), steps=4)


@pytest.mark.parametrize("schedule, model_type", [(dpmjax.VPLinear(), "flow"), (dpmjax.VPLinear(), "edm"),
                                                  (dpmjax.EDM(), "v")])
def test_compute_ems_shares_the_model_type_rule_of_sample(schedule, model_type):
    """compute_ems refuses the pairs sample() refuses, with the same message, before any model call."""
    with pytest.raises(ValueError) as from_solver:
        dpmjax.solver(schedule, model_type=model_type, steps=4)
    with pytest.raises(ValueError) as from_ems:
        dpmjax.compute_ems(never_called, None, jax.random.key(0), (2,), schedule=schedule,
                           data=np.zeros((4, 2), np.float32), model_type=model_type, n_lambdas=20)
    assert str(from_ems.value) == str(from_solver.value)
    assert f"model_type={model_type!r}" in str(from_ems.value)


def test_degenerate_ems_refuses_times_below_a_discrete_table():
    """A VPDiscrete table starts at t = 1/N; below it lambda would be NaN."""
    schedule = dpmjax.VPDiscrete.from_named("linear", 1000)
    with pytest.raises(ValueError, match=r"t_end must be in \[0.001, t_start"):
        dpmjax.degenerate_ems(schedule, (2,), n=4, t_end=1e-4)
    ems = dpmjax.degenerate_ems(schedule, (2,), n=4, t_end=1e-3)
    assert np.all(np.isfinite(np.asarray(ems.lambdas)))


# --------------------------------------------------------------------------- one-step API


@pytest.fixture(scope="module")
def loop():
    """A 3-step solver, its exact noise network and a starting noise."""
    schedule = dpmjax.VPLinear()
    gm = dpmjax.GaussianMixture.gaussian(jnp.array([0.5, -1.0]), 0.3)
    solver = dpmjax.solver(schedule, steps=3, order=2, skip_type="logSNR")
    x_T = jax.random.normal(jax.random.key(1), (8, 2))
    return solver, gm.model_fn(schedule), gm, x_T


def _run(solver, model_fn, params, state, n):
    """``n`` steps of a Python loop over a jitted step (the state between steps is concrete)."""
    @jax.jit
    def one(state):
        x_in, t_in = solver.model_inputs(state)
        return solver.step(state, model_fn(params, x_in, t_in))

    for _ in range(n):
        state = one(state)
    return state


def test_concrete_state_past_the_end_is_refused(loop):
    solver, model_fn, gm, x_T = loop
    state = _run(solver, model_fn, gm, solver.init(x_T), solver.num_evals)
    out = jnp.zeros_like(x_T)
    with pytest.raises(ValueError, match=r"state.i = 3 is past the last of num_evals = 3"):
        solver.step(state, out)
    with pytest.raises(ValueError, match=r"state.i = 3 is past the last"):
        solver.model_inputs(state)
    solver.result(state)  # finished: fine


def test_result_of_an_unfinished_state_is_refused(loop):
    solver, model_fn, gm, x_T = loop
    state = _run(solver, model_fn, gm, solver.init(x_T), solver.num_evals - 1)
    with pytest.raises(ValueError, match=r"result\(\) needs a finished state: state.i = 2 of num_evals = 3"):
        solver.result(state)


def test_inside_jit_a_step_past_the_end_is_inert_and_an_unfinished_result_is_nan(loop):
    solver, model_fn, gm, x_T = loop
    ref = dpmjax.sample(model_fn, gm, None, x_T.shape, schedule=dpmjax.VPLinear(), noise=x_T, steps=3, order=2,
                        skip_type="logSNR")

    @jax.jit
    def run(params, n):
        def body(_, state):
            x_in, t_in = solver.model_inputs(state)
            return solver.step(state, model_fn(params, x_in, t_in))
        return solver.result(jax.lax.fori_loop(0, n, body, solver.init(x_T)))

    np.testing.assert_allclose(run(gm, solver.num_evals), ref, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(run(gm, solver.num_evals + 2), run(gm, solver.num_evals))
    assert np.all(np.isnan(np.asarray(run(gm, solver.num_evals - 1))))


def test_a_state_of_another_solver_is_refused(loop):
    solver, model_fn, gm, x_T = loop
    out = jnp.zeros_like(x_T)
    order1 = dpmjax.solver(dpmjax.VPLinear(), steps=3, order=1)  # a history of K = 1 output
    with pytest.raises(ValueError, match=r"not one of this solver's.*K = 2.*hist \(1, 8, 2\)"):
        solver.step(order1.init(x_T), out)
    unipc = dpmjax.solver(dpmjax.VPLinear(), steps=3, order=2, method="unipc")  # keeps y
    with pytest.raises(ValueError, match=r"not one of this solver's"):
        solver.step(unipc.init(x_T), out)
    with pytest.raises(ValueError, match=r"not one of this solver's"):
        unipc.result(solver.init(x_T))
    other_shape = solver.init(x_T)._replace(x=jnp.zeros((8, 3)))
    with pytest.raises(ValueError, match=r"not one of this solver's"):
        solver.model_inputs(other_shape)


def test_init_refuses_a_scalar_and_step_refuses_noise_on_a_deterministic_solver(loop):
    solver, model_fn, gm, x_T = loop
    with pytest.raises(ValueError, match=r"x_T must be a batch of shape \(B, \*sample_shape\); got shape \(\)"):
        solver.init(1.0)
    with pytest.raises(ValueError, match=r"noise= applies only to the SDE algorithms"):
        solver.step(solver.init(x_T), jnp.zeros_like(x_T), noise=jnp.zeros_like(x_T))


# --------------------------------------------------------------------------- ignored options


@pytest.mark.parametrize("kw, name", [(dict(dynamic_thresholding_ratio=0.9), "dynamic_thresholding_ratio"),
                                      (dict(thresholding_max_val=2.0), "thresholding_max_val"),
                                      (dict(skip_type="logSNR", timesteps=np.array([1.0, 0.5, 0.01])), "skip_type")])
def test_options_that_would_be_ignored_are_refused(kw, name):
    kw = dict(dict(steps=2), **kw)
    with pytest.raises(ValueError, match=rf"^{name}="):
        dpmjax.solver(dpmjax.VPLinear(), **kw)
    with pytest.raises(ValueError, match=rf"^{name}="):
        dpmjax.sample(never_called, None, None, (2, 2), schedule=dpmjax.VPLinear(), noise=np.zeros((2, 2), np.float32),
                      **kw)


@pytest.mark.parametrize("value", [[0.5], "0", [True], np.array([0.5, 2.0])])
def test_disable_corrector_takes_step_numbers_only(value):
    with pytest.raises(TypeError, match="disable_corrector"):
        dpmjax.solver(dpmjax.VPLinear(), method="unipc", steps=5, disable_corrector=value)


@pytest.mark.parametrize("kw", [dict(method="unipc", disable_corrector=(2, 3)), dict(orders=(1, 2, 2, 1))],
                         ids=["disable_corrector", "orders"])
def test_integer_arrays_work_as_step_lists(kw):
    """A 1-D NumPy integer array stands for the tuple of its entries, in sample() and solver()."""
    name = "disable_corrector" if "disable_corrector" in kw else "orders"
    as_array = dict(kw, **{name: np.array(kw[name])})
    schedule = dpmjax.VPLinear()
    gm = dpmjax.GaussianMixture.gaussian(jnp.array([0.5, -1.0]), 0.3)
    z = jax.random.normal(jax.random.key(2), (8, 2))
    common = dict(schedule=schedule, noise=z, steps=4, order=2)
    a = dpmjax.sample(gm.model_fn(schedule), gm, None, z.shape, **common, **as_array)
    b = dpmjax.sample(gm.model_fn(schedule), gm, None, z.shape, **common, **kw)
    np.testing.assert_array_equal(a, b)
    assert dpmjax.solver(schedule, steps=4, order=2, **as_array).options == dpmjax.solver(
        schedule, steps=4, order=2, **kw).options


def test_edm_config_with_rho_zero_is_refused_by_name():
    with pytest.raises(ValueError, match=r"config rho must be a finite number.*got 0\.0"):
        dpmjax.from_diffusers({"_class_name": "EDMDPMSolverMultistepScheduler", "rho": 0.0}, 10)
