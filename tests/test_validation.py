"""Every invalid argument of ``dpmjax.sample`` raises ValueError/TypeError naming it, before compiling."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from conftest import compiled_during, library_programs

SHAPE = (2, 3)
NOISE = np.zeros(SHAPE, np.float32)


def never_called(params, x, t, *cond):
    pytest.fail("model_fn must not be called (or traced) when the arguments are invalid")


def call(model_fn=never_called, key=None, noise=NOISE, shape=SHAPE, **kw):
    kw.setdefault("schedule", dpmjax.VPLinear())
    if isinstance(kw["schedule"], type):  # a class in CASES: built here, not while collecting
        kw["schedule"] = kw["schedule"]()
    return dpmjax.sample(model_fn, None, key, shape, noise=None if noise is None else jnp.asarray(noise), **kw)


# (keyword arguments, exception type, the argument name the message must contain)
CASES = [
    (dict(model_type="eps"), ValueError, "model_type"),
    (dict(algorithm="dpmsolver+++"), ValueError, "algorithm"),
    (dict(method="adams"), ValueError, "method"),
    (dict(skip_type="uniform"), ValueError, "skip_type"),
    (dict(solver_type="heun"), ValueError, "solver_type"),
    (dict(variant="bh3", method="unipc"), ValueError, "variant"),
    (dict(order=0), ValueError, "order"),
    (dict(order=4), ValueError, "order"),
    (dict(order=2.0), TypeError, "order"),
    (dict(order="2"), TypeError, "order"),
    (dict(steps=10.0), TypeError, "steps"),
    (dict(steps=0), ValueError, "steps"),
    (dict(method="multistep", order=3, steps=2), ValueError, "steps"),
    (dict(method="singlestep_fixed", order=3, steps=2), ValueError, "steps"),
    (dict(t_start=0.5, t_end=0.5), ValueError, "t_end"),
    (dict(t_start=0.5, t_end=0.7), ValueError, "t_end"),
    (dict(t_end=0.0), ValueError, "t_end"),
    (dict(t_end=-1e-3), ValueError, "t_end"),
    (dict(t_start=1.5), ValueError, "t_start"),
    (dict(schedule=dpmjax.VPCosine, t_start=0.999), ValueError, "t_start"),
    (dict(noise=np.zeros((2, 4), np.float32)), ValueError, "noise"),
    (dict(noise=np.zeros((3,), np.float32)), ValueError, "noise"),
    (dict(noise=None, key=None), ValueError, "key"),
    (dict(thresholding=True, algorithm="dpmsolver"), ValueError, "thresholding"),
    (dict(unconditional_condition=jnp.zeros(2)), ValueError, "unconditional_condition"),
    (dict(guidance_scale=2.0), ValueError, "guidance_scale"),
    (dict(guidance_scale=jnp.asarray(7.5)), ValueError, "guidance_scale"),
]


@pytest.mark.parametrize("kw, exc, name", CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_invalid_argument_is_named(kw, exc, name):
    with pytest.raises(exc, match=name):
        call(**kw)


def test_model_output_shape_mismatch_is_named():
    def wrong(params, x, t):
        return x[:, :1]

    with pytest.raises(ValueError, match="model_fn output shape"):
        call(model_fn=wrong, steps=3)


def test_errors_raise_before_anything_compiles():
    def bad_arguments():
        for kw, exc, name in CASES:
            with pytest.raises(exc):
                call(**kw)

    assert library_programs(compiled_during(bad_arguments)) == []

    def bad_model():
        # a model whose output has the wrong shape is found when it is traced, after the
        # solver's tables (a valid configuration) compiled; the sampler never compiles
        with pytest.raises(ValueError, match="model_fn output shape"):
            call(model_fn=lambda p, x, t: x[:, :1], steps=2)

    assert not [m for m in compiled_during(bad_model) if "_fixed_program" in m]
    # positive control: a valid call with a fresh model compiles
    assert compiled_during(lambda: call(model_fn=lambda p, x, t: jnp.zeros_like(x), steps=2))
