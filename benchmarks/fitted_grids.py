"""Fitted time grids (``dpmjax.fit_timesteps``) against every fixed grid, at 5-10 NFE.

For each Gaussian mixture of the accuracy benchmark (``accuracy.make_problems``; exact
noise predictor, VPLinear schedule), each solver and each NFE:

1. fit a grid with ``dpmjax.fit_timesteps`` on one set of starting noises (``--fit``
   trajectories, key 1), in float32 as a user would: with its defaults (the solver's grid
   and the network's time at each evaluation) and with ``model_times=False`` (the grid
   alone);
2. evaluate it on *fresh* starting noises (``--eval`` samples, key 2) in float64, with
   the error of the accuracy benchmark: RMS over samples and coordinates of
   ``x_sampler - x_ref`` at ``t_end``, where ``x_ref`` is DPM-Solver++(3M) with 1000
   logSNR steps from the same noise;
3. compare with the best of the fixed grids (logSNR, time_uniform, time_quadratic,
   karras, edm) for the same solver, NFE and evaluation noises.

The table goes to ``results/fitted_grids.md`` (and ``.json``) and is copied into
``results/accuracy.md`` between the ``FITTED`` markers (``accuracy.py`` keeps it there).

Run::

    python benchmarks/fitted_grids.py            # ~25-35 min on 2 CPU cores
    python benchmarks/fitted_grids.py --problems 0 --nfes 6   # one NFE, both solvers, ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

from report import header, provenance

sys.path.insert(0, os.path.dirname(__file__))

SOLVERS = [
    ("DPM-Solver++(2M)", dict(algorithm="dpmsolver++", method="multistep", order=2)),
    ("UniPC-bh2 order 2", dict(algorithm="dpmsolver++", method="unipc", order=2, variant="bh2")),
    ("UniPC-bh2 order 3", dict(algorithm="dpmsolver++", method="unipc", order=3, variant="bh2")),
    ("DPM-Solver++(3M)", dict(algorithm="dpmsolver++", method="multistep", order=3)),
]
DEFAULT_SOLVERS = "0,1"
NFES = (5, 6, 8, 10)
RESULTS = os.path.join(os.path.dirname(__file__), "results")
BEGIN, END = "<!-- FITTED BEGIN -->", "<!-- FITTED END -->"


def run(problems_idx, solvers, nfes, n_fit, n_eval, refine_iters):
    import jax
    import jax.numpy as jnp

    import accuracy
    import dpmjax

    schedule = dpmjax.VPLinear()
    problems = accuracy.make_problems(jnp, dpmjax)
    fixed_types = dpmjax.timesteps.SKIP_TYPES
    rows = []
    for p in problems_idx:
        name, gm = problems[p]
        model_fn = gm.model_fn(schedule)
        x_fit = jax.random.normal(jax.random.key(1), (n_fit, gm.dim))
        with jax.enable_x64(True):
            x_eval = jax.random.normal(jax.random.key(2), (n_eval, gm.dim), jnp.float64)
            x_ref = dpmjax.sample(model_fn, gm, None, x_eval.shape, schedule=schedule, noise=x_eval, steps=1000,
                                  order=3, skip_type="logSNR")
        for label, kw in solvers:
            for nfe in nfes:
                t0 = time.perf_counter()
                grid, info = dpmjax.fit_timesteps(model_fn, gm, None, x_fit.shape, noise=x_fit, schedule=schedule,
                                                  steps=nfe, refine_iters=refine_iters, return_info=True, **kw)
                grid = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.block_until_ready(grid))
                fit_s = time.perf_counter() - t0
                grid_only = dpmjax.fit_timesteps(model_fn, gm, None, x_fit.shape, noise=x_fit, schedule=schedule,
                                                 steps=nfe, refine_iters=refine_iters, model_times=False, **kw)
                grid_only = jax.tree.map(lambda a: np.asarray(a, np.float64), grid_only)
                with jax.enable_x64(True):
                    def err(**grid):
                        x = dpmjax.sample(model_fn, gm, None, x_eval.shape, schedule=schedule, noise=x_eval,
                                          steps=nfe, **grid, **kw)
                        return float(jnp.sqrt(jnp.mean((x - x_ref) ** 2)))

                    fixed = {sk: err(skip_type=sk) for sk in fixed_types}
                    fitted = err(timesteps=jax.tree.map(jnp.asarray, grid))
                    fitted_grid = err(timesteps=jax.tree.map(jnp.asarray, grid_only))
                    dp = err(timesteps=jnp.asarray(np.asarray(info["dp_grid"], np.float64)))
                best = min(fixed, key=fixed.get)
                mts = grid.model_timesteps
                rows.append(dict(problem=name, solver=label, nfe=nfe, fixed=fixed, best_fixed=best,
                                 fitted=fitted, fitted_grid_only=fitted_grid, dp=dp, fit_seconds=fit_s,
                                 start=info["start"], grid=grid.timesteps.tolist(),
                                 model_timesteps=None if mts is None else mts.tolist(),
                                 grid_only=grid_only.timesteps.tolist()))
                print(f"{name[:22]:22s} {label:18s} NFE {nfe:2d}: best fixed {best:14s} {fixed[best]:.2e}, "
                      f"fitted {fitted:.2e} ({fitted / fixed[best]:.2f}x), grid only "
                      f"{fitted_grid / fixed[best]:.2f}x, DP only {dp / fixed[best]:.2f}x, fit {fit_s:.1f}s",
                      flush=True)
    return rows


def table(rows, args, wall, backend, prov=None):
    lines = [
        "## Fitted time grids vs the best fixed grid (`benchmarks/fitted_grids.py`)",
        "",
    ] + (header(prov) if prov else []) + [
        f"VPLinear; `dpmjax.fit_timesteps` (defaults, refine_iters={args.refine_iters}) fitted in float32 on "
        f"{args.fit} starting noises, evaluated in float64 on {args.eval} *fresh* ones against "
        "DPM-Solver++(3M) with 1000 logSNR steps. Error: RMS of (sample - reference) at t_end. "
        "Best fixed = the best of logSNR, time_uniform, time_quadratic, karras and edm for the same solver "
        "and NFE on the same evaluation noises. Fitted = the default fit, the solver's grid and the "
        "network's time at each evaluation; grid only = `model_times=False`; DP only = the dynamic "
        f"program's grid before the refinement. Fit (s) = the default fit. {backend}; wall time {wall:.0f}s.",
        "",
        "| problem | solver | NFE | best fixed grid | its error | fitted error | fitted / best fixed "
        "| grid only / best fixed | DP only / best fixed | fit (s) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = r["fixed"][r["best_fixed"]]
        lines.append(f"| {r['problem']} | {r['solver']} | {r['nfe']} | {r['best_fixed']} | {b:.2e} | "
                     f"{r['fitted']:.2e} | **{r['fitted'] / b:.2f}** | {r['fitted_grid_only'] / b:.2f} | "
                     f"{r['dp'] / b:.2f} | {r['fit_seconds']:.1f} |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--problems", default="0,1,2", help="indices into accuracy.make_problems (default 0,1,2)")
    p.add_argument("--nfes", default=",".join(map(str, NFES)))
    p.add_argument("--solvers", default=DEFAULT_SOLVERS,
                   help="indices into SOLVERS: " + ", ".join(f"{i} {l}" for i, (l, _) in enumerate(SOLVERS))
                   + f" (default {DEFAULT_SOLVERS})")
    p.add_argument("--fit", type=int, default=4096, help="fitting trajectories (default 4096)")
    p.add_argument("--eval", type=int, default=16384, help="fresh evaluation samples (default 16384)")
    p.add_argument("--refine-iters", type=int, default=300)
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    import jax

    t0 = time.perf_counter()
    rows = run([int(i) for i in args.problems.split(",")], [SOLVERS[int(i)] for i in args.solvers.split(",")],
               [int(n) for n in args.nfes.split(",")],
               args.fit, args.eval, args.refine_iters)
    wall = time.perf_counter() - t0
    backend = f"Backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}"
    prov = provenance(None if argv is None else [__file__, *argv])
    text = "\n".join(table(rows, args, wall, backend, prov)) + "\n"
    print(text)
    partial = any(getattr(args, k) != p.get_default(k) for k in ("problems", "nfes", "solvers"))
    stem = os.path.join(args.out, "fitted_grids" + ("_partial" if partial else ""))
    os.makedirs(args.out, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"provenance": prov, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(text)
    acc = os.path.join(args.out, "accuracy.md")
    if not partial and os.path.exists(acc):  # keep the accuracy report's copy in step
        with open(acc) as f:
            doc = f.read()
        block = f"{BEGIN}\n{text}{END}"
        doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S) \
            if BEGIN in doc else doc.replace("## Log", block + "\n\n## Log", 1)
        with open(acc, "w") as f:
            f.write(doc)
    print(f"written {stem}.md/.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
