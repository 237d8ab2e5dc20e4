"""Learned solvers (dpmjax.fit_solver, save_solver, load_solver).

The parametrisation is tested against closed forms: zero parameters are the base method's
tables bit for bit; for *any* parameters a model whose prediction is constant is solved
exactly (the probability-flow ODE's trajectories are then ``Q(t) c + P(t) z``, see
dpmjax/learned.py), which is the first-order consistency the corrections keep; gradients
match central finite differences in float64. The fit is tested on Gaussian mixtures,
whose exact noise predictor needs no training.
"""

import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax import learned


def _mixture():
    return dpmjax.GaussianMixture.isotropic(jnp.array([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.2]]), 0.1)


BASES = [
    dict(method="unipc", variant="bh2", order=2),
    dict(method="unipc", variant="bh1", order=3),
    dict(method="multistep", order=2),
    dict(method="multistep", order=3, algorithm="dpmsolver"),
]


def _random_params(frame, key, scale=0.3):
    zero = learned._zero_params(frame)
    leaves, tree = jax.tree_util.tree_flatten(zero)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [scale * jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)])


def _tables(solver):
    return {k: np.asarray(v) for k, v in solver.plan._asdict().items() if v is not None}


@pytest.mark.parametrize("kw", BASES, ids=lambda kw: "-".join(map(str, kw.values())))
def test_zero_parameters_are_the_base_exactly(kw):
    schedule = dpmjax.VPLinear()
    grid = dpmjax.time_grid(schedule, "logSNR", 1.0, 1e-3, 6)
    base = dpmjax.solver(schedule, steps=6, timesteps=grid, model_timesteps=grid[:-1] * 0.97, **kw)
    frame = learned._frame(base, schedule)
    zero = learned._zero_params(frame)
    for fn in (lambda th: learned._solver_of(frame, schedule, th), jax.jit(
            lambda th: learned._solver_of(frame, schedule, th))):
        s = fn(zero)
        a, b = _tables(s), _tables(base)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert s.options == base.options and s.layout == base.layout
    gm = _mixture()
    x_T = jax.random.normal(jax.random.key(0), (64, 2))
    run = jax.jit(lambda s: learned._run(s, gm.model_fn(schedule), gm, x_T))
    np.testing.assert_array_equal(run(learned._solver_of(frame, schedule, zero)), run(base))
    # and a nonzero parameter does change the tables (the comparison above can fail)
    moved = learned._solver_of(frame, schedule, _random_params(frame, jax.random.key(1)))
    assert not np.array_equal(np.asarray(moved.plan.cx), np.asarray(base.plan.cx))
    assert not np.array_equal(np.asarray(moved.plan.t_eval), np.asarray(base.plan.t_eval))


@pytest.mark.parametrize("kw", BASES, ids=lambda kw: "-".join(map(str, kw.values())))
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])  # a second draw: the full tier
def test_any_parameters_solve_a_constant_prediction_exactly(x64, kw, seed):
    """Data prediction constant c (dpmsolver++: model_type x_start) or noise prediction
    constant e (dpmsolver: model_type noise): the exact solution is Q(t) c + P(t) z; every
    corrected solver must return it for any parameters (grid, network times, weights)."""
    schedule = dpmjax.VPLinear()
    noise_alg = kw.get("algorithm") == "dpmsolver"
    model_type = "noise" if noise_alg else "x_start"
    base = dpmjax.solver(schedule, steps=5, skip_type="logSNR", model_type=model_type, **kw)
    frame = learned._frame(base, schedule)
    params = _random_params(frame, jax.random.key(seed), scale=0.5)
    s = learned._solver_of(frame, schedule, params)
    c = jnp.array([0.7, -1.3, 0.2])

    def model_fn(_, x, t):
        return jnp.broadcast_to(c, x.shape)

    x_T = jax.random.normal(jax.random.key(seed + 10), (8, 3), jnp.float64)
    x = learned._run(s, model_fn, None, x_T)
    t0, t1 = 1.0, 1e-3
    a0, s0, a1, s1 = (float(f(jnp.float64(t))) for t in (t0, t1) for f in (schedule.alpha, schedule.sigma))
    if noise_alg:  # x = alpha w + sigma e
        exact = a1 * (x_T - s0 * c) / a0 + s1 * c
    else:  # x = alpha c + sigma z
        exact = a1 * c + s1 * (x_T - a0 * c) / s0
    np.testing.assert_allclose(x, exact, rtol=1e-10, atol=1e-10)
    # the corrections are not trivial: a non-constant model sees a different solver
    gm = _mixture()
    y0 = learned._run(base, gm.model_fn(schedule), gm, x_T[:, :2])
    y1 = learned._run(s, gm.model_fn(schedule), gm, x_T[:, :2])
    assert float(jnp.max(jnp.abs(y0 - y1))) > 1e-3


def test_consistency_breaks_without_the_constraint(x64):
    """The exactness above is the constraint's doing: the same size of correction on one
    weight alone (no zero sum) misses the constant-prediction solution."""
    schedule = dpmjax.VPLinear()
    base = dpmjax.solver(schedule, steps=5, skip_type="logSNR", model_type="x_start", method="multistep")
    bad = base.plan._replace(cx=base.plan.cx.at[3, 0].add(0.05))
    s = jax.tree_util.tree_map(lambda a: a, base)
    s = type(base)(plan=bad, start_scale=s.start_scale, end_scale=s.end_scale, prior_std=s.prior_std,
                   options=s.options, layout=s.layout)
    c = jnp.array([0.7, -1.3])
    x_T = jax.random.normal(jax.random.key(3), (8, 2), jnp.float64)
    x = learned._run(s, lambda _, x, t: jnp.broadcast_to(c, x.shape), None, x_T)
    a0, s0 = schedule.alpha(1.0), schedule.sigma(1.0)
    exact = schedule.alpha(1e-3) * c + schedule.sigma(1e-3) * (x_T - a0 * c) / s0
    assert float(jnp.max(jnp.abs(x - exact))) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("unroll", [False, True], ids=["scan-checkpoint", "unrolled"])
@pytest.mark.parametrize("kw", [BASES[0], BASES[2]], ids=["unipc", "multistep"])
def test_gradient_matches_finite_differences(x64, kw, unroll):
    """Both ways fit_solver differentiates the sampler (``remat=True``: a scan of
    checkpointed steps; ``False``: unrolled) against central differences."""
    schedule = dpmjax.VPLinear()
    gm = _mixture()
    model_fn = gm.model_fn(schedule)
    base = dpmjax.solver(schedule, steps=5, skip_type="logSNR", **kw)
    frame = learned._frame(base, schedule)
    x_T = jax.random.normal(jax.random.key(0), (32, 2), jnp.float64)
    ref = learned._run(dpmjax.solver(schedule, steps=200, order=3, skip_type="logSNR"), model_fn, gm, x_T)

    def loss(theta):
        s = learned._solver_of(frame, schedule, theta)
        return learned._rms(learned._run(s, model_fn, gm, x_T, remat=not unroll, unroll=unroll), ref)

    theta = _random_params(frame, jax.random.key(1), scale=0.1)
    g = jax.grad(loss)(theta)
    for i in range(3):
        v = _random_params(frame, jax.random.key(10 + i), scale=1.0)
        eps = 1e-5
        plus = loss(jax.tree_util.tree_map(lambda a, b: a + eps * b, theta, v))
        minus = loss(jax.tree_util.tree_map(lambda a, b: a - eps * b, theta, v))
        fd = (plus - minus) / (2 * eps)
        an = sum(float(jnp.sum(a * b)) for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(v)))
        assert abs(an) > 1e-6
        np.testing.assert_allclose(an, float(fd), rtol=1e-5)


# --------------------------------------------------------------------------- files


def _corrected(schedule, seed=0, **kw):
    base = dpmjax.solver(schedule, steps=5, skip_type="logSNR", **(kw or BASES[0]))
    frame = learned._frame(base, schedule)
    return learned._solver_of(frame, schedule, _random_params(frame, jax.random.key(seed), 0.2))


@pytest.mark.parametrize("schedule", [dpmjax.VPLinear(), dpmjax.VPDiscrete.from_named("linear", 1000), dpmjax.EDM()],
                         ids=["VPLinear", "VPDiscrete", "EDM"])
def test_save_load_round_trip_is_exact(tmp_path, schedule):
    s = _corrected(schedule)
    path = tmp_path / "solver-5"
    dpmjax.save_solver(path, s, schedule=schedule, sample_shape=(2,), note="five")
    old = os.umask(0o022)
    os.umask(old)
    assert (os.stat(path).st_mode & 0o777) == 0o666 & ~old
    assert [p.name for p in tmp_path.iterdir()] == ["solver-5"]  # no temporary file left behind
    t = dpmjax.load_solver(path, schedule=schedule, sample_shape=(2,))
    a, b = _tables(s), _tables(t)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for k in ("start_scale", "end_scale", "prior_std"):
        np.testing.assert_array_equal(getattr(s, k), getattr(t, k))
    assert t.options == s.options and t.layout == s.layout
    assert learned.load_solver_metadata(path)["metadata"] == {"note": "five"}
    gm = _mixture()
    x_T = jax.random.normal(jax.random.key(0), (16, 2)) * s.prior_std
    run = jax.jit(lambda s: learned._run(s, gm.model_fn(schedule), gm, x_T))
    np.testing.assert_array_equal(run(s), run(t))


def test_load_refuses_another_schedule_or_shape(tmp_path):
    schedule = dpmjax.VPLinear()
    s = _corrected(schedule)
    path = tmp_path / "s.npz"
    dpmjax.save_solver(path, s, schedule=schedule, sample_shape=(2,))
    for other in (dpmjax.VPCosine(), dpmjax.VPLinear(beta_max=10.0), dpmjax.VPDiscrete.from_named("linear", 1000)):
        with pytest.raises(ValueError, match="another schedule"):
            dpmjax.load_solver(path, schedule=other)
    with pytest.raises(ValueError, match="shape"):
        dpmjax.load_solver(path, sample_shape=(3,))
    # without a recorded description the tables themselves are checked, after the times
    dpmjax.save_solver(path, s)
    dpmjax.load_solver(path, schedule=schedule)
    with pytest.raises(ValueError, match="another schedule: its alpha table"):
        dpmjax.load_solver(path, schedule=dpmjax.VPLinear(beta_max=10.0))
    # VPCosine ends at T = 0.9946 < 1: its tables would be NaN at t = 1, so the times are refused first
    with pytest.raises(ValueError, match=r"another schedule: it evaluates the model at t = 1, beyond the given "
                                         r"VPCosine's T = 0\.99"):
        dpmjax.load_solver(path, schedule=dpmjax.VPCosine())


def test_load_names_the_precision_of_a_valid_file(tmp_path, x64):
    """A float32 solver loaded with jax_enable_x64 on is a valid file in the other precision: the
    error says which switch to flip, not that the file is invalid."""
    path = tmp_path / "s.npz"
    with jax.enable_x64(False):
        schedule = dpmjax.VPLinear()
        dpmjax.save_solver(path, _corrected(schedule), schedule=schedule)
    with pytest.raises(ValueError, match="computes in float32, but JAX computes in float64 now") as e:
        dpmjax.load_solver(path)
    assert "not a valid" not in str(e.value)


def _rewrite(src, dst, change):
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    np.savez(dst, **arrays)


def test_load_refuses_corrupt_and_foreign_files(tmp_path):
    import json

    schedule = dpmjax.VPLinear()
    s = _corrected(schedule)
    good = tmp_path / "good.npz"
    dpmjax.save_solver(good, s, schedule=schedule)
    data = good.read_bytes()
    cases = {}
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    cases["trunc.npz"] = "not a dpmjax solver file"
    (tmp_path / "text.npz").write_text("hello")
    cases["text.npz"] = r"not a dpmjax solver file \(not an .npz archive\)"
    np.savez(tmp_path / "foreign.npz", a=np.zeros(3))
    cases["foreign.npz"] = "not a dpmjax solver file"

    def meta(fn):
        def change(arrays):
            doc = json.loads(str(arrays["metadata"]))
            fn(doc)
            arrays["metadata"] = np.asarray(json.dumps(doc))
        return change

    variants = {
        "format.npz": (meta(lambda d: d.update(format="other")), "format"),
        "version.npz": (meta(lambda d: d.update(format_version=99)), "format version 99"),
        "options.npz": (meta(lambda d: d["options"].pop("order")), "missing"),
        "method.npz": (meta(lambda d: d["options"].update(method="euler")), "method"),
        "layout.npz": (meta(lambda d: d["layout"].update(x_step=[1, 2])), "layout"),
        "nan.npz": (lambda a: a.__setitem__("plan/cx", a["plan/cx"] * np.nan), "not finite"),
        "shape.npz": (lambda a: a.__setitem__("plan/ax", a["plan/ax"][:-1]), "one row per evaluation"),
        "slot.npz": (lambda a: a.__setitem__("plan/slot", a["plan/slot"] + 7), "slot"),
        "missing.npz": (lambda a: a.pop("plan/cy"), "plan fields"),
        "dtype.npz": (lambda a: a.__setitem__("plan/ax", a["plan/ax"].astype(np.float16)), "dtype"),
    }
    for name, (change, msg) in variants.items():
        _rewrite(good, tmp_path / name, change)
        cases[name] = msg
    for name, msg in cases.items():
        with pytest.raises(ValueError, match=msg):
            dpmjax.load_solver(tmp_path / name)
    with pytest.raises(ValueError, match="does not exist"):
        dpmjax.load_solver(tmp_path / "nothing.npz")
    with pytest.raises(TypeError, match="path"):
        dpmjax.load_solver(3)
    assert zipfile.is_zipfile(good)


def test_save_is_atomic_and_refuses_bad_input(tmp_path):
    schedule = dpmjax.VPLinear()
    s = _corrected(schedule)
    path = tmp_path / "s.npz"
    dpmjax.save_solver(path, s)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="JSON"):
        dpmjax.save_solver(path, s, bad=object())
    for shape in ((0,), ()):
        with pytest.raises(ValueError, match="sample_shape must be a non-empty tuple of positive ints"):
            dpmjax.save_solver(path, s, sample_shape=shape)
    with pytest.raises(FileNotFoundError, match="cannot create a file in") as e:
        dpmjax.save_solver(tmp_path / "no-such-dir" / "s.npz", s)
    assert e.value.filename == str(tmp_path / "no-such-dir" / "s.npz")  # the target, not a temporary name
    with pytest.raises(TypeError, match="solver"):
        dpmjax.save_solver(path, "solver")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


# --------------------------------------------------------------------------- fit


def _fit_setup(n=96, steps=4, **kw):
    schedule = dpmjax.VPLinear()
    gm = _mixture()
    base = dpmjax.solver(schedule, steps=steps, skip_type="time_uniform", **(kw or BASES[0]))
    x = jax.random.normal(jax.random.key(5), (n, 2))
    return schedule, gm, base, x


def _heldout_error(solver, schedule, gm, x, holdout, steps=400, loss="rms"):
    xv = x[x.shape[0] - holdout:]
    teacher = dpmjax.solver(schedule, steps=steps, order=3, skip_type="logSNR")
    ref = np.asarray(learned._run(teacher, gm.model_fn(schedule), gm, xv), np.float64)
    d = np.asarray(learned._run(solver, gm.model_fn(schedule), gm, xv), np.float64) - ref
    if loss == "rms":
        return float(np.sqrt(np.mean(d**2)))
    return float(np.mean(np.sqrt(np.mean(d**2, axis=1))))  # the mean of the per-sample RMS distances


def test_mean_distance_is_the_mean_per_sample_distance():
    x = jnp.asarray([[3.0, 4.0], [1.0, 1.0], [0.0, 0.0]])
    ref = jnp.asarray([[0.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    want = (np.sqrt(12.5) + 0.0 + np.sqrt(2.0)) / 3  # per-sample RMS over the 2 coordinates
    np.testing.assert_allclose(float(learned._mean_distance(x, ref)), want, rtol=1e-6)
    np.testing.assert_allclose(float(learned._rms(x, ref)), np.sqrt((25 + 0 + 4) / 6), rtol=1e-6)
    # a sample equal to its reference contributes a zero (finite) gradient
    g = jax.grad(learned._mean_distance)(x, ref)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g[1]) == 0)


@pytest.mark.slow
@pytest.mark.parametrize("kw,loss", [(BASES[0], "rms"), (BASES[2], "rms"), (BASES[0], "mean")],
                         ids=["unipc", "multistep", "unipc-mean-loss"])
def test_fit_improves_and_is_never_worse_on_heldout(kw, loss):
    schedule, gm, base, x = _fit_setup(**kw)
    s, info = dpmjax.fit_solver(gm.model_fn(schedule), gm, None, x.shape, noise=x, schedule=schedule, steps=4,
                                base=base, iters=60, lr=0.03, loss=loss, return_info=True)
    assert info["improved"] and s is not base
    assert s.options == base.options and s.layout == base.layout
    e_base = _heldout_error(base, schedule, gm, x, 24, loss=loss)
    e_fit = _heldout_error(s, schedule, gm, x, 24, loss=loss)
    np.testing.assert_allclose(e_base, info["start_loss"], rtol=1e-4)
    np.testing.assert_allclose(e_fit, info["heldout_loss"], rtol=1e-4)
    assert e_fit < e_base


@pytest.mark.slow
def test_fit_returns_the_start_when_nothing_improves():
    schedule, gm, base, x = _fit_setup()
    model_fn = gm.model_fn(schedule)
    s, info = dpmjax.fit_solver(model_fn, gm, None, x.shape, noise=x, schedule=schedule, steps=4, base=base,
                                iters=0, return_info=True)
    assert s is base and not info["improved"] and info["iterations"] == 0
    # a learning rate that wrecks every step: the start comes back
    s, info = dpmjax.fit_solver(model_fn, gm, None, x.shape, noise=x, schedule=schedule, steps=4, base=base,
                                iters=20, lr=50.0, eval_every=5, return_info=True)
    assert s is base and info["heldout_loss"] == info["start_loss"]


@pytest.mark.slow
def test_fit_is_deterministic_for_a_key():
    schedule, gm, base, x = _fit_setup()
    model_fn = gm.model_fn(schedule)
    kw = dict(schedule=schedule, steps=4, base=base, iters=20, lr=0.03, batch_size=32)
    a = dpmjax.fit_solver(model_fn, gm, jax.random.key(3), (64, 2), **kw)
    b = dpmjax.fit_solver(model_fn, gm, jax.random.key(3), (64, 2), **kw)
    for k, v in _tables(a).items():
        np.testing.assert_array_equal(v, _tables(b)[k], err_msg=k)


@pytest.mark.slow
def test_fit_is_the_same_with_and_without_remat(x64):
    """``remat`` changes how the sampler is differentiated, not what: the same held-out
    losses along the fit and the same tables."""
    schedule, gm, base, x = _fit_setup()
    kw = dict(noise=x, schedule=schedule, steps=4, base=base, iters=20, lr=0.03, eval_every=5, return_info=True)
    a, ia = dpmjax.fit_solver(gm.model_fn(schedule), gm, None, x.shape, remat=True, **kw)
    b, ib = dpmjax.fit_solver(gm.model_fn(schedule), gm, None, x.shape, remat=False, **kw)
    assert ia["improved"] and ib["improved"]
    np.testing.assert_allclose(list(ia["history"].values())[0], list(ib["history"].values())[0], rtol=1e-9)
    for k, v in _tables(a).items():
        np.testing.assert_allclose(v, _tables(b)[k], rtol=1e-9, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_guidance_scale_given_as_a_number_or_an_array_is_the_same(scale):
    """A Python-number guidance scale picks its branch when traced (no conditional in the
    program); an array scale goes through ``lax.cond``: the same samples."""
    schedule = dpmjax.VPLinear()
    gm = _mixture()

    def model_fn(params, x, t, c):
        return params.eps(x - schedule.alpha(t)[:, None] * c, schedule.alpha(t), schedule.sigma(t))

    s = dpmjax.solver(schedule, steps=4, **BASES[0])
    x = jax.random.normal(jax.random.key(5), (16, 2))
    c = jnp.tile(jnp.array([[0.5, 0.0]]), (16, 1))
    run = jax.jit(lambda sc: learned._run(s, model_fn, gm, x, c, jnp.zeros_like(c), sc, unroll=True))
    by_number = jax.jit(lambda: learned._run(s, model_fn, gm, x, c, jnp.zeros_like(c), scale, unroll=True))()
    np.testing.assert_allclose(by_number, run(jnp.float32(scale)), rtol=1e-6, atol=1e-6)
    if scale != 1.0:  # and guidance is applied: not the unguided samples
        assert float(jnp.max(jnp.abs(by_number - learned._run(s, model_fn, gm, x, c)))) > 1e-2


@pytest.mark.slow
def test_fit_with_classifier_free_guidance():
    """A conditional model (the mixture shifted by a per-sample condition) guided at scale 2:
    the teacher is the guided ODE and the fit improves on it."""
    schedule = dpmjax.VPLinear()
    gm = _mixture()

    def model_fn(params, x, t, c):
        a = schedule.alpha(t)[:, None]
        return params.eps(x - a * c, schedule.alpha(t), schedule.sigma(t))

    n = 96
    x = jax.random.normal(jax.random.key(5), (n, 2))
    cond = jnp.tile(jnp.array([[0.5, 0.0]]), (n, 1))
    base = dpmjax.solver(schedule, steps=4, skip_type="time_uniform", **BASES[0])
    s, info = dpmjax.fit_solver(model_fn, gm, None, x.shape, noise=x, schedule=schedule, steps=4, base=base,
                                condition=cond, unconditional_condition=jnp.zeros_like(cond), guidance_scale=2.0,
                                iters=40, lr=0.03, return_info=True)
    assert info["improved"] and info["heldout_loss"] < info["start_loss"]
    # the teacher is the guided ODE: the start loss equals the base's error against dpmjax.sample's guided solve
    xv, cv = x[72:], cond[72:]
    ref = dpmjax.sample(model_fn, gm, None, xv.shape, noise=xv, schedule=schedule, steps=400, order=3,
                        skip_type="logSNR", condition=cv, unconditional_condition=jnp.zeros_like(cv),
                        guidance_scale=2.0)
    got = dpmjax.sample(model_fn, gm, None, xv.shape, noise=xv, schedule=schedule, steps=4, method="unipc",
                        skip_type="time_uniform", condition=cv, unconditional_condition=jnp.zeros_like(cv),
                        guidance_scale=2.0)
    np.testing.assert_allclose(float(learned._rms(got, ref)), info["start_loss"], rtol=1e-3)


def test_fit_refuses_bad_input():
    schedule, gm, base, x = _fit_setup()
    model_fn = gm.model_fn(schedule)
    kw = dict(noise=x, schedule=schedule, steps=4)
    bad = [
        (dict(base=base, holdout=96), ValueError, "holdout"),
        (dict(base=dpmjax.solver(schedule, steps=4, method="singlestep", order=2)), ValueError, "multistep or UniPC"),
        (dict(base=dpmjax.solver(schedule, steps=4, algorithm="sde-dpmsolver++")), ValueError, "ODE"),
        (dict(base=base, model_type="v"), ValueError, "model_type"),
        (dict(base=dpmjax.solver(schedule, steps=5)), ValueError, "evaluations"),
        (dict(base=base, lr=-1.0), ValueError, "lr"),
        (dict(base=base, t_start=0.5), ValueError, "t_start"),
        (dict(base=base, condition=jnp.zeros((3, 2))), ValueError, "leading axis"),
        (dict(base=base, guidance_scale=2.0), ValueError, "guidance_scale"),
        (dict(base=base, max_time=0.0), ValueError, "max_time"),
        (dict(base=base, loss="l1"), ValueError, "loss must be one of 'rms', 'mean'"),
        (dict(base=base, remat="yes"), TypeError, "remat"),
        (dict(base="unipc"), TypeError, "base"),
        (dict(teacher_steps=401), ValueError, "teacher_steps = 401 has no divisor from steps = 4 to 40"),
        (dict(base=dpmjax.solver(dpmjax.VPCosine(), steps=4, method="unipc")), ValueError, "another schedule"),
        (dict(base=base, eval_every=0), ValueError, "eval_every must be >= 1; got 0"),
    ]
    for extra, err, msg in bad:
        with pytest.raises(err, match=msg):
            dpmjax.fit_solver(model_fn, gm, None, x.shape, **{**kw, **extra})
    # a shape that disagrees with the given noise is refused, not ignored
    with pytest.raises(ValueError, match=r"noise must have shape \(64, 2\) \(the shape argument\); got \(" +
                       str(x.shape[0])):
        dpmjax.fit_solver(model_fn, gm, None, (64, 2), base=base, **kw)


@pytest.mark.slow
def test_default_fits_both_bases_and_keeps_the_better():
    schedule = dpmjax.VPLinear()
    gm = _mixture()
    model_fn = gm.model_fn(schedule)
    x = jax.random.normal(jax.random.key(0), (256, 2))
    s, info = dpmjax.fit_solver(model_fn, gm, None, x.shape, noise=x, schedule=schedule, steps=4, iters=40,
                                base_iters=20, lr=0.03, teacher_steps=200, return_info=True)
    assert set(info["base_losses"]) == set(info["learned_losses"]) == {"UniPC-bh2", "DPM-Solver++(2M)"}
    assert info["start_loss"] == min(info["base_losses"].values())
    # both bases are fitted; the result is the best of the starts and the fits on the held-out noises
    assert info["heldout_loss"] == min(info["start_loss"], *info["learned_losses"].values())
    assert info["heldout_loss"] < info["start_loss"] and info["improved"]
    assert s.options.method == {"UniPC-bh2": "unipc", "DPM-Solver++(2M)": "multistep"}[info["base"]]
    assert info["iterations"] == 2 * 40 and all(len(h) == 4 for h in info["history"].values())
    # each base's grid is fit_timesteps' on the fitting noises, with the teacher as its reference
    # (200 steps; candidates: 40, the largest divisor of 200 up to 40)
    for name, kw in learned.DEFAULT_BASES:
        grid = dpmjax.fit_timesteps(model_fn, gm, None, (192, 2), noise=x[:192], schedule=schedule, steps=4,
                                    order=2, n_candidates=40, fine_steps=200, refine_iters=20, **kw)
        base = info["base_solvers"][name]
        np.testing.assert_allclose(base.plan.t_eval, grid.timesteps[:-1], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(base.plan.t_model, grid.model_timesteps, rtol=1e-5, err_msg=name)


# --------------------------------------------------------------------------- command line


@pytest.mark.slow
def test_cli_fit_solver_and_sample_with_it(capsys, tmp_path, monkeypatch):
    from dpmjax.cli import main

    seen = {}
    fit = dpmjax.fit_solver

    def recording_fit(*a, **kw):  # the CLI's options reach fit_solver
        seen.update(kw)
        return fit(*a, **kw)

    monkeypatch.setattr(dpmjax, "fit_solver", recording_fit)

    run_dir = str(tmp_path / "moons")
    assert main(["train", "--data", "moons", "--steps", "30", "--out", run_dir, "--width", "16", "--depth", "1",
                 "--batch-size", "32", "--no-progress"]) == 0
    out = str(tmp_path / "solver-4.npz")
    code = main(["fit-solver", "--checkpoint", run_dir, "--steps", "4", "--out", out, "--trajectories", "64",
                 "--iters", "20", "--base-iters", "5", "--teacher-steps", "50", "--loss", "mean", "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0 and "4-NFE solver" in text and os.path.isfile(out)
    meta = learned.load_solver_metadata(out)
    assert meta["sample_shape"] == [2] and meta["schedule"]["type"] == "VPLinear" and meta["steps"] == 4
    assert seen["loss"] == "mean" and seen["iters"] == 20 and meta["metadata"]["loss"] == "mean"
    png = str(tmp_path / "s.png")
    code = main(["sample", "--checkpoint", run_dir, "--solver", out, "--num", "100", "--out", png])
    text = capsys.readouterr().out
    assert code == 0 and "4 NFE" in text and os.path.getsize(png) > 500
    code = main(["sample", "--checkpoint", run_dir, "--solver", out, "--order", "3", "--out", png])
    assert code == 2 and "drop --order" in capsys.readouterr().err
    bad = tmp_path / "bad.npz"
    bad.write_text("x")
    code = main(["sample", "--checkpoint", run_dir, "--solver", str(bad), "--out", png])
    assert code == 2 and "not a dpmjax solver file" in capsys.readouterr().err
