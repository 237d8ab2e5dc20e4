"""The one-step API: a fixed-step solver as pure ``init`` / ``model_inputs`` / ``step`` /
``result`` functions over precomputed coefficient tables.

:func:`dpmjax.sample` is one driver of these functions (a ``lax.scan``); a pipeline that
owns its loop (a ``lax.fori_loop`` body that calls the network, per-step interventions,
previews streamed to the host, gradients stopped before the last K steps) is another::

    solver = dpmjax.solver(schedule, steps=10, method="unipc", order=2, skip_type="logSNR")
    state = solver.init(x_T)                      # key=... for the SDE algorithms
    for _ in range(solver.num_evals):             # or lax.fori_loop / lax.scan, inside jit
        x_in, t_in = solver.model_inputs(state)   # the network's input and time, t_in: (B,)
        state = solver.step(state, net(x_in, t_in))   # the raw output, in model_type
    x = solver.result(state)

Every update of these solvers is linear in the state, the current evaluation point and a
few stored model outputs (:mod:`dpmjax.updates`), so a solver is its table of per-row
coefficients (:class:`dpmjax.updates.Plan`, one row per model evaluation) and a small
static layout. ``step`` reads row ``state.i``; ``sample`` scans over the rows. There is one
implementation of every update: :meth:`Solver.step` and the scan body of ``sample`` both
call the same private ``_advance``.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import models as _models
from . import schedules as _schedules
from . import timesteps as _ts
from . import updates as _up
from . import v3 as _v3
from .ems import check_ems
from .schedules import NoiseSchedule

__all__ = [
    "ALGORITHMS",
    "METHODS",
    "SOLVER_TYPES",
    "UNIPC_VARIANTS",
    "Solver",
    "SolverState",
    "solver",
]

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
METHODS = ("multistep", "singlestep", "singlestep_fixed", "unipc", "adaptive", "v3")
SOLVER_TYPES = ("dpmsolver", "taylor", "midpoint")
UNIPC_VARIANTS = ("bh1", "bh2")

#: the methods a fixed-step :class:`Solver` implements (``"adaptive"`` is its own loop)
FIXED_METHODS = ("multistep", "singlestep", "singlestep_fixed", "unipc", "v3")


# --------------------------------------------------------------------------- validation


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
    return _schedules._real(None, name, value)


def _boolean(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__} {value!r}")
    return bool(value)


def _is_traced(v):
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(v))


def _eval_concrete(fn):
    """``fn()`` as a NumPy array when it can be computed now (also while a jit is being
    traced, for concrete inputs), else ``None`` (it involves traced values, e.g. the tables
    of a schedule passed into the user's jit: then the check is skipped)."""
    try:
        with jax.ensure_compile_time_eval():
            return np.asarray(fn(), np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
            jax.errors.TracerBoolConversionError):
        return None


def compute_dtype():
    """The solver's float dtype: float32, or float64 under ``jax_enable_x64``."""
    return np.dtype(np.float64) if jax.config.jax_enable_x64 else np.dtype(np.float32)


def _as_compute_dtype(values, dtype):
    """``values`` rounded to ``dtype``, the dtype the solver computes in (times distinct in
    float64 may coincide there)."""
    return np.asarray(values, np.float64).astype(dtype)


def check_times(name, values, schedule, length, order=None, allow_zero_end=False):
    """Validate user times ``name``: shape ``(n,)`` with ``length = (n, "steps + 1")``, and,
    for concrete values, finite, strictly ``order`` ("decreasing"/"increasing"/None) *in the
    compute dtype*, inside ``[schedule.t_min, T]`` and > 0 (a discrete schedule's table
    starts at ``t_min = 1/N``), with the schedule's lambda finite and strictly monotone along
    them. ``allow_zero_end``: the last entry may be exactly 0 (a final step to sigma = 0)."""
    n, n_text = length
    shape = tuple(jnp.shape(values))
    if shape != (n,):
        raise ValueError(f"{name} must have shape ({n_text},) = ({n},); got {shape}")
    if _is_traced(values):
        return
    ts = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(ts)):
        raise ValueError(f"{name} must be finite; got {ts}")
    dtype = compute_dtype()
    tc = _as_compute_dtype(ts, dtype)
    d = np.diff(tc)
    if (order == "increasing" and np.any(d <= 0)) or (order == "decreasing" and np.any(d >= 0)):
        raise ValueError(f"{name} must be strictly {order} in {np.dtype(dtype).name} (the dtype the solver computes "
                         f"in); got {ts}")
    body = ts[:-1] if (allow_zero_end and ts[-1] == 0.0) else ts
    lo = _min_time(schedule)
    if body.size and not (body.min() >= lo and body.min() > 0 and body.max() <= schedule.T):
        what = " (only the last entry may be exactly 0)" if allow_zero_end else ""
        raise ValueError(f"{name} must lie in [{lo:g}, schedule.T = {schedule.T}]{what}; "
                         f"got min {body.min()}, max {body.max()}")
    lam = _eval_concrete(lambda: schedule.lambda_(jnp.asarray(tc[: body.size], dtype)))
    if lam is None:
        return
    dl = np.diff(lam)
    if not np.all(np.isfinite(lam)) or (order == "decreasing" and np.any(dl <= 0)) or (
            order == "increasing" and np.any(dl >= 0)):
        raise ValueError(f"{name}: the schedule's lambda must be finite and strictly monotone along the grid in "
                         f"{np.dtype(dtype).name}; got lambda {lam}")


def split_grid(timesteps, model_timesteps, t_start, t_end):
    """``(timesteps, model_timesteps)`` with a :class:`dpmjax.FittedGrid` unpacked, after
    refusing network times given twice and a grid given together with ``t_start``/``t_end``
    (its first and last entries are the end points)."""
    if isinstance(timesteps, _ts.FittedGrid):
        if timesteps.model_timesteps is not None and model_timesteps is not None:
            raise ValueError("model_timesteps is given twice: in the FittedGrid passed as timesteps and as an argument")
        timesteps, model_timesteps = timesteps.timesteps, (
            timesteps.model_timesteps if model_timesteps is None else model_timesteps)
    if timesteps is not None and (t_start is not None or t_end is not None):
        raise ValueError("give either timesteps (its first and last entries are the end points) or t_start/t_end, "
                         "not both")
    return timesteps, model_timesteps


def _min_time(schedule):
    """Smallest time the schedule may be evaluated at (``schedule.t_min``: the table's first
    knot for a discrete schedule, below which log_alpha is extrapolated), and always > 0."""
    return max(float(getattr(schedule, "t_min", 0.0)), float(np.finfo(np.float64).tiny))


def resolve_times(schedule, t_start, t_end, names=("t_start", "t_end")):
    """Default and validate ``t_start > t_end`` (concrete: Python or NumPy numbers, or
    0-d arrays; traced values pass through). Checks that they are distinct, and the
    schedule finite there, in the compute dtype."""
    n0, n1 = names
    t_start = schedule.T if t_start is None else t_start
    t_end = schedule.t_eps if t_end is None else t_end
    for name, v in ((n0, t_start), (n1, t_end)):
        if isinstance(v, (bool, np.bool_, str)) or (not _is_traced(v) and not isinstance(v, (numbers.Real, np.ndarray, jax.Array))):
            raise TypeError(f"{name} must be a float (or a 0-d array); got {type(v).__name__} {v!r}")
        if jnp.ndim(v) != 0:
            raise ValueError(f"{name} must be a scalar; got shape {jnp.shape(v)}")
    if _is_traced(t_start) or _is_traced(t_end):
        return t_start, t_end
    a, b = float(np.asarray(t_start)), float(np.asarray(t_end))
    lo = _min_time(schedule)
    if not (np.isfinite(a) and 0.0 < a <= schedule.T):
        raise ValueError(f"{n0} must be in (0, schedule.T = {schedule.T}]; got {a}")
    if not (np.isfinite(b) and lo <= b and 0.0 < b < a):
        raise ValueError(f"{n1} must be in [{lo:g}, {n0} = {a}) (never 0: lambda is infinite there"
                         + ("; a discrete schedule starts at t_eps = 1/N" if lo > 1e-300 else "") + f"); got {b}")
    dtype = compute_dtype()
    ac, bc = _as_compute_dtype([a, b], dtype)
    if not ac > bc:
        raise ValueError(f"{n0} = {a} and {n1} = {b} are equal in {np.dtype(dtype).name}, the dtype the solver "
                         "computes in")
    lam = _eval_concrete(lambda: schedule.lambda_(jnp.asarray([ac, bc], dtype)))
    if lam is not None and (not np.all(np.isfinite(lam)) or not lam[1] > lam[0]):
        raise ValueError(f"the schedule's lambda is not finite and increasing between {n0} = {a} and {n1} = {b} "
                         f"in {np.dtype(dtype).name}; choose times further from the schedule's singular ends")
    return a, b


# --------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class Options:
    """The static configuration of a fixed-step solver (hashable: part of a jit cache key)."""

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
    sample_max_value: Optional[float]
    variant: str
    use_corrector: tuple
    orders: tuple  # per step (multistep, unipc) or per outer step (singlestep)
    custom_grid: bool
    custom_model_times: bool
    # DPM-Solver-v3 only: the time steps' indexes on the EMS grid, per-step corrector orders
    # (0: none; ``orders`` holds the predictor's) and the pseudo-order flags.
    ems_indexes: tuple = ()
    corrector_orders: tuple = ()
    p_pseudo: bool = False
    c_pseudo: bool = True

    @property
    def predict_data(self) -> bool:
        return self.algorithm in ("dpmsolver++", "sde-dpmsolver++")

    @property
    def stochastic(self) -> bool:
        return self.algorithm.startswith("sde-")

    @property
    def num_steps(self) -> int:
        """Number of grid intervals (``steps + 1`` grid points)."""
        return self.steps if self.method != "singlestep_fixed" else len(self.orders) * self.order


#: sample()'s keyword defaults of the options that apply to some methods only
_SOLVER_DEFAULTS = dict(
    lower_order_final=True, solver_type="dpmsolver", variant="bh2", disable_corrector=(), orders=None,
    ems=None, use_corrector=True, p_pseudo=False, c_pseudo=True,
)
_APPLIES = {
    "lower_order_final": ("multistep", "unipc", "v3"),
    "solver_type": ("multistep", "singlestep", "singlestep_fixed", "adaptive"),
    "variant": ("unipc",),
    "disable_corrector": ("unipc",),
    "orders": ("multistep", "unipc", "singlestep"),
    "ems": ("v3",),
    "use_corrector": ("v3",),
    "p_pseudo": ("v3",),
    "c_pseudo": ("v3",),
}


def reject_inapplicable(method, given: dict):
    """Raise for an option that the method would ignore (given a value other than its
    default): ``given`` maps option names to values."""
    for name, value in given.items():
        allowed = _APPLIES[name]
        default = _SOLVER_DEFAULTS[name] if name in _SOLVER_DEFAULTS else None
        same = (value == default) if not isinstance(value, (tuple, list)) else tuple(value) == tuple(default or ())
        if method not in allowed and not same:
            raise ValueError(f"{'ems' if name == 'ems' else f'{name}={value!r}'} does not apply to method={method!r} (it is an option of "
                             f"{', '.join(map(repr, allowed))}); remove it")


def _check_orders(orders, method, order, steps):
    if orders is None:
        return None
    if isinstance(orders, (str, bytes)) or not hasattr(orders, "__len__"):
        raise TypeError(f"orders must be a tuple of ints; got {orders!r}")
    orders = tuple(_integer("orders entries", o, 1, 3) for o in orders)
    if max(orders, default=0) > order:
        raise ValueError(f"orders must not exceed order = {order}; got {orders}")
    if method in ("multistep", "unipc"):
        if len(orders) != steps:
            raise ValueError(f"orders must have one entry per step (steps = {steps}); got {len(orders)}")
        for i, o in enumerate(orders):
            if o > i + 1:
                raise ValueError(f"orders[{i}] = {o} needs {o} earlier model outputs; step {i + 1} has {i + 1} "
                                 "(the warm-up steps use orders 1, 2, ...)")
    elif sum(orders) != steps:
        raise ValueError(f"orders of method='singlestep' are per outer step and must sum to steps = {steps} "
                         f"(the number of model evaluations); got {orders} (sum {sum(orders)})")
    return orders


def _int_sequence(name, value):
    """A 1-D NumPy integer array (``np.array([2, 3])``) as the tuple of Python ints it
    stands for; other values are returned as given (and checked by the caller)."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or not (value.dtype.kind in "iu" or value.size == 0):
            raise TypeError(f"{name} must be a tuple of ints (or a 1-D integer array); got an array of dtype "
                            f"{value.dtype} and shape {value.shape}")
        return tuple(int(v) for v in value)
    return value


def make_options(
    schedule, *, model_type, algorithm, method, order, steps, skip_type, lower_order_final, denoise_to_zero,
    solver_type, thresholding, thresholding_max_val, dynamic_thresholding_ratio, variant, disable_corrector,
    orders=None, timesteps=None, model_timesteps=None, sample_max_value=None, ems=None, use_corrector=True,
    p_pseudo=False, c_pseudo=True,
) -> Options:
    """All checks of a fixed-step solver's options (before anything is traced)."""
    v3_given = dict(ems=ems, use_corrector=use_corrector, p_pseudo=p_pseudo, c_pseudo=c_pseudo)
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(
            "schedule must be a dpmjax.NoiseSchedule (VPLinear, VPCosine, VPDiscrete, EDM, RectifiedFlow); "
            f"got {type(schedule).__name__}"
        )
    _choice("model_type", model_type, _models.MODEL_TYPES)
    _choice("algorithm", algorithm, ALGORITHMS)
    _choice("method", method, METHODS)
    _choice("skip_type", skip_type, _ts.SKIP_TYPES)
    _choice("solver_type", solver_type, SOLVER_TYPES)
    _choice("variant", variant, UNIPC_VARIANTS)
    if method not in FIXED_METHODS:
        raise ValueError(f"method={method!r} has no fixed table of steps; dpmjax.solver takes "
                         f"{', '.join(map(repr, FIXED_METHODS))} (use dpmjax.sample for 'adaptive')")
    _schedules.check_model_type(schedule, model_type)
    if timesteps is not None and skip_type != "time_uniform":
        raise ValueError(f"skip_type={skip_type!r} does not apply with timesteps= (the given grid is the time grid); "
                         "remove skip_type")
    disable_corrector = _int_sequence("disable_corrector", disable_corrector)
    orders = _int_sequence("orders", orders)
    order = _integer("order", order, 1, 3)
    steps = _integer("steps", steps, 1, 100_000)
    lower_order_final = _boolean("lower_order_final", lower_order_final)
    denoise_to_zero = _boolean("denoise_to_zero", denoise_to_zero)
    thresholding = _boolean("thresholding", thresholding)
    reject_inapplicable(method, dict(lower_order_final=lower_order_final, solver_type=solver_type, variant=variant,
                                     disable_corrector=tuple(disable_corrector) if isinstance(
                                         disable_corrector, (tuple, list)) else disable_corrector,
                                     orders=orders, **v3_given))
    if method in ("multistep", "singlestep_fixed", "unipc", "v3") and steps < order:
        raise ValueError(f"steps must be >= order for method={method!r}; got steps={steps}, order={order}")
    max_sde = 3 if algorithm == "sde-dpmsolver++" else 2
    if algorithm.startswith("sde-") and (method != "multistep" or order > max_sde):
        raise ValueError(
            f"algorithm={algorithm!r} supports method='multistep' with order 1 to {max_sde}; got method={method!r}, "
            f"order={order}"
        )
    for name, value, default in (("dynamic_thresholding_ratio", dynamic_thresholding_ratio, 0.995),
                                 ("thresholding_max_val", thresholding_max_val, 1.0)):
        if not thresholding and not (isinstance(value, numbers.Real) and value == default):
            raise ValueError(f"{name}={value!r} applies only with thresholding=True; remove it or set thresholding=True")
    if thresholding and not algorithm.endswith("++"):
        raise ValueError("thresholding=True needs a data-prediction algorithm ('dpmsolver++' or 'sde-dpmsolver++')")
    ratio = _real("dynamic_thresholding_ratio", dynamic_thresholding_ratio)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"dynamic_thresholding_ratio must be a fraction in (0, 1]; got {ratio}")
    max_val = _real("thresholding_max_val", thresholding_max_val)
    if max_val <= 0:
        raise ValueError(f"thresholding_max_val must be > 0; got {max_val}")
    if sample_max_value is not None:
        if not thresholding:
            raise ValueError("sample_max_value (the largest threshold) needs thresholding=True")
        sample_max_value = _real("sample_max_value", sample_max_value)
        if sample_max_value < max_val:
            raise ValueError(f"sample_max_value must be >= thresholding_max_val = {max_val}; got {sample_max_value}")
    # use_corrector[n]: correct the state at ts[n], i.e. step n (1-based), in row n
    # (updates.unipc_plan); n = 0 is unused and the last step (n = steps) is never corrected.
    if isinstance(disable_corrector, (str, bytes)) or not isinstance(disable_corrector, (tuple, list, np.ndarray)):
        raise TypeError(f"disable_corrector must be a tuple of step numbers (1-based); got {disable_corrector!r}")
    use_corrector = np.ones(steps, bool)
    for i in disable_corrector:
        i = _integer("disable_corrector entries", i, 1, steps)
        if i < steps:
            use_corrector[i] = False
    if orders is not None and method == "singlestep_fixed":
        raise ValueError("orders does not apply to method='singlestep_fixed' (all its steps have order `order`)")
    orders = _check_orders(orders, method, order, steps)
    if orders is None:
        if method == "multistep":
            orders = _ts.multistep_orders(order, steps, lower_order_final)
        elif method == "unipc":
            orders = _ts.multistep_orders(order, steps, lower_order_final, final_below=None)
        elif method == "singlestep":
            orders = _ts.singlestep_orders(order, steps)
        else:
            orders = (order,) * (steps // order)
    v3_fields = {}
    if method == "v3":
        orders, v3_fields, use_corrector = _v3_options(schedule, algorithm, order, steps, skip_type, lower_order_final,
                                                       denoise_to_zero, timesteps, **v3_given)
    return Options(
        **v3_fields,
        model_type=model_type, algorithm=algorithm, method=method, order=order, steps=steps, skip_type=skip_type,
        lower_order_final=lower_order_final, denoise_to_zero=denoise_to_zero, solver_type=solver_type,
        thresholding=thresholding, thresholding_max_val=max_val, dynamic_thresholding_ratio=ratio,
        sample_max_value=sample_max_value, variant=variant, use_corrector=tuple(bool(u) for u in use_corrector), orders=orders,
        custom_grid=timesteps is not None, custom_model_times=model_timesteps is not None,
    )


def _v3_options(schedule, algorithm, order, steps, skip_type, lower_order_final, denoise_to_zero, timesteps, *, ems,
                use_corrector, p_pseudo, c_pseudo):
    """DPM-Solver-v3's static options: ``(predictor orders, Options fields, use_corrector per step)``.
    The time steps are snapped to the EMS grid here, on the host (concrete lambdas)."""
    if ems is None:
        raise ValueError("method='v3' needs ems= (its empirical model statistics: dpmjax.compute_ems, dpmjax.load_ems "
                         "or dpmjax.degenerate_ems)")
    check_ems(ems)
    if algorithm != "dpmsolver++":
        raise ValueError(f"method='v3' integrates the data prediction: it needs algorithm='dpmsolver++' (the default); "
                         f"got algorithm={algorithm!r}")
    if denoise_to_zero:
        raise ValueError("denoise_to_zero does not apply to method='v3' (it ends at the EMS grid's last lambda: compute "
                         "the EMS for the interval you sample)")
    flags = {n: _boolean(n, v) for n, v in dict(use_corrector=use_corrector, p_pseudo=p_pseudo, c_pseudo=c_pseudo).items()}
    p_orders, c_orders = _v3.v3_orders(order, steps, lower_order_final, flags["use_corrector"], flags["c_pseudo"])
    idx = (_v3.v3_indexes(schedule, ems, steps, skip_type) if timesteps is None
           else _v3.v3_grid_indexes(schedule, ems, timesteps))
    fields = dict(ems_indexes=tuple(int(i) for i in idx), corrector_orders=c_orders, p_pseudo=flags["p_pseudo"],
                  c_pseudo=flags["c_pseudo"])
    return p_orders, fields, np.asarray(c_orders) > 0


def v3_range(schedule, ems, t_start=None, t_end=None, sample_shape=None):
    """``(t_start, t_end)`` of method ``"v3"``: the ends of its EMS grid (host values); the
    user's own ``t_start``/``t_end`` are refused (the EMS fix the interval)."""
    for name, v in (("t_start", t_start), ("t_end", t_end)):
        if v is not None:
            raise ValueError(f"{name} does not apply to method='v3' (it integrates over its EMS grid, from "
                             f"ems.lambdas[0] to ems.lambdas[-1]: compute the EMS for the interval you sample); remove it")
    check_ems(ems, sample_shape)
    lam = np.asarray(ems.lambdas, np.float64)[[0, -1]]
    times = _eval_concrete(lambda: schedule.inverse_lambda(jnp.asarray(lam, compute_dtype())))
    if times is None:  # a traced schedule: _build takes the ends from the plan's own times
        times = np.ones(2)
    return times[0], times[1]


def check_grid(opts: Options, schedule, timesteps, model_timesteps, direction="decreasing"):
    """Validate ``timesteps`` (``steps + 1``) and ``model_timesteps`` (one per evaluation)."""
    if timesteps is not None:
        check_times("timesteps", timesteps, schedule, (opts.num_steps + 1, "steps + 1"), direction,
                    allow_zero_end=direction == "decreasing")
        if not _is_traced(timesteps) and np.asarray(timesteps, np.float64)[-1] == 0.0:
            if opts.denoise_to_zero:
                raise ValueError("timesteps ending at 0 already end on the data (sigma = 0): drop denoise_to_zero")
            if opts.method in ("singlestep", "singlestep_fixed") and opts.orders[-1] > 1:
                raise ValueError(f"a step to t = 0 is first order (higher orders have no limit there); the last "
                                 f"outer step has order {opts.orders[-1]}: pass orders= ending in 1")
    if model_timesteps is not None:
        n_eval = sum(opts.orders) if opts.method.startswith("singlestep") else opts.steps
        check_times("model_timesteps", model_timesteps, schedule, (n_eval, "one per model evaluation"))


# --------------------------------------------------------------------------- state


class SolverState(NamedTuple):
    """The state of a fixed-step solver between model evaluations (a pytree).

    * ``x``: the current solution (solver scale: for :class:`dpmjax.EDM` the VP-scaled
      state ``alpha_t x_ve``; the user scale elsewhere);
    * ``y``: the next evaluation point, or ``None`` for multistep methods (which evaluate at
      ``x``);
    * ``hist``: ``(K, *shape)`` ring buffer of converted model outputs;
    * ``i``: int32, the index of the next model evaluation (``0 .. num_evals``);
    * ``key``: the PRNG key of the SDE noise (``None`` otherwise).
    """

    x: jax.Array
    y: Optional[jax.Array]
    hist: jax.Array
    i: jax.Array
    key: Optional[jax.Array]


def _combine(coefs, hist):
    """``sum_k coefs[k] hist[k]`` (K is static and small: unrolled, fused by XLA)."""
    out = coefs[0] * hist[0]
    for k in range(1, hist.shape[0]):
        out = out + coefs[k] * hist[k]
    return out


def check_key(name, key, required=True):
    """A single PRNG key: a typed key (``jax.random.key``) or a legacy ``uint32[2]`` key."""
    if key is None:
        if required:
            raise ValueError(f"{name} must be a PRNG key (jax.random.key(seed)); got None")
        return None
    if not isinstance(key, (jax.Array, np.ndarray)) and not _is_traced(key):
        raise TypeError(f"{name} must be a PRNG key (jax.random.key(seed)); got {type(key).__name__} {key!r}")
    dtype = key.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"{name} must be a single PRNG key; got a batch of shape {key.shape} "
                             "(vmap over keys instead)")
        return key
    if dtype == np.uint32 and tuple(key.shape) == (2,):
        return key
    raise TypeError(f"{name} must be a PRNG key (jax.random.key(seed) or a legacy uint32[2] key); got an array "
                    f"of dtype {dtype} and shape {tuple(key.shape)}")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["plan", "start_scale", "end_scale", "prior_std"],
                   meta_fields=["options", "layout"])
@dataclasses.dataclass(frozen=True)
class Solver:
    """A fixed-step solver: static options and layout, and its coefficient tables.

    A pytree: the tables (``plan``, the scales) are leaves and the options are static, so
    a solver passes into ``jax.jit`` as an argument and new times never recompile. Build
    it with :func:`dpmjax.solver`. Its methods are pure and jittable:

    * :meth:`init` ``(x_T, key=None) -> state``;
    * :meth:`model_inputs` ``(state) -> (x_in, t_in)``: the network's input (user scale)
      and time values (shape ``(B,)``, ``schedule.model_time`` of the evaluation time);
    * :meth:`step` ``(state, out, noise=None) -> state``: ``out`` is the raw network output
      at those inputs, in the solver's ``model_type``; it is converted (and thresholded),
      stored and the state advanced by one row of the table;
    * :meth:`result` ``(state) -> x``: the sample, after :attr:`num_evals` steps.

    ``prior_std`` is the standard deviation of the user-scale ``x_T`` (1, or ``sigma_max``
    for :class:`dpmjax.EDM`): ``x_T = solver.prior_std * jax.random.normal(key, shape)``.
    """

    plan: _up.Plan
    start_scale: jax.Array
    end_scale: jax.Array
    prior_std: jax.Array
    options: Options
    layout: _up.Layout

    @property
    def num_evals(self) -> int:
        """Number of model evaluations (``step`` calls), ``denoise_to_zero`` included."""
        return len(self.layout.x_step)

    @property
    def _has_y(self) -> bool:
        return self.plan.ay is not None

    # ---------------------------------------------------------------- public steps
    def init(self, x_T, key=None) -> SolverState:
        """The state at ``t_start`` from the user-scale ``x_T`` (for :class:`dpmjax.EDM`
        ``x_T ~ N(0, sigma_max^2)``). ``key``: the PRNG key of the SDE noise (the SDE
        algorithms need it unless every :meth:`step` gets ``noise=``; ignored otherwise)."""
        dtype = self.plan.ax.dtype
        if jnp.ndim(x_T) < 1:
            raise ValueError(f"x_T must be a batch of shape (B, *sample_shape); got shape {jnp.shape(x_T)}")
        x = jnp.asarray(x_T).astype(dtype) * self.start_scale
        if self.plan.g_p is not None and tuple(x.shape[1:]) != tuple(self.plan.g_p.shape[1:]):
            raise ValueError(f"x_T must have shape (B, *sample_shape) with the EMS' sample shape "
                             f"{tuple(self.plan.g_p.shape[1:])}; got {tuple(x.shape)}")
        K = self.plan.cx.shape[1]
        if self.options.stochastic:
            key = check_key("key", key, required=False)
        else:
            key = None
        return SolverState(
            x=x,
            y=x if self._has_y else None,
            hist=jnp.zeros((K,) + x.shape, dtype),
            i=jnp.zeros((), jnp.int32),
            key=key,
        )

    def model_inputs(self, state: SolverState):
        """``(x_in, t_in)``: the network input (user scale) and its time values, shape ``(B,)``.
        A concrete state past the last evaluation raises ``ValueError``."""
        self._check_state(state, "model_inputs", before_end=True)
        return self._inputs(state, self._row(state.i))

    def step(self, state: SolverState, out, noise=None) -> SolverState:
        """Advance by one model evaluation. ``out``: the raw network output at
        :meth:`model_inputs` (any float dtype; converted to the solver's). ``noise``: the
        ``N(0, I)`` draw of an SDE step (default: drawn from the state's key); a
        deterministic solver refuses it.

        A state of another solver (another history size ``K``, sample shape or method) is
        refused. After the last evaluation (``state.i == num_evals``) a concrete state
        raises ``ValueError``; inside ``jit`` (traced ``state.i``) such a step is inert:
        it returns the state unchanged, so a loop that runs too long keeps the finished
        sample."""
        self._check_state(state, "step", before_end=True)
        if noise is not None and self.plan.nz is None:
            raise ValueError(f"noise= applies only to the SDE algorithms ('sde-dpmsolver++', 'sde-dpmsolver'); this "
                             f"solver's algorithm={self.options.algorithm!r} is deterministic: remove noise")
        new = self._advance(state, out, self._row(state.i), noise=noise)
        if _is_traced(state.i):
            live = state.i < self.num_evals
            keep = lambda a, b: None if a is None else jnp.where(live, a, b)  # noqa: E731
            new = new._replace(x=keep(new.x, state.x), y=keep(new.y, state.y), hist=keep(new.hist, state.hist),
                               i=keep(new.i, state.i))
        return new

    def result(self, state: SolverState):
        """The sample (user scale) after :attr:`num_evals` steps. An unfinished state
        (``state.i < num_evals``) raises ``ValueError`` when concrete; inside ``jit`` its
        result is NaN (never a half-solved sample)."""
        self._check_state(state, "result")
        if not _is_traced(state.i) and int(state.i) != self.num_evals:
            raise ValueError(f"result() needs a finished state: state.i = {int(state.i)} of num_evals = "
                             f"{self.num_evals} steps (call step() until state.i == solver.num_evals)")
        x = self._result(state)
        if _is_traced(state.i):
            x = jnp.where(state.i == self.num_evals, x, jnp.asarray(jnp.nan, x.dtype))
        return x

    def _result(self, state: SolverState):
        """:meth:`result` without its checks (the drivers of :func:`dpmjax.sample`)."""
        x = state.x if state.y is None else state.y
        return x / self.end_scale

    def _check_state(self, state, where, before_end=False):
        """Refuse a state that is not this solver's (its layout: ``y`` present or not,
        ``hist`` of ``K`` slots of the sample's shape) and, when concrete, one outside the
        loop (``0 <= i <= num_evals``; ``before_end``: ``i < num_evals``)."""
        if not isinstance(state, SolverState):
            raise TypeError(f"{where}() takes a SolverState (from solver.init); got {type(state).__name__}")
        K = self.plan.cx.shape[1]
        x_shape, hist_shape = tuple(jnp.shape(state.x)), tuple(jnp.shape(state.hist))
        if hist_shape != (K,) + x_shape or (state.y is None) == self._has_y or (
                state.y is not None and tuple(jnp.shape(state.y)) != x_shape):
            raise ValueError(
                f"{where}(): the state is not one of this solver's: this {self.options.method} solver keeps "
                f"{'x and y' if self._has_y else 'x (no y)'} and a history of K = {K} outputs of the sample's shape, "
                f"hist (K, *x.shape) = {(K,) + x_shape}; the state has {'no y' if state.y is None else 'y'} and hist "
                f"{hist_shape} (use the state of this solver's init)")
        if not _is_traced(state.i):
            i = int(state.i)
            end = self.num_evals - 1 if before_end else self.num_evals
            if not 0 <= i <= end:
                raise ValueError(f"{where}(): state.i = {i} is past the last of num_evals = {self.num_evals} steps "
                                 f"(the loop runs i = 0 .. {self.num_evals - 1}); the sample is solver.result(state)"
                                 if i >= self.num_evals else f"{where}(): state.i = {i} must be >= 0")

    def current(self, state: SolverState):
        """``(x, t)``: the latest completed solution estimate (user scale) and its time.

        For multistep methods ``x`` is also the next evaluation point, so replacing it
        (:meth:`replace_current`) changes what the network sees next (RePaint-style
        inpainting re-noises known pixels there); singlestep and UniPC compute their next
        evaluation point inside :meth:`step`, so for them a replacement acts on the update
        that follows.
        """
        t, scale = self._current_time_scale(state.i)
        return state.x / scale, t

    def replace_current(self, state: SolverState, x) -> SolverState:
        """``state`` with its solution replaced by the user-scale ``x`` (see :meth:`current`)."""
        _, scale = self._current_time_scale(state.i)
        x = jnp.asarray(x).astype(state.x.dtype) * scale
        if state.y is not None and self.options.method not in ("unipc", "v3"):
            # singlestep: y is x between outer steps (after a final stage, or before the first)
            ends = jnp.asarray((1,) + tuple(int(k > 0) for k in self.layout.x_step))
            return state._replace(x=x, y=jnp.where(ends[state.i] > 0, x, state.y))
        return state._replace(x=x)

    def export(self) -> dict:
        """The solver as plain NumPy arrays, to run it elsewhere. Row ``r = 0 .. n-1``::

            x = x_T * start_scale;  y = x;  hist = zeros((K, *shape))
            for r in range(n):
                out = net(y / in_scale[r], t_model[r])          # the raw network output
                m = out_coef[r] * out + x_coef[r] * y           # model_type -> data or noise
                if thresholding: m = dynamic_threshold(m, ratio, max_val, sample_max_value)
                hist[slot[r]] = m
                x = ax[r] * x + bx[r] * y + sum_k cx[r, k] hist[k] + nz[r] * N(0, I)
                y = ay[r] * x + sum_k cy[r, k] hist[k]
            sample = y / end_scale

        For multistep methods ``bx = cy = nz = 0`` and ``ay = 1`` (``y`` is ``x``). Also:
        ``t_eval`` (solver time of each evaluation), ``x_step`` / ``y_step`` (the 1-based step
        that ``x`` / ``y`` completes after the row, 0 for none) and ``t_state`` / ``t_y``
        (their times), and the strings ``model_type``, ``algorithm``, ``method``.
        """
        p = self.plan
        n, K = p.cx.shape[:2]
        zeros = np.zeros((n,))
        out_coef, x_coef = self._conversion()
        out = {
            "t_eval": p.t_eval, "t_model": p.t_model, "in_scale": p.in_scale,
            "out_coef": out_coef, "x_coef": x_coef,
            "slot": p.slot, "ax": p.ax, "bx": zeros if p.bx is None else p.bx, "cx": p.cx,
            "ay": np.ones((n,)) if p.ay is None else p.ay, "cy": np.zeros((n, K)) if p.cy is None else p.cy,
            "nz": zeros if p.nz is None else p.nz,
            "t_state": p.t_state, "t_y": p.t_state if p.t_y is None else p.t_y,
            "start_scale": self.start_scale, "end_scale": self.end_scale,
        }
        if p.g_p is not None:  # DPM-Solver-v3: hist[slot[r]] = g_p[r] m + g_q[r] y + g_r[r]; + rx[r], + ry[r]
            out.update(g_p=p.g_p, g_q=p.g_q, g_r=p.g_r, rx=p.rx, ry=p.ry)
        out = {k: np.asarray(v) for k, v in out.items()}
        out.update(
            x_step=np.asarray(self.layout.x_step, np.int32), y_step=np.asarray(self.layout.y_step, np.int32),
            thresholding=bool(self.options.thresholding),
            dynamic_thresholding_ratio=self.options.dynamic_thresholding_ratio,
            thresholding_max_val=self.options.thresholding_max_val,
            sample_max_value=float("inf") if self.options.sample_max_value is None else self.options.sample_max_value,
            model_type=self.options.model_type, algorithm=self.options.algorithm, method=self.options.method,
        )
        return out

    # ---------------------------------------------------------------- internals
    def _row(self, i):
        return jax.tree_util.tree_map(lambda a: a[i], self.plan)

    def _current_time_scale(self, i):
        """Time and state scale of ``x`` after ``i`` rows."""
        j = jnp.maximum(i - 1, 0)
        t = jnp.where(i > 0, self.plan.t_state[j], self.plan.t_eval[0])
        scale = jnp.where(i > 0, self.plan.x_scale[j], self.start_scale)
        return t, scale

    def _conversion(self):
        """``(out_coef, x_coef)`` rows: the model output conversion is affine,
        ``m = out_coef * out + x_coef * y`` (see :mod:`dpmjax.models`)."""
        p, o = self.plan, self.options
        conv = _models.to_data if o.predict_data else _models.to_noise
        one, zero = jnp.ones_like(p.alpha), jnp.zeros_like(p.alpha)
        return conv(one, zero, p.alpha, p.sigma, o.model_type), conv(zero, one, p.alpha, p.sigma, o.model_type)

    def _inputs(self, state, row):
        y = state.x if state.y is None else state.y
        b = y.shape[0]
        return y / row.in_scale, jnp.broadcast_to(row.t_model, (b,)).astype(y.dtype)

    def _convert(self, out, y, row):
        o = self.options
        out = jnp.asarray(out)
        if out.shape != y.shape:
            raise ValueError(f"the model output must have the shape of its input {y.shape}; got {out.shape}")
        if not jnp.issubdtype(out.dtype, jnp.floating):
            raise TypeError(f"the model output must be a float array; got dtype {out.dtype}")
        out = out.astype(y.dtype)
        conv = _models.to_data if o.predict_data else _models.to_noise
        m = conv(out, y, row.alpha, row.sigma, o.model_type)
        if o.predict_data and o.thresholding:
            m = _models.dynamic_threshold(m, o.dynamic_thresholding_ratio, o.thresholding_max_val, o.sample_max_value)
        return m

    def _advance(self, state, out, row, noise=None, correct=None, flags=None):
        """One row: convert and store the model output, update ``x`` (and ``y``).

        ``correct(x, t, step, scale)`` with ``flags = (x_step, y_step)`` (traced ints of the
        row) applies ``correcting_xt_fn`` to a state that completes a step (sample's driver;
        ``scale`` is the state scale at ``t``)."""
        y = state.x if state.y is None else state.y
        m = self._convert(out, y, row)
        if row.g_p is not None:  # DPM-Solver-v3 stores G = p m + q y + r (per dimension)
            m = row.g_p * m + row.g_q * y + row.g_r
        hist = jax.lax.dynamic_update_index_in_dim(state.hist, m, row.slot, 0)
        x = row.ax * state.x + _combine(row.cx, hist)
        if row.bx is not None:
            x = x + row.bx * y
        if row.rx is not None:
            x = x + row.rx
        if row.nz is not None:
            if noise is None:
                if state.key is None:
                    raise ValueError("this SDE solver needs noise: give init() a key, or step() a noise= draw")
                noise = jax.random.normal(jax.random.fold_in(state.key, state.i), x.shape, x.dtype)
            elif jnp.shape(noise) != x.shape:
                raise ValueError(f"noise must have the state's shape {x.shape}; got {jnp.shape(noise)}")
            x = x + row.nz * jnp.asarray(noise).astype(x.dtype)
        if correct is not None:
            # lax.cond, not where: the user's hook runs only on rows that complete a step
            x = jax.lax.cond(flags[0] > 0, lambda v: correct(v, row.t_state, flags[0], row.x_scale), lambda v: v, x)
        y_new = None
        if row.ay is not None:
            y_new = row.ay * x + _combine(row.cy, hist)
            if row.ry is not None:
                y_new = y_new + row.ry
            if correct is not None and any(self.layout.y_step):
                y_new = jax.lax.cond(flags[1] > 0, lambda v: correct(v, row.t_y, flags[1], row.y_scale), lambda v: v,
                                     y_new)
        return SolverState(x=x, y=y_new, hist=hist, i=state.i + 1, key=state.key)


# --------------------------------------------------------------------------- builders


def _singlestep_grid(opts: Options, schedule, t_start, t_end, timesteps):
    """Outer times and inner points ``s1``, ``s2`` of a singlestep solver."""
    orders = opts.orders
    o = np.asarray(orders)
    if timesteps is not None:
        idx = np.cumsum([0, *orders])
        safe, _ = _up._safe_end(timesteps)
        t_outer = timesteps[idx]
        s, t = safe[idx[:-1]], safe[idx[1:]]
        lam_s, lam_t = schedule.lambda_(s), schedule.lambda_(t)
        fb1 = schedule.inverse_lambda(lam_s + (lam_t - lam_s) / 3.0)
        fb2 = schedule.inverse_lambda(lam_s + 2.0 * (lam_t - lam_s) / 3.0)
        last = safe.shape[0] - 1
        s1 = jnp.where(jnp.asarray(o >= 2), safe[np.minimum(idx[:-1] + 1, last)], fb1)
        s2 = jnp.where(jnp.asarray(o >= 3), safe[np.minimum(idx[:-1] + 2, last)], fb2)
        return t_outer, s1, s2
    if opts.method == "singlestep":
        if opts.skip_type == "logSNR":
            t_outer = _ts.time_grid(schedule, "logSNR", t_start, t_end, len(orders))
        else:
            fine = _ts.time_grid(schedule, opts.skip_type, t_start, t_end, opts.steps)
            t_outer = fine[np.cumsum([0, *orders])]
    else:  # singlestep_fixed
        t_outer = _ts.time_grid(schedule, opts.skip_type, t_start, t_end, len(orders))
    s, t = t_outer[:-1], t_outer[1:]
    g3 = _ts.time_grid(schedule, opts.skip_type, s, t, 3)
    s1 = jnp.where(jnp.asarray(o == 2), _ts.time_grid(schedule, opts.skip_type, s, t, 2)[:, 1], g3[:, 1])
    return t_outer, s1, g3[:, 2]


def _denoise_row(plan: _up.Plan, t_end, schedule, opts: Options) -> _up.Plan:
    """One more row: the data prediction at ``t_end`` (``denoise_to_zero``), as a linear row
    ``x = bx y + c0 m`` (or ``ax x + c0 m`` when ``y`` is ``x``)."""
    dtype = plan.ax.dtype
    la, ls = schedule.log_alpha(t_end), schedule.log_sigma(t_end)
    A0, c0, _ = _up.zero_limit(la, ls, predict_data=opts.predict_data)
    K = plan.cx.shape[1]
    one, zero = jnp.ones((1,), dtype), jnp.zeros((1,), dtype)
    cx = jnp.zeros((1, K), dtype).at[0, 0].set(c0)
    t = jnp.reshape(t_end, (1,)).astype(dtype)
    uses_y = plan.bx is not None
    row = _up.Plan(
        t_eval=t, slot=jnp.zeros((1,), jnp.int32), ax=zero if uses_y else jnp.reshape(A0, (1,)), cx=cx, t_state=t,
        bx=jnp.reshape(A0, (1,)) if uses_y else None,
        ay=None if plan.ay is None else one, cy=None if plan.cy is None else jnp.zeros((1, K), dtype),
        nz=None if plan.nz is None else zero, t_y=None if plan.t_y is None else t,
    )
    return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b.astype(a.dtype)]), plan, row)


def _build(opts: Options, schedule, t_start, t_end, timesteps, model_timesteps, ems=None) -> Solver:
    """The coefficient tables of ``opts`` (traceable; jitted below)."""
    dtype = compute_dtype()
    if timesteps is not None:
        timesteps = jnp.asarray(timesteps, dtype)
        t_start, t_end = timesteps[0], timesteps[-1]
    t_start, t_end = jnp.asarray(t_start, dtype), jnp.asarray(t_end, dtype)
    kw = dict(predict_data=opts.predict_data)
    if opts.method == "v3":
        plan, layout = _v3.solver_plan(schedule, ems, opts.ems_indexes, opts.orders, opts.corrector_orders,
                                       p_pseudo=opts.p_pseudo, c_pseudo=opts.c_pseudo)
        t_start, t_end = plan.t_eval[0], plan.t_y[-1]
    elif opts.method in ("multistep", "unipc"):
        ts = timesteps if timesteps is not None else _ts.time_grid(schedule, opts.skip_type, t_start, t_end, opts.steps)
        if opts.method == "multistep":
            plan, layout = _up.multistep_plan(schedule, ts, opts.orders, solver_type=opts.solver_type,
                                              stochastic=opts.stochastic, **kw)
        else:
            plan, layout = _up.unipc_plan(schedule, ts, opts.orders, variant=opts.variant,
                                          use_corrector=np.asarray(opts.use_corrector), **kw)
    else:
        t_outer, s1, s2 = _singlestep_grid(opts, schedule, t_start, t_end, timesteps)
        plan, layout = _up.singlestep_plan(schedule, t_outer, s1, s2, opts.orders, solver_type=opts.solver_type, **kw)
    t_model = plan.t_eval if model_timesteps is None else jnp.asarray(model_timesteps, dtype)
    if opts.denoise_to_zero:
        plan = _denoise_row(plan, t_end, schedule, opts)
        t_model = jnp.concatenate([t_model, t_end[None]])
        layout = _up.Layout(x_step=layout.x_step + (0,), y_step=layout.y_step + (0,))
    t_eval = plan.t_eval
    n = t_eval.shape[0]
    scale = lambda t: jnp.broadcast_to(jnp.asarray(schedule.state_scale(t), dtype), jnp.shape(t))  # noqa: E731
    plan = plan._replace(
        t_model=jnp.asarray(schedule.model_time(t_model), dtype),
        alpha=schedule.alpha(t_eval).astype(dtype), sigma=schedule.sigma(t_eval).astype(dtype),
        in_scale=scale(t_eval).reshape((n,)), x_scale=scale(plan.t_state).reshape((n,)),
        y_scale=None if plan.t_y is None else scale(plan.t_y).reshape((n,)),
    )
    end_scale = jnp.ones((), dtype) if opts.denoise_to_zero else scale(t_end)
    # One dtype throughout (a schedule built before jax_enable_x64 was switched on keeps
    # float32 tables).
    plan = jax.tree_util.tree_map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, plan)
    return Solver(plan=plan, start_scale=scale(t_start).astype(dtype), end_scale=end_scale.astype(dtype),
                  prior_std=jnp.asarray(schedule.prior_std(t_start), dtype), options=opts, layout=layout)


build = jax.jit(_build, static_argnums=(0,))


def solver(
    schedule: NoiseSchedule,
    *,
    model_type: str = "noise",
    algorithm: str = "dpmsolver++",
    method: str = "multistep",
    order: int = 2,
    steps: int = 20,
    skip_type: str = "time_uniform",
    t_start=None,
    t_end=None,
    lower_order_final: bool = True,
    denoise_to_zero: bool = False,
    solver_type: str = "dpmsolver",
    thresholding: bool = False,
    thresholding_max_val: float = 1.0,
    dynamic_thresholding_ratio: float = 0.995,
    variant: str = "bh2",
    disable_corrector=(),
    timesteps=None,
    model_timesteps=None,
    orders=None,
    sample_max_value=None,
    ems=None,
    use_corrector: bool = True,
    p_pseudo: bool = False,
    c_pseudo: bool = True,
) -> Solver:
    """A fixed-step solver for a hand-written sampling loop (the one-step API).

    Takes the options of :func:`dpmjax.sample` that do not concern the model call (same
    names, defaults and meaning; ``method`` one of ``"multistep"``, ``"singlestep"``,
    ``"singlestep_fixed"``, ``"unipc"``, ``"v3"`` with ``ems=``). Options that do not apply
    to ``method`` are rejected. ``orders``: per-step orders (multistep, unipc) or per-outer-step orders
    (singlestep, summing to ``steps``) instead of the built-in rules.

    Returns a :class:`Solver`: its :meth:`~Solver.init`, :meth:`~Solver.model_inputs`,
    :meth:`~Solver.step` and :meth:`~Solver.result` give the same sample as
    :func:`dpmjax.sample` (to rounding); the tables are computed once here (one compiled
    program per configuration, cached), so the loop is only the model and the updates.

    Example (classifier-free guidance in a ``fori_loop``)::

        solver = dpmjax.solver(schedule, steps=15, algorithm="dpmsolver++", order=2, skip_type="logSNR")

        @jax.jit
        def run(params, x_T, cond, uncond, scale):
            def body(_, state):
                x, t = solver.model_inputs(state)
                out_c, out_u = net(params, x, t, cond), net(params, x, t, uncond)
                return solver.step(state, out_u + scale * (out_c - out_u))
            return solver.result(jax.lax.fori_loop(0, solver.num_evals, body, solver.init(x_T)))
    """
    timesteps, model_timesteps = split_grid(timesteps, model_timesteps, t_start, t_end)
    opts = make_options(
        schedule, model_type=model_type, algorithm=algorithm, method=method, order=order, steps=steps,
        skip_type=skip_type, lower_order_final=lower_order_final, denoise_to_zero=denoise_to_zero,
        solver_type=solver_type, thresholding=thresholding, thresholding_max_val=thresholding_max_val,
        dynamic_thresholding_ratio=dynamic_thresholding_ratio, variant=variant, disable_corrector=disable_corrector,
        orders=orders, timesteps=timesteps, model_timesteps=model_timesteps, sample_max_value=sample_max_value,
        ems=ems, use_corrector=use_corrector, p_pseudo=p_pseudo, c_pseudo=c_pseudo,
    )
    if opts.method == "v3":
        t_start, t_end = v3_range(schedule, ems, t_start, t_end)
    elif timesteps is None:
        t_start, t_end = resolve_times(schedule, t_start, t_end)
    check_grid(opts, schedule, timesteps, model_timesteps)
    return build(opts, schedule, _host(t_start), _host(t_end), _host(timesteps), _host(model_timesteps), ems=ems)


def _host(v):
    """Python/NumPy values stay on the host (an eager ``jnp.asarray`` is a dispatched op);
    JAX arrays and tracers pass through (cast inside the jit)."""
    if v is None or isinstance(v, (jax.Array, jax.core.Tracer)):
        return v
    return np.asarray(v, compute_dtype())
