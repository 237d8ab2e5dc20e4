"""``dpmjax.sample``: validate -> plan -> one ``lax.scan`` over model evaluations.

The configuration (algorithm, method, order, steps, skip type, ...) is static and
decides the structure of the program; everything that is an array (the starting
noise or key, the parameters, the guidance scale, the conditions, the schedule's
tables, ``t_start``/``t_end``) is traced, so changing it never recompiles. The
per-step coefficients are computed before the loop (:mod:`dpmjax.updates`), the loop
body is the same for every step, and the model is traced exactly once.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import adaptive as _adaptive

from . import models as _models
from . import timesteps as _ts
from . import updates as _up
from . import schedules as _schedules
from .schedules import NoiseSchedule

__all__ = ["sample", "invert", "add_noise", "ALGORITHMS", "METHODS", "SOLVER_TYPES", "UNIPC_VARIANTS"]

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
METHODS = ("multistep", "singlestep", "singlestep_fixed", "unipc", "adaptive")
SOLVER_TYPES = ("dpmsolver", "taylor")
UNIPC_VARIANTS = ("bh1", "bh2")


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one sampling program (hashable: a jit cache key)."""

    shape: tuple
    model_type: str
    algorithm: str
    method: str
    order: int
    steps: int
    skip_type: str
    lower_order_final: bool
    denoise_to_zero: bool
    solver_type: str
    thresholding: bool
    thresholding_max_val: float
    dynamic_thresholding_ratio: float
    return_intermediate: bool
    guidance: str  # "none" | "cfg" | "classifier"
    has_condition: bool
    variant: str
    use_corrector: tuple
    return_info: bool
    custom_grid: bool
    adaptive: tuple  # (atol, rtol, h_init, theta, t_err, max_nfe) for method="adaptive"
    sharded: bool

    @property
    def predict_data(self) -> bool:
        return self.algorithm in ("dpmsolver++", "sde-dpmsolver++")

    @property
    def stochastic(self) -> bool:
        return self.algorithm.startswith("sde-")


def _choice(name, value, allowed):
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def _integer(name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {rng}; got {value}")
    return value


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float; got {type(value).__name__} {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    return value


def _resolve_times(schedule, t_start, t_end):
    t_start = schedule.T if t_start is None else _real("t_start", t_start)
    t_end = schedule.t_eps if t_end is None else _real("t_end", t_end)
    if not 0.0 < t_start <= schedule.T:
        raise ValueError(f"t_start must be in (0, schedule.T = {schedule.T}]; got {t_start}")
    if not 0.0 < t_end < t_start:
        raise ValueError(f"t_end must be in (0, t_start = {t_start}); got {t_end} (never 0: lambda is infinite there)")
    return t_start, t_end


def _check_times(name, values, schedule, length, order=None):
    """Validate user times ``name`` (``timesteps``: ``order`` "decreasing" or "increasing";
    ``model_timesteps``: no order). ``length = (n, "steps + 1")``: the size and how it
    reads. Concrete values only; traced ones are checked for shape."""
    n, n_text = length
    shape = tuple(jnp.shape(values))
    if shape != (n,):
        raise ValueError(f"{name} must have shape ({n_text},) = ({n},); got {shape}")
    if isinstance(values, jax.core.Tracer):
        return
    ts = np.asarray(values, dtype=np.float64)
    d = np.diff(ts)
    if not np.all(np.isfinite(ts)) or (order == "increasing" and np.any(d <= 0)) or (
            order == "decreasing" and np.any(d >= 0)):
        raise ValueError(f"{name} must be finite" + (f" and strictly {order}" if order else "") + f"; got {ts}")
    if not (ts.min() > 0 and ts.max() <= schedule.T):
        raise ValueError(f"{name} must lie in (0, schedule.T = {schedule.T}]; got min {ts.min()}, max {ts.max()}")



_DEFAULT_MAX_NFE = 10_000


def _configure(
    model_fn, schedule, shape, *, model_type, algorithm, method, order, steps, skip_type,
    lower_order_final, denoise_to_zero, solver_type, thresholding, thresholding_max_val,
    dynamic_thresholding_ratio, correcting_xt_fn, return_intermediate, condition,
    unconditional_condition, guidance_scale, classifier_fn, variant, disable_corrector,
    return_info, timesteps, atol, rtol, h_init, theta, t_err, max_nfe, sharding,
) -> _Config:
    """All argument checks (before anything is traced) and the static configuration."""
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable; got {type(model_fn).__name__}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(
            "schedule must be a dpmjax.NoiseSchedule (VPLinear, VPCosine, VPDiscrete, EDM, RectifiedFlow); "
            f"got {type(schedule).__name__}"
        )
    try:
        shape = tuple(int(d) for d in shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple of ints; got {shape!r}") from None
    if len(shape) < 1 or any(d < 1 for d in shape):
        raise ValueError(f"shape must be (B, ...) with positive sizes; got {shape}")
    _choice("model_type", model_type, _models.MODEL_TYPES)
    _choice("algorithm", algorithm, ALGORITHMS)
    _choice("method", method, METHODS)
    _choice("skip_type", skip_type, _ts.SKIP_TYPES)
    _choice("solver_type", solver_type, SOLVER_TYPES)
    _choice("variant", variant, UNIPC_VARIANTS)
    if model_type == "flow" and not isinstance(schedule, _schedules.RectifiedFlow):
        raise ValueError("model_type='flow' (v = eps - x0) needs schedule=dpmjax.RectifiedFlow()")
    if model_type == "edm" and not isinstance(schedule, _schedules.EDM):
        raise ValueError("model_type='edm' (a denoiser D(x; sigma)) needs schedule=dpmjax.EDM()")
    order = _integer("order", order, 1, 3)
    steps = _integer("steps", steps, 1)
    if method in ("multistep", "singlestep_fixed", "unipc") and steps < order:
        raise ValueError(f"steps must be >= order for method={method!r}; got steps={steps}, order={order}")
    if algorithm.startswith("sde-") and (method != "multistep" or order > 2):
        raise ValueError(
            f"algorithm={algorithm!r} supports method='multistep' with order 1 or 2; got method={method!r}, order={order}"
        )
    if method == "adaptive":
        if order not in (2, 3):
            raise ValueError(f"method='adaptive' needs order 2 or 3; got order={order}")
        if timesteps is not None:
            raise ValueError("timesteps cannot be combined with method='adaptive' (it chooses its own steps)")
        adaptive = (
            _real("atol", atol), _real("rtol", rtol), _real("h_init", h_init),
            _real("theta", theta), _real("t_err", t_err),
            _integer("max_nfe", _DEFAULT_MAX_NFE if max_nfe is None else max_nfe, order),
        )
        for name, v in zip(("atol", "rtol", "h_init", "theta", "t_err"), adaptive[:5]):
            if v <= 0:
                raise ValueError(f"{name} must be > 0; got {v}")
        if return_intermediate:
            raise ValueError("return_intermediate is not available for method='adaptive' (its step count is dynamic)")
    else:
        adaptive = ()
    if timesteps is not None and method not in ("multistep", "unipc"):
        raise ValueError(f"timesteps is supported for method='multistep' and 'unipc'; got method={method!r}")
    if thresholding and not algorithm.endswith("++"):
        raise ValueError("thresholding=True needs a data-prediction algorithm ('dpmsolver++' or 'sde-dpmsolver++')")
    ratio = _real("dynamic_thresholding_ratio", dynamic_thresholding_ratio)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"dynamic_thresholding_ratio must be a fraction in (0, 1]; got {ratio}")
    max_val = _real("thresholding_max_val", thresholding_max_val)
    if max_val <= 0:
        raise ValueError(f"thresholding_max_val must be > 0; got {max_val}")
    if unconditional_condition is not None and condition is None:
        raise ValueError("unconditional_condition needs condition (classifier-free guidance)")
    if unconditional_condition is not None and classifier_fn is not None:
        raise ValueError("use either classifier-free guidance (unconditional_condition) or classifier_fn, not both")
    if classifier_fn is not None and not callable(classifier_fn):
        raise TypeError("classifier_fn must be callable")
    if correcting_xt_fn is not None and not callable(correcting_xt_fn):
        raise TypeError("correcting_xt_fn must be callable")
    guidance = "cfg" if unconditional_condition is not None else ("classifier" if classifier_fn is not None else "none")
    if guidance == "none" and not isinstance(guidance_scale, jax.core.Tracer):
        if np.any(np.asarray(guidance_scale) != 1.0):
            raise ValueError(
                "guidance_scale != 1 needs unconditional_condition (classifier-free) or classifier_fn (classifier guidance)"
            )
    # use_corrector[n]: correct the state at ts[n], i.e. step n (1-based), in scan iteration n
    # (updates.unipc_plan); n = 0 is unused and the last step (n = steps) is never corrected.
    use_corrector = np.ones(steps, bool)
    for i in disable_corrector:
        i = _integer("disable_corrector entries", i, 1, steps)
        if i < steps:
            use_corrector[i] = False
    if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
        raise TypeError(f"sharding must be a jax.sharding.Sharding; got {type(sharding).__name__}")
    return _Config(
        shape=shape, model_type=model_type, algorithm=algorithm, method=method, order=order,
        steps=steps, skip_type=skip_type, lower_order_final=bool(lower_order_final),
        denoise_to_zero=bool(denoise_to_zero), solver_type=solver_type,
        thresholding=bool(thresholding), thresholding_max_val=max_val,
        dynamic_thresholding_ratio=ratio, return_intermediate=bool(return_intermediate),
        guidance=guidance, has_condition=condition is not None, variant=variant,
        use_corrector=tuple(bool(u) for u in use_corrector), return_info=bool(return_info),
        custom_grid=timesteps is not None, adaptive=adaptive, sharded=sharding is not None,
    )


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
        ``"sde-dpmsolver++"``/``"sde-dpmsolver"`` (multistep, order 1 or 2).
      method: ``"multistep"``, ``"singlestep"`` (DPM-Solver-fast: mixed orders summing to
        ``steps``), ``"singlestep_fixed"``, ``"unipc"`` (predictor-corrector) or
        ``"adaptive"`` (DPM-Solver-12/23 with ``atol``, ``rtol``, ``h_init``, ``theta``,
        ``t_err``; ``steps`` is ignored, ``max_nfe`` bounds the loop, default 10000).
      order: 1, 2 or 3 (1 is DDIM).
      steps: the number of model evaluations (NFE), plus one with ``denoise_to_zero``.
      skip_type: time grid: ``"time_uniform"``, ``"logSNR"``, ``"time_quadratic"``,
        ``"karras"`` or ``"edm"`` (see :func:`dpmjax.time_grid`).
      t_start, t_end: integration interval, ``0 < t_end < t_start <= schedule.T``; defaults
        ``schedule.T`` and ``schedule.t_eps`` (``1/N`` discrete, ``1e-3`` continuous).
      lower_order_final: lower the order of the last steps (multistep: only for
        ``steps < 10``; UniPC: always), which stabilises very few steps.
      denoise_to_zero: return the data prediction at ``t_end`` (one more NFE).
      solver_type: ``"dpmsolver"`` or ``"taylor"`` second-order corrections.
      thresholding: dynamic thresholding of the data prediction (``"++"`` only),
        with ``thresholding_max_val`` and ``dynamic_thresholding_ratio`` (a fraction).
      correcting_xt_fn: optional ``f(x, t, step) -> x`` applied to the state after each step
        (in user scale, like ``noise`` and the result: VE scale for ``EDM``).
      noise: the starting ``x_T`` of shape ``shape`` (overrides ``key`` for ``x_T``).
      return_intermediate: also return the states on the time grid, ``(n_states, *shape)``.
      condition, unconditional_condition, guidance_scale: classifier-free guidance,
        ``out_u + s (out_c - out_u)`` from one model call on the concatenated batch
        ``[unconditional, conditional]``; at ``s == 1`` only the conditional call runs.
        ``guidance_scale`` is traced: changing it never recompiles.
      classifier_fn: classifier guidance, ``classifier_fn(x, t, condition)`` returning
        per-sample log-probabilities; ``eps <- eps - guidance_scale sigma_t grad_x log p``.
      variant: UniPC's ``"bh1"`` or ``"bh2"``.
      disable_corrector: UniPC steps (1-based) whose corrector is skipped.
      timesteps: a strictly decreasing grid of ``steps + 1`` times in ``(0, T]`` replacing
        the built-in one (multistep and UniPC), or a :class:`dpmjax.FittedGrid` (what
        :func:`dpmjax.fit_timesteps` returns); traced, so new values never recompile.
      model_timesteps: optional ``steps`` times in ``(0, T]`` (solver time) given to the
        network at each evaluation instead of the step's own time (multistep and UniPC;
        Xia et al. 2024, arXiv:2310.09469). The update formulas keep the grid's times, and
        the ``denoise_to_zero`` evaluation keeps ``t_end``. Traced, like ``timesteps``.
      return_info: also return a dict with ``"nfe"`` (and, for ``method="adaptive"``,
        ``"accepted"``, ``"rejected"``, ``"hit_max_nfe"``, ``"t_final"``).
      sharding: a :class:`jax.sharding.Sharding` for ``x_T`` and the result (e.g. a
        ``NamedSharding`` over the batch axis); by default a sharded ``noise``'s own.

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
    config = _configure(
        model_fn, schedule, shape, model_type=model_type, algorithm=algorithm, method=method,
        order=order, steps=steps, skip_type=skip_type, lower_order_final=lower_order_final,
        denoise_to_zero=denoise_to_zero, solver_type=solver_type, thresholding=thresholding,
        thresholding_max_val=thresholding_max_val, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
        correcting_xt_fn=correcting_xt_fn, return_intermediate=return_intermediate, condition=condition,
        unconditional_condition=unconditional_condition, guidance_scale=guidance_scale,
        classifier_fn=classifier_fn, variant=variant, disable_corrector=disable_corrector,
        return_info=return_info, timesteps=timesteps, atol=atol, rtol=rtol, h_init=h_init,
        theta=theta, t_err=t_err, max_nfe=max_nfe, sharding=sharding,
    )
    t_start, t_end = _resolve_times(schedule, t_start, t_end)
    if isinstance(timesteps, _ts.FittedGrid):
        if timesteps.model_timesteps is not None and model_timesteps is not None:
            raise ValueError("model_timesteps is given twice: in the FittedGrid passed as timesteps and as an argument")
        timesteps, model_timesteps = timesteps.timesteps, (
            timesteps.model_timesteps if model_timesteps is None else model_timesteps)
    if timesteps is not None:
        _check_times("timesteps", timesteps, schedule, (config.steps + 1, "steps + 1"), "decreasing")
    if model_timesteps is not None:
        if config.method not in ("multistep", "unipc"):
            raise ValueError(f"model_timesteps is supported for method='multistep' and 'unipc'; got method={method!r}")
        _check_times("model_timesteps", model_timesteps, schedule, (config.steps, "steps"))
    if noise is None:
        if key is None:
            raise ValueError("key must be a PRNG key when noise is None")
    elif tuple(jnp.shape(noise)) != config.shape:
        raise ValueError(f"noise must have shape {config.shape} (the shape argument); got {tuple(jnp.shape(noise))}")
    if config.stochastic and key is None:
        raise ValueError(f"key must be a PRNG key for algorithm={algorithm!r} (it draws noise at every step)")
    if sharding is None and noise is not None and isinstance(getattr(noise, "sharding", None), jax.sharding.NamedSharding):
        sharding = noise.sharding
        config = dataclasses.replace(config, sharded=True)
    dtype = jnp.result_type(float)
    return _sample_jit(
        config, model_fn, classifier_fn, correcting_xt_fn, sharding, schedule, params, key, noise,
        condition, unconditional_condition, _host_scalar(guidance_scale, dtype),
        np.asarray(t_start, dtype), np.asarray(t_end, dtype),
        None if timesteps is None else _host_scalar(timesteps, dtype),
        None if model_timesteps is None else _host_scalar(model_timesteps, dtype),
    )


def _host_scalar(v, dtype):
    """Python/NumPy values stay on the host (an eager ``jnp.asarray`` is a dispatched op,
    ~100 us each on CPU); JAX arrays and tracers pass through (cast inside the jit)."""
    return v if isinstance(v, (jax.Array, jax.core.Tracer)) else np.asarray(v, dtype)


def invert(
    model_fn: Callable,
    params: Any,
    x0: jax.Array,
    *,
    schedule: NoiseSchedule,
    t_start: Optional[float] = None,
    t_end: Optional[float] = None,
    algorithm: str = "dpmsolver++",
    method: str = "multistep",
    order: int = 2,
    steps: int = 20,
    skip_type: str = "time_uniform",
    **kwargs,
):
    """ODE encoding: run the same solvers backwards, from ``t_start`` (default
    ``schedule.t_eps``) *up* to ``t_end`` (default ``schedule.T``), mapping data to noise.

    The exponential-integrator formulas hold for negative steps in lambda, so the
    updates are exactly those of :func:`sample` on the reversed grid;
    ``sample(..., noise=invert(x))`` returns ``x`` up to the solver's error on both legs.
    Takes the deterministic options of :func:`sample` (model_type, solver_type, guidance,
    ``lower_order_final``, ``return_intermediate``, ``return_info``, ``timesteps``
    (increasing) ...); not ``method="adaptive"``, SDE algorithms or ``denoise_to_zero``.

    Example::

        z = dpmjax.invert(model_fn, params, x, schedule=schedule, steps=50)
        x_again = dpmjax.sample(model_fn, params, None, x.shape, schedule=schedule, noise=z, steps=50)
    """
    if method == "adaptive" or str(algorithm).startswith("sde-") or kwargs.get("denoise_to_zero"):
        raise ValueError("invert supports deterministic fixed-step methods only (no method='adaptive', "
                         "no 'sde-' algorithm, no denoise_to_zero)")
    for k in ("noise", "key", "shape", "sharding"):
        if k in kwargs:
            raise TypeError(f"invert() got an unexpected keyword argument {k!r}")
    sig = _sample_defaults(
        "model_type", "lower_order_final", "denoise_to_zero", "solver_type", "thresholding",
        "thresholding_max_val", "dynamic_thresholding_ratio", "correcting_xt_fn", "return_intermediate",
        "condition", "unconditional_condition", "guidance_scale", "classifier_fn", "variant",
        "disable_corrector", "return_info", "timesteps", "atol", "rtol", "h_init", "theta", "t_err", "max_nfe",
    )
    unknown = set(kwargs) - set(sig)
    if unknown:
        raise TypeError(f"invert() got unexpected keyword arguments {sorted(unknown)}")
    sig.update(kwargs)
    x0 = jnp.asarray(x0)
    config = _configure(
        model_fn, schedule, x0.shape, algorithm=algorithm, method=method, order=order, steps=steps,
        skip_type=skip_type, sharding=None, **sig,
    )
    lo = schedule.t_eps if t_start is None else _real("t_start", t_start)
    hi = schedule.T if t_end is None else _real("t_end", t_end)
    _resolve_times(schedule, hi, lo)  # same rules with the roles swapped: 0 < lo < hi <= T
    timesteps = sig["timesteps"]
    if isinstance(timesteps, _ts.FittedGrid):
        raise ValueError("invert takes timesteps as a plain increasing array, not a FittedGrid "
                         "(its model_timesteps belong to the sampling direction)")
    if timesteps is not None:
        _check_times("timesteps", timesteps, schedule, (config.steps + 1, "steps + 1"), "increasing")
    dtype = jnp.result_type(float)
    return _sample_jit(
        config, model_fn, sig["classifier_fn"], sig["correcting_xt_fn"], None, schedule, params, None, x0,
        sig["condition"], sig["unconditional_condition"], _host_scalar(sig["guidance_scale"], dtype),
        np.asarray(lo, dtype), np.asarray(hi, dtype),
        None if timesteps is None else _host_scalar(timesteps, dtype), None,
    )


def _sample_defaults(*names):
    """``sample``'s keyword defaults for ``names`` (one source of truth for ``invert`` and
    ``fit_timesteps``, which configure the same solvers)."""
    params = inspect.signature(sample).parameters
    return {n: params[n].default for n in names}


def add_noise(schedule: NoiseSchedule, x0, t, key):
    """Draw ``x_t ~ q(x_t | x0)``: ``alpha_t x0 + sigma_t eps`` (user scale: ``x0 + sigma eps``
    for :class:`dpmjax.EDM`). ``t`` is a scalar or a per-sample ``(B,)`` array of times.

    Returns ``(x_t, eps)``.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a dpmjax.NoiseSchedule; got {type(schedule).__name__}")
    dtype = jnp.result_type(float)
    x0 = jnp.asarray(x0, dtype)
    t = jnp.asarray(t, dtype)
    eps = jax.random.normal(key, x0.shape, dtype)
    scale = jnp.asarray(schedule.state_scale(t), dtype)
    scale = scale.reshape(scale.shape + (1,) * (x0.ndim - scale.ndim))
    return schedule.marginal(x0, t, eps) / scale, eps


def _make_predict(config: _Config, model_fn, classifier_fn, schedule, params, condition, uncond, scale):
    """``predict(x, t)``: the noise ("dpmsolver") or data ("dpmsolver++") prediction at solver scale."""
    dtype = jnp.result_type(float)

    def call(x, t_model, cond):
        out = model_fn(params, x, t_model) if cond is None else model_fn(params, x, t_model, cond)
        out = jnp.asarray(out)
        if out.shape != x.shape:
            raise ValueError(f"model_fn output shape {out.shape} != x shape {x.shape}")
        return out.astype(dtype)

    def raw(x, t_model):
        if config.guidance != "cfg":
            return call(x, t_model, condition)

        def conditional_only(_):
            return call(x, t_model, condition)

        def guided(_):
            both = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], 0), uncond, condition)
            out = call(jnp.concatenate([x, x], 0), jnp.concatenate([t_model, t_model], 0), both)
            out_u, out_c = jnp.split(out, 2, axis=0)
            return out_u + scale * (out_c - out_u)

        return jax.lax.cond(scale == 1.0, conditional_only, guided, None)

    def predict(x, t, *, data=None, pre=None):
        """``pre = (model_time, alpha, sigma)`` at ``t`` when precomputed from the grid."""
        data = config.predict_data if data is None else data
        b = x.shape[0]
        t_m, alpha, sigma = pre if pre is not None else _per_step(schedule, t)
        t_model = jnp.broadcast_to(t_m, (b,)).astype(dtype)
        x_in = x / schedule.state_scale(t)  # the network sees user-scale inputs (EDM: VE scale)
        out = raw(x_in, t_model)
        if config.guidance == "classifier":
            eps = _models.to_noise(out, x, alpha, sigma, config.model_type)
            grad = _models.classifier_gradient(classifier_fn, x_in, t_model, condition).astype(dtype)
            # grad_x_solver log p = grad_x_user log p / state_scale
            eps = eps - scale * sigma * grad / schedule.state_scale(t)
            m = (x - sigma * eps) / alpha if data else eps
        elif data:
            m = _models.to_data(out, x, alpha, sigma, config.model_type)
        else:
            m = _models.to_noise(out, x, alpha, sigma, config.model_type)
        if data and config.thresholding:
            m = _models.dynamic_threshold(m, config.dynamic_thresholding_ratio, config.thresholding_max_val)
        return m

    return predict


def _per_step(schedule, t):
    """``(model_time, alpha, sigma)`` at time(s) ``t``: what a model call needs from the
    schedule. The scan driver computes it for the whole grid before the loop."""
    return schedule.model_time(t), schedule.alpha(t), schedule.sigma(t)


def _plan(config: _Config, schedule, t_start, t_end, timesteps):
    """The coefficient table of the configured method."""
    kw = dict(predict_data=config.predict_data)
    if config.method in ("multistep", "unipc"):
        if timesteps is None:
            ts = _ts.time_grid(schedule, config.skip_type, t_start, t_end, config.steps)
        else:
            ts = timesteps
        if config.method == "multistep":
            orders = _ts.multistep_orders(config.order, config.steps, config.lower_order_final)
            return _up.multistep_plan(
                schedule, ts, orders, solver_type=config.solver_type, stochastic=config.stochastic, **kw
            )
        orders = _ts.unipc_orders(config.order, config.steps, config.lower_order_final)
        return _up.unipc_plan(
            schedule, ts, orders, variant=config.variant, use_corrector=np.asarray(config.use_corrector), **kw
        )
    if config.method == "singlestep":
        orders = _ts.singlestep_orders(config.order, config.steps)
        if config.skip_type == "logSNR":
            t_outer = _ts.time_grid(schedule, "logSNR", t_start, t_end, len(orders))
        else:
            fine = _ts.time_grid(schedule, config.skip_type, t_start, t_end, config.steps)
            t_outer = fine[np.cumsum([0, *orders])]
    else:  # singlestep_fixed
        n_outer = config.steps // config.order
        orders = (config.order,) * n_outer
        t_outer = _ts.time_grid(schedule, config.skip_type, t_start, t_end, n_outer)
    return _up.singlestep_plan(
        schedule, t_outer, orders, skip_type=config.skip_type, solver_type=config.solver_type, **kw
    )


def _combine(coefs, hist):
    """``sum_k coefs[k] hist[k]`` (K is static and small: unrolled, fused by XLA)."""
    out = coefs[0] * hist[0]
    for k in range(1, hist.shape[0]):
        out = out + coefs[k] * hist[k]
    return out


def _scan(config, predict, schedule, plan, x_T, key, correcting_xt_fn, t_end, model_ts=None):
    """The fixed-step driver: one ``lax.scan`` over model evaluations (see dpmjax.updates).

    ``model_ts`` (optional, one per evaluation) replaces the network's time input only.

    Multistep carries ``(x, hist)`` (its evaluation point is ``x``: a separate ``y`` would
    cost a copy of the state per step); singlestep and UniPC carry ``(x, y, hist)``.
    """
    K = plan.cx.shape[1]
    multistep = config.method == "multistep"
    unipc = config.method == "unipc"
    dtype = x_T.dtype

    def body(carry, inp):
        if multistep:
            x, hist = carry
            y = x
        else:
            x, y, hist = carry
        m = predict(y, inp["t_eval"], pre=inp["pre"])
        hist = jax.lax.dynamic_update_index_in_dim(hist, m, inp["slot"], 0)
        x_new = inp["ax"] * x + _combine([inp["cx"][k] for k in range(K)], hist)
        if unipc:
            x_new = x_new + inp["bx"] * y
        if config.stochastic:
            z = jax.random.normal(jax.random.fold_in(key, inp["i"]), x.shape, dtype)
            x_new = x_new + inp["nz"] * z
        if correcting_xt_fn is not None:
            corrected = correcting_xt_fn(x_new, inp["t_state"], inp["step"] + 1)
            x_new = jnp.where(inp["step_end"], corrected, x_new)
        out = x_new if config.return_intermediate else None
        if multistep:
            return (x_new, hist), out
        y_new = inp["ay"] * x_new + _combine([inp["cy"][k] for k in range(K)], hist)
        return (x_new, y_new, hist), out

    n = plan.t_eval.shape[0]
    pre = _per_step(schedule, plan.t_eval)
    if model_ts is not None:
        pre = (schedule.model_time(model_ts),) + pre[1:]
    inputs = {
        "t_eval": plan.t_eval,
        "pre": pre,
        "slot": plan.slot,
        "ax": plan.ax,
        "cx": plan.cx,
    }
    if unipc:
        inputs["bx"] = plan.bx
    if not multistep:
        inputs["ay"], inputs["cy"] = plan.ay, plan.cy
    if config.stochastic:
        inputs["nz"], inputs["i"] = plan.nz, jnp.arange(n, dtype=jnp.int32)
    if correcting_xt_fn is not None:
        inputs["t_state"] = plan.t_state
        if unipc:  # iteration n's corrected state is the state at ts[n]; none at n = 0
            inputs["step_end"] = jnp.asarray(np.arange(n) > 0)
            inputs["step"] = jnp.asarray(plan.step_index - 1, jnp.int32)
        else:
            inputs["step_end"] = jnp.asarray(plan.step_end)
            inputs["step"] = jnp.asarray(plan.step_index, jnp.int32)
    hist0 = jnp.zeros((K,) + x_T.shape, dtype)
    if multistep:
        (y, _), xs = jax.lax.scan(body, (x_T, hist0), inputs)
    else:
        (_, y, _), xs = jax.lax.scan(body, (x_T, x_T, hist0), inputs)
    if unipc and correcting_xt_fn is not None:
        y = correcting_xt_fn(y, t_end, config.steps)
    if not config.return_intermediate:
        return y, None
    if multistep:
        states = jnp.concatenate([x_T[None], xs], 0)
    elif unipc:
        states = jnp.concatenate([xs, y[None]], 0)
    else:
        states = jnp.concatenate([x_T[None], xs[np.flatnonzero(plan.step_end)]], 0)
    return y, states


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _sample_jit(config, model_fn, classifier_fn, correcting_xt_fn, sharding, schedule, params, key, noise,
                condition, uncond, scale, t_start, t_end, timesteps, model_timesteps):
    dtype = jnp.result_type(float)
    scale = jnp.asarray(scale, dtype)
    t_start, t_end = jnp.asarray(t_start, dtype), jnp.asarray(t_end, dtype)
    if timesteps is not None:
        timesteps = jnp.asarray(timesteps, dtype)
    if model_timesteps is not None:
        model_timesteps = jnp.asarray(model_timesteps, dtype)
    if key is not None and config.stochastic:
        key, key_steps = jax.random.split(key)
    else:
        key_steps = None
    if timesteps is not None:
        t_start, t_end = timesteps[0], timesteps[-1]
    if noise is None:
        x_T = jax.random.normal(key, config.shape, dtype) * schedule.prior_std(t_start)
    else:
        x_T = jnp.asarray(noise).astype(dtype)
    if sharding is not None:
        x_T = jax.lax.with_sharding_constraint(x_T, sharding)
    user_scale_end = schedule.state_scale(t_end)
    x_T = x_T * schedule.state_scale(t_start)  # user scale -> solver (VP) scale
    predict = _make_predict(config, model_fn, classifier_fn, schedule, params, condition, uncond, scale)
    if correcting_xt_fn is not None:
        user_correcting_xt_fn = correcting_xt_fn

        def correcting_xt_fn(x, t, step):  # the hook sees user scale (EDM: VE), like noise= and the result
            sc = schedule.state_scale(t)
            return user_correcting_xt_fn(x / sc, t, step) * sc
    info = {}
    states = None
    if config.method == "adaptive":
        atol, rtol, h_init, theta, t_err, max_nfe = config.adaptive
        y, info = _adaptive.adaptive_solve(
            predict, schedule, x_T, t_start, t_end, order=config.order, predict_data=config.predict_data,
            solver_type=config.solver_type, atol=atol, rtol=rtol, h_init=h_init, theta=theta,
            t_err=t_err, max_nfe=max_nfe,
        )
        user_scale_end = schedule.state_scale(info["t_final"])
    else:
        plan = _plan(config, schedule, t_start, t_end, timesteps)
        y, states = _scan(config, predict, schedule, plan, x_T, key_steps, correcting_xt_fn, t_end, model_timesteps)
        info["nfe"] = jnp.asarray(plan.t_eval.shape[0], jnp.int32)
        if states is not None:
            if config.method == "unipc":
                scales = jnp.concatenate([plan.t_state, t_end[None]])
            else:
                scales = jnp.concatenate([t_start[None], plan.t_state[np.flatnonzero(plan.step_end)]])
            scales = jnp.asarray(schedule.state_scale(scales), dtype)
            states = states / jnp.reshape(scales, jnp.shape(scales) + (1,) * len(config.shape))
    if config.denoise_to_zero:
        result = predict(y, t_end if config.method != "adaptive" else info["t_final"], data=True)
        info["nfe"] = info["nfe"] + 1
    else:
        result = y / user_scale_end  # solver scale -> user scale
    if sharding is not None:
        result = jax.lax.with_sharding_constraint(result, sharding)
    out = (result,)
    if config.return_intermediate:
        out += (states,)
    if config.return_info:
        out += (info,)
    return out[0] if len(out) == 1 else out
