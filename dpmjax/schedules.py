"""Noise schedules as immutable JAX pytrees.

A schedule describes the forward process ``x_t = alpha_t x_0 + sigma_t eps`` by
``log_alpha(t)`` and ``log_sigma(t)``; everything a DPM-Solver needs follows:

* ``lambda_(t) = log alpha_t - log sigma_t`` (half log-SNR, strictly decreasing),
* ``inverse_lambda(lam)``, the time at which ``lambda_`` takes the value ``lam``,
* ``T`` (largest time), ``t_eps`` (default end time, never 0) and
  ``model_time(t)``, the time value the network is fed.

For variance-preserving (VP) schedules ``sigma_t = sqrt(1 - alpha_t^2)`` is computed in
log space, ``log sigma = 0.5 log(-expm1(2 log alpha))``: the naive
``log(1 - exp(.))`` loses ~1e-4 absolute in float32 at t = 1e-3 and far more below
(DPM-Solver, Lu et al. 2022, arXiv:2206.00927, App. D; docs/algorithms.md "Noise schedules").

Scalar hyper-parameters are static (they fix ``T`` and are validated eagerly); the
tables of :class:`VPDiscrete` are array leaves, so a schedule can be passed into
``jax.jit`` as an argument instead of being baked in as constants.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "NoiseSchedule",
    "EDM",
    "RectifiedFlow",
    "VPSchedule",
    "VPLinear",
    "VPCosine",
    "VPDiscrete",
    "DIFFUSERS_PREDICTION_TYPES",
    "check_times_in_range",
]


def _float_dtype():
    """float32, or float64 when the user enabled ``jax_enable_x64``."""
    return jnp.result_type(float)


def _asarray(t):
    return jnp.asarray(t, dtype=_float_dtype())


# --- parameter validation --------------------------------------------------------------
#
# A schedule is checked when it is built: every hyper-parameter is a finite Python number
# in its range, and the schedule is evaluated at ``T`` and ``t_eps`` in the dtype the
# solver computes in (float32, or float64 under ``jax_enable_x64``): ``log alpha``,
# ``log sigma`` and ``lambda`` must be finite there, ``alpha`` and ``sigma`` normal
# (non-zero) numbers, and ``lambda(T) < lambda(t_eps)``. So a schedule that would give
# NaN or infinity at some time of the default interval never reaches the sampler.


def _real(owner: str | None, name: str, value) -> float:
    """``value`` as a finite Python float; TypeError for anything that is not a real number
    (str, None, bool, arrays), ValueError for NaN and infinity. Messages name ``name``
    (after ``owner: `` when given)."""
    what = f"{owner}: {name}" if owner else name
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number (a Python float); got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite; got {value}")
    return value


def _set_reals(obj, names):
    """Replace the (frozen) fields ``names`` of ``obj`` by validated Python floats."""
    owner = type(obj).__name__
    for name in names:
        object.__setattr__(obj, name, _real(owner, name, getattr(obj, name)))


def _finite_problem(schedule, t: float, dtype) -> str | None:
    """Why ``schedule`` is not usable at time ``t`` in ``dtype`` (``None``: it is)."""
    tiny = float(jnp.finfo(dtype).tiny)
    with jax.ensure_compile_time_eval():
        tt = jnp.asarray(t, dtype)
        la, ls, lam = (float(f(tt)) for f in (schedule.log_alpha, schedule.log_sigma, schedule.lambda_))
        back = float(schedule.inverse_lambda(jnp.asarray(lam, dtype))) if math.isfinite(lam) else math.nan
    if not all(math.isfinite(v) for v in (la, ls, lam)):
        return f"log alpha = {la}, log sigma = {ls}, lambda = {lam}"
    if math.exp(la) < tiny or math.exp(ls) < tiny:
        return f"alpha = exp({la}) or sigma = exp({ls}) underflows"
    if not math.isfinite(back):
        return f"inverse_lambda(lambda(t)) = {back}"
    return None


@functools.lru_cache(maxsize=256)
def _check_finite_cached(schedule, dtype_name: str):
    dtype = jnp.dtype(dtype_name)
    for end, t in (("T", schedule.T), ("t_eps", schedule.t_eps)):
        problem = _finite_problem(schedule, t, dtype)
        if problem is not None:
            return end, t, problem
    with jax.ensure_compile_time_eval():
        lam_T = float(schedule.lambda_(jnp.asarray(schedule.T, dtype)))
        lam_eps = float(schedule.lambda_(jnp.asarray(schedule.t_eps, dtype)))
    if not lam_T < lam_eps:
        return "T", schedule.T, f"lambda(T) = {lam_T} is not below lambda(t_eps) = {lam_eps} (T too close to t_eps)"
    return None


def _unchecked_replace(schedule, **changes):
    """``dataclasses.replace`` without ``__post_init__`` (to probe candidate values)."""
    new = object.__new__(type(schedule))
    for f in dataclasses.fields(schedule):
        object.__setattr__(new, f.name, changes.get(f.name, getattr(schedule, f.name)))
    return new


def _largest_usable(schedule, name: str, lo: float, hi: float, dtype) -> float:
    """Bisect for (about) the largest value of the field ``name`` in ``[lo, hi]`` at which the
    schedule is usable at ``T`` in ``dtype`` (for the error message)."""
    for _ in range(60):
        mid = 0.5 * (lo + hi) if hi / max(lo, 1e-300) < 4 else math.sqrt(lo * hi)
        if _finite_problem(_unchecked_replace(schedule, **{name: mid}), mid, dtype) is None:
            lo = mid
        else:
            hi = mid
    return lo


def _check_finite(schedule, name_of_T: str = "T", lo_of_T: float | None = None, name_of_t_eps: str = "t_eps"):
    """Raise ValueError naming ``name_of_T`` (or ``name_of_t_eps``) if ``schedule`` is not finite on
    ``[t_eps, T]`` in the current compute dtype. Cached per schedule and dtype."""
    dtype = _float_dtype()
    bad = _check_finite_cached(schedule, jnp.dtype(dtype).name)
    if bad is None:
        return
    end, t, problem = bad
    owner = type(schedule).__name__
    name = name_of_T if end == "T" else name_of_t_eps
    hint = ""
    if end == "T" and lo_of_T is not None and "lambda(T)" not in problem:
        # the field setting T is replaced, so t_eps stays put; only for the T end
        try:
            hi = getattr(schedule, name_of_T)
            best = _largest_usable(schedule, name_of_T, lo_of_T, hi, dtype)
            hint = f"; in {jnp.dtype(dtype).name} it must be at most about {best:.9g}"
        except (ValueError, TypeError):  # pragma: no cover - the hint is best effort
            hint = ""
    raise ValueError(
        f"{owner}: {name} = {t!r} is outside the range where the schedule is finite in "
        f"{jnp.dtype(dtype).name} ({problem}){hint}"
    )


def check_times_in_range(schedule, t, name: str = "t", batch_size: int | None = None) -> None:
    """Validate times ``t`` at which ``schedule`` is to be evaluated (e.g. ``add_noise``).

    ``t`` must be a scalar or, when ``batch_size`` is given, of shape ``(batch_size,)``
    (without ``batch_size`` any 1-D shape is accepted); concrete values must be finite and
    in ``[schedule.t_min, schedule.T]`` and > 0, checked after casting to the compute
    dtype, and ``lambda(t)`` must be finite there. Traced values are checked for shape
    only. Raises TypeError/ValueError naming ``name``.
    """
    if isinstance(t, (str, bytes)) or t is None or isinstance(t, bool):
        raise TypeError(f"{name} must be a real number or an array of times; got {type(t).__name__} {t!r}")
    shape = tuple(jnp.shape(t))
    if not (shape == () or (len(shape) == 1 and (batch_size is None or shape[0] == batch_size))):
        want = "() or (B,)" if batch_size is None else f"() or ({batch_size},)"
        raise ValueError(f"{name} must be a scalar or one time per sample, shape {want}; got shape {shape}")
    if isinstance(t, jax.core.Tracer):
        return
    try:
        values = np.asarray(t)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must hold real numbers; got {t!r}") from None
    if values.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers; got dtype {values.dtype}")
    dtype = _float_dtype()
    values = values.astype(dtype)
    T = np.asarray(schedule.T, dtype)
    lo = np.asarray(getattr(schedule, "t_min", 0.0), dtype)
    if not np.all(np.isfinite(values)) or np.any(values <= 0) or np.any(values < lo) or np.any(values > T):
        rng = f"(0, T = {schedule.T}]" if float(lo) == 0 else f"[t_min = {schedule.t_min}, T = {schedule.T}]"
        raise ValueError(f"{name} must lie in {rng}; got min {values.min()}, max {values.max()}")
    with jax.ensure_compile_time_eval():
        lam = np.asarray(schedule.lambda_(jnp.asarray(values, dtype)))
    if not np.all(np.isfinite(lam)):
        raise ValueError(f"{name}: lambda is not finite in {jnp.dtype(dtype).name} at some of the times {values}")


class NoiseSchedule:
    """Interface shared by all schedules. Subclasses define ``log_alpha`` and ``log_sigma``."""

    #: largest time of the schedule (a Python float, static)
    T: float
    #: default end time of sampling (a Python float, static, > 0)
    t_eps: float

    @property
    def t_min(self) -> float:
        """Smallest time the schedule may be evaluated at (inclusive; times must also be > 0).

        ``0.0`` for continuous schedules (only ``t > 0`` is required, lambda is infinite at
        0); ``1/N`` for :class:`VPDiscrete`, whose first training step sits there and
        below which the table would only be extrapolated. Samplers refuse ``t_end`` below it.
        """
        return 0.0

    def log_alpha(self, t):
        raise NotImplementedError

    def log_sigma(self, t):
        raise NotImplementedError

    def alpha(self, t):
        """Signal scale ``alpha_t``."""
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t):
        """Noise scale ``sigma_t``."""
        return jnp.exp(self.log_sigma(t))

    def lambda_(self, t):
        """Half log-SNR ``lambda_t = log alpha_t - log sigma_t`` (``lambda`` is a Python keyword)."""
        return self.log_alpha(t) - self.log_sigma(t)

    def inverse_lambda(self, lam):
        raise NotImplementedError

    def model_time(self, t):
        """The time value fed to the network at solver time ``t`` (continuous: ``t`` itself)."""
        return t

    def solver_time(self, t_model):
        """Inverse of :meth:`model_time`: the solver time of a network time input."""
        return t_model

    # --- user scale <-> solver scale (identity for VP schedules) -------------------
    def state_scale(self, t):
        """Solver state = user-scale ``x`` times this (EDM: ``alpha_t``; VP and flows: 1)."""
        return 1.0

    def prior_std(self, t):
        """Standard deviation of the user-scale ``x_T`` drawn from ``key`` (VP: 1; EDM: sigma_max)."""
        return 1.0

    def marginal(self, x0, t, eps):
        """``x_t = alpha_t x0 + sigma_t eps`` with ``t`` broadcast over the leading (batch) axis."""
        t = _asarray(t)
        shape = t.shape + (1,) * (jnp.ndim(x0) - t.ndim)
        a = self.alpha(t).reshape(shape)
        s = self.sigma(t).reshape(shape)
        return a * x0 + s * eps


class VPSchedule(NoiseSchedule):
    """Variance preserving: ``alpha_t^2 + sigma_t^2 = 1``; ``log_sigma`` from ``log_alpha``."""

    def log_sigma(self, t):
        return 0.5 * jnp.log(-jnp.expm1(2.0 * self.log_alpha(t)))

    @staticmethod
    def _log_alpha_of_lambda(lam):
        # alpha^2 = 1 / (1 + e^{-2 lam})  =>  log alpha = -0.5 log(1 + e^{-2 lam})
        return -0.5 * jnp.logaddexp(0.0, -2.0 * lam)


def _static_dataclass(cls):
    """A frozen dataclass registered as a pytree with the given leaves; other fields static."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    leaves = getattr(cls, "_leaves", ())
    meta = [f.name for f in dataclasses.fields(cls) if f.name not in leaves]
    return jax.tree_util.register_dataclass(cls, data_fields=list(leaves), meta_fields=meta)


@_static_dataclass
class VPLinear(VPSchedule):
    """Continuous linear VP schedule of score_sde: ``beta(t) = beta_min + t (beta_max - beta_min)``.

    ``log alpha_t = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2``, ``T = 1``.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    T: float = 1.0
    t_eps: float = 1e-3

    def __post_init__(self):
        _set_reals(self, ("beta_min", "beta_max", "T", "t_eps"))
        if not (self.beta_min > 0 and self.beta_max > self.beta_min):
            raise ValueError(
                f"VPLinear needs 0 < beta_min < beta_max, got beta_min={self.beta_min}, beta_max={self.beta_max}"
            )
        if not 0 < self.t_eps < self.T:
            raise ValueError(f"VPLinear needs 0 < t_eps < T, got t_eps={self.t_eps}, T={self.T}")
        _check_finite(self, "T", lo_of_T=self.t_eps)

    def log_alpha(self, t):
        t = _asarray(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def inverse_lambda(self, lam):
        lam = _asarray(lam)
        b0, b1 = self.beta_min, self.beta_max
        tmp = 2.0 * (b1 - b0) * jnp.logaddexp(-2.0 * lam, 0.0)
        return tmp / (jnp.sqrt(b0**2 + tmp) + b0) / (b1 - b0)


@_static_dataclass
class VPCosine(VPSchedule):
    """Continuous cosine schedule of improved DDPM (Nichol & Dhariwal 2021).

    ``log alpha_t = log cos((t + s)/(1 + s) pi/2) - log cos(s/(1 + s) pi/2)``. ``T = 0.9946``:
    beyond it lambda collapses (DPM-Solver App. D).
    """

    s: float = 0.008
    T: float = 0.9946
    t_eps: float = 1e-3

    def __post_init__(self):
        _set_reals(self, ("s", "T", "t_eps"))
        if not (0 < self.s < 1):
            raise ValueError(f"VPCosine needs 0 < s < 1, got s={self.s}")
        if not (0 < self.T < 1):
            raise ValueError(f"VPCosine needs 0 < T < 1, got T={self.T}")
        if not 0 < self.t_eps < self.T:
            raise ValueError(f"VPCosine needs 0 < t_eps < T, got t_eps={self.t_eps}, T={self.T}")
        _check_finite(self, "T", lo_of_T=self.t_eps)

    def _log_alpha_0(self):
        return math.log(math.cos(self.s / (1.0 + self.s) * math.pi / 2.0))

    def log_alpha(self, t):
        t = _asarray(t)
        return jnp.log(jnp.cos((t + self.s) / (1.0 + self.s) * jnp.pi / 2.0)) - self._log_alpha_0()

    def inverse_lambda(self, lam):
        lam = _asarray(lam)
        log_alpha = self._log_alpha_of_lambda(lam)
        return 2.0 * (1.0 + self.s) / jnp.pi * jnp.arccos(jnp.exp(log_alpha + self._log_alpha_0())) - self.s


def _table(name: str, values) -> np.ndarray:
    """A user table as float64 numpy; TypeError naming ``name`` for non-numeric input."""
    if isinstance(values, (str, bytes)) or values is None:
        raise TypeError(f"{name} must be a 1-D array of numbers; got {type(values).__name__} {values!r}")
    try:
        table = np.asarray(values)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a 1-D array of numbers; got {values!r} ({e})") from None
    if table.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be a 1-D array of numbers; got dtype {table.dtype}")
    return table.astype(np.float64)


def _interp(x, xp, fp):
    """Piecewise-linear interpolation through increasing knots ``xp``, extrapolated linearly."""
    n = xp.shape[0]
    i = jnp.clip(jnp.searchsorted(xp, x, side="left"), 1, n - 1)
    x0, x1 = xp[i - 1], xp[i]
    y0, y1 = fp[i - 1], fp[i]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


#: diffusers ``prediction_type`` -> dpmjax ``model_type``
DIFFUSERS_PREDICTION_TYPES = {"epsilon": "noise", "sample": "x_start", "v_prediction": "v"}

_NAMED_DEFAULTS = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "squaredcos_cap_v2": (None, None),
}


@_static_dataclass
class VPDiscrete(VPSchedule):
    """Discrete-time (DDPM-style) schedule of ``N`` training steps, seen as a continuous one.

    Knot ``i = 0..N-1`` sits at ``t_i = (i + 1)/N`` with
    ``log alpha_i = 0.5 log(alphas_cumprod_i)``; ``log_alpha(t)`` is piecewise linear
    through the knots and extrapolated linearly; ``T = 1``, ``t_eps = 1/N``. The network
    is fed the training-step index ``t N - 1`` (0 at ``t = 1/N``, ``N - 1`` at ``t = 1``).

    Trailing entries with ``lambda < lambda_min`` (default -5.1) are dropped at
    construction (this stabilises cosine-like tables); ``N`` is the kept length.

    Build it with :meth:`from_betas`, :meth:`from_alphas_cumprod`, :meth:`from_named`
    or :meth:`from_diffusers_config`; the constructor takes the (kept) ``log_alphas`` table.

    Example::

        betas = np.linspace(1e-4, 0.02, 1000)
        schedule = dpmjax.VPDiscrete.from_betas(betas)
    """

    _leaves = ("t_knots", "log_alphas")

    t_knots: Any
    log_alphas: Any
    N: int
    T: float = 1.0
    t_eps: float = 0.0

    def __post_init__(self):
        # Runs on every unflatten too (then the tables may be tracers): static fields only.
        if isinstance(self.N, bool) or not isinstance(self.N, numbers.Integral) or self.N < 2:
            raise TypeError(f"VPDiscrete: N must be an int >= 2; got {self.N!r}")
        _set_reals(self, ("T", "t_eps"))
        if not self.T == 1.0:
            raise ValueError(f"VPDiscrete: T must be 1.0 (the last training step); got T={self.T}")
        if not self.t_min * (1 - 1e-12) <= self.t_eps < self.T:
            raise ValueError(
                f"VPDiscrete: t_eps must be in [1/N = {self.t_min}, T = {self.T}) (the table starts at "
                f"t = 1/N); got t_eps={self.t_eps}"
            )

    @property
    def t_min(self) -> float:
        """``1/N``: the first training step; the schedule is never evaluated below it."""
        return 1.0 / self.N

    @classmethod
    def from_log_alphas(cls, log_alphas, *, lambda_min: float | None = -5.1) -> "VPDiscrete":
        """From the table ``log alpha_i = 0.5 log(alphas_cumprod_i)`` (float64 or float32)."""
        la = _table("log_alphas", log_alphas)
        if lambda_min is not None:
            lambda_min = _real("VPDiscrete", "lambda_min", lambda_min)
        if la.ndim != 1 or la.shape[0] < 2:
            raise ValueError(f"log_alphas must be a 1-D table of at least 2 entries, got shape {la.shape}")
        if not np.all(np.isfinite(la)) or np.any(la >= 0):
            raise ValueError("log_alphas must be finite and < 0 (alphas_cumprod in (0, 1))")
        if np.any(np.diff(la) >= 0):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        if lambda_min is not None:
            lam = la - 0.5 * np.log(-np.expm1(2.0 * la))
            keep = int(np.sum(lam >= lambda_min))
            if keep < 2:
                raise ValueError(f"lambda_min={lambda_min} keeps fewer than 2 entries of the table")
            la = la[:keep]
        n = la.shape[0]
        dtype = _float_dtype()
        # The table as the solver will see it: every entry < 0 (alpha < 1) and lambda finite.
        la_d = np.asarray(la, dtype)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            lam_d = la_d - 0.5 * np.log(-np.expm1(2.0 * la_d))
        if np.any(la_d >= 0) or not np.all(np.isfinite(lam_d)) or np.any(np.exp(la_d) < np.finfo(dtype).tiny):
            raise ValueError(
                f"log_alphas: the table is not usable in {np.dtype(dtype).name} (alphas_cumprod rounds to 0 or 1 "
                "somewhere, so lambda is infinite); use a table whose entries stay inside (0, 1) in that dtype"
            )
        t_knots = jnp.asarray((np.arange(n) + 1.0) / n, dtype=dtype)
        return cls(t_knots=t_knots, log_alphas=jnp.asarray(la, dtype=dtype), N=n, T=1.0, t_eps=1.0 / n)

    @classmethod
    def from_betas(cls, betas, *, lambda_min: float | None = -5.1) -> "VPDiscrete":
        """From a beta table: ``log alpha_i = 0.5 cumsum(log(1 - beta))_i``."""
        b = _table("betas", betas)
        if b.ndim != 1 or np.any(b <= 0) or np.any(b >= 1):
            raise ValueError("betas must be a 1-D array with every entry in (0, 1)")
        return cls.from_log_alphas(0.5 * np.cumsum(np.log1p(-b)), lambda_min=lambda_min)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod, *, lambda_min: float | None = -5.1) -> "VPDiscrete":
        """From ``alphas_cumprod`` (``\\bar alpha_i``): ``log alpha_i = 0.5 log(\\bar alpha_i)``."""
        ac = _table("alphas_cumprod", alphas_cumprod)
        if ac.ndim != 1 or np.any(ac <= 0) or np.any(ac >= 1):
            raise ValueError("alphas_cumprod must be a 1-D array with every entry in (0, 1)")
        return cls.from_log_alphas(0.5 * np.log(ac), lambda_min=lambda_min)

    @classmethod
    def from_named(
        cls,
        name: str,
        num_train_timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        *,
        lambda_min: float | None = -5.1,
    ) -> "VPDiscrete":
        """The common beta tables: ``"linear"``, ``"scaled_linear"`` (Stable Diffusion), ``"squaredcos_cap_v2"``."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, one of {sorted(_NAMED_DEFAULTS)}; got {type(name).__name__} {name!r}")
        if name not in _NAMED_DEFAULTS:
            raise ValueError(f"name must be one of {sorted(_NAMED_DEFAULTS)}, got {name!r}")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, numbers.Integral):
            raise TypeError(f"num_train_timesteps must be an int; got {type(num_train_timesteps).__name__} "
                            f"{num_train_timesteps!r}")
        n = int(num_train_timesteps)
        if n < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        d0, d1 = _NAMED_DEFAULTS[name]
        b0 = d0 if beta_start is None else _real("VPDiscrete.from_named", "beta_start", beta_start)
        b1 = d1 if beta_end is None else _real("VPDiscrete.from_named", "beta_end", beta_end)
        if name != "squaredcos_cap_v2" and not 0 < b0 <= b1 < 1:
            raise ValueError(f"VPDiscrete.from_named: needs 0 < beta_start <= beta_end < 1, got beta_start={b0}, "
                             f"beta_end={b1}")
        if name == "linear":
            betas = np.linspace(b0, b1, n, dtype=np.float64)
        elif name == "scaled_linear":
            betas = np.linspace(b0**0.5, b1**0.5, n, dtype=np.float64) ** 2
        else:

            def abar(u):
                return np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2

            i = np.arange(n, dtype=np.float64)
            betas = np.minimum(1.0 - abar((i + 1) / n) / abar(i / n), 0.999)
        return cls.from_betas(betas, lambda_min=lambda_min)

    @classmethod
    def from_diffusers_config(
        cls, config: Mapping[str, Any] | str | os.PathLike, *, lambda_min: float | None = None
    ) -> tuple["VPDiscrete", str]:
        """The table of a diffusers ``scheduler_config.json`` (a Mapping, a path to the file or
        to a directory holding it): a thin alias of :func:`dpmjax.from_diffusers`, whose
        schedule it returns with the ``model_type`` of the config's ``prediction_type``.

        diffusers keeps the whole table (``lambda_min=None``) and builds it in float32, as
        this does. Flow and EDM configs have no discrete VP table: use :func:`dpmjax.from_diffusers`.
        """
        if not isinstance(config, (str, os.PathLike, Mapping)):
            raise TypeError(f"config must be a Mapping or a path (str or os.PathLike), got {type(config).__name__}")
        from .diffusers import from_diffusers  # the mapping lives there; it imports this module

        name = None if isinstance(config, Mapping) and "_class_name" in config else "DPMSolverMultistepScheduler"
        if not isinstance(config, Mapping):
            name = None
            from .diffusers import _read

            if "_class_name" not in _read(config)[0]:
                name = "DPMSolverMultistepScheduler"
        schedule, options = from_diffusers(config, 1, scheduler=name)
        if not isinstance(schedule, cls):
            raise ValueError(f"this config describes a {type(schedule).__name__} schedule, not a discrete VP "
                             "table: use dpmjax.from_diffusers")
        if lambda_min is not None:
            schedule = cls.from_log_alphas(np.asarray(schedule.log_alphas, np.float64), lambda_min=lambda_min)
        return schedule, options["model_type"]

    def log_alpha(self, t):
        t = jnp.asarray(t, dtype=self.log_alphas.dtype)
        return _interp(t, self.t_knots, self.log_alphas)

    def inverse_lambda(self, lam):
        lam = jnp.asarray(lam, dtype=self.log_alphas.dtype)
        log_alpha = self._log_alpha_of_lambda(lam)
        # log_alphas decreases with t: interpolate t against the reversed (increasing) table.
        return _interp(log_alpha, self.log_alphas[::-1], self.t_knots[::-1])

    def model_time(self, t):
        """The training-step index ``t N - 1`` (deliberate, right for any N: docs/algorithms.md "Noise schedules")."""
        return t * self.N - 1.0

    def solver_time(self, t_model):
        """Inverse of :meth:`model_time`: ``(index + 1) / N``."""
        return (t_model + 1.0) / self.N


@_static_dataclass
class EDM(NoiseSchedule):
    """Karras et al. (2022) variance-exploding schedule, solved through its VP equivalent.

    The time variable is the VE noise level ``t = sigma``: ``x_ve = x0 + sigma eps``.
    Dividing by ``sqrt(1 + sigma^2)`` gives a VP process with ``alpha = 1/sqrt(1 + sigma^2)``,
    ``sigma_vp = sigma alpha`` and ``lambda = -log sigma``, which is what DPM-Solver
    integrates. Users pass and receive VE-scale arrays (``x_T ~ N(0, sigma_max^2)``); the
    network is fed VE-scale inputs ``x_ve = x_vp / alpha`` and the time ``sigma``
    (``model_type="edm"``: a denoiser ``D(x; sigma)`` predicting x0; ``"noise"``, ``"x_start"``
    also work). ``sigma_data`` is recorded for networks' preconditioning; the sampler
    does not need it.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5

    def __post_init__(self):
        _set_reals(self, ("sigma_min", "sigma_max", "sigma_data"))
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"EDM needs 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"
            )
        if not self.sigma_data > 0:
            raise ValueError(f"EDM needs sigma_data > 0, got sigma_data={self.sigma_data}")
        _check_finite(self, "sigma_max", lo_of_T=self.sigma_min, name_of_t_eps="sigma_min")

    @property
    def T(self):
        return float(self.sigma_max)

    @property
    def t_eps(self):
        return float(self.sigma_min)

    def log_alpha(self, t):
        t = _asarray(t)
        return -0.5 * jnp.log1p(t**2)

    def log_sigma(self, t):
        t = _asarray(t)
        return jnp.log(t) - 0.5 * jnp.log1p(t**2)

    def lambda_(self, t):
        return -jnp.log(_asarray(t))

    def inverse_lambda(self, lam):
        return jnp.exp(-_asarray(lam))

    def state_scale(self, t):
        return self.alpha(t)

    def prior_std(self, t):
        return t


@_static_dataclass
class RectifiedFlow(NoiseSchedule):
    """Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022): ``x_t = (1 - t) x0 + t eps``.

    ``alpha_t = 1 - t``, ``sigma_t = t``, ``lambda_t = log((1 - t)/t)``, inverse
    ``t = sigmoid(-lambda)``. lambda is infinite at both ends, so sampling runs from
    ``T = 0.999`` to ``t_eps = 1e-3`` by default. Use ``model_type="flow"`` for a velocity
    network ``v = eps - x0`` (then ``x0 = x - t v`` and ``eps = x + (1 - t) v``).

    ``time_scale``: the network is fed ``t * time_scale`` (diffusers' flow models take
    ``sigma * num_train_timesteps``, e.g. 1000); the solver still works in ``t = sigma``.
    """

    T: float = 0.999
    t_eps: float = 1e-3
    time_scale: float = 1.0

    def __post_init__(self):
        _set_reals(self, ("T", "t_eps", "time_scale"))
        if not 0 < self.t_eps < self.T < 1:
            raise ValueError(f"RectifiedFlow needs 0 < t_eps < T < 1, got t_eps={self.t_eps}, T={self.T}")
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise ValueError(f"RectifiedFlow needs a finite time_scale > 0, got {self.time_scale}")
        _check_finite(self, "T", lo_of_T=self.t_eps)

    def log_alpha(self, t):
        return jnp.log1p(-_asarray(t))

    def log_sigma(self, t):
        return jnp.log(_asarray(t))

    def inverse_lambda(self, lam):
        return jax.nn.sigmoid(-_asarray(lam))

    def model_time(self, t):
        """``t * time_scale``: the time value the network is fed."""
        return t * self.time_scale

    def solver_time(self, t_model):
        """Inverse of :meth:`model_time`: ``t_model / time_scale``."""
        return t_model / self.time_scale


# --------------------------------------------------------------------------- model types

#: The network output types (``model_type``) each kind of schedule takes. ``"flow"``
#: (``v = eps - x0``) is the velocity of ``x_t = (1 - t) x0 + t eps`` and exists only for a
#: rectified flow; ``"edm"`` is the denoiser ``D(x; sigma)`` of the EDM parameterisation.
#: ``"v"`` (``alpha eps - sigma x0``) and ``"score"`` (``grad log p_t(x)``) are converted
#: with the schedule's own ``alpha`` and ``sigma`` (:mod:`dpmjax.models`), which are those of
#: the network's input for the VP schedules and rectified flows; an EDM network sees
#: variance-exploding inputs, on which the solver's VP ``alpha`` and ``sigma`` would give a
#: different ``v`` and score, so EDM takes the types whose values do not depend on the scale.
_SCHEDULE_MODEL_TYPES = (
    (EDM, ("noise", "x_start", "edm")),
    (RectifiedFlow, ("noise", "x_start", "v", "score", "flow")),
)
_VP_MODEL_TYPES = ("noise", "x_start", "v", "score")
_WHY = {
    "flow": "model_type='flow' (v = eps - x0 of x_t = (1 - t) x0 + t eps) needs schedule=dpmjax.RectifiedFlow()",
    "edm": "model_type='edm' (a denoiser D(x; sigma)) needs schedule=dpmjax.EDM()",
}


def model_types_of(schedule) -> tuple:
    """The ``model_type`` values that go with ``schedule`` (see ``_SCHEDULE_MODEL_TYPES``)."""
    for cls, types in _SCHEDULE_MODEL_TYPES:
        if isinstance(schedule, cls):
            return types
    return _VP_MODEL_TYPES


def check_model_type(schedule, model_type) -> str:
    """Raise ``ValueError`` unless ``model_type`` goes with ``schedule``: the one rule that
    :func:`dpmjax.sample`, :func:`dpmjax.solver` and :func:`dpmjax.compute_ems` share.
    (``model_type`` must already be one of :data:`dpmjax.MODEL_TYPES`.)"""
    allowed = model_types_of(schedule)
    if model_type not in allowed:
        why = _WHY.get(model_type)
        if why is None:
            why = (f"model_type={model_type!r} is not defined for {type(schedule).__name__}: its network sees "
                   "variance-exploding inputs x = x0 + sigma eps, where the solver's alpha and sigma are those of the "
                   "equivalent VP process")
        raise ValueError(f"{why}; {type(schedule).__name__} takes model_type {', '.join(map(repr, allowed))}")
    return model_type
