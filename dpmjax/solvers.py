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

from . import _cache
from . import methods as _methods
from . import models as _models
from . import schedules as _schedules
from . import timesteps as _ts
from . import updates as _up
from . import v3 as _v3
from .methods import ALGORITHMS, METHODS, SOLVER_TYPES, UNIPC_VARIANTS, Method
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

#: the methods a fixed-step :class:`Solver` implements (``"adaptive"`` is its own loop)
FIXED_METHODS = ("multistep", "singlestep", "singlestep_fixed", "unipc", "v3")


# --------------------------------------------------------------------------- validation

_choice, _integer, _boolean, _real = _methods.choice, _methods.integer, _methods.boolean, _methods.real


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


def unroll_fits() -> bool:
    """Whether the fitting programs differentiate the sampler unrolled: on the CPU backend,
    where XLA runs a network's convolutions inside a loop body, a conditional or a
    checkpointed block several times more slowly than in straight-line code."""
    return jax.default_backend() == "cpu"


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
        concrete_ok = isinstance(v, (numbers.Real, np.ndarray, jax.Array))
        if isinstance(v, (bool, np.bool_, str)) or (not _is_traced(v) and not concrete_ok):
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
        discrete = lo > 1e-300  # a first knot; otherwise lo is only the smallest positive float
        where = f"[{lo:g}, {n0} = {a})" if discrete else f"(0, {n0} = {a})"
        raise ValueError(f"{n1} must be in {where} (never 0: lambda is infinite there"
                         + ("; a discrete schedule starts at t_eps = 1/N" if discrete else "") + f"); got {b}")
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
    """The static configuration of a fixed-step solver, as its tables are built from it
    (hashable: the static part of a :class:`Solver` pytree). Made by :func:`make_options`
    from a method object, a grid and the model's options."""

    model_type: str
    algorithm: str
    method: str
    order: int
    steps: int
    skip_type: str
    lower_order_final: bool
    denoise_to_zero: bool
    solver_type: str
    thresholding: Optional[_models.Thresholding]
    variant: str
    use_corrector: tuple
    orders: tuple  # per step (multistep, unipc) or per outer step (singlestep)
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


def _check_orders(orders, method, order, steps):
    """Per-step orders against the number of steps (their entries were checked by the method)."""
    if orders is None:
        return None
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


def check_model_type(model_type, schedule):
    """``model_type`` is one of :data:`dpmjax.MODEL_TYPES` and goes with ``schedule``
    (:func:`dpmjax.schedules.check_model_type`, the one rule of which type goes with which
    schedule)."""
    _choice("model_type", model_type, _models.MODEL_TYPES)
    return _schedules.check_model_type(schedule, model_type)


def make_options(schedule, method: Method, grid, *, model_type="noise", thresholding=None,
                 denoise_to_zero=False) -> Options:
    """All checks of a fixed-step solver (before anything is traced): the method object's
    options against the grid's steps, the model type against the schedule, thresholding
    against the algorithm."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(
            "schedule must be a dpmjax.NoiseSchedule (VPLinear, VPCosine, VPDiscrete, EDM, RectifiedFlow); "
            f"got {type(schedule).__name__}"
        )
    if not isinstance(method, Method):
        raise TypeError(f"method must be a dpmjax method object (e.g. dpmjax.DPMSolverPP()); got "
                        f"{type(method).__name__}")
    if method.method not in FIXED_METHODS:
        raise ValueError(f"method={method.method!r} has no fixed table of steps; dpmjax.solver takes "
                         f"{', '.join(map(repr, FIXED_METHODS))} (use dpmjax.sample for 'adaptive')")
    check_model_type(model_type, schedule)
    if isinstance(grid, _ts.Grid):
        steps, skip_type, timesteps = grid.steps, grid.skip_type, None
    elif isinstance(grid, _ts.FittedGrid):
        timesteps = grid.timesteps
        n = jnp.shape(timesteps)
        if len(n) != 1 or n[0] < 2:
            raise ValueError(f"timesteps must be a 1-D array of at least 2 times; got shape {tuple(n)}")
        steps, skip_type = n[0] - 1, "time_uniform"
        if method.method == "singlestep_fixed" and steps % method.order:
            raise ValueError(f"timesteps of method='singlestep_fixed' with order {method.order} must have a "
                             f"multiple of {method.order} intervals; got {steps}")
    else:
        raise TypeError(f"grid must be a dpmjax.Grid, a dpmjax.FittedGrid or an array of times; got "
                        f"{type(grid).__name__}")
    order = method.order
    denoise_to_zero = _boolean("denoise_to_zero", denoise_to_zero)
    if thresholding is not None and not isinstance(thresholding, _models.Thresholding):
        raise TypeError(f"thresholding must be None or a dpmjax.Thresholding; got {type(thresholding).__name__}")
    if method.method in ("multistep", "singlestep_fixed", "unipc", "v3") and steps < order:
        raise ValueError(f"steps must be >= order for method={method.method!r}; got steps={steps}, order={order}")
    if thresholding is not None and not method.predict_data:
        raise ValueError("thresholding needs a data-prediction algorithm ('dpmsolver++' or 'sde-dpmsolver++')")
    # use_corrector[n]: correct the state at ts[n], i.e. step n (1-based), in row n
    # (updates.unipc_plan); n = 0 is unused and the last step (n = steps) is never corrected.
    use_corrector = np.ones(steps, bool)
    for i in getattr(method, "disable_corrector", ()):
        _integer("disable_corrector entries", i, 1, steps)
        if i < steps:
            use_corrector[i] = False
    orders = _check_orders(getattr(method, "orders", None), method.method, order, steps)
    if orders is None:
        if method.method == "multistep":
            orders = _ts.multistep_orders(order, steps, method.lower_order_final)
        elif method.method == "unipc":
            orders = _ts.multistep_orders(order, steps, method.lower_order_final, final_below=None)
        elif method.method == "singlestep":
            orders = _ts.singlestep_orders(order, steps)
        else:
            orders = (order,) * (steps // order)
    v3_fields = {}
    if method.method == "v3":
        if denoise_to_zero:
            raise ValueError("denoise_to_zero does not apply to method='v3' (it ends at the EMS grid's last lambda: "
                             "compute the EMS for the interval you sample)")
        orders, c_orders = _v3.v3_orders(order, steps, method.lower_order_final, method.use_corrector,
                                         method.c_pseudo)
        idx = (_v3.v3_indexes(schedule, method.ems, steps, skip_type) if timesteps is None
               else _v3.v3_grid_indexes(schedule, method.ems, timesteps))
        v3_fields = dict(ems_indexes=tuple(int(i) for i in idx), corrector_orders=c_orders,
                         p_pseudo=method.p_pseudo, c_pseudo=method.c_pseudo)
        use_corrector = np.asarray(c_orders) > 0
    return Options(
        **v3_fields,
        model_type=model_type, algorithm=method.algorithm, method=method.method, order=order, steps=steps,
        skip_type=skip_type, lower_order_final=getattr(method, "lower_order_final", True),
        denoise_to_zero=denoise_to_zero, solver_type=getattr(method, "solver_type", "dpmsolver"),
        thresholding=thresholding, variant=getattr(method, "variant", "bh2"),
        use_corrector=tuple(bool(u) for u in use_corrector), orders=orders,
    )


def v3_range(schedule, ems, t_start=None, t_end=None, sample_shape=None):
    """``(t_start, t_end)`` of method ``"v3"``: the ends of its EMS grid (host values); the
    user's own ``t_start``/``t_end`` are refused (the EMS fix the interval)."""
    for name, v in (("t_start", t_start), ("t_end", t_end)):
        if v is not None:
            raise ValueError(f"{name} does not apply to method='v3' (it integrates over its EMS grid, from "
                             f"ems.lambdas[0] to ems.lambdas[-1]: compute the EMS for the interval you sample); "
                             "remove it")
    from .ems import check_ems

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

    def step(self, state: SolverState, out, noise=None, correcting_xt_fn=None) -> SolverState:
        """Advance by one model evaluation. ``out``: the raw network output at
        :meth:`model_inputs` (any float dtype; converted to the solver's). ``noise``: the
        ``N(0, I)`` draw of an SDE step (default: drawn from the state's key); a
        deterministic solver refuses it. ``correcting_xt_fn(x, t, step) -> x``: applied to
        the state when this evaluation completes a step (user scale; ``step`` 1-based), as
        :func:`dpmjax.sample` does.

        A state of another solver (another history size ``K``, sample shape or method) is
        refused. After the last evaluation (``state.i == num_evals``) a concrete state
        raises ``ValueError``; inside ``jit`` (traced ``state.i``) such a step is inert:
        it returns the state unchanged, so a loop that runs too long keeps the finished
        sample."""
        self._check_state(state, "step", before_end=True)
        if noise is not None and self.plan.nz is None:
            raise ValueError(f"noise= applies only to the SDE algorithms ('sde-dpmsolver++', 'sde-dpmsolver'); this "
                             f"solver's algorithm={self.options.algorithm!r} is deterministic: remove noise")
        correct = flags = None
        if correcting_xt_fn is not None:
            correct = _user_correcting(correcting_xt_fn)
            flags = (jnp.asarray(self.layout.x_step, jnp.int32)[state.i],
                     jnp.asarray(self.layout.y_step, jnp.int32)[state.i])
        live = state.i < self.num_evals if _is_traced(state.i) else None
        return self._advance(state, out, self._row(state.i), noise=noise, correct=correct, flags=flags, live=live)

    def result(self, state: SolverState):
        """The sample (user scale) after :attr:`num_evals` steps. An unfinished state
        (``state.i < num_evals``) raises ``ValueError`` when concrete; inside ``jit`` its
        result is NaN (never a half-solved sample)."""
        self._check_state(state, "result")
        if not _is_traced(state.i) and int(state.i) != self.num_evals:
            raise ValueError(f"result() needs a finished state: state.i = {int(state.i)} of num_evals = "
                             f"{self.num_evals} steps (call step() until state.i == solver.num_evals)")
        x = (state.x if state.y is None else state.y) / self.end_scale
        if _is_traced(state.i):
            x = jnp.where(state.i == self.num_evals, x, jnp.asarray(jnp.nan, x.dtype))
        return x

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
        thr = self.options.thresholding
        out.update(
            x_step=np.asarray(self.layout.x_step, np.int32), y_step=np.asarray(self.layout.y_step, np.int32),
            thresholding=thr is not None,
            dynamic_thresholding_ratio=0.995 if thr is None else thr.ratio,
            thresholding_max_val=1.0 if thr is None else thr.max_val,
            sample_max_value=float("inf") if thr is None or thr.sample_max_value is None else thr.sample_max_value,
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
        return _models.convert(out.astype(y.dtype), y, row.alpha, row.sigma, o.model_type, o.predict_data,
                               o.thresholding)

    def _advance(self, state, out, row, noise=None, correct=None, flags=None, live=None):
        """One row: convert and store the model output, update ``x`` (and ``y``).

        ``correct(x, t, step, scale)`` with ``flags = (x_step, y_step)`` (traced ints of the
        row) applies ``correcting_xt_fn`` to a state that completes a step (``scale`` is the
        state scale at ``t``). ``live`` (a traced bool, or ``None``): when false the row is
        inert and the state comes back unchanged; the selects are elementwise, so they fuse
        with the update (no copy of the history)."""
        y = state.x if state.y is None else state.y
        m = self._convert(out, y, row)
        if row.g_p is not None:  # DPM-Solver-v3 stores G = p m + q y + r (per dimension)
            m = row.g_p * m + row.g_q * y + row.g_r
        if live is not None:
            m = jnp.where(live, m, jax.lax.dynamic_index_in_dim(state.hist, row.slot, 0, keepdims=False))
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
        if live is not None:
            x = jnp.where(live, x, state.x)
            y_new = None if y_new is None else jnp.where(live, y_new, state.y)
            return SolverState(x=x, y=y_new, hist=hist, i=state.i + live.astype(state.i.dtype), key=state.key)
        return SolverState(x=x, y=y_new, hist=hist, i=state.i + 1, key=state.key)


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
        plan, layout = _v3.v3_plan(schedule, ems, opts.ems_indexes, opts.orders, opts.corrector_orders,
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
    # model_timesteps arrive as the network's own times (network_times: computed on the host)
    t_model = schedule.model_time(plan.t_eval) if model_timesteps is None else model_timesteps
    t_model = jnp.asarray(t_model, dtype)
    if opts.denoise_to_zero:
        plan = _denoise_row(plan, t_end, schedule, opts)
        t_model = jnp.concatenate([t_model, jnp.asarray(schedule.model_time(t_end), dtype)[None]])
        layout = _up.Layout(x_step=layout.x_step + (0,), y_step=layout.y_step + (0,))
    t_eval = plan.t_eval
    n = t_eval.shape[0]
    scale = lambda t: jnp.broadcast_to(jnp.asarray(schedule.state_scale(t), dtype), jnp.shape(t))  # noqa: E731
    plan = plan._replace(
        t_model=t_model,
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


def solver(schedule: NoiseSchedule, method=None, grid=None, *, model_type: str = "noise", thresholding=None,
           denoise_to_zero: bool = False, **keywords) -> Solver:
    """A fixed-step solver: the coefficient tables of ``method`` on ``grid`` for ``schedule``.

    Args:
      schedule: a :class:`dpmjax.NoiseSchedule`.
      method: a method object (:class:`dpmjax.DPMSolverPP`, :class:`dpmjax.UniPC`,
        :class:`dpmjax.Singlestep`, :class:`dpmjax.V3`, ...; default ``DPMSolverPP()``).
      grid: a :class:`dpmjax.Grid` (steps, spacing, interval; default ``Grid()``), a
        :class:`dpmjax.FittedGrid` or an array of decreasing times.
      model_type: what the network returns: ``"noise"``, ``"x_start"``, ``"v"``, ``"score"``,
        ``"edm"`` (with :class:`dpmjax.EDM`) or ``"flow"`` (with :class:`dpmjax.RectifiedFlow`).
      thresholding: ``None`` or a :class:`dpmjax.Thresholding` (data-prediction methods).
      denoise_to_zero: one more evaluation at the end, returning its data prediction.
      keywords: the authors' flat spelling instead of the objects (``method="unipc"``,
        ``order=``, ``steps=``, ``skip_type=``, ``t_start=``, ``timesteps=``, ``thresholding=True``,
        ...; see :func:`dpmjax.from_keywords`).

    Returns a :class:`Solver` whose :meth:`~Solver.init`, :meth:`~Solver.model_inputs`,
    :meth:`~Solver.step` and :meth:`~Solver.result` give the same sample as
    :func:`dpmjax.sample`, which drives the same functions; pass it to
    ``dpmjax.sample(..., solver=...)`` or run it in your own loop.

    Example (classifier-free guidance in a ``fori_loop``)::

        solver = dpmjax.solver(schedule, dpmjax.DPMSolverPP(order=2), dpmjax.Grid(steps=15, skip_type="logSNR"))

        @jax.jit
        def run(params, x_T, cond, uncond, scale):
            def body(_, state):
                x, t = solver.model_inputs(state)
                out_c, out_u = net(params, x, t, cond), net(params, x, t, uncond)
                return solver.step(state, out_u + scale * (out_c - out_u))
            return solver.result(jax.lax.fori_loop(0, solver.num_evals, body, solver.init(x_T)))
    """
    method, grid, thresholding = _methods.resolve(method, grid, thresholding, **keywords)
    return build_solver(schedule, method, grid, model_type=model_type, thresholding=thresholding,
                        denoise_to_zero=denoise_to_zero)


def _outside_traces() -> bool:
    """Whether no JAX transformation is being traced. Inside one (the user's ``jit``,
    ``grad``, ``vmap``), a solver is built inside the trace instead of taken from the cache:
    a cached solver's arrays would become constants of the user's program."""
    try:
        from jax._src import core as _core

        return bool(_core.trace_state_clean())
    except (ImportError, AttributeError):  # no such check in this jax: never cache
        return False


def build_solver(schedule, method, grid, *, model_type="noise", thresholding=None, denoise_to_zero=False,
                 direction="decreasing", sample_shape=None) -> Solver:
    """The :class:`Solver` of method and grid objects (checked here, before anything is
    compiled). ``direction="increasing"`` builds the ODE-encoding solver of
    :func:`dpmjax.invert` (a :class:`dpmjax.Grid`'s ``t_start < t_end``, explicit times
    increasing). A solver of a hashable, concrete configuration is built once per schedule
    and reused (the schedule is held weakly: nothing outlives it)."""
    key = None
    if not isinstance(method, _methods.V3) and _outside_traces():
        key = (method, grid, model_type, thresholding, denoise_to_zero, direction, jax.config.jax_enable_x64)
        try:
            hit = _cache.table_of(schedule).get(key)
        except TypeError:  # arrays in the grid, or a schedule that cannot be held weakly: built every time
            hit = key = None
        if hit is not None:
            return hit
    opts = make_options(schedule, method, grid, model_type=model_type, thresholding=thresholding,
                        denoise_to_zero=denoise_to_zero)
    if isinstance(grid, _ts.Grid):
        timesteps, model_timesteps, t_start, t_end = None, grid.model_timesteps, grid.t_start, grid.t_end
    else:
        timesteps, model_timesteps, t_start, t_end = grid.timesteps, grid.model_timesteps, None, None
    if opts.method == "v3":
        t_start, t_end = v3_range(schedule, method.ems, t_start, t_end, sample_shape)
    elif timesteps is None and direction == "increasing":
        # invert integrates upwards: t_start < t_end. Checked with the sampling rules (first
        # argument the larger time) but reported under invert's own names.
        t_end, t_start = resolve_times(schedule, schedule.T if t_end is None else t_end,
                                       schedule.t_eps if t_start is None else t_start, names=("t_end", "t_start"))
    elif timesteps is None:
        t_start, t_end = resolve_times(schedule, t_start, t_end)
    check_grid(opts, schedule, timesteps, model_timesteps, direction)
    out = build(opts, schedule, _host(t_start), _host(t_end), _host(timesteps),
                network_times(schedule, model_timesteps), ems=method.ems if opts.method == "v3" else None)
    if key is not None and not _is_traced(out):
        _cache.table_of(schedule)[key] = out
    return out


def network_times(schedule, model_timesteps):
    """The network's time inputs ``schedule.model_time(model_timesteps)`` for :func:`build`.

    Host values (Python, NumPy, concrete JAX arrays) are converted in float64 on the host
    and rounded once to the compute dtype, so a time that is an integer in the network's
    units (a training-step index) arrives as that exact integer in every dtype; through
    ``t N - 1`` in float32 the rounding of ``t`` gives e.g. 249.99998 for 250. Traced
    values are converted inside the trace.
    """
    if model_timesteps is None:
        return None
    if _is_traced(model_timesteps):
        return schedule.model_time(jnp.asarray(model_timesteps, compute_dtype()))
    with jax.ensure_compile_time_eval():
        out = schedule.model_time(np.asarray(model_timesteps, np.float64))
    if _is_traced(out):  # a schedule whose fields are traced (built inside the user's jit)
        return jnp.asarray(out, compute_dtype())
    return np.asarray(out, np.float64).astype(compute_dtype())


def _host(v):
    """Python/NumPy values stay on the host (an eager ``jnp.asarray`` is a dispatched op);
    JAX arrays and tracers pass through (cast inside the jit)."""
    if v is None or isinstance(v, (jax.Array, jax.core.Tracer)):
        return v
    return np.asarray(v, compute_dtype())
