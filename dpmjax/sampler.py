"""``dpmjax.sample``: validate -> solver tables -> one ``lax.scan`` over model evaluations.

The configuration (algorithm, method, order, steps, skip type, ...) is static and
decides the structure of the program; everything that is an array (the starting
noise or key, the parameters, the guidance scale, the conditions, the schedule's
tables, the times) is traced, so changing it never recompiles. The fixed-step methods
are drivers of the one-step API (:func:`dpmjax.solver`): ``sample`` is ``init``, a
``lax.scan`` of the model call and the same ``step``, and ``result``. The adaptive
method is its own ``lax.while_loop`` (:mod:`dpmjax.adaptive`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import numbers
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import adaptive as _adaptive
from . import models as _models
from . import schedules as _schedules
from . import solvers as _solvers
from . import timesteps as _ts
from .schedules import NoiseSchedule
from .solvers import ALGORITHMS, METHODS, SOLVER_TYPES, UNIPC_VARIANTS, check_key

__all__ = ["sample", "invert", "add_noise", "ALGORITHMS", "METHODS", "SOLVER_TYPES", "UNIPC_VARIANTS"]

_DEFAULT_MAX_NFE = 10_000
_MAX_MAX_NFE = 10_000_000
_ADAPTIVE_DEFAULTS = dict(atol=0.0078, rtol=0.05, h_init=0.05, theta=0.9, t_err=1e-5, max_nfe=None)


@dataclasses.dataclass(frozen=True)
class _Run:
    """What is static about one call beyond the solver's own options (a jit cache key)."""

    shape: tuple
    model_type: str  # the network's output type (the solver may see "noise" under classifier guidance)
    guidance: str  # "none" | "cfg" | "classifier"
    stochastic: bool
    return_intermediate: bool
    return_info: bool
    adaptive: tuple = ()  # (order, predict_data, solver_type, thresholding, ratio, max_val, sample_max_value,
    #                        atol, rtol, h_init, theta, t_err, max_nfe)


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


def _check_guidance(shape, condition, unconditional_condition, guidance_scale, classifier_fn):
    """Guidance mode ``"none" | "cfg" | "classifier"`` after checking its arguments."""
    if unconditional_condition is not None and condition is None:
        raise ValueError("unconditional_condition needs condition (classifier-free guidance)")
    if unconditional_condition is not None and classifier_fn is not None:
        raise ValueError("use either classifier-free guidance (unconditional_condition) or classifier_fn, not both")
    if classifier_fn is not None and not callable(classifier_fn):
        raise TypeError(f"classifier_fn must be callable; got {type(classifier_fn).__name__}")
    guidance = "cfg" if unconditional_condition is not None else ("classifier" if classifier_fn is not None else "none")
    if guidance == "cfg":
        c_leaves, c_def = jax.tree_util.tree_flatten(condition)
        u_leaves, u_def = jax.tree_util.tree_flatten(unconditional_condition)
        if c_def != u_def:
            raise ValueError(f"condition and unconditional_condition must have the same structure; got {c_def} and {u_def}")
        for c, u in zip(c_leaves, u_leaves):
            cs, us = tuple(jnp.shape(c)), tuple(jnp.shape(u))
            if len(cs) < 1 or cs[0] != shape[0]:
                raise ValueError(f"condition leaves must have the batch size {shape[0]} as leading axis (they are "
                                 f"concatenated with unconditional_condition); got shape {cs}")
            if cs != us:
                raise ValueError(f"condition and unconditional_condition leaves must have the same shape; got {cs} and {us}")
    if guidance == "none" and type(guidance_scale) in (float, int) and guidance_scale == 1:
        return guidance  # the default, checked fast
    if isinstance(guidance_scale, jax.core.Tracer):
        if guidance == "none":
            raise ValueError("guidance_scale is traced but no guidance is configured: give unconditional_condition "
                             "(classifier-free) or classifier_fn (classifier guidance)")
        if jnp.ndim(guidance_scale) != 0:
            raise ValueError(f"guidance_scale must be a scalar; got shape {jnp.shape(guidance_scale)} "
                             "(for one scale per sample, vmap over sample)")
        return guidance
    if guidance_scale is None or isinstance(guidance_scale, (str, bytes, bool)):
        raise TypeError(f"guidance_scale must be a real number; got {guidance_scale!r}")
    try:
        g = np.asarray(guidance_scale, np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"guidance_scale must be a real number; got {guidance_scale!r}") from None
    if g.ndim != 0:
        raise ValueError(f"guidance_scale must be a scalar; got shape {g.shape} (for one scale per sample, vmap "
                         "over sample)")
    if not np.isfinite(g):
        raise ValueError(f"guidance_scale must be finite; got {float(g)}")
    if guidance == "none" and g != 1.0:
        raise ValueError(
            "guidance_scale != 1 needs unconditional_condition (classifier-free) or classifier_fn (classifier guidance)"
        )
    return guidance


def _check_adaptive(order, atol, rtol, h_init, theta, t_err, max_nfe, t_start, t_end):
    if order not in (2, 3):
        raise ValueError(f"method='adaptive' needs order 2 or 3; got order={order}")
    vals = {n: _solvers._real(n, v) for n, v in
            dict(atol=atol, rtol=rtol, h_init=h_init, theta=theta, t_err=t_err).items()}
    for name, v in vals.items():
        if v <= 0:
            raise ValueError(f"{name} must be > 0; got {v}")
    if vals["theta"] > 1:
        raise ValueError(f"theta (the step-size safety factor) must be in (0, 1]; got {vals['theta']}")
    if not _solvers._is_traced((t_start, t_end)):
        span = float(t_start) - float(t_end)
        if vals["t_err"] > 0.01 * span:
            raise ValueError(f"t_err (how close to t_end counts as finished, in time) must be at most 1% of the "
                             f"interval t_start - t_end = {span:g}; got {vals['t_err']}")
    max_nfe = _solvers._integer("max_nfe", _DEFAULT_MAX_NFE if max_nfe is None else max_nfe, order, _MAX_MAX_NFE)
    return tuple(vals[n] for n in ("atol", "rtol", "h_init", "theta", "t_err")) + (max_nfe,)


def sample(
    model_fn: Callable,
    params: Any,
    key: Optional[jax.Array],
    shape,
    *,
    schedule: NoiseSchedule,
    model_type: str = "noise",
    algorithm: str = "dpmsolver++",
    method: str = "multistep",
    order: int = 2,
    steps: int = 20,
    skip_type: str = "time_uniform",
    t_start: Optional[float] = None,
    t_end: Optional[float] = None,
    lower_order_final: bool = True,
    denoise_to_zero: bool = False,
    solver_type: str = "dpmsolver",
    thresholding: bool = False,
    thresholding_max_val: float = 1.0,
    dynamic_thresholding_ratio: float = 0.995,
    correcting_xt_fn: Optional[Callable] = None,
    noise: Optional[jax.Array] = None,
    return_intermediate: bool = False,
    condition: Any = None,
    unconditional_condition: Any = None,
    guidance_scale=1.0,
    classifier_fn: Optional[Callable] = None,
    variant: str = "bh2",
    disable_corrector=(),
    timesteps: Optional[jax.Array] = None,
    model_timesteps: Optional[jax.Array] = None,
    atol: float = 0.0078,
    rtol: float = 0.05,
    h_init: float = 0.05,
    theta: float = 0.9,
    t_err: float = 1e-5,
    max_nfe: Optional[int] = None,
    return_info: bool = False,
    sharding: Optional[jax.sharding.Sharding] = None,
    orders: Optional[tuple] = None,
    sample_max_value: Optional[float] = None,
    ems=None,
    use_corrector: bool = True,
    p_pseudo: bool = False,
    c_pseudo: bool = True,
):
    """Sample a diffusion model by solving its probability-flow ODE (or diffusion SDE) from ``t_start`` to ``t_end``.

    DPM-Solver (Lu et al. 2022, arXiv:2206.00927), DPM-Solver++ and SDE-DPM-Solver(++)
    (arXiv:2211.01095) and UniPC (Zhao et al. 2023, arXiv:2302.04867), with the names and
    defaults of the authors' reference implementation.

    Args:
      model_fn: ``model_fn(params, x, t)`` (or ``model_fn(params, x, t, condition)`` when a
        condition is given) returning an array of ``x``'s shape; ``t`` has shape ``(B,)``
        and holds ``schedule.model_time(t)`` (continuous time, or the training-step index
        ``t N - 1`` of a discrete schedule). Any output dtype; it is upcast.
      params: the model's parameters (any pytree; traced, differentiable).
      key: a PRNG key for ``x_T`` (and the SDE noise); may be ``None`` when ``noise`` is
        given and the algorithm is deterministic.
      shape: the sample shape ``(B, ...)``.
      schedule: a :class:`dpmjax.NoiseSchedule` (``VPLinear``, ``VPCosine``, ``VPDiscrete``,
        ``EDM``, ``RectifiedFlow``).
      model_type: ``"noise"``, ``"x_start"``, ``"v"``, ``"score"``, ``"edm"`` (a denoiser, with
        :class:`dpmjax.EDM`) or ``"flow"`` (velocity ``eps - x0``, with :class:`dpmjax.RectifiedFlow`).
      algorithm: ``"dpmsolver++"`` (integrate the data prediction; use it with guidance),
        ``"dpmsolver"`` (the noise prediction), or their stochastic versions
        ``"sde-dpmsolver++"`` (multistep, order 1 to 3) / ``"sde-dpmsolver"`` (order 1 or 2).
      method: ``"multistep"``, ``"singlestep"`` (DPM-Solver-fast: mixed orders summing to
        ``steps``), ``"singlestep_fixed"``, ``"unipc"`` (predictor-corrector) or
        ``"adaptive"`` (DPM-Solver-12/23 with ``atol``, ``rtol``, ``h_init``, ``theta``,
        ``t_err``; ``steps`` is ignored, ``max_nfe`` bounds the loop, default 10000) or
        ``"v3"`` (DPM-Solver-v3, Zheng et al. 2023, arXiv:2310.13268: multistep
        predictor-corrector with the empirical model statistics ``ems``; see below).
      order: 1, 2 or 3 (1 is DDIM).
      steps: the number of model evaluations (NFE), plus one with ``denoise_to_zero``
        (``"singlestep_fixed"``, as in the reference implementation, takes ``steps // order``
        steps of ``order`` evaluations each: ``steps // order * order``, which
        ``return_info``'s ``"nfe"`` reports).
      skip_type: time grid: ``"time_uniform"``, ``"logSNR"``, ``"time_quadratic"``,
        ``"karras"`` or ``"edm"`` (see :func:`dpmjax.time_grid`).
      t_start, t_end: integration interval, ``0 < t_end < t_start <= schedule.T`` (a discrete
        schedule starts at ``t_eps = 1/N``); defaults ``schedule.T`` and ``schedule.t_eps``
        (``1/N`` discrete, ``1e-3`` continuous). Python floats (checked to be distinct in the
        dtype the solver computes in) or traced scalars (not checked). Not with ``timesteps``.
      lower_order_final: lower the order of the last steps (multistep: only for
        ``steps < 10``; UniPC: always), which stabilises very few steps.
      denoise_to_zero: return the data prediction at ``t_end`` (one more NFE).
      solver_type: ``"dpmsolver"`` or ``"taylor"`` second-order corrections; ``"midpoint"`` is
        ``"dpmsolver"`` except that singlestep order 3 reaches its second intermediate point
        by the midpoint second-order step too (diffusers' singlestep scheduler), where
        DPM-Solver-3 uses the ``"taylor"`` one.
      thresholding: dynamic thresholding of the data prediction (``"++"`` only),
        with ``thresholding_max_val`` and ``dynamic_thresholding_ratio`` (a fraction), and
        optionally ``sample_max_value``, an upper bound of the threshold (diffusers' form:
        the threshold clamped to ``[thresholding_max_val, sample_max_value]``).
      correcting_xt_fn: optional ``f(x, t, step) -> x`` applied to the state after each step
        (in user scale, like ``noise`` and the result: VE scale for ``EDM``); it must return
        an array of ``x``'s shape. Not for ``method="adaptive"``.
      noise: the starting ``x_T`` of shape ``shape`` (overrides ``key`` for ``x_T``).
      return_intermediate: also return the states on the time grid, ``(n_states, *shape)``.
      condition, unconditional_condition, guidance_scale: classifier-free guidance,
        ``out_u + s (out_c - out_u)`` from one model call on the concatenated batch
        ``[unconditional, conditional]``; at ``s == 1`` only the conditional call runs.
        ``guidance_scale`` is traced: changing it never recompiles.
      classifier_fn: classifier guidance, ``classifier_fn(x, t, condition)`` returning
        per-sample log-probabilities; ``eps <- eps - guidance_scale sigma_t grad_x log p``.
      variant: UniPC's ``"bh1"`` or ``"bh2"``.
      disable_corrector: UniPC steps (1-based) whose corrector is skipped; like every
        option that does not apply to the chosen ``method`` (``variant`` without UniPC,
        ``atol`` without ``"adaptive"``, ...), it raises ``ValueError`` for another method
        when given a value other than its default.
      timesteps: a strictly decreasing grid of ``steps + 1`` times in ``(0, T]`` replacing
        the built-in one (multistep, UniPC and singlestep, whose outer steps end at the
        indices ``cumsum([0] + orders)`` with inner points at the grid points between), or a
        :class:`dpmjax.FittedGrid` (what :func:`dpmjax.fit_timesteps` returns); traced, so
        new values never recompile. Its last entry may be exactly ``0`` (sigma = 0): the last
        step is then the first-order update's limit, the data prediction at the last
        evaluation, with no extra model call (diffusers' ``final_sigmas_type="zero"``).
      model_timesteps: optional times (solver time, in ``(0, T]``), one per model evaluation,
        given to the network instead of the evaluation's own time (Xia et al. 2024,
        arXiv:2310.09469). The update formulas keep the grid's times, and the
        ``denoise_to_zero`` evaluation keeps ``t_end``. Traced, like ``timesteps``.
      orders: optional per-step orders (multistep, unipc; each at most ``order`` and at most
        the step's 1-based index) or per-outer-step orders (singlestep, summing to
        ``steps``) in place of the built-in rules.
      atol, rtol, h_init, theta, t_err, max_nfe: the adaptive solver's tolerances, first step
        (in lambda), safety factor (in ``(0, 1]``), end tolerance (in time, at most 1 % of
        the interval) and bound on model evaluations (default 10000). An adaptive solve that
        stops at ``max_nfe`` (or whose error estimate is not finite) before reaching
        ``t_end`` returns NaN, never an unfinished state as a sample; ``return_info`` says why.
      return_info: also return a dict with ``"nfe"`` (and, for ``method="adaptive"``,
        ``"accepted"``, ``"rejected"``, ``"hit_max_nfe"``, ``"finished"``, ``"t_final"``).
      sharding: a :class:`jax.sharding.Sharding` for ``x_T`` and the result (e.g. a
        ``NamedSharding`` over the batch axis); by default a sharded ``noise``'s own.
      ems: ``method="v3"`` only: a :class:`dpmjax.EMS` (:func:`dpmjax.compute_ems`,
        :func:`dpmjax.load_ems`) of the sample shape ``shape[1:]``. DPM-Solver-v3 integrates
        over the EMS grid's range (no ``t_start``/``t_end``): its ``steps + 1`` time steps are
        the ``skip_type`` grid (``"logSNR"``, ``"time_uniform"``, ``"time_quadratic"`` or
        ``"karras"``), or the given ``timesteps`` (concrete; e.g. a fitted grid, whose ends
        must be the EMS range's), snapped to EMS grid points (each new grid builds and
        compiles its own tables). ``order`` is the
        predictor's (1 to 3), ``algorithm`` must be ``"dpmsolver++"``; see :mod:`dpmjax.v3`.
      use_corrector, p_pseudo, c_pseudo: ``method="v3"`` only, the authors' options: the
        corrector (no extra model call), pseudo-order predictor and corrector. Their
        CIFAR-10 settings: 5 NFE ``p_pseudo=True, lower_order_final=False``; 6 to 8 NFE
        ``p_pseudo=False, lower_order_final=True``; both with ``c_pseudo=False``.

    Returns:
      ``x`` at ``t_end`` (float32, float64 under ``jax_enable_x64``); with
      ``return_intermediate`` also the states, with ``return_info`` also the info dict:
      ``x``, ``(x, states)``, ``(x, info)`` or ``(x, states, info)``.

    Example::

        schedule = dpmjax.VPDiscrete.from_named("linear", 1000)
        x = dpmjax.sample(model_fn, params, jax.random.key(0), (16, 32, 32, 3),
                          schedule=schedule, algorithm="dpmsolver++", method="multistep",
                          order=2, steps=15, skip_type="logSNR")
    """
    # A repeated call with the same configuration (every argument but the arrays) finds its
    # solver and compiled program here, checks only the per-call arguments, and dispatches
    # (the schedule by identity: the entry holds it, and a VPDiscrete's tables do not hash).
    config = (model_fn, shape, id(schedule), model_type, algorithm, method, order, steps, skip_type, t_start, t_end,
              lower_order_final, denoise_to_zero, solver_type, thresholding, thresholding_max_val,
              dynamic_thresholding_ratio, correcting_xt_fn, return_intermediate, condition is None,
              unconditional_condition is None, classifier_fn, variant, disable_corrector, timesteps, model_timesteps,
              atol, rtol, h_init, theta, t_err, max_nfe, return_info, sharding, orders, sample_max_value, ems,
              use_corrector, p_pseudo, c_pseudo)
    try:  # the types tell 1, 1.0 and True apart (also inside the tuple options)
        config = (config, tuple(map(type, config)), disable_corrector and tuple(map(type, disable_corrector)),
                  orders and tuple(map(type, orders)), jax.config.jax_enable_x64)
        hit = _FAST.get(config)
    except (TypeError, ValueError):  # an unhashable option (an array of times, a list): the full path below
        config = hit = None
    if hit is not None and hit[0] is schedule:
        _, solver, fn, stochastic, run_sharding, unit = hit
        _check_shape(shape)  # (64.0,) == (64,): the element types are checked here
        guidance = _check_guidance(shape, condition, unconditional_condition, guidance_scale, classifier_fn)
        _check_draw(shape, key, noise, stochastic, algorithm)
        if _noise_sharding(sharding, noise) is run_sharding:
            scale = unit if guidance == "none" else _solvers._host(guidance_scale)
            return fn(solver.plan, solver.start_scale, solver.end_scale, solver.prior_std, params, key, noise,
                      condition, unconditional_condition, scale)
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable; got {type(model_fn).__name__}")
    shape = _check_shape(shape)
    _solvers._choice("method", method, METHODS)
    if correcting_xt_fn is not None and not callable(correcting_xt_fn):
        raise TypeError(f"correcting_xt_fn must be callable; got {type(correcting_xt_fn).__name__}")
    return_intermediate = _solvers._boolean("return_intermediate", return_intermediate)
    return_info = _solvers._boolean("return_info", return_info)
    guidance = _check_guidance(shape, condition, unconditional_condition, guidance_scale, classifier_fn)
    timesteps, model_timesteps = _solvers.split_grid(timesteps, model_timesteps, t_start, t_end)
    adaptive_given = dict(atol=atol, rtol=rtol, h_init=h_init, theta=theta, t_err=t_err, max_nfe=max_nfe)
    if method == "adaptive":
        _solvers.reject_inapplicable(method, dict(lower_order_final=lower_order_final, variant=variant,
                                                  disable_corrector=disable_corrector, orders=orders, ems=ems,
                                                  use_corrector=use_corrector, p_pseudo=p_pseudo, c_pseudo=c_pseudo))
        for name, v in (("timesteps", timesteps), ("model_timesteps", model_timesteps)):
            if v is not None:
                raise ValueError(f"{name} cannot be combined with method='adaptive' (it chooses its own steps)")
        if return_intermediate:
            raise ValueError("return_intermediate is not available for method='adaptive' (its step count is dynamic)")
        if correcting_xt_fn is not None:
            raise ValueError("correcting_xt_fn is not available for method='adaptive' (its steps are rejected and "
                             "retried); use a fixed-step method")
    else:
        for name, v in adaptive_given.items():
            if v != _ADAPTIVE_DEFAULTS[name]:
                raise ValueError(f"{name}={v!r} does not apply to method={method!r} (it is an option of "
                                 "method='adaptive'); remove it")
    # The arguments of this call (before the solver's tables are built or anything compiles).
    stochastic = isinstance(algorithm, str) and algorithm.startswith("sde-")
    _check_draw(shape, key, noise, stochastic, algorithm)
    if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
        raise TypeError(f"sharding must be a jax.sharding.Sharding; got {type(sharding).__name__}")
    prepared = _prepare(schedule, guidance, method, dict(
        model_type=model_type, algorithm=algorithm, order=order, steps=steps, skip_type=skip_type,
        denoise_to_zero=denoise_to_zero, solver_type=solver_type, thresholding=thresholding,
        thresholding_max_val=thresholding_max_val, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
        lower_order_final=lower_order_final, variant=variant, disable_corrector=disable_corrector, orders=orders,
        sample_max_value=sample_max_value, ems=ems, use_corrector=use_corrector, p_pseudo=p_pseudo,
        c_pseudo=c_pseudo), t_start, t_end, timesteps, model_timesteps, shape)
    opts, t_start, t_end, solver, runners = prepared
    sharding = _noise_sharding(sharding, noise)
    host = _solvers._host
    scale = host(guidance_scale) if guidance != "none" else _unit_scale(_solvers.compute_dtype())

    def static_run(adaptive=()):
        return _Run(shape=shape, model_type=model_type, guidance=guidance, stochastic=opts.stochastic,
                    return_intermediate=return_intermediate, return_info=return_info, adaptive=adaptive)

    if method == "adaptive":
        run = static_run((order, opts.predict_data, solver_type, opts.thresholding, opts.dynamic_thresholding_ratio,
                          opts.thresholding_max_val, opts.sample_max_value)
                         + _check_adaptive(order, atol, rtol, h_init, theta, t_err, max_nfe, t_start, t_end))
        return _adaptive_jit(run, opts.denoise_to_zero, model_fn, classifier_fn, sharding, schedule, params, key,
                             noise, condition, unconditional_condition, scale, host(t_start), host(t_end))
    # a repeated call finds its compiled program here, without building its static description
    rkey = (shape, model_type, guidance, return_intermediate, return_info, model_fn, classifier_fn, correcting_xt_fn,
            sharding)
    fn = runners.get(rkey)
    if fn is None:
        fn = runners[rkey] = _runner(static_run(), model_fn, classifier_fn, correcting_xt_fn, sharding, solver.options,
                                     solver.layout)
        if len(runners) > 8:  # e.g. a new model closure on every call: keep the newest few
            runners.pop(next(iter(runners)))
    if config is not None and not _solvers._is_traced(solver):
        _FAST[config] = (schedule, solver, fn, opts.stochastic, sharding, _unit_scale(_solvers.compute_dtype()))
        if len(_FAST) > _PREPARED_MAX:
            _FAST.pop(next(iter(_FAST)))
    return fn(solver.plan, solver.start_scale, solver.end_scale, solver.prior_std, params, key, noise, condition,
              unconditional_condition, scale)


_FAST: dict = {}  # full configuration -> (schedule, solver, compiled program, stochastic, sharding, unit scale)


def _check_draw(shape, key, noise, stochastic, algorithm):
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
    if sharding is None and noise is not None and isinstance(getattr(noise, "sharding", None),
                                                             jax.sharding.NamedSharding):
        return noise.sharding
    return sharding


@functools.lru_cache(maxsize=None)
def _unit_scale(dtype):
    """The guidance scale 1 of unguided calls, made once per dtype (device-resident: a
    host scalar would be copied to the device on every call)."""
    return jnp.asarray(1.0, dtype)


class _Uncacheable(Exception):
    pass


def _freeze(v):
    """A hashable stand-in for a concrete argument value (raises for arrays that live on a
    device or are traced: those calls are not cached)."""
    if v is None or isinstance(v, (bool, int, float, str, np.generic)):
        return v
    if isinstance(v, np.ndarray):
        return ("nd", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, (tuple, list)):
        return tuple(_freeze(u) for u in v)
    raise _Uncacheable


_PREPARED: "collections.OrderedDict" = collections.OrderedDict()
_PREPARED_MAX = 64


def _prepare(schedule, guidance, method, kw, t_start, t_end, timesteps, model_timesteps, shape):
    """``(opts, t_start, t_end, solver)``: the checked options and, for fixed-step methods,
    the solver's tables, computed once per concrete configuration and reused (a repeated
    call with the same options, schedule and times skips straight to the compiled scan)."""
    # The key holds each value with its type (1 == 1.0 == True must not share a checked
    # entry). Plain values hash as they are; NumPy arrays are frozen to bytes; JAX arrays
    # and tracers make the call uncacheable.
    vals = (*kw.values(), t_start, t_end, timesteps, model_timesteps)
    head = (method, guidance, id(schedule), jax.config.jax_enable_x64, tuple(map(type, vals)))
    try:
        key = head + vals
        hash(key)
    except TypeError:
        try:
            key = head + tuple(_freeze(v) for v in vals)
            hash(key)
        except (_Uncacheable, TypeError):
            key = None
    if key is not None:
        hit = _PREPARED.get(key)
        if hit is not None and hit[0] is schedule:
            _PREPARED.move_to_end(key)
            return hit[1]
    # The solver's options (checked the same way for the adaptive method, whose stages are
    # those of singlestep): under classifier guidance the solver is fed guided noise.
    if method == "adaptive":  # its options were checked by sample(); the solver ones take their defaults
        kw = dict(kw, lower_order_final=True, variant="bh2", disable_corrector=(), orders=None,
                  steps=max(kw["steps"], kw["order"]) if isinstance(kw["steps"], int) else kw["steps"])
        for name in ("ems", "use_corrector", "p_pseudo", "c_pseudo"):
            kw.pop(name)
    opts = _solvers.make_options(schedule, method="singlestep" if method == "adaptive" else method,
                                 timesteps=timesteps, model_timesteps=model_timesteps, **kw)
    if guidance == "classifier":
        opts = dataclasses.replace(opts, model_type="noise")
    if method == "v3":
        t_start, t_end = _solvers.v3_range(schedule, kw["ems"], t_start, t_end, shape[1:])
    elif timesteps is None:
        t_start, t_end = _solvers.resolve_times(schedule, t_start, t_end)
    _solvers.check_grid(opts, schedule, timesteps, model_timesteps)
    solver = None
    if method != "adaptive":
        host = _solvers._host
        solver = _solvers.build(opts, schedule, host(t_start), host(t_end), host(timesteps), host(model_timesteps),
                                ems=kw.get("ems") if method == "v3" else None)
    out = (opts, t_start, t_end, solver, {})  # {}: the compiled programs of this configuration (_sample_jit)
    if key is not None and not _solvers._is_traced(solver):  # built inside the user's jit: not reusable
        _PREPARED[key] = (schedule, out)
        if len(_PREPARED) > _PREPARED_MAX:
            _PREPARED.popitem(last=False)
    return out


def _model_caller(run: _Run, model_fn, classifier_fn, params, condition, uncond, scale):
    """``call(x_in, t_in, y, alpha, sigma)``: the network output fed to the solver, with
    classifier-free guidance (one batched call on ``[uncond, cond]``; the conditional call
    alone at scale 1) or classifier guidance (the guided noise prediction)."""
    dtype = _solvers.compute_dtype()

    def net(x, t, cond):
        out = model_fn(params, x, t) if cond is None else model_fn(params, x, t, cond)
        if not hasattr(out, "shape") or not hasattr(out, "dtype"):
            raise TypeError(f"model_fn must return an array of its input's shape {x.shape}; got "
                            f"{type(out).__name__}")
        if tuple(out.shape) != tuple(x.shape):
            raise ValueError(f"model_fn output shape {tuple(out.shape)} != its input's shape {tuple(x.shape)}")
        return jnp.asarray(out).astype(dtype)

    def raw(x, t):
        if run.guidance == "classifier":
            return net(x, t, None)  # the noise model is unconditional; the classifier takes the condition
        if run.guidance != "cfg":
            return net(x, t, condition)

        def guided(_):
            both = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], 0), uncond, condition)
            out = net(jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0), both)
            out_u, out_c = jnp.split(out, 2, axis=0)
            return out_u + scale * (out_c - out_u)

        return jax.lax.cond(scale == 1.0, lambda _: net(x, t, condition), guided, None)

    def call(x_in, t_in, y, alpha, sigma, in_scale):
        out = raw(x_in, t_in)
        if run.guidance == "classifier":
            eps = _models.to_noise(out, y, alpha, sigma, run.model_type)
            grad = _models.classifier_gradient(classifier_fn, x_in, t_in, condition).astype(dtype)
            # grad_x_solver log p = grad_x_user log p / state_scale
            out = eps - scale * sigma * grad / in_scale
        return out

    return call


def _user_correcting(correcting_xt_fn):
    """``correcting_xt_fn`` in solver scale: it sees and returns user-scale states
    (``sc``: the state scale at ``t``, from the solver's tables)."""

    def correct(x, t, step, sc):
        out = correcting_xt_fn(x / sc, t, step)
        if not hasattr(out, "shape") or tuple(out.shape) != tuple(x.shape):
            raise ValueError(f"correcting_xt_fn must return an array of the state's shape {tuple(x.shape)}; got "
                             + (f"shape {tuple(out.shape)}" if hasattr(out, "shape") else type(out).__name__))
        return jnp.asarray(out).astype(x.dtype) * sc

    return correct


def _initial(run: _Run, prior_std, key, noise, sharding):
    """``(x_T, key of the steps)``: ``x_T`` in user scale."""
    dtype = _solvers.compute_dtype()
    key_steps = None
    if key is not None and run.stochastic:
        key, key_steps = jax.random.split(key)
    if noise is None:
        x_T = jax.random.normal(key, run.shape, dtype) * prior_std
    else:
        x_T = jnp.asarray(noise).astype(dtype)
    if sharding is not None:
        x_T = jax.lax.with_sharding_constraint(x_T, sharding)
    return x_T, key_steps


def _outputs(run: _Run, result, states, info, sharding):
    if sharding is not None:
        result = jax.lax.with_sharding_constraint(result, sharding)
    out = (result,)
    if run.return_intermediate:
        out += (states,)
    if run.return_info:
        out += (info,)
    return out[0] if len(out) == 1 else out


def _sample_body(run: _Run, model_fn, classifier_fn, correcting_xt_fn, sharding, solver, params, key, noise,
                 condition, uncond, scale):
    """The fixed-step program: ``init``, a ``lax.scan`` of the model call and the solver's
    step over the rows of its table, ``result`` (the schedule enters only through the
    solver's tables)."""
    plan, layout = solver.plan, solver.layout
    dtype = plan.ax.dtype
    scale = jnp.asarray(scale, dtype)
    x_T, key_steps = _initial(run, solver.prior_std, key, noise, sharding)
    call = _model_caller(run, model_fn, classifier_fn, params, condition, uncond, scale)
    correct = None if correcting_xt_fn is None else _user_correcting(correcting_xt_fn)
    has_y = plan.ay is not None

    def body(state, inp):
        row, flags = inp
        x_in, t_in = solver._inputs(state, row)
        y = state.x if state.y is None else state.y
        out = call(x_in, t_in, y, row.alpha, row.sigma, row.in_scale)
        state = solver._advance(state, out, row, correct=correct, flags=flags)
        saved = None
        if run.return_intermediate:
            saved = (state.x / row.x_scale, state.y / row.y_scale if has_y else None)
        return state, saved

    flags = (jnp.asarray(layout.x_step, jnp.int32), jnp.asarray(layout.y_step, jnp.int32))
    state, saved = jax.lax.scan(body, solver.init(x_T, key=key_steps), (plan, flags))
    states = None
    if run.return_intermediate:
        picks = sorted([(k, 0, r) for r, k in enumerate(layout.x_step) if k > 0]
                       + [(k, 1, r) for r, k in enumerate(layout.y_step) if k > 0])
        states = jnp.stack([x_T] + [saved[which][r] for _, which, r in picks])
    info = {"nfe": jnp.asarray(solver.num_evals, jnp.int32)}
    return _outputs(run, solver._result(state), states, info, sharding)


_RUNNERS: "collections.OrderedDict" = collections.OrderedDict()
_RUNNERS_MAX = 64


def _runner(run: _Run, model_fn, classifier_fn, correcting_xt_fn, sharding, opts, layout):
    """The compiled fixed-step program of one configuration: a ``jax.jit`` of
    :func:`_sample_body` with the static parts (the model and user functions, the
    options, the layout) closed over, so a call passes only arrays (the solver's tables,
    parameters, noise, conditions, guidance scale) and dispatches without hashing them."""
    key = (run, model_fn, classifier_fn, correcting_xt_fn, sharding, opts, layout)
    fn = _RUNNERS.get(key)
    if fn is None:
        def _sample_jit(plan, start_scale, end_scale, prior_std, params, rng, noise, condition, uncond, scale):
            solver = _solvers.Solver(plan=plan, start_scale=start_scale, end_scale=end_scale, prior_std=prior_std,
                                     options=opts, layout=layout)
            return _sample_body(run, model_fn, classifier_fn, correcting_xt_fn, sharding, solver, params, rng, noise,
                                condition, uncond, scale)

        fn = _RUNNERS[key] = jax.jit(_sample_jit)
        if len(_RUNNERS) > _RUNNERS_MAX:
            _RUNNERS.popitem(last=False)
    else:
        _RUNNERS.move_to_end(key)
    return fn


def _sample_jit(run: _Run, model_fn, classifier_fn, correcting_xt_fn, sharding, solver, params, key, noise, condition,
                uncond, scale):
    """Run the fixed-step program of ``solver`` (compiled once per configuration)."""
    fn = _runner(run, model_fn, classifier_fn, correcting_xt_fn, sharding, solver.options, solver.layout)
    return fn(solver.plan, solver.start_scale, solver.end_scale, solver.prior_std, params, key, noise, condition,
              uncond, scale)


def _not_reverse_differentiable(f):
    """``f`` with a backward pass that raises a clear error: the adaptive solver's
    ``lax.while_loop`` has a data-dependent number of steps, which reverse-mode
    differentiation cannot transpose."""
    g = jax.custom_vjp(f)

    def fwd(*args):
        return f(*args), None

    def bwd(_, cotangent):
        raise ValueError("method='adaptive' cannot be differentiated in reverse mode (jax.grad): its number of "
                         "steps depends on the data; differentiate a fixed-step method (e.g. method='multistep' "
                         "with steps= its NFE) instead")

    g.defvjp(fwd, bwd)
    return g


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _adaptive_jit(run: _Run, denoise_to_zero, model_fn, classifier_fn, sharding, schedule, params, key, noise,
                  condition, uncond, scale, t_start, t_end):
    (order, predict_data, solver_type, thresholding, ratio, max_val, sample_max_value,
     atol, rtol, h_init, theta, t_err, max_nfe) = run.adaptive
    dtype = _solvers.compute_dtype()
    scale = jnp.asarray(scale, dtype)
    t_start, t_end = jnp.asarray(t_start, dtype), jnp.asarray(t_end, dtype)
    x_T, _ = _initial(run, schedule.prior_std(t_start), key, noise, sharding)
    model_type = "noise" if run.guidance == "classifier" else run.model_type

    @_not_reverse_differentiable
    def solve(x_T, schedule, params, condition, uncond, scale, t_start, t_end):
        call = _model_caller(run, model_fn, classifier_fn, params, condition, uncond, scale)

        def predict(x, t, data=predict_data):
            alpha, sigma, sc = schedule.alpha(t), schedule.sigma(t), schedule.state_scale(t)
            x_in = x / sc
            out = call(x_in, jnp.broadcast_to(schedule.model_time(t), (x.shape[0],)).astype(dtype), x, alpha, sigma,
                       sc)
            m = (_models.to_data if data else _models.to_noise)(out, x, alpha, sigma, model_type)
            if data and thresholding:
                m = _models.dynamic_threshold(m, ratio, max_val, sample_max_value)
            return m

        y, info = _adaptive.adaptive_solve(
            predict, schedule, x_T * schedule.state_scale(t_start), t_start, t_end, order=order,
            predict_data=predict_data, solver_type=solver_type, atol=atol, rtol=rtol, h_init=h_init, theta=theta,
            t_err=t_err, max_nfe=max_nfe,
        )
        if denoise_to_zero:
            result = predict(y, info["t_final"], data=True)
            info["nfe"] = info["nfe"] + 1
        else:
            result = y / schedule.state_scale(info["t_final"])
        return result, info

    result, info = solve(x_T, schedule, params, condition, uncond, scale, t_start, t_end)
    # Never an unfinished solution as a sample: NaN unless the solve reached t_end.
    result = jnp.where(info["finished"], result, jnp.nan)
    return _outputs(run, result, None, info, sharding)


def invert(
    model_fn: Callable,
    params: Any,
    x0: jax.Array,
    *,
    schedule: NoiseSchedule,
    t_start: Optional[float] = None,
    t_end: Optional[float] = None,
    model_type: str = "noise",
    algorithm: str = "dpmsolver++",
    method: str = "multistep",
    order: int = 2,
    steps: int = 20,
    skip_type: str = "time_uniform",
    lower_order_final: bool = True,
    solver_type: str = "dpmsolver",
    thresholding: bool = False,
    thresholding_max_val: float = 1.0,
    dynamic_thresholding_ratio: float = 0.995,
    correcting_xt_fn: Optional[Callable] = None,
    return_intermediate: bool = False,
    condition: Any = None,
    unconditional_condition: Any = None,
    guidance_scale=1.0,
    classifier_fn: Optional[Callable] = None,
    variant: str = "bh2",
    disable_corrector=(),
    timesteps: Optional[jax.Array] = None,
    model_timesteps: Optional[jax.Array] = None,
    orders: Optional[tuple] = None,
    return_info: bool = False,
    sample_max_value: Optional[float] = None,
):
    """ODE encoding: run the same solvers backwards, from ``t_start`` (default
    ``schedule.t_eps``) *up* to ``t_end`` (default ``schedule.T``), mapping data to noise.

    The exponential-integrator formulas hold for negative steps in lambda, so the
    updates are exactly those of :func:`sample` on the reversed grid;
    ``sample(..., noise=invert(x))`` returns ``x`` up to the solver's error on both legs.
    Takes the deterministic fixed-step options of :func:`sample` (same meaning);
    ``timesteps`` is then a strictly *increasing* grid of ``steps + 1`` times (a plain
    array: a :class:`dpmjax.FittedGrid`'s network times belong to the sampling direction),
    and ``model_timesteps`` the network's times of the same evaluations, if they differ.

    Example::

        z = dpmjax.invert(model_fn, params, x, schedule=schedule, steps=50)
        x_again = dpmjax.sample(model_fn, params, None, x.shape, schedule=schedule, noise=z, steps=50)
    """
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable; got {type(model_fn).__name__}")
    if method in ("adaptive", "v3") or (isinstance(algorithm, str) and algorithm.startswith("sde-")):
        raise ValueError("invert supports deterministic fixed-step methods only (method in 'multistep', 'singlestep', "
                         "'singlestep_fixed', 'unipc'; algorithm 'dpmsolver++' or 'dpmsolver')")
    if isinstance(timesteps, _ts.FittedGrid):
        raise ValueError("invert takes timesteps as a plain increasing array, not a FittedGrid "
                         "(its model_timesteps belong to the sampling direction)")
    if correcting_xt_fn is not None and not callable(correcting_xt_fn):
        raise TypeError(f"correcting_xt_fn must be callable; got {type(correcting_xt_fn).__name__}")
    x0 = jnp.asarray(x0)
    shape = _check_shape(x0.shape)
    guidance = _check_guidance(shape, condition, unconditional_condition, guidance_scale, classifier_fn)
    opts = _solvers.make_options(
        schedule, model_type=model_type, algorithm=algorithm, method=method, order=order, steps=steps,
        skip_type=skip_type, lower_order_final=lower_order_final, denoise_to_zero=False, solver_type=solver_type,
        thresholding=thresholding, thresholding_max_val=thresholding_max_val,
        dynamic_thresholding_ratio=dynamic_thresholding_ratio, variant=variant, disable_corrector=disable_corrector,
        orders=orders, timesteps=timesteps, model_timesteps=model_timesteps, sample_max_value=sample_max_value,
    )
    if guidance == "classifier":
        opts = dataclasses.replace(opts, model_type="noise")
    _solvers.split_grid(timesteps, model_timesteps, t_start, t_end)
    if timesteps is not None:
        _solvers.check_grid(opts, schedule, timesteps, model_timesteps, direction="increasing")
        lo = hi = None
    else:
        # invert integrates upwards: t_start < t_end. Checked with the sampling rules
        # (first argument the larger time) but reported under invert's own names.
        hi, lo = _solvers.resolve_times(schedule, schedule.T if t_end is None else t_end,
                                        schedule.t_eps if t_start is None else t_start, names=("t_end", "t_start"))
        _solvers.check_grid(opts, schedule, None, model_timesteps)
    host = _solvers._host
    run = _Run(shape=shape, model_type=model_type, guidance=guidance, stochastic=False,
               return_intermediate=_solvers._boolean("return_intermediate", return_intermediate),
               return_info=_solvers._boolean("return_info", return_info))
    dtype = _solvers.compute_dtype()
    scale = host(guidance_scale) if guidance != "none" else np.asarray(1.0, dtype)
    solver = _solvers.build(opts, schedule, host(lo), host(hi), host(timesteps), host(model_timesteps))
    return _sample_jit(run, model_fn, classifier_fn, correcting_xt_fn, None, solver, params, None, x0,
                       condition, unconditional_condition, scale)


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
