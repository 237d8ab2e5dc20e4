"""Solver methods as objects: each holds only its own options and checks them when built.

A method object says *how* to step; the time grid (:class:`dpmjax.Grid`, a
:class:`dpmjax.FittedGrid` or an array of times) says *where*; :func:`dpmjax.solver`
combines both with a schedule into the coefficient tables of a :class:`dpmjax.Solver`.
An option a method does not have cannot be given: its constructor refuses it.

=======================  ===============================================================
``DPMSolverPP``           multistep DPM-Solver++ (data prediction; 1M = DDIM, 2M, 3M)
``DPMSolver``             multistep DPM-Solver (noise prediction)
``SDEDPMSolverPP``        multistep SDE-DPM-Solver++ (stochastic; order 1 to 3)
``SDEDPMSolver``          multistep SDE-DPM-Solver (stochastic; order 1 or 2)
``Singlestep``            DPM-Solver-fast: singlestep steps of mixed orders summing to the NFE
``SinglestepFixed``       singlestep steps all of order ``order``
``UniPC``                 UniPC predictor-corrector (bh1/bh2)
``V3``                    DPM-Solver-v3 with empirical model statistics
``Adaptive``              DPM-Solver-12/23 with an error-controlled step size
=======================  ===============================================================

The objects are frozen dataclasses (hashable, except :class:`V3`, which holds arrays and
compares by identity), so they can be stored, compared and used as static configuration.

The authors' flat keywords (``algorithm=``, ``method="multistep"``, ``order=``, ...) map to
these objects through :func:`from_keywords`; ``dpmjax.sample(..., method="unipc",
variant="bh1")`` and ``dpmjax.sample(..., method=dpmjax.UniPC(variant="bh1"))`` are the same
call.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, ClassVar, Optional

import numpy as np

from . import schedules as _schedules

__all__ = [
    "Method",
    "DPMSolverPP",
    "DPMSolver",
    "SDEDPMSolverPP",
    "SDEDPMSolver",
    "Singlestep",
    "SinglestepFixed",
    "UniPC",
    "V3",
    "Adaptive",
    "ALGORITHMS",
    "METHODS",
    "SOLVER_TYPES",
    "UNIPC_VARIANTS",
    "from_keywords",
]

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
METHODS = ("multistep", "singlestep", "singlestep_fixed", "unipc", "adaptive", "v3")
SOLVER_TYPES = ("dpmsolver", "taylor", "midpoint")
UNIPC_VARIANTS = ("bh1", "bh2")


# --------------------------------------------------------------------------- validators


def choice(name, value, allowed):
    """``value`` if it is one of the strings ``allowed``, else ``ValueError`` naming both."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def integer(name, value, lo, hi=None):
    """``value`` as a Python int in ``[lo, hi]`` (bools and floats are refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {rng}; got {value}")
    return value


def boolean(name, value):
    """``value`` as a Python bool (only ``bool`` and ``numpy.bool_`` are accepted)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__} {value!r}")
    return bool(value)


def real(name, value):
    """``value`` as a finite Python float."""
    return _schedules._real(None, name, value)


def int_tuple(name, value, lo, hi=None):
    """A sequence of ints (a tuple, list or 1-D integer array) as a tuple of Python ints."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or not (np.issubdtype(value.dtype, np.integer) or value.size == 0):
            raise TypeError(f"{name} must be a 1-D sequence of ints; got an array of dtype {value.dtype} and "
                            f"shape {value.shape}")
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of ints; got {type(value).__name__} {value!r}")
    return tuple(integer(f"{name} entries", v, lo, hi) for v in value)


def _set(obj, name, value):
    object.__setattr__(obj, name, value)


# --------------------------------------------------------------------------- methods


class Method:
    """Base class of the method objects (see the module docstring for the list).

    ``method`` is the authors' name of the method family and ``algorithm`` the quantity
    integrated (``"dpmsolver++"``: the data prediction; ``"dpmsolver"``: the noise
    prediction; ``"sde-"``: the stochastic versions)."""

    method: ClassVar[str]
    algorithm: str

    @property
    def predict_data(self) -> bool:
        return self.algorithm in ("dpmsolver++", "sde-dpmsolver++")

    @property
    def stochastic(self) -> bool:
        return self.algorithm.startswith("sde-")


def _check_orders_entries(obj):
    if obj.orders is not None:
        orders = int_tuple("orders", obj.orders, 1, 3)
        if max(orders, default=0) > obj.order:
            raise ValueError(f"orders must not exceed order = {obj.order}; got {orders}")
        _set(obj, "orders", orders)


@dataclasses.dataclass(frozen=True)
class _Multistep(Method):
    order: int = 2
    solver_type: str = "dpmsolver"
    lower_order_final: bool = True
    orders: Optional[tuple] = None

    method: ClassVar[str] = "multistep"
    max_order: ClassVar[int] = 3

    def __post_init__(self):
        _set(self, "order", integer("order", self.order, 1, self.max_order))
        choice("solver_type", self.solver_type, SOLVER_TYPES)
        _set(self, "lower_order_final", boolean("lower_order_final", self.lower_order_final))
        _check_orders_entries(self)


@dataclasses.dataclass(frozen=True)
class DPMSolverPP(_Multistep):
    """Multistep DPM-Solver++ (Lu et al. 2022b, arXiv:2211.01095): integrates the data
    prediction; order 1 is DDIM, order 2 "2M", order 3 "3M". The method to use with
    guidance.

    Args:
      order: 1, 2 or 3.
      solver_type: ``"dpmsolver"`` or ``"taylor"`` form of the second-order correction
        (``"midpoint"`` is ``"dpmsolver"`` for multistep methods).
      lower_order_final: lower the order of the last steps when ``steps < 10``, which
        stabilises very few steps.
      orders: optional per-step orders (each at most ``order`` and at most the step's
        1-based index) in place of the built-in rule.
    """

    algorithm: ClassVar[str] = "dpmsolver++"


@dataclasses.dataclass(frozen=True)
class DPMSolver(_Multistep):
    """Multistep DPM-Solver (Lu et al. 2022, arXiv:2206.00927): integrates the noise
    prediction. Options as :class:`DPMSolverPP`."""

    algorithm: ClassVar[str] = "dpmsolver"


@dataclasses.dataclass(frozen=True)
class SDEDPMSolverPP(_Multistep):
    """Multistep SDE-DPM-Solver++ (arXiv:2211.01095): the stochastic data-prediction
    solver, order 1 to 3; draws fresh noise at every step (a key is needed). Options as
    :class:`DPMSolverPP`."""

    algorithm: ClassVar[str] = "sde-dpmsolver++"


@dataclasses.dataclass(frozen=True)
class SDEDPMSolver(_Multistep):
    """Multistep SDE-DPM-Solver (noise prediction), order 1 or 2. Options as
    :class:`DPMSolverPP`."""

    algorithm: ClassVar[str] = "sde-dpmsolver"
    max_order: ClassVar[int] = 2


@dataclasses.dataclass(frozen=True)
class Singlestep(Method):
    """DPM-Solver-fast (Lu et al. 2022): singlestep steps of mixed orders whose model
    evaluations sum to ``steps``.

    Args:
      order: the highest order, 1 to 3.
      algorithm: ``"dpmsolver++"`` or ``"dpmsolver"``.
      solver_type: ``"dpmsolver"`` or ``"taylor"``; ``"midpoint"`` is ``"dpmsolver"`` except
        that order 3 reaches its second inner point by the midpoint step (diffusers'
        singlestep scheduler).
      orders: optional orders of the outer steps (summing to ``steps``).
    """

    order: int = 3
    algorithm: str = "dpmsolver++"
    solver_type: str = "dpmsolver"
    orders: Optional[tuple] = None

    method: ClassVar[str] = "singlestep"

    def __post_init__(self):
        _set(self, "order", integer("order", self.order, 1, 3))
        choice("algorithm", self.algorithm, ALGORITHMS[:2])
        choice("solver_type", self.solver_type, SOLVER_TYPES)
        _check_orders_entries(self)


@dataclasses.dataclass(frozen=True)
class SinglestepFixed(Method):
    """Singlestep steps all of order ``order``: ``steps // order`` steps of ``order``
    model evaluations each (as in the authors' ``"singlestep_fixed"``).

    Args:
      order: 1 to 3; algorithm, solver_type: as :class:`Singlestep`.
    """

    order: int = 2
    algorithm: str = "dpmsolver++"
    solver_type: str = "dpmsolver"

    method: ClassVar[str] = "singlestep_fixed"

    def __post_init__(self):
        _set(self, "order", integer("order", self.order, 1, 3))
        choice("algorithm", self.algorithm, ALGORITHMS[:2])
        choice("solver_type", self.solver_type, SOLVER_TYPES)


@dataclasses.dataclass(frozen=True)
class UniPC(Method):
    """UniPC (Zhao et al. 2023, arXiv:2302.04867): a multistep predictor with a
    corrector that reuses the next model evaluation (no extra NFE).

    Args:
      order: 1 to 3.
      variant: ``"bh1"`` or ``"bh2"`` (the B(h) function).
      algorithm: ``"dpmsolver++"`` (data prediction) or ``"dpmsolver"``.
      lower_order_final: lower the order of the last steps (always, as in UniPC).
      disable_corrector: 1-based steps whose corrector is skipped.
      orders: optional per-step orders in place of the built-in rule.
    """

    order: int = 2
    variant: str = "bh2"
    algorithm: str = "dpmsolver++"
    lower_order_final: bool = True
    disable_corrector: tuple = ()
    orders: Optional[tuple] = None

    method: ClassVar[str] = "unipc"

    def __post_init__(self):
        _set(self, "order", integer("order", self.order, 1, 3))
        choice("variant", self.variant, UNIPC_VARIANTS)
        choice("algorithm", self.algorithm, ALGORITHMS[:2])
        _set(self, "lower_order_final", boolean("lower_order_final", self.lower_order_final))
        _set(self, "disable_corrector", int_tuple("disable_corrector", self.disable_corrector, 1))
        _check_orders_entries(self)


@dataclasses.dataclass(frozen=True, eq=False)
class V3(Method):
    """DPM-Solver-v3 (Zheng et al. 2023, arXiv:2310.13268): multistep predictor-corrector
    with the empirical model statistics ``ems`` (:func:`dpmjax.compute_ems`,
    :func:`dpmjax.load_ems`, :func:`dpmjax.degenerate_ems`). It integrates over the EMS
    grid's range; the time steps are snapped to EMS grid points.

    Args:
      ems: the :class:`dpmjax.EMS` of the sample shape.
      order: the predictor's order, 1 to 3.
      lower_order_final: lower the order of the last steps.
      use_corrector, p_pseudo, c_pseudo: the authors' options: the corrector (no extra
        model call), pseudo-order predictor and corrector. Their CIFAR-10 settings: 5 NFE
        ``p_pseudo=True, lower_order_final=False``; 6 to 8 NFE ``p_pseudo=False``; both with
        ``c_pseudo=False``.

    Compares by identity (it holds the statistics' arrays).
    """

    ems: Any = None
    order: int = 2
    lower_order_final: bool = True
    use_corrector: bool = True
    p_pseudo: bool = False
    c_pseudo: bool = True

    method: ClassVar[str] = "v3"
    algorithm: ClassVar[str] = "dpmsolver++"

    def __post_init__(self):
        from .ems import check_ems

        if self.ems is None:
            raise ValueError("method='v3' needs ems= (dpmjax.V3(ems=...): its empirical model statistics from "
                             "dpmjax.compute_ems, dpmjax.load_ems or dpmjax.degenerate_ems)")
        check_ems(self.ems)
        _set(self, "order", integer("order", self.order, 1, 3))
        for name in ("lower_order_final", "use_corrector", "p_pseudo", "c_pseudo"):
            _set(self, name, boolean(name, getattr(self, name)))


@dataclasses.dataclass(frozen=True)
class Adaptive(Method):
    """DPM-Solver-12 (``order=2``) or -23 (``order=3``) with an error-controlled step
    size (Lu et al. 2022, Sec. 4.3): it chooses its own steps, so it takes no grid, only
    the interval.

    Args:
      order: 2 or 3.
      algorithm: ``"dpmsolver++"`` or ``"dpmsolver"``; solver_type: as :class:`Singlestep`.
      atol, rtol: the error tolerances; h_init: the first step (in lambda); theta: the
        safety factor in ``(0, 1]``; t_err: how close to ``t_end`` counts as finished (in
        time, at most 1 % of the interval); max_nfe: the bound on model evaluations. A
        solve that stops at ``max_nfe`` (or whose error estimate is not finite) before
        reaching ``t_end`` returns NaN, never an unfinished state as a sample.
    """

    order: int = 2
    algorithm: str = "dpmsolver++"
    solver_type: str = "dpmsolver"
    atol: float = 0.0078
    rtol: float = 0.05
    h_init: float = 0.05
    theta: float = 0.9
    t_err: float = 1e-5
    max_nfe: int = 10_000

    method: ClassVar[str] = "adaptive"

    def __post_init__(self):
        if isinstance(self.order, numbers.Integral) and not isinstance(self.order, bool) and self.order not in (2, 3):
            raise ValueError(f"method='adaptive' needs order 2 or 3; got order={self.order}")
        _set(self, "order", integer("order", self.order, 2, 3))
        choice("algorithm", self.algorithm, ALGORITHMS[:2])
        choice("solver_type", self.solver_type, SOLVER_TYPES)
        for name in ("atol", "rtol", "h_init", "theta", "t_err"):
            v = real(name, getattr(self, name))
            if v <= 0:
                raise ValueError(f"{name} must be > 0; got {v}")
            _set(self, name, v)
        if self.theta > 1:
            raise ValueError(f"theta (the step-size safety factor) must be in (0, 1]; got {self.theta}")
        _set(self, "max_nfe", integer("max_nfe", self.max_nfe, self.order, 10_000_000))


# --------------------------------------------------------------------------- the authors' keywords

#: the method string of the authors' keywords -> its classes, by algorithm
_BY_NAME = {
    "multistep": {"dpmsolver++": DPMSolverPP, "dpmsolver": DPMSolver, "sde-dpmsolver++": SDEDPMSolverPP,
                  "sde-dpmsolver": SDEDPMSolver},
    "singlestep": Singlestep,
    "singlestep_fixed": SinglestepFixed,
    "unipc": UniPC,
    "v3": V3,
    "adaptive": Adaptive,
}

#: the keywords that are options of some method, with the flat API's defaults
METHOD_KEYWORDS = dict(
    order=2, solver_type="dpmsolver", lower_order_final=True, orders=None, variant="bh2", disable_corrector=(),
    ems=None, use_corrector=True, p_pseudo=False, c_pseudo=True, atol=0.0078, rtol=0.05, h_init=0.05, theta=0.9,
    t_err=1e-5, max_nfe=None,
)


@functools.lru_cache(maxsize=None)
def _fields(cls):
    return frozenset(f.name for f in dataclasses.fields(cls))


def _same(value, default):
    """Whether a flat keyword was left at its default (arrays never count as the default)."""
    if isinstance(value, np.ndarray) or not isinstance(value, (type(None), bool, numbers.Number, str, tuple, list)):
        return False
    if isinstance(value, (tuple, list)) or isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list)) and tuple(value) == tuple(default or ())
    return value == default


def method_from_keywords(method="multistep", algorithm="dpmsolver++", **options) -> Method:
    """The method object of the authors' flat keywords (``method`` a string).

    ``options`` are the per-method keywords (:data:`METHOD_KEYWORDS`); one that the method
    does not have raises ``ValueError`` when given a value other than its flat default, as
    the flat API always did. Which keyword belongs to which method is read from the
    classes' fields: there is no separate table.
    """
    choice("method", method, METHODS)
    choice("algorithm", algorithm, ALGORITHMS)
    unknown = set(options) - set(METHOD_KEYWORDS)
    if unknown:
        raise TypeError(f"unknown method option(s) {', '.join(sorted(unknown))}")
    cls = _BY_NAME[method]
    if isinstance(cls, dict):
        cls = cls[algorithm]
    elif algorithm.startswith("sde-"):
        max_sde = 3 if algorithm == "sde-dpmsolver++" else 2
        raise ValueError(f"algorithm={algorithm!r} supports method='multistep' with order 1 to {max_sde}; got "
                         f"method={method!r}, order={options.get('order', 2)}")
    fields = _fields(cls)
    kwargs = {}
    for name, value in options.items():
        if name in fields:
            if name == "max_nfe" and value is None:
                continue
            kwargs[name] = value
        elif not _same(value, METHOD_KEYWORDS[name]):
            owners = [m for m, c in _BY_NAME.items()
                      if name in _fields(next(iter(c.values())) if isinstance(c, dict) else c)]
            shown = "ems" if name == "ems" else f"{name}={value!r}"
            raise ValueError(f"{shown} does not apply to method={method!r} (it is an option of "
                             f"{', '.join(map(repr, owners))}); remove it")
    if method == "multistep" and algorithm.startswith("sde-"):
        max_sde = 3 if algorithm == "sde-dpmsolver++" else 2
        order = options.get("order", 2)
        if isinstance(order, numbers.Integral) and not isinstance(order, bool) and order > max_sde:
            raise ValueError(f"algorithm={algorithm!r} supports method='multistep' with order 1 to {max_sde}; got "
                             f"method={method!r}, order={order}")
    if "algorithm" in fields:
        kwargs["algorithm"] = algorithm
    elif algorithm != cls.algorithm:
        raise ValueError(f"method={method!r} integrates the data prediction: it needs algorithm='dpmsolver++' "
                         f"(the default); got algorithm={algorithm!r}")
    return cls(**kwargs)


_GRID_KEYWORDS = ("steps", "skip_type", "t_start", "t_end", "timesteps", "model_timesteps")
_THRESHOLDING_KEYWORDS = ("dynamic_thresholding_ratio", "thresholding_max_val", "sample_max_value")


def resolve(method=None, grid=None, thresholding=None, **keywords):
    """``(method, grid, thresholding)`` objects (see :func:`_resolve`), memoised for flat
    keywords of plain values (numbers, strings, tuples: each with its type, so ``1``,
    ``1.0`` and ``True`` stay distinct); arrays are never part of the memo."""
    if (method is None or isinstance(method, (str, Method))) and not isinstance(method, V3):
        try:
            key = (method, type(method), grid, thresholding, type(thresholding),
                   tuple(sorted((k, v, type(v), _types(v)) for k, v in keywords.items())))
            return _resolve_memo(key, method, grid, thresholding, keywords)
        except TypeError:  # an unhashable value (an array of times, a list): resolved every time
            pass
    return _resolve(method, grid, thresholding, **keywords)


def _types(v):
    return tuple(map(type, v)) if isinstance(v, tuple) else None


_MEMO: dict = {}


def _resolve_memo(key, method, grid, thresholding, keywords):
    hit = _MEMO.get(key)
    if hit is None:
        hit = _resolve(method, grid, thresholding, **keywords)
        if len(_MEMO) >= 256:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = hit
    return hit


def _resolve(method=None, grid=None, thresholding=None, **keywords):
    """``(method, grid, thresholding)`` objects from objects, the authors' flat keywords, or a
    mix where each concept is given once: the one mapping of the flat spelling (see
    :func:`from_keywords`). A method object with flat method options, or a grid with flat grid
    keywords, is refused (each option lives on its object)."""
    from . import models as _models
    from . import timesteps as _ts

    kw = dict(keywords)
    unknown = set(kw) - set(METHOD_KEYWORDS) - {"algorithm"} - set(_GRID_KEYWORDS) - set(_THRESHOLDING_KEYWORDS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    method_kw = {k: kw.pop(k) for k in list(kw) if k in METHOD_KEYWORDS or k == "algorithm"}
    if isinstance(method, Method):
        if method_kw:
            name = next(iter(method_kw))
            raise ValueError(f"{name} is an option of the method: give it to the method object (e.g. "
                             f"dpmjax.{type(method).__name__}({name}=...)), not beside method={method!r}")
    elif method is None or isinstance(method, str):
        method_kw.setdefault("order", METHOD_KEYWORDS["order"])  # the flat API's order 2, for every method
        method = method_from_keywords(method or "multistep", method_kw.pop("algorithm", "dpmsolver++"), **method_kw)
    else:
        raise TypeError(f"method must be a dpmjax method object (e.g. dpmjax.DPMSolverPP(order=2)) or one of "
                        f"{', '.join(map(repr, METHODS))}; got {type(method).__name__}")
    grid_kw = {k: kw.pop(k) for k in _GRID_KEYWORDS if k in kw}
    if grid is not None:
        if grid_kw:
            raise ValueError(f"give the time grid either as grid= or as {', '.join(grid_kw)}=, not both")
        if not isinstance(grid, (_ts.Grid, _ts.FittedGrid)):
            grid = _ts.explicit_grid(grid)
    elif isinstance(method, Adaptive):
        for name in ("timesteps", "model_timesteps"):
            if grid_kw.get(name) is not None:
                raise ValueError(f"{name} cannot be combined with method='adaptive' (it chooses its own steps)")
        if grid_kw.get("steps") is not None:
            _ts.Grid(steps=grid_kw["steps"])  # checked, then unused: the adaptive method chooses its steps
        grid = _ts.Grid(steps=method.order, skip_type=grid_kw.get("skip_type") or "time_uniform",
                        t_start=grid_kw.get("t_start"), t_end=grid_kw.get("t_end"))
    else:
        steps, timesteps = grid_kw.get("steps"), grid_kw.get("timesteps")
        # singlestep_fixed's grid has steps // order * order intervals: its length is checked later
        check_steps = steps if timesteps is None or not isinstance(method, SinglestepFixed) else None
        grid = _ts.explicit_grid(timesteps, grid_kw.get("model_timesteps"), t_start=grid_kw.get("t_start"),
                                 t_end=grid_kw.get("t_end"), skip_type=grid_kw.get("skip_type"), steps=check_steps)
    thresholding = _models.thresholding_from_keywords(
        False if thresholding is None else thresholding,
        kw.pop("dynamic_thresholding_ratio", 0.995), kw.pop("thresholding_max_val", 1.0),
        kw.pop("sample_max_value", None))
    return method, grid, thresholding


def from_keywords(**keywords):
    """The objects of the authors' flat keywords: ``(method, grid, thresholding)``.

    ``keywords`` are those of the flat ``dpmjax.sample`` / ``dpmjax.solver`` spelling:
    ``method`` (a string), ``algorithm``, the per-method options (``order``, ``variant``,
    ``atol``, ...), the grid's (``steps``, ``skip_type``, ``t_start``, ``t_end``,
    ``timesteps``, ``model_timesteps``) and the thresholding ones (``thresholding``,
    ``dynamic_thresholding_ratio``, ``thresholding_max_val``, ``sample_max_value``).
    Returns the method object, the grid (a :class:`dpmjax.Grid`, or a
    :class:`dpmjax.FittedGrid` for explicit times) and a :class:`dpmjax.Thresholding` or
    ``None``. An option the method does not have raises ``ValueError`` (when given a value
    other than its flat default), as the flat API always did.

    Example::

        method, grid, thresholding = dpmjax.from_keywords(algorithm="dpmsolver++", method="multistep", order=2,
                                                          steps=10, skip_type="logSNR")
        # method == dpmjax.DPMSolverPP(order=2); grid == dpmjax.Grid(steps=10, skip_type="logSNR")
    """
    return resolve(keywords.pop("method", None), None, keywords.pop("thresholding", False), **keywords)
