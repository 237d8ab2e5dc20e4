"""Accuracy of dpmjax's samplers against a converged solution of the probability-flow ODE.

The data distributions are Gaussian mixtures with small component stds (sharp modes,
a hard problem for few steps), whose exact noise predictor needs no training
(:class:`dpmjax.GaussianMixture`). For every solver, skip type and NFE the sample from
a fixed ``x_T`` is compared with a float64 reference from the same ``x_T``: dpmjax
multistep order 3 on a ``time_uniform`` grid of many steps, checked against twice as
many steps and against an independent classical RK4 in ``t``. The error is the RMS over
samples and coordinates of ``x_sampler - x_ref`` at ``t_end``.

All problems are solved at once: the state concatenates their coordinates, and the model
returns the concatenation of their noise predictions. This is exact, not an
approximation: every solver update is coordinate-wise linear with scalar (per-step)
coefficients, so each block follows the same trajectory as if it were solved alone;
and it makes one compilation serve all problems.

Generic ODE solvers (Euler, Heun, RK4 in ``t``) integrate the PF-ODE

    dx/dt = f(t) x + g(t)^2 / (2 sigma_t) eps(x, t)    (DPM-Solver eq. 2.4),
    f = d log alpha / dt,   g^2 = d sigma^2 / dt - 2 f sigma^2,

on the same time grids, with at most the same NFE (Heun 2, RK4 4 evaluations per step).

Everything runs in float64 (``jax_enable_x64``) so that the table measures the
discretisation error and not float32 rounding.

Run::

    python benchmarks/accuracy.py           # full table (~300 compilations: 15-45 min on 2 CPU cores;
                                            #   add --cache-dir DIR and a rerun takes ~5 min)
    python benchmarks/accuracy.py --quick   # NFE 5/10/20, 256 samples (~100 compilations, ~7 min)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing as mp
import os
import sys
import time

import numpy as np

from report import command, header, provenance

NFES = (5, 6, 8, 10, 15, 20, 50)
QUICK_NFES = (5, 10, 20)

#: (label, sample() keyword arguments)
SOLVERS = [
    ("DDIM", dict(algorithm="dpmsolver++", method="multistep", order=1)),
    ("DPM-Solver-fast (1S-3)", dict(algorithm="dpmsolver", method="singlestep", order=3)),
    ("DPM-Solver-2M", dict(algorithm="dpmsolver", method="multistep", order=2)),
    ("DPM-Solver-3M", dict(algorithm="dpmsolver", method="multistep", order=3)),
    ("DPM-Solver++(2M)", dict(algorithm="dpmsolver++", method="multistep", order=2)),
    ("DPM-Solver++(3M)", dict(algorithm="dpmsolver++", method="multistep", order=3)),
    ("UniPC-bh2 order 2", dict(algorithm="dpmsolver++", method="unipc", order=2, variant="bh2")),
    ("UniPC-bh2 order 3", dict(algorithm="dpmsolver++", method="unipc", order=3, variant="bh2")),
]
#: DPM-Solver-v3 with statistics from dpmjax.compute_ems (v3_accuracy.py's settings per NFE)
V3_LABEL = "DPM-Solver-v3 (EMS)"
GENERIC = ("Euler", "Heun", "RK4")
EVALS_PER_STEP = {"Euler": 1, "Heun": 2, "RK4": 4}

#: dpmjax's defaults (sampler.sample): the row the recommendation is compared with.
DEFAULT = ("DPM-Solver++(2M)", "time_uniform")


# --------------------------------------------------------------------------- problems


def make_problems(jnp, dpmjax):
    """Three mixtures with sharp modes: (name, mixture). Deterministic."""
    rng = np.random.default_rng(0)
    ang = 2 * np.pi * np.arange(8) / 8
    ring = dpmjax.GaussianMixture.isotropic(np.stack([np.cos(ang), np.sin(ang)], 1), 0.05)
    m8 = rng.normal(size=(5, 8)) / np.sqrt(8) * 1.5
    m16 = rng.normal(size=(6, 16)) / np.sqrt(16) * 1.5
    return [
        ("2-D, 8 modes (ring r=1, std 0.05)", ring),
        ("8-D, 5 modes (std 0.05)", dpmjax.GaussianMixture.isotropic(m8, 0.05, weights=[1, 2, 3, 2, 1])),
        ("16-D, 6 modes (std 0.1)", dpmjax.GaussianMixture.isotropic(m16, 0.1)),
    ]


def mixture_model(schedule, mixtures, jnp):
    """``(model_fn, bounds)``: the exact noise predictors of ``mixtures`` side by side (the
    state concatenates their coordinates; problem ``j`` is ``x[:, bounds[j]:bounds[j + 1]]``)."""
    bounds = np.cumsum([0, *[gm.dim for gm in mixtures]])

    def model_fn(params, x, t_model):
        t = schedule.solver_time(t_model)
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        parts = [gm.eps(x[:, a:b], alpha, sigma) for gm, a, b in zip(params, bounds[:-1], bounds[1:])]
        return jnp.concatenate(parts, axis=-1)

    return model_fn, bounds


def rms_per_problem(x, ref, bounds):
    """The RMS over samples and coordinates of ``x - ref``, one per problem."""
    d = np.asarray(x - ref)
    return [float(np.sqrt(np.mean(d[:, a:b] ** 2))) for a, b in zip(bounds[:-1], bounds[1:])]


def mixture_ems(jax, dpmjax, model_fn, mixtures, schedule, n_lambdas, n_samples):
    """``(ems, seconds)``: DPM-Solver-v3's statistics of the side-by-side mixtures from
    ``n_samples`` data samples of each on ``n_lambdas`` lambdas (compilation included).
    Every statistic is per dimension and the problems' coordinates do not interact, so
    each block gets the statistics it would get alone."""
    keys = jax.random.split(jax.random.key(7), len(mixtures))
    data = jax.numpy.concatenate([gm.sample(k, n_samples) for gm, k in zip(mixtures, keys)], axis=1)
    t0 = time.perf_counter()
    ems = jax.block_until_ready(dpmjax.compute_ems(
        model_fn, mixtures, jax.random.key(3), data.shape[1:], schedule=schedule, data=data, n_lambdas=n_lambdas,
        batch_size=min(n_samples, 1024)))
    return ems, time.perf_counter() - t0


def make_schedule(name, dpmjax):
    if name == "VPLinear":
        return dpmjax.VPLinear()
    return dpmjax.VPDiscrete.from_named("linear", 1000)


SCHEDULES = ("VPLinear", "VPDiscrete linear-1000")


def skip_types(schedule_name):
    return ("logSNR", "time_uniform") if schedule_name == "VPLinear" else ("logSNR", "time_uniform", "time_quadratic")


# --------------------------------------------------------------------------- worker


def run_schedule(schedule_name, nfes, batch, ref_steps, cache_dir, only=None, ems_lambdas=1201, ems_samples=4096):
    """Errors of every solver for one schedule (runs in its own process)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    if cache_dir:  # persistent compilation cache: a rerun compiles nothing
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    import jax.numpy as jnp

    import dpmjax

    schedule = make_schedule(schedule_name, dpmjax)
    problems = make_problems(jnp, dpmjax)
    mixtures = tuple(gm for _, gm in problems)
    model_fn, bounds = mixture_model(schedule, mixtures, jnp)
    x_T = jax.random.normal(jax.random.key(42), (batch, int(bounds[-1])), jnp.float64)
    t_start, t_end = schedule.T, schedule.t_eps

    def sample(steps, skip_type, **kw):
        return dpmjax.sample(
            model_fn, mixtures, None, x_T.shape, schedule=schedule, noise=x_T, steps=steps, skip_type=skip_type, **kw
        )

    def rms(x, ref):
        return rms_per_problem(x, ref, bounds)

    # --- generic solvers on the PF-ODE, one compilation each (grid padded, n traced).
    def drift(params, x, t):
        f = jax.grad(schedule.log_alpha)(t)
        dlog_sigma = jax.grad(schedule.log_sigma)(t)
        sigma = schedule.sigma(t)
        g2 = 2.0 * sigma**2 * (dlog_sigma - f)
        t_model = jnp.broadcast_to(schedule.model_time(t), (x.shape[0],))
        # grad log p_t = -eps / sigma, so dx/dt = f x - g^2/2 grad log p = f x + g^2/(2 sigma) eps
        # (DPM-Solver, Lu et al. 2022, eq. 2.4)
        return f * x + g2 / (2.0 * sigma) * model_fn(params, x, t_model)

    def make_generic(kind):
        @jax.jit
        def solve(params, x, ts, n):
            def step(i, x):
                t0, t1 = ts[i], ts[i + 1]
                h = t1 - t0
                k1 = drift(params, x, t0)
                if kind == "Euler":
                    return x + h * k1
                if kind == "Heun":
                    k2 = drift(params, x + h * k1, t1)
                    return x + 0.5 * h * (k1 + k2)
                tm = t0 + 0.5 * h
                k2 = drift(params, x + 0.5 * h * k1, tm)
                k3 = drift(params, x + 0.5 * h * k2, tm)
                k4 = drift(params, x + h * k3, t1)
                return x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)

            return jax.lax.fori_loop(0, n, step, x)

        return solve

    generic = {k: make_generic(k) for k in GENERIC}

    def run_generic(kind, skip_type, n, pad):
        ts = np.asarray(dpmjax.time_grid(schedule, skip_type, t_start, t_end, n))
        ts = np.concatenate([ts, np.full(pad - n, t_end)])
        return generic[kind](mixtures, x_T, jnp.asarray(ts), n)

    log = []
    t0 = time.perf_counter()

    def note(msg):
        log.append(f"[{schedule_name}] {msg} at {time.perf_counter() - t0:.1f}s")
        print(log[-1], flush=True)

    ref = sample(ref_steps, "time_uniform", algorithm="dpmsolver++", method="multistep", order=3)
    ref2 = sample(2 * ref_steps, "time_uniform", algorithm="dpmsolver++", method="multistep", order=3)
    rk4 = run_generic("RK4", "time_uniform", ref_steps, ref_steps)  # 4 ref_steps NFE
    checks = {
        f"{ref_steps} vs {2 * ref_steps} steps (dpmjax 3M, time_uniform)": rms(ref, ref2),
        f"vs classical RK4 in t, {ref_steps} steps": rms(ref, rk4),
    }
    note("reference done")

    errors = {}  # (label, skip_type, nfe) -> [rms per problem]
    actual_nfe = {}
    for label, kw in SOLVERS:
        if only and only not in label:
            continue
        for skip in skip_types(schedule_name):
            for nfe in nfes:
                errors[(label, skip, nfe)] = rms(sample(nfe, skip, **kw), ref2)
                actual_nfe[(label, skip, nfe)] = nfe
        note(f"{label} done")
    ems_time = None
    if ems_lambdas and (not only or only in V3_LABEL):
        from v3_accuracy import v3_settings

        ems, ems_time = mixture_ems(jax, dpmjax, model_fn, mixtures, schedule, ems_lambdas, ems_samples)
        note(f"EMS ({ems_lambdas} lambdas x {ems_samples} samples) done in {ems_time:.0f}s")
        for skip in skip_types(schedule_name):
            for nfe in nfes:
                errors[(V3_LABEL, skip, nfe)] = rms(sample(nfe, skip, ems=ems, **v3_settings(nfe)), ref2)
                actual_nfe[(V3_LABEL, skip, nfe)] = nfe
        note(f"{V3_LABEL} done")
    pad = max(nfes)
    for kind in GENERIC:
        for skip in ("time_uniform", "logSNR"):
            for nfe in nfes:
                n = nfe // EVALS_PER_STEP[kind]
                if n < 1:
                    continue
                errors[(kind, skip, nfe)] = rms(run_generic(kind, skip, n, pad), ref2)
                actual_nfe[(kind, skip, nfe)] = n * EVALS_PER_STEP[kind]
    note("generic solvers done")
    return dict(
        schedule=schedule_name,
        problems=[name for name, _ in problems],
        checks=checks,
        errors=errors,
        actual_nfe=actual_nfe,
        ems=None if ems_time is None else dict(lambdas=ems_lambdas, samples=ems_samples, seconds=ems_time),
        log=log,
        backend=f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}",
    )


# --------------------------------------------------------------------------- report


def geomean(v):
    return float(np.exp(np.mean(np.log(np.maximum(v, 1e-300)))))


def rows_of(res):
    """Row keys (label, skip) in display order."""
    keys = []
    for label, _ in SOLVERS + [(V3_LABEL, None)]:
        for skip in skip_types(res["schedule"]):
            keys.append((label, skip))
    for kind in GENERIC:
        for skip in ("time_uniform", "logSNR"):
            keys.append((kind, skip))
    return keys


def fmt(e):
    return "—" if e is None else (f"{e:.2e}" if e < 1e3 else "diverged" if not math.isfinite(e) else f"{e:.1e}")


def table(res, nfes, which):
    """Markdown table; ``which`` is a problem index or ``None`` for the geometric mean."""
    head = "| solver | skip | " + " | ".join(f"NFE {n}" for n in nfes) + " |"
    lines = [head, "|---|---|" + "---:|" * len(nfes)]
    for label, skip in rows_of(res):
        cells = []
        for n in nfes:
            e = res["errors"].get((label, skip, n))
            if e is None:
                cells.append("—")
                continue
            v = geomean(e) if which is None else e[which]
            cell = fmt(v)
            if res["actual_nfe"][(label, skip, n)] != n:
                cell += f" ({res['actual_nfe'][(label, skip, n)]})"
            cells.append(cell)
        lines.append(f"| {label} | {skip} | " + " | ".join(cells) + " |")
    return lines


def ranking(results, nfe, top=6):
    """dpmjax configurations ranked by the geometric mean error over all problems and schedules."""
    score = {}
    for label, _ in SOLVERS:
        for skip in ("logSNR", "time_uniform"):
            errs = []
            for res in results:
                errs += res["errors"].get((label, skip, nfe), [])
            if errs:
                score[(label, skip)] = geomean(errs)
    # time_quadratic exists only for the discrete schedule: rank it among that schedule's rows
    return sorted(score.items(), key=lambda kv: kv[1])[:top], score


def plot(results, nfes, path, prov=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_prob = len(results[0]["problems"])
    fig, axes = plt.subplots(len(results), n_prob, figsize=(5.2 * n_prob, 4.6 * len(results)), squeeze=False)
    from matplotlib.ticker import NullFormatter

    palette = [plt.get_cmap("tab10")(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]  # no grey: generic solvers are grey
    styles = {"logSNR": "-", "time_uniform": "--", "time_quadratic": ":"}
    for i, res in enumerate(results):
        for j, prob in enumerate(res["problems"]):
            ax = axes[i, j]
            for c, (label, _) in enumerate(SOLVERS):
                for skip in skip_types(res["schedule"]):
                    if (label, skip, nfes[0]) not in res["errors"]:
                        continue
                    ys = [res["errors"][(label, skip, n)][j] for n in nfes]
                    ax.loglog(nfes, ys, styles[skip], color=palette[c], marker=".", lw=1.2,
                              label=f"{label} {skip}" if i == 0 and j == 0 else None)
            for k, kind in enumerate(GENERIC):
                xs = [res["actual_nfe"][(kind, "time_uniform", n)]
                      for n in nfes if (kind, "time_uniform", n) in res["errors"]]
                ys = [res["errors"][(kind, "time_uniform", n)][j]
                      for n in nfes if (kind, "time_uniform", n) in res["errors"]]
                ax.loglog(xs, ys, "-", color=str(0.25 + 0.25 * k), marker="x", lw=1.0,
                          label=f"{kind} (t, time_uniform)" if i == 0 and j == 0 else None)
            ax.set_title(f"{res['schedule']}\n{prob}", fontsize=9)
            ax.set_xlabel("NFE")
            ax.set_ylabel("RMS error vs reference")
            ax.set_xticks(list(nfes))
            ax.set_xticklabels([str(n) for n in nfes])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1 + 0.12 / len(results), 1, 1))
    meta = {"Software": "dpmjax benchmarks/accuracy.py"}
    if prov:  # where the numbers came from, in the PNG's text chunks
        meta["Description"] = "; ".join(f"{k}: {v}" for k, v in prov.items())
    fig.savefig(path, dpi=110, metadata=meta)
    plt.close(fig)


def report(results, nfes, args, wall):
    lines = ["# dpmjax accuracy benchmark", ""]
    lines += [
        f"Backend {results[0]['backend']}; float64 throughout; {args.batch} samples from one fixed x_T per "
        f"problem; wall time {wall:.0f}s (`python benchmarks/accuracy.py{' --quick' if args.quick else ''}`).",
        "",
        "Error = RMS over samples and coordinates of (sample - reference) at t_end (the schedule's t_eps), "
        "all from the same x_T at t = T. Reference: dpmjax DPM-Solver++(3M), time_uniform, "
        f"{2 * args.ref_steps} steps. A cell `x (n)` ran only n <= NFE evaluations (Heun: 2 per step, RK4: 4). "
        "Generic solvers integrate the PF-ODE in t on the named grid.",
        "",
        "Problems (exact noise predictor, `dpmjax.GaussianMixture.isotropic`): "
        + "; ".join(results[0]["problems"]) + ".",
        "",
        "## Reference checks (RMS difference per problem)",
        "",
    ]
    for res in results:
        for name, v in res["checks"].items():
            lines.append(f"- {res['schedule']}: {name}: " + ", ".join(f"{e:.1e}" for e in v))
    lines.append("")

    # Recommendation, from the numbers.
    lines += ["## Recommended defaults", ""]
    for nfe in (10, 20):
        if nfe not in nfes:
            continue
        best, score = ranking(results, nfe)
        d = score.get(DEFAULT)
        lines.append(f"**NFE {nfe}**, geometric mean of the RMS error over all problems and schedules "
                     "(skip types logSNR / time_uniform):")
        lines.append("")
        lines.append("| rank | solver | skip | geo-mean error | vs current default |")
        lines.append("|---:|---|---|---:|---:|")
        for r, ((label, skip), v) in enumerate(best, 1):
            lines.append(f"| {r} | {label} | {skip} | {v:.2e} | {v / d:.2f}x |" if d
                         else f"| {r} | {label} | {skip} | {v:.2e} | |")
        if d:
            lines.append(f"| — | {DEFAULT[0]} (default) | {DEFAULT[1]} | {d:.2e} | 1.00x |")
        lines.append("")
    lines += ["<!-- RECOMMENDATION -->", ""]

    for res in results:
        lines += [f"## {res['schedule']}", ""]
        if res.get("ems"):
            e = res["ems"]
            lines += [f"`{V3_LABEL}`: DPM-Solver-v3 with statistics from `dpmjax.compute_ems` on {e['lambdas']} "
                      f"lambdas x {e['samples']} data samples per problem (computed in {e['seconds']:.0f}s, "
                      "compilation included), order 3 with the authors' CIFAR-10 settings per NFE (see "
                      "`v3_accuracy.py`, which also reports the median error and the samples that change mode).", ""]
        lines += ["Geometric mean over the problems:", ""] + table(res, nfes, None) + [""]
        for j, prob in enumerate(res["problems"]):
            lines += [f"### {res['schedule']}: {prob}", ""] + table(res, nfes, j) + [""]
    fitted = os.path.join(args.out, "fitted_grids.md")  # written by fitted_grids.py; kept in this report
    if os.path.exists(fitted):
        from fitted_grids import BEGIN, END  # the markers fitted_grids.py rewrites between

        with open(fitted) as f:
            lines += [BEGIN, f.read().rstrip("\n"), END, ""]
    lines += ["## Log", ""] + [f"    {l}" for res in results for l in res["log"]] + [""]
    return lines


FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
RECOMMENDATION_FILE = os.path.join(os.path.dirname(__file__), "accuracy_recommendation.md")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="NFE 5/10/20, 256 samples, shorter reference")
    p.add_argument("--batch", type=int, default=None, help="samples per problem (default 1000, quick 256)")
    p.add_argument("--ref-steps", type=int, default=None,
                   help="reference steps (checked against 2x; default 4000, quick 2000)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (one per schedule)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--cache-dir", default=None, help="JAX persistent compilation cache (makes reruns fast)")
    p.add_argument("--nfes", default=None, help="comma-separated NFE list (overrides the default)")
    p.add_argument("--schedules", default=",".join(SCHEDULES), help=f"comma-separated subset of {SCHEDULES}")
    p.add_argument("--replot", default=None, help="only redraw the PNG from a results JSON written by a run")
    p.add_argument("--only", default=None, help="run only the dpmjax solvers whose label contains this (smoke tests)")
    p.add_argument("--ems-lambdas", type=int, default=1201, help="EMS grid of the DPM-Solver-v3 rows (default 1201, "
                   "the authors'; 0: no v3 rows)")
    p.add_argument("--ems-samples", type=int, default=4096, help="data samples per EMS grid point (default 4096)")
    args = p.parse_args(argv)
    args.batch = args.batch or (256 if args.quick else 1000)
    args.ref_steps = args.ref_steps or (2000 if args.quick else 4000)
    nfes = QUICK_NFES if args.quick else NFES
    if args.nfes:
        nfes = tuple(int(n) for n in args.nfes.split(","))
    os.makedirs(args.out, exist_ok=True)
    # Hundreds of small programs are compiled once and run once: spend less time in LLVM
    # (changes results only in the last bit; inherited by the worker processes).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAGS).strip()

    if args.replot:
        with open(args.replot) as f:
            raw = json.load(f)
        prov = {}
        if isinstance(raw, dict):  # {"provenance": ..., "results": [...]}; a bare list from older runs
            prov, raw = raw.get("provenance", {}), raw["results"]
        results = [{**r, "errors": {tuple(e[:3]): e[3] for e in r["errors"]},
                    "actual_nfe": {tuple(e[:3]): e[3] for e in r["actual_nfe"]}} for r in raw]
        nfes = tuple(sorted({k[2] for k in results[0]["errors"]}))
        plot(results, nfes, args.replot.replace(".json", ".png"), {**prov, "redrawn by": command()})
        return 0
    prov = provenance(None if argv is None else [__file__, *argv])
    t0 = time.perf_counter()
    chosen = [s for s in SCHEDULES if s in args.schedules.split(",")]
    if not chosen:
        p.error(f"--schedules must name some of {SCHEDULES}")
    jobs = [(s, nfes, args.batch, args.ref_steps, args.cache_dir, args.only, args.ems_lambdas, args.ems_samples)
            for s in chosen]
    if args.jobs > 1:
        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as ex:
            results = list(ex.map(run_schedule, *zip(*jobs)))
    else:
        results = [run_schedule(*j) for j in jobs]
    wall = time.perf_counter() - t0

    suffix = "_quick" if args.quick else ""
    if args.only or args.nfes or len(chosen) < len(SCHEDULES):
        suffix = "_partial"
    with open(os.path.join(args.out, f"accuracy{suffix}.json"), "w") as f:  # raw numbers
        json.dump({"provenance": prov,
                   "results": [{**r, "errors": [[*k, v] for k, v in r["errors"].items()],
                                "actual_nfe": [[*k, v] for k, v in r["actual_nfe"].items()]} for r in results]}, f)
    lines = report(results, nfes, args, wall)
    lines = lines[:2] + header(prov) + lines[2:]  # after the title
    text = "\n".join(lines)
    if os.path.exists(RECOMMENDATION_FILE):
        with open(RECOMMENDATION_FILE) as f:
            text = text.replace("<!-- RECOMMENDATION -->", f.read().strip())
    md = os.path.join(args.out, f"accuracy{suffix}.md")
    png = os.path.join(args.out, f"accuracy{suffix}.png")
    with open(md, "w") as f:
        f.write(text)
    plot(results, nfes, png, prov)
    print(text.split("## VPLinear")[0])
    print(f"written {md} and {png} ({wall:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
