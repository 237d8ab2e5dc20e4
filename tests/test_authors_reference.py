"""``dpmjax.sample`` against the DPM-Solver and UniPC authors' own PyTorch code.

``tests/data/authors_reference.npz`` holds the final samples of the authors'
``DPM_Solver.sample`` / ``UniPC.sample`` (float64; files, commits and sha256 in its
``meta``) on the exact predictor of a Gaussian data distribution, for 71 configurations:
multistep orders 1-3, singlestep (DPM-Solver-fast) orders 2-3, singlestep_fixed,
adaptive DPM-Solver-12/23, UniPC bh1/bh2 orders 1-3 with data and noise prediction,
both algorithms, logSNR/time_uniform/time_quadratic grids, dpmsolver/taylor solver
types, lower_order_final on/off, denoise_to_zero, dynamic thresholding, 5/6/7/10 steps,
on the continuous linear VP schedule and a discrete linear-beta table of N = 1000
(where dpmjax's network time ``t N - 1`` equals the authors' ``(t - 1/N) 1000``).
Regenerate with ``scripts/make_authors_reference.py``.

Each configuration must match to 1e-6 relative and use the same number of model
evaluations (for ``method="adaptive"``, the step-size controller's accept/reject path).

Budget: each configuration is one XLA compilation (~1 s). By default a subset of 26
runs, chosen greedily so that every value of every option, per method, appears at least
once; ``DPMJAX_FULL_MATRIX=1`` runs all 71.
"""

from __future__ import annotations

import json
import os

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax

DATA = os.path.join(os.path.dirname(__file__), "data", "authors_reference.npz")
REF = np.load(DATA)
META = json.loads(str(REF["meta"]))
CONFIGS = [json.loads(str(c)) for c in REF["configs"]]
X_T = REF["x_T"]
B, D = X_T.shape[:2]
RTOL = 1e-6
FULL = os.environ.get("DPMJAX_FULL_MATRIX") == "1"


def _features(c):
    """The option values a configuration exercises, per method."""
    m = c["method"]
    kind = ("variant", c.get("variant"), c["order"]) if m == "unipc" else ("solver_type", m, c["solver_type"])
    return {("method", m), ("algorithm", m, c["algorithm"]), ("order", m, c["order"]), kind,
            ("skip_type", m, c["skip_type"] if m != "adaptive" else None), ("lof", m, c["lower_order_final"]),
            ("denoise_to_zero", m, c["denoise_to_zero"]), ("thresholding", m, c["thresholding"]),
            ("steps", m, c["steps"]), ("schedule", m, c["schedule"]), ("model_type", m, c["model_type"])}


def _cover(configs):
    """Indices of a small subset whose features cover those of all configurations."""
    universe = set().union(*map(_features, configs))
    chosen, covered = [], set()
    while covered != universe:
        i = max(range(len(configs)), key=lambda i: (len(_features(configs[i]) - covered), -i))
        chosen.append(i)
        covered |= _features(configs[i])
    return sorted(chosen)


SELECTED = list(range(len(CONFIGS))) if FULL else _cover(CONFIGS)


def _id(c):
    parts = [c["schedule"], c["method"], c["algorithm"], f"o{c['order']}", f"n{c['steps']}", c["skip_type"]]
    if c["method"] == "unipc":
        parts.append(c["variant"])
    elif c["solver_type"] != "dpmsolver":
        parts.append(c["solver_type"])
    if not c["lower_order_final"]:
        parts.append("no-lof")
    if c["denoise_to_zero"]:
        parts.append("dtz")
    if c["thresholding"]:
        parts.append("thr")
    return "-".join(parts)


_MODELS = {}


def _schedule_and_model(name, model_type):
    """Schedule and model_fn, cached (``sample`` compiles once per configuration and
    ``model_fn`` object). Built under x64: the discrete tables are float64."""
    key = (name, model_type)
    if key not in _MODELS:
        sched = dpmjax.VPLinear(0.1, 20.0) if name == "linear" else dpmjax.VPDiscrete.from_named("linear", 1000)

        def model_fn(params, x, t_model):
            # the closed form the reference script evaluates with the authors' schedule
            mean, std = params
            t = sched.solver_time(t_model)
            alpha = sched.alpha(t).reshape(-1, 1, 1, 1)
            sigma = sched.sigma(t).reshape(-1, 1, 1, 1)
            v = alpha**2 * std**2 + sigma**2
            if model_type == "noise":
                return sigma * (x - alpha * mean) / v
            return mean + alpha * std**2 * (x - alpha * mean) / v

        _MODELS[key] = sched, model_fn
    return _MODELS[key]


def test_fixture_records_its_provenance():
    assert META["dpm_solver"]["repo"].endswith("LuChengTHU/dpm-solver") and len(META["dpm_solver"]["commit"]) == 40
    assert META["unipc"]["repo"].endswith("wl-zhao/UniPC") and len(META["unipc"]["commit"]) == 40
    assert REF["results"].shape == (len(CONFIGS),) + X_T.shape
    assert len({json.dumps(c, sort_keys=True) for c in CONFIGS}) == len(CONFIGS)
    # the methods the fixture must cover
    assert {c["method"] for c in CONFIGS} == {"multistep", "singlestep", "singlestep_fixed", "adaptive", "unipc"}


def _params():
    """The selected configurations; the first of each method is in the quick tier, the rest slow."""
    first = {}
    for i in SELECTED:
        first.setdefault(CONFIGS[i]["method"], i)
    return [pytest.param(i, id=_id(CONFIGS[i]), marks=() if i in first.values() else pytest.mark.slow)
            for i in SELECTED]


@pytest.mark.parametrize("index", _params())
def test_matches_authors_code(x64, index):
    c = dict(CONFIGS[index])
    sched, model_fn = _schedule_and_model(c.pop("schedule"), c["model_type"])
    params = (jnp.asarray(META["mean"]).reshape(1, D, 1, 1), jnp.asarray(META["std"]).reshape(1, D, 1, 1))
    if c["method"] != "unipc":
        c.pop("variant", None)
    x, info = dpmjax.sample(model_fn, params, None, X_T.shape, schedule=sched, noise=jnp.asarray(X_T),
                            return_info=True, **c)
    chex.assert_shape(x, X_T.shape)
    chex.assert_type(x, jnp.float64)
    chex.assert_tree_all_finite(x)
    want = REF["results"][index]
    assert int(info["nfe"]) == int(REF["nfe"][index]), ("model evaluations", int(info["nfe"]), int(REF["nfe"][index]))
    np.testing.assert_allclose(np.asarray(x), want, rtol=RTOL, atol=RTOL * np.abs(want).max())
