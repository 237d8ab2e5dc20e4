"""Adaptive step size (NFE vs error) and stochastic samplers (distribution distance).

Problem: the 2-D 8-mode ring mixture of benchmarks/accuracy.py (std 0.05), exact noise
predictor, VPLinear, float64.

* adaptive: DPM-Solver-12/23 at several rtol (atol = rtol / 6.4, the authors' ratio of
  0.0078 to 0.05): NFE reported by ``info`` and RMS error against a DPM-Solver++(3M)
  4000-step reference from the same x_T, next to DPM-Solver++(2M) logSNR at similar NFE;
* stochastic: energy distance between samples and fresh data draws for SDE-DPM-Solver++
  (orders 1, 2) and the ODE DPM-Solver++(2M), at several NFE; the same distance between two
  independent data draws is the floor.

Run: ``python benchmarks/adaptive_sde.py --samples 1500`` (the README figures; writes
benchmarks/results/adaptive_sde.md).
"""

from __future__ import annotations

import argparse
import os
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import dpmjax  # noqa: E402
from accuracy import make_problems  # noqa: E402
from report import provenance, write_markdown  # noqa: E402


def energy_distance(x, y):
    """Szekely's energy distance ``2 E|x-y| - E|x-x'| - E|y-y'|`` (>= 0, 0 iff equal laws)."""

    def mean_dist(a, b):
        return jnp.mean(jnp.sqrt(jnp.sum((a[:, None] - b[None]) ** 2, -1) + 1e-30))

    return float(2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "adaptive_sde.md"))
    args = ap.parse_args(argv)
    t0 = time.time()
    gm, s = make_problems(jnp, dpmjax)[0][1], dpmjax.VPLinear()  # the 2-D ring of accuracy.py
    model = gm.model_fn(s)
    n = args.samples
    xT = jax.random.normal(jax.random.key(0), (n, 2))
    ref = dpmjax.sample(model, gm, None, xT.shape, schedule=s, noise=xT, steps=4000, order=3)

    def rms(x):
        return float(jnp.sqrt(jnp.mean((x - ref) ** 2)))

    lines = ["# Adaptive and stochastic samplers", "",
             f"2-D 8-mode ring mixture (std 0.05), VPLinear, float64, {n} samples; "
             f"backend {jax.default_backend()}.", "",
             "## Adaptive step size: NFE vs RMS error (vs a 4000-step DPM-Solver++(3M) reference)", "",
             "| solver | rtol | atol | NFE | accepted | rejected | RMS error |", "|---|---:|---:|---:|---:|---:|---:|"]
    for order in (2, 3):
        for rtol in (0.2, 0.05, 0.01):
            atol = rtol * 0.0078 / 0.05
            x, info = dpmjax.sample(model, gm, None, xT.shape, schedule=s, noise=xT, method="adaptive", order=order,
                                    rtol=rtol, atol=atol, return_info=True)
            lines.append(f"| DPM-Solver-{12 if order == 2 else 23} | {rtol} | {atol:.5f} | {int(info['nfe'])} | "
                         f"{int(info['accepted'])} | {int(info['rejected'])} | {rms(x):.2e} |")
    for nfe in (10, 20, 40, 80):
        x = dpmjax.sample(model, gm, None, xT.shape, schedule=s, noise=xT, order=2, steps=nfe, skip_type="logSNR")
        lines.append(f"| DPM-Solver++(2M) logSNR (fixed) | - | - | {nfe} | - | - | {rms(x):.2e} |")

    data = gm.sample(jax.random.key(1), n)
    floor = energy_distance(data, gm.sample(jax.random.key(2), n))
    lines += ["", "## Stochastic samplers: energy distance to fresh data draws", "",
              f"Floor (two independent data draws of {n}): {floor:.2e}.", "",
              "| sampler | NFE 10 | NFE 20 | NFE 50 | NFE 100 |", "|---|---:|---:|---:|---:|"]
    for name, kw in [("SDE-DPM-Solver++ order 1", dict(algorithm="sde-dpmsolver++", order=1)),
                     ("SDE-DPM-Solver++(2M)", dict(algorithm="sde-dpmsolver++", order=2)),
                     ("SDE-DPM-Solver(2M) (noise)", dict(algorithm="sde-dpmsolver", order=2)),
                     ("DPM-Solver++(2M) (ODE)", dict(algorithm="dpmsolver++", order=2))]:
        row = []
        for nfe in (10, 20, 50, 100):
            x = dpmjax.sample(model, gm, jax.random.key(3), (n, 2), schedule=s, steps=nfe, skip_type="logSNR", **kw)
            row.append(f"{energy_distance(x, data):.2e}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += ["", f"Wall time {time.time() - t0:.0f} s."]
    write_markdown(args.out, lines, prov=provenance(None if argv is None else [__file__, *argv]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
