"""The one-step API (``dpmjax.solver``): every way of driving it gives ``sample()``'s result.

* the same sample (1e-10, float64) from four drivers of one configuration: a Python loop
  of a jitted ``model_inputs -> model -> step``, a ``lax.fori_loop``, a ``lax.scan`` and
  ``dpmjax.sample`` itself, across methods, orders, the SDE algorithms (same key
  convention as ``sample``), ``denoise_to_zero``, custom grids, ``orders=``, a grid ending
  at 0 and configurations mapped from diffusers;
* classifier-free guidance written by hand (two network calls) equals ``sample``'s;
* the exported tables (``solver.export()``) run by a NumPy loop written from the
  ``export`` docstring, with a NumPy model, reproduce ``sample``;
* ``current`` reports the grid's times; ``replace_current`` with the same ``x`` is a no-op;
* bad input raises naming the argument;
* gradients: ``jax.checkpoint`` on the model changes nothing; stopping gradients before
  the last K steps (truncated backprop) gives the gradient of a K-step run from the
  (constant) intermediate state.

The model is the closed-form noise prediction of a 4-d Gaussian (``dpmjax.GaussianMixture``),
so no network is trained; shapes are tiny, and every driver is one jitted function shared
by all configurations (one compilation per configuration and driver).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax import diffusers as dd

MEAN = np.array([0.5, -1.0, 1.5, 0.0])
STD = np.array([0.2, 0.4, 0.7, 1.2])
B, D = 3, 4
X_T = np.random.default_rng(0).standard_normal((B, D))
TOL = 1e-10

_CACHE = {}


def setup():
    """(schedule, mixture, model_fn), built once per x64 state (``sample`` compiles once per
    ``model_fn`` object, so reusing it shares compilations between tests)."""
    key = bool(jax.config.jax_enable_x64)
    if key not in _CACHE:
        schedule = dpmjax.VPLinear()
        gm = dpmjax.GaussianMixture.gaussian(jnp.asarray(MEAN), jnp.asarray(STD))
        _CACHE[key] = (schedule, gm, gm.model_fn(schedule))
    return _CACHE[key]


# --------------------------------------------------------------------------- drivers
@functools.partial(jax.jit, static_argnums=0)
def hand_step(model_fn, params, solver, state, noise=None):
    """One evaluation: what a Python loop calls ``num_evals`` times."""
    x_in, t_in = solver.model_inputs(state)
    return solver.step(state, model_fn(params, x_in, t_in), noise=noise)


def hand_loop(model_fn, params, solver, x_T, key=None):
    state = solver.init(jnp.asarray(x_T), key=key)
    for _ in range(solver.num_evals):
        state = hand_step(model_fn, params, solver, state)
    return solver.result(state)


@functools.partial(jax.jit, static_argnums=0)
def compiled_loops(model_fn, params, solver, x_T, key):
    """``(fori_loop result, scan result)`` of the same loop body."""
    state0 = solver.init(x_T, key=key)

    def body(_, state):
        x_in, t_in = solver.model_inputs(state)
        return solver.step(state, model_fn(params, x_in, t_in))

    fori = solver.result(jax.lax.fori_loop(0, solver.num_evals, body, state0))
    scanned, _ = jax.lax.scan(lambda s, _: (body(0, s), None), state0, None, length=solver.num_evals)
    return fori, solver.result(scanned)


def all_drivers(model_fn, params, schedule, x_T, key=None, **kw):
    """``(solver, {driver: x})`` for the three hand-written drivers of one configuration.

    With ``key`` (the SDE algorithms) ``x_T`` is derived as ``sample(key=key)`` derives it:
    ``key, key_steps = split(key)``, ``x_T = N(0, I) from key`` (times ``prior_std``, 1 for
    VP), and the steps' noise comes from ``key_steps`` (``init(x_T, key=key_steps)``)."""
    solver = dpmjax.solver(schedule, **kw)
    key_steps = None
    if key is not None:
        key, key_steps = jax.random.split(key)
        x_T = jax.random.normal(key, np.shape(x_T), jnp.float64)
    x_T = jnp.asarray(x_T)
    out = {"hand": hand_loop(model_fn, params, solver, x_T, key_steps)}
    out["fori"], out["scan"] = compiled_loops(model_fn, params, solver, x_T, key_steps)
    return solver, {k: np.asarray(v) for k, v in out.items()}


def assert_same(results, want, what=""):
    want = np.asarray(want)
    assert np.all(np.isfinite(want)), what
    for name, got in results.items():
        err = np.max(np.abs(np.asarray(got) - want))
        assert err <= TOL, f"{what} {name}: max |driver - sample()| = {err:.3e} > {TOL:.0e}"


# --------------------------------------------------------------------------- 1. drivers agree
T_GRID = np.array([1.0, 0.7, 0.45, 0.3, 0.17, 0.09, 0.04, 0.015, 0.005])  # 8 steps, uneven in lambda
T_MODEL = T_GRID[:-1] * 0.97 + 0.001  # network times differing from the grid's

CONFIGS = {
    # multistep, both parameterisations, orders 1-3
    **{f"multistep-{a}-{o}": dict(algorithm=a, method="multistep", order=o, steps=7)
       for a in ("dpmsolver++", "dpmsolver") for o in (1, 2, 3)},
    "singlestep-2": dict(algorithm="dpmsolver", method="singlestep", order=2, steps=7, skip_type="logSNR"),
    "singlestep-3": dict(algorithm="dpmsolver++", method="singlestep", order=3, steps=8),
    "singlestep_fixed-2": dict(algorithm="dpmsolver", method="singlestep_fixed", order=2, steps=6,
                               solver_type="taylor"),
    **{f"unipc-{v}-{o}": dict(method="unipc", variant=v, order=o, steps=7) for v in ("bh1", "bh2") for o in (2, 3)},
    "denoise_to_zero": dict(method="multistep", order=2, steps=6, denoise_to_zero=True),
    "timesteps+model_timesteps": dict(method="multistep", order=3, timesteps=T_GRID, model_timesteps=T_MODEL, steps=8),
    "singlestep-timesteps": dict(algorithm="dpmsolver", method="singlestep", order=3, steps=8, timesteps=T_GRID,
                                 orders=(3, 2, 2, 1)),
    "orders-multistep": dict(method="multistep", order=3, steps=6, orders=(1, 2, 3, 3, 2, 1)),
    "orders-unipc": dict(method="unipc", order=3, steps=6, orders=(1, 1, 2, 3, 2, 2), variant="bh1"),
    "zero-end": dict(method="multistep", order=2, steps=8, timesteps=np.concatenate([T_GRID[:-1], [0.0]])),
    "zero-end-unipc": dict(method="unipc", order=2, steps=8, timesteps=np.concatenate([T_GRID[:-1], [0.0]])),
    "thresholding": dict(method="multistep", order=2, steps=6, thresholding=True, thresholding_max_val=0.8),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_hand_fori_scan_and_sample_agree(x64, name):
    kw = CONFIGS[name]
    schedule, gm, model_fn = setup()
    solver, got = all_drivers(model_fn, gm, schedule, X_T, **kw)
    want = dpmjax.sample(model_fn, gm, None, X_T.shape, schedule=schedule, noise=jnp.asarray(X_T), **kw)
    assert_same(got, want, name)
    steps = kw["steps"] if kw.get("method") != "singlestep_fixed" else kw["steps"] // kw["order"] * kw["order"]
    assert solver.num_evals == steps + bool(kw.get("denoise_to_zero"))  # denoise_to_zero is one more evaluation


# (order 1 is the first step of each of these: the warm-up steps use orders 1, 2, ...)
SDE_CONFIGS = [("sde-dpmsolver++", 2), ("sde-dpmsolver++", 3), ("sde-dpmsolver", 2)]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, order", SDE_CONFIGS)
def test_sde_drivers_agree_with_the_same_key(x64, algorithm, order):
    schedule, gm, model_fn = setup()
    kw = dict(algorithm=algorithm, order=order, steps=6, skip_type="logSNR")
    key = jax.random.key(7)
    solver, got = all_drivers(model_fn, gm, schedule, X_T, key=key, **kw)
    want = dpmjax.sample(model_fn, gm, key, X_T.shape, schedule=schedule, **kw)
    assert_same(got, want, f"{algorithm} {order}")
    # the noise is really drawn: another key gives another sample
    other = dpmjax.sample(model_fn, gm, jax.random.key(8), X_T.shape, schedule=schedule, **kw)
    assert np.max(np.abs(np.asarray(other) - np.asarray(want))) > 1e-3
    # the same draws passed explicitly as step(noise=...): fold_in(key_steps, step index)
    _, key_steps = jax.random.split(key)
    x_T = jax.random.normal(jax.random.split(key)[0], X_T.shape, jnp.float64)
    state = solver.init(x_T)  # no key: every step gets noise=
    for i in range(solver.num_evals):
        noise = jax.random.normal(jax.random.fold_in(key_steps, i), X_T.shape, jnp.float64)
        state = hand_step(model_fn, gm, solver, state, noise)
    assert_same({"noise=": solver.result(state)}, want, f"{algorithm} {order}")


@pytest.mark.slow
def test_grid_ending_at_zero_returns_the_last_data_prediction(x64):
    """The last step to t = 0 is the data prediction at the last evaluation, computed here
    from the closed-form Gaussian: x0 = (x - sigma eps) / alpha."""
    schedule, gm, model_fn = setup()
    solver = dpmjax.solver(schedule, **CONFIGS["zero-end"])
    state = solver.init(jnp.asarray(X_T))
    for _ in range(solver.num_evals - 1):
        state = hand_step(model_fn, gm, solver, state)
    x_in, t_in = solver.model_inputs(state)
    t = float(T_GRID[-2])
    np.testing.assert_allclose(np.asarray(t_in), t)
    eps = model_fn(gm, x_in, t_in)
    x0 = (x_in - schedule.sigma(t) * eps) / schedule.alpha(t)
    got = solver.result(solver.step(state, eps))
    np.testing.assert_allclose(np.asarray(got), np.asarray(x0), rtol=0, atol=TOL)


DIFFUSERS = os.path.join(os.path.dirname(__file__), "data", "diffusers_reference.npz")
DIFFUSERS_NAMES = ("edm_karras_10", "ss_order3_13", "unipc_karras_v_15")
W = np.array([0.9, -0.7, 1.1, 0.5, -1.2, 0.8, 0.6, -0.9])


def toy_net(params, x, t):
    """A smooth nonlinear network (the toy network of tests/test_diffusers.py)."""
    del params
    t = jnp.asarray(t, x.dtype).reshape((-1,) + (1,) * (x.ndim - 2))
    return jnp.stack([1.5 * jnp.tanh(W[c] * x[:, c] + 0.1 * jnp.sin(t / 97.0) + 0.05 * c)
                      for c in range(x.shape[1])], axis=1)


_WRAPPED = {}


@pytest.mark.slow
@pytest.mark.parametrize("name", DIFFUSERS_NAMES)
def test_drivers_agree_on_options_from_diffusers(x64, name):
    data = np.load(DIFFUSERS)
    cfg, steps = json.loads(str(data["config_" + name])), int(data["steps_" + name])
    schedule, options = dpmjax.from_diffusers(cfg, steps)
    model_fn = _WRAPPED.setdefault(name, dd.wrap_model(toy_net, cfg))
    x_T = data["x_T_" + name]
    _, got = all_drivers(model_fn, None, schedule, x_T, **options)
    want = dpmjax.sample(model_fn, None, None, x_T.shape, schedule=schedule, noise=jnp.asarray(x_T), **options)
    assert_same(got, want, name)
    # and sample() is diffusers' own result (as tests/test_diffusers.py checks)
    np.testing.assert_allclose(np.asarray(want), data["x_final_" + name], rtol=1e-5,
                               atol=1e-5 * np.max(np.abs(data["x_final_" + name])))


# --------------------------------------------------------------------------- 2. guidance by hand
COND_MEANS = np.array([[1.0, -0.5, 0.3, 2.0], [-1.0, 0.5, 0.0, -0.7]])


def cond_model(params, x, t, c):
    """Exact noise prediction of N(COND_MEANS[c], STD^2) (c: (B,) ints 0/1), scaled by params."""
    gm0, gm1 = (dpmjax.GaussianMixture.gaussian(jnp.asarray(m), jnp.asarray(STD)) for m in COND_MEANS)
    a, s = dpmjax.VPLinear().alpha(t), dpmjax.VPLinear().sigma(t)
    e0, e1 = gm0.eps(x, a, s), gm1.eps(x, a, s)
    return params * jnp.where(c[:, None] == 1, e1, e0)


@pytest.mark.slow
def test_classifier_free_guidance_by_hand_equals_sample(x64):
    schedule = dpmjax.VPLinear()
    kw = dict(algorithm="dpmsolver++", method="multistep", order=2, steps=8, skip_type="logSNR")
    cond, uncond, scale = jnp.array([1, 0, 1]), jnp.array([0, 0, 0]), 3.5
    solver = dpmjax.solver(schedule, **kw)

    @jax.jit
    def guided(params, x_T, scale):
        def body(_, state):
            x, t = solver.model_inputs(state)
            out_c, out_u = cond_model(params, x, t, cond), cond_model(params, x, t, uncond)
            return solver.step(state, out_u + scale * (out_c - out_u))

        return solver.result(jax.lax.fori_loop(0, solver.num_evals, body, solver.init(x_T)))

    params = jnp.asarray(1.0)
    got = guided(params, jnp.asarray(X_T), scale)
    want = dpmjax.sample(cond_model, params, None, X_T.shape, schedule=schedule, noise=jnp.asarray(X_T),
                         condition=cond, unconditional_condition=uncond, guidance_scale=scale, **kw)
    assert_same({"fori cfg": got}, want)
    unguided = dpmjax.sample(cond_model, params, None, X_T.shape, schedule=schedule, noise=jnp.asarray(X_T),
                             condition=cond, **kw)
    assert np.max(np.abs(np.asarray(unguided) - np.asarray(want))) > 1e-2  # the guidance does something


# --------------------------------------------------------------------------- 3. exported plan in NumPy
def numpy_eps(x, t):
    """The Gaussian's noise prediction in NumPy under VPLinear (beta 0.1 -> 20), written from
    the formulas: x_t ~ N(alpha MEAN, alpha^2 STD^2 + sigma^2), eps = sigma (x - alpha MEAN) / var."""
    t = np.asarray(t, np.float64)[:, None]
    log_alpha = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
    alpha = np.exp(log_alpha)
    sigma = np.sqrt(-np.expm1(2 * log_alpha))
    var = alpha**2 * STD**2 + sigma**2
    return sigma * (x - alpha * MEAN) / var


def numpy_threshold(x0, ratio, max_val):
    q = np.quantile(np.abs(x0).reshape(x0.shape[0], -1), ratio, axis=1)
    q = np.maximum(q, max_val).reshape((-1,) + (1,) * (x0.ndim - 1))
    return np.clip(x0, -q, q) / q


def run_exported(plan, x_T, net):
    """The loop of ``Solver.export``'s docstring, in NumPy."""
    n, K = plan["cx"].shape
    x = x_T * plan["start_scale"]
    y = x
    hist = np.zeros((K,) + x.shape)
    for r in range(n):
        out = net(y / plan["in_scale"][r], np.full(x.shape[0], plan["t_model"][r]))
        m = plan["out_coef"][r] * out + plan["x_coef"][r] * y
        if plan["thresholding"]:
            m = numpy_threshold(m, plan["dynamic_thresholding_ratio"], plan["thresholding_max_val"])
        hist[plan["slot"][r]] = m
        assert not np.any(plan["nz"][r])  # deterministic configurations here
        x = plan["ax"][r] * x + plan["bx"][r] * y + np.tensordot(plan["cx"][r], hist, 1)
        y = plan["ay"][r] * x + np.tensordot(plan["cy"][r], hist, 1)
    return y / plan["end_scale"]


@pytest.mark.parametrize("name", ["multistep-dpmsolver++-3", "multistep-dpmsolver-2", "singlestep-3",
                                  "singlestep-timesteps", "unipc-bh1-3", "unipc-bh2-2", "thresholding",
                                  "denoise_to_zero", "timesteps+model_timesteps"])
def test_exported_plan_in_numpy_reproduces_sample(x64, name):
    kw = CONFIGS[name]
    schedule, gm, model_fn = setup()
    plan = dpmjax.solver(schedule, **kw).export()
    for k, v in plan.items():
        assert isinstance(v, (np.ndarray, str, bool, float)), (k, type(v))
    got = run_exported(plan, X_T, numpy_eps)
    want = dpmjax.sample(model_fn, gm, None, X_T.shape, schedule=schedule, noise=jnp.asarray(X_T), **kw)
    assert_same({"numpy": got}, want, name)
    if name == "thresholding":  # the clipping is active in this configuration
        plain = dpmjax.sample(model_fn, gm, None, X_T.shape, schedule=schedule, noise=jnp.asarray(X_T),
                              **{k: v for k, v in kw.items() if k not in ("thresholding", "thresholding_max_val")})
        assert np.max(np.abs(np.asarray(plain) - np.asarray(want))) > 1e-2


# --------------------------------------------------------------------------- 4. current / replace_current
@pytest.mark.parametrize("name, outer", [
    ("timesteps+model_timesteps", np.arange(9)),        # multistep: every step completes a grid point
    ("singlestep-timesteps", np.array([0, 3, 5, 7, 8])),  # singlestep: the outer points cumsum([0, 3, 2, 2, 1])
])
def test_current_time_follows_the_grid(x64, name, outer):
    schedule, gm, model_fn = setup()
    solver = dpmjax.solver(schedule, **CONFIGS[name])
    state = solver.init(jnp.asarray(X_T))
    times = [float(solver.current(state)[1])]
    for _ in range(solver.num_evals):
        state = hand_step(model_fn, gm, solver, state)
        times.append(float(solver.current(state)[1]))
    done = np.searchsorted(outer, np.arange(solver.num_evals + 1), side="right") - 1  # outer points reached
    np.testing.assert_allclose(times, T_GRID[outer[done]], rtol=1e-14)
    x_last, _ = solver.current(state)
    np.testing.assert_allclose(np.asarray(x_last), np.asarray(solver.result(state)), rtol=0, atol=TOL)


@pytest.mark.slow
def test_current_time_on_a_built_in_grid_and_in_user_scale(x64):
    """EDM: ``current`` is in user (VE) scale; its time follows dpmjax.time_grid."""
    schedule = dpmjax.EDM()
    solver = dpmjax.solver(schedule, model_type="noise", order=2, steps=5, skip_type="karras")
    grid = np.asarray(dpmjax.time_grid(schedule, "karras", schedule.T, schedule.t_eps, 5))
    x_T = jnp.asarray(X_T) * schedule.T
    state = solver.init(x_T)
    x, t = solver.current(state)
    np.testing.assert_allclose(np.asarray(x), np.asarray(x_T), rtol=1e-14)  # user scale in, user scale out
    gm = dpmjax.GaussianMixture.gaussian(jnp.asarray(MEAN), jnp.asarray(STD))
    model_fn = gm.model_fn(schedule)
    for n in range(solver.num_evals):
        assert float(t) == pytest.approx(grid[n], rel=1e-13)
        state = hand_step(model_fn, gm, solver, state)
        x, t = solver.current(state)
    assert float(t) == pytest.approx(grid[-1], rel=1e-13)
    np.testing.assert_allclose(np.asarray(x), np.asarray(solver.result(state)), rtol=0, atol=TOL)


@pytest.mark.parametrize("name", ["multistep-dpmsolver++-3", "singlestep-3", "unipc-bh2-3"])
def test_replacing_x_with_itself_changes_nothing(x64, name):
    schedule, gm, model_fn = setup()
    solver = dpmjax.solver(schedule, **CONFIGS[name])
    state = solver.init(jnp.asarray(X_T))
    for _ in range(solver.num_evals):
        x, _ = solver.current(state)
        state = solver.replace_current(state, x)
        state = hand_step(model_fn, gm, solver, state)
    want = hand_loop(model_fn, gm, solver, X_T)
    assert_same({"replaced": solver.result(state)}, want, name)


def test_replace_current_changes_what_the_network_sees_next(x64):
    schedule, gm, model_fn = setup()
    solver = dpmjax.solver(schedule, **CONFIGS["multistep-dpmsolver++-2"])
    state = hand_step(model_fn, gm, solver, solver.init(jnp.asarray(X_T)))
    new = jnp.full((B, D), 0.25)
    state = solver.replace_current(state, new)
    x_in, _ = solver.model_inputs(state)
    np.testing.assert_allclose(np.asarray(x_in), 0.25, rtol=1e-15)


# --------------------------------------------------------------------------- 5. bad input
def test_bad_input_raises_naming_the_argument(x64):
    schedule, gm, model_fn = setup()
    solver = dpmjax.solver(schedule, order=2, steps=4)
    state = solver.init(jnp.asarray(X_T))
    with pytest.raises(ValueError, match="model output.*shape"):
        solver.step(state, jnp.zeros((B, D + 1)))
    with pytest.raises(TypeError, match="model output.*float"):
        solver.step(state, jnp.zeros((B, D), jnp.int32))
    sde = dpmjax.solver(schedule, algorithm="sde-dpmsolver++", order=2, steps=4)
    s = sde.init(jnp.asarray(X_T))  # no key
    with pytest.raises(ValueError, match="key.*noise"):
        sde.step(s, jnp.zeros((B, D)))
    with pytest.raises(ValueError, match="noise must have"):
        sde.step(sde.init(jnp.asarray(X_T), key=jax.random.key(0)), jnp.zeros((B, D)), noise=jnp.zeros((B, 1)))
    with pytest.raises(TypeError, match="key"):
        sde.init(jnp.asarray(X_T), key=3)
    with pytest.raises(ValueError, match="method='adaptive'"):
        dpmjax.solver(schedule, method="adaptive")
    with pytest.raises(ValueError, match="method must be one of"):
        dpmjax.solver(schedule, method="heun")
    for bad, word in [(dict(method="multistep", variant="bh1"), "variant"),
                      (dict(method="unipc", solver_type="taylor"), "solver_type"),
                      (dict(method="singlestep", lower_order_final=False), "lower_order_final"),
                      (dict(method="multistep", disable_corrector=(2,)), "disable_corrector"),
                      (dict(method="singlestep_fixed", orders=(2, 2)), "orders"),
                      (dict(method="multistep", steps=4, orders=(1, 2)), "orders"),
                      (dict(timesteps=T_GRID, t_end=0.01, steps=8), "timesteps"),
                      (dict(steps=0), "steps"),
                      (dict(model_timesteps=T_MODEL[:3], steps=8), "model_timesteps")]:
        with pytest.raises(ValueError, match=word):
            dpmjax.solver(schedule, **bad)
    with pytest.raises(TypeError, match="schedule"):
        dpmjax.solver("linear")


# --------------------------------------------------------------------------- 6. gradients
def param_model(params, x, t):
    """The Gaussian's noise prediction plus a small trainable MLP correction."""
    schedule, gm, _ = setup()
    eps = gm.eps(x, schedule.alpha(t), schedule.sigma(t))
    h = jnp.tanh(x @ params["w"] + t[:, None] * params["b"])
    return eps + 0.3 * h @ params["v"]


def init_params():
    r = np.random.default_rng(1)
    return {"w": jnp.asarray(r.standard_normal((D, 8)) / 2), "b": jnp.asarray(r.standard_normal(8)),
            "v": jnp.asarray(r.standard_normal((8, D)) / 3)}


GRAD_KW = dict(algorithm="dpmsolver++", method="multistep", order=3, steps=8, skip_type="logSNR")


@pytest.mark.slow
def test_checkpointed_model_gives_the_same_gradient(x64):
    schedule, _, _ = setup()
    remat = jax.checkpoint(param_model)

    def loss(params, fn):
        x = dpmjax.sample(fn, params, None, X_T.shape, schedule=schedule, noise=jnp.asarray(X_T), **GRAD_KW)
        return jnp.sum(x**2)

    params = init_params()
    g_plain = jax.grad(loss)(params, param_model)
    g_remat = jax.grad(loss)(params, remat)
    for k in params:
        assert np.all(np.isfinite(np.asarray(g_plain[k])))
        assert np.max(np.abs(np.asarray(g_plain[k]))) > 1e-3
        np.testing.assert_allclose(np.asarray(g_remat[k]), np.asarray(g_plain[k]), rtol=0, atol=TOL)


@pytest.mark.slow
def test_truncated_backprop_is_the_gradient_of_the_last_k_steps(x64):
    """DRaFT-K style: ``stop_gradient`` on the state before step n - K. The gradient is that
    of a K-step run started from the intermediate state as a constant; K = n is the full
    gradient, which equals the gradient through ``sample()``."""
    schedule, _, _ = setup()
    solver = dpmjax.solver(schedule, **GRAD_KW)
    n, K = solver.num_evals, 3

    def body(params):
        def f(_, state):
            x, t = solver.model_inputs(state)
            return solver.step(state, param_model(params, x, t))
        return f

    @functools.partial(jax.jit, static_argnums=2)
    def truncated_loss(params, x_T, k):
        state = jax.lax.fori_loop(0, n - k, body(params), solver.init(x_T))
        state = jax.lax.stop_gradient(state)
        state = jax.lax.fori_loop(n - k, n, body(params), state)
        return jnp.sum(solver.result(state) ** 2)

    @jax.jit
    def from_state(params, state):  # K steps from a given state
        state = jax.lax.fori_loop(n - K, n, body(params), state)
        return jnp.sum(solver.result(state) ** 2)

    params, x_T = init_params(), jnp.asarray(X_T)
    g_trunc = jax.grad(truncated_loss)(params, x_T, K)
    mid = jax.jit(lambda p, x: jax.lax.fori_loop(0, n - K, body(p), solver.init(x)))(params, x_T)
    g_tail = jax.grad(from_state)(params, mid)
    g_full = jax.grad(truncated_loss)(params, x_T, n)
    g_sample = jax.grad(lambda p: jnp.sum(dpmjax.sample(param_model, p, None, X_T.shape, schedule=schedule,
                                                        noise=x_T, **GRAD_KW) ** 2))(params)
    for k in params:
        np.testing.assert_allclose(np.asarray(g_trunc[k]), np.asarray(g_tail[k]), rtol=0, atol=TOL)
        np.testing.assert_allclose(np.asarray(g_full[k]), np.asarray(g_sample[k]), rtol=0, atol=TOL)
    # truncation drops the earlier steps' contribution
    assert max(float(np.max(np.abs(np.asarray(g_trunc[k]) - np.asarray(g_full[k])))) for k in params) > 1e-3
