"""The object API: method objects, grids, guidance objects, ``solver=``, ``Solution``; the
authors' flat keywords mapping to the same objects; caches that release the user's
functions; one model-call path for sampling, fitting and statistics."""

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from conftest import compiled_during, library_programs

MEANS = jnp.array([[-2.0, 0.0], [2.0, 0.0]])


@pytest.fixture(scope="module")
def problem():
    schedule = dpmjax.VPLinear()
    gm = dpmjax.GaussianMixture.isotropic(MEANS, 0.3)
    return schedule, gm, gm.model_fn(schedule)


# (flat keywords, object spelling): each pair must give bit-identical samples
PAIRS = [
    (dict(method="multistep", order=2, steps=8, skip_type="logSNR"),
     dict(method=dpmjax.DPMSolverPP(order=2), grid=dpmjax.Grid(steps=8, skip_type="logSNR"))),
    (dict(algorithm="dpmsolver", method="multistep", order=3, steps=8),
     dict(method=dpmjax.DPMSolver(order=3), grid=dpmjax.Grid(steps=8))),
    (dict(method="singlestep", order=3, steps=9, skip_type="logSNR", solver_type="taylor"),
     dict(method=dpmjax.Singlestep(order=3, solver_type="taylor"), grid=dpmjax.Grid(steps=9, skip_type="logSNR"))),
    (dict(method="singlestep_fixed", order=2, steps=8),
     dict(method=dpmjax.SinglestepFixed(order=2), grid=dpmjax.Grid(steps=8))),
    (dict(method="unipc", order=3, variant="bh1", steps=7, disable_corrector=np.array([2, 3])),
     dict(method=dpmjax.UniPC(order=3, variant="bh1", disable_corrector=(2, 3)), grid=dpmjax.Grid(steps=7))),
    (dict(method="multistep", order=2, steps=4, orders=np.array([1, 2, 2, 1])),
     dict(method=dpmjax.DPMSolverPP(order=2, orders=(1, 2, 2, 1)), grid=dpmjax.Grid(steps=4))),
    (dict(method="multistep", order=2, steps=6, thresholding=True, dynamic_thresholding_ratio=0.9),
     dict(grid=dpmjax.Grid(steps=6), thresholding=dpmjax.Thresholding(ratio=0.9))),
    (dict(method="adaptive", order=2, rtol=0.1),
     dict(method=dpmjax.Adaptive(order=2, rtol=0.1))),
]


@pytest.mark.parametrize("flat, objects", PAIRS, ids=[str(i) for i in range(len(PAIRS))])
def test_flat_keywords_and_objects_give_the_same_sample(problem, flat, objects):
    schedule, gm, model_fn = problem
    key = jax.random.key(3)
    a = dpmjax.sample(model_fn, gm, key, (64, 2), schedule=schedule, **flat)
    b = dpmjax.sample(model_fn, gm, key, (64, 2), schedule=schedule, **objects)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the one mapping: from_keywords gives the objects themselves
    method, grid, thresholding = dpmjax.from_keywords(**flat)
    assert method == objects.get("method", dpmjax.DPMSolverPP())
    assert thresholding == objects.get("thresholding")


def test_a_built_solver_samples_like_its_options(problem):
    schedule, gm, model_fn = problem
    solver = dpmjax.solver(schedule, dpmjax.UniPC(order=2), dpmjax.Grid(steps=6, skip_type="logSNR"))
    key = jax.random.key(0)
    a = dpmjax.sample(model_fn, gm, key, (32, 2), solver=solver)
    b = dpmjax.sample(model_fn, gm, key, (32, 2), schedule=schedule, method=dpmjax.UniPC(order=2),
                      grid=dpmjax.Grid(steps=6, skip_type="logSNR"))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="schedule cannot be combined with solver="):
        dpmjax.sample(model_fn, gm, key, (32, 2), solver=solver, schedule=schedule)
    with pytest.raises(ValueError, match="steps cannot be combined with solver="):
        dpmjax.sample(model_fn, gm, key, (32, 2), solver=solver, steps=6)


def test_solution_holds_the_sample_states_and_statistics(problem):
    schedule, gm, model_fn = problem
    key = jax.random.key(1)
    sol = dpmjax.solve(model_fn, gm, key, (16, 2), schedule=schedule, grid=dpmjax.Grid(steps=5), save_states=True)
    x, states, info = dpmjax.sample(model_fn, gm, key, (16, 2), schedule=schedule, steps=5,
                                    return_intermediate=True, return_info=True)
    np.testing.assert_array_equal(np.asarray(sol.x), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(sol.states), np.asarray(states))
    assert sol.states.shape == (6, 16, 2) and int(sol.stats["nfe"]) == int(info["nfe"]) == 5
    np.testing.assert_array_equal(np.asarray(sol.states[-1]), np.asarray(sol.x))
    # a pytree: it passes through jit
    out = jax.jit(lambda s: s)(sol)
    assert isinstance(out, dpmjax.Solution)


@pytest.mark.parametrize("make, match", [
    (lambda: dpmjax.DPMSolverPP(order=4), "order must be in 1..3"),
    (lambda: dpmjax.SDEDPMSolver(order=3), "order must be in 1..2"),
    (lambda: dpmjax.UniPC(variant="bh3"), "variant must be one of"),
    (lambda: dpmjax.UniPC(disable_corrector=[0.5]), "disable_corrector entries must be an int"),
    (lambda: dpmjax.UniPC(disable_corrector="0"), "disable_corrector must be a tuple of ints"),
    (lambda: dpmjax.UniPC(disable_corrector=[True]), "disable_corrector entries must be an int"),
    (lambda: dpmjax.DPMSolverPP(orders=(1, 3)), "orders must not exceed order"),
    (lambda: dpmjax.Adaptive(theta=1.5), r"theta .* must be in \(0, 1\]"),
    (lambda: dpmjax.Adaptive(order=1), "needs order 2 or 3"),
    (lambda: dpmjax.V3(), "method='v3' needs ems="),
    (lambda: dpmjax.Grid(steps=0), "steps must be in"),
    (lambda: dpmjax.Grid(skip_type="uniform"), "skip_type must be one of"),
    (lambda: dpmjax.Thresholding(ratio=1.5), "dynamic_thresholding_ratio must be a fraction"),
])
def test_objects_check_their_options_when_built(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_options_a_method_does_not_have_cannot_be_given(problem):
    schedule, gm, model_fn = problem
    with pytest.raises(TypeError):
        dpmjax.DPMSolverPP(variant="bh1")  # the constructor has no such option
    # the flat spelling keeps its errors, derived from the classes' fields
    with pytest.raises(ValueError, match=r"variant='bh1' does not apply to method='multistep'.*'unipc'"):
        dpmjax.solver(schedule, method="multistep", variant="bh1")
    with pytest.raises(ValueError, match=r"atol=0.1 does not apply to method='unipc'"):
        dpmjax.solver(schedule, method="unipc", atol=0.1)
    # an option of the method beside a method object is refused, not ignored
    with pytest.raises(ValueError, match="order is an option of the method"):
        dpmjax.solver(schedule, dpmjax.UniPC(), order=3)
    with pytest.raises(ValueError, match="either as grid= or as steps="):
        dpmjax.solver(schedule, dpmjax.UniPC(), dpmjax.Grid(steps=5), steps=5)
    # thresholding numbers without thresholding, skip_type with explicit times: refused
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio=0.9 needs thresholding=True"):
        dpmjax.solver(schedule, dynamic_thresholding_ratio=0.9)
    with pytest.raises(ValueError, match="skip_type='logSNR' cannot be combined with timesteps"):
        dpmjax.solver(schedule, timesteps=np.linspace(1.0, 1e-3, 6), steps=5, skip_type="logSNR")


def _closure_model(i, mb=8):
    """A model closing over a large array (``mb`` MiB), which a leaked cache would keep."""
    big = jnp.full((mb * 1024 * 1024 // 4,), float(i), jnp.float32)
    gm = dpmjax.GaussianMixture.isotropic(MEANS, 0.3)
    base = gm.model_fn(dpmjax.VPLinear())

    def model_fn(params, x, t, condition=None):
        return base(params, x, t) + 0.0 * big[0]

    return model_fn, gm


@pytest.mark.slow
def test_model_functions_are_released_after_their_calls():
    """Closures, each capturing a large array, are all garbage after their ``sample``,
    ``fit_timesteps``, ``compute_ems`` and ``fit_solver`` calls: nothing module-level holds
    them (a cache that held them strongly, of any size, would keep at least the last one of
    each kind)."""
    schedule = dpmjax.VPLinear()
    base = dpmjax.solver(schedule, steps=3, method="unipc")
    refs = []
    for i in range(5):
        model_fn, gm = _closure_model(i)
        which = i
        if which == 0:
            dpmjax.sample(model_fn, gm, jax.random.key(i), (8, 2), schedule=schedule, grid=dpmjax.Grid(steps=3))
        elif which == 1:
            dpmjax.sample(model_fn, gm, jax.random.key(i), (8, 2), schedule=schedule, method=dpmjax.Adaptive(),
                          condition=jnp.zeros((8,)), guidance=dpmjax.ClassifierFree(jnp.ones((8,)), 2.0))
        elif which == 2:
            dpmjax.fit_timesteps(model_fn, gm, jax.random.key(i), (8, 2), schedule=schedule, steps=3,
                                 n_candidates=6, fine_steps=12, refine_iters=2)
        elif which == 3:
            dpmjax.compute_ems(model_fn, gm, jax.random.key(i), (2,), schedule=schedule,
                               data=jnp.zeros((4, 2)) + MEANS[0], n_lambdas=5, smooth_dl=0, lambdas_per_call=5)
        else:
            dpmjax.fit_solver(model_fn, gm, jax.random.key(i), (8, 2), schedule=schedule, steps=3, base=base,
                              iters=2, teacher_steps=12)
        refs.append(weakref.ref(model_fn))
        del model_fn, gm
    gc.collect()
    assert [i for i, r in enumerate(refs) if r() is not None] == []


def test_a_schedule_and_its_built_solvers_are_released():
    refs = []
    for n in range(5):
        schedule = dpmjax.VPDiscrete.from_named("linear", 1000 + n)
        solver = dpmjax.solver(schedule, dpmjax.DPMSolverPP(), dpmjax.Grid(steps=5))
        assert dpmjax.solver(schedule, dpmjax.DPMSolverPP(), dpmjax.Grid(steps=5)) is solver  # built once
        refs.append(weakref.ref(schedule))
        del schedule, solver
    gc.collect()
    assert all(r() is None for r in refs)


def test_new_values_never_recompile(problem):
    """A new key, new parameters, a new guidance scale and new grid values reuse the
    compiled programs (only structure compiles)."""
    schedule, _, _ = problem

    def model_fn(params, x, t, c):
        return params["w"] * x + c[:, None] * 0.1

    cond, uncond = jnp.ones((16,)), jnp.zeros((16,))
    ts = np.asarray(dpmjax.time_grid(schedule, "logSNR", 1.0, 1e-3, 6))

    def run(seed, w, scale, grid):
        return dpmjax.sample(model_fn, {"w": jnp.asarray(w)}, jax.random.key(seed), (16, 2), schedule=schedule,
                             method=dpmjax.UniPC(), grid=dpmjax.FittedGrid(jnp.asarray(grid)), condition=cond,
                             guidance=dpmjax.ClassifierFree(uncond, scale))

    run(0, 0.5, 2.0, ts)
    assert library_programs(compiled_during(lambda: run(1, 0.7, 3.5, ts * 0.999))) == []
    assert library_programs(compiled_during(lambda: run(2, 0.9, 1.0, ts))) == []
    # positive control: a new structure (steps) compiles
    assert library_programs(compiled_during(lambda: run(0, 0.5, 2.0, ts[1:])))


def _cond_mixture(schedule):
    """A conditional model: condition c in {0, 1} selects one of two Gaussians."""
    gms = [dpmjax.GaussianMixture.isotropic(MEANS[i:i + 1], 0.3 + 0.2 * i) for i in range(2)]
    fns = [g.model_fn(schedule) for g in gms]

    def model_fn(params, x, t, c):
        w = c.astype(x.dtype)[:, None]
        return (1 - w) * fns[0](gms[0], x, t) + w * fns[1](gms[1], x, t)

    return model_fn


@pytest.mark.slow
def test_compute_ems_of_a_guided_conditional_model_equals_the_hand_written_guided_model(x64):
    # float64: the s regression divides by a small variance, which magnifies float32 rounding
    schedule = dpmjax.VPLinear()
    model_fn = _cond_mixture(schedule)
    K, scale = 64, 2.5
    data = jax.random.normal(jax.random.key(5), (K, 2))
    cond, uncond = jnp.ones((K,), jnp.int32), jnp.zeros((K,), jnp.int32)

    def guided_by_hand(params, x, t):
        b = x.shape[0]
        out_c = model_fn(params, x, t, jnp.ones((b,), jnp.int32))
        out_u = model_fn(params, x, t, jnp.zeros((b,), jnp.int32))
        return out_u + scale * (out_c - out_u)

    kw = dict(schedule=schedule, data=data, n_lambdas=9, smooth_dl=0, batch_size=32)
    ems = dpmjax.compute_ems(model_fn, None, jax.random.key(0), (2,), condition=cond,
                             guidance=dpmjax.ClassifierFree(uncond, scale), **kw)
    ref = dpmjax.compute_ems(guided_by_hand, None, jax.random.key(0), (2,), **kw)
    for name in ("l", "s", "b"):  # equal up to the rounding of two ways of forming the same sums
        want = np.asarray(getattr(ref, name))
        np.testing.assert_allclose(np.asarray(getattr(ems, name)), want, rtol=1e-6,
                                   atol=1e-6 * max(1.0, np.max(np.abs(want))))
    # the guidance matters: the unguided conditional model's statistics differ
    plain = dpmjax.compute_ems(model_fn, None, jax.random.key(0), (2,), condition=cond, **kw)
    assert not np.allclose(np.asarray(plain.b), np.asarray(ems.b), atol=1e-3)


@pytest.mark.slow
def test_fit_timesteps_with_classifier_guidance_equals_the_hand_written_guided_model():
    schedule = dpmjax.VPLinear()  # model time = t, so the hand-written model knows sigma
    gm = dpmjax.GaussianMixture.isotropic(MEANS, 0.4)
    base = gm.model_fn(schedule)
    scale = 1.5

    def classifier_fn(x, t, c):  # log p(c | x): a logistic classifier on the first coordinate
        return jax.nn.log_sigmoid(2.0 * x[:, 0] * (2 * c.astype(x.dtype) - 1))

    cond = jnp.ones((32,), jnp.int32)

    def guided_by_hand(params, x, t):
        g = jax.grad(lambda x_: jnp.sum(classifier_fn(x_, t, cond)))(x)
        return base(params, x, t) - scale * schedule.sigma(t)[:, None] * g

    kw = dict(schedule=schedule, steps=4, n_candidates=8, fine_steps=32, refine_iters=5, model_times=False)
    grid = dpmjax.fit_timesteps(base, gm, jax.random.key(2), (32, 2), condition=cond,
                                guidance=dpmjax.ClassifierGuidance(classifier_fn, scale), **kw)
    ref = dpmjax.fit_timesteps(guided_by_hand, gm, jax.random.key(2), (32, 2), **kw)
    np.testing.assert_allclose(np.asarray(grid.timesteps), np.asarray(ref.timesteps), rtol=1e-4, atol=1e-6)
    unguided = dpmjax.fit_timesteps(base, gm, jax.random.key(2), (32, 2), **kw)
    assert not np.allclose(np.asarray(unguided.timesteps), np.asarray(grid.timesteps), rtol=1e-3)


def test_fitting_loops_compile_their_step_once_with_committed_parameters():
    """Parameters read from a checkpoint are committed to a device, so every program's
    outputs are; the optimiser loops start from arrays placed the same way, so their step
    program compiles once, not once for the start and again for every later step."""
    schedule = dpmjax.VPLinear()
    gm = jax.device_put(dpmjax.GaussianMixture.isotropic(MEANS, 0.3), jax.devices()[0])
    model_fn = gm.model_fn(schedule)
    msgs = compiled_during(lambda: dpmjax.fit_timesteps(
        model_fn, gm, jax.random.key(0), (16, 2), schedule=schedule, steps=3, n_candidates=6, fine_steps=12,
        refine_iters=3).timesteps)
    assert sum("jit(_refine_step)" in m for m in msgs) == 1
    base = dpmjax.solver(schedule, steps=3, method="unipc")
    msgs = compiled_during(lambda: dpmjax.fit_solver(
        model_fn, gm, jax.random.key(0), (16, 2), schedule=schedule, steps=3, base=base, iters=3,
        teacher_steps=12).plan.ax)
    assert sum("jit(update)" in m for m in msgs) == 1
