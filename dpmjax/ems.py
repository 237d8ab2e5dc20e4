"""Empirical model statistics (EMS) of DPM-Solver-v3: computing, saving and loading them.

DPM-Solver-v3 (Zheng, Lu, Chen, Zhu, NeurIPS 2023, arXiv:2310.13268, Sec. 3 and App. C)
writes the probability-flow ODE in ``lambda = log(alpha/sigma)`` and in the scaled state
``y = x / alpha`` as ``dy/dlambda = -u`` with ``u = e^-lambda eps(x, lambda)`` (the noise
prediction divided by the SNR square root), and splits the right-hand side with three
per-dimension coefficients, the *empirical model statistics* (arrays of the sample's
shape, one per lambda):

* ``l_lambda`` makes the remainder ``N = sigma eps - l x`` as insensitive to ``x`` as
  possible: ``l* = argmin E ||grad_x N||_F^2`` over the noised data, i.e. (for a
  diagonal ``l``) the expected diagonal of the Jacobian ``sigma d eps/d x``,

      l = E_x[ diag(sigma_lambda grad_x eps(x, lambda)) ];

* with ``f = N / alpha = u - l y`` (a noise-free ODE needs only ``f``), ``s_lambda`` and
  ``b_lambda`` fit the total derivative of ``f`` along the ODE by a per-dimension linear
  regression ``f' ~ s f + b``:

      (s, b) = argmin E ||f'(x, lambda) - s f(x, lambda) - b||^2,
      s = Cov(f, f') / Var(f),   b = E f' - s E f,

  with ``f' = df/dlambda = du/dlambda - l' y + l u`` (``dy/dlambda = -u``).

For data that is a single Gaussian ``N(mu, diag(std^2))`` the noise predictor is linear in
``x``; then ``l = 1 / (1 + e^{2 lambda} std^2)``, ``f = -l mu`` is deterministic,
``s`` is not identified (the ridge below makes it 0) and ``b = -l' mu``; with these EMS
the first-order DPM-Solver-v3 step is exact up to its quadrature.

**How they are estimated here** (:func:`compute_ems`). The expectations are over
``x = alpha x0 + sigma eps`` with ``x0`` from the ``data`` you pass (the paper uses
training data) and fresh ``eps ~ N(0, I)`` at every lambda of a uniform grid. Two
passes over the grid:

1. ``l``: Hutchinson's diagonal estimator ``diag(J) = E_v[v * (J v)]`` with Rademacher
   ``v`` (exact for a diagonal Jacobian), one ``jax.jvp`` per sample;
2. ``s, b``: ``f`` and ``f'`` per sample, ``f'`` by one ``jax.linearize`` of
   ``u(y, lambda)`` applied to the ODE tangent ``(-u, 1)`` (the network's time input is
   differentiated through ``schedule.inverse_lambda`` and ``schedule.model_time``);
   ``l' = dl/dlambda`` by second-order finite differences of pass 1's ``l`` on the grid,
   smoothed by an 11-point moving average (``smooth_dl``; the EMS computation published
   for the authors' ScoreSDE example smooths the same way). Means and
   co-moments are merged batch by batch (Chan et al.), never as differences of raw
   second moments. ``s = Cov(f, f') / (Var(f) + ridge (E u^2 + l^2 E y^2))``: the small
   ridge keeps ``s`` at 0 where ``f`` does not vary. (The authors' regression has no ridge;
   at the noisy end, where the noised data are nearly Gaussian and ``Var(f) -> 0``, it is
   ill-posed: on the 2-D ring of ``benchmarks/accuracy.py`` it gives ``|s|`` up to about
   1e4 on the first grid points, where the ridge gives the exact statistics' ``s = 0``.)

Cost: ``2 n_lambdas n_samples`` Jacobian-vector products (each about two to three
forward passes of the network), in batches of ``batch_size``: linear in both, and
independent of the sample dimension beyond the network's own cost. The authors'
CIFAR-10 statistics use 1201 lambdas x 4096 samples (about 9.8 million JVPs).

File layout (:func:`save_ems`, :func:`load_ems`): the authors' ``l.npz`` (key ``l``)
and ``sb.npz`` (keys ``s``, ``b``), arrays of shape ``(n + 1, *sample_shape)`` on
``n + 1`` uniformly spaced lambdas from ``lambda(t_start)`` to ``lambda(t_end)``. The
authors store no grid (their sampler rebuilds it from its own ``t_start``/``t_end``);
``save_ems`` adds ``lambdas.npy`` beside them, which their loader ignores.
"""

from __future__ import annotations

import functools
import numbers
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import _cache
from . import models as _models
from .schedules import NoiseSchedule, check_model_type

__all__ = ["EMS", "compute_ems", "save_ems", "load_ems", "degenerate_ems"]


class EMS(NamedTuple):
    """Empirical model statistics on a uniform lambda grid (a pytree).

    * ``lambdas``: ``(n + 1,)`` increasing half-logSNR values, ``lambdas[0]`` at the
      sampler's start (``t_start``, most noise), ``lambdas[-1]`` at its end;
    * ``l``, ``s``, ``b``: ``(n + 1, *sample_shape)``, one array of the sample's shape
      (no batch axis) per lambda.
    """

    lambdas: Any
    l: Any
    s: Any
    b: Any

    @property
    def sample_shape(self) -> tuple:
        return tuple(np.shape(self.l)[1:])


def degenerate_ems(schedule: NoiseSchedule, sample_shape, *, n: int = 1200, t_start=None, t_end=None) -> EMS:
    """``l = 1, s = b = 0``: DPM-Solver-v3 then integrates the data prediction (the
    paper's App. A.2; the authors' ``degenerated=True``), on ``n + 1`` lambdas."""
    lambdas = _grid(schedule, t_start, t_end, _int("n", n, 1) + 1)
    shape = (n + 1,) + tuple(int(d) for d in sample_shape)
    dtype = lambdas.dtype
    return EMS(lambdas, jnp.ones(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


# --------------------------------------------------------------------------- checks


def _int(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}; got {value}")
    return int(value)


def _grid(schedule, t_start, t_end, n_lambdas):
    """``n_lambdas`` uniformly spaced lambdas from ``lambda(t_start)`` to ``lambda(t_end)``."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a dpmjax.NoiseSchedule; got {type(schedule).__name__}")
    from .solvers import resolve_times  # the one check of an interval (a discrete table starts at t_min = 1/N)

    t_start, t_end = resolve_times(schedule, t_start, t_end)
    dtype = jnp.result_type(float)
    lo = schedule.lambda_(jnp.asarray(t_start, dtype))
    hi = schedule.lambda_(jnp.asarray(t_end, dtype))
    return jnp.linspace(lo, hi, n_lambdas, dtype=dtype)


def check_ems(ems, sample_shape=None, *, where="ems"):
    """Validate an :class:`EMS` (concrete lambdas; shapes; finiteness of concrete arrays)."""
    if not isinstance(ems, EMS):
        raise TypeError(f"{where} must be a dpmjax.EMS (see dpmjax.compute_ems / load_ems); got {type(ems).__name__}")
    if isinstance(ems.lambdas, jax.core.Tracer):
        raise ValueError(f"{where}.lambdas must be concrete (the time grid is snapped to it before tracing)")
    lam = np.asarray(ems.lambdas, np.float64)
    if lam.ndim != 1 or lam.shape[0] < 2:
        raise ValueError(f"{where}.lambdas must have shape (n + 1,) with n >= 1; got {lam.shape}")
    d = np.diff(lam)
    if not np.all(np.isfinite(lam)) or np.any(d <= 0):
        raise ValueError(f"{where}.lambdas must be finite and strictly increasing")
    if not np.allclose(d, d.mean(), rtol=1e-4, atol=0):
        raise ValueError(f"{where}.lambdas must be uniformly spaced (the EMS grid of DPM-Solver-v3)")
    for name in ("l", "s", "b"):
        arr = getattr(ems, name)
        shp = tuple(np.shape(arr))
        if len(shp) < 1 or shp[0] != lam.shape[0]:
            raise ValueError(f"{where}.{name} must have shape (n + 1, *sample_shape) with n + 1 = {lam.shape[0]}; "
                             f"got {shp}")
        if shp[1:] != tuple(np.shape(ems.l)[1:]):
            raise ValueError(f"{where}.{name} has sample shape {shp[1:]}, but {where}.l has "
                             f"{tuple(np.shape(ems.l)[1:])}")
        if not isinstance(arr, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(arr))):
            raise ValueError(f"{where}.{name} has non-finite entries")
    if sample_shape is not None and tuple(np.shape(ems.l)[1:]) != tuple(sample_shape):
        raise ValueError(
            f"{where} sample shape {tuple(np.shape(ems.l)[1:])} does not match the sample shape {tuple(sample_shape)} "
            "(EMS arrays are (n + 1, *x.shape[1:]))"
        )
    return ems


# --------------------------------------------------------------------------- computing


def _bcast(a, x):
    a = jnp.asarray(a)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _u_fn(net, schedule):
    """``u(y, lambda) = e^-lambda eps(alpha y, t(lambda))`` for a batch ``y`` and a scalar
    lambda, through the one model-call path ``net`` (:class:`dpmjax.models.Network`)."""

    def u(y, lam):
        t = schedule.inverse_lambda(lam)
        alpha, sigma, sc = schedule.alpha(t), schedule.sigma(t), schedule.state_scale(t)
        x = alpha * y
        t_model = jnp.broadcast_to(schedule.model_time(t), (y.shape[0],)).astype(y.dtype)
        eps = _models.to_noise(net(x / sc, t_model, alpha, sigma, sc), x, alpha, sigma, net.out_type)
        return jnp.exp(-lam) * eps

    return u


def _chan(acc, batch_stats):
    """Merge (count, means (k, ...), co-moments (k, k, ...)) of two sample sets (Chan et al. 1979)."""
    n_a, mean_a, m2_a = acc
    n_b, mean_b, m2_b = batch_stats
    n = n_a + n_b
    w = n_b / jnp.maximum(n, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + w * delta
    m2 = m2_a + m2_b + (n_a * w) * delta[:, None] * delta[None, :]
    return n, mean, m2


def _batch_stats(zs, mask):
    """Count, means and co-moments of the variables ``zs`` (each ``(B, ...)``) over rows with ``mask``."""
    z = jnp.stack(zs)  # (k, B, ...)
    m = _bcast(mask.astype(z.dtype), z[0])[None]
    n = jnp.sum(mask).astype(z.dtype)
    mean = jnp.sum(z * m, axis=1) / jnp.maximum(n, 1.0)
    c = (z - mean[:, None]) * m
    m2 = jnp.sum(c[:, None] * c[None, :], axis=2)
    return n, mean, m2


def _ems_rows(refs, static, params, schedule, data, condition, uncond, g_scale, key, lams, rows, l_rows, dl_rows):
    """Statistics at the lambdas ``lams`` (rows ``rows`` of the grid): ``which = "l"`` gives
    the mean of ``sigma v * (d eps/dx v)``; ``"sb"`` gives ``(mean f, mean f', var f,
    cov(f, f'), scale)`` for the given ``l`` and ``l'`` rows. ``condition`` and ``uncond``
    have one entry per data point (or are ``None``)."""
    model_fn, classifier_fn = (None if r is None else r() for r in refs)
    model_type, kind, which, n_samples, batch_size = static
    dtype = lams.dtype
    n_batches = -(-n_samples // batch_size)
    K = data.shape[0]

    def one_lambda(args):
        lam, row, l, dl = args
        k_row = jax.random.fold_in(key, row)
        perm = jax.random.permutation(jax.random.fold_in(k_row, 0), K)[:n_samples]
        perm = jnp.concatenate([perm, jnp.zeros((n_batches * batch_size - n_samples,), perm.dtype)])

        def batch(acc, b):
            idx = jax.lax.dynamic_slice_in_dim(perm, b * batch_size, batch_size)
            mask = b * batch_size + jnp.arange(batch_size) < n_samples
            x0 = data[idx].astype(dtype)
            pick = functools.partial(jax.tree_util.tree_map, lambda c: c[idx])
            net = _models.Network(model_fn, params, None if condition is None else pick(condition), kind,
                                  None if uncond is None else pick(uncond), jnp.asarray(g_scale, dtype), classifier_fn,
                                  model_type, dtype)
            u_fn = _u_fn(net, schedule)
            kb = jax.random.fold_in(k_row, b + 1)
            k_eps, k_v = jax.random.split(kb)
            eps = jax.random.normal(k_eps, x0.shape, dtype)
            y = x0 + jnp.exp(-lam) * eps  # x / alpha = x0 + (sigma/alpha) eps
            if which == "l":
                v = jax.random.rademacher(k_v, x0.shape, dtype)
                # d u/d y = (sigma/alpha) d eps/dx * alpha = sigma d eps/dx: the Jacobian of N
                _, jv = jax.jvp(lambda yy: u_fn(yy, lam), (y,), (v,))
                stats = _batch_stats([v * jv], mask)
            else:
                u, lin = jax.linearize(u_fn, y, lam)
                du = lin(-u, jnp.ones_like(lam))  # total derivative along dy/dlambda = -u
                f = u - l * y
                f1 = du - dl * y + l * u
                stats = _batch_stats([f, f1, u, l * y], mask)
            return _chan(acc, stats), None

        k = 1 if which == "l" else 4
        shape = data.shape[1:]
        acc0 = (jnp.zeros((), dtype), jnp.zeros((k,) + shape, dtype), jnp.zeros((k, k) + shape, dtype))
        (n, mean, m2), _ = jax.lax.scan(batch, acc0, jnp.arange(n_batches))
        if which == "l":
            return mean[0]
        var = m2 / n
        scale = var[2, 2] + mean[2] ** 2 + var[3, 3] + mean[3] ** 2  # E u^2 + E (l y)^2
        return mean[0], mean[1], var[0, 0], var[0, 1], scale

    return jax.lax.map(one_lambda, (lams, rows, l_rows, dl_rows))


def _derivative(v, d):
    """``dv/dlambda`` on a uniform grid: central differences, second-order one-sided at the ends."""
    inner = (v[2:] - v[:-2]) / (2.0 * d)
    first = (-3.0 * v[0] + 4.0 * v[1] - v[2]) / (2.0 * d)
    last = (3.0 * v[-1] - 4.0 * v[-2] + v[-3]) / (2.0 * d)
    return jnp.concatenate([first[None], inner, last[None]], 0)


def _moving_average(v, w):
    """The mean of ``v[j]`` over ``|j - i| <= w`` along axis 0, the window truncated at the
    ends (``w = 0``: ``v`` itself)."""
    if w == 0:
        return v
    n = v.shape[0]
    c = jnp.concatenate([jnp.zeros((1,) + v.shape[1:], v.dtype), jnp.cumsum(v, 0)], 0)
    i = np.arange(n)
    lo, hi = np.maximum(i - w, 0), np.minimum(i + w, n - 1) + 1
    count = jnp.asarray((hi - lo).reshape((n,) + (1,) * (v.ndim - 1)), v.dtype)
    return (c[hi] - c[lo]) / count


def compute_ems(
    model_fn: Callable,
    params: Any,
    key: jax.Array,
    shape,
    *,
    schedule: NoiseSchedule,
    data,
    model_type: str = "noise",
    condition: Any = None,
    guidance=None,
    t_start: Optional[float] = None,
    t_end: Optional[float] = None,
    n_lambdas: int = 1201,
    n_samples: Optional[int] = None,
    batch_size: int = 256,
    lambdas_per_call: int = 64,
    ridge: float = 1e-6,
    smooth_dl: int = 5,
    progress: bool = False,
) -> EMS:
    """Estimate DPM-Solver-v3's empirical model statistics ``l, s, b`` of a model.

    See the module docstring for the estimators (paper Sec. 3.1-3.2, App. C).

    Args:
      model_fn: ``model_fn(params, x, t)``, ``t`` of shape ``(B,)`` holding
        ``schedule.model_time(t)``, as for :func:`dpmjax.sample`; differentiable in ``x``
        and ``t`` (forward mode).
      params: the model's parameters.
      key: PRNG key: the noise ``eps``, the Rademacher probes and the data subsets are
        drawn from ``fold_in(key, grid row)``; same key, same statistics, whatever
        ``lambdas_per_call`` or ``progress``.
      shape: the shape of one sample (no batch axis); the EMS arrays are
        ``(n_lambdas, *shape)``.
      schedule: the model's noise schedule.
      data: ``(K, *shape)`` data samples ``x0`` (user scale), noised at every lambda as
        ``x = alpha x0 + sigma eps``. Use training data, as the paper does (the
        statistics are expectations under the model's marginals, which noised training
        data approximates).
      model_type: the network's output type (:data:`dpmjax.MODEL_TYPES`).
      condition: the network's condition for each data point (a pytree whose leaves have
        the data's leading axis ``K``, e.g. the training labels); ``None`` for an
        unconditional model.
      guidance: ``None``, :class:`dpmjax.ClassifierFree` (its ``unconditional`` with one
        entry per data point) or :class:`dpmjax.ClassifierGuidance`: statistics of the
        guided model, at the guidance's scale (sample with the same guidance).
      t_start, t_end: the range of sampling the statistics are for (defaults
        ``schedule.T``, ``schedule.t_eps``); the grid is uniform in lambda between them.
        A sampler using these EMS runs on exactly this range.
      n_lambdas: number of grid points ``n + 1`` (default 1201: the authors' CIFAR-10 grid).
      n_samples: data points per lambda (default ``K``: all of them; fewer: a random
        subset per lambda).
      batch_size: samples per network call.
      lambdas_per_call: grid rows per compiled call (one ``lax.map``); bounds the progress
        bar's granularity, not the result.
      ridge: relative ridge of the ``s`` regression (see module docstring).
      smooth_dl: half-width of the moving average applied to ``l' = dl/dlambda`` (the
        finite differences of a Monte Carlo ``l`` are noisy); the default 5 (11 points,
        truncated at the ends), the window of the EMS computation published for the
        authors' ScoreSDE example; 0: none.
      progress: show a ``tqdm`` bar over grid rows (both passes).

    Returns:
      an :class:`EMS`.

    Example::

        gm = dpmjax.GaussianMixture.isotropic(means, 0.3)
        ems = dpmjax.compute_ems(gm.model_fn(schedule), gm, key, (2,), schedule=schedule,
                                 data=gm.sample(key_data, 4096), n_lambdas=501)
    """
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable; got {type(model_fn).__name__}")
    if model_type not in _models.MODEL_TYPES:
        raise ValueError(f"model_type must be one of {', '.join(map(repr, _models.MODEL_TYPES))}; got {model_type!r}")
    if isinstance(schedule, NoiseSchedule):
        check_model_type(schedule, model_type)
    try:
        shape = tuple(int(d) for d in shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple of ints (one sample, no batch axis); got {shape!r}") from None
    n_lambdas = _int("n_lambdas", n_lambdas, 3)
    batch_size = _int("batch_size", batch_size, 1)
    lambdas_per_call = _int("lambdas_per_call", lambdas_per_call, 1)
    data = jnp.asarray(data)
    if data.ndim < 1 or tuple(data.shape[1:]) != shape or data.shape[0] < 2:
        raise ValueError(f"data must have shape (K, *shape) = (K, {', '.join(map(str, shape))}) with K >= 2; "
                         f"got {data.shape}")
    K = data.shape[0]
    n_samples = K if n_samples is None else _int("n_samples", n_samples, 2)
    if n_samples > K:
        raise ValueError(f"n_samples must be <= the number of data points {K}; got {n_samples}")
    batch_size = min(batch_size, n_samples)
    if not (isinstance(ridge, numbers.Real) and ridge >= 0):
        raise ValueError(f"ridge must be a float >= 0; got {ridge!r}")
    smooth_dl = _int("smooth_dl", smooth_dl, 0)
    if smooth_dl >= n_lambdas:
        raise ValueError(f"smooth_dl must be < n_lambdas = {n_lambdas}; got {smooth_dl}")
    lambdas = _grid(schedule, t_start, t_end, n_lambdas)
    if not np.all(np.isfinite(np.asarray(data))):
        raise ValueError("data has non-finite entries")
    dtype = lambdas.dtype
    data = data.astype(dtype)
    rows = jnp.arange(n_lambdas, dtype=jnp.int32)
    kind = _models.check_guidance(K, condition, guidance)
    if condition is not None:
        for leaf in jax.tree_util.tree_leaves(condition):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != K:
                raise ValueError(f"condition leaves must have one entry per data point (leading axis {K}); got shape "
                                 f"{jnp.shape(leaf)}")
    uncond = guidance.unconditional if kind == "cfg" else None
    scale = jnp.asarray(1.0 if guidance is None else guidance.scale, dtype)
    refs = (model_fn, guidance.classifier_fn if kind == "classifier" else None)

    def run(which, l_all, dl_all, bar):
        outs = []
        for lo in range(0, n_lambdas, lambdas_per_call):
            sl = slice(lo, min(lo + lambdas_per_call, n_lambdas))
            rows_fn = _cache.compiled(_ems_rows, refs, (model_type, kind, which, n_samples, batch_size))
            outs.append(rows_fn(params, schedule, data, condition, uncond, scale, key, lambdas[sl], rows[sl],
                                l_all[sl], dl_all[sl]))
            if bar is not None:
                bar.update(sl.stop - sl.start)
        return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, 0), *outs)

    zeros = jnp.zeros((n_lambdas,) + shape, dtype)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * n_lambdas, desc="EMS (l, then s and b)", unit="lambda")
    try:
        l = run("l", zeros, zeros, bar)
        dlam = lambdas[1] - lambdas[0]
        dl = _moving_average(_derivative(l, dlam), smooth_dl)
        mean_f, mean_f1, var_f, cov, scale = run("sb", l, dl, bar)
    finally:
        if bar is not None:
            bar.close()
    s = cov / (var_f + ridge * scale + jnp.finfo(dtype).tiny)
    b = mean_f1 - s * mean_f
    ems = EMS(lambdas, l, s, b)
    for name in ("l", "s", "b"):
        if not bool(jnp.all(jnp.isfinite(getattr(ems, name)))):
            raise FloatingPointError(f"compute_ems: {name} has non-finite entries (the model returned NaN/inf?)")
    return ems


# --------------------------------------------------------------------------- files


EMS_FILES = ("l.npz", "sb.npz", "lambdas.npy")
MANIFEST = "ems.json"


def _npz(**arrays):
    return lambda f: np.savez(f, **arrays)


def _digest(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_ems(directory, ems: EMS) -> None:
    """Write ``ems`` as the directory ``directory``, in the authors' layout plus two files.

    The files: ``l.npz`` (array ``l``) and ``sb.npz`` (``s``, ``b``) as the authors' code
    writes them, ``lambdas.npy`` (the grid, so no schedule is needed to load them) and
    ``ems.json`` (each file's SHA-256, which :func:`load_ems` checks, so files of two
    different computations are never read as one set).

    The set is written as one unit: into a new directory beside ``directory``, renamed
    into place when complete, so a crash or a full disk leaves the previous statistics
    whole and loadable. ``directory`` may be missing (it is created, with its parents)
    or hold a previous set of statistics, which is replaced; a file, or a directory with
    other entries, is refused with ``ValueError`` (nothing but the statistics' own files
    is ever deleted). The files get the permissions the umask gives new files.
    """
    import json

    from ._files import replace_directory

    check_ems(ems)
    if isinstance(directory, bool) or not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"save_ems: directory must be a str or os.PathLike; got {type(directory).__name__}")
    arrays = {"l.npz": {"l": np.asarray(ems.l)}, "sb.npz": {"s": np.asarray(ems.s), "b": np.asarray(ems.b)}}
    writers = {name: _npz(**a) for name, a in arrays.items()}
    writers["lambdas.npy"] = lambda f: np.save(f, np.asarray(ems.lambdas), allow_pickle=False)
    digests = {}

    def hashed(name, write):
        def run(f):
            write(f)
            f.flush()
            digests[name] = _digest(f.name)
        return run

    files = {name: hashed(name, w) for name, w in writers.items()}
    files[MANIFEST] = lambda f: f.write(json.dumps({"format": "dpmjax-ems", "version": 1, "sha256": digests},
                                                   indent=2, sort_keys=True).encode("utf-8") + b"\n")
    replace_directory(directory, files, what="save_ems: directory")


def _check_manifest(directory):
    """Refuse a set whose files do not all come from the one :func:`save_ems` call that wrote ``ems.json``."""
    import json

    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return  # the authors' layout (or a set written before the manifest existed)
    try:
        with open(path, "rb") as f:
            digests = json.loads(f.read().decode("utf-8"))["sha256"]
        if not isinstance(digests, dict):
            raise TypeError("'sha256' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"EMS manifest {path} is unreadable ({type(e).__name__}: {e})") from None
    for name in EMS_FILES:
        file = os.path.join(directory, name)
        if name not in digests or not os.path.isfile(file):
            raise ValueError(f"{directory} is an incomplete EMS set: {MANIFEST} lists {sorted(digests)}, the directory "
                             f"has {sorted(n for n in EMS_FILES if os.path.isfile(os.path.join(directory, n)))}")
        if _digest(file) != digests[name]:
            raise ValueError(f"{file} is not the file {MANIFEST} was written with: {directory} mixes files of "
                             "different EMS computations; write the set again with dpmjax.save_ems")


def _load_npz(path, keys):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EMS file {path} does not exist (the layout is l.npz with 'l', sb.npz with 's' "
                                "and 'b')")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
    except Exception as e:  # zipfile.BadZipFile, OSError, pickled data ...
        raise ValueError(f"EMS file {path} is not a readable .npz archive: {e}") from None
    with z:
        missing = [k for k in keys if k not in z.files]
        if missing:
            raise ValueError(f"EMS file {path} lacks the arrays {missing}; it holds {z.files}")
        try:
            return [np.asarray(z[k]) for k in keys]
        except Exception as e:
            raise ValueError(f"EMS file {path}: cannot read its arrays: {e}") from None


def load_ems(directory, schedule: Optional[NoiseSchedule] = None, *, t_start=None, t_end=None) -> EMS:
    """Read EMS written by :func:`save_ems` or by the authors' code.

    The grid is ``lambdas.npy`` when present; otherwise (the authors' files) it is
    rebuilt as they do: ``n + 1`` uniform lambdas from ``lambda(t_start)`` to
    ``lambda(t_end)`` of ``schedule`` (defaults ``schedule.T``, ``schedule.t_eps``,
    which for a discrete schedule is the authors' ``1/N``), so ``schedule`` is then
    required and ``t_start``/``t_end`` must be those the statistics were computed for.
    When both are available they must agree.
    """
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"load_ems: {directory} is not a directory (EMS are a directory of l.npz, sb.npz, "
                         "lambdas.npy)")
    _check_manifest(directory)
    (l,) = _load_npz(os.path.join(directory, "l.npz"), ["l"])
    s, b = _load_npz(os.path.join(directory, "sb.npz"), ["s", "b"])
    grid_path = os.path.join(directory, "lambdas.npy")
    lambdas = None
    if os.path.isfile(grid_path):
        try:
            lambdas = np.load(grid_path, allow_pickle=False)
        except Exception as e:
            raise ValueError(f"EMS file {grid_path} is not a readable .npy array: {e}") from None
        if lambdas.ndim != 1 or lambdas.shape[0] < 2 or lambdas.dtype.kind not in "iuf":
            raise ValueError(f"EMS file {grid_path} must hold a 1-D grid of at least 2 real lambdas; got shape "
                             f"{lambdas.shape}, dtype {lambdas.dtype}")
        if l.ndim < 1 or lambdas.shape[0] != l.shape[0]:
            raise ValueError(f"EMS file {grid_path} holds {lambdas.shape[0]} lambdas but l.npz holds "
                             f"{l.shape[0] if l.ndim else 0} rows; the set is inconsistent")
    dtype = jnp.result_type(float)
    if schedule is not None:
        rebuilt = np.asarray(_grid(schedule, t_start, t_end, l.shape[0] if l.ndim else 1), np.float64)
        if lambdas is not None:
            if lambdas.shape != rebuilt.shape or not np.allclose(lambdas, rebuilt, rtol=1e-5, atol=1e-5):
                raise ValueError(
                    f"{grid_path} spans lambda [{lambdas[0]:.6g}, {lambdas[-1]:.6g}] but schedule with "
                    f"t_start={t_start}, "
                    f"t_end={t_end} gives [{rebuilt[0]:.6g}, {rebuilt[-1]:.6g}]"
                )
        else:
            lambdas = rebuilt
    elif lambdas is None:
        raise ValueError(f"{directory} holds no lambdas.npy (the authors' layout): pass schedule= (and t_start/t_end "
                         "if the statistics were not computed for the schedule's default range)")
    ems = EMS(jnp.asarray(lambdas, dtype), jnp.asarray(l, dtype), jnp.asarray(s, dtype), jnp.asarray(b, dtype))
    try:
        return check_ems(ems, where=f"EMS in {directory}")
    except (TypeError, ValueError) as e:
        raise ValueError(str(e)) from None
