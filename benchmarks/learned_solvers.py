"""Learned solvers (``dpmjax.fit_solver``) against the best fixed grid and the fitted grid.

For each Gaussian mixture of the accuracy benchmark (``accuracy.make_problems``; exact
noise predictor, VPLinear schedule) and each NFE:

1. calibrate, in float32 as a user would, on ``--fit`` starting noises (key 1; the last
   quarter held out): ``dpmjax.fit_solver`` with its default base (UniPC-bh2 and
   DPM-Solver++(2M), each on a grid from ``dpmjax.fit_timesteps`` with ``--base-iters``
   refinement iterations, the better on the held-out noises), then ``--iters`` Adam
   iterations on the grid, the network's times and the coefficients; the calibration
   time is the whole call (teacher, both grid fits, compilation);
2. evaluate on ``--eval`` *fresh* noises (key 2) in float64 (the fitted tables cast to
   float64) against DPM-Solver++(3M) with 500 logSNR steps from the same noise. Error:
   RMS over samples and coordinates of ``x - x_ref`` at ``t_end``;
3. compare with the best fixed grid (the best of logSNR, time_uniform, time_quadratic,
   karras and edm for UniPC-bh2 and DPM-Solver++(2M), order 2, on the same evaluation
   noises) and with the fitted grid (the better of the two ``fit_timesteps`` grids on the
   evaluation noises).

Results go to ``results/learned_solvers.md``, ``.json`` and ``.png``.

Run::

    python benchmarks/learned_solvers.py                          # all problems, NFE 3-10
    python benchmarks/learned_solvers.py --problems 0 --nfes 5    # one case
    dpmjax train --data digits --steps 2000 --out runs/digits
    python benchmarks/learned_solvers.py --digits runs/digits --nfes 5 --fit 256 --eval 256 --iters 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from report import header, provenance  # noqa: E402

NFES = (3, 4, 5, 6, 8, 10)
RESULTS = os.path.join(os.path.dirname(__file__), "results")
FIXED = [("UniPC-bh2", dict(method="unipc", variant="bh2")), ("DPM-Solver++(2M)", dict(method="multistep"))]


def run(problems_idx, nfes, n_fit, n_eval, iters, base_iters, lr, report=lambda rows: None):
    import jax
    import jax.numpy as jnp

    import accuracy
    import dpmjax
    from dpmjax import learned

    schedule = dpmjax.VPLinear()
    problems = accuracy.make_problems(jnp, dpmjax)
    rows, setups = [], {}
    for p in problems_idx:
        name, gm = problems[p]
        model_fn = gm.model_fn(schedule)
        x_fit = jax.random.normal(jax.random.key(1), (n_fit, gm.dim))
        with jax.enable_x64(True):
            gm64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), gm)
            x_eval = jax.random.normal(jax.random.key(2), (n_eval, gm.dim), jnp.float64)
            ref_solver = dpmjax.solver(schedule, steps=500, order=3, skip_type="logSNR")
            x_ref = jax.jit(lambda s, m=model_fn, g=gm64, x=x_eval: learned._run(s, m, g, x))(ref_solver)
            err_of = jax.jit(lambda s, m=model_fn, g=gm64, x=x_eval, r=x_ref: jnp.sqrt(jnp.mean(
                (learned._run(s, m, g, x) - r) ** 2)))
        setups[p] = (name, gm, model_fn, x_fit, err_of)

    def err(solver, err_of):
        with jax.enable_x64(True):
            s64 = jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                               solver)
            return float(err_of(s64))

    for nfe in nfes:  # the NFEs outermost: an interrupted run has every problem at the first NFEs
        for p in problems_idx:
            name, gm, model_fn, x_fit, err_of = setups[p]
            order = min(2, nfe)
            fixed = {}
            with jax.enable_x64(True):
                for label, kw in FIXED:
                    for sk in dpmjax.timesteps.SKIP_TYPES:
                        fixed[f"{label} {sk}"] = float(err_of(dpmjax.solver(schedule, steps=nfe, order=order,
                                                                             skip_type=sk, **kw)))
            t0, c0 = time.perf_counter(), time.process_time()
            solver, info = dpmjax.fit_solver(model_fn, gm, None, x_fit.shape, noise=x_fit, schedule=schedule,
                                             steps=nfe, iters=iters, base_iters=base_iters, lr=lr, return_info=True)
            jax.block_until_ready(solver)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            fitted = {k: err(s, err_of) for k, s in info["base_solvers"].items()}
            learned_err = err(solver, err_of)
            best_fixed = min(fixed, key=fixed.get)
            best_fitted = min(fitted, key=fitted.get)
            rows.append(dict(problem=name, problem_index=p, nfe=nfe, fixed=fixed, best_fixed=best_fixed,
                             fitted=fitted, best_fitted=best_fitted, base=info["base"], learned=learned_err,
                             seconds=seconds, cpu_seconds=cpu,
                             base_seconds=info["base_seconds"], teacher_seconds=info["teacher_seconds"],
                             iterations=info["iterations"], heldout_start=info["start_loss"],
                             heldout_learned=info["heldout_loss"], improved=info["improved"]))
            print(f"{name[:24]:24s} NFE {nfe:2d}: best fixed {fixed[best_fixed]:.2e} ({best_fixed}), fitted "
                  f"{fitted[best_fitted]:.2e} ({best_fitted}), learned {learned_err:.2e} "
                  f"({learned_err / fitted[best_fitted]:.2f}x fitted) from base {info['base']}; calibration "
                  f"{seconds:.1f}s (grids {info['base_seconds']:.1f}s), CPU time {cpu:.1f}s", flush=True)
            report(rows)
    return rows


def run_digits(run_dir, nfes, n_fit, n_eval, iters, base_iters, lr, scales, report=lambda rows: None):
    """The class-conditional digits UNet of ``run_dir`` (``dpmjax train --data digits``), guided at
    ``scales[0]``: the same comparison, plus the solver fitted at ``scales[0]`` evaluated at the other
    guidance scales (against the reference and the fitted grid at that scale)."""
    import jax
    import jax.numpy as jnp

    import dpmjax
    from dpmjax import learned
    from dpmjax.train.trainer import load_trained

    trainer, state = load_trained(run_dir)
    trainer.close()
    ds, schedule, model_fn, params = trainer.dataset, trainer.schedule, trainer.model_fn, state.ema_params
    labels = lambda n: jnp.arange(n, dtype=jnp.int32) % ds.num_classes  # noqa: E731
    x_fit = jax.random.normal(jax.random.key(1), (n_fit,) + ds.shape)
    c_fit = labels(n_fit)
    x_eval = jax.random.normal(jax.random.key(2), (n_eval,) + ds.shape)
    c_eval, null = labels(n_eval), jnp.full((n_eval,), ds.num_classes, jnp.int32)
    run = jax.jit(lambda s, sc: learned._run(s, model_fn, params, x_eval, c_eval, null, sc))
    ref_solver = dpmjax.solver(schedule, steps=500, order=3, skip_type="logSNR")
    refs = {sc: run(ref_solver, jnp.float32(sc)) for sc in scales}

    def err(solver, sc):
        return float(jnp.sqrt(jnp.mean((run(solver, jnp.float32(sc)) - refs[sc]) ** 2)))

    rows = []
    for nfe in nfes:
        order = min(2, nfe)
        fixed = {f"{label} {sk}": err(dpmjax.solver(schedule, steps=nfe, order=order, skip_type=sk, **kw), scales[0])
                 for label, kw in FIXED for sk in dpmjax.timesteps.SKIP_TYPES}
        t0, c0 = time.perf_counter(), time.process_time()
        solver, info = dpmjax.fit_solver(model_fn, params, None, x_fit.shape, noise=x_fit, schedule=schedule,
                                         steps=nfe, iters=iters, base_iters=base_iters, lr=lr, condition=c_fit,
                                         unconditional_condition=jnp.full_like(c_fit, ds.num_classes),
                                         guidance_scale=scales[0], return_info=True)
        jax.block_until_ready(solver)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        fitted = {k: err(s, scales[0]) for k, s in info["base_solvers"].items()}
        best_fixed, best_fitted = min(fixed, key=fixed.get), min(fitted, key=fitted.get)
        transfer = {sc: dict(fitted=err(info["base_solvers"][best_fitted], sc), learned=err(solver, sc))
                    for sc in scales}
        rows.append(dict(problem=f"digits UNet, guidance {scales[0]:g}", problem_index=99, nfe=nfe, fixed=fixed,
                         best_fixed=best_fixed, fitted=fitted, best_fitted=best_fitted, base=info["base"],
                         learned=err(solver, scales[0]), seconds=seconds, cpu_seconds=cpu,
                         base_seconds=info["base_seconds"], teacher_seconds=info["teacher_seconds"],
                         iterations=info["iterations"], heldout_start=info["start_loss"],
                         heldout_learned=info["heldout_loss"], improved=info["improved"], transfer=transfer))
        r = rows[-1]
        print(f"digits NFE {nfe}: best fixed {fixed[best_fixed]:.3e}, fitted {fitted[best_fitted]:.3e}, learned "
              f"{r['learned']:.3e}; calibration {seconds:.0f}s (CPU {cpu:.0f}s); at other scales "
              + ", ".join(f"{sc:g}: fitted {t['fitted']:.3e} learned {t['learned']:.3e}" for sc, t in transfer.items()),
              flush=True)
        report(rows)
    return rows


def table(rows, args, wall, backend, prov):
    lines = ["## Learned solvers vs fitted and fixed grids (`benchmarks/learned_solvers.py`)", ""] + header(prov) + [
        f"VPLinear; `dpmjax.fit_solver` (defaults but iters={args.iters}, base_iters={args.base_iters}, "
        f"lr={args.lr}) calibrated in float32 on {args.fit} starting noises (the last quarter held out), evaluated "
        f"in float64 on {args.eval} *fresh* ones against DPM-Solver++(3M) with 500 logSNR steps. Error: RMS of "
        "(sample - reference) at t_end. Best fixed: the best of 5 fixed grids x {UniPC-bh2, DPM-Solver++(2M)} "
        "(order 2) on the evaluation noises. Fitted grid: the better of the two `fit_timesteps` grids (with "
        "network times) that fit_solver starts from, on the evaluation noises. Calibration: the whole "
        f"`fit_solver` call (teacher, both grid fits, compilation): wall time, of which the grid fits, and the "
        "process's CPU time (all threads; on a shared machine the wall time includes waiting for the CPU). "
        f"{backend}; wall time of the run {wall:.0f}s.",
        "",
        "| problem | NFE | best fixed | fitted grid | learned | learned / fitted | learned / fixed | base "
        "| calibration (s) | of which grids (s) | CPU time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["problem_index"], r["nfe"])):
        f, g = r["fixed"][r["best_fixed"]], r["fitted"][r["best_fitted"]]
        lines.append(f"| {r['problem']} | {r['nfe']} | {f:.2e} | {g:.2e} | {r['learned']:.2e} | "
                     f"**{r['learned'] / g:.2f}** | {r['learned'] / f:.2f} | {r['base']} | {r['seconds']:.0f} | "
                     f"{r['base_seconds']:.0f} | {r['cpu_seconds']:.0f} |")
    transfer = [r for r in rows if "transfer" in r]
    if transfer:
        lines += ["", "Fitted at one guidance scale, sampled at others (each against the 500-step reference at "
                  "that scale; the fitted grid is the same `fit_timesteps` grid):", "",
                  "| NFE | guidance scale | fitted grid | learned | learned / fitted |", "|---:|---:|---:|---:|---:|"]
        for r in transfer:
            for sc, t in r["transfer"].items():
                lines.append(f"| {r['nfe']} | {float(sc):g} | {t['fitted']:.2e} | {t['learned']:.2e} | "
                             f"{t['learned'] / t['fitted']:.2f} |")
    return lines


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r["problem"] for r in sorted(rows, key=lambda r: r["problem_index"])))
    fig, axes = plt.subplots(1, len(problems), figsize=(4.5 * len(problems), 3.8), squeeze=False)
    for ax, name in zip(axes[0], problems):
        rs = sorted([r for r in rows if r["problem"] == name], key=lambda r: r["nfe"])
        nfe = [r["nfe"] for r in rs]
        ax.semilogy(nfe, [r["fixed"][r["best_fixed"]] for r in rs], "o-", label="best fixed grid")
        ax.semilogy(nfe, [r["fitted"][r["best_fitted"]] for r in rs], "s-", label="fitted grid")
        ax.semilogy(nfe, [r["learned"] for r in rs], "^-", label="learned solver")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("NFE")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("RMS error vs 500-step reference")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--problems", default="0,1,2", help="indices into accuracy.make_problems (default 0,1,2)")
    p.add_argument("--nfes", default=",".join(map(str, NFES)))
    p.add_argument("--fit", type=int, default=1024, help="calibration noises, a quarter held out (default 1024)")
    p.add_argument("--eval", type=int, default=4096, help="fresh evaluation noises (default 4096)")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--base-iters", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--digits", default=None, metavar="RUN_DIR",
                   help="instead of the mixtures: the digits UNet trained into RUN_DIR by `dpmjax train --data digits`")
    p.add_argument("--scales", default="2,1,4", help="digits: guidance scale of the fit, then the others evaluated")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    import jax

    prov = provenance(argv)
    t0 = time.perf_counter()
    backend = f"Backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}"
    os.makedirs(args.out, exist_ok=True)
    stem = "learned_solvers" + ("_digits" if args.digits else "")
    md = os.path.join(args.out, stem + ".md")

    def report(rows):  # after every case, so that an interrupted run keeps what it measured
        wall = time.perf_counter() - t0
        with open(md, "w") as f:
            f.write("\n".join(table(rows, args, wall, backend, prov)) + "\n")
        with open(os.path.join(args.out, stem + ".json"), "w") as f:
            json.dump({"provenance": prov, "args": vars(args), "rows": rows}, f, indent=1)
        plot(rows, os.path.join(args.out, stem + ".png"))

    nfes = [int(n) for n in args.nfes.split(",")]
    if args.digits:
        run_digits(args.digits, nfes, args.fit, args.eval, args.iters, args.base_iters, args.lr,
                   [float(v) for v in args.scales.split(",")], report)
    else:
        run([int(i) for i in args.problems.split(",")], nfes, args.fit, args.eval, args.iters, args.base_iters,
            args.lr, report)
    print(f"written {md} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
