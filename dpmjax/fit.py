"""Time steps fitted to the model at hand (dynamic programming over a candidate grid).

Fixed grids (logSNR, time-uniform, Karras) are compromises. Following the idea of
geometry-inspired time scheduling (GITS, Chen et al. 2024, arXiv:2405.11326), we

1. solve the probability-flow ODE accurately for a few starting noises (reference
   trajectories, ``fine_steps`` small steps) and keep the states ``x_j`` on a
   candidate grid ``tau_0 > ... > tau_n`` (uniform in lambda), with the model
   outputs ``m_j`` there;
2. measure, for every admissible step ``tau_i -> tau_j`` of the *chosen* multistep
   solver (with its history points ``tau_k``, ``tau_k2``), the one-step error of the
   update started from the reference: ``e = RMS(A x_i + c0 m_i + c1 m_k + c2 m_k2 - x_j)``.
   The update is linear, so all these errors come from one Gram matrix of the
   ``x_j, m_j`` -- no model evaluation beyond the reference run;
3. choose the ``steps``-edge path from ``tau_0`` to ``tau_n`` that minimises the
   accumulated one-step error, by dynamic programming whose state is the last
   ``order`` grid indices (the solver's history), with the solver's own per-step
   orders (warm-up, ``lower_order_final``);
4. refine by gradient descent (Adam) on the *global* error, the RMS distance between the
   solver's end points and the reference end points over the fitting trajectories
   (LD3, Tong et al. 2025, arXiv:2405.15506), differentiating through the compiled
   sampler; it starts from the best of the DP grid and the fixed grids and keeps a grid
   only if it lowers that error;
5. with ``model_times=True`` (the default), fit in the same refinement the time given to
   the network at each evaluation, as a shift in lambda from the step's own time (the
   time-step tuner of Xia et al. 2024, arXiv:2310.09469: "condition the network on a new
   timestep"). The solver's formulas keep the grid's times; only the model's input
   changes, so a biased model output at a coarse step is corrected where it arises.

Step 4 matters on multimodal data: the one-step errors of step 3 are measured from the
reference states (teacher forcing), but early errors decide which mode a sample reaches,
so the accumulated local error is a poor proxy for the global error there (the benchmark
``benchmarks/fitted_grids.py`` reports both). Step 5 matters there too: with the grid
alone, DPM-Solver++(2M) on the 8-D and 16-D mixtures gains only 12-25% over the best
fixed grid; with the network's times as well it gains 48-69% (see the benchmark).

The result is a :class:`dpmjax.FittedGrid` for :func:`dpmjax.sample`'s ``timesteps=``
argument, fitted for the multistep or UniPC solver named by ``method``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _cache
from . import methods as _methods
from . import models as _models
from . import sampler as _sampler
from . import solvers as _solvers
from . import timesteps as _ts
from . import updates as _up
from ._files import write_file
from .sampler import sample, solve

__all__ = ["FittedGrid", "fit_timesteps", "save_timesteps", "load_timesteps"]

FittedGrid = _ts.FittedGrid

_grid = jax.jit(_ts.time_grid, static_argnums=(1, 4))  # compiled once per (skip type, steps)

#: the default learning rate of the refinement (fit_timesteps, and fit_solver's base grids)
REFINE_LR = 0.05


def _one_step_errors(G, la, ls, order, *, predict_data, solver_type):
    """RMS one-step errors of the order-``order`` multistep update between candidates
    (NumPy, float64: the errors are differences of nearly equal quantities).

    ``G`` is the Gram matrix of ``[x_0..x_n, m_0..m_{n-1}]`` (mean over trajectories of
    inner products / dim). Returns an array with ``order + 1`` axes
    ``(k2, k, i, j)[-order - 1:]``; inadmissible index tuples are ``inf``.
    """
    n1 = la.shape[0]  # n + 1 candidates
    k2, k, i, j = (np.arange(n1).reshape((n1,) + (1,) * (3 - a)) for a in range(4))
    lam = la - ls
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        A, _, (o1, o2, o3) = _up.multistep_coefficients(
            la[i], ls[i], la[j], ls[j], lam[k], lam[k2], predict_data=predict_data, solver_type=solver_type, xp=np
        )
        coefs = {1: o1, 2: o2, 3: o3}[order]
        m = lambda idx: n1 + np.minimum(idx, n1 - 2)  # noqa: E731  (m_n is never used)
        vecs = [(A, i), (coefs[0], m(i)), (coefs[1], m(k)), (coefs[2], m(k2)), (-np.ones_like(A), j)]
        vecs = vecs[: 2 + (order - 1)] + [vecs[-1]]
        sq = 0.0
        for wa, ia in vecs:
            for wb, ib in vecs:
                sq = sq + wa * wb * G[ia, ib]
        err = np.sqrt(np.maximum(sq, 0.0))
    valid = {1: i < j, 2: (i < j) & (k < i)}.get(order, (i < j) & (k < i) & (k2 < k))
    err = np.where(valid & np.isfinite(err), err, np.inf)
    # keep only the axes the order uses: (k2, k, i, j)[-order - 1:]
    idx = (0,) * (3 - order) + (slice(None),) * (order + 1)
    return err[idx]


def _dynamic_program(costs, orders, n1):
    """Minimum accumulated cost path 0 -> n1 - 1 with len(orders) edges (numpy, host)."""
    q = max(orders)
    D = np.full((n1,) * q, np.inf)
    D[(0,) * q] = 0.0
    args = []
    for o in orders:
        C = costs[o]
        C = C.reshape((1,) * (q - o) + C.shape)  # depends on the last o history indices
        total = D[..., None] + C  # axes: a_1..a_q, j
        best = np.argmin(total, axis=0)
        D = np.take_along_axis(total, best[None], axis=0)[0]
        args.append(best)
    final = D[..., n1 - 1]
    if not np.isfinite(final).any():
        raise ValueError("no admissible grid: the one-step errors are not finite (does the model return NaN?)")
    state = list(np.unravel_index(np.argmin(final), final.shape)) + [n1 - 1]
    path = [state[-1]]
    for best in reversed(args):
        prev0 = int(best[tuple(state)])
        state = [prev0] + state[:-1]
        path.append(state[-1])
    return path[::-1], float(np.min(final))


# The refinement's pieces are compiled once per configuration (``static``: the model
# function, the solver's keyword arguments, steps and whether network times are fitted)
# and reused by later calls with new parameters, data or noise.


def _grid_of(schedule, u, tau0, tau1):
    """A decreasing grid from softmax weights ``u`` of its lambda increments (exact ends)."""
    lam0, lam1 = schedule.lambda_(tau0), schedule.lambda_(tau1)
    w = jax.nn.softmax(u)
    lam = lam0 + (lam1 - lam0) * jnp.concatenate([jnp.zeros((1,), w.dtype), jnp.cumsum(w)])
    return schedule.inverse_lambda(lam).at[0].set(tau0).at[-1].set(tau1)


def _model_times_of(schedule, ts, d):
    """Network times: lambda shifts ``d`` from the grid's own, kept inside the interval."""
    lam0, lam1 = schedule.lambda_(ts[0]), schedule.lambda_(ts[-1])
    lam = jnp.clip(schedule.lambda_(ts[:-1]) + d, lam0, lam1)
    return jnp.clip(schedule.inverse_lambda(lam), ts[-1], ts[0])


def _guidance(kind, classifier_fn, uncond, scale):
    """The guidance object of a compiled program's arrays (``kind`` and the classifier static)."""
    if kind == "cfg":
        return _models.ClassifierFree(uncond, scale)
    if kind == "classifier":
        return _models.ClassifierGuidance(classifier_fn, scale)
    return None


def _loss(refs, static, schedule, params, x_start, x_ref, ts, mts, condition, uncond, scale, unroll=False):
    """The global error of the grid ``ts`` (network times ``mts``): RMS distance of its
    samples from ``x_start`` to ``x_ref``. ``unroll``: the sampler as one straight-line
    program (see :func:`dpmjax.sampler._fixed_program`)."""
    model_fn, classifier_fn = (None if r is None else r() for r in refs)
    method, model_type, kind = static[:3]
    grid = FittedGrid(ts, mts)
    if unroll:
        solver = _solvers.build_solver(schedule, method, grid, model_type=_models.output_type(model_type, kind),
                                       sample_shape=x_start.shape[1:])
        x = _sampler._fixed_program(tuple(refs) + (None,), (x_start.shape, model_type, kind, False, None, True),
                                    solver, params, None, x_start, condition, uncond, scale).x
    else:
        x = sample(model_fn, params, None, x_start.shape, schedule=schedule, noise=x_start, method=method, grid=grid,
                   model_type=model_type, condition=condition, guidance=_guidance(kind, classifier_fn, uncond, scale))
    return jnp.sqrt(jnp.mean((x - x_ref) ** 2))


def _start_losses(refs, static, schedule, params, x_start, x_ref, grids, condition, uncond, scale):
    """Global error of each start grid (one compiled program for all of them)."""
    return jax.lax.map(lambda g: _loss(refs, static, schedule, params, x_start, x_ref, g, None, condition, uncond,
                                       scale), grids)


def _refine_optimizer(lr):
    return optax.chain(optax.zero_nans(), optax.adam(lr))


def _refine_step(refs, static, schedule, params, x_start, x_ref, carry, tau0, tau1, condition, uncond, scale):
    """One Adam step on the global error from ``carry = (u, opt_state, best_loss, best_u)``
    (``zero_nans`` drops non-finite gradients). The loss at ``u``, before the update, is
    returned and compared with the best so far. One step per call, driven from Python:
    XLA's CPU backend runs a network's convolutions inside a loop body several times more
    slowly than in straight-line code, and a scan of Adam steps is such a loop."""
    fit_d, lr, unroll = static[3:]
    u, opt_state, best_loss, best_u = carry

    def loss_of(u):
        ts = _grid_of(schedule, u["u"], tau0, tau1)
        mts = _model_times_of(schedule, ts, u["d"]) if fit_d else None
        return _loss(refs, static, schedule, params, x_start, x_ref, ts, mts, condition, uncond, scale, unroll)

    loss, g = jax.value_and_grad(loss_of)(u)
    better = jnp.isfinite(loss) & (loss < best_loss)
    best_u = jax.tree_util.tree_map(lambda a, b: jnp.where(better, a, b), u, best_u)
    best_loss = jnp.where(better, loss, best_loss)
    upd, opt_state = _refine_optimizer(lr).update(g, opt_state, u)
    return (optax.apply_updates(u, upd), opt_state, best_loss, best_u), loss


def _model_outputs(refs, static, schedule, params, xs, tau, condition, uncond, scale):
    """Converted model outputs at the candidates (solver scale), one ``lax.map``, through
    the one model-call path (condition, both guidances)."""
    model_fn, classifier_fn = (None if r is None else r() for r in refs)
    model_type, kind, predict_data = static
    dtype = xs.dtype
    net = _models.Network(model_fn, params, condition, kind, uncond, jnp.asarray(scale, dtype), classifier_fn,
                          model_type, dtype)

    def one(args):
        x, t = args
        sc, alpha, sigma = schedule.state_scale(t), schedule.alpha(t), schedule.sigma(t)
        tm = jnp.broadcast_to(schedule.model_time(t), (x.shape[0],)).astype(dtype)
        return _models.convert(net(x / sc, tm, alpha, sigma, sc), x, alpha, sigma, net.out_type, predict_data)

    return jax.lax.map(one, (xs, tau))


def fit_timesteps(
    model_fn,
    params: Any,
    key: Optional[jax.Array],
    shape,
    *,
    schedule,
    steps: int,
    method=None,
    model_type: str = "noise",
    t_start: Optional[float] = None,
    t_end: Optional[float] = None,
    condition: Any = None,
    guidance=None,
    noise: Optional[jax.Array] = None,
    n_candidates: int = 40,
    fine_steps: Optional[int] = None,
    refine_iters: int = 200,
    refine_lr: float = REFINE_LR,
    model_times: bool = True,
    return_info: bool = False,
    progress: bool = False,
    **keywords,
):
    """Fit a ``steps``-step time grid to a model for one multistep or UniPC solver.

    Args:
      model_fn, params, schedule, model_type, condition, guidance: as in
        :func:`dpmjax.sample` (guidance: :class:`dpmjax.ClassifierFree` or
        :class:`dpmjax.ClassifierGuidance`, fitted at its scale).
      method: the solver the grid is fitted for: :class:`dpmjax.DPMSolverPP`,
        :class:`dpmjax.DPMSolver` or :class:`dpmjax.UniPC` (default ``DPMSolverPP()``), or the
        authors' keywords (``method="multistep"``/``"unipc"``, ``algorithm``, ``order``,
        ``solver_type``, ``variant``, ``lower_order_final``; and ``unconditional_condition``,
        ``guidance_scale``, ``classifier_fn`` for the guidance). The dynamic program always
        uses the multistep update of the method's order; for UniPC its grid is one of the
        starting points of the refinement.
      key, shape: the reference trajectories start from ``x_T`` drawn from ``key`` with
        ``shape = (n_trajectories, ...)`` (or from ``noise``).
      steps: NFE of the grid to fit (``steps + 1`` points).
      t_start, t_end: the interval (defaults as :class:`dpmjax.Grid`'s).
      n_candidates: number of intervals of the candidate grid (uniform in lambda).
      fine_steps: reference solver steps (order-3 multistep, a multiple of
        ``n_candidates``; default ``8 n_candidates``).
      refine_iters, refine_lr: Adam iterations and learning rate of the refinement of
        the global error (0 iterations: return the dynamic program's grid; ``return_info``
        still reports the global error of it and of the fixed grids).
      model_times: also fit the network's time input at each evaluation (default); with
        ``False`` only the solver's grid is fitted.
      progress: show a progress bar of the refinement (tqdm).

    The refinement's Adam step is compiled once per configuration (model function, solver
    options, ``steps``, ``refine_lr``) and reused by later calls while the model function
    lives; on CPU it differentiates the sampler unrolled, which XLA runs several times
    faster there than a loop.

    Returns:
      A :class:`dpmjax.FittedGrid`: ``timesteps``, a strictly decreasing array of
      ``steps + 1`` times from ``t_start`` to ``t_end``, and ``model_timesteps``, the
      ``steps`` network times (``None`` without ``model_times`` or when the refinement
      found nothing better than its start). With ``return_info``, also a dict (the dynamic
      program's ``dp_grid``, ``dp_cost`` and ``dp_indices``, the fitting loss of each
      start grid, the chosen ``start`` and the final ``fit_loss``). Deterministic for a
      given key.

    Example::

        grid = dpmjax.fit_timesteps(model_fn, params, key, (1024, 2), schedule=schedule, steps=6)
        x = dpmjax.sample(model_fn, params, key2, (4096, 2), schedule=schedule, grid=grid)
    """
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable; got {type(model_fn).__name__}")
    guidance = _models.pop_guidance(guidance, keywords)
    bad = set(keywords) - {"algorithm", "order", "solver_type", "variant", "lower_order_final"}
    if bad:
        raise TypeError(f"fit_timesteps got unexpected keyword argument(s): {', '.join(sorted(bad))}")
    if isinstance(method, str) and method not in ("multistep", "unipc"):
        raise ValueError(f"method must be 'multistep' or 'unipc' for fit_timesteps; got {method!r}")
    if keywords.get("algorithm", "dpmsolver++") not in ("dpmsolver++", "dpmsolver"):
        raise ValueError(f"algorithm must be 'dpmsolver++' or 'dpmsolver' for fit_timesteps; got "
                         f"{keywords['algorithm']!r}")
    method, _, _ = _methods.resolve(method, None, None, **keywords)
    if not isinstance(method, (_methods.DPMSolverPP, _methods.DPMSolver, _methods.UniPC)):
        raise ValueError(f"fit_timesteps fits grids for dpmjax.DPMSolverPP, dpmjax.DPMSolver or dpmjax.UniPC; got "
                         f"{method!r}")
    n = _solvers._integer("n_candidates", n_candidates, 2, 400)
    steps = _solvers._integer("steps", steps, 1)
    if steps > n:
        raise ValueError(f"steps must be <= n_candidates = {n}; got steps={steps}")
    fine = 8 * n if fine_steps is None else _solvers._integer("fine_steps", fine_steps, n)
    if fine % n:
        raise ValueError(f"fine_steps must be a multiple of n_candidates = {n}; got {fine}")
    refine_iters = _solvers._integer("refine_iters", refine_iters, 0, 1_000_000)
    refine_lr = _solvers._real("refine_lr", refine_lr)
    if refine_lr <= 0:
        raise ValueError(f"refine_lr must be > 0; got {refine_lr}")
    model_times = _solvers._boolean("model_times", model_times)
    shape = _sampler._check_shape(shape)
    kind = _models.check_guidance(shape[0], condition, guidance)
    # The solver the grid is fitted for (all of its checks, before any work).
    _solvers.build_solver(schedule, method, _ts.Grid(steps=steps, skip_type="logSNR", t_start=t_start, t_end=t_end),
                          model_type=_models.output_type(model_type, kind))
    ts0, ts1 = _solvers.resolve_times(schedule, t_start, t_end)
    # 1. Reference trajectories on a fine logSNR grid containing the candidates.
    states = solve(model_fn, params, key, shape, schedule=schedule, model_type=model_type, noise=noise,
                   condition=condition, guidance=guidance, method=_methods.DPMSolverPP(order=3),
                   grid=_ts.Grid(steps=fine, skip_type="logSNR", t_start=ts0, t_end=ts1), save_states=True).states
    if not bool(jnp.all(jnp.isfinite(states))):
        raise ValueError("the reference trajectories are not finite: model_fn returns NaN or inf on these inputs")
    grid, info = _fit_on_trajectories(model_fn, params, states[:: fine // n], ts0, ts1, schedule=schedule,
                                      steps=steps, method=method, model_type=model_type, condition=condition,
                                      guidance=guidance, kind=kind, refine_iters=refine_iters, refine_lr=refine_lr,
                                      model_times=model_times, progress=progress)
    return (grid, info) if return_info else grid


def _fit_on_trajectories(model_fn, params, states, t0, t1, *, schedule, steps, method, model_type, condition,
                         guidance, kind, refine_iters, refine_lr, model_times, progress):
    """Steps 2-5 of the module docstring, from reference trajectories: ``states`` (user
    scale, shape ``(n + 1, n_trajectories, ...)``) on the logSNR grid of ``n`` intervals from
    ``t0`` to ``t1``. Returns ``(grid, info)``. :func:`dpmjax.fit_solver` passes its
    teacher's trajectories, so that its teacher is solved once for all of its fits."""
    classifier_fn = guidance.classifier_fn if kind == "classifier" else None
    refs = (model_fn, classifier_fn)
    n = states.shape[0] - 1
    dtype = states.dtype
    tau = _grid(schedule, "logSNR", jnp.asarray(t0, dtype), jnp.asarray(t1, dtype), n)
    scale_t = jnp.asarray(schedule.state_scale(tau), dtype)
    xs_solver = states * scale_t.reshape(scale_t.shape + (1,) * (states.ndim - scale_t.ndim))  # user -> solver scale
    uncond = guidance.unconditional if kind == "cfg" else None
    scale = jnp.asarray(1.0 if guidance is None else guidance.scale, dtype)
    ms = _cache.compiled(_model_outputs, refs, (model_type, kind, method.predict_data))(
        schedule, params, xs_solver[:-1], tau[:-1], condition, uncond, scale)
    G = _gram_matrix(xs_solver, ms)
    la, ls = np.asarray(schedule.log_alpha(tau), np.float64), np.asarray(schedule.log_sigma(tau), np.float64)
    orders = _ts.multistep_orders(method.order, steps, method.lower_order_final)
    solver_type = getattr(method, "solver_type", "dpmsolver")
    costs = {o: _one_step_errors(G, la, ls, o, predict_data=method.predict_data, solver_type=solver_type)
             for o in sorted(set(orders))}
    path, cost = _dynamic_program(costs, orders, n + 1)
    dp_grid = tau[jnp.asarray(path)]
    info = {"dp_cost": cost, "dp_indices": np.asarray(path), "dp_grid": dp_grid}

    # 4. Refine by gradient descent on the global error against the reference end points
    #    (LD3, Tong et al. 2025, arXiv:2405.15506), started from the best of the DP grid and
    #    the fixed grids on the fitting trajectories. The grid is parameterised by softmax
    #    weights of its lambda increments: decreasing with exact end points by construction.
    #    5. The network's times are lambda shifts from the grid's, kept inside the interval.
    x_ref, x_start = states[-1], states[0]
    names = ["dp", *_ts.SKIP_TYPES]
    grids = jnp.stack([dp_grid] + [_grid(schedule, sk, tau[0], tau[-1], steps) for sk in _ts.SKIP_TYPES])
    static = (method, model_type, kind)
    losses = np.asarray(_cache.compiled(_start_losses, refs, static)(
        schedule, params, x_start, x_ref, grids, condition, uncond, scale), np.float64)
    start_losses = dict(zip(names, losses.tolist()))
    if refine_iters == 0:  # the dynamic program's grid, with the global errors measured
        info.update(start_losses=start_losses, start="dp", fit_loss=float(losses[0]))
        return FittedGrid(dp_grid, None), info
    best = int(np.nanargmin(np.where(np.isfinite(losses), losses, np.nan))) if np.isfinite(losses).any() else 0
    g0 = grids[best]
    u0 = {"u": jnp.log(jnp.maximum(jnp.diff(schedule.lambda_(g0)), 1e-6)),
          "d": jnp.zeros((steps,), dtype)}
    # On CPU the sampler is unrolled (see _refine_step); elsewhere it stays a scan.
    step = _cache.compiled(_refine_step, refs,
                           static + (model_times, refine_lr, _solvers.unroll_fits()))
    carry = _cache.committed_like((u0, _refine_optimizer(refine_lr).init(u0), jnp.asarray(losses[best], dtype), u0),
                                  (params, x_start))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=refine_iters, desc=f"fitting a {steps}-step grid", leave=False)
    try:
        for i in range(refine_iters + 1):  # the last call only measures the last update's result
            new, loss = step(schedule, params, x_start, x_ref, carry, tau[0], tau[-1], condition, uncond, scale)
            carry = new if i < refine_iters else carry[:2] + new[2:]
            if bar is not None and i < refine_iters:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.4g}", best=f"{float(carry[2]):.4g}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    best_loss, best_u = float(carry[2]), carry[3]
    if best_loss < losses[best]:
        ts = _grid_of(schedule, best_u["u"], tau[0], tau[-1])
        grid = FittedGrid(ts, _model_times_of(schedule, ts, best_u["d"]) if model_times else None)
    else:
        grid = FittedGrid(g0, None)
    info.update(start_losses=start_losses, start=names[best], fit_loss=min(best_loss, float(losses[best])))
    return grid, info


def _gram_matrix(X, M):
    """Mean inner products of ``[X; M]`` per trajectory and dimension, in float64 (host)."""
    V = np.concatenate([np.asarray(X, np.float64), np.asarray(M, np.float64)], 0)
    V = V.reshape(V.shape[0], -1)
    return V @ V.T / (V.shape[1])


def _check_path(path, name: str = "path") -> str:
    """``path`` as a str; only str and os.PathLike are file names (an int would be taken by
    ``open`` as a file descriptor, and closed)."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file name (str or os.PathLike); got {type(path).__name__} {path!r}")
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"{name} must be a str file name, not bytes; got {path!r}")
    return path


def _check_grid(ts, mts, where: str) -> None:
    """The checks shared by :func:`save_timesteps` and :func:`load_timesteps`: ``ts`` a 1-D
    strictly decreasing grid of at least 2 finite times >= 0; ``mts`` ``None`` or one finite
    positive time per step. ``where`` says whose grid it is, for the message."""
    if ts.ndim != 1 or ts.shape[0] < 2 or not np.all(np.isfinite(ts)) or np.any(np.diff(ts) >= 0) or np.any(ts < 0):
        raise ValueError(f"{where} does not hold a strictly decreasing 1-D grid of at least 2 finite times >= 0 "
                         f"(timesteps: shape {ts.shape}, values {np.array2string(ts, threshold=8)})")
    if mts is not None and (mts.shape != (ts.shape[0] - 1,) or not np.all(np.isfinite(mts)) or np.any(mts <= 0)):
        raise ValueError(f"{where}: model_timesteps must be {ts.shape[0] - 1} finite positive times (one per step); "
                         f"got shape {mts.shape}")


def _as_times(values, what: str) -> np.ndarray:
    """``values`` as float64 numpy, ValueError naming ``what`` if they are not numbers."""
    try:
        arr = np.asarray(values)
        if arr.dtype.kind not in "iuf":
            raise TypeError(f"dtype {arr.dtype}")
        return arr.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must hold real numbers: {e}") from None


def save_timesteps(path: str | os.PathLike, timesteps, **metadata) -> None:
    """Save a grid (an array or a :class:`dpmjax.FittedGrid`) for :func:`load_timesteps`.

    JSON (any path not ending in ``.npy``): ``{"timesteps": [...], "model_timesteps":
    [...] or null, **metadata}``; ``metadata`` must be JSON-serialisable (finite numbers,
    strings, lists, dicts) and may not use the grid's own keys. ``.npy``: a plain grid only.
    The grid is checked as :func:`load_timesteps` will check it (1-D, strictly decreasing,
    finite; ``model_timesteps`` one finite positive time per step), and the file is
    written atomically (a temporary file next to it, then ``os.replace``) with the
    permissions the umask gives new files.

    Example::

        dpmjax.save_timesteps("grid.json", grid, steps=6, method="unipc")
    """
    path = _check_path(path)
    clash = sorted(set(metadata) & set(FittedGrid._fields))
    if clash:
        raise ValueError(f"metadata keys {clash} collide with the grid's own fields {list(FittedGrid._fields)}; "
                         "pass the grid as a dpmjax.FittedGrid instead")
    grid = timesteps if isinstance(timesteps, FittedGrid) else FittedGrid(timesteps, None)
    ts = _as_times(grid.timesteps, "timesteps")
    mts = None if grid.model_timesteps is None else _as_times(grid.model_timesteps, "model_timesteps")
    _check_grid(ts, mts, "timesteps")
    if path.endswith(".npy"):
        if mts is not None:
            raise ValueError(f"a grid with model_timesteps cannot be saved as .npy; use a .json path, got {path!r}")
        write_file(path, lambda f: np.save(f, ts, allow_pickle=False))
        return
    doc = {"timesteps": ts.tolist(), "model_timesteps": None if mts is None else mts.tolist(), **metadata}
    try:
        text = json.dumps(doc, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata must be JSON-serialisable (finite numbers, str, list, dict): {e}") from None
    write_file(path, lambda f: f.write(text.encode("utf-8")))


def load_timesteps(path: str | os.PathLike) -> FittedGrid:
    """Load a grid saved by :func:`save_timesteps` (JSON or ``.npy``) as a
    :class:`dpmjax.FittedGrid` of float64 numpy arrays (``model_timesteps`` may be ``None``).

    ``path`` must be a str or os.PathLike (TypeError otherwise); a missing, unreadable or
    malformed file, or one whose grid is not 1-D, strictly decreasing and finite, raises
    ValueError naming the file."""
    path = _check_path(path)
    if not os.path.exists(path):
        raise ValueError(f"timesteps file {path!r} does not exist")
    mts = None
    try:
        if path.endswith(".npy"):
            ts = _as_times(np.load(path, allow_pickle=False), "timesteps")
        else:
            with open(path, "rb") as f:
                doc = json.loads(f.read().decode("utf-8"))
            ts = _as_times(doc["timesteps"], "timesteps")
            if doc.get("model_timesteps") is not None:
                mts = _as_times(doc["model_timesteps"], "model_timesteps")
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError,
            ValueError) as e:
        raise ValueError(f"timesteps file {path!r} is not a dpmjax grid: {type(e).__name__}: {e}") from None
    _check_grid(ts, mts, f"timesteps file {path!r}")
    return FittedGrid(ts, mts)
