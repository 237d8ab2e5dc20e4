"""Wall time of ``dpmjax.fit_timesteps``: the first call (compilation included) and
repeated calls with new starting noise (which reuse the compiled programs).

The model is the 2-D 8-mode ring mixture of ``accuracy.py`` (exact noise predictor), the
fit is DPM-Solver++(2M) with 6 steps on 1024 trajectories and 200 Adam iterations (the
CLI's defaults). Each call gets a fresh key, so nothing but compilation is shared.

Run::

    python benchmarks/fit_time.py                # writes benchmarks/results/fit_time.md
    python benchmarks/fit_time.py --calls 3

Run it from a checkout of another commit (``PYTHONPATH`` pointing at that checkout) to
compare versions; the report records the commit it measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

import dpmjax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy import make_problems  # noqa: E402
from report import provenance, write_markdown  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3, help="fits in one process (default 3)")
    ap.add_argument("--trajectories", type=int, default=1024, help="fitting trajectories (default 1024)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "fit_time.md"))
    args = ap.parse_args(argv)
    _, ring = make_problems(jnp, dpmjax)[0]
    schedule = dpmjax.VPLinear()
    model_fn = ring.model_fn(schedule)
    prov = provenance()
    times = []
    for i in range(args.calls):
        t0 = time.perf_counter()
        grid = dpmjax.fit_timesteps(model_fn, ring, jax.random.key(100 + i), (args.trajectories, 2),
                                    schedule=schedule, steps=6)
        jax.block_until_ready(grid)
        times.append(time.perf_counter() - t0)
        print(f"call {i + 1}: {times[-1]:.1f} s", flush=True)
    lines = [
        "# fit_timesteps wall time",
        "",
        f"2-D 8-mode ring mixture, DPM-Solver++(2M), 6 steps, {args.trajectories} trajectories, 200 Adam "
        "iterations; a fresh key per call.",
        "",
        "| call | wall time (s) |",
        "|---:|---:|",
        *[f"| {i + 1} | {t:.1f} |" for i, t in enumerate(times)],
    ]
    write_markdown(args.out, lines, prov=prov)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
