"""Learned solvers: the time steps *and* the update coefficients fitted to the model.

Every fixed-step solver of dpmjax is a table of coefficients (:class:`dpmjax.updates.Plan`,
one row per model evaluation)::

    hist[slot[r]] = m                          # the converted model output at y
    x = ax[r] x + bx[r] y + sum_k cx[r, k] hist[k]
    y = ay[r] x + sum_k cy[r, k] hist[k]       # the next evaluation point (UniPC)

so the coefficients can be fitted like the time steps (:func:`dpmjax.fit_timesteps`, the
LD3 class). :func:`fit_solver` starts from a *base* solver (by default both UniPC-bh2 and
DPM-Solver++(2M), each on a grid from :func:`dpmjax.fit_timesteps`, keeping the better fit) and fits, by
gradient descent through the sampler against a teacher (the same model solved with many
steps from the same noise), in the spirit of S4S (Frankel et al. 2025, arXiv:2502.17423),
LD3 (Tong et al. 2025, arXiv:2405.15506) and GAS (arXiv:2510.17699):

* the time grid (softmax weights of its lambda increments, exact end points) and the time
  fed to the network at each evaluation (a lambda shift), as in :func:`dpmjax.fit_timesteps`;
* per-row corrections of the weights on the stored model outputs (``cx``, ``cy``) and, for
  rows that hold two states (UniPC's corrector), on the state (``ax``, ``bx``).

**Consistency.** Let the solver integrate the data prediction (``"dpmsolver++"``) and write
``P = sigma``, ``Q = alpha`` (noise prediction, ``"dpmsolver"``: ``P = alpha``, ``Q = sigma``).
If the model's prediction is a constant ``c``, every exact trajectory of the probability-flow
ODE is ``x(t) = Q(t) c + P(t) z`` for a constant ``z``. A row whose inputs ``x`` (at
``t_x``) and ``y`` (at ``t_y``) lie on such a trajectory gives an ``x`` (at ``t_x'``) on it
for every ``c`` and ``z`` exactly when

    ax P(t_x) + bx P(t_y) = P(t_x')                       (the state weights)
    ax Q(t_x) + bx Q(t_y) + sum_k cx[k] = Q(t_x')          (the output weights)

and likewise ``ay P(t_x') = P(t_y')``, ``ay Q(t_x') + sum_k cy[k] = Q(t_y')`` for the
evaluation point. Every exponential-integrator row of dpmjax satisfies these (they are the
first-order, DDIM, part of the update), and they are what keeps a method consistent: its
error vanishes as the steps shrink. The corrections keep them for *any* parameters:

* ``cx``, ``cy`` corrections are zero-sum over the slots that hold outputs at that row;
* a state correction ``dax`` comes with ``dbx = -dax P(t_x)/P(t_y)`` and the output weight
  of the newest model output changes by ``-(dax Q(t_x) + dbx Q(t_y))``;
* ``ax`` of a row with one state, and ``ay``, are then fixed by the grid (not fitted).

All corrections are scaled by the row's own output weight ``sum_k |cx[r, k]|`` (``cy``: its
own), so rows that update nothing stay so, and at zero parameters the tables are the base
method's *exactly*: the fitted plan is ``base.plan + (build(grid) - build(base grid)) +
corrections``, and both differences are exactly zero there.

The result is an ordinary :class:`dpmjax.Solver` (the base's options and layout, corrected
tables): ``solver.init / model_inputs / step / result`` run it, as does
``dpmjax.sample(..., solver=...)``; :func:`save_solver` / :func:`load_solver` store it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import numbers
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _cache
from . import fit as _fit
from . import methods as _methods
from . import models as _models
from . import sampler as _sampler
from . import solvers as _solvers
from . import timesteps as _ts
from . import updates as _up
from ._files import write_file
from .schedules import NoiseSchedule

__all__ = ["fit_solver", "save_solver", "load_solver"]

FORMAT = "dpmjax-solver"
FORMAT_VERSION = 1

#: the base methods fit_solver tries by default: (name, dpmjax.solver / fit_timesteps options)
DEFAULT_BASES = (
    ("UniPC-bh2", dict(method="unipc", variant="bh2")),
    ("DPM-Solver++(2M)", dict(method="multistep")),
)


# --------------------------------------------------------------------------- driver


def _run(solver, model_fn, params, x_T, condition=None, uncond=None, scale=1.0, remat=False, unroll=False):
    """``solver``'s sample from ``x_T``, the network called through
    :class:`dpmjax.models.Network` (condition, classifier-free guidance as one batched call)
    and the steps driven by ``sampler._run_steps`` (``remat``, ``unroll``), as
    ``dpmjax.sample`` does. A Python number ``scale`` chooses the guidance branch when the
    program is traced (no conditional in it)."""
    dtype = solver.plan.ax.dtype
    scale = scale if isinstance(scale, numbers.Real) else jnp.asarray(scale, dtype)
    net = _models.Network(model_fn, params, condition, "none" if uncond is None else "cfg", uncond, scale, None,
                          solver.options.model_type, dtype)
    state, _ = _sampler._run_steps(solver, net, x_T, remat=remat, unroll=unroll)
    return solver.result(state)


def _rms(x, ref):
    return jnp.sqrt(jnp.mean((x - ref) ** 2))


def _mean_distance(x, ref):
    """The mean over samples of each sample's RMS distance to its reference (``tiny`` under
    the root keeps the gradient finite where a sample equals its reference)."""
    d = jnp.reshape(x - ref, (x.shape[0], -1))
    return jnp.mean(jnp.sqrt(jnp.mean(d**2, axis=1) + jnp.finfo(d.dtype).tiny))


LOSSES = {"rms": _rms, "mean": _mean_distance}


# --------------------------------------------------------------------------- parametrisation


@dataclasses.dataclass(frozen=True)
class _Frame:
    """What the parametrisation needs of the base solver (host arrays)."""

    base: _solvers.Solver
    ts0: np.ndarray  # (steps + 1,) the base grid
    mts0: np.ndarray  # (steps,) the base's network times (solver time)
    d0: np.ndarray  # (steps,) their lambda shifts from the grid's
    u0: np.ndarray  # (steps,) log lambda increments of the grid
    valid: np.ndarray  # (n, K) bool: slots that hold a model output at row r (after its write)
    sx: np.ndarray  # (n,) scale of the x-row corrections
    sy: Optional[np.ndarray]  # (n,) scale of the y-row corrections (None: no y)


def _check_base(base, schedule, model_type):
    if not isinstance(base, _solvers.Solver):
        raise TypeError(f"base must be a dpmjax.Solver (dpmjax.solver, fit_solver or load_solver) or None; "
                        f"got {type(base).__name__}")
    o = base.options
    if o.method not in ("multistep", "unipc"):
        raise ValueError(f"base must be a multistep or UniPC solver (method 'multistep' or 'unipc'); "
                         f"got method={o.method!r}")
    if o.stochastic:
        raise ValueError(f"base must be an ODE solver (algorithm 'dpmsolver++' or 'dpmsolver'); got {o.algorithm!r}")
    if o.denoise_to_zero:
        raise ValueError("base must not use denoise_to_zero (its last row leaves the ODE's trajectories)")
    if o.model_type != model_type:
        raise ValueError(f"base was built for model_type={o.model_type!r}, not model_type={model_type!r}")
    dtype = _solvers.compute_dtype()
    if base.plan.ax.dtype != dtype:
        raise ValueError(f"base computes in {base.plan.ax.dtype}, not in {np.dtype(dtype).name} (build it with "
                         "jax_enable_x64 as it is now)")
    if float(np.asarray(_end_time(base))) <= 0.0:
        raise ValueError("base ends at t = 0 (its last step is the sigma -> 0 limit); end at a time > 0")
    alpha = np.asarray(schedule.alpha(base.plan.t_eval), np.float64)
    if not np.allclose(alpha, np.asarray(base.plan.alpha, np.float64), rtol=1e-4, atol=1e-6):
        raise ValueError("base was built for another schedule (its alpha table differs from schedule.alpha)")


def _end_time(solver):
    p = solver.plan
    return p.t_state[-1] if p.t_y is None else p.t_y[-1]


def _frame(base, schedule) -> _Frame:
    p = base.plan
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    ts0 = np.concatenate([f64(p.t_eval), f64(_end_time(base))[None]])
    mts0 = f64(schedule.solver_time(p.t_model))
    lam = f64(schedule.lambda_(jnp.asarray(ts0, p.ax.dtype)))
    d0 = f64(schedule.lambda_(jnp.asarray(mts0, p.ax.dtype))) - lam[:-1]
    u0 = np.log(np.maximum(np.diff(lam), 1e-12))
    slots = np.asarray(p.slot)
    n, K = p.cx.shape
    valid = np.zeros((n, K), bool)
    for r in range(n):
        valid[r, np.unique(slots[: r + 1])] = True
    sx = np.sum(np.abs(f64(p.cx)), axis=1)
    sy = None if p.cy is None else np.sum(np.abs(f64(p.cy)), axis=1)
    dt = p.ax.dtype
    cast = lambda a: None if a is None else np.asarray(a, dt)  # noqa: E731
    return _Frame(base=base, ts0=cast(ts0), mts0=cast(mts0), d0=cast(d0), u0=cast(u0), valid=valid, sx=cast(sx),
                  sy=cast(sy))


def _zero_params(frame: _Frame) -> dict:
    """Parameters of the base method itself (all corrections zero)."""
    p = frame.base.plan
    n, K = p.cx.shape
    steps = frame.u0.shape[0]
    dt = p.ax.dtype
    params = {"u": jnp.zeros((steps,), dt), "d": jnp.zeros((steps,), dt), "cx": jnp.zeros((n, K), dt)}
    if p.bx is not None:
        params["s"] = jnp.zeros((n,), dt)
    if p.cy is not None:
        params["cy"] = jnp.zeros((n, K), dt)
    return params


def _zero_sum(theta, valid):
    """``theta`` restricted to the valid slots of each row, minus its mean there (row sums 0)."""
    v = jnp.asarray(valid, theta.dtype)
    mean = jnp.sum(theta * v, axis=1, keepdims=True) / jnp.maximum(jnp.sum(v, axis=1, keepdims=True), 1.0)
    return v * (theta - mean)


def _solver_of(frame: _Frame, schedule, params, fit_times=True) -> _solvers.Solver:
    """The solver of ``params`` (traceable): base tables moved to the fitted grid, plus the
    consistent corrections (module docstring). Zero parameters give the base tables exactly."""
    base = frame.base
    opts, p = base.options, base.plan
    dt = p.ax.dtype
    ts0, mts0 = jnp.asarray(frame.ts0), jnp.asarray(frame.mts0)
    plan = p
    if fit_times:
        u0, d0 = jnp.asarray(frame.u0), jnp.asarray(frame.d0)
        g0 = _fit._grid_of(schedule, u0, ts0[0], ts0[-1])
        g1 = _fit._grid_of(schedule, u0 + params["u"], ts0[0], ts0[-1])
        ts = ts0 + (g1 - g0)
        mts = mts0 + (_fit._model_times_of(schedule, g1, d0 + params["d"]) - _fit._model_times_of(schedule, g0, d0))
        new = _solvers.build(opts, schedule, None, None, ts, _solvers.network_times(schedule, mts)).plan
        old = _solvers.build(opts, schedule, None, None, ts0, _solvers.network_times(schedule, mts0)).plan
        # At zero time parameters the two builds agree in value, but XLA may round them
        # differently (they are separate computations): there the difference is replaced by
        # ``d - stop_gradient(d)``, exactly 0 with the same derivative.
        at_zero = jnp.all(params["u"] == 0) & jnp.all(params["d"] == 0)

        def moved(b, a, c):
            if not jnp.issubdtype(b.dtype, jnp.floating):
                return b
            d = a - c
            return b + jnp.where(at_zero, d - jax.lax.stop_gradient(d), d)

        plan = jax.tree_util.tree_map(moved, p, new, old)
    pd = opts.predict_data

    def PQ(t):
        a, s = schedule.alpha(t).astype(dt), schedule.sigma(t).astype(dt)
        return (s, a) if pd else (a, s)

    cx = plan.cx + jnp.asarray(frame.sx)[:, None] * _zero_sum(params["cx"], frame.valid)
    ax, bx = plan.ax, plan.bx
    if bx is not None:
        t_x = jnp.concatenate([plan.t_eval[:1], plan.t_state[:-1]])  # x before the row
        P_x, Q_x = PQ(t_x)
        P_y, Q_y = PQ(plan.t_eval)  # y before the row: the evaluation point
        dax = jnp.asarray(frame.sx) * params["s"]
        dbx = -dax * P_x / P_y
        comp = -(dax * Q_x + dbx * Q_y)
        onehot = jax.nn.one_hot(plan.slot, cx.shape[1], dtype=dt)
        ax, bx, cx = ax + dax, bx + dbx, cx + comp[:, None] * onehot
    cy = plan.cy
    if cy is not None:
        cy = cy + jnp.asarray(frame.sy)[:, None] * _zero_sum(params["cy"], frame.valid)
    plan = plan._replace(ax=ax, bx=bx, cx=cx, cy=cy)
    return dataclasses.replace(base, plan=plan)


# --------------------------------------------------------------------------- validation


def _check_conditions(n, condition, unconditional_condition, guidance_scale):
    if unconditional_condition is not None and condition is None:
        raise ValueError("unconditional_condition needs condition (classifier-free guidance)")
    for name, c in (("condition", condition), ("unconditional_condition", unconditional_condition)):
        for leaf in jax.tree_util.tree_leaves(c):
            if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != n:
                raise ValueError(f"{name} leaves must have one entry per starting noise (leading axis shape[0] = "
                                 f"{n}); got shape {jnp.shape(leaf)}")
    scale = _solvers._real("guidance_scale", guidance_scale)
    if unconditional_condition is None and scale != 1.0:
        raise ValueError("guidance_scale != 1 needs unconditional_condition (classifier-free guidance)")
    return scale


def _take(tree, idx):
    return None if tree is None else jax.tree_util.tree_map(lambda a: jnp.asarray(a)[idx], tree)


def _positive(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    v = _solvers._real(name, value)
    if not v > 0:
        raise ValueError(f"{name} must be > 0; got {v}")
    return v


# --------------------------------------------------------------------------- fit


def fit_solver(
    model_fn,
    params: Any,
    key: Optional[jax.Array],
    shape,
    *,
    schedule: NoiseSchedule,
    steps: int,
    base: Optional[_solvers.Solver] = None,
    model_type: str = "noise",
    t_start: Optional[float] = None,
    t_end: Optional[float] = None,
    noise: Optional[jax.Array] = None,
    condition: Any = None,
    unconditional_condition: Any = None,
    guidance_scale=1.0,
    holdout: Optional[int] = None,
    teacher_steps: int = 400,
    teacher_batch: int = 1024,
    iters: int = 1000,
    lr: float = 0.01,
    batch_size: Optional[int] = None,
    eval_every: int = 10,
    fit_times: bool = True,
    loss: str = "rms",
    base_iters: int = 100,
    remat: Optional[bool] = None,
    max_time: Optional[float] = None,
    progress: bool = False,
    return_info: bool = False,
):
    """Fit a ``steps``-evaluation solver to a model: its time steps and its coefficients.

    Args:
      model_fn, params, schedule, model_type, t_start, t_end: as in :func:`dpmjax.sample`.
      condition, unconditional_condition, guidance_scale: as in :func:`dpmjax.sample`; the
        solver is fitted at this guidance scale. Conditions must have one entry per starting
        noise (leading axis ``shape[0]``).
      key, shape: the starting noises ``x_T`` (``shape = (n, ...)``) drawn from ``key``
        (or given as ``noise``). The last ``holdout`` of them (default ``n // 4``) are held
        out: the parameters kept are the best on them, never worse than the start.
      steps: model evaluations of the solver.
      base: the solver to start from (a multistep or UniPC ODE :class:`dpmjax.Solver` of
        ``steps`` evaluations). Default: UniPC-bh2 and DPM-Solver++(2M) (order
        ``min(2, steps)``), each on a grid from :func:`dpmjax.fit_timesteps` (``base_iters``
        refinement iterations, on the fitting noises); both are fitted, and the better on
        the held-out noises is kept. (The better *start* is not always the better end:
        UniPC's tables have more coefficients to fit.)
      teacher_steps, teacher_batch: the teacher, DPM-Solver++(3M) with ``teacher_steps``
        logSNR steps from the same noises, computed once in batches of ``teacher_batch``.
        The default bases' grids are fitted on its trajectories (its states at every
        ``teacher_steps / c``-th step, where ``c``, the candidate times of the grid fit, is
        the largest divisor of ``teacher_steps`` up to 40; at least ``steps``).
      iters, lr, batch_size, eval_every: Adam iterations, learning rate (cosine decay to a
        tenth), minibatch of the fitting noises (default: all of them) and the interval
        of the held-out evaluations.
      fit_times: also fit the grid and the network's times (default); ``False``: only the
        coefficients.
      loss: the distance to the teacher that is minimised and by which the held-out noises
        choose: ``"rms"`` (default), the root mean square over samples and coordinates, or
        ``"mean"``, the mean over samples of each sample's root mean square distance (as
        LD3's per-sample distance). A few samples near a boundary between modes of the data
        (where a tiny change of the path changes the mode it ends in) dominate the first;
        the second gives them less weight, so it lowers the typical sample's error more and
        the largest errors less.
      remat: how the sampler is differentiated. ``True``: its steps in a ``lax.scan``, each
        under ``jax.checkpoint``, so the backward pass keeps one state per step whatever the
        network's size. ``False``: the steps unrolled into one straight-line program that
        keeps every step's activations; on the CPU backend an iteration is then several
        times faster (XLA runs the convolutions of loop bodies, conditionals and
        checkpointed blocks more slowly there: about 4x for the digits UNet). Default:
        ``False`` on CPU, ``True`` on accelerators.
      max_time: stop the iterations after this many seconds from the call's start (the
        result then depends on the machine's speed; without it the fit is deterministic
        for a key).
      progress: a progress bar (tqdm).
      return_info: also return a dict: ``base`` (the name of the result's base),
        ``start_loss`` and ``heldout_loss`` (the ``loss`` to the teacher on the held-out
        noises, of the best start and of the result), per base ``base_losses`` (its start's
        held-out loss), ``base_solvers`` (the start) and ``learned_losses`` (the held-out
        loss of its fit; ``inf`` when it ran no iteration or gave nothing finite), ``iterations`` (all
        fits), ``history`` (per base: the held-out losses during its fit), ``seconds``,
        ``teacher_seconds``, ``base_seconds`` (the grid fits) and ``improved``.

    Returns:
      A :class:`dpmjax.Solver` with the base's options and layout and fitted tables (the
      base itself when nothing beat it on the held-out noises).

    Example::

        learned = dpmjax.fit_solver(model_fn, params, key, (1024, 2), schedule=schedule, steps=5)
        x_T = learned.prior_std * jax.random.normal(jax.random.key(1), (4096, 2))
        state = learned.init(x_T)
        for _ in range(learned.num_evals):
            x, t = learned.model_inputs(state)
            state = learned.step(state, model_fn(params, x, t))
        x0 = learned.result(state)
    """
    t_call = time.perf_counter()
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable; got {type(model_fn).__name__}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a dpmjax.NoiseSchedule; got {type(schedule).__name__}")
    _solvers._choice("model_type", model_type, _models.MODEL_TYPES)
    steps = _solvers._integer("steps", steps, 1, 10_000)
    if noise is not None and shape is not None:  # the sampler's check of noise against shape (the key: below)
        _sampler._check_draw(tuple(shape), None, noise, False)
    shape = tuple(shape) if noise is None else tuple(jnp.shape(noise))
    if len(shape) < 2 or any(not isinstance(s, numbers.Integral) or s < 1 for s in shape):
        raise ValueError(f"shape must be (n, *sample_shape) of positive ints; got {shape}")
    n = int(shape[0])
    if n < 2:
        raise ValueError(f"shape[0] (the number of starting noises) must be >= 2 (some are held out); got {n}")
    holdout = max(1, n // 4) if holdout is None else _solvers._integer("holdout", holdout, 1, n - 1)
    teacher_steps = _solvers._integer("teacher_steps", teacher_steps, steps, 1_000_000)
    teacher_batch = _solvers._integer("teacher_batch", teacher_batch, 1)
    iters = _solvers._integer("iters", iters, 0, 10_000_000)
    eval_every = _solvers._integer("eval_every", eval_every, 1)
    base_iters = _solvers._integer("base_iters", base_iters, 0, 1_000_000)
    lr = _positive("lr", lr)
    max_time = _positive("max_time", max_time, allow_none=True)
    fit_times = _solvers._boolean("fit_times", fit_times)
    remat = not _solvers.unroll_fits() if remat is None else _solvers._boolean("remat", remat)
    distance = LOSSES[_solvers._choice("loss", loss, tuple(LOSSES))]
    n_fit = n - holdout
    batch_size = n_fit if batch_size is None else _solvers._integer("batch_size", batch_size, 1, n_fit)
    scale = _check_conditions(n, condition, unconditional_condition, guidance_scale)
    if base is not None:
        _check_base(base, schedule, model_type)
        if base.num_evals != steps:
            raise ValueError(f"base has {base.num_evals} model evaluations, not steps = {steps}")
        if t_start is not None or t_end is not None:
            raise ValueError("t_start/t_end do not apply with a base solver (its grid has its end points)")
        t0, t1 = float(base.plan.t_eval[0]), float(_end_time(base))
    else:
        t0, t1 = _solvers.resolve_times(schedule, t_start, t_end)
    candidates = None
    if base is None:  # the grid fits read the teacher's trajectory at `candidates` times
        candidates = max(c for c in range(1, min(40, teacher_steps) + 1) if teacher_steps % c == 0)
        if candidates < max(steps, 2):
            raise ValueError(f"teacher_steps = {teacher_steps} has no divisor from steps = {steps} to 40 (the default "
                             "bases' grids are fitted at a divisor of the teacher's steps); choose e.g. 400")

    dtype = _solvers.compute_dtype()

    # Starting noises, split into fitting and held-out ones.
    key = _solvers.check_key("key", key, required=noise is None)
    k_noise, k_batch = (None, None) if key is None else jax.random.split(key)
    if noise is None:
        x_T = jnp.asarray(schedule.prior_std(t0), dtype) * jax.random.normal(k_noise, shape, dtype)
    else:
        x_T = jnp.asarray(noise, dtype)
    if k_batch is None:
        k_batch = jax.random.key(0)
    fit_idx, val_idx = np.arange(n_fit), np.arange(n_fit, n)
    cond_fit, cond_val = _take(condition, fit_idx), _take(condition, val_idx)
    unc_fit, unc_val = _take(unconditional_condition, fit_idx), _take(unconditional_condition, val_idx)
    scale_a = jnp.asarray(scale, dtype)

    # The teacher, once, in batches; with the default bases also its trajectories on the
    # fitting noises, at the candidate times of the grid fits.
    t_teacher = time.perf_counter()
    teacher_method = _methods.DPMSolverPP(order=3)
    teacher_grid = _ts.Grid(steps=teacher_steps, skip_type="logSNR", t_start=t0, t_end=t1)
    thresholding = None if base is None else base.options.thresholding
    refs, trajectories = [], []
    for a in range(0, n, teacher_batch):
        idx = np.arange(a, min(n, a + teacher_batch))
        c, u = _take(condition, idx), _take(unconditional_condition, idx)
        sol = _sampler.solve(model_fn, params, None, (len(idx),) + shape[1:], schedule=schedule, model_type=model_type,
                             method=teacher_method, grid=teacher_grid, thresholding=thresholding, noise=x_T[idx],
                             condition=c, guidance=None if u is None else _models.ClassifierFree(u, scale_a),
                             save_states=candidates is not None)
        refs.append(sol.x)
        if candidates is not None:
            trajectories.append(sol.states[:: teacher_steps // candidates, : max(0, min(len(idx), n_fit - a))])
    x_ref = jnp.concatenate(refs, 0)
    if not bool(jnp.all(jnp.isfinite(x_ref))):
        raise ValueError("the teacher's samples are not finite: model_fn returns NaN or inf on these inputs")
    teacher_seconds = time.perf_counter() - t_teacher
    xf, rf, xv, rv = x_T[fit_idx], x_ref[fit_idx], x_T[val_idx], x_ref[val_idx]

    fit_data = (params, xf, rf, cond_fit, unc_fit)
    val_data = (params, xv, rv, cond_val, unc_val)
    _val_solver = jax.jit(lambda s, prm, x, ref, c, u: distance(_run(s, model_fn, prm, x, c, u, scale), ref))
    val_of_solver = lambda s: _val_solver(s, *val_data)  # noqa: E731

    # The bases: their grids fitted on the teacher's trajectories.
    t_base = time.perf_counter()
    base_losses, base_solvers = {}, {}
    if base is None:
        order = min(2, steps)
        states = jnp.concatenate(trajectories, 1)
        if not bool(jnp.all(jnp.isfinite(states))):
            raise ValueError("the teacher's trajectories are not finite: model_fn returns NaN or inf on these inputs")
        guidance = None if unc_fit is None else _models.ClassifierFree(unc_fit, scale)
        kind = _models.check_guidance(n_fit, cond_fit, guidance)
        for name, kw in DEFAULT_BASES:
            method = _methods.from_keywords(algorithm="dpmsolver++", order=order, **kw)[0]
            grid, _ = _fit._fit_on_trajectories(
                model_fn, params, states, t0, t1, schedule=schedule, steps=steps, method=method,
                model_type=model_type, condition=cond_fit, guidance=guidance, kind=kind, refine_iters=base_iters,
                refine_lr=_fit.REFINE_LR, model_times=True, progress=False)
            s = _solvers.solver(schedule, model_type=model_type, algorithm="dpmsolver++", order=order, steps=steps,
                                timesteps=grid, **kw)
            base_losses[name], base_solvers[name] = float(val_of_solver(s)), s
        if not any(math.isfinite(v) for v in base_losses.values()):
            raise ValueError("no base solver gives finite samples on the held-out noises")
    else:
        name = f"given ({base.options.method})"
        base_losses[name], base_solvers[name] = float(val_of_solver(base)), base
    base_seconds = time.perf_counter() - t_base
    starts = [(v, k) for k, v in base_losses.items() if math.isfinite(v)]
    start_loss, start_name = min(starts)

    # The fit, from every base; the best on the held-out noises is kept (never worse than the
    # best start).
    sched = optax.cosine_decay_schedule(lr, max(iters, 1), alpha=0.1)
    opt = optax.chain(optax.zero_nans(), optax.adam(sched))
    bar = _Progress(progress, iters * len(starts), steps)

    def fit_from(base):
        frame = _frame(base, schedule)
        theta0 = _zero_params(frame)

        def loss_of(theta, prm, x, ref, c, u):
            s = _solver_of(frame, schedule, theta, fit_times)
            return distance(_run(s, model_fn, prm, x, c, u, scale, remat=remat, unroll=not remat), ref)

        @jax.jit
        def update(theta, opt_state, it, data):
            prm, xs, refs, cs, us = data
            if batch_size < n_fit:
                idx = jax.random.choice(jax.random.fold_in(k_batch, it), n_fit, (batch_size,), replace=False)
                xs, refs, cs, us = xs[idx], refs[idx], _take(cs, idx), _take(us, idx)
            loss, g = jax.value_and_grad(loss_of)(theta, prm, xs, refs, cs, us)
            upd, opt_state = opt.update(g, opt_state, theta)
            return optax.apply_updates(theta, upd), opt_state, loss

        solver_of = jax.jit(lambda th: _solver_of(frame, schedule, th, fit_times))
        theta, opt_state = _cache.committed_like((theta0, opt.init(theta0)), fit_data)
        best_loss, best_theta = math.inf, None
        history, done = [], 0
        while done < iters:
            if max_time is not None and time.perf_counter() - t_call > max_time:
                break
            theta, opt_state, loss = update(theta, opt_state, done, fit_data)
            done += 1
            if done % eval_every and done < iters:
                bar.update(1, None, None, None)
                continue
            v = float(val_of_solver(solver_of(theta)))  # the program that measured the starts
            history.append(v)
            if math.isfinite(v) and v < best_loss:
                best_loss, best_theta = v, theta
            bar.update(1, float(loss), v, min(best_loss, start_loss))
        if best_theta is None:
            return None, math.inf, done, history
        cand = jax.block_until_ready(solver_of(best_theta))
        loss = float(val_of_solver(cand))
        if not (math.isfinite(loss) and _tables_finite(cand)):
            return None, math.inf, done, history
        return cand, loss, done, history

    result, final_loss, result_base = base_solvers[start_name], start_loss, start_name
    learned_losses, histories, iterations = {}, {}, 0
    try:
        for _, name in sorted(starts):
            cand, loss, done, histories[name] = fit_from(base_solvers[name])
            iterations += done
            learned_losses[name] = loss
            if loss < final_loss:
                result, final_loss, result_base = cand, loss, name
    finally:
        bar.close()
    if not return_info:
        return result
    info = dict(base=result_base, base_losses=base_losses, base_solvers=base_solvers, start_loss=start_loss,
                heldout_loss=final_loss, learned_losses=learned_losses, improved=result is not base_solvers[start_name],
                iterations=iterations, history=histories, seconds=time.perf_counter() - t_call,
                teacher_seconds=teacher_seconds, base_seconds=base_seconds)
    return result, info


def _tables_finite(solver) -> bool:
    return all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(solver.plan)
               if jnp.issubdtype(a.dtype, jnp.floating))


class _Progress:
    """A tqdm bar over the iterations (or nothing)."""

    def __init__(self, enabled, total, steps):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"fitting a {steps}-step solver", leave=False)

    def update(self, n, loss, val, best):
        if self.bar is not None:
            self.bar.update(n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4g}", heldout=f"{val:.4g}", best=f"{best:.4g}", refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- files


def _schedule_description(schedule) -> tuple[dict, dict]:
    """``(description, arrays)``: the schedule's class and scalar fields (JSON) and its table
    leaves (e.g. :class:`dpmjax.VPDiscrete`'s ``log_alphas``), for the file."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a dpmjax.NoiseSchedule; got {type(schedule).__name__}")
    desc, arrays = {"type": type(schedule).__name__, "fields": {}}, {}
    leaves = set(getattr(type(schedule), "_leaves", ()))
    fields = dataclasses.fields(schedule) if dataclasses.is_dataclass(schedule) else ()
    for f in fields:
        v = getattr(schedule, f.name)
        if f.name in leaves:
            arrays[f.name] = np.asarray(v, np.float64)
        elif isinstance(v, (bool, numbers.Integral)):
            desc["fields"][f.name] = int(v)
        elif isinstance(v, numbers.Real):
            desc["fields"][f.name] = float(v)
        else:
            desc["fields"][f.name] = repr(v)
    return desc, arrays


def _jsonable(v):
    if isinstance(v, _models.Thresholding):
        return {f.name: _jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, tuple):
        return [_jsonable(a) for a in v]
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


def save_solver(path: str | os.PathLike, solver: _solvers.Solver, *, schedule: Optional[NoiseSchedule] = None,
                sample_shape=None, **metadata) -> None:
    """Save a fixed-step solver to one ``.npz`` file for :func:`load_solver`.

    The file holds the plan's arrays (``plan/<field>``) and scales as plain arrays and a
    JSON document (``metadata``): the format and dpmjax version, the options and layout,
    the method, algorithm, steps and model type, ``sample_shape`` and a description of
    ``schedule`` (its class, fields and tables) when given, and the user's ``metadata``
    (JSON-serialisable). It is written atomically: a temporary file in the same directory,
    then ``os.replace``; its mode is what the umask gives an ordinary file.

    Example::

        dpmjax.save_solver("solver-5.npz", learned, schedule=schedule, sample_shape=(2,), note="5 NFE")
    """
    from . import __version__

    path = _fit._check_path(path)
    if not isinstance(solver, _solvers.Solver):
        raise TypeError(f"solver must be a dpmjax.Solver; got {type(solver).__name__}")
    if sample_shape is not None:
        sample_shape = _check_shape(sample_shape)
    arrays = {f"plan/{k}": np.asarray(v) for k, v in solver.plan._asdict().items() if v is not None}
    for k in ("start_scale", "end_scale", "prior_std"):
        arrays[k] = np.asarray(getattr(solver, k))
    if not all(np.all(np.isfinite(a)) for a in arrays.values() if a.dtype.kind == "f"):
        raise ValueError("the solver's tables are not finite; refusing to save them")
    sched = None
    if schedule is not None:
        sched, tables = _schedule_description(schedule)
        arrays.update({f"schedule/{k}": v for k, v in tables.items()})
    o = solver.options
    doc = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dpmjax_version": __version__,
        "method": o.method, "algorithm": o.algorithm, "steps": o.steps, "model_type": o.model_type,
        "num_evals": solver.num_evals, "dtype": np.dtype(solver.plan.ax.dtype).name,
        "sample_shape": None if sample_shape is None else list(sample_shape), "schedule": sched,
        "options": {f.name: _jsonable(getattr(o, f.name)) for f in dataclasses.fields(o)},
        "layout": {"x_step": list(solver.layout.x_step), "y_step": list(solver.layout.y_step)},
        "plan_fields": sorted(k[5:] for k in arrays if k.startswith("plan/")),
        "metadata": metadata,
    }
    try:
        text = json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata must be JSON-serialisable (finite numbers, str, list, dict): {e}") from None
    arrays["metadata"] = np.asarray(text)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_file(path, lambda f: f.write(buf.getvalue()))


def _check_shape(shape):
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"sample_shape must be a tuple of ints; got {shape!r}") from None
    if not shape or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in shape):
        raise ValueError(f"sample_shape must be a non-empty tuple of positive ints (one sample's shape, no batch "
                         f"axis); got {shape}")
    return tuple(int(s) for s in shape)


_ROW_FIELDS = ("t_eval", "ax", "t_state", "bx", "ay", "nz", "t_y", "t_model", "alpha", "sigma", "in_scale",
               "x_scale", "y_scale")
_REQUIRED = ("t_eval", "slot", "ax", "cx", "t_state", "t_model", "alpha", "sigma", "in_scale", "x_scale")


def load_solver(path: str | os.PathLike, *, schedule: Optional[NoiseSchedule] = None, sample_shape=None):
    """Load a solver saved by :func:`save_solver` as a :class:`dpmjax.Solver`.

    Everything is checked: the format and its version, the options (names, values, types),
    the layout, every table (names, shapes, dtypes, finite values) and their agreement.
    ``schedule``: the schedule you will sample with; refused (ValueError) when it is not the
    one the solver was built for (its recorded description, and its alpha, sigma and state
    scales at the solver's evaluation times). ``sample_shape``: refused when the file
    records another one. A missing, truncated or foreign file raises ValueError naming it.
    The round trip is exact (the arrays are stored as they are).

    Returns:
      The solver; its user metadata is ``dpmjax.learned.load_solver_metadata(path)["metadata"]``.
    """
    path = _fit._check_path(path)
    arrays, doc = _read(path)
    want = np.dtype(_solvers.compute_dtype()).name
    if doc.get("dtype") in ("float32", "float64") and doc["dtype"] != want:
        raise ValueError(f"solver file {path!r} computes in {doc['dtype']}, but JAX computes in {want} now (switch "
                         f"jax_enable_x64 {'on' if doc['dtype'] == 'float64' else 'off'} to load it)")
    bad = lambda why: ValueError(f"solver file {path!r} is not a valid dpmjax solver: {why}")  # noqa: E731
    try:
        solver = _from_arrays(arrays, doc)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise bad(f"{type(e).__name__}: {e}") from None
    if sample_shape is not None:
        sample_shape = _check_shape(sample_shape)
        saved = doc.get("sample_shape")
        if saved is not None and tuple(saved) != sample_shape:
            raise ValueError(f"solver file {path!r} was fitted for samples of shape {tuple(saved)}, not "
                             f"{sample_shape}")
        if solver.plan.g_p is not None and tuple(solver.plan.g_p.shape[1:]) != sample_shape:
            raise ValueError(f"solver file {path!r} holds per-dimension tables of shape "
                             f"{tuple(solver.plan.g_p.shape[1:])}, not {sample_shape}")
    if schedule is not None:
        _check_schedule(path, schedule, doc, arrays, solver)
    return solver


def load_solver_metadata(path: str | os.PathLike) -> dict:
    """The JSON document of a solver file (format, options, schedule description, the
    user's ``metadata``), without building the solver."""
    return _read(_fit._check_path(path))[1]


def _read(path):
    if not os.path.exists(path):
        raise ValueError(f"solver file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"solver file {path!r} is not a file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ValueError(f"solver file {path!r} cannot be read: {e.strerror}") from None
    if magic != b"PK\x03\x04":  # np.savez writes a zip archive; refuse anything else before np.load reads it
        raise ValueError(f"solver file {path!r} is not a dpmjax solver file (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        text = arrays.pop("metadata")
        if text.dtype.kind != "U" or text.shape != ():
            raise ValueError("the metadata entry is not a JSON string")
        doc = json.loads(str(text))
        if not isinstance(doc, dict):
            raise ValueError("the metadata is not a JSON object")
    except Exception as e:  # zipfile.BadZipFile, EOFError, KeyError, OSError, ValueError, ...
        raise ValueError(f"solver file {path!r} is not a dpmjax solver file: {type(e).__name__}: {e}") from None
    if doc.get("format") != FORMAT:
        raise ValueError(f"solver file {path!r} is not a dpmjax solver file (format {doc.get('format')!r})")
    if not isinstance(doc.get("format_version"), int) or doc["format_version"] > FORMAT_VERSION:
        raise ValueError(f"solver file {path!r} has format version {doc.get('format_version')!r}; this dpmjax "
                         f"reads versions up to {FORMAT_VERSION} (upgrade dpmjax)")
    return arrays, doc


def _options_from(d):
    fields = {f.name: f for f in dataclasses.fields(_solvers.Options)}
    if not isinstance(d, dict) or set(d) != set(fields):
        missing = sorted(set(fields) - set(d or {}))
        extra = sorted(set(d or {}) - set(fields))
        raise ValueError(f"options: missing {missing}, unknown {extra}")
    kw = {}
    for name, v in d.items():
        kw[name] = tuple(v) if isinstance(v, list) else v
    thr = kw.get("thresholding")
    if thr is not None:
        if not isinstance(thr, dict) or set(thr) != {"ratio", "max_val", "sample_max_value"}:
            raise ValueError(f"options.thresholding must be null or a thresholding object; got {thr!r}")
        kw["thresholding"] = _models.Thresholding(**thr)
    o = _solvers.Options(**kw)
    _solvers._choice("options.model_type", o.model_type, _models.MODEL_TYPES)
    _solvers._choice("options.algorithm", o.algorithm, _solvers.ALGORITHMS)
    _solvers._choice("options.method", o.method, _solvers.FIXED_METHODS)
    for name in ("order", "steps"):
        _solvers._integer(f"options.{name}", getattr(o, name), 1)
    for name in ("lower_order_final", "denoise_to_zero", "p_pseudo", "c_pseudo"):
        _solvers._boolean(f"options.{name}", getattr(o, name))
    for name in ("orders", "use_corrector", "ems_indexes", "corrector_orders"):
        if not isinstance(getattr(o, name), tuple):
            raise TypeError(f"options.{name} must be a list")
    return o


def _from_arrays(arrays, doc):
    opts = _options_from(doc["options"])
    lay = doc["layout"]
    layout = _up.Layout(x_step=tuple(int(i) for i in lay["x_step"]), y_step=tuple(int(i) for i in lay["y_step"]))
    n = len(layout.x_step)
    if len(layout.y_step) != n or n < 1 or n != doc["num_evals"]:
        raise ValueError(f"layout: x_step and y_step must both have num_evals = {doc['num_evals']} entries")
    names = {k[5:] for k in arrays if k.startswith("plan/")}
    if names != set(doc["plan_fields"]) or not set(_REQUIRED) <= names or not names <= set(_up.Plan._fields):
        raise ValueError(f"plan fields {sorted(names)} do not match the recorded {doc['plan_fields']}")
    dtype = np.dtype(doc["dtype"])
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64; got {dtype}")
    plan = {k: arrays[f"plan/{k}"] for k in names}
    K = plan["cx"].shape[1] if plan["cx"].ndim >= 2 else -1
    for k, a in plan.items():
        if k == "slot":
            if a.shape != (n,) or a.dtype.kind not in "iu" or np.any(a < 0) or np.any(a >= K):
                raise ValueError(f"plan/slot must be {n} ints in [0, {K}); got shape {a.shape}, dtype {a.dtype}")
            continue
        if a.dtype != dtype:
            raise ValueError(f"plan/{k} has dtype {a.dtype}, not {dtype}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"plan/{k} is not finite")
        if a.ndim == 0 or a.shape[0] != n:
            raise ValueError(f"plan/{k} must have one row per evaluation ({n}); got shape {a.shape}")
    if plan.get("g_p") is None:
        for k in names & set(_ROW_FIELDS):
            if plan[k].shape != (n,):
                raise ValueError(f"plan/{k} must have shape ({n},); got {plan[k].shape}")
        for k in names & {"cx", "cy"}:
            if plan[k].shape != (n, K):
                raise ValueError(f"plan/{k} must have shape ({n}, {K}); got {plan[k].shape}")
    if ("ay" in names) != ("cy" in names) or ("ay" in names) != ("t_y" in names):
        raise ValueError("plan: ay, cy and t_y go together")
    scales = {}
    for k in ("start_scale", "end_scale", "prior_std"):
        a = arrays[k]
        if a.shape != () or a.dtype != dtype or not np.isfinite(a) or not a > 0:
            raise ValueError(f"{k} must be a finite positive {dtype} scalar; got {a!r}")
        scales[k] = jnp.asarray(a)
    fields = {k: (jnp.asarray(plan[k]) if k in plan else None) for k in _up.Plan._fields}
    return _solvers.Solver(plan=_up.Plan(**fields), options=opts, layout=layout, **scales)


def _check_schedule(path, schedule, doc, arrays, solver):
    desc, tables = _schedule_description(schedule)
    saved = doc.get("schedule")
    if saved is not None:
        differs = saved.get("type") != desc["type"] or set(saved.get("fields", {})) != set(desc["fields"])
        if not differs:
            for k, v in desc["fields"].items():
                w = saved["fields"][k]
                differs |= (w != v) if not isinstance(v, float) else not (
                    isinstance(w, (int, float)) and math.isclose(w, v, rel_tol=1e-12))
        for k, v in tables.items():
            w = arrays.get(f"schedule/{k}")
            differs |= w is None or w.shape != v.shape or not np.allclose(w, v, rtol=1e-6, atol=1e-9)
        if differs:
            raise ValueError(f"solver file {path!r} was built for another schedule: {saved['type']} "
                             f"{saved.get('fields')}, not {desc['type']} {desc['fields']}")
    p = solver.plan
    t = jnp.asarray(p.t_eval)
    t_max = float(np.max(np.asarray(p.t_eval, np.float64)))
    if not t_max <= float(schedule.T) * (1 + 1e-6):
        raise ValueError(f"solver file {path!r} was built for another schedule: it evaluates the model at t = "
                         f"{t_max:g}, beyond the given {type(schedule).__name__}'s T = {float(schedule.T):g}")
    checks = (("alpha", schedule.alpha(t), p.alpha), ("sigma", schedule.sigma(t), p.sigma),
              ("in_scale", jnp.broadcast_to(schedule.state_scale(t), t.shape), p.in_scale))
    for name, want, have in checks:
        want, have = np.asarray(want, np.float64), np.asarray(have, np.float64)
        if not np.allclose(want, have, rtol=1e-4, atol=1e-7):
            raise ValueError(f"solver file {path!r} was built for another schedule: its {name} table differs from "
                             f"the given {type(schedule).__name__}'s (max difference "
                             f"{np.max(np.abs(want - have)):.3g})")
