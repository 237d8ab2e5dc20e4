"""``dpmjax.sample``, ``dpmjax.solve`` and ``dpmjax.invert``: drivers of the one-step API.

A call checks its arguments, builds (or takes) a :class:`dpmjax.Solver` -- the method's
coefficient tables on the time grid -- and runs one compiled program: ``init``, a
``lax.scan`` of the network call and the solver's public ``step``, and ``result``. The
adaptive method is its own ``lax.while_loop`` (:mod:`dpmjax.adaptive`). Both reach the
network through the one model-call path, :class:`dpmjax.models.Network`.

What decides the program's structure is static (the method object, the grid's ``steps``
and ``skip_type``, the sample shape, the kind of guidance); everything that is an array
(the starting noise or key, the parameters, the guidance scale, the conditions, the
schedule's tables and the times) is traced, so changing it never recompiles. The
compiled programs are cached under the model function, held weakly
(:mod:`dpmjax._cache`): dropping the model releases them.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from . import _cache
from . import adaptive as _adaptive
from . import methods as _methods
from . import models as _models
from . import schedules as _schedules
from . import solvers as _solvers
from .schedules import NoiseSchedule
from .solvers import check_key

__all__ = ["sample", "solve", "invert", "add_noise", "Solution"]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["x", "states", "stats"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Solution:
    """What :func:`dpmjax.solve` returns (a pytree).

    * ``x``: the sample at the end of the interval (user scale; float32, or float64 under
      ``jax_enable_x64``);
    * ``states``: with ``save_states=True``, the states on the time grid
      ``(n_states, *shape)`` (``x_T`` first, then one per completed step); else ``None``;
    * ``stats``: ``{"nfe": ...}``; the adaptive method adds ``"accepted"``, ``"rejected"``,
      ``"hit_max_nfe"``, ``"finished"`` and ``"t_final"``.
    """

    x: jax.Array
    states: Optional[jax.Array]
    stats: dict


def _check_shape(shape):
    if type(shape) is tuple and shape and all(type(d) is int and d > 0 for d in shape):
        return shape  # the common case, checked fast (sample() is called in loops)
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (tuple, list)):
        raise TypeError(f"shape must be a tuple of ints (B, ...); got {type(shape).__name__} {shape!r}")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"shape must be a tuple of ints (B, ...); got {shape!r}")
    shape = tuple(int(d) for d in shape)
    if len(shape) < 1 or any(d < 1 for d in shape):
        raise ValueError(f"shape must be (B, ...) with positive sizes; got {shape}")
    return shape


def _check_draw(shape, key, noise, stochastic, algorithm="sde-dpmsolver++"):
    """The per-call random inputs: ``noise`` of the sample shape, or a PRNG ``key``."""
    if noise is None:
        check_key("key", key)
    else:
        noise_shape = tuple(getattr(noise, "shape", None) or jnp.shape(noise))
        if noise_shape != shape:
            raise ValueError(f"noise must have shape {shape} (the shape argument); got {noise_shape}")
        if key is not None:
            check_key("key", key)
    if stochastic and key is None:
        raise ValueError(f"key must be a PRNG key for algorithm={algorithm!r} (it draws noise at every step)")


def _noise_sharding(sharding, noise):
    """The sharding of ``x_T`` and the result: ``sharding``, else a sharded ``noise``'s own."""
    if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
        raise TypeError(f"sharding must be a jax.sharding.Sharding; got {type(sharding).__name__}")
    if sharding is None and noise is not None and isinstance(getattr(noise, "sharding", None),
                                                             jax.sharding.NamedSharding):
        return noise.sharding
    return sharding


@functools.lru_cache(maxsize=None)
def _unit_scale(dtype):
    """The guidance scale 1 of unguided calls, made once per dtype (device-resident: a
    host scalar would be copied to the device on every call). Made outside any trace: a
    first call inside the user's ``jit`` must not cache a tracer."""
    with jax.ensure_compile_time_eval():
        return jnp.asarray(1.0, dtype)


def _guidance_arrays(guidance, kind):
    """``(unconditional, scale)``: the traced arrays of the guidance."""
    if kind == "none":
        return None, _unit_scale(_solvers.compute_dtype())
    return (guidance.unconditional if kind == "cfg" else None), _solvers._host(guidance.scale)


def _initial(shape, stochastic, prior_std, key, noise, sharding):
    """``(x_T, key of the steps)``: ``x_T`` in user scale."""
    dtype = _solvers.compute_dtype()
    key_steps = None
    if key is not None and stochastic:
        key, key_steps = jax.random.split(key)
    if noise is None:
        x_T = jax.random.normal(key, shape, dtype) * prior_std
    else:
        x_T = jnp.asarray(noise).astype(dtype)
    if sharding is not None:
        x_T = jax.lax.with_sharding_constraint(x_T, sharding)
    return x_T, key_steps


def _run_steps(solver, net, x_T, key=None, *, unroll=False, remat=False, correcting_xt_fn=None, save=None):
    """Drive ``solver`` from ``x_T`` through its one-step API: at every evaluation the network
    call ``net(x_in, t_in, alpha, sigma, in_scale)`` (a :class:`dpmjax.models.Network`) and
    ``solver.step``. Returns ``(state, saved)``: the final state and, in a ``lax.scan``, the
    stacked ``save(state, i)`` of every row (``None`` without ``save``).

    The steps run in a ``lax.scan`` (``remat``: each step under ``jax.checkpoint``, so a
    backward pass keeps one state per step), or, with ``unroll``, as one straight-line
    program (no saved values): XLA's CPU backend runs a network's convolutions inside a
    loop body or a conditional several times more slowly."""
    plan = solver.plan

    def body(state, _):
        i = state.i
        x_in, t_in = solver.model_inputs(state)
        out = net(x_in, t_in, plan.alpha[i], plan.sigma[i], plan.in_scale[i])
        state = solver.step(state, out, correcting_xt_fn=correcting_xt_fn)
        return state, None if save is None else save(state, i)

    state = solver.init(x_T, key=key)
    if unroll:
        for _ in range(solver.num_evals):
            state, _ = body(state, None)
        return state, None
    return jax.lax.scan(jax.checkpoint(body) if remat else body, state, None, length=solver.num_evals)


def _fixed_program(refs, static, solver, params, key, noise, condition, uncond, scale):
    """The fixed-step program: ``init``, the network call and the solver's ``step`` per
    evaluation (``_run_steps``), ``result``. With ``unroll`` (the fitting programs on CPU;
    no saved states) the steps are one straight-line program and classifier-free guidance is
    always the batched guided call (no conditional around the network)."""
    model_fn, classifier_fn, correcting_xt_fn = (None if r is None else r() for r in refs)
    shape, model_type, kind, save_states, sharding, unroll = static
    plan, layout = solver.plan, solver.layout
    dtype = plan.ax.dtype
    x_T, key_steps = _initial(shape, solver.options.stochastic, solver.prior_std, key, noise, sharding)
    net = _models.Network(model_fn, params, condition, kind, uncond, jnp.asarray(scale, dtype), classifier_fn,
                          model_type, dtype, guided_always=unroll)

    def save(state, i):
        return state.x / plan.x_scale[i], None if state.y is None else state.y / plan.y_scale[i]

    state, saved = _run_steps(solver, net, x_T, key_steps, unroll=unroll, correcting_xt_fn=correcting_xt_fn,
                             save=save if save_states else None)
    states = None
    if save_states:
        picks = sorted([(k, 0, r) for r, k in enumerate(layout.x_step) if k > 0]
                       + [(k, 1, r) for r, k in enumerate(layout.y_step) if k > 0])
        states = jnp.stack([x_T] + [saved[which][r] for _, which, r in picks])
    x = solver.result(state)
    if sharding is not None:
        x = jax.lax.with_sharding_constraint(x, sharding)
    return Solution(x=x, states=states, stats={"nfe": jnp.asarray(solver.num_evals, jnp.int32)})


def _adaptive_core(refs, static, x_T, schedule, params, condition, uncond, scale, t_start, t_end):
    """DPM-Solver-12/23's ``lax.while_loop`` from ``x_T`` through the one network call path."""
    model_fn, classifier_fn = (None if r is None else r() for r in refs)
    shape, model_type, kind, sharding, method, thresholding, denoise_to_zero = static
    dtype = x_T.dtype
    out_type = _models.output_type(model_type, kind)
    net = _models.Network(model_fn, params, condition, kind, uncond, jnp.asarray(scale, dtype), classifier_fn,
                          model_type, dtype)

    def predict(x, t, data=method.predict_data):
        alpha, sigma, sc = schedule.alpha(t), schedule.sigma(t), schedule.state_scale(t)
        t_in = jnp.broadcast_to(schedule.model_time(t), (x.shape[0],)).astype(dtype)
        return _models.convert(net(x / sc, t_in, alpha, sigma, sc), x, alpha, sigma, out_type, data, thresholding)

    y, info = _adaptive.adaptive_solve(
        predict, schedule, x_T * schedule.state_scale(t_start), t_start, t_end, order=method.order,
        predict_data=method.predict_data, solver_type=method.solver_type, atol=method.atol, rtol=method.rtol,
        h_init=method.h_init, theta=method.theta, t_err=method.t_err, max_nfe=method.max_nfe,
    )
    if denoise_to_zero:
        result = predict(y, info["t_final"], data=True)
        info["nfe"] = info["nfe"] + 1
    else:
        result = y / schedule.state_scale(info["t_final"])
    return result, info


# The adaptive solve with a backward pass that raises a clear error: its ``lax.while_loop``
# has a data-dependent number of steps, which reverse-mode differentiation cannot transpose.
# Module-level, with the user's functions reached through weak references only.
_adaptive_solve = jax.custom_vjp(_adaptive_core, nondiff_argnums=(0, 1))


def _adaptive_fwd(refs, static, *args):
    return _adaptive_core(refs, static, *args), None


def _adaptive_bwd(refs, static, residuals, cotangent):
    raise ValueError("method='adaptive' cannot be differentiated in reverse mode (jax.grad): its number of "
                     "steps depends on the data; differentiate a fixed-step method (e.g. method='multistep' "
                     "with steps= its NFE) instead")


_adaptive_solve.defvjp(_adaptive_fwd, _adaptive_bwd)


def _adaptive_program(refs, static, schedule, params, key, noise, condition, uncond, scale, t_start, t_end):
    """The adaptive program: ``x_T``, the solve, NaN unless it finished."""
    shape, sharding = static[0], static[3]
    dtype = _solvers.compute_dtype()
    t_start, t_end = jnp.asarray(t_start, dtype), jnp.asarray(t_end, dtype)
    x_T, _ = _initial(shape, False, schedule.prior_std(t_start), key, noise, sharding)
    x, info = _adaptive_solve(refs, static, x_T, schedule, params, condition, uncond, scale, t_start, t_end)
    # Never an unfinished solution as a sample: NaN unless the solve reached t_end.
    x = jnp.where(info["finished"], x, jnp.nan)
    if sharding is not None:
        x = jax.lax.with_sharding_constraint(x, sharding)
    return Solution(x=x, states=None, stats=info)


def _prepare(model_fn, key, shape, solver, schedule, method, grid, model_type, thresholding, denoise_to_zero,
             condition, guidance, noise, correcting_xt_fn, save_states, sharding, keywords):
    """Check a call and return ``(compiled program, its array arguments)``."""
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable; got {type(model_fn).__name__}")
    shape = _check_shape(shape)
    if correcting_xt_fn is not None and not callable(correcting_xt_fn):
        raise TypeError(f"correcting_xt_fn must be callable; got {type(correcting_xt_fn).__name__}")
    save_states = _solvers._boolean("save_states", save_states)
    guidance = _models.pop_guidance(guidance, keywords)
    kind = _models.check_guidance(shape[0], condition, guidance)
    uncond, scale = _guidance_arrays(guidance, kind)
    classifier_fn = guidance.classifier_fn if kind == "classifier" else None
    sharding = _noise_sharding(sharding, noise)
    if solver is not None:
        given = [n for n, v in (("schedule", schedule), ("method", method), ("grid", grid),
                                ("thresholding", thresholding)) if v is not None]
        given += [n for n, v in (("model_type", model_type != "noise"), ("denoise_to_zero", denoise_to_zero)) if v]
        given += list(keywords)
        if given:
            raise ValueError(f"{given[0]} cannot be combined with solver= (a built solver carries its schedule, "
                             "method, grid and model type); remove it")
        if not isinstance(solver, _solvers.Solver):
            raise TypeError(f"solver must be a dpmjax.Solver (dpmjax.solver, dpmjax.load_solver); got "
                            f"{type(solver).__name__}")
        model_type = solver.options.model_type
        if kind == "classifier" and model_type != "noise":  # the solver is fed the guided noise prediction
            solver = dataclasses.replace(solver, options=dataclasses.replace(solver.options, model_type="noise"))
    else:
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError("schedule must be a dpmjax.NoiseSchedule (VPLinear, VPCosine, VPDiscrete, EDM, "
                            f"RectifiedFlow); got {type(schedule).__name__}")
        method, grid, thresholding = _methods.resolve(method, grid, thresholding, **keywords)
        if isinstance(method, _methods.Adaptive):
            return _prepare_adaptive(model_fn, key, shape, schedule, method, grid, model_type, thresholding,
                                     denoise_to_zero, condition, kind, uncond, scale, classifier_fn, noise,
                                     correcting_xt_fn, save_states, sharding)
        _check_draw(shape, key, noise, method.stochastic, method.algorithm)  # before any table is built
        solver = _solvers.build_solver(schedule, method, grid, model_type=_models.output_type(model_type, kind),
                                       thresholding=thresholding, denoise_to_zero=denoise_to_zero,
                                       sample_shape=shape[1:])
    _check_draw(shape, key, noise, solver.options.stochastic, solver.options.algorithm)
    static = (shape, model_type, kind, save_states, sharding, False)
    fn = _cache.compiled(_fixed_program, (model_fn, classifier_fn, correcting_xt_fn), static)
    return fn, (solver, None if noise is not None and not solver.options.stochastic else key, noise, condition,
                uncond, scale)


def _prepare_adaptive(model_fn, key, shape, schedule, method, grid, model_type, thresholding, denoise_to_zero,
                      condition, kind, uncond, scale, classifier_fn, noise, correcting_xt_fn, save_states, sharding):
    if not isinstance(grid, _solvers._ts.Grid) or grid.model_timesteps is not None:
        raise ValueError("method='adaptive' chooses its own steps: give it no timesteps (only t_start/t_end)")
    if save_states:
        raise ValueError("return_intermediate / save_states is not available for method='adaptive' (its step count "
                         "is dynamic)")
    if correcting_xt_fn is not None:
        raise ValueError("correcting_xt_fn is not available for method='adaptive' (its steps are rejected and "
                         "retried); use a fixed-step method")
    _solvers.check_model_type(model_type, schedule)
    if thresholding is not None and not method.predict_data:
        raise ValueError("thresholding needs a data-prediction algorithm ('dpmsolver++')")
    denoise_to_zero = _solvers._boolean("denoise_to_zero", denoise_to_zero)
    t_start, t_end = _solvers.resolve_times(schedule, grid.t_start, grid.t_end)
    if not _solvers._is_traced((t_start, t_end)) and method.t_err > 0.01 * (float(t_start) - float(t_end)):
        raise ValueError(f"t_err (how close to t_end counts as finished, in time) must be at most 1% of the "
                         f"interval t_start - t_end = {float(t_start) - float(t_end):g}; got {method.t_err}")
    _check_draw(shape, key, noise, False)
    static = (shape, model_type, kind, sharding, method, thresholding, denoise_to_zero)
    fn = _cache.compiled(_adaptive_program, (model_fn, classifier_fn), static)
    host = _solvers._host
    return fn, (schedule, key, noise, condition, uncond, scale, host(t_start), host(t_end))


def solve(
    model_fn: Callable,
    params: Any,
    key: Optional[jax.Array],
    shape,
    *,
    solver: Optional[_solvers.Solver] = None,
    schedule: Optional[NoiseSchedule] = None,
    method=None,
    grid=None,
    model_type: str = "noise",
    thresholding=None,
    denoise_to_zero: bool = False,
    condition: Any = None,
    guidance=None,
    noise: Optional[jax.Array] = None,
    correcting_xt_fn: Optional[Callable] = None,
    save_states: bool = False,
    sharding: Optional[jax.sharding.Sharding] = None,
    **keywords,
) -> Solution:
    """Sample a diffusion model and return a :class:`Solution` (the sample, the states on
    the grid when ``save_states``, statistics). Arguments as :func:`sample`."""
    fn, args = _prepare(model_fn, key, shape, solver, schedule, method, grid, model_type, thresholding,
                        denoise_to_zero, condition, guidance, noise, correcting_xt_fn, save_states, sharding, keywords)
    return fn(args[0], params, *args[1:])


def sample(
    model_fn: Callable,
    params: Any,
    key: Optional[jax.Array],
    shape,
    *,
    solver: Optional[_solvers.Solver] = None,
    schedule: Optional[NoiseSchedule] = None,
    method=None,
    grid=None,
    model_type: str = "noise",
    thresholding=None,
    denoise_to_zero: bool = False,
    condition: Any = None,
    guidance=None,
    noise: Optional[jax.Array] = None,
    correcting_xt_fn: Optional[Callable] = None,
    sharding: Optional[jax.sharding.Sharding] = None,
    **keywords,
):
    """Sample a diffusion model by solving its probability-flow ODE (or diffusion SDE).

    DPM-Solver (Lu et al. 2022, arXiv:2206.00927), DPM-Solver++ and SDE-DPM-Solver(++)
    (arXiv:2211.01095), UniPC (Zhao et al. 2023, arXiv:2302.04867) and DPM-Solver-v3
    (Zheng et al. 2023, arXiv:2310.13268); one compiled program per configuration.

    Args:
      model_fn: ``model_fn(params, x, t)`` (or ``model_fn(params, x, t, condition)`` when a
        condition is given) returning an array of ``x``'s shape; ``t`` has shape ``(B,)``
        and holds ``schedule.model_time(t)`` (continuous time, or the training-step index
        of a discrete schedule). Any output dtype; it is upcast.
      params: the model's parameters (any pytree; traced, differentiable).
      key: a PRNG key for ``x_T`` (and the SDE noise); may be ``None`` when ``noise`` is
        given and the method is deterministic.
      shape: the sample shape ``(B, ...)``.
      solver: a built :class:`dpmjax.Solver` (:func:`dpmjax.solver`,
        :func:`dpmjax.load_solver`, :func:`dpmjax.fit_solver`), which carries its schedule,
        method, grid and model type; or give those:
      schedule: a :class:`dpmjax.NoiseSchedule` (``VPLinear``, ``VPCosine``, ``VPDiscrete``,
        ``EDM``, ``RectifiedFlow``).
      method: a method object (default :class:`dpmjax.DPMSolverPP` ``(order=2)``):
        :class:`dpmjax.DPMSolver`, :class:`dpmjax.SDEDPMSolverPP`, :class:`dpmjax.Singlestep`,
        :class:`dpmjax.UniPC`, :class:`dpmjax.V3`, :class:`dpmjax.Adaptive`, ...
      grid: a :class:`dpmjax.Grid` (default ``Grid(steps=20, skip_type="time_uniform")``),
        a :class:`dpmjax.FittedGrid` (:func:`dpmjax.fit_timesteps`) or an array of
        decreasing times (traced: new values never recompile). Its last entry may be
        exactly ``0`` (sigma = 0): the last step is then the first-order update's limit.
      model_type: what the network returns: ``"noise"``, ``"x_start"``, ``"v"``, ``"score"``,
        ``"edm"`` (a denoiser, with :class:`dpmjax.EDM`) or ``"flow"`` (velocity
        ``eps - x0``, with :class:`dpmjax.RectifiedFlow`).
      thresholding: ``None`` or a :class:`dpmjax.Thresholding` (data-prediction methods).
      denoise_to_zero: return the data prediction at the end (one more NFE).
      condition: the network's condition (any pytree with the batch as leading axis).
      guidance: ``None``, :class:`dpmjax.ClassifierFree` ``(unconditional, scale)`` or
        :class:`dpmjax.ClassifierGuidance` ``(classifier_fn, scale)``; the scale is traced.
      noise: the starting ``x_T`` of shape ``shape`` (overrides ``key`` for ``x_T``).
      correcting_xt_fn: optional ``f(x, t, step) -> x`` applied to the state after each step
        (user scale; not for the adaptive method).
      sharding: a :class:`jax.sharding.Sharding` for ``x_T`` and the result (e.g. a
        ``NamedSharding`` over the batch axis); by default a sharded ``noise``'s own.
      keywords: the authors' flat spelling, mapped to the objects by
        :func:`dpmjax.from_keywords` with the same results and errors: ``algorithm``,
        ``method`` (a string), ``order``, ``steps``, ``skip_type``, ``t_start``, ``t_end``,
        ``lower_order_final``, ``solver_type``, ``variant``, ``disable_corrector``, ``orders``,
        ``timesteps``, ``model_timesteps``, ``atol``, ``rtol``, ``h_init``, ``theta``, ``t_err``,
        ``max_nfe``, ``ems``, ``use_corrector``, ``p_pseudo``, ``c_pseudo``, ``thresholding=True``
        with ``dynamic_thresholding_ratio``, ``thresholding_max_val``, ``sample_max_value``;
        ``unconditional_condition``, ``guidance_scale``, ``classifier_fn``; and
        ``return_intermediate`` / ``return_info``, which make the result the tuple ``(x,
        states)``, ``(x, info)`` or ``(x, states, info)`` (:func:`dpmjax.solve` returns a
        :class:`dpmjax.Solution` instead).

    Returns:
      ``x`` at the end of the interval (float32, float64 under ``jax_enable_x64``).

    Example::

        schedule = dpmjax.VPDiscrete.from_named("linear", 1000)
        x = dpmjax.sample(model_fn, params, jax.random.key(0), (16, 32, 32, 3), schedule=schedule,
                          method=dpmjax.DPMSolverPP(order=2), grid=dpmjax.Grid(steps=15, skip_type="logSNR"))
    """
    legacy = None
    if "return_intermediate" in keywords or "return_info" in keywords:
        legacy = (_solvers._boolean("return_intermediate", keywords.pop("return_intermediate", False)),
                  _solvers._boolean("return_info", keywords.pop("return_info", False)))
    fn, args = _prepare(model_fn, key, shape, solver, schedule, method, grid, model_type, thresholding,
                        denoise_to_zero, condition, guidance, noise, correcting_xt_fn,
                        legacy is not None and legacy[0], sharding, keywords)
    if legacy is None:
        return fn(args[0], params, *args[1:]).x
    out = fn(args[0], params, *args[1:])
    parts = (out.x,) + ((out.states,) if legacy[0] else ()) + ((out.stats,) if legacy[1] else ())
    return parts[0] if len(parts) == 1 else parts


def invert(
    model_fn: Callable,
    params: Any,
    x0: jax.Array,
    *,
    schedule: NoiseSchedule,
    method=None,
    grid=None,
    model_type: str = "noise",
    thresholding=None,
    condition: Any = None,
    guidance=None,
    correcting_xt_fn: Optional[Callable] = None,
    **keywords,
):
    """ODE encoding: run the same solvers backwards, from ``t_start`` (default
    ``schedule.t_eps``) *up* to ``t_end`` (default ``schedule.T``), mapping data to noise.

    The exponential-integrator formulas hold for negative steps in lambda, so the
    updates are exactly those of :func:`sample` on the reversed grid;
    ``sample(..., noise=invert(x))`` returns ``x`` up to the solver's error on both legs.
    Deterministic fixed-step methods only; a :class:`dpmjax.Grid`'s ``t_start < t_end``,
    explicit times (an array, not a :class:`dpmjax.FittedGrid`, whose network times belong
    to the sampling direction) strictly *increasing*. Other arguments as :func:`sample`
    (the flat ``return_intermediate`` / ``return_info`` included).

    Example::

        z = dpmjax.invert(model_fn, params, x, schedule=schedule, grid=dpmjax.Grid(steps=50))
        x_again = dpmjax.sample(model_fn, params, None, x.shape, schedule=schedule, noise=z,
                                grid=dpmjax.Grid(steps=50))
    """
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable; got {type(model_fn).__name__}")
    if isinstance(keywords.get("timesteps"), _solvers._ts.FittedGrid) or isinstance(grid, _solvers._ts.FittedGrid):
        raise ValueError("invert takes timesteps as a plain increasing array, not a FittedGrid "
                         "(its model_timesteps belong to the sampling direction)")
    legacy = (_solvers._boolean("return_intermediate", keywords.pop("return_intermediate", False)),
              _solvers._boolean("return_info", keywords.pop("return_info", False)))
    if keywords.get("method") in ("adaptive", "v3") or str(keywords.get("algorithm", "")).startswith("sde-") or (
            isinstance(method, (_methods.Adaptive, _methods.V3)) or
            (isinstance(method, _methods.Method) and method.stochastic) or method in ("adaptive", "v3")):
        raise ValueError("invert supports deterministic fixed-step methods only (method in 'multistep', 'singlestep', "
                         "'singlestep_fixed', 'unipc'; algorithm 'dpmsolver++' or 'dpmsolver')")
    x0 = jnp.asarray(x0)
    shape = _check_shape(x0.shape)
    guidance = _models.pop_guidance(guidance, keywords)
    kind = _models.check_guidance(shape[0], condition, guidance)
    uncond, scale = _guidance_arrays(guidance, kind)
    classifier_fn = guidance.classifier_fn if kind == "classifier" else None
    if correcting_xt_fn is not None and not callable(correcting_xt_fn):
        raise TypeError(f"correcting_xt_fn must be callable; got {type(correcting_xt_fn).__name__}")
    if "denoise_to_zero" in keywords:
        raise TypeError("invert takes no denoise_to_zero (it ends at noise)")
    method, grid, thresholding = _methods.resolve(method, grid, thresholding, **keywords)
    solver = _solvers.build_solver(schedule, method, grid, model_type=_models.output_type(model_type, kind),
                                   thresholding=thresholding, direction="increasing")
    static = (shape, model_type, kind, legacy[0], None, False)
    fn = _cache.compiled(_fixed_program, (model_fn, classifier_fn, correcting_xt_fn), static)
    out = fn(solver, params, None, x0, condition, uncond, scale)
    parts = (out.x,) + ((out.states,) if legacy[0] else ()) + ((out.stats,) if legacy[1] else ())
    return parts[0] if len(parts) == 1 else parts


def add_noise(schedule: NoiseSchedule, x0, t, key):
    """Draw ``x_t ~ q(x_t | x0)``: ``alpha_t x0 + sigma_t eps`` (user scale: ``x0 + sigma eps``
    for :class:`dpmjax.EDM`). ``t`` is a scalar or a per-sample ``(B,)`` array of times in
    ``(0, T]``.

    Returns ``(x_t, eps)``.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a dpmjax.NoiseSchedule; got {type(schedule).__name__}")
    check_key("key", key)
    dtype = _solvers.compute_dtype()
    x0 = jnp.asarray(x0, dtype)
    if x0.ndim < 1:
        raise ValueError(f"x0 must be a batch (B, ...); got shape {x0.shape}")
    _schedules.check_times_in_range(schedule, t, "t", batch_size=x0.shape[0])
    t = jnp.asarray(t, dtype)
    eps = jax.random.normal(key, x0.shape, dtype)
    scale = jnp.asarray(schedule.state_scale(t), dtype)
    scale = scale.reshape(scale.shape + (1,) * (x0.ndim - scale.ndim))
    return schedule.marginal(x0, t, eps) / scale, eps
