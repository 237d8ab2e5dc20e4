"""Wall time of ``dpmjax.fit_timesteps``: the first call (compilation included) and
repeated calls with new starting noise (which reuse the compiled programs).

The model is the 2-D 8-mode ring mixture of ``accuracy.py`` (exact noise predictor), the
fit is DPM-Solver++(2M) with 6 steps on 1024 trajectories and 200 Adam iterations (the
CLI's defaults). Each call gets a fresh key, so nothing but compilation is shared. With
``--digits RUN_DIR``: the class-conditional UNet of ``dpmjax train --data digits``
instead, guided at scale 2 (``--trajectories`` and ``--iters`` as given).

Run::

    python benchmarks/fit_time.py                # writes benchmarks/results/fit_time.md
    python benchmarks/fit_time.py --calls 3
    python benchmarks/fit_time.py --digits runs/digits --trajectories 128 --iters 30

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
    ap.add_argument("--iters", type=int, default=200, help="Adam iterations of the refinement (default 200)")
    ap.add_argument("--digits", default=None, metavar="RUN_DIR", help="time the digits UNet of this run instead")
    ap.add_argument("--out", default=None, help="default results/fit_time.md (results/fit_time_digits.md)")
    args = ap.parse_args(argv)
    schedule = dpmjax.VPLinear()
    n, extra = args.trajectories, {}
    if args.digits:
        from dpmjax.train.trainer import load_trained

        trainer, state = load_trained(args.digits)
        trainer.close()
        ds, schedule, model_fn, params = trainer.dataset, trainer.schedule, trainer.model_fn, state.ema_params
        labels = jnp.arange(n, dtype=jnp.int32) % ds.num_classes
        shape = (n,) + ds.shape
        extra = dict(condition=labels, guidance=dpmjax.ClassifierFree(jnp.full_like(labels, ds.num_classes), 2.0))
        what = f"digits UNet (`{args.digits}`), classifier-free guidance 2"
    else:
        _, params = make_problems(jnp, dpmjax)[0]
        model_fn, shape = params.model_fn(schedule), (n, 2)
        what = "2-D 8-mode ring mixture"
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   "fit_time_digits.md" if args.digits else "fit_time.md")
    prov = provenance()
    times = []
    for i in range(args.calls):
        t0 = time.perf_counter()
        grid = dpmjax.fit_timesteps(model_fn, params, jax.random.key(100 + i), shape, schedule=schedule, steps=6,
                                    refine_iters=args.iters, **extra)
        jax.block_until_ready(grid)
        times.append(time.perf_counter() - t0)
        print(f"call {i + 1}: {times[-1]:.1f} s", flush=True)
    lines = [
        "# fit_timesteps wall time",
        "",
        f"{what}, DPM-Solver++(2M), 6 steps, {n} trajectories, {args.iters} Adam iterations; a fresh key per call.",
        "",
        "| call | wall time (s) |",
        "|---:|---:|",
        *[f"| {i + 1} | {t:.1f} |" for i, t in enumerate(times)],
    ]
    write_markdown(out, lines, prov=prov)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
