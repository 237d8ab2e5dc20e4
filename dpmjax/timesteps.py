"""Time grids as values (:class:`Grid`, :class:`FittedGrid`) and per-step order plans
(docs/algorithms.md "Time grids", "Orders per step").

Grids are computed with ``jnp`` from (possibly traced) end points and are vectorised
over several intervals at once, so the traced program does not grow with ``steps``.
Order plans are static Python tuples: they decide the structure of the program.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Grid",
    "FittedGrid",
    "SKIP_TYPES",
    "time_grid",
    "multistep_orders",
    "singlestep_orders",
]

SKIP_TYPES = ("logSNR", "time_uniform", "time_quadratic", "karras", "edm")

#: exponent of the Karras et al. (2022) grid
KARRAS_RHO = 7.0


class FittedGrid(NamedTuple):
    """A grid for :func:`dpmjax.sample`'s ``timesteps=`` (what :func:`dpmjax.fit_timesteps`
    returns; a pytree, so it can be traced).

    * ``timesteps``: the solver's ``steps + 1`` strictly decreasing times;
    * ``model_timesteps``: ``None``, or the ``steps`` times fed to the network at each
      evaluation in place of the step's own time (solver time, in ``(0, T]``; the time-step
      tuner of Xia et al. 2024, arXiv:2310.09469). The solver's formulas still use
      ``timesteps``.
    """

    timesteps: Any
    model_timesteps: Optional[Any] = None


@dataclasses.dataclass(frozen=True)
class Grid:
    """A built-in time grid: ``steps`` model evaluations' worth of steps spaced by
    ``skip_type`` between ``t_start`` and ``t_end``.

    Args:
      steps: the number of steps (for most methods the number of model evaluations).
      skip_type: ``"time_uniform"``, ``"logSNR"``, ``"time_quadratic"``, ``"karras"`` or
        ``"edm"`` (see :func:`time_grid`).
      t_start, t_end: the interval, ``0 < t_end < t_start <= schedule.T``; defaults
        ``schedule.T`` and ``schedule.t_eps``. Python floats (checked to be distinct in the
        dtype the solver computes in) or traced scalars.
      model_timesteps: optional times (solver time), one per model evaluation, given to the
        network instead of the evaluation's own time (Xia et al. 2024, arXiv:2310.09469).

    ``steps`` and ``skip_type`` decide the program's structure (a new value compiles anew);
    the end points are values. For explicit times, pass a :class:`FittedGrid` or an array.
    """

    steps: int = 20
    skip_type: str = "time_uniform"
    t_start: Any = None
    t_end: Any = None
    model_timesteps: Any = None

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
            raise TypeError(f"steps must be an int; got {type(self.steps).__name__} {self.steps!r}")
        if not 1 <= int(self.steps) <= 100_000:
            raise ValueError(f"steps must be in 1..100000; got {self.steps}")
        object.__setattr__(self, "steps", int(self.steps))
        if not isinstance(self.skip_type, str) or self.skip_type not in SKIP_TYPES:
            raise ValueError(f"skip_type must be one of {', '.join(map(repr, SKIP_TYPES))}; got {self.skip_type!r}")


def explicit_grid(timesteps, model_timesteps=None, *, t_start=None, t_end=None, skip_type=None, steps=None):
    """The :class:`FittedGrid` of explicit times (a :class:`FittedGrid` or an array, and the
    network's times), refusing what cannot go with explicit times: ``t_start``/``t_end``
    (the grid's first and last entries are the end points), a ``skip_type`` (the times are
    given), network times given twice, or a ``steps`` that does not match their number."""
    if isinstance(timesteps, FittedGrid):
        if timesteps.model_timesteps is not None and model_timesteps is not None:
            raise ValueError("model_timesteps is given twice: in the FittedGrid passed as timesteps and as an argument")
        timesteps, model_timesteps = timesteps.timesteps, (
            timesteps.model_timesteps if model_timesteps is None else model_timesteps)
    if timesteps is None:
        return Grid(steps=20 if steps is None else steps, skip_type=skip_type or "time_uniform", t_start=t_start,
                    t_end=t_end, model_timesteps=model_timesteps)
    if t_start is not None or t_end is not None:
        raise ValueError("give either timesteps (its first and last entries are the end points) or t_start/t_end, "
                         "not both")
    if skip_type is not None:
        raise ValueError(f"skip_type={skip_type!r} cannot be combined with timesteps (the times are given); remove it")
    n = jnp.shape(timesteps)
    if steps is not None and len(n) == 1 and n[0] != steps + 1 and not isinstance(steps, bool):
        raise ValueError(f"timesteps must have shape (steps + 1,) = ({steps + 1},); got {tuple(n)}")
    return FittedGrid(timesteps, model_timesteps)


def time_grid(schedule, skip_type: str, t_start, t_end, n: int):
    """``n + 1`` decreasing times from ``t_start`` to ``t_end`` (both included).

    * ``"logSNR"``: uniform in ``lambda``, mapped back by ``schedule.inverse_lambda``;
    * ``"time_uniform"``: ``linspace(t_start, t_end, n + 1)``;
    * ``"time_quadratic"``: ``linspace(sqrt t_start, sqrt t_end, n + 1) ** 2``;
    * ``"karras"``: Karras et al. (2022) Eq. 5 with ``rho = 7`` in the VE noise level
      ``sigma/alpha = exp(-lambda)`` (any schedule), mapped back by ``inverse_lambda``;
    * ``"edm"``: the same ``rho = 7`` polynomial rule in the schedule's own time variable
      (identical to ``"karras"`` for :class:`dpmjax.EDM`, whose time is sigma).

    ``t_start`` and ``t_end`` may be arrays of the same shape ``S``; the result then has
    shape ``S + (n + 1,)`` (one grid per pair), which is how singlestep inner points are
    computed for all outer steps at once. The end points are returned exactly.

    Raises ValueError/TypeError for ``n`` not an int >= 1, an unknown ``skip_type`` and,
    when the end points are concrete (not traced), for ``t_end <= 0``, ``t_end`` below
    ``schedule.t_min``, ``t_start > schedule.T`` or ``t_start <= t_end`` (compared in the
    compute dtype).
    """
    _check_grid_args(schedule, skip_type, t_start, t_end, n)
    t_start = jnp.asarray(t_start, dtype=jnp.result_type(float))
    t_end = jnp.asarray(t_end, dtype=t_start.dtype)
    u = jnp.linspace(0.0, 1.0, n + 1, dtype=t_start.dtype)
    a, b = t_start[..., None], t_end[..., None]
    if skip_type == "logSNR":
        la, lb = schedule.lambda_(a), schedule.lambda_(b)
        ts = schedule.inverse_lambda(la + u * (lb - la))
    elif skip_type == "time_uniform":
        ts = a + u * (b - a)
    elif skip_type == "time_quadratic":
        sa, sb = jnp.sqrt(a), jnp.sqrt(b)
        ts = (sa + u * (sb - sa)) ** 2
    elif skip_type == "karras":
        inv = 1.0 / KARRAS_RHO  # sigma^(1/rho) = exp(-lambda / rho)
        sa, sb = jnp.exp(-inv * schedule.lambda_(a)), jnp.exp(-inv * schedule.lambda_(b))
        ts = schedule.inverse_lambda(-KARRAS_RHO * jnp.log(sa + u * (sb - sa)))
    elif skip_type == "edm":
        inv = 1.0 / KARRAS_RHO
        sa, sb = a**inv, b**inv
        ts = (sa + u * (sb - sa)) ** KARRAS_RHO
    else:  # pragma: no cover - _check_grid_args refused it
        raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")
    # Pin the end points: inverse_lambda(lambda(t)) is t only to rounding.
    ts = ts.at[..., 0].set(t_start).at[..., -1].set(t_end)
    return ts


def _check_grid_args(schedule, skip_type, t_start, t_end, n) -> None:
    """Validate :func:`time_grid`'s arguments (end points only when concrete)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an int (the number of intervals); got {type(n).__name__} {n!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1 (the number of intervals); got {n}")
    if not isinstance(skip_type, str) or skip_type not in SKIP_TYPES:
        raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")
    if isinstance(t_start, jax.core.Tracer) or isinstance(t_end, jax.core.Tracer):
        return
    dtype = jnp.result_type(float)
    for name, v in (("t_start", t_start), ("t_end", t_end)):
        if isinstance(v, (str, bytes, bool)) or v is None:
            raise TypeError(f"{name} must be a real number or an array of times; got {type(v).__name__} {v!r}")
    a = np.asarray(t_start).astype(dtype)
    b = np.asarray(t_end).astype(dtype)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError(f"t_start and t_end must be finite; got t_start={t_start}, t_end={t_end}")
    if np.any(b <= 0):
        raise ValueError(f"t_end must be > 0 (lambda is infinite at t = 0); got t_end={t_end}")
    t_min = getattr(schedule, "t_min", 0.0)
    if np.any(b < np.asarray(t_min, dtype)):
        raise ValueError(f"t_end must be >= schedule.t_min = {t_min}; got t_end={t_end}")
    T = getattr(schedule, "T", None)
    if T is not None and np.any(a > np.asarray(T, dtype)):
        raise ValueError(f"t_start must be <= schedule.T = {T}; got t_start={t_start}")
    if np.any(a <= b):
        raise ValueError(f"t_start must be > t_end (the grid decreases); got t_start={t_start}, t_end={t_end}")


def multistep_orders(
    order: int, steps: int, lower_order_final: bool, final_below: Optional[int] = 10
) -> tuple[int, ...]:
    """Order of each multistep step (1-based ``i``): warm-up ``min(i, order)``; with
    ``lower_order_final`` (and ``steps < final_below``, unless that is ``None``), also at
    most ``steps + 1 - i``.

    DPM-Solver gates the lower final orders to ``steps < 10``; UniPC does not
    (``final_below=None``); diffusers' schedulers gate them at 15.
    """
    lower = lower_order_final and (final_below is None or steps < final_below)
    return tuple(min(i, order, steps + 1 - i) if lower else min(i, order) for i in range(1, steps + 1))


def singlestep_orders(order: int, steps: int) -> tuple[int, ...]:
    """Orders of the outer steps of DPM-Solver-fast (their sum is ``steps``, the NFE)."""
    if order == 3:
        k = steps // 3 + 1
        if steps % 3 == 0:
            orders = [3] * (k - 2) + [2, 1]
        elif steps % 3 == 1:
            orders = [3] * (k - 1) + [1]
        else:
            orders = [3] * (k - 1) + [2]
    elif order == 2:
        orders = [2] * (steps // 2) + ([1] if steps % 2 else [])
    else:
        orders = [1] * steps
    orders = [o for o in orders if o > 0]
    assert sum(orders) == steps, (order, steps, orders)
    return tuple(orders)
