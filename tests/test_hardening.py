"""Invalid schedules, time grids, grid files and times are refused with errors that name the
argument, instead of giving NaN (or a broken file) later.

The schedule limits are checked in the dtype the solver computes in: a ``T`` that is fine
in float64 can round onto the singular end of the schedule in float32.
"""

from __future__ import annotations

import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.schedules import check_times_in_range

INF = float("inf")

# (constructor, exception type, text the message must contain)
SCHEDULE_CASES = [
    # T rounds to the singular end (1.0) in float32: lambda = -inf / NaN there
    (lambda: dpmjax.RectifiedFlow(T=0.99999999), ValueError, "T = 0.99999999"),
    (lambda: dpmjax.VPCosine(T=0.99999999), ValueError, "T = 0.99999999"),
    # sigma^2 overflows float32 (log1p(t^2) = inf)
    (lambda: dpmjax.EDM(sigma_max=1e30), ValueError, "sigma_max"),
    (lambda: dpmjax.EDM(sigma_max=INF), ValueError, "sigma_max"),
    (lambda: dpmjax.EDM(sigma_min=0.0), ValueError, "sigma_min"),
    (lambda: dpmjax.EDM(sigma_data=-1.0), ValueError, "sigma_data"),
    (lambda: dpmjax.VPLinear(beta_max=INF), ValueError, "beta_max"),
    (lambda: dpmjax.VPLinear(beta_min=float("nan")), ValueError, "beta_min"),
    # alpha_5 = exp(-124.6) underflows to 0 in float32 (lambda itself is still finite)
    (lambda: dpmjax.VPLinear(T=5.0), ValueError, "T = 5.0"),
    (lambda: dpmjax.VPLinear(T=0.0), ValueError, "T"),
    (lambda: dpmjax.VPLinear(t_eps=2.0), ValueError, "t_eps"),
    (lambda: dpmjax.VPLinear(t_eps=1.0), ValueError, "t_eps"),
    (lambda: dpmjax.VPLinear(t_eps=0.0), ValueError, "t_eps"),
    (lambda: dpmjax.VPCosine(t_eps=0.9946), ValueError, "t_eps"),
    (lambda: dpmjax.RectifiedFlow(t_eps=-1e-3), ValueError, "t_eps"),
    (lambda: dpmjax.RectifiedFlow(T=1.0), ValueError, "T"),
    # not a number
    (lambda: dpmjax.VPLinear(T="1.0"), TypeError, "T"),
    (lambda: dpmjax.VPLinear(beta_min=None), TypeError, "beta_min"),
    (lambda: dpmjax.VPLinear(beta_max=np.array([20.0])), TypeError, "beta_max"),
    (lambda: dpmjax.VPCosine(s=jnp.asarray(0.008)), TypeError, "s"),
    (lambda: dpmjax.EDM(sigma_max="80"), TypeError, "sigma_max"),
    (lambda: dpmjax.RectifiedFlow(T=True), TypeError, "T"),
    (lambda: dpmjax.RectifiedFlow(t_eps=None), TypeError, "t_eps"),
    # discrete tables
    (lambda: dpmjax.VPDiscrete.from_named(["linear"]), TypeError, "name"),
    (lambda: dpmjax.VPDiscrete.from_named(None), TypeError, "name"),
    (lambda: dpmjax.VPDiscrete.from_named("cosine"), ValueError, "name"),
    (lambda: dpmjax.VPDiscrete.from_named("linear", 1000.5), TypeError, "num_train_timesteps"),
    (lambda: dpmjax.VPDiscrete.from_named("linear", beta_start="1e-4"), TypeError, "beta_start"),
    (lambda: dpmjax.VPDiscrete.from_named("linear", beta_start=0.02, beta_end=1e-4), ValueError, "beta_end"),
    (lambda: dpmjax.VPDiscrete.from_named("linear", lambda_min="a"), TypeError, "lambda_min"),
    (lambda: dpmjax.VPDiscrete.from_betas("0.1 0.2"), TypeError, "betas"),
    (lambda: dpmjax.VPDiscrete.from_betas(None), TypeError, "betas"),
    (lambda: dpmjax.VPDiscrete.from_alphas_cumprod(["a", "b"]), TypeError, "alphas_cumprod"),
    # beta = 1e-50 is > 0 in float64 but 0 in float32: alphas_cumprod rounds to 1, sigma to 0
    (lambda: dpmjax.VPDiscrete.from_betas(np.r_[1e-50, np.linspace(1e-4, 0.02, 999)]), ValueError, "log_alphas"),
]


@pytest.mark.parametrize("make, exc, text", SCHEDULE_CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(SCHEDULE_CASES)])
def test_invalid_schedule_is_refused_at_construction(make, exc, text):
    with pytest.raises(exc, match=text.replace(".", r"\.").replace("(", r"\(")):
        make()


def test_limits_follow_the_compute_dtype(x64):
    # In float64 these are representable and finite (alpha_5 = 7e-55 > tiny): accepted.
    lin = dpmjax.VPLinear(T=5.0)
    flow = dpmjax.RectifiedFlow(T=0.99999999)
    for sched in (lin, flow):
        t = jnp.asarray([sched.T, sched.t_eps], jnp.float64)
        chex.assert_tree_all_finite((sched.lambda_(t), sched.log_alpha(t), sched.log_sigma(t)))
    # closed forms at T: log alpha = -T^2 (b1 - b0)/4 - T b0/2; flow lambda = log((1-T)/T)
    np.testing.assert_allclose(float(lin.log_alpha(5.0)), -0.25 * 25 * 19.9 - 0.5 * 5 * 0.1, rtol=1e-14)
    np.testing.assert_allclose(float(flow.lambda_(0.99999999)), math.log(1e-8 / 0.99999999), rtol=1e-7)


def test_accepted_schedules_are_finite_at_both_ends():
    """Positive control: the defaults and limits just inside the float32 range pass, and the
    schedule is finite (alpha, sigma > 0) at T and t_eps in float32."""
    scheds = [
        dpmjax.VPLinear(),
        dpmjax.VPLinear(T=4.0),
        dpmjax.VPCosine(),
        dpmjax.VPCosine(T=0.999),
        dpmjax.EDM(),
        dpmjax.EDM(sigma_max=1e15),
        dpmjax.RectifiedFlow(),
        dpmjax.RectifiedFlow(T=0.9999),
        dpmjax.VPDiscrete.from_named("squaredcos_cap_v2"),
    ]
    for s in scheds:
        t = jnp.asarray([s.T, s.t_eps], jnp.float32)
        vals = (s.lambda_(t), s.alpha(t), s.sigma(t))
        chex.assert_shape(vals, (2,))
        chex.assert_tree_all_finite(vals)
        assert np.all(np.asarray(s.alpha(t)) > 0) and np.all(np.asarray(s.sigma(t)) > 0), s
        assert float(vals[0][0]) < float(vals[0][1]), s
    # the message names the largest usable value (here where alpha_T leaves float32's normal range)
    with pytest.raises(ValueError, match=r"at most about 4\.18"):
        dpmjax.VPLinear(T=5.0)


def test_integer_parameters_become_floats():
    """Static fields are normalised to Python floats (hashable jit keys, one cache entry)."""
    a, b = dpmjax.VPLinear(T=1), dpmjax.VPLinear(T=1.0)
    assert a == b and hash(a) == hash(b) and type(a.T) is float


def test_discrete_t_min_and_t_eps():
    s = dpmjax.VPDiscrete.from_named("linear", 1000)
    assert s.t_min == s.t_eps == 1.0 / 1000
    assert dpmjax.VPLinear().t_min == 0.0
    with pytest.raises(ValueError, match="t_eps"):
        dpmjax.VPDiscrete(t_knots=s.t_knots, log_alphas=s.log_alphas, N=s.N, T=1.0, t_eps=0.5 / s.N)
    with pytest.raises(TypeError, match="N"):
        dpmjax.VPDiscrete(t_knots=s.t_knots, log_alphas=s.log_alphas, N=1000.0, T=1.0, t_eps=1e-3)
    # still a pytree whose tables are traced
    lam = jax.jit(lambda sch, t: sch.lambda_(t))(s, jnp.float32(0.5))
    chex.assert_tree_all_finite(lam)


# --- time_grid --------------------------------------------------------------------------

VP = dpmjax.VPLinear()

GRID_CASES = [
    (dict(n=0), ValueError, "n"),
    (dict(n=-3), ValueError, "n"),
    (dict(n=5.0), TypeError, "n"),
    (dict(n=True), TypeError, "n"),
    (dict(n=np.float32(4)), TypeError, "n"),
    (dict(t_end=0.0), ValueError, "t_end"),
    (dict(t_end=-0.1), ValueError, "t_end"),
    (dict(t_start=0.5, t_end=0.5), ValueError, "t_start"),
    (dict(t_start=0.2, t_end=0.5), ValueError, "t_start"),
    (dict(t_start=np.array([0.9, 0.3]), t_end=np.array([0.5, 0.4])), ValueError, "t_start"),
    (dict(t_start=float("nan")), ValueError, "t_start"),
    (dict(t_start=1.5), ValueError, "t_start"),
    (dict(t_end=None), TypeError, "t_end"),
    (dict(t_start="1.0"), TypeError, "t_start"),
    (dict(skip_type="uniform"), ValueError, "skip_type"),
]


@pytest.mark.parametrize("kw, exc, name", GRID_CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(GRID_CASES)])
def test_time_grid_refuses_bad_arguments(kw, exc, name):
    args = dict(schedule=VP, skip_type="logSNR", t_start=1.0, t_end=1e-3, n=5)
    args.update(kw)
    with pytest.raises(exc, match=name):
        dpmjax.time_grid(**args)


def test_time_grid_discrete_refuses_below_first_step():
    s = dpmjax.VPDiscrete.from_named("linear", 1000)
    with pytest.raises(ValueError, match="t_min"):
        dpmjax.time_grid(s, "time_uniform", 1.0, 0.5e-3, 4)
    ts = dpmjax.time_grid(s, "time_uniform", 1.0, 1e-3, 4)
    np.testing.assert_allclose(np.asarray(ts), np.linspace(1.0, 1e-3, 5), rtol=1e-6)


def test_time_grid_traced_ends_are_not_inspected():
    """Under jit the end points are tracers: no concrete check, the grid is still right
    (also when only one of them is traced)."""
    f = jax.jit(lambda a, b: dpmjax.time_grid(VP, "time_uniform", a, b, 4))
    ts = f(jnp.float32(0.8), jnp.float32(0.2))
    chex.assert_shape(ts, (5,))
    np.testing.assert_allclose(np.asarray(ts), [0.8, 0.65, 0.5, 0.35, 0.2], rtol=1e-6)
    g = jax.jit(lambda a: dpmjax.time_grid(VP, "time_uniform", a, 0.2, 4))
    np.testing.assert_allclose(np.asarray(g(jnp.float32(0.8))), [0.8, 0.65, 0.5, 0.35, 0.2], rtol=1e-6)


def test_time_grid_accepts_edge_cases():
    # one interval: the two end points
    np.testing.assert_allclose(np.asarray(dpmjax.time_grid(VP, "logSNR", 1.0, 1e-3, 1)), [1.0, 1e-3], rtol=1e-6)
    # compared in the compute dtype: 1 + 1e-9 is T = 1 in float32
    assert float(dpmjax.time_grid(VP, "time_uniform", 1.0 + 1e-9, 0.5, 2)[0]) == 1.0
    # a duck-typed schedule without t_min (only what the grid needs): t_end need only be > 0
    duck = type("Duck", (), {"T": 1.0, "lambda_": VP.lambda_, "inverse_lambda": VP.inverse_lambda})()
    np.testing.assert_allclose(np.asarray(dpmjax.time_grid(duck, "time_uniform", 0.9, 0.5, 2)), [0.9, 0.7, 0.5],
                               rtol=1e-6)
    assert dpmjax.FittedGrid(np.array([1.0, 0.5])).model_timesteps is None


# --- grid files ---------------------------------------------------------------------------

GRID = dpmjax.FittedGrid(np.array([0.9, 0.5, 0.1]), np.array([0.85, 0.45]))


def test_load_timesteps_takes_only_file_names(tmp_path):
    # An int used to be opened as a file descriptor (and closed): here a valid grid file.
    good = tmp_path / "g.json"
    good.write_text('{"timesteps": [0.9, 0.1]}')
    fd = os.open(good, os.O_RDONLY)
    try:
        with pytest.raises(TypeError, match="path"):
            dpmjax.load_timesteps(fd)
        os.fstat(fd)  # the caller's descriptor is still open
    finally:
        os.close(fd)
    for bad in (None, 3.0, b"grid.json", ["grid.json"]):
        with pytest.raises(TypeError, match="path"):
            dpmjax.load_timesteps(bad)
    with pytest.raises(TypeError, match="path"):
        dpmjax.save_timesteps(5, GRID)


def test_save_refuses_metadata_that_shadows_the_grid(tmp_path):
    path = tmp_path / "g.json"
    # model_timesteps=None as metadata used to overwrite the grid's network times
    with pytest.raises(ValueError, match="model_timesteps"):
        dpmjax.save_timesteps(path, GRID, model_timesteps=None)
    with pytest.raises(ValueError, match="model_timesteps"):
        dpmjax.save_timesteps(path, GRID.timesteps, model_timesteps=[0.8, 0.4])
    with pytest.raises(TypeError, match="timesteps"):  # Python's own: the parameter's name
        dpmjax.save_timesteps(path, GRID, timesteps=[0.9, 0.1])
    assert not path.exists()


BAD_GRIDS = [
    (np.array([0.1, 0.5, 0.9]), "strictly decreasing"),
    (np.array([0.9, np.nan, 0.1]), "strictly decreasing"),
    (np.array([[0.9, 0.1]]), "strictly decreasing"),
    (np.array([0.9]), "strictly decreasing"),
    (np.array([0.9, 0.5, -0.1]), "strictly decreasing"),
    (dpmjax.FittedGrid(np.array([0.9, 0.5, 0.1]), np.array([0.8])), "model_timesteps"),
    (dpmjax.FittedGrid(np.array([0.9, 0.5, 0.1]), np.array([0.8, np.inf])), "model_timesteps"),
    (np.array(["0.9", "0.1"]), "timesteps"),
]


@pytest.mark.parametrize("grid, text", BAD_GRIDS, ids=[str(i) for i in range(len(BAD_GRIDS))])
@pytest.mark.parametrize("name", ["g.json", "g.npy"])
def test_save_validates_like_load(tmp_path, grid, text, name):
    with pytest.raises(ValueError, match=text):
        dpmjax.save_timesteps(tmp_path / name, grid)
    assert os.listdir(tmp_path) == []  # nothing written, no temporary file left


def test_failed_save_leaves_no_temporary_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.json"
    dpmjax.save_timesteps(path, GRID, note="first")
    before = path.read_text()
    for bad in (dict(obj=object()), dict(value=float("nan")), dict(arr=np.zeros(2))):
        with pytest.raises(ValueError, match="metadata"):
            dpmjax.save_timesteps(path, GRID, **bad)
        assert sorted(os.listdir(tmp_path)) == ["x.json"], os.listdir(tmp_path)
        assert path.read_text() == before
    # a file named like the old temporary name is not the library's to touch
    (tmp_path / "y.json.tmp").write_text("mine")
    dpmjax.save_timesteps(tmp_path / "y.json", GRID)
    assert (tmp_path / "y.json.tmp").read_text() == "mine"


def test_saved_json_is_strict_json_and_round_trips(tmp_path):
    path = tmp_path / "g.json"
    dpmjax.save_timesteps(path, GRID, steps=2, method="unipc")
    doc = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert doc == {"timesteps": [0.9, 0.5, 0.1], "model_timesteps": [0.85, 0.45], "steps": 2, "method": "unipc"}
    back = dpmjax.load_timesteps(path)
    chex.assert_shape((back.timesteps, back.model_timesteps), [(3,), (2,)])
    np.testing.assert_array_equal(back.timesteps, GRID.timesteps)
    np.testing.assert_array_equal(back.model_timesteps, GRID.model_timesteps)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # the usual mode, not the temporary file's 0600


@pytest.mark.parametrize(
    "content",
    [b"", b"\x93NUMPY garbage", b"not a numpy file at all", None],
    ids=["empty", "truncated-header", "text", "pickled-object"],
)
def test_corrupt_npy_names_the_file(tmp_path, content):
    path = tmp_path / "g.npy"
    if content is None:
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="g.npy"):
        dpmjax.load_timesteps(path)


def test_bad_json_contents_name_the_file(tmp_path):
    path = tmp_path / "g.json"
    for text in ('{"timesteps": ["a", "b"]}', '{"timesteps": [0.9, NaN, 0.1]}', "[0.9, 0.1]", "\xff\xfe"):
        path.write_bytes(text.encode("latin-1"))
        with pytest.raises(ValueError, match="g.json"):
            dpmjax.load_timesteps(path)


# --- times at which a schedule is evaluated (add_noise) ------------------------------------

TIME_CASES = [
    (VP, 0.0, None, ValueError),
    (VP, -0.5, None, ValueError),
    (VP, 1.5, None, ValueError),
    (VP, float("nan"), None, ValueError),
    (VP, np.array([0.5, 0.2, 0.1]), 2, ValueError),  # wrong length
    (VP, np.full((2, 1), 0.5), 2, ValueError),  # wrong rank
    (VP, "0.5", None, TypeError),
    (VP, None, None, TypeError),
    (dpmjax.VPDiscrete.from_named("linear", 1000), 0.5e-3, None, ValueError),  # below t_min = 1/N
]


@pytest.mark.parametrize("sched, t, batch, exc", TIME_CASES, ids=[str(i) for i in range(len(TIME_CASES))])
def test_check_times_in_range_refuses(sched, t, batch, exc):
    with pytest.raises(exc, match="t_noise"):
        check_times_in_range(sched, t, name="t_noise", batch_size=batch)


def test_check_times_in_range_accepts():
    check_times_in_range(VP, 1.0)
    check_times_in_range(VP, np.array([1e-3, 0.5, 1.0]), batch_size=3)
    check_times_in_range(dpmjax.VPDiscrete.from_named("linear", 1000), 1e-3)
    # traced: shape only
    jax.jit(lambda t: (check_times_in_range(VP, t, batch_size=2), t)[1])(jnp.array([7.0, -1.0]))
    with pytest.raises(ValueError, match="t"):
        jax.jit(lambda t: (check_times_in_range(VP, t, batch_size=2), t)[1])(jnp.zeros(3))


ADD_NOISE_CASES = [(0.0, "t"), (1.5, "t"), (np.array([0.5, 0.5, 0.5]), "t")]


@pytest.mark.parametrize("t, name", ADD_NOISE_CASES, ids=["zero", "above-T", "length"])
def test_add_noise_refuses_bad_times(t, name):
    with pytest.raises(ValueError, match=name):
        dpmjax.add_noise(VP, jnp.zeros((2, 3)), t, jax.random.key(0))
