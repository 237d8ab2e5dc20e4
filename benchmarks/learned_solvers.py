"""Learned solvers (``dpmjax.fit_solver``) against the best fixed grid, the fitted grid and DPM-Solver-v3.

For each Gaussian mixture of the accuracy benchmark (``accuracy.make_problems``; exact
noise predictor, VPLinear schedule) and each NFE:

1. calibrate, in float32 as a user would, on ``--fit`` starting noises (key 1; the last
   quarter held out): ``dpmjax.fit_solver`` with its default bases (UniPC-bh2 and
   DPM-Solver++(2M), each on a grid from ``dpmjax.fit_timesteps`` with ``--base-iters``
   refinement iterations), each fitted with ``--iters`` Adam iterations on the grid, the
   network's times and the coefficients, the better on the held-out noises kept; the
   calibration time is the whole call (teacher, both grid fits, both fits, compilation).
   Then, from the base of that result, the same fit with ``loss="mean"``;
2. evaluate on ``--eval`` *fresh* noises (key 2) in float64 (the fitted tables cast to
   float64) against DPM-Solver++(3M) with 500 logSNR steps from the same noise (checked
   against 1000 steps). Each sample's error is its RMS distance to the reference over the
   coordinates, summarised over the samples three ways: RMS, mean and median. A few
   samples that end in another mode than the reference (they start near a boundary
   between modes, where a tiny change of the path changes the mode) dominate the RMS of
   these sharp mixtures; the mean and the median measure the typical sample;
3. compare with the best fixed grid (the best of logSNR, time_uniform, time_quadratic,
   karras and edm for UniPC-bh2 and DPM-Solver++(2M), order 2, on the same evaluation
   noises), with the fitted grid (the better of the two ``fit_timesteps`` grids on the
   evaluation noises), with DPM-Solver-v3 (statistics from ``compute_ems``) and, for
   scale, with 50 steps of DPM-Solver++(2M).

With ``--digits RUN_DIR``: the class-conditional UNet of ``dpmjax train --data digits``
instead, guided at the first of ``--scales``; the same errors (DPM-Solver-v3 with
statistics of the guided model on training digits), plus the Frechet distance in the
features of a small digits classifier and the sliced Wasserstein distance against the
500-step samples, and the solver fitted at one guidance scale sampled at the others.

Results go to ``results/learned_solvers.md``, ``.json`` and ``.png`` (``_digits`` for the UNet).

Run::

    python benchmarks/learned_solvers.py                          # all problems, NFE 3-10
    python benchmarks/learned_solvers.py --problems 0 --nfes 5    # one case
    dpmjax train --data digits --steps 2000 --out runs/digits
    python benchmarks/learned_solvers.py --digits runs/digits --nfes 4,6 --fit 128 --eval 512 --iters 200 \\
        --base-iters 30
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
#: digits: DPM-Solver-v3's statistics from this many training digits at this many lambdas
EMS_SAMPLES, EMS_LAMBDAS = 512, 201


def distances(x, ref):
    """Per-sample RMS distance over the coordinates."""
    d = np.asarray(x - ref, np.float64).reshape(x.shape[0], -1)
    return np.sqrt(np.mean(d**2, axis=1))


def summary(dist):
    """``rms`` (over samples and coordinates), ``mean`` and ``median`` of the per-sample distances."""
    return dict(rms=float(np.sqrt(np.mean(dist**2))), mean=float(np.mean(dist)), median=float(np.median(dist)))


MEASURES = ("rms", "mean", "median")


def best(entries, measure):
    """The name of the entry with the lowest ``measure``."""
    return min(entries, key=lambda k: entries[k][measure])


def v3_solver(schedule, nfe, ems):
    """DPM-Solver-v3 at ``nfe`` evaluations on the logSNR grid with the authors' CIFAR-10
    settings for that NFE, or ``None`` where it has too few steps for its order."""
    import dpmjax
    from v3_accuracy import v3_settings

    try:
        return dpmjax.solver(schedule, steps=nfe, skip_type="logSNR", ems=ems, **v3_settings(nfe))
    except ValueError as e:
        print(f"  v3 at NFE {nfe}: {e}")
        return None


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
            run64 = jax.jit(lambda s, m=model_fn, g=gm64, x=x_eval: learned._run(s, m, g, x))
            x_ref = run64(dpmjax.solver(schedule, steps=500, order=3, skip_type="logSNR"))
            ref_check = summary(distances(run64(dpmjax.solver(schedule, steps=1000, order=3, skip_type="logSNR")),
                                          x_ref))
            t0 = time.perf_counter()
            ems = jax.block_until_ready(dpmjax.compute_ems(
                model_fn, gm64, jax.random.key(3), (gm.dim,), schedule=schedule,
                data=gm64.sample(jax.random.key(7), 4096), batch_size=1024))
            ems_seconds = time.perf_counter() - t0
        setups[p] = (name, gm, model_fn, x_fit, run64, x_ref, ems, dict(reference_check=ref_check,
                                                                      ems_seconds=ems_seconds))

    def measure(solver, run64, x_ref):
        with jax.enable_x64(True):
            s64 = jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                               solver)
            return summary(distances(run64(s64), x_ref))

    for nfe in nfes:  # the NFEs outermost: an interrupted run has every problem at the first NFEs
        for p in problems_idx:
            name, gm, model_fn, x_fit, run64, x_ref, ems, extra = setups[p]
            order = min(2, nfe)
            fixed = {}
            with jax.enable_x64(True):
                for label, kw in FIXED:
                    for sk in dpmjax.timesteps.SKIP_TYPES:
                        fixed[f"{label} {sk}"] = measure(dpmjax.solver(schedule, steps=nfe, order=order,
                                                                       skip_type=sk, **kw), run64, x_ref)
                v3 = v3_solver(schedule, nfe, ems)
                v3 = None if v3 is None else measure(v3, run64, x_ref)
                many = measure(dpmjax.solver(schedule, steps=50, order=2, skip_type="logSNR"), run64, x_ref)
            t0, c0 = time.perf_counter(), time.process_time()
            solver, info = dpmjax.fit_solver(model_fn, gm, None, x_fit.shape, noise=x_fit, schedule=schedule,
                                             steps=nfe, iters=iters, base_iters=base_iters, lr=lr, return_info=True)
            jax.block_until_ready(solver)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            t1 = time.perf_counter()
            solver_mean = dpmjax.fit_solver(model_fn, gm, None, x_fit.shape, noise=x_fit, schedule=schedule,
                                            steps=nfe, iters=iters, lr=lr, loss="mean",
                                            base=info["base_solvers"][info["base"]])
            jax.block_until_ready(solver_mean)
            seconds_mean = time.perf_counter() - t1
            fitted = {k: measure(s, run64, x_ref) for k, s in info["base_solvers"].items()}
            rows.append(dict(problem=name, problem_index=p, nfe=nfe, fixed=fixed, fitted=fitted, v3=v3,
                             steps50=many, base=info["base"], learned=measure(solver, run64, x_ref),
                             learned_mean_loss=measure(solver_mean, run64, x_ref), seconds=seconds, cpu_seconds=cpu,
                             seconds_mean_loss=seconds_mean,
                             base_seconds=info["base_seconds"], teacher_seconds=info["teacher_seconds"],
                             iterations=info["iterations"], heldout_start=info["start_loss"],
                             heldout_learned=info["heldout_loss"], improved=info["improved"], **extra))
            r = rows[-1]
            print(f"{name[:24]:24s} NFE {nfe:2d}: " + "; ".join(
                f"{m}: fixed {fixed[best(fixed, m)][m]:.2e} fitted {fitted[best(fitted, m)][m]:.2e} learned "
                f"{r['learned'][m]:.2e} (mean loss {r['learned_mean_loss'][m]:.2e})" for m in MEASURES)
                + f"; calibration {seconds:.1f}s (grids {info['base_seconds']:.1f}s), CPU {cpu:.1f}s", flush=True)
            report(rows)
            # The three model functions live for the whole run, and with them every program
            # compiled for them; XLA's CPU executables each take many memory maps, and 18
            # cases' worth exceeded the kernel's limit (65530) in the last case.
            jax.clear_caches()
    return rows


def digits_classifier(seed=0, hidden=64, steps=500):
    """A small classifier of the 8x8 digits (an MLP trained with Adam on 80% of them):
    ``(features, accuracy)``, ``features(x)`` its hidden layer for images ``(n, 8, 8, 1)``
    in [-1, 1] and ``accuracy`` on the other 20%. The Frechet distance of the samples is
    measured in these features."""
    import jax
    import jax.numpy as jnp
    import optax

    from dpmjax.train.data import load_digits_array

    images, labels = load_digits_array()
    perm = np.random.default_rng(seed).permutation(len(labels))
    x, y = images[perm].reshape(len(labels), -1), labels[perm]
    cut = int(0.8 * len(y))
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"w1": jax.random.normal(k1, (64, hidden)) / 8.0, "b1": jnp.zeros(hidden),
              "w2": jax.random.normal(k2, (hidden, 10)) / np.sqrt(hidden), "b2": jnp.zeros(10)}

    def features(p, x):
        return jnp.tanh(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"])

    def loss(p, x, y):
        logits = features(p, x) @ p["w2"] + p["b2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    opt = optax.adam(1e-2)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p, x[:cut], y[:cut])
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    s = opt.init(params)
    for _ in range(steps):
        params, s = step(params, s)
    logits = features(params, x[cut:]) @ params["w2"] + params["b2"]
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y[cut:]))
    return jax.jit(lambda im: features(params, im)), accuracy


def frechet(f1, f2):
    """Frechet distance between Gaussians fitted to two feature sets ``(n, d)``."""
    from scipy import linalg

    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m1, m2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root = linalg.sqrtm(c1 @ c2).real
    return float(np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2.0 * root))


def run_digits(run_dir, nfes, n_fit, n_eval, iters, base_iters, lr, scales, report=lambda rows: None,
               batch_size=None):
    """The class-conditional digits UNet of ``run_dir`` (``dpmjax train --data digits``), guided at
    ``scales[0]``: the same comparison, plus a sample-quality figure (the Frechet distance in the
    features of a small digits classifier, and the sliced Wasserstein distance in pixels, each
    against the 500-step samples from the same noises), and the solver fitted at ``scales[0]``
    evaluated at the other guidance scales (against the reference and the fitted grid there)."""
    import jax
    import jax.numpy as jnp

    import dpmjax
    from dpmjax import learned
    from dpmjax.train.metrics import sliced_wasserstein
    from dpmjax.train.trainer import load_trained

    trainer, state = load_trained(run_dir)
    trainer.close()
    ds, schedule, model_fn, params = trainer.dataset, trainer.schedule, trainer.model_fn, state.ema_params
    labels = lambda n: jnp.arange(n, dtype=jnp.int32) % ds.num_classes  # noqa: E731
    x_fit = jax.random.normal(jax.random.key(1), (n_fit,) + ds.shape)
    c_fit = labels(n_fit)
    x_eval = jax.random.normal(jax.random.key(2), (n_eval,) + ds.shape)
    c_eval, null = labels(n_eval), jnp.full((n_eval,), ds.num_classes, jnp.int32)
    run = jax.jit(lambda s, x, sc: learned._run(s, model_fn, params, x, c_eval, null, sc))
    ref_solver = dpmjax.solver(schedule, steps=500, order=3, skip_type="logSNR")
    refs = {sc: run(ref_solver, x_eval, jnp.float32(sc)) for sc in scales}
    # the floor of the quality figures: 500-step samples from other noises against the reference
    other = run(ref_solver, jax.random.normal(jax.random.key(3), x_eval.shape), jnp.float32(scales[0]))
    features, accuracy = digits_classifier()
    f_ref = features(refs[scales[0]])
    # DPM-Solver-v3's statistics of the guided model, on training digits with their labels
    from dpmjax.train.data import load_digits_array

    images, image_labels = load_digits_array()
    t0 = time.perf_counter()
    ems = jax.block_until_ready(dpmjax.compute_ems(
        model_fn, params, jax.random.key(5), ds.shape, schedule=schedule, data=images[:EMS_SAMPLES],
        condition=image_labels[:EMS_SAMPLES], n_lambdas=EMS_LAMBDAS,
        guidance=dpmjax.ClassifierFree(jnp.full((EMS_SAMPLES,), ds.num_classes, jnp.int32), scales[0])))
    ems_seconds = time.perf_counter() - t0
    swd_key = jax.random.key(4)

    def quality(x):
        return dict(fd=frechet(features(x), f_ref), swd=float(sliced_wasserstein(x, refs[scales[0]], swd_key)))

    floor = quality(other)

    def measure(solver, sc, with_quality=False):
        x = run(solver, x_eval, jnp.float32(sc))
        out = summary(distances(x, refs[sc]))
        if with_quality:
            out.update(quality(x))
        return out

    rows = []
    for nfe in nfes:
        order = min(2, nfe)
        fixed = {f"{label} {sk}": measure(dpmjax.solver(schedule, steps=nfe, order=order, skip_type=sk, **kw),
                                          scales[0], True)
                 for label, kw in FIXED for sk in dpmjax.timesteps.SKIP_TYPES}
        v3 = v3_solver(schedule, nfe, ems)
        v3 = None if v3 is None else measure(v3, scales[0], True)
        t0, c0 = time.perf_counter(), time.process_time()
        solver, info = dpmjax.fit_solver(model_fn, params, None, x_fit.shape, noise=x_fit, schedule=schedule,
                                         steps=nfe, iters=iters, base_iters=base_iters, lr=lr, batch_size=batch_size,
                                         condition=c_fit,
                                         unconditional_condition=jnp.full_like(c_fit, ds.num_classes),
                                         guidance_scale=scales[0], return_info=True)
        jax.block_until_ready(solver)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        fitted = {k: measure(s, scales[0], True) for k, s in info["base_solvers"].items()}
        best_fitted = best(fitted, "rms")
        transfer = {sc: dict(fitted=measure(info["base_solvers"][best_fitted], sc), learned=measure(solver, sc))
                    for sc in scales}
        rows.append(dict(problem=f"digits UNet, guidance {scales[0]:g}", problem_index=99, nfe=nfe, fixed=fixed,
                         fitted=fitted, v3=v3, ems_seconds=ems_seconds, base=info["base"],
                         learned=measure(solver, scales[0], True),
                         seconds=seconds, cpu_seconds=cpu, base_seconds=info["base_seconds"],
                         teacher_seconds=info["teacher_seconds"], iterations=info["iterations"],
                         heldout_start=info["start_loss"], heldout_learned=info["heldout_loss"],
                         improved=info["improved"], transfer=transfer, floor=floor,
                         classifier_accuracy=accuracy, n_fit=n_fit, n_eval=n_eval))
        r = rows[-1]
        print(f"digits NFE {nfe}: rms fixed {fixed[best(fixed, 'rms')]['rms']:.3e}, fitted "
              f"{fitted[best_fitted]['rms']:.3e}, learned {r['learned']['rms']:.3e}; FD fixed "
              f"{fixed[best(fixed, 'fd')]['fd']:.3g} fitted {fitted[best_fitted]['fd']:.3g} learned "
              f"{r['learned']['fd']:.3g} (floor {floor['fd']:.3g}); calibration {seconds:.0f}s (CPU {cpu:.0f}s)",
              flush=True)
        report(rows)
    return rows


def digits_table(rows, args):
    r0 = rows[0]
    lines = [
        f"### Digits UNet (`dpmjax train --data digits`, run `{args.digits}`), classifier-free guidance "
        f"{r0['problem'].split()[-1]}", "",
        f"`fit_solver` (iters={args.iters}, base_iters={args.base_iters}, lr={args.lr}, batch_size={args.batch_size}) "
        "calibrated in float32 on "
        f"{r0['n_fit']} noises (a quarter held out), labels cycling through the classes; evaluated on "
        f"{r0['n_eval']} fresh noises against DPM-Solver++(3M) with 500 logSNR steps from the same noises. "
        "FD: the Frechet distance in the 64 hidden features of a small MLP classifier of the digits "
        f"(held-out accuracy {r0['classifier_accuracy']:.3f}) between the samples and the 500-step samples; "
        "SWD: the sliced Wasserstein distance in pixels (256 directions) between the same sets. Floor: the same "
        f"distances for 500-step samples from *other* noises (FD {r0['floor']['fd']:.3g}, SWD "
        f"{r0['floor']['swd']:.3g}): what two independent sets of this size differ by (a solver's samples share "
        "their noises with the reference, so its distances can be lower). Best fixed and fitted: the best by RMS "
        "error. v3: DPM-Solver-v3 on the logSNR grid (the authors' CIFAR-10 settings for the NFE) with "
        f"statistics of the guided model from `compute_ems` ({EMS_SAMPLES} training digits with their labels, "
        f"{EMS_LAMBDAS} lambdas; {r0.get('ems_seconds', float('nan')):.0f} s).", "",
        "| NFE | RMS: best fixed | fitted grid | learned | **learned / fitted** | v3 | mean: fitted | learned | "
        "**learned / fitted** | FD: best fixed | fitted | learned | v3 | SWD: best fixed | fitted | learned | "
        "calibration (s) | CPU time (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["nfe"]):
        f, g, lrn = r["fixed"][best(r["fixed"], "rms")], r["fitted"][best(r["fitted"], "rms")], r["learned"]
        v3 = r.get("v3")
        v3_rms, v3_fd = ("-", "-") if v3 is None else (f"{v3['rms']:.2e}", f"{v3['fd']:.3g}")
        lines.append(f"| {r['nfe']} | {f['rms']:.2e} | {g['rms']:.2e} | {lrn['rms']:.2e} | "
                     f"**{lrn['rms'] / g['rms']:.2f}** | {v3_rms} | {g['mean']:.2e} | {lrn['mean']:.2e} | "
                     f"**{lrn['mean'] / g['mean']:.2f}** | {f['fd']:.3g} | {g['fd']:.3g} | {lrn['fd']:.3g} | "
                     f"{v3_fd} | "
                     f"{f['swd']:.3g} | {g['swd']:.3g} | {lrn['swd']:.3g} | {r['seconds']:.0f} | "
                     f"{r['cpu_seconds']:.0f} |")
    lines += ["", "Fitted at one guidance scale, sampled at others (each against the 500-step reference at that "
              "scale; the fitted grid is the same `fit_timesteps` grid):", "",
              "| NFE | guidance scale | RMS: fitted grid | learned | learned / fitted | mean: fitted grid | learned "
              "| learned / fitted |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["nfe"]):
        for sc, t in r["transfer"].items():
            f, lrn = t["fitted"], t["learned"]
            lines.append(f"| {r['nfe']} | {float(sc):g} | {f['rms']:.2e} | {lrn['rms']:.2e} | "
                         f"{lrn['rms'] / f['rms']:.2f} | {f['mean']:.2e} | {lrn['mean']:.2e} | "
                         f"{lrn['mean'] / f['mean']:.2f} |")
    lines.append("")
    return lines


MEASURE_TITLES = {
    "rms": "RMS over samples and coordinates",
    "mean": "mean over samples of the per-sample RMS distance",
    "median": "median over samples of the per-sample RMS distance",
}


def table(rows, args, wall, backend, prov):
    mix = [r for r in rows if "transfer" not in r]
    digits = [r for r in rows if "transfer" in r]
    lines = ["## Learned solvers vs fitted and fixed grids (`benchmarks/learned_solvers.py`)", ""] + header(prov)
    if mix:
        checks = {r["problem"]: r["reference_check"] for r in mix}
        lines += [
            f"VPLinear; `dpmjax.fit_solver` (defaults but iters={args.iters}, base_iters={args.base_iters}, "
            f"lr={args.lr}) calibrated in float32 on {args.fit} starting noises (the last quarter held out), "
            f"evaluated in float64 on {args.eval} *fresh* ones against DPM-Solver++(3M) with 500 logSNR steps "
            "(its distance to 1000 steps: " + ", ".join(f"{v['rms']:.1e}" for v in checks.values()) + " RMS). "
            "Each sample's error is its RMS distance to the reference over the coordinates; a table per summary "
            "of them over the samples. Best fixed: the best of 5 fixed grids x {UniPC-bh2, DPM-Solver++(2M)} "
            "(order 2). Fitted grid: the better of the two `fit_timesteps` grids (with network times) that "
            "fit_solver starts from. Learned: `fit_solver` with its defaults (both bases fitted, the better on "
            "the held-out noises kept; `loss=\"rms\"`); *mean loss*: `loss=\"mean\"` from the base of that "
            "result. v3: DPM-Solver-v3 on the logSNR grid with statistics from "
            "`compute_ems` (4096 data samples; the authors' CIFAR-10 settings for the NFE). 50 steps: "
            "DPM-Solver++(2M) with 50 logSNR steps, for scale. Calibration: the whole default `fit_solver` call "
            "(teacher, both grid fits on its trajectories, both fits, compilation): wall time, of which the grid "
            f"fits, and the process's CPU time (all threads). {backend}; wall time of the run {wall:.0f}s.", ""]
        for m in MEASURES:
            lines += [f"### Error: {MEASURE_TITLES[m]}", "",
                      "| problem | NFE | best fixed | fitted grid | learned | **learned / fitted** | mean loss "
                      "| mean loss / fitted | v3 | 50 steps / fitted |" + (
                          " calibration (s) | of which grids (s) | CPU time (s) |" if m == "rms" else ""),
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if m == "rms" else "")]
            for r in sorted(mix, key=lambda r: (r["problem_index"], r["nfe"])):
                f = r["fixed"][best(r["fixed"], m)][m]
                g = r["fitted"][best(r["fitted"], m)][m]
                lm, mm = r["learned"][m], r["learned_mean_loss"][m]
                v3 = "-" if r["v3"] is None else f"{r['v3'][m]:.2e}"
                line = (f"| {r['problem']} | {r['nfe']} | {f:.2e} | {g:.2e} | {lm:.2e} | **{lm / g:.2f}** | {mm:.2e} "
                        f"| {mm / g:.2f} | {v3} | {r['steps50'][m] / g:.2f} |")
                if m == "rms":
                    line += f" {r['seconds']:.0f} | {r['base_seconds']:.0f} | {r['cpu_seconds']:.0f} |"
                lines.append(line)
            lines.append("")
    if digits:
        lines += digits_table(digits, args)
    return lines


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r["problem"] for r in sorted(rows, key=lambda r: r["problem_index"])))
    fig, axes = plt.subplots(2, len(problems), figsize=(4.5 * len(problems), 7.2), squeeze=False)
    for j, name in enumerate(problems):
        rs = sorted([r for r in rows if r["problem"] == name], key=lambda r: r["nfe"])
        nfe = [r["nfe"] for r in rs]
        for i, m in enumerate(("rms", "mean")):
            ax = axes[i][j]
            ax.semilogy(nfe, [r["fixed"][best(r["fixed"], m)][m] for r in rs], "o-", label="best fixed grid")
            ax.semilogy(nfe, [r["fitted"][best(r["fitted"], m)][m] for r in rs], "s-", label="fitted grid")
            ax.semilogy(nfe, [r["learned"][m] for r in rs], "^-", label="learned solver")
            if all("learned_mean_loss" in r for r in rs):
                ax.semilogy(nfe, [r["learned_mean_loss"][m] for r in rs], "v--", label="learned, mean loss")
            v3 = [(r["nfe"], r["v3"][m]) for r in rs if r.get("v3")]
            if v3:
                ax.semilogy(*zip(*v3), "x:", label="DPM-Solver-v3")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("NFE")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][j].set_ylabel("RMS error vs 500-step reference")
        axes[1][j].set_ylabel("mean per-sample error")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--problems", default="0,1,2", help="indices into accuracy.make_problems (default 0,1,2)")
    p.add_argument("--nfes", default=",".join(map(str, NFES)))
    p.add_argument("--fit", type=int, default=1024, help="calibration noises, a quarter held out (default 1024)")
    p.add_argument("--eval", type=int, default=4096, help="fresh evaluation noises (default 4096)")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--base-iters", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=None,
                   help="digits: fitting noises per Adam iteration (default: all of them)")
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
                   [float(v) for v in args.scales.split(",")], report, batch_size=args.batch_size)
    else:
        run([int(i) for i in args.problems.split(",")], nfes, args.fit, args.eval, args.iters, args.base_iters,
            args.lr, report)
    print(f"written {md} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
