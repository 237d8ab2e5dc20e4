"""Time per sample vs batch size: ``sample()`` and the bare-model limit side by side.

The MLP of benchmarks/speed.py (64 features, width 128), DPM-Solver++(2M) logSNR, NFE 20,
float32; for each batch size the limit and ``sample()`` are timed interleaved (median of
repeats). Run: ``python benchmarks/batch_scaling.py`` (writes results/batch_scaling.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax

import dpmjax
from report import write_markdown
from speed import FEATURES, init_mlp, limit_inputs, make_limit, make_model_fn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "batch_scaling.md"))
    args = ap.parse_args(argv)
    schedule, steps = dpmjax.VPLinear(), 20
    params = init_mlp(jax.random.key(0), args.width)
    model_fn = make_model_fn()
    limit = make_limit(model_fn)
    ts, a, b = limit_inputs(schedule, steps)
    rows = []
    for batch in (64, 256, 1024, 4096):
        x = jax.random.normal(jax.random.key(1), (batch, FEATURES))

        def run_sample():
            return dpmjax.sample(model_fn, params, None, x.shape, schedule=schedule, noise=x, order=2,
                                 steps=steps, skip_type="logSNR").block_until_ready()

        def run_limit():
            return limit(params, x, ts, a, b).block_until_ready()

        run_sample(), run_limit()  # compile
        tl, tsmp = [], []
        for _ in range(args.repeats):
            for fn, acc in ((run_limit, tl), (run_sample, tsmp)):
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
        ml, ms = statistics.median(tl), statistics.median(tsmp)
        rows.append((batch, ml * 1e3, ms * 1e3, ms / batch * 1e6, ms / ml))
    lines = [
        "# Time per sample vs batch size", "",
        f"backend `{jax.default_backend()}`, MLP width {args.width}, DPM-Solver++(2M) logSNR, NFE {steps}, "
        f"float32, median of {args.repeats} interleaved repeats.", "",
        "| batch | limit (ms) | sample() (ms) | sample() per sample (us) | ratio |",
        "|---:|---:|---:|---:|---:|",
    ] + [f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.3f} |" for r in rows]
    lines += ["", "Command: `python benchmarks/batch_scaling.py`."]
    write_markdown(args.out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
