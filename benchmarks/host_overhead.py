"""Where ``sample()``'s extra time at small batch goes: host work before the dispatch.

At width 128 / batch 64 (NFE 20, about 1.4 ms a call) ``sample()`` is 5-10 % slower than
the limit of ``speed.py`` while the same compiled program called directly is within 1-2 %. This
script times, interleaved (median of ``--repeats``), the limit, ``sample()``, the compiled
program ``sample()`` dispatches called directly with its arguments, and that direct call
preceded by host work of three kinds:

* ``busy 30 us``: a tight loop of 30 us that touches no memory;
* ``touch Python objects``: reading 3000 Python objects (the kind of work argument
  checking does);
* ``sum 64 KB array``: one NumPy reduction over 64 KB.

Each kind of host work adds about its own duration (what it returns after, less the direct
call's) to the total, and ``sample()`` adds its own: the checks and the dictionary lookup
of a repeated call, a few microseconds in a loop of back-to-back calls but several times
that here, where every call follows a 1.4 ms computation and starts with cold caches.

Run::

    python benchmarks/host_overhead.py            # about a minute
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import dpmjax
from dpmjax import sampler as _sampler
from report import provenance, write_markdown
from speed import FEATURES, NFE, init_mlp, limit_inputs, make_limit, make_model_fn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "host_overhead.md"))
    args = p.parse_args(argv)
    prov = provenance(None if argv is None else [__file__, *argv])
    schedule = dpmjax.VPLinear()
    params = init_mlp(jax.random.key(0), args.width)
    model_fn = make_model_fn()
    x = jax.random.normal(jax.random.key(1), (args.batch, FEATURES), jnp.float32)
    limit = make_limit(model_fn)
    ts, a, b = limit_inputs(schedule, NFE)
    kw = dict(algorithm="dpmsolver++", method="multistep", order=2)

    def sample():
        return dpmjax.sample(model_fn, params, None, x.shape, schedule=schedule, noise=x, steps=NFE,
                             skip_type="logSNR", **kw)

    sample()
    # the compiled program and arguments sample() dispatches (cached under the model function)
    program, args = _sampler._prepare(model_fn, None, x.shape, None, schedule, None, None, "noise", None, False, None,
                                      None, x, None, False, None, dict(steps=NFE, skip_type="logSNR", **kw))

    def direct():
        return program(args[0], params, *args[1:]).x

    objects = [object() for _ in range(3000)]
    array = np.ones(64 * 1024 // 8)

    def busy():
        t = time.perf_counter()
        while time.perf_counter() - t < 30e-6:
            pass
        return direct()

    def touch():
        sum(id(o) & 1 for o in objects)
        return direct()

    def reduce():
        array.sum()
        return direct()

    calls = {"limit": lambda: limit(params, x, ts, a, b), "sample()": sample,
             "compiled program, called directly": direct, "busy 30 us, then the direct call": busy,
             "touch Python objects, then the direct call": touch, "sum 64 KB array, then the direct call": reduce}
    np.testing.assert_array_equal(direct(), sample())
    for fn in calls.values():
        for _ in range(5):
            fn().block_until_ready()
    total = {k: [] for k in calls}
    ret = {k: [] for k in calls}
    for _ in range(args.repeats):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            out = fn()
            t1 = time.perf_counter()
            out.block_until_ready()
            total[k].append(time.perf_counter() - t0)
            ret[k].append(t1 - t0)
    lim = np.median(total["limit"])
    lines = ["# Host work before the dispatch (sample() at small batch)", "",
             f"MLP width {args.width}, batch {args.batch}, NFE {NFE}, DPM-Solver++(2M), logSNR; medians of "
             f"{args.repeats} interleaved repeats. *Returns after*: time until the call returns (dispatch is "
             "asynchronous); *total*: until the result is ready.", "",
             "| call | returns after (us) | total (us) | total / limit |", "|---|---:|---:|---:|"]
    for k in calls:
        lines.append(f"| {k} | {np.median(ret[k]) * 1e6:.0f} | {np.median(total[k]) * 1e6:.0f} | "
                     f"{np.median(total[k]) / lim:.3f} |")
    write_markdown(args.out, lines, prov=prov)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
