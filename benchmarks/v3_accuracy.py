"""DPM-Solver-v3 against UniPC-bh2 and DPM-Solver++(3M) at few steps, on the mixtures of accuracy.py.

DPM-Solver-v3 (Zheng et al. 2023, arXiv:2310.13268) needs the model's empirical model
statistics (EMS). They are computed here with :func:`dpmjax.compute_ems` from samples of
the data distribution (the paper uses training data), for the concatenated problems of
``accuracy.py``'s ``make_problems`` at once: every EMS is per dimension and the problems'
coordinates do not interact (the model's Jacobian is block diagonal), so each block gets
the statistics it would get alone. The EMS time is reported.

For every NFE, the sample from a fixed ``x_T`` is compared with a float64 reference from
the same ``x_T`` (DPM-Solver++(3M), ``time_uniform``, ``2 x --ref-steps`` steps, checked
against ``--ref-steps``), as in ``accuracy.py``. Three measures per problem, each
summarised by its geometric mean over the problems:

* **RMS**: over samples and coordinates of ``x_sampler - x_ref`` at ``t_end`` (the
  measure of ``accuracy.py``);
* **median**: the median over samples of the per-sample RMS over coordinates;
* **flips**: the fraction of samples whose nearest mixture mean differs from the
  reference's (a sample that ends in another mode costs about the distance between modes,
  so a few flips dominate the RMS of these sharp mixtures; the median ignores them).

Rows, all on the ``logSNR`` grid (v3's snapped to the EMS grid points, which moves its
time steps by at most half an EMS interval) unless named *fitted*:

* ``DPM-Solver-v3``: order 3 with the authors' CIFAR-10 (ScoreSDE) settings per NFE
  (5 NFE: ``p_pseudo=True, lower_order_final=False``; 6-8 NFE: ``p_pseudo=False,
  lower_order_final=True``; 9-10 NFE: as 6-8 without the corrector; always
  ``c_pseudo=False``);
* ``DPM-Solver-v3, corrector on``: the same with the corrector at every NFE;
* ``v3, degenerate EMS``: the first row's settings with ``l = 1, s = b = 0``
  (data-prediction UniPC with exact weights): what the statistics themselves contribute;
* ``UniPC-bh2 order 3`` and ``DPM-Solver++(3M)``: dpmjax's other methods;
* ``UniPC-bh2 order 3, fitted grid``: on the grid :func:`dpmjax.fit_timesteps` fits for
  it (solver times only, from other starting noise than the evaluation's), and
  ``DPM-Solver-v3, fitted grid``: v3 (first row's settings) on that grid, snapped to the
  EMS points (``sample(method="v3", timesteps=...)``).

Run::

    python benchmarks/v3_accuracy.py            # ~5 min on 2 CPU cores
    python benchmarks/v3_accuracy.py --schedules VPLinear --batch 256   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from accuracy import SCHEDULES, geomean, make_problems, make_schedule, mixture_ems, mixture_model, rms_per_problem
from report import provenance, write_markdown

NFES = (5, 6, 8, 10)


def v3_settings(nfe, corrector=None):
    """The authors' DPM-Solver-v3 settings for an NFE (their ScoreSDE CIFAR-10 script:
    order 3; the corrector up to 8 NFE unless ``corrector`` says otherwise)."""
    few = nfe <= 5
    return dict(method="v3", order=3, use_corrector=nfe <= 8 if corrector is None else corrector, p_pseudo=few,
                c_pseudo=False, lower_order_final=not few)


BASELINES = [
    ("UniPC-bh2 order 3", dict(algorithm="dpmsolver++", method="unipc", order=3, variant="bh2")),
    ("DPM-Solver++(3M)", dict(algorithm="dpmsolver++", method="multistep", order=3)),
]


def run_schedule(schedule_name, nfes, batch, ref_steps, n_lambdas, ems_samples, fit_batch, log):
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import dpmjax

    schedule = make_schedule(schedule_name, dpmjax)
    problems = make_problems(jnp, dpmjax)
    mixtures = tuple(gm for _, gm in problems)
    model_fn, bounds = mixture_model(schedule, mixtures, jnp)
    dim = int(bounds[-1])

    x_T = jax.random.normal(jax.random.key(42), (batch, dim), jnp.float64)

    def sample(steps, **kw):
        return dpmjax.sample(model_fn, mixtures, None, x_T.shape, schedule=schedule, noise=x_T, steps=steps, **kw)

    def rms(x, ref):
        return rms_per_problem(x, ref, bounds)

    def median(x, ref):
        d = np.asarray(x - ref)
        return [float(np.median(np.sqrt(np.mean(d[:, a:b] ** 2, axis=1)))) for a, b in zip(bounds[:-1], bounds[1:])]

    def nearest(x, gm):
        return np.argmin(np.sum((x[:, None, :] - np.asarray(gm.means)[None]) ** 2, -1), 1)

    def flips(x, ref):
        x, ref = np.asarray(x), np.asarray(ref)
        return [float(np.mean(nearest(x[:, a:b], gm) != nearest(ref[:, a:b], gm)))
                for gm, a, b in zip(mixtures, bounds[:-1], bounds[1:])]

    def measure(x, ref):
        return dict(rms=rms(x, ref), median=median(x, ref), flips=flips(x, ref))

    t0 = time.perf_counter()

    def note(msg):
        log.append(f"[{schedule_name}] {msg} at {time.perf_counter() - t0:.1f}s")
        print(log[-1], flush=True)

    ref = sample(ref_steps, skip_type="time_uniform", algorithm="dpmsolver++", method="multistep", order=3)
    ref2 = sample(2 * ref_steps, skip_type="time_uniform", algorithm="dpmsolver++", method="multistep", order=3)
    check = rms(ref, ref2)
    note("reference done")

    ems, ems_time = mixture_ems(jax, dpmjax, model_fn, mixtures, schedule, n_lambdas, ems_samples)
    note(f"EMS done ({ems_time:.1f}s)")
    degenerate = dpmjax.degenerate_ems(schedule, (dim,), n=n_lambdas - 1)

    errors = {}
    for nfe in nfes:
        errors[("DPM-Solver-v3", nfe)] = measure(sample(nfe, skip_type="logSNR", ems=ems, **v3_settings(nfe)), ref2)
        errors[("DPM-Solver-v3, corrector on", nfe)] = measure(
            sample(nfe, skip_type="logSNR", ems=ems, **v3_settings(nfe, corrector=True)), ref2)
        errors[("v3, degenerate EMS", nfe)] = measure(sample(nfe, skip_type="logSNR", ems=degenerate,
                                                             **v3_settings(nfe)), ref2)
        for label, kw in BASELINES:
            errors[(label, nfe)] = measure(sample(nfe, skip_type="logSNR", **kw), ref2)
    note("solvers done")
    fit_seconds = {}
    if fit_batch:
        x_fit = jax.random.normal(jax.random.key(11), (fit_batch, dim), jnp.float64)
        unipc = dict(BASELINES)["UniPC-bh2 order 3"]
        for nfe in nfes:
            t2 = time.perf_counter()
            grid = dpmjax.fit_timesteps(model_fn, mixtures, None, x_fit.shape, noise=x_fit, schedule=schedule,
                                        steps=nfe, model_times=False, **unipc)
            ts = np.asarray(jax.block_until_ready(grid).timesteps, np.float64)
            fit_seconds[nfe] = time.perf_counter() - t2
            errors[("UniPC-bh2 order 3, fitted grid", nfe)] = measure(sample(nfe, timesteps=ts, **unipc), ref2)
            ts_v3 = ts.copy()
            ts_v3[[0, -1]] = dpmjax.solvers.v3_range(schedule, ems)  # the fitted grid's ends are the EMS range's
            errors[("DPM-Solver-v3, fitted grid", nfe)] = measure(
                sample(nfe, timesteps=ts_v3, ems=ems, **v3_settings(nfe)), ref2)
        note("fitted grids done")
    return dict(schedule=schedule_name, problems=[n for n, _ in problems], check=check, ems_time=ems_time,
                errors=errors, fit_seconds=fit_seconds)


ROWS = ("DPM-Solver-v3", "DPM-Solver-v3, corrector on", "v3, degenerate EMS", "UniPC-bh2 order 3", "DPM-Solver++(3M)",
        "UniPC-bh2 order 3, fitted grid", "DPM-Solver-v3, fitted grid")
MEASURES = (("rms", "RMS error"), ("median", "median per-sample error"),
            ("flips", "fraction of samples in another mode"))


def table(res, nfes, measure="rms", which=None):
    lines = ["| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for label in ROWS:
        if (label, nfes[0]) not in res["errors"]:
            continue
        cells = []
        for n in nfes:
            e = res["errors"][(label, n)][measure]
            v = (geomean(e) if measure != "flips" else float(np.mean(e))) if which is None else e[which]
            cells.append(f"{v:.2e}" if measure != "flips" else f"{100 * v:.1f} %")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1000, help="samples per problem (default 1000)")
    p.add_argument("--ref-steps", type=int, default=2000, help="reference steps (checked against 2x; default 2000)")
    p.add_argument("--n-lambdas", type=int, default=1201, help="EMS grid points (default 1201, the authors')")
    p.add_argument("--ems-samples", type=int, default=4096, help="data samples per EMS grid point (default 4096)")
    p.add_argument("--nfes", default=",".join(map(str, NFES)), help="comma-separated NFE list")
    p.add_argument("--schedules", default=",".join(SCHEDULES), help=f"comma-separated subset of {SCHEDULES}")
    p.add_argument("--fit-batch", type=int, default=256, help="trajectories fit_timesteps fits the grids on "
                   "(default 256; 0: no fitted-grid rows)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    nfes = tuple(int(n) for n in args.nfes.split(","))
    chosen = [s for s in SCHEDULES if s in args.schedules.split(",")]
    if not chosen:
        p.error(f"--schedules must name some of {SCHEDULES}")
    prov = provenance(None if argv is None else [__file__, *argv])
    t0 = time.perf_counter()
    log = []
    results = [run_schedule(s, nfes, args.batch, args.ref_steps, args.n_lambdas, args.ems_samples, args.fit_batch,
                            log) for s in chosen]
    wall = time.perf_counter() - t0

    lines = ["# DPM-Solver-v3 accuracy", ""]
    lines += [
        f"float64; {args.batch} samples from one fixed x_T per problem; EMS on {args.n_lambdas} lambdas x "
        f"{args.ems_samples} data samples; wall time {wall:.0f}s.",
        "",
        "Error = RMS over samples and coordinates of (sample - reference) at t_end, the reference being "
        f"DPM-Solver++(3M), time_uniform, {2 * args.ref_steps} steps. Problems: "
        + "; ".join(results[0]["problems"]) + ".",
        "",
    ]
    for res in results:
        fits = ", ".join(f"NFE {n} {t:.0f}s" for n, t in res["fit_seconds"].items())
        lines += [f"## {res['schedule']}", "",
                  f"EMS time (compute_ems, compilation included): {res['ems_time']:.1f}s. Reference check "
                  f"({args.ref_steps} vs {2 * args.ref_steps} steps): " + ", ".join(f"{e:.1e}" for e in res["check"])
                  + (f". fit_timesteps time: {fits}." if fits else "."), ""]
        for measure, title in MEASURES:
            summary = "mean" if measure == "flips" else "geometric mean"
            lines += [f"{title.capitalize()}, {summary} over the problems:", ""] + table(res, nfes, measure) + [""]
        for j, prob in enumerate(res["problems"]):
            lines += [f"### {res['schedule']}: {prob}", ""]
            for measure, title in MEASURES:
                lines += [f"{title.capitalize()}:", ""] + table(res, nfes, measure, j) + [""]
    lines += ["## Log", ""] + [f"    {line}" for line in log] + [""]
    partial = len(chosen) < len(SCHEDULES) or nfes != NFES
    name = "v3_accuracy_partial" if partial else "v3_accuracy"
    write_markdown(os.path.join(args.out, name + ".md"), lines, prov=prov)
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump({"provenance": prov, "results": [
            {**r, "errors": [[*k, v] for k, v in r["errors"].items()],
             "fit_seconds": {str(k): v for k, v in r["fit_seconds"].items()}} for r in results]}, f)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
