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
import numbers
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import models as _models
from . import timesteps as _ts
from . import updates as _up
from .schedules import NoiseSchedule

__all__ = ["sample", "ALGORITHMS", "METHODS", "SOLVER_TYPES", "UNIPC_VARIANTS"]

ALGORITHMS = ("dpmsolver++", "dpmsolver")
METHODS = ("multistep", "singlestep", "singlestep_fixed", "unipc")
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

    @property
    def predict_data(self) -> bool:
        return self.algorithm == "dpmsolver++"


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
):
    """Sample a diffusion model by solving its probability-flow ODE from ``t_start`` to ``t_end``.

    DPM-Solver (Lu et al. 2022, arXiv:2206.00927), DPM-Solver++ (arXiv:2211.01095) and
    UniPC (Zhao et al. 2023, arXiv:2302.04867), with the names and defaults of the
    authors' reference implementation.

    Args:
      model_fn: ``model_fn(params, x, t)`` (or ``model_fn(params, x, t, condition)`` when a
        condition is given) returning an array of ``x``'s shape; ``t`` has shape ``(B,)``
        and holds ``schedule.model_time(t)`` (continuous time, or the training-step index
        ``t N - 1`` of a discrete schedule). Any output dtype; it is upcast.
      params: the model's parameters (any pytree; traced, differentiable).
      key: a PRNG key for ``x_T ~ N(0, I)``; may be ``None`` when ``noise`` is given.
      shape: the sample shape ``(B, ...)``.
      schedule: a :class:`dpmjax.NoiseSchedule` (``VPLinear``, ``VPCosine``, ``VPDiscrete`` ...).
      model_type: ``"noise"``, ``"x_start"``, ``"v"`` or ``"score"``.
      algorithm: ``"dpmsolver++"`` (integrate the data prediction; use it with guidance)
        or ``"dpmsolver"`` (the noise prediction).
      method: ``"multistep"``, ``"singlestep"`` (DPM-Solver-fast: mixed orders summing to
        ``steps``), ``"singlestep_fixed"`` or ``"unipc"`` (predictor-corrector).
      order: 1, 2 or 3 (1 is DDIM).
      steps: the number of model evaluations (NFE), plus one with ``denoise_to_zero``.
      skip_type: time grid, ``"time_uniform"``, ``"logSNR"`` or ``"time_quadratic"``.
      t_start, t_end: integration interval, ``0 < t_end < t_start <= schedule.T``; defaults
        ``schedule.T`` and ``schedule.t_eps`` (``1/N`` discrete, ``1e-3`` continuous).
      lower_order_final: lower the order of the last steps (multistep: only for
        ``steps < 10``; UniPC: always), which stabilises very few steps.
      denoise_to_zero: return the data prediction at ``t_end`` (one more NFE).
      solver_type: ``"dpmsolver"`` or ``"taylor"`` second-order corrections.
      thresholding: dynamic thresholding of the data prediction (``"dpmsolver++"`` only),
        with ``thresholding_max_val`` and ``dynamic_thresholding_ratio`` (a fraction).
      correcting_xt_fn: optional ``f(x, t, step) -> x`` applied to the state after each step.
      noise: the starting ``x_T`` of shape ``shape`` (overrides ``key``).
      return_intermediate: also return the states on the time grid, ``(n_states, *shape)``.
      condition, unconditional_condition, guidance_scale: classifier-free guidance,
        ``out_u + s (out_c - out_u)`` from one model call on the concatenated batch
        ``[unconditional, conditional]``; at ``s == 1`` only the conditional call runs.
        ``guidance_scale`` is traced: changing it never recompiles.
      classifier_fn: classifier guidance, ``classifier_fn(x, t, condition)`` returning
        per-sample log-probabilities; ``eps <- eps - guidance_scale sigma_t grad_x log p``.
      variant: UniPC's ``"bh1"`` or ``"bh2"``.
      disable_corrector: UniPC steps (1-based) whose corrector is skipped.

    Returns:
      ``x`` at ``t_end`` (float32, float64 under ``jax_enable_x64``), or ``(x, states)``
      with ``return_intermediate``.

    Example::

        schedule = dpmjax.VPDiscrete.from_named("linear", 1000)
        x = dpmjax.sample(model_fn, params, jax.random.key(0), (16, 32, 32, 3),
                          schedule=schedule, algorithm="dpmsolver++", method="multistep",
                          order=2, steps=15, skip_type="logSNR")
    """
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable; got {type(model_fn).__name__}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a dpmjax.NoiseSchedule (VPLinear, VPCosine, VPDiscrete, ...); got {type(schedule).__name__}")
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
    order = _integer("order", order, 1, 3)
    steps = _integer("steps", steps, 1)
    if method in ("multistep", "singlestep_fixed", "unipc") and steps < order:
        raise ValueError(f"steps must be >= order for method={method!r}; got steps={steps}, order={order}")
    t_start, t_end = _resolve_times(schedule, t_start, t_end)
    if thresholding and algorithm != "dpmsolver++":
        raise ValueError("thresholding=True needs algorithm='dpmsolver++' (it clips the data prediction)")
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
    if guidance == "none" and not isinstance(guidance_scale, jax.core.Tracer) and np.any(np.asarray(guidance_scale) != 1.0):
        raise ValueError(
            "guidance_scale != 1 needs unconditional_condition (classifier-free) or classifier_fn (classifier guidance)"
        )
    if noise is None:
        if key is None:
            raise ValueError("key must be a PRNG key when noise is None")
    elif tuple(jnp.shape(noise)) != shape:
        raise ValueError(f"noise must have shape {shape} (the shape argument); got {tuple(jnp.shape(noise))}")
    use_corrector = np.ones(steps, bool)
    for i in disable_corrector:
        i = _integer("disable_corrector entries", i, 1, steps)
        use_corrector[i - 1] = False

    config = _Config(
        shape=shape,
        model_type=model_type,
        algorithm=algorithm,
        method=method,
        order=order,
        steps=steps,
        skip_type=skip_type,
        lower_order_final=bool(lower_order_final),
        denoise_to_zero=bool(denoise_to_zero),
        solver_type=solver_type,
        thresholding=bool(thresholding),
        thresholding_max_val=max_val,
        dynamic_thresholding_ratio=ratio,
        return_intermediate=bool(return_intermediate),
        guidance=guidance,
        has_condition=condition is not None,
        variant=variant,
        use_corrector=tuple(bool(u) for u in use_corrector),
    )
    dtype = jnp.result_type(float)
    return _sample_jit(
        config,
        model_fn,
        classifier_fn,
        correcting_xt_fn,
        schedule,
        params,
        key,
        noise,
        condition,
        unconditional_condition,
        jnp.asarray(guidance_scale, dtype),
        jnp.asarray(t_start, dtype),
        jnp.asarray(t_end, dtype),
    )


def _make_predict(config: _Config, model_fn, classifier_fn, schedule, params, condition, uncond, scale):
    """``predict(x, t)``: the noise ("dpmsolver") or data ("dpmsolver++") prediction."""
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

    def predict(x, t, *, data=None):
        data = config.predict_data if data is None else data
        b = x.shape[0]
        t_model = jnp.broadcast_to(schedule.model_time(t), (b,)).astype(dtype)
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        out = raw(x, t_model)
        if config.guidance == "classifier":
            eps = _models.to_noise(out, x, alpha, sigma, config.model_type)
            grad = _models.classifier_gradient(classifier_fn, x, t_model, condition).astype(dtype)
            eps = eps - scale * sigma * grad
            m = (x - sigma * eps) / alpha if data else eps
        elif data:
            m = _models.to_data(out, x, alpha, sigma, config.model_type)
        else:
            m = _models.to_noise(out, x, alpha, sigma, config.model_type)
        if data and config.thresholding:
            m = _models.dynamic_threshold(m, config.dynamic_thresholding_ratio, config.thresholding_max_val)
        return m

    return predict


def _plan(config: _Config, schedule, t_start, t_end):
    """The coefficient table of the configured method, and the outer time grid."""
    kw = dict(predict_data=config.predict_data)
    if config.method == "multistep":
        ts = _ts.time_grid(schedule, config.skip_type, t_start, t_end, config.steps)
        orders = _ts.multistep_orders(config.order, config.steps, config.lower_order_final)
        return _up.multistep_plan(schedule, ts, orders, solver_type=config.solver_type, **kw)
    if config.method == "unipc":
        ts = _ts.time_grid(schedule, config.skip_type, t_start, t_end, config.steps)
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


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _sample_jit(config, model_fn, classifier_fn, correcting_xt_fn, schedule, params, key, noise,
                condition, uncond, scale, t_start, t_end):
    dtype = jnp.result_type(float)
    if noise is None:
        x_T = jax.random.normal(key, config.shape, dtype)
    else:
        x_T = jnp.asarray(noise).astype(dtype)
    predict = _make_predict(config, model_fn, classifier_fn, schedule, params, condition, uncond, scale)
    plan = _plan(config, schedule, t_start, t_end)
    K = plan.cx.shape[1]
    multistep = config.method == "multistep"
    unipc = config.method == "unipc"

    def body(carry, inp):
        x, y, hist = carry
        m = predict(y, inp["t_eval"])
        hist = jax.lax.dynamic_update_index_in_dim(hist, m, inp["slot"], 0)
        cx = [inp["cx"][k] for k in range(K)]
        x_new = inp["ax"] * x + _combine(cx, hist)
        if unipc:
            x_new = x_new + inp["bx"] * y
        if correcting_xt_fn is not None:
            corrected = correcting_xt_fn(x_new, inp["t_state"], inp["step"] + 1)
            x_new = jnp.where(inp["step_end"], corrected, x_new)
        if multistep:
            y_new = x_new
        else:
            y_new = inp["ay"] * x_new + _combine([inp["cy"][k] for k in range(K)], hist)
        out = x_new if config.return_intermediate else None
        return (x_new, y_new, hist), out

    inputs = {
        "t_eval": plan.t_eval,
        "slot": plan.slot,
        "ax": plan.ax,
        "cx": plan.cx,
        "t_state": plan.t_state,
    }
    if unipc:
        inputs["bx"] = plan.bx
    if not multistep:
        inputs["ay"], inputs["cy"] = plan.ay, plan.cy
    if correcting_xt_fn is not None:
        inputs["step_end"] = jnp.asarray(plan.step_end)
        inputs["step"] = jnp.asarray(plan.step_index, jnp.int32)
        if unipc:  # the corrected state of iteration n is the state at ts[n]; none at n = 0
            inputs["step_end"] = jnp.asarray(np.arange(len(plan.step_end)) > 0)
            inputs["step"] = jnp.asarray(plan.step_index - 1, jnp.int32)
    hist0 = jnp.zeros((K,) + config.shape, dtype)
    (x, y, _), xs = jax.lax.scan(body, (x_T, x_T, hist0), inputs)
    if unipc and correcting_xt_fn is not None:
        y = correcting_xt_fn(y, t_end, config.steps)
    result = y
    if config.denoise_to_zero:
        result = predict(y, t_end, data=True)
    if not config.return_intermediate:
        return result
    if multistep:
        states = jnp.concatenate([x_T[None], xs], 0)
    elif unipc:
        states = jnp.concatenate([xs, y[None]], 0)
    else:
        states = jnp.concatenate([x_T[None], xs[np.flatnonzero(plan.step_end)]], 0)
    return result, states
