"""Sampler overhead against the physical limit, and compile time against ``steps``.

The *limit* is the least work any NFE-step ODE solver must do: a jitted ``lax.scan`` of
NFE calls of the same model, each followed by one fused update

    x_{n+1} = a_n x_n + b_n model(params, x_n, t_n)

(the model output feeds the carry, so XLA can neither drop nor hoist the call). The
ratio ``sample() / limit`` is what ``dpmjax.sample`` costs on top of the model:
Python-side validation and dispatch, the coefficient plan, the ring buffer of model
outputs and the linear combinations of the solver.

Timings are interleaved in one process (limit, sample, limit, sample, ...), many
repeats, median of each; the ratio is the ratio of medians. Every call ends with
``block_until_ready()``.

Beside each method, the same method *written by hand* from ``dpmjax.solver(...).export()``'s
tables (:func:`make_hand_written`: the limit's scan carrying the last model outputs as a
tuple ordered by age, conversion and update in plain lines, checked to give
``sample()``'s result): what a port of the exported coefficients costs, and the least
work of the method itself (a multistep solver reads its history, which the limit does
not). ``sample() / hand-written`` is the overhead of the library over that program.

One more row times the one-step API in a hand-written loop: a jitted ``lax.fori_loop`` of
``solver.model_inputs``, the model and ``solver.step`` for DPM-Solver++(2M), reported
beside ``sample()`` with the ratio of the two.

Compile time of ``sample()`` is measured for ``steps`` in 10/100/500 as the first call
minus a cached call, with a fresh ``model_fn`` closure per value (a cold jit cache):
the traced program must not grow with ``steps``.

Run::

    python benchmarks/speed.py           # full run (a few minutes on 2 CPU cores)
    python benchmarks/speed.py --quick   # short run
    python benchmarks/speed.py --hlo benchmarks/results/hlo   # also dump optimised HLO
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import dpmjax
from report import fmt, provenance, spread, write_markdown

FEATURES = 64
T_FEATURES = 16
NFE = 20

#: (label, sample() keyword arguments)
METHODS = [
    ("DPM-Solver++(2M)", dict(algorithm="dpmsolver++", method="multistep", order=2)),
    ("DPM-Solver++(3M)", dict(algorithm="dpmsolver++", method="multistep", order=3)),
    ("DPM-Solver-fast (singlestep 3)", dict(algorithm="dpmsolver", method="singlestep", order=3)),
    ("UniPC-bh2 (order 2)", dict(algorithm="dpmsolver++", method="unipc", order=2)),
]

#: a row timed beside sample(): the one-step API driven by the user's own jitted fori_loop
#: (dpmjax.solver built once, passed into the jit), with METHODS[0]'s options
FORI_LABEL = "DPM-Solver++(2M), hand-written fori_loop over step"

#: (width, batch, target ratio)
SIZES = [(128, 64, 1.05), (128, 512, 1.05), (128, 4096, 1.05), (512, 2048, 1.02)]


# --------------------------------------------------------------------------- model


def init_mlp(key, width: int):
    """Plain-jnp MLP ``64 -> width -> width -> 64`` with a sinusoidal time embedding added
    to the first hidden layer."""
    k1, k2, k3, k4 = jax.random.split(key, 4)

    def dense(k, n_in, n_out):
        return jax.random.normal(k, (n_in, n_out), jnp.float32) / np.sqrt(n_in)

    return {
        "w1": dense(k1, FEATURES, width),
        "wt": dense(k2, 2 * T_FEATURES, width),
        "b1": jnp.zeros((width,), jnp.float32),
        "w2": dense(k3, width, width),
        "b2": jnp.zeros((width,), jnp.float32),
        "w3": dense(k4, width, FEATURES),
        "b3": jnp.zeros((FEATURES,), jnp.float32),
    }


def make_model_fn():
    """A fresh closure each call (so a jit cache keyed on ``model_fn`` starts cold)."""
    freqs = jnp.exp(jnp.linspace(0.0, np.log(1000.0), T_FEATURES))

    def model_fn(params, x, t):
        ang = t[:, None] * freqs
        emb = jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)
        h = jax.nn.silu(x @ params["w1"] + emb @ params["wt"] + params["b1"])
        h = jax.nn.silu(h @ params["w2"] + params["b2"])
        return h @ params["w3"] + params["b3"]

    return model_fn


# --------------------------------------------------------------------------- limit


def make_limit(model_fn):
    """The physical limit: NFE model calls and one fused axpy each, in one ``lax.scan``."""

    @jax.jit
    def limit(params, x, ts, a, b):
        def body(x, inp):
            t, a_n, b_n = inp
            out = model_fn(params, x, jnp.broadcast_to(t, (x.shape[0],)))
            return a_n * x + b_n * out, None

        x, _ = jax.lax.scan(body, x, (ts, a, b))
        return x

    return limit


def age_tables(export):
    """``(cx, cy)`` of an exported solver indexed by age instead of ring-buffer slot:
    ``cx[r, a]`` multiplies the model output of row ``r - a`` (``a = 0``: row ``r``'s own)."""
    slot, cx, cy = export["slot"], export["cx"], export["cy"]
    n, K = cx.shape
    written = np.full(K, -1)  # the row that last wrote each slot
    by_age = np.zeros((2, n, n))
    for r in range(n):
        written[slot[r]] = r
        for k in range(K):
            if written[k] >= 0:
                by_age[:, r, r - written[k]] += (cx[r, k], cy[r, k])
            else:
                assert cx[r, k] == 0 and cy[r, k] == 0  # a slot never written holds zeros
    ages = 1 + max(int(np.max(np.nonzero(np.any(by_age != 0, axis=(0, 1)))[0], initial=0)), 0)
    return by_age[0, :, :ages], by_age[1, :, :ages]


def make_hand_written(model_fn, solver):
    """The solver written by hand in the limit's style from ``solver.export()``'s tables:
    one ``lax.scan`` over rows, the last model outputs carried as a tuple ordered by age
    (no ring buffer), conversion and update unrolled into plain lines,

        m = x_coef y + out_coef model(y, t);  x <- ax x + bx y + sum_a cx_a m_{-a};  y <- ay x + sum_a cy_a m_{-a}

    (``y`` is ``x`` for the multistep methods). It is what a user porting the exported
    coefficients would write, and the least work the method itself needs beyond the
    limit: it reads the history its combinations use. Returns ``call(params, x_T)``.
    Only for solvers without thresholding, noise or v3 terms, with unit scales."""
    e = solver.export()
    assert not e["thresholding"] and not np.any(e["nz"]) and np.all(e["in_scale"] == 1) and "g_p" not in e
    cx, cy = age_tables(e)
    ages = cx.shape[1]
    uses_y = bool(np.any(e["bx"]) or np.any(e["cy"]) or np.any(e["ay"] != 1))
    tables = tuple(jnp.asarray(v, jnp.float32) for v in
                   (e["t_model"], e["x_coef"], e["out_coef"], e["ax"], e["bx"], cx, e["ay"], cy))

    @jax.jit
    def run(params, x, tables):
        def body(carry, row):
            x, y, hist = carry
            t, p, q, ax, bx, cx, ay, cy = row
            src = y if uses_y else x
            m = p * src + q * model_fn(params, src, jnp.broadcast_to(t, (x.shape[0],)))
            x = ax * x + cx[0] * m + sum(cx[a] * hist[a - 1] for a in range(1, ages))
            if uses_y:
                x = x + bx * y
                y = ay * x + cy[0] * m + sum(cy[a] * hist[a - 1] for a in range(1, ages))
            return (x, y, ((m,) + hist)[: ages - 1]), None

        hist = tuple(jnp.zeros_like(x) for _ in range(ages - 1))
        (x, y, _), _ = jax.lax.scan(body, (x, x if uses_y else None, hist), tables)
        return y if uses_y else x

    return lambda params, x: run(params, x, tables)


def limit_inputs(schedule, steps):
    """DDIM coefficients on a time-uniform grid (any finite numbers would do)."""
    ts = jnp.linspace(schedule.T, schedule.t_eps, steps + 1)
    la, ls = schedule.log_alpha(ts), schedule.log_sigma(ts)
    a = jnp.exp(la[1:] - la[:-1])
    b = jnp.exp(ls[1:]) - a * jnp.exp(ls[:-1])
    return ts[:-1], a, b


# --------------------------------------------------------------------------- timing


def _timed(fn):
    """(wall seconds, CPU seconds of this process, all threads)."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn().block_until_ready()
    return time.perf_counter() - t0, time.process_time() - c0


def measure_ratios(width, batch, repeats, warmup, schedule):
    """Per method: medians (and minima) of limit, ``sample()`` and ``jax.jit(sample)`` times.

    ``jax.jit(sample)`` (a wrapper jitted once) runs the same compiled program without
    ``sample()``'s per-call Python work (argument validation, the static-config cache key,
    dispatch), so ``sample() - jit(sample)`` is the host overhead and
    ``jit(sample) - limit`` the overhead inside the compiled program.
    """
    params = init_mlp(jax.random.key(0), width)
    model_fn = make_model_fn()
    x = jax.random.normal(jax.random.key(1), (batch, FEATURES), jnp.float32)
    limit = make_limit(model_fn)
    ts, a, b = limit_inputs(schedule, NFE)
    call_limit = lambda: limit(params, x, ts, a, b)  # noqa: E731
    calls = {}
    for label, kw in METHODS:

        def direct(kw=kw):
            return dpmjax.sample(
                model_fn, params, None, x.shape, schedule=schedule, noise=x, steps=NFE, skip_type="logSNR", **kw
            )

        wrapped = jax.jit(
            lambda p, n, kw=kw: dpmjax.sample(
                model_fn, p, None, n.shape, schedule=schedule, noise=n, steps=NFE, skip_type="logSNR", **kw
            )
        )
        hand = make_hand_written(model_fn, dpmjax.solver(schedule, steps=NFE, skip_type="logSNR", **kw))
        want = direct()  # float32 rounding, on samples of size ~1e3 (the MLP is untrained)
        np.testing.assert_allclose(hand(params, x), want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))
        calls[label] = (direct, lambda wrapped=wrapped: wrapped(params, x), lambda hand=hand: hand(params, x))
    solver = dpmjax.solver(schedule, steps=NFE, skip_type="logSNR", **METHODS[0][1])

    @jax.jit
    def fori(params, x_T, solver):
        def body(_, state):
            x_in, t_in = solver.model_inputs(state)
            return solver.step(state, model_fn(params, x_in, t_in))

        return solver.result(jax.lax.fori_loop(0, solver.num_evals, body, solver.init(x_T)))

    call_fori = lambda: fori(params, x, solver)  # noqa: E731
    calls[FORI_LABEL] = (call_fori, call_fori, calls[METHODS[0][0]][2])  # one jitted call: both columns time it
    for _ in range(warmup):
        call_limit().block_until_ready()
        for fns in calls.values():
            for fn in fns:
                fn().block_until_ready()
    times = {k: ([], [], [], []) for k in calls}
    for _ in range(repeats):
        for label, fns in calls.items():  # interleaved: limit, sample, jit(sample), hand-written, limit, ...
            for acc, fn in zip(times[label], (call_limit, *fns)):
                acc.append(_timed(fn))
    rows = []
    for label in calls:
        t_l, t_s, t_j, t_h = (np.asarray(v) for v in times[label])  # (repeats, 2): wall, cpu
        rows.append(
            dict(
                label=label,
                limit=np.median(t_l[:, 0]),
                sample=np.median(t_s[:, 0]),
                limit_ms=spread(t_l[:, 0], 1e3),
                sample_ms=spread(t_s[:, 0], 1e3),
                ratio=np.median(t_s[:, 0]) / np.median(t_l[:, 0]),
                paired=np.median(t_s[:, 0] / t_l[:, 0]),
                cpu=np.median(t_s[:, 1]) / np.median(t_l[:, 1]),
                jit=np.median(t_j[:, 0]) / np.median(t_l[:, 0]),
                jit_cpu=np.median(t_j[:, 1]) / np.median(t_l[:, 1]),
                hand=np.median(t_h[:, 0]) / np.median(t_l[:, 0]),
                vs_hand=np.median(t_s[:, 0]) / np.median(t_h[:, 0]),
            )
        )
    by_label = {row["label"]: row for row in rows}
    by_label[FORI_LABEL]["vs_sample"] = by_label[FORI_LABEL]["sample"] / by_label[METHODS[0][0]]["sample"]
    return rows


def measure_compile(steps_list, schedule, trials, width=128, batch=512):
    """Compile seconds per (method, steps): the smallest over ``trials`` cold compiles."""
    params = init_mlp(jax.random.key(0), width)
    x = jax.random.normal(jax.random.key(1), (batch, FEATURES), jnp.float32)
    out = {}
    for label, kw in METHODS:
        for steps in steps_list:
            best = None
            for _ in range(trials):
                model_fn = make_model_fn()  # fresh closure: cold cache

                def run():
                    return dpmjax.sample(
                        model_fn, params, None, x.shape, schedule=schedule, noise=x, steps=steps,
                        skip_type="logSNR", **kw
                    )

                first = np.asarray(_timed(run))  # (wall, cpu)
                cached = np.median([_timed(run) for _ in range(3)], axis=0)
                best = first - cached if best is None else np.minimum(best, first - cached)
            out[(label, steps)] = best
    return out


def dump_hlo(directory, schedule, width=128, batch=512):
    """Optimised HLO of the limit and of ``sample()`` (jitted by a wrapper) for each method."""
    os.makedirs(directory, exist_ok=True)
    params = init_mlp(jax.random.key(0), width)
    model_fn = make_model_fn()
    x = jax.random.normal(jax.random.key(1), (batch, FEATURES), jnp.float32)
    ts, a, b = limit_inputs(schedule, NFE)
    text = make_limit(model_fn).lower(params, x, ts, a, b).compile().as_text()
    with open(os.path.join(directory, "limit.hlo.txt"), "w") as f:
        f.write(text)
    for label, kw in METHODS:
        fn = jax.jit(
            lambda p, n, kw=kw: dpmjax.sample(
                model_fn, p, None, n.shape, schedule=schedule, noise=n, steps=NFE, skip_type="logSNR", **kw
            )
        )
        text = fn.lower(params, x).compile().as_text()
        name = "".join(c if c.isalnum() else "_" for c in label).strip("_").lower()
        with open(os.path.join(directory, f"sample_{name}.hlo.txt"), "w") as f:
            f.write(text)
    print(f"optimised HLO written to {directory}/")


# --------------------------------------------------------------------------- report


def backend_line():
    dev = jax.devices()[0]
    return (
        f"backend `{jax.default_backend()}`, device kind `{dev.device_kind}`, {len(jax.devices())} device(s), "
        f"jax {jax.__version__}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short run: few repeats, one compile trial")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats of the large size (default 25, quick 5; "
                   "the small size gets 4x as many)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "speed.md"))
    p.add_argument("--compile-only", action="store_true", help="only the compile-time table")
    p.add_argument("--hlo", default=None, help="directory to dump optimised HLO of limit and sample()")
    args = p.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 25)
    steps_list = (10, 100, 500)
    schedule = dpmjax.VPLinear()

    prov = provenance(None if argv is None else [__file__, *argv])
    lines = ["# dpmjax speed benchmark", "", backend_line(), ""]
    if hasattr(os, "getloadavg"):
        lines += [f"Load average at start: {os.getloadavg()[0]:.2f} (other jobs on the machine add noise).", ""]
    lines += [
        f"`sample()` / limit at NFE {NFE} (skip_type logSNR, float32); limit = jitted `lax.scan` of "
        f"NFE model calls + one fused axpy. `jit(sample)`: the same call inside a `jax.jit` wrapper (no per-call "
        f"Python validation/dispatch). Median of interleaved repeats ({4 * repeats} for width 128, "
        f"{repeats} for width 512) each, with the interquartile range of the times in brackets; **ratio** = ratio "
        "of medians of wall time. Also: `paired` = median of "
        "the per-repeat ratios (adjacent calls see the same machine load); `CPU-time ratio` = ratio of medians of "
        "this process's CPU time (all threads), which does not count time the process waited for the CPU "
        "(robust when other jobs share the machine).",
        "",
        "| model | method | limit (ms) | sample() (ms) | **ratio** | target | met | paired | CPU-time ratio "
        "| jit(sample) ratio | jit(sample) CPU ratio | hand-written / limit | **sample() / hand-written** |",
        "|---|---|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|",
    ]
    print(lines[2], flush=True)
    fori_notes = []
    for width, batch, target in [] if args.compile_only else SIZES:
        n = 4 * repeats if width == SIZES[0][0] else repeats
        rows = measure_ratios(width, batch, n, warmup=2, schedule=schedule)
        for row in rows:
            r = row["ratio"]
            line = (
                f"| MLP w{width} B{batch} | {row['label']} | {fmt(row['limit_ms'])} | {fmt(row['sample_ms'])} | "
                f"**{r:.3f}** | <= {target:.2f} | {'yes' if r <= target else 'NO'} | {row['paired']:.3f} | "
                f"{row['cpu']:.3f} | {row['jit']:.3f} | {row['jit_cpu']:.3f} | {row['hand']:.3f} | "
                f"**{row['vs_hand']:.3f}** |"
            )
            lines.append(line)
            print(line, flush=True)
        fori_row = next(row for row in rows if row["label"] == FORI_LABEL)
        fori_notes.append(f"MLP w{width} B{batch}: hand-written `fori_loop` / `sample()` (DPM-Solver++(2M)) = "
                          f"**{fori_row['vs_sample']:.3f}** (ratio of medians of wall time)")
    if fori_notes:
        lines += ["", f"`{FORI_LABEL}`: `dpmjax.solver(...)` built once and passed into a user's `jax.jit`ted "
                  "`lax.fori_loop` of `model_inputs`, the model and `step` (its `sample()` and `jit(sample)` columns "
                  "both time that one jitted call; its hand-written column is DPM-Solver++(2M)'s).", "",
                  "`hand-written`: the method written by hand from `dpmjax.solver(...).export()`'s tables in the "
                  "limit's style (`make_hand_written`: the last model outputs carried as a tuple ordered by age, "
                  "conversion and update in plain lines; its result is checked against `sample()`). It reads the "
                  "history the method's combinations use, which the limit does not, so `hand-written / limit` is "
                  "what the method itself costs over the limit at that size, and `sample() / hand-written` what "
                  "the library adds to it.", ""] + [f"- {n}" for n in fori_notes]
        print("\n".join(fori_notes), flush=True)

    trials = 1 if args.quick else 5  # a cold compile is ~0.2 s: single trials vary by 1.5x
    comp = measure_compile(steps_list, schedule, trials)
    lines += [
        "",
        "Compile time of `sample()` (first call minus a cached call; fresh `model_fn` closure per value; "
        f"MLP w128 B512; smallest of {trials} cold compiles). Growth = largest / smallest; must be <= 1.5.",
        "",
        "Wall seconds, and in parentheses CPU seconds of this process (not counting time spent waiting "
        "for a core; steadier on a shared machine). Growth is computed from the CPU seconds.",
        "",
        "| method | " + " | ".join(f"steps {s} (s)" for s in steps_list) + " | growth | ok |",
        "|---|" + "---:|" * len(steps_list) + "---:|:---:|",
    ]
    for label, _ in METHODS:
        vals = [comp[(label, s)] for s in steps_list]
        cpu = [v[1] for v in vals]
        growth = max(cpu) / min(cpu)
        line = (
            f"| {label} | " + " | ".join(f"{v[0]:.2f} ({v[1]:.2f})" for v in vals)
            + f" | {growth:.2f} | {'yes' if growth <= 1.5 else 'NO'} |"
        )
        lines.append(line)
        print(line, flush=True)
    write_markdown(args.out, lines, prov=prov)
    print(f"written {args.out}")
    if args.hlo:
        dump_hlo(args.hlo, schedule)
    return 0


if __name__ == "__main__":
    sys.exit(main())
