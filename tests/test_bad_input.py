"""Bad input is refused, in words, before anything compiles.

Table-driven: each row is a call, the exception type and a regular expression the message
must match (the argument's name and what is wrong with it). Every row was accepted, or
failed with a message that did not name the argument, by the sampler before its inputs
were validated in the compute dtype (a second-order check of this file: run it against
that code and every row fails).

* ``CASES``: found while the arguments are checked, before anything is compiled (the
  ``compiled_during`` of ``tests/conftest.py`` collects "Compiling" records);
* ``TRACE_CASES``: found when the user's function is traced (its output is only known
  then): the solver's coefficient tables may compile, the sampling program never does;
* behaviours that must keep working: times given as JAX scalars or traced inside the
  user's ``jit``, ``singlestep_fixed``'s documented NFE.
"""

from __future__ import annotations


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from conftest import compiled_during, library_programs

B, D = 4, 3
SHAPE = (B, D)
NOISE = np.zeros(SHAPE, np.float32)
VP = dpmjax.VPLinear()
DISCRETE = dpmjax.VPDiscrete.from_named("linear", 1000)
MEAN, STD = np.array([0.5, -1.0, 1.5]), np.array([0.2, 0.4, 0.7])


def never_called(params, x, t, *cond):
    pytest.fail("model_fn must not be called (or traced) when the arguments are invalid")


def zeros_model(params, x, t, *cond):
    return jnp.zeros_like(x)


def call(model_fn=never_called, key=None, noise=NOISE, shape=SHAPE, **kw):
    kw.setdefault("schedule", VP)
    return dpmjax.sample(model_fn, None, key, shape, noise=None if noise is None else jnp.asarray(noise), **kw)


def invert(**kw):
    kw.setdefault("schedule", VP)
    return dpmjax.invert(never_called, None, jnp.asarray(NOISE), **kw)


def add_noise(t):
    return dpmjax.add_noise(VP, jnp.asarray(NOISE), t, jax.random.key(0))


def fit(**kw):
    return dpmjax.fit_timesteps(never_called, None, jax.random.key(0), SHAPE, schedule=VP, steps=4, n_candidates=8,
                                fine_steps=16, **kw)


CFG = dict(condition=jnp.zeros((B, 2)), unconditional_condition=jnp.zeros((B, 2)))

# (id, thunk, exception type, regex the message must match)
CASES = [
    # times that pass float64 checks but not the compute dtype (float32 here)
    ("t-equal-in-float32", lambda: call(t_start=0.5, t_end=0.49999999), ValueError,
     r"t_start = 0.5 and t_end = 0.49999999 are equal in float32"),
    ("timesteps-equal-in-float32", lambda: call(steps=3, timesteps=np.array([1.0, 0.5, 0.49999999, 0.1])),
     ValueError, r"timesteps must be strictly decreasing in float32"),
    ("t_end-1e-38-logSNR", lambda: call(t_end=1e-38, skip_type="logSNR"), ValueError,
     r"lambda is not finite .*t_end = 1e-38 in float32"),
    ("t_end-1e-45-logSNR", lambda: call(t_end=1e-45, skip_type="logSNR"), ValueError,
     r"lambda is not finite .*t_end = 1e-45 in float32"),
    ("discrete-t_end-below-t_eps", lambda: call(schedule=DISCRETE, t_end=1e-4), ValueError,
     r"t_end must be in \[0.001, .*t_eps = 1/N"),
    ("continuous-t_end-0", lambda: call(t_end=0.0), ValueError,
     r"t_end must be in \(0, t_start = 1.0\) \(never 0: lambda is infinite there\); got 0.0"),
    # correcting_xt_fn where it cannot apply
    ("correcting-adaptive", lambda: call(method="adaptive", correcting_xt_fn=lambda x, t, s: x), ValueError,
     r"correcting_xt_fn is not available for method='adaptive'"),
    ("correcting-not-callable", lambda: call(correcting_xt_fn=3), TypeError, r"correcting_xt_fn must be callable"),
    # guidance
    ("guidance-None", lambda: call(guidance_scale=None), TypeError, r"guidance_scale must be a real number"),
    ("guidance-nan", lambda: call(guidance_scale=float("nan"), **CFG), ValueError, r"guidance_scale must be finite"),
    ("guidance-inf", lambda: call(guidance_scale=float("inf")), ValueError, r"guidance_scale must be finite"),
    ("guidance-traced-unconfigured", lambda: jax.jit(lambda g: call(guidance_scale=g))(2.0), ValueError,
     r"guidance_scale is traced but no guidance is configured"),
    ("guidance-per-sample", lambda: call(guidance_scale=np.ones(B), **CFG), ValueError,
     r"guidance_scale must be a scalar; got shape \(4,\)"),
    ("guidance-per-sample-traced", lambda: jax.jit(lambda g: call(guidance_scale=g, **CFG))(jnp.ones(B)),
     ValueError, r"guidance_scale must be a scalar"),
    ("cond-batch-mismatch", lambda: call(condition=jnp.zeros((B, 2)), unconditional_condition=jnp.zeros((3, 2)),
                                         guidance_scale=2.0), ValueError,
     r"condition and unconditional_condition leaves must have the same shape"),
    ("cond-batch-not-B", lambda: call(condition=jnp.zeros((3, 2)), unconditional_condition=jnp.zeros((3, 2)),
                                      guidance_scale=2.0), ValueError, r"condition leaves must have the batch size 4"),
    ("cond-pytree-mismatch", lambda: call(condition={"a": jnp.zeros((B, 2))},
                                          unconditional_condition={"b": jnp.zeros((B, 2))}, guidance_scale=2.0),
     ValueError, r"condition and unconditional_condition must have the same structure"),
    ("cond-scalar", lambda: call(condition=jnp.zeros(()), unconditional_condition=jnp.zeros(()), guidance_scale=2.0),
     ValueError, r"condition leaves must have the batch size"),
    # timesteps together with the end points
    ("timesteps-and-t_start", lambda: call(steps=2, timesteps=np.array([1.0, 0.5, 0.1]), t_start=1.0), ValueError,
     r"either timesteps .* or t_start/t_end"),
    ("timesteps-and-t_end", lambda: call(steps=2, timesteps=np.array([1.0, 0.5, 0.1]), t_end=0.1), ValueError,
     r"either timesteps .* or t_start/t_end"),
    ("invert-timesteps-and-t_end", lambda: invert(steps=2, timesteps=np.array([0.1, 0.5, 1.0]), t_end=1.0),
     ValueError, r"either timesteps .* or t_start/t_end"),
    # invert's end points in its own roles: t_start (the data end) below t_end
    ("invert-reversed", lambda: invert(t_start=0.9, t_end=0.1), ValueError, r"t_start must be in .*t_end = 0.1\)"),
    # keys
    ("key-int", lambda: call(key=0, noise=None), TypeError, r"key must be a PRNG key .*got int 0"),
    ("key-float-array", lambda: call(key=jnp.zeros(2), noise=None), TypeError, r"key must be a PRNG key .*float32"),
    ("key-shape-3", lambda: call(key=jnp.zeros(3, jnp.uint32), noise=None), TypeError,
     r"key must be a PRNG key .*shape \(3,\)"),
    ("key-batch", lambda: call(key=jax.random.split(jax.random.key(0), B), noise=None), ValueError,
     r"key must be a single PRNG key; got a batch"),
    ("key-sde-with-noise", lambda: call(algorithm="sde-dpmsolver++", key=0), TypeError, r"key must be a PRNG key"),
    # options of the wrong type or size
    ("disable_corrector-int", lambda: call(method="unipc", disable_corrector=3), TypeError,
     r"disable_corrector must be a tuple"),
    ("max_nfe-huge", lambda: call(method="adaptive", max_nfe=2**40), ValueError, r"max_nfe must be in 2\.\.10000000"),
    ("shape-str", lambda: call(shape="42", noise=None, key=jax.random.key(0)), TypeError,
     r"shape must be a tuple of ints"),
    ("shape-float", lambda: call(shape=(4.5, 2), noise=None, key=jax.random.key(0)), TypeError,
     r"shape must be a tuple of ints"),
    # options the method would ignore
    ("rtol-multistep", lambda: call(method="multistep", rtol=1e-9), ValueError,
     r"rtol=1e-09 does not apply to method='multistep'"),
    ("variant-multistep", lambda: call(variant="bh1"), ValueError,
     r"variant='bh1' does not apply to method='multistep'"),
    ("disable_corrector-multistep", lambda: call(disable_corrector=(1,)), ValueError,
     r"disable_corrector=\(1,\) does not apply to method='multistep'"),
    ("solver_type-unipc", lambda: call(method="unipc", solver_type="taylor"), ValueError,
     r"solver_type='taylor' does not apply to method='unipc'"),
    # fit_timesteps
    ("fit-refine_iters-negative", lambda: fit(refine_iters=-1), ValueError, r"refine_iters must be in 0\.\."),
    ("fit-refine_iters-float", lambda: fit(refine_iters=2.5), TypeError, r"refine_iters must be an int"),
    # add_noise
    ("add_noise-t-0", lambda: add_noise(0.0), ValueError, r"t must lie in \(0, T = 1.0\]"),
    ("add_noise-t-above-T", lambda: add_noise(2.0), ValueError, r"t must lie in \(0, T = 1.0\]"),
    ("add_noise-t-wrong-length", lambda: add_noise(jnp.full((3,), 0.5)), ValueError,
     r"t must be a scalar or one time per sample, shape \(\) or \(4,\)"),
]


def _bad_correction(out):
    return lambda x, t, step: out(x)


# Found when the user's function is traced: (id, thunk, exception, regex)
TRACE_CASES = [
    ("correcting-shape-multistep", lambda: call(zeros_model, steps=2, correcting_xt_fn=_bad_correction(
        lambda x: x[:, :1])), ValueError, r"correcting_xt_fn must return an array of the state's shape \(4, 3\)"),
    ("correcting-shape-unipc", lambda: call(zeros_model, steps=2, method="unipc", correcting_xt_fn=_bad_correction(
        lambda x: x[:, :1])), ValueError, r"correcting_xt_fn must return an array of the state's shape"),
    ("correcting-None", lambda: call(zeros_model, steps=2, correcting_xt_fn=_bad_correction(lambda x: None)),
     ValueError, r"correcting_xt_fn must return an array .*NoneType"),
    ("model-tuple", lambda: call(lambda p, x, t: (x, x), steps=2), TypeError,
     r"model_fn must return an array .*got tuple"),
    ("model-None", lambda: call(lambda p, x, t: None, steps=2), TypeError, r"model_fn must return an array .*NoneType"),
    ("model-dict", lambda: call(lambda p, x, t: {"x": x}, steps=2), TypeError, r"model_fn must return an array .*dict"),
]


@pytest.mark.parametrize("thunk, exc, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_is_named(thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


@pytest.mark.parametrize("thunk, exc, match", [c[1:] for c in TRACE_CASES], ids=[c[0] for c in TRACE_CASES])
def test_bad_user_function_output_is_named(thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


def test_errors_raise_before_anything_compiles():
    def run_all():
        for _, thunk, exc, _match in CASES:
            with pytest.raises(exc):
                thunk()

    # nothing of the library's compiles (eager JAX operations of the checks and of the
    # thunks themselves, e.g. jax.random.key, may compile their one-op kernels)
    assert library_programs(compiled_during(run_all)) == []

    def run_trace_cases():
        for _, thunk, exc, _match in TRACE_CASES:
            with pytest.raises(exc):
                thunk()

    compiled = compiled_during(run_trace_cases)
    assert not [m for m in compiled if "_fixed_program" in m], compiled
    # positive control: a valid call with a new model function compiles the sampler
    compiled = compiled_during(lambda: call(lambda p, x, t: jnp.zeros_like(x), steps=2).block_until_ready())
    assert any("_fixed_program" in m for m in compiled), compiled


def test_fit_on_a_model_returning_nan_says_so():
    def nan_model(params, x, t):
        return jnp.full_like(x, jnp.nan)

    with pytest.raises(ValueError, match="reference trajectories are not finite: model_fn returns NaN"):
        dpmjax.fit_timesteps(nan_model, None, jax.random.key(0), SHAPE, schedule=VP, steps=4, n_candidates=8,
                             fine_steps=16, refine_iters=2)


# --------------------------------------------------------------------------- what keeps working

_GM = {}


def _gaussian():
    if "gm" not in _GM:
        gm = dpmjax.GaussianMixture.gaussian(jnp.asarray(MEAN), jnp.asarray(STD))
        _GM["gm"] = (gm, gm.model_fn(VP))
    return _GM["gm"]


def test_times_as_jax_scalars_and_traced_inside_jit():
    """README: t_start/t_end are traced. A Python float, a JAX scalar and a traced value
    give one sample; the traced one does not recompile for new values."""
    gm, mf = _gaussian()
    noise = jnp.asarray(np.random.default_rng(0).standard_normal(SHAPE), jnp.float32)

    def run(t0, t1):
        return dpmjax.sample(mf, gm, None, SHAPE, schedule=VP, noise=noise, steps=4, t_start=t0, t_end=t1)

    plain = run(0.8, 0.01)
    chex.assert_shape(plain, SHAPE)
    chex.assert_tree_all_finite(plain)
    np.testing.assert_array_equal(run(jnp.asarray(0.8), jnp.asarray(0.01)), plain)
    jitted = jax.jit(run)
    np.testing.assert_allclose(jitted(0.8, 0.01), plain, rtol=1e-6, atol=1e-6)
    # new values through the same compiled program: the untraced call on that interval
    other = jitted(0.6, 0.05)
    np.testing.assert_allclose(other, run(0.6, 0.05), rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(other - plain))) > 0.05  # the new times were used
    assert jitted._cache_size() == 1


def test_singlestep_fixed_takes_whole_steps_and_reports_its_nfe():
    """Documented choice: steps=5, order=2 runs 5 // 2 = 2 steps of 2 evaluations."""
    gm, mf = _gaussian()
    counted = []

    def model(params, x, t):
        jax.debug.callback(lambda: counted.append(1))
        return mf(params, x, t)

    x, info = dpmjax.sample(model, gm, None, SHAPE, schedule=VP, noise=jnp.ones(SHAPE), method="singlestep_fixed",
                            steps=5, order=2, return_info=True)
    jax.block_until_ready(x)
    assert int(info["nfe"]) == 4 and len(counted) == 4


WARM = dict(model_fn=zeros_model, steps=3, order=2)

WARM_CASES = [
    # (the warmed call's arguments changed to, error, message): a configuration that has
    # already run dispatches without rebuilding its solver, and must still refuse these
    (dict(noise=np.zeros((B, D + 1), np.float32)), ValueError, r"noise must have shape"),
    (dict(noise=None), ValueError, r"key must be a PRNG key"),
    (dict(key=7), TypeError, r"key must be a PRNG key"),
    (dict(guidance_scale=2.0), ValueError, r"guidance_scale != 1 needs"),
    (dict(guidance_scale=float("nan")), ValueError, r"guidance_scale must be finite"),
    (dict(order=True), TypeError, r"order"),
    (dict(steps=3.0), TypeError, r"steps"),
    (dict(shape=(float(B), D)), TypeError, r"shape must be a tuple of ints"),
    (dict(lower_order_final=1), TypeError, r"lower_order_final"),
    (dict(algorithm="sde-dpmsolver++"), ValueError, r"key must be a PRNG key for algorithm"),
]


@pytest.mark.parametrize("change,error,message", WARM_CASES,
                         ids=[",".join(c) + f"-{i}" for i, (c, _, _) in enumerate(WARM_CASES)])
def test_a_configuration_that_ran_still_checks_each_call(change, error, message):
    good = call(**WARM)  # the same configuration, run first (its solver and program are kept)
    chex.assert_tree_all_finite(good)

    def bad():
        with pytest.raises(error, match=message):
            call(**{**WARM, **change})

    assert library_programs(compiled_during(bad)) == []


@pytest.mark.parametrize("schedule", [VP, DISCRETE, dpmjax.EDM()], ids=["VPLinear", "VPDiscrete", "EDM"])
def test_a_repeated_call_skips_the_configuration_checks(schedule, monkeypatch):
    """A repeated call with the same configuration goes straight to its kept solver
    (every schedule, including VPDiscrete, whose tables are arrays; held under the
    schedule): the solver's option checks and table building do not run again, and the
    result is the first call's."""
    from dpmjax import solvers

    noise = jnp.asarray(np.random.default_rng(1).standard_normal(SHAPE), jnp.float32)
    kw = dict(model_fn=zeros_model, noise=noise, steps=3, schedule=schedule)
    first = call(**kw)

    def refuse(*args, **kwargs):
        raise AssertionError("the configuration was checked and built again")

    monkeypatch.setattr(solvers, "make_options", refuse)
    np.testing.assert_array_equal(call(**kw), first)
    with pytest.raises(AssertionError, match="checked and built again"):  # a new configuration is built
        call(**dict(kw, steps=4))
