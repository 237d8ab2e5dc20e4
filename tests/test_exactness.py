"""Exact checks of every formula path, in float64.

1. Every model parameterisation x algorithm x method: a network of each ``model_type``
   built from the exact noise predictor of a Gaussian gives the sample of the equivalent
   ``"noise"`` network to 1e-9 ("flow" with :class:`dpmjax.RectifiedFlow`, "edm" with
   :class:`dpmjax.EDM`, the others with :class:`dpmjax.VPLinear`), ODE and SDE algorithms.
2. SDE-DPM-Solver(++) against an independent NumPy implementation written from the
   formulas in the docstring of ``dpmjax.updates.multistep_plan`` (orders 1, 2 for both
   algorithms, 3 for data prediction; ``solver_type`` dpmsolver/taylor), driven through
   the one-step API with the same noise draws, to 1e-10.
3. Classifier guidance with the project's own ``nets.MLP``: the noise network is called
   without the condition, and the guided sample equals the sample of the hand-guided noise
   model ``eps - s sigma grad log p``.
4. ``correcting_xt_fn`` and ``return_intermediate`` for singlestep and UniPC against a hand
   loop through the step API; ``invert`` with singlestep and UniPC.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
import dpmjax.nets

B, D = 4, 3
MEAN = np.array([0.5, -1.0, 1.5])
STD = np.array([0.2, 0.4, 0.7])
X_T = np.random.default_rng(0).standard_normal((B, D))

_CACHE = {}


def _cached(name, build):
    key = (name, bool(jax.config.jax_enable_x64))
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def gaussian():
    return _cached("gm", lambda: dpmjax.GaussianMixture.gaussian(jnp.asarray(MEAN), jnp.asarray(STD)))


def schedule(name):
    make = {"vp": dpmjax.VPLinear, "flow": dpmjax.RectifiedFlow, "edm": dpmjax.EDM}[name]
    return _cached(("sched", name), make)


def assert_close(x, ref, rtol, what=""):
    x, ref = np.asarray(x), np.asarray(ref)
    err = np.max(np.abs(x - ref)) / max(1.0, np.max(np.abs(ref)))
    assert err <= rtol, f"{what}: max relative deviation {err:.3e} > {rtol:.0e}"


# --------------------------------------------------------------------------- 1. model types

def _net(kind, sched):
    """A network of ``kind`` encoding the Gaussian's exact eps (user-scale input, as sample feeds it)."""

    def net(gm, x_user, t_model):
        t = sched.solver_time(t_model)
        scale = jnp.asarray(sched.state_scale(t))
        x = x_user * scale.reshape(scale.shape + (1,))
        alpha, sigma = sched.alpha(t), sched.sigma(t)
        e = gm.eps(x, alpha, sigma)
        a, s = alpha[:, None], sigma[:, None]
        x0 = (x - s * e) / a
        return {"noise": e, "x_start": x0, "v": a * e - s * x0, "score": -e / s, "flow": e - x0, "edm": x0}[kind]

    return net


def net_for(kind, sched_name):
    return _cached(("net", kind, sched_name), lambda: _net(kind, schedule(sched_name)))


# each method with its highest order (the most coefficients); SDE algorithms with a fixed key
RUNS = [
    dict(algorithm=a, method=m, order=o)
    for a in ("dpmsolver++", "dpmsolver")
    for m, o in (("multistep", 3), ("singlestep", 3), ("unipc", 3))
] + [dict(algorithm="sde-dpmsolver++", method="multistep", order=3),
     dict(algorithm="sde-dpmsolver", method="multistep", order=2)]
KINDS = [("x_start", "vp"), ("v", "vp"), ("score", "vp"), ("flow", "flow"), ("edm", "edm")]


def _runs(kind, sched_name):
    """The samples of every configuration in RUNS, compiled as one program (one compile per kind)."""

    def go():
        def all_runs(gm):
            return [dpmjax.sample(
                net_for(kind, sched_name), gm, jax.random.key(3) if kw["algorithm"].startswith("sde-") else None,
                X_T.shape, schedule=schedule(sched_name), noise=jnp.asarray(X_T), model_type=kind, steps=6,
                skip_type="logSNR", **kw) for kw in RUNS]

        return [np.asarray(x) for x in jax.jit(all_runs)(gaussian())]

    return _cached(("runs", kind, sched_name), go)


@pytest.mark.slow
@pytest.mark.parametrize("kind, sched_name", KINDS, ids=[k for k, _ in KINDS])
def test_every_model_type_equals_the_noise_network(x64, kind, sched_name):
    """x_start/v/score (VP), flow (RectifiedFlow) and edm (EDM) networks give the sample of
    the "noise" network of the same data to 1e-9, for both algorithms, multistep, singlestep,
    UniPC and the SDE solvers (a wrong factor in any ``to_data``/``to_noise`` branch fails)."""
    for kw, x, base in zip(RUNS, _runs(kind, sched_name), _runs("noise", sched_name)):
        chex.assert_tree_all_finite(base)
        assert_close(x, base, 1e-9, f"{kind} {kw}")
    # the "noise" baseline is right: the ODE solvers' samples are close to the exact flow
    exact = np.asarray(gaussian().ode_solution(
        jnp.asarray(X_T) * schedule(sched_name).state_scale(schedule(sched_name).T), schedule(sched_name),
        schedule(sched_name).T, schedule(sched_name).t_eps)) / np.asarray(
        schedule(sched_name).state_scale(schedule(sched_name).t_eps))
    assert_close(_runs("noise", sched_name)[0], exact, 0.1, "dpmsolver++ 3M vs the exact ODE solution")


# --------------------------------------------------------------------------- 2. SDE reference

def _vp_logs(t, b0=0.1, b1=20.0):
    """log alpha, log sigma of the linear VP schedule (score_sde), in NumPy."""
    la = -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0
    return la, 0.5 * np.log(-np.expm1(2.0 * la))


def _np_eps(x, t):
    la, ls = _vp_logs(t)
    a, s = np.exp(la), np.exp(ls)
    return s * (x - a * MEAN) / (a**2 * STD**2 + s**2)


def sde_reference(x, ts, orders, zs, *, predict_data, solver_type):
    """SDE-DPM-Solver(++) multistep, from the formulas of ``updates.multistep_plan``."""
    la, ls = _vp_logs(ts)
    lam = la - ls
    ms = []
    for i, o in enumerate(orders):
        eps = _np_eps(x, ts[i])
        ms.append((x - np.exp(ls[i]) * eps) / np.exp(la[i]) if predict_data else eps)
        h = lam[i + 1] - lam[i]
        a_t, s_t = np.exp(la[i + 1]), np.exp(ls[i + 1])
        m0 = ms[i]
        if o >= 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d10 = (m0 - ms[i - 1]) / r0
        if predict_data:
            new = (s_t / np.exp(ls[i])) * np.exp(-h) * x + a_t * (1 - np.exp(-2 * h)) * m0 \
                + s_t * np.sqrt(1 - np.exp(-2 * h)) * zs[i]
            k_taylor = a_t * (1 + np.expm1(-2 * h) / (2 * h))
            if o == 2:
                new += (a_t * (1 - np.exp(-2 * h)) / 2 if solver_type == "dpmsolver" else k_taylor) * d10
            if o == 3:
                r1 = (lam[i - 1] - lam[i - 2]) / h
                d11 = (ms[i - 1] - ms[i - 2]) / r1
                d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
                d2 = (d10 - d11) / (r0 + r1)
                new += k_taylor * d1 + a_t * ((1 - np.exp(-2 * h) - 2 * h) / (2 * h) ** 2 - 0.5) * d2
        else:
            new = (a_t / np.exp(la[i])) * x - 2 * s_t * (np.exp(h) - 1) * m0 + s_t * np.sqrt(np.exp(2 * h) - 1) * zs[i]
            if o == 2:
                k = -s_t * (np.exp(h) - 1) if solver_type == "dpmsolver" else -2 * s_t * (np.expm1(h) / h - 1)
                new += k * d10
        x = new
    return x


TS = np.array([1.0, 0.72, 0.5, 0.33, 0.2, 0.11, 0.05, 0.02])
ZS = np.random.default_rng(5).standard_normal((len(TS) - 1, B, D))
SDE_CASES = [(alg, order, st) for alg, top in (("sde-dpmsolver++", 3), ("sde-dpmsolver", 2))
             for order in range(1, top + 1) for st in (("dpmsolver", "taylor") if order > 1 else ("dpmsolver",))]


def _step_api_sample(solver, zs, step=None):
    step = step or (lambda s, state, out, z: s.step(state, out, noise=z))
    gm, mf = gaussian(), _cached("vp-model", lambda: gaussian().model_fn(schedule("vp")))
    state = solver.init(jnp.asarray(X_T))
    for i in range(solver.num_evals):
        x_in, t_in = solver.model_inputs(state)
        state = step(solver, state, mf(gm, x_in, t_in), jnp.asarray(zs[i]))
    return solver.result(state)


def _sde_solver(alg, order, st):
    orders = tuple(min(i + 1, order) for i in range(len(TS) - 1))
    return dpmjax.solver(schedule("vp"), algorithm=alg, method="multistep", order=order, steps=len(TS) - 1,
                         timesteps=TS, orders=orders, solver_type=st), orders


_JIT_STEP = jax.jit(lambda s, state, out, z: s.step(state, out, noise=z))


@pytest.mark.slow
@pytest.mark.parametrize("alg, order, solver_type", SDE_CASES)
def test_sde_step_api_matches_numpy_reference(x64, alg, order, solver_type):
    solver, orders = _sde_solver(alg, order, solver_type)
    x = _step_api_sample(solver, ZS, _JIT_STEP)
    ref = sde_reference(X_T, TS, orders, ZS, predict_data=alg == "sde-dpmsolver++", solver_type=solver_type)
    assert_close(x, ref, 1e-10, f"{alg} order {order} {solver_type}")
    # the noise enters: another draw gives another sample
    assert np.max(np.abs(ref - sde_reference(X_T, TS, orders, ZS[::-1], predict_data=alg == "sde-dpmsolver++",
                                             solver_type=solver_type))) > 1e-3


class SolverStepVariantsTest(chex.TestCase):
    """The step of an SDE solver under jit and without: the same NumPy reference."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_sde_order2_noise_prediction(self):
        with jax.enable_x64(True):
            solver, orders = _sde_solver("sde-dpmsolver", 2, "dpmsolver")
            step = self.variant(lambda s, state, out, z: s.step(state, out, noise=z))
            x = _step_api_sample(solver, ZS, step)
            chex.assert_shape(x, (B, D))
            ref = sde_reference(X_T, TS, orders, ZS, predict_data=False, solver_type="dpmsolver")
            assert_close(x, ref, 1e-10, "sde-dpmsolver 2")


# --------------------------------------------------------------------------- 3. classifier guidance

@pytest.mark.slow
def test_classifier_guidance_with_nets_mlp(x64):
    """``sample(classifier_fn=..., condition=labels)`` with ``nets.MLP`` (which refuses a
    condition: the noise network is called without it) equals the unguided sample of the
    hand-guided noise model ``eps - s sigma_t grad_x log p(c | x_t)``."""
    from flax import nnx

    model = dpmjax.nets.MLP(D, width=16, depth=1, temb_dim=8, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    # the output layer starts at zero: perturb every weight so eps is not identically 0
    leaves, tdef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree_util.tree_unflatten(tdef, [p + 0.05 * jax.random.normal(k, p.shape, p.dtype)
                                                 for p, k in zip(leaves, keys)])
    model_fn = dpmjax.nets.as_model_fn(graphdef)
    sched = dpmjax.VPLinear()
    W = jax.random.normal(jax.random.key(2), (D, 5))
    labels = jnp.array([0, 3, 1, 4])
    s = 1.7

    def classifier(x, t_model, c):
        return jnp.take_along_axis(jax.nn.log_softmax(x @ W), c[:, None], axis=1)[:, 0]

    def hand_guided(params, x, t_model):
        eps = model_fn(params, x, t_model)
        grad = jax.grad(lambda x_: jnp.sum(classifier(x_, t_model, labels)))(x)
        sigma = sched.sigma(sched.solver_time(t_model))[:, None]
        return eps - s * sigma * grad

    kw = dict(schedule=sched, noise=jnp.asarray(X_T), steps=8, skip_type="logSNR")
    for algorithm in ("dpmsolver++", "dpmsolver"):
        guided = dpmjax.sample(model_fn, params, None, (B, D), algorithm=algorithm, classifier_fn=classifier,
                               condition=labels, guidance_scale=s, **kw)
        want = dpmjax.sample(hand_guided, params, None, (B, D), algorithm=algorithm, **kw)
        unguided = dpmjax.sample(model_fn, params, None, (B, D), algorithm=algorithm, **kw)
        chex.assert_tree_all_finite(guided)
        np.testing.assert_allclose(guided, want, rtol=0, atol=1e-6)
        assert float(jnp.max(jnp.abs(guided - unguided))) > 1e-2  # the guidance acts


# --------------------------------------------------------------------------- 4. hooks, intermediates, invert

HOOK_METHODS = [dict(method="singlestep", order=3, steps=7), dict(method="unipc", order=2, steps=5),
                dict(method="unipc", order=3, steps=5, variant="bh1")]
CLIP = 1.2
_RECORDS = []


def _record(t, step):
    _RECORDS.append((float(t), int(step)))


def clip_hook(x, t, step):
    jax.debug.callback(_record, t, step, ordered=True)
    return jnp.clip(x, -CLIP, CLIP)


def _hand_loop(solver, hook=None):
    """The solver driven by hand through the step API; ``hook`` applied to each completed
    step's state, with the next evaluation point recomputed from the corrected state
    (``y = ay x + cy . hist``, :meth:`Solver.export`). Returns the result, the calls
    ``(t, step)`` and the user-scale states of the completed steps, by step number."""
    ex = solver.export()
    ex["x_scale"] = np.asarray(solver.plan.x_scale)  # 1 for VP: the user-scale states are the solver's
    gm, mf = gaussian(), _cached("vp-model", lambda: gaussian().model_fn(schedule("vp")))
    state = solver.init(jnp.asarray(X_T))
    calls, states = [], {0: np.asarray(X_T)}
    for r in range(solver.num_evals):
        x_in, t_in = solver.model_inputs(state)
        new = solver.step(state, mf(gm, x_in, t_in))
        kx, ky = int(ex["x_step"][r]), int(ex["y_step"][r])
        if kx:
            if hook is not None:
                xc = hook(new.x / ex["x_scale"][r], ex["t_state"][r], kx) * ex["x_scale"][r]
                calls.append((float(ex["t_state"][r]), kx))
                y = None if new.y is None else new.y + ex["ay"][r] * (xc - new.x)
                new = new._replace(x=xc, y=y)
            states[kx] = np.asarray(new.x / ex["x_scale"][r])
        if ky:
            if hook is not None:
                new = new._replace(y=hook(new.y, ex["t_y"][r], ky))
                calls.append((float(ex["t_y"][r]), ky))
            states[ky] = np.asarray(new.y)
        state = new
    return np.asarray(solver.result(state)), calls, states


@pytest.mark.slow
@pytest.mark.parametrize("kw", HOOK_METHODS, ids=lambda kw: f"{kw['method']}{kw['order']}")
def test_correcting_xt_fn_and_intermediates_equal_a_hand_loop(x64, kw):
    sched = schedule("vp")
    solver = dpmjax.solver(sched, skip_type="logSNR", **kw)
    hook = lambda x, t, step: jnp.clip(x, -CLIP, CLIP)  # noqa: E731
    ref, calls, _ = _hand_loop(solver, hook)
    plain, _, ref_states = _hand_loop(solver)
    mf = _cached("vp-model", lambda: gaussian().model_fn(sched))
    common = dict(schedule=sched, noise=jnp.asarray(X_T), skip_type="logSNR", **kw)
    _RECORDS.clear()
    x = dpmjax.sample(mf, gaussian(), None, (B, D), correcting_xt_fn=clip_hook, **common)
    jax.effects_barrier()
    assert_close(x, ref, 1e-10, "correcting_xt_fn")
    assert np.max(np.abs(ref - plain)) > 1e-3  # the clipping changed the sample
    # the hook runs once per completed step, with its time and 1-based step number
    assert [k for _, k in _RECORDS] == [k for _, k in calls] == list(range(1, len(calls) + 1)), (_RECORDS, calls)
    np.testing.assert_allclose([t for t, _ in _RECORDS], [t for t, _ in calls], rtol=1e-12)
    # return_intermediate: x_T and the state at the end of every step, in order
    x, states = dpmjax.sample(mf, gaussian(), None, (B, D), return_intermediate=True, **common)
    chex.assert_shape(states, (len(ref_states), B, D))
    assert_close(states, np.stack([ref_states[k] for k in sorted(ref_states)]), 1e-10, "return_intermediate")
    assert_close(states[-1], x, 1e-12, "last state")


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(method="singlestep", order=3, steps=30), dict(method="unipc", order=3, steps=30)],
                         ids=["singlestep", "unipc"])
def test_invert_singlestep_and_unipc(x64, kw):
    """``invert`` runs the method upwards: its codes match the exact ODE flow from t_eps to
    T, and ``sample(invert(x))`` returns ``x``."""
    sched = schedule("vp")
    mf = _cached("vp-model", lambda: gaussian().model_fn(sched))
    x0 = np.asarray(gaussian().sample(jax.random.key(4), B))
    z = dpmjax.invert(mf, gaussian(), jnp.asarray(x0), schedule=sched, skip_type="logSNR", **kw)
    exact = np.asarray(gaussian().ode_solution(jnp.asarray(x0), sched, sched.t_eps, sched.T))
    assert_close(z, exact, 5e-3, "invert vs exact flow")
    back = dpmjax.sample(mf, gaussian(), None, (B, D), schedule=sched, noise=z, skip_type="logSNR", **kw)
    assert_close(back, x0, 5e-3, "round trip")
