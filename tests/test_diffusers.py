"""dpmjax.from_diffusers against diffusers' own loops, recorded by
``scripts/make_diffusers_reference.py`` in ``tests/data/diffusers_reference.npz``.

(a) the grid (solver sigmas), the per-step orders and the network's time values (exactly,
in float32 and float64) equal the recorded ones for every configuration; bad configs raise
ValueError/TypeError naming the key;
(b) ``sample(...)`` ends where diffusers' loop ended (1e-5 relative, float64 under jax.enable_x64),
also for the configs released models ship (``data/scheduler_configs``) as diffusers'
``from_config(...).save_config(...)`` writes them or read with ``scheduler=``.

The toy network, identical to the script's torch version::

    net(x, t)[:, c] = 1.5 * tanh(W[c] * x[:, c mod C] + 0.1 * sin(t / 97) + 0.05 * c)
"""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax import diffusers as dd

DATA = np.load(os.path.join(os.path.dirname(__file__), "data", "diffusers_reference.npz"))
NAMES = [str(n) for n in DATA["names"]]
W = np.array([0.9, -0.7, 1.1, 0.5, -1.2, 0.8, 0.6, -0.9])


def _entry(name):
    mu = float(DATA["mu_" + name])
    return json.loads(str(DATA["config_" + name])), int(DATA["steps_" + name]), (None if np.isnan(mu) else mu)


def _scheduler(name):
    """The class passed as scheduler= ("" in the data: none, the config's own _class_name)."""
    return str(DATA["scheduler_" + name]) or None


def _load(name):
    """from_diffusers on the recorded config (ignored keys are reported in a UserWarning)."""
    cfg, steps, mu = _entry(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return dpmjax.from_diffusers(cfg, steps, mu=mu, scheduler=_scheduler(name))


def _schedule_sigma(schedule, ts):
    """VE noise level exp(-lambda) of the schedule at solver times ``ts`` (0 where ts == 0)."""
    ts = np.asarray(ts, np.float64)
    out = np.zeros_like(ts)
    pos = ts > 0
    with jax.enable_x64(True):
        out[pos] = np.exp(-np.asarray(schedule.lambda_(jnp.asarray(ts[pos]))))
    return out


MAPPED = list(NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("name", MAPPED)
def test_grid_orders_and_network_times_match_diffusers(name):
    schedule, options = _load(name)
    grid = options["timesteps"]
    ts = grid.timesteps if isinstance(grid, dpmjax.FittedGrid) else grid
    model_ts = grid.model_timesteps if isinstance(grid, dpmjax.FittedGrid) else options.get("model_timesteps")
    ref = DATA["sigmas_" + name]
    n = len(ts)
    assert n in (len(ref), len(ref) - 1)  # one fewer: diffusers' zero-length final step is dropped
    if n == len(ref) - 1:  # (its two sigmas equal, or a few float32 ulps apart)
        np.testing.assert_allclose(ref[-1], ref[-2], rtol=4 * np.finfo(np.float32).eps)
    # diffusers' sigma is exp(-lambda) for VP/EDM tables and the flow time itself for flows
    sig = np.asarray(ts) if isinstance(schedule, dpmjax.RectifiedFlow) else _schedule_sigma(schedule, ts)
    np.testing.assert_allclose(sig, ref[:n], rtol=1e-6)
    # network times: diffusers' rounded / truncated indices, flow's int(sigma N), EDM's sigma
    want_t = DATA["model_t_" + name][: n - 1]
    if isinstance(schedule, dpmjax.EDM):  # diffusers feeds c_noise = log(sigma)/4 (see wrap_model)
        with jax.enable_x64(True):
            got_t = 0.25 * np.log(np.asarray(schedule.model_time(jnp.asarray(ts[:-1]))))
        np.testing.assert_allclose(got_t, want_t, rtol=1e-6, atol=1e-3)
    else:  # exactly diffusers' values, in both dtypes, as the solver hands them to the network
        for x64 in (False, True):
            with jax.enable_x64(x64):
                got_t = np.asarray(dpmjax.solvers.network_times(schedule, model_ts), np.float64)
            np.testing.assert_array_equal(got_t, want_t)
    if "orders_" + name in DATA:
        want = list(DATA["orders_" + name])
        if options["method"] == "singlestep":
            want = dd._outer(want)
        assert list(options["orders"]) == want[: len(options["orders"])]
        assert sum(options["orders"]) if options["method"] == "singlestep" else len(options["orders"]) == n - 1


def test_options_are_a_plain_printable_dict():
    _, options = dpmjax.from_diffusers({"_class_name": "UniPCMultistepScheduler", "disable_corrector": [0]}, 5)
    assert type(options) is dict
    text = repr(options)
    for word in ("unipc", "bh2", "disable_corrector", "orders"):
        assert word in text
    assert options["disable_corrector"] == (1,)  # diffusers' 0-based step -> dpmjax's 1-based step


@pytest.mark.parametrize("cfg, word", [
    ({"_class_name": "DPMSolverMultistepScheduler", "use_exponential_sigmas": "yes"}, "use_exponential_sigmas"),
    ({"_class_name": "EulerDiscreteScheduler"}, "EulerDiscreteScheduler"),
    ({"_class_name": "DPMSolverMultistepScheduler", "thresholding": True, "algorithm_type": "dpmsolver",
      "final_sigmas_type": "sigma_min"}, "thresholding"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "deis"}, "algorithm_type"),
    ({"_class_name": "UniPCMultistepScheduler", "solver_p": "x"}, "solver_p"),
    ({"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": None}, "num_train_timesteps"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"}, "sigma_min"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, "mu"),
    ({"prediction_type": "epsilon"}, "scheduler="),
])
def test_unsupported_configs_raise_naming_the_key(cfg, word):
    with pytest.raises(ValueError, match=word):
        dpmjax.from_diffusers(cfg, 10)


def test_file_directory_and_json_errors(tmp_path):
    cfg = {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(cfg))
    s1, o1 = dpmjax.from_diffusers(tmp_path, 8)
    s2, o2 = dpmjax.from_diffusers(str(tmp_path / "scheduler_config.json"), 8)

    class Holder:
        config = cfg

    s3, o3 = dpmjax.from_diffusers(Holder(), 8)
    for o in (o2, o3):
        np.testing.assert_array_equal(o["timesteps"].timesteps, o1["timesteps"].timesteps)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        dpmjax.from_diffusers(bad, 8)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON list"):
        dpmjax.from_diffusers(bad, 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="scheduler_config.json"):
        dpmjax.from_diffusers(empty, 8)
    with pytest.raises(TypeError, match="config"):
        dpmjax.from_diffusers(3, 8)
    with pytest.raises(ValueError, match="num_inference_steps"):
        dpmjax.from_diffusers(cfg, 0)


def test_vpdiscrete_alias(tmp_path):
    cfg = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
    s, model_type = dpmjax.VPDiscrete.from_diffusers_config(cfg)
    s2, _ = dpmjax.from_diffusers({**cfg, "_class_name": "DPMSolverMultistepScheduler"}, 10)
    assert model_type == "v"
    np.testing.assert_array_equal(np.asarray(s.log_alphas), np.asarray(s2.log_alphas))
    with pytest.raises(TypeError, match="config"):
        dpmjax.VPDiscrete.from_diffusers_config(3)  # never opened as a file descriptor
    with pytest.raises(ValueError, match="RectifiedFlow"):
        dpmjax.VPDiscrete.from_diffusers_config({"use_flow_sigmas": True, "prediction_type": "flow_prediction"})
    with pytest.raises(ValueError, match="EDM"):
        dpmjax.VPDiscrete.from_diffusers_config({"_class_name": "EDMDPMSolverMultistepScheduler"})
    with pytest.raises(ValueError, match="num_train_timesteps"):
        dpmjax.VPDiscrete.from_diffusers_config({"num_train_timesteps": None})


def test_zero_snr_table_is_the_rescaled_one():
    """Lin et al. (2024) Alg. 1 in float64: sqrt(abar) shifted to end at 0 and rescaled to
    keep its first value; diffusers then sets the last abar to 2**-24."""
    s, _ = dpmjax.VPDiscrete.from_diffusers_config({"rescale_betas_zero_snr": True})
    betas = np.linspace(1e-4, 0.02, 1000)
    root = np.sqrt(np.cumprod(1 - betas))
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    abar = np.exp(2 * np.asarray(s.log_alphas, np.float64))
    np.testing.assert_allclose(abar[:990], root[:990] ** 2, rtol=1e-4)
    assert abar[-1] == pytest.approx(2.0**-24, rel=1e-6)
    assert abar[900] == pytest.approx(root[900] ** 2, rel=1e-4)


# ----------------------------------------------------------------------- end to end
def net(params, x, t):
    """The toy network of the module docstring (jax.numpy)."""
    del params
    t = jnp.asarray(t, x.dtype)
    t = t.reshape(t.shape + (1,) * (x.ndim - 1 - t.ndim)) if t.ndim else t
    c_in = x.shape[1]
    c_out = 2 * c_in if net.learned_range else c_in
    outs = [1.5 * jnp.tanh(W[c] * x[:, c % c_in] + 0.1 * jnp.sin(t / 97.0) + 0.05 * c) for c in range(c_out)]
    return jnp.stack(outs, axis=1)


net.learned_range = False

E2E = [n for n in MAPPED if "x_T_" + n in DATA and "noise_" + n not in DATA]


@pytest.mark.slow
@pytest.mark.parametrize("name", E2E)
def test_sample_matches_diffusers_loop(name):
    cfg, steps, mu = _entry(name)
    schedule, options = _load(name)
    if cfg.get("_class_name") == dd.FLOW_MATCH:
        # diffusers' FlowMatchEuler loop is Euler's method in sigma, which is exactly first-order
        # DPM-Solver++ on a flow (x_t = x_s + (sigma_t - sigma_s) v); from_diffusers' default is 2M
        options.update(order=1, orders=(1,) * options["steps"])
    net.learned_range = cfg.get("variance_type") == "learned_range"
    model = dd.wrap_model(net, cfg, scheduler=_scheduler(name))
    x_T = DATA["x_T_" + name]
    with jax.enable_x64(True):
        if options.pop("invert", False):
            got = dpmjax.invert(model, None, jnp.asarray(x_T), schedule=schedule, **options)
        else:
            got = dpmjax.sample(model, None, None, x_T.shape, schedule=schedule, noise=jnp.asarray(x_T), **options)
    got = np.asarray(got)
    want = DATA["x_final_" + name]
    if "x_limit_" + name in DATA:  # diffusers returns NaN (0 * inf); its finite limit is recorded
        want = DATA["x_limit_" + name]
    assert np.all(np.isfinite(got))
    if np.all(np.isfinite(want)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMES if "noise_" + n in DATA])
def test_sde_step_api_with_recorded_noise(name):
    schedule, options = _load(name)
    noise = DATA["noise_" + name]
    with jax.enable_x64(True):
        solver = dpmjax.solver(schedule, **options)
        state = solver.init(jnp.asarray(DATA["x_T_" + name]))
        for i in range(solver.num_evals):
            x_in, t_in = solver.model_inputs(state)
            state = solver.step(state, net(None, x_in, t_in), noise=jnp.asarray(noise[i]))
        got = np.asarray(solver.result(state))
    want = DATA["x_final_" + name]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))


# ------------------------------------------------------------ released models' configs
MODELS = [n for n in NAMES if "_saved_" in n or "_scheduler_" in n]  # see MODELS in the script
# one configuration per way diffusers computes the network's time (the grid test checks all)
EXACT = ["sd15_dpm_scheduler_20", "sdxl_dpm_karras_saved_25", "ms_exponential_11", "sdxl_singlestep_scheduler_12",
         "wan_unipc_saved_30", "inverse_flow_10", "sd3_flowmatch_saved_28", "flux_flowmatch_saved_20"]


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
@pytest.mark.parametrize("name", EXACT)
def test_network_receives_diffusers_timesteps_exactly(name, x64):
    """The times the one-step API hands the network after each step equal diffusers'
    ``scheduler.timesteps`` bit for bit (integers stay integers: 250, not 249.99998), in
    float32 and float64."""
    schedule, options = _load(name)
    assert not options.pop("invert", False)
    want = DATA["model_t_" + name]
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        solver = dpmjax.solver(schedule, **options)

        @jax.jit
        def network_times(solver, x):
            def body(state, _):
                x_in, t_in = solver.model_inputs(state)
                return solver.step(state, 0.1 * x_in), t_in[0]
            return jax.lax.scan(body, solver.init(x), None, length=solver.num_evals)[1]

        got = network_times(solver, jnp.zeros((1, 1), dtype))
    assert got.dtype == dtype
    got = np.asarray(got, np.float64)
    assert len(got) in (len(want), len(want) - 1)  # a zero-length final step is dropped
    np.testing.assert_array_equal(got, want[: len(got)])


def test_configs_diffusers_writes_load_and_name_the_ignored_keys():
    """DPMSolverMultistepScheduler.from_config(SD 1.5's PNDM config).save_config(d) writes
    PNDM's clip_sample, set_alpha_to_one, skip_prk_steps: diffusers ignores them, so does this."""
    cfg, steps, _ = _entry("sd15_dpm_saved_25")
    assert {"clip_sample", "set_alpha_to_one", "skip_prk_steps"} <= set(cfg)
    with pytest.warns(UserWarning, match="clip_sample.*set_alpha_to_one.*skip_prk_steps"):
        dpmjax.from_diffusers(cfg, steps)
    with pytest.warns(UserWarning, match="no_such_key"):
        dpmjax.from_diffusers({"_class_name": "DPMSolverMultistepScheduler", "no_such_key": 1}, 10)


def test_keys_diffusers_defaults_take_its_defaults():
    # thresholding=True alone: diffusers' dynamic_thresholding_ratio=0.995, sample_max_value=1.0
    _, options = dpmjax.from_diffusers({"_class_name": "DPMSolverMultistepScheduler", "thresholding": True,
                                        "prediction_type": "sample"}, 10)
    assert options["dynamic_thresholding_ratio"] == 0.995 and options["sample_max_value"] == 1.0
    # keys listed in _use_default_values take the loading class's default (diffusers' from_config):
    # the singlestep solver's lower_order_final=False, not the multistep file's True
    base = {"_class_name": "DPMSolverMultistepScheduler", "final_sigmas_type": "sigma_min", "solver_order": 3}
    single = "DPMSolverSinglestepScheduler"
    _, listed = dpmjax.from_diffusers({**base, "lower_order_final": True, "_use_default_values": ["lower_order_final"]},
                                      12, scheduler=single)
    _, off = dpmjax.from_diffusers({**base, "lower_order_final": False}, 12, scheduler=single)
    _, on = dpmjax.from_diffusers({**base, "lower_order_final": True}, 12, scheduler=single)
    assert listed["orders"] == off["orders"] != on["orders"]


def test_unsupported_class_says_how_to_use_it():
    for cls in ("PNDMScheduler", "EulerDiscreteScheduler"):
        with pytest.raises(ValueError, match=f"{cls}.*scheduler='DPMSolverMultistepScheduler'.*UniPC"):
            dpmjax.from_diffusers({"_class_name": cls}, 10)
    # a config whose _class_name is null, with scheduler=: that class; without: ask for it
    s, o = dpmjax.from_diffusers({"_class_name": None}, 10, scheduler="UniPCMultistepScheduler")
    assert o["method"] == "unipc"
    with pytest.raises(ValueError, match="pass scheduler="):
        dpmjax.from_diffusers({"_class_name": None}, 10)


def test_karras_and_lu_together_use_karras_as_diffusers_and_say_so():
    cfg, steps, _ = _entry("ms_karras_and_lu_12")
    assert cfg["use_karras_sigmas"] and cfg["use_lu_lambdas"]
    with pytest.warns(UserWarning, match="use_lu_lambdas"):
        _, both = dpmjax.from_diffusers(cfg, steps)
    _, karras = dpmjax.from_diffusers(dict(cfg, use_lu_lambdas=False), steps)
    np.testing.assert_array_equal(both["timesteps"].timesteps, karras["timesteps"].timesteps)


def test_deis_with_final_sigma_zero_is_refused_as_diffusers_refuses_it():
    cfg, _, _ = _entry("deis_unipc_scheduler_10")  # DEISMultistepScheduler's own config
    assert cfg["algorithm_type"] == "deis"
    with pytest.raises(ValueError, match="final_sigmas_type"):
        dpmjax.from_diffusers(cfg, 10, scheduler="DPMSolverMultistepScheduler")


FLUX_LIKE = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}


@pytest.mark.parametrize("cfg, kw, err, word", [
    (FLUX_LIKE, {"mu": 800.0}, ValueError, r"\bmu\b"),  # exp(mu) overflows
    (FLUX_LIKE, {"mu": 40.0}, ValueError, r"\bmu\b"),  # every float32 sigma is 1
    (FLUX_LIKE, {"mu": float("nan")}, ValueError, r"\bmu\b"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True, "prediction_type": "flow_prediction",
      "flow_shift": float("nan")}, {}, ValueError, "flow_shift"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": float("nan")}, {}, ValueError, r"\bshift\b"),
    ({"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_min": float("nan")}, {}, ValueError, "sigma_min"),
    ({"_class_name": "EDMDPMSolverMultistepScheduler", "rho": 0}, {}, ValueError, "rho"),
    ({"_class_name": "DPMSolverMultistepScheduler", "beta_start": "0.0001"}, {}, TypeError, "beta_start"),
    ({"_class_name": "DPMSolverMultistepScheduler", "trained_betas": ["x"] * 1000}, {}, ValueError, "trained_betas"),
    ({"_class_name": "UniPCMultistepScheduler", "disable_corrector": [0.5]}, {}, ValueError, "disable_corrector"),
    ({"_class_name": 3}, {}, TypeError, "_class_name"),
])
def test_bad_values_raise_naming_the_key(cfg, kw, err, word):
    with pytest.raises(err, match=word):
        dpmjax.from_diffusers(cfg, 10, **kw)


def test_deeply_nested_json_is_a_clear_error(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text('{"_class_name": "DPMSolverMultistepScheduler", "x": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ValueError, match="nested"):
        dpmjax.from_diffusers(path, 10)
