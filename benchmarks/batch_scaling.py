"""Time per sample vs batch size: ``sample()`` and the bare-model limit side by side.

The MLP of benchmarks/speed.py (64 features, width 128), DPM-Solver++(2M) logSNR, NFE 20,
float32; for each batch size the limit and ``sample()`` are timed interleaved; the report
gives the median of the repeats and their interquartile range [q1-q3]. Run:
``python benchmarks/batch_scaling.py`` (writes results/batch_scaling.md).
"""

from __future__ import annotations

import argparse
import os
import time

import jax

import dpmjax
from report import fmt, provenance, spread, write_markdown
from speed import FEATURES, init_mlp, limit_inputs, make_limit, make_model_fn

BATCHES = (64, 256, 1024, 4096)
STEPS = 20


def measure(width: int, batches, repeats: int, sharding_for=None) -> list[dict]:
    """Per batch size: the spreads (ms) of the limit and of ``sample()``, timed interleaved.

    ``sharding_for(batch)`` (optional) gives a ``jax.sharding.Sharding`` for the
    ``(batch, FEATURES)`` noise: both programs then run on the batch laid out that way.
    """
    schedule = dpmjax.VPLinear()
    params = init_mlp(jax.random.key(0), width)
    model_fn = make_model_fn()
    limit = make_limit(model_fn)
    ts, a, b = limit_inputs(schedule, STEPS)
    rows = []
    for batch in batches:
        x = jax.random.normal(jax.random.key(1), (batch, FEATURES))
        if sharding_for is not None:
            x = jax.device_put(x, sharding_for(batch))

        def run_sample():
            return dpmjax.sample(model_fn, params, None, x.shape, schedule=schedule, noise=x, order=2,
                                 steps=STEPS, skip_type="logSNR").block_until_ready()

        def run_limit():
            return limit(params, x, ts, a, b).block_until_ready()

        for _ in range(2):  # compile, warm up
            run_sample(), run_limit()
        tl, tsmp = [], []
        for _ in range(repeats):
            for fn, acc in ((run_limit, tl), (run_sample, tsmp)):
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
        lim, smp = spread(tl, 1e3), spread(tsmp, 1e3)
        rows.append({"batch": batch, "limit_ms": lim, "sample_ms": smp,
                     "us_per_sample": smp["median"] / batch * 1e3, "samples_per_s": batch / smp["median"] * 1e3,
                     "ratio": smp["median"] / lim["median"]})
    return rows


def table(rows) -> list[str]:
    return [
        "| batch | limit (ms) | sample() (ms) | sample() per sample (us) | samples/s | ratio |",
        "|---:|---:|---:|---:|---:|---:|",
    ] + [f"| {r['batch']} | {fmt(r['limit_ms'])} | {fmt(r['sample_ms'])} | {r['us_per_sample']:.2f} | "
         f"{r['samples_per_s']:.0f} | {r['ratio']:.3f} |" for r in rows]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "batch_scaling.md"))
    args = ap.parse_args(argv)
    rows = measure(args.width, BATCHES, args.repeats)
    lines = [
        "# Time per sample vs batch size", "",
        f"MLP width {args.width}, DPM-Solver++(2M) logSNR, NFE {STEPS}, float32; the limit and `sample()` timed "
        f"interleaved, {args.repeats} repeats each after two warm-up calls: median [interquartile range] in ms; "
        "ratio = median of `sample()` / median of the limit.", "",
    ] + table(rows)
    write_markdown(args.out, lines, prov=provenance(None if argv is None else [__file__, *argv]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
