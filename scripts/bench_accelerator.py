"""Sampling speed on whatever JAX runs on (CPU, GPU, TPU), the batch sharded over all devices.

One command runs the two timing benchmarks of ``benchmarks/`` on the default backend:

* speed (``benchmarks/speed.py``): ``sample()`` against the physical limit (a jitted
  ``lax.scan`` of NFE bare calls of the same MLP plus one fused update) for
  DPM-Solver++(2M), (3M), DPM-Solver-fast and UniPC-bh2 at NFE 20;
* batch scaling (``benchmarks/batch_scaling.py``): time per sample against batch size
  for DPM-Solver++(2M).

The batch is laid out over every device with a ``NamedSharding`` over a 1-D mesh
(``Mesh(jax.devices(), ("batch",))``, ``PartitionSpec("batch")``); the parameters are
replicated. It writes ``benchmarks/results/<backend>-<device kind>.md`` and ``.json``
(device kind, device count, JAX version, the exact command and commit, samples per
second, and each ratio to the limit with the spread of the repeats).

Run::

    python scripts/bench_accelerator.py            # full run
    python scripts/bench_accelerator.py --quick    # a short run (under a minute on a CPU)

    # CPU, as 8 devices (what the tests do):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_accelerator.py --quick

On a GPU machine, install JAX's CUDA build first (``pip install -U "jax[cuda12]"``); on a
Cloud TPU VM, ``pip install -U "jax[tpu]"``, then run the same command: JAX picks the
accelerator, and all its local chips share the batch.

Across a multi-host TPU slice (or several GPU hosts) run the same command on every host
at once with ``--distributed``, which calls ``jax.distributed.initialize()`` before
anything else (on Cloud TPU it needs no arguments; elsewhere pass ``--coordinator HOST:PORT
--num-processes N --process-id I``, which go to ``jax.distributed.initialize``)::

    gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \\
        --command="cd dpmjax && python scripts/bench_accelerator.py --distributed"

Two processes on one machine (CPU, 4 devices each, Gloo collectives; what the tests do)::

    export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4
    for id in 0 1; do python scripts/bench_accelerator.py --quick --distributed \\
        --coordinator 127.0.0.1:12345 --num-processes 2 --process-id $id & done; wait

The mesh then spans the devices of all hosts, every host builds its part of the batch
with ``jax.make_array_from_callback`` and times the same program, and process 0 writes
the report. The batch sizes must be multiples of the device count; the script rounds them
up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few repeats and batch sizes (a smoke run)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per program (default 25, quick 5)")
    p.add_argument("--width", type=int, default=None, help="MLP width of the speed table (default 512, quick 128)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch of the speed table (default 4096 x devices, quick 64 x devices)")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first (multi-host)")
    p.add_argument("--coordinator", default=None,
                   help="with --distributed: the coordinator's HOST:PORT (default: found by JAX, e.g. on Cloud TPU)")
    p.add_argument("--num-processes", type=int, default=None, help="with --distributed: the number of processes")
    p.add_argument("--process-id", type=int, default=None, help="with --distributed: this process's id, 0-based")
    args = p.parse_args(argv)
    cluster = {"coordinator_address": args.coordinator, "num_processes": args.num_processes,
               "process_id": args.process_id}
    given = [f"--{k.replace('_', '-')}" for k, v in zip(("coordinator", "num_processes", "process_id"),
                                                         cluster.values()) if v is not None]
    if given and not args.distributed:
        p.error(f"{', '.join(given)} need --distributed")
    if args.num_processes is not None and args.num_processes < 1:
        p.error(f"--num-processes must be >= 1; got {args.num_processes}")
    if args.process_id is not None and (args.process_id < 0 or args.process_id >= (args.num_processes or 1 << 62)):
        allowed = "0.." + (str(args.num_processes - 1) if args.num_processes else "")
        p.error(f"--process-id must be in {allowed}; got {args.process_id}")

    import jax

    if args.distributed:
        jax.distributed.initialize(**{k: v for k, v in cluster.items() if v is not None})

    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import batch_scaling
    import dpmjax
    import speed
    from report import fmt, header, provenance, spread

    devices = jax.devices()
    n_dev = len(devices)
    mesh = Mesh(np.array(devices), ("batch",))
    batch_sharding = NamedSharding(mesh, P("batch"))
    replicated = NamedSharding(mesh, P())
    repeats = args.repeats or (5 if args.quick else 25)
    width = args.width or (128 if args.quick else 512)
    batch = _multiple(args.batch or (64 if args.quick else 4096) * n_dev, n_dev)
    scales = (64, 256, 1024) if args.quick else (64, 256, 1024, 4096, 16384)
    batches = sorted({_multiple(b * max(1, n_dev // 8), n_dev) for b in scales})
    prov = provenance(None if argv is None else [os.path.abspath(__file__), *argv])
    prov["device_count"], prov["local_device_count"] = n_dev, jax.local_device_count()

    def global_noise(shape):
        """The same N(0, I) batch on every host, each host filling only its own devices."""
        full = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        return jax.make_array_from_callback(shape, batch_sharding, lambda index: full[index])

    # -- speed: every method against the limit, one batch size --------------------------
    schedule = dpmjax.VPLinear()
    params = jax.device_put(speed.init_mlp(jax.random.key(0), width), replicated)
    model_fn = speed.make_model_fn()
    limit = speed.make_limit(model_fn)
    ts, a, b = speed.limit_inputs(schedule, speed.NFE)
    x = global_noise((batch, speed.FEATURES))
    programs = {"limit": lambda: limit(params, x, ts, a, b)}
    for label, kw in speed.METHODS:
        programs[label] = lambda kw=kw: dpmjax.sample(model_fn, params, None, x.shape, schedule=schedule, noise=x,
                                                      steps=speed.NFE, skip_type="logSNR", **kw)
    shards = {}
    for name, fn in programs.items():  # compile and warm up
        for _ in range(2):
            out = fn().block_until_ready()
        shards[name] = len(out.sharding.device_set)
    times = {name: [] for name in programs}
    for _ in range(repeats):  # interleaved: limit, method 1, limit, method 2, ...
        for name, fn in programs.items():
            t0 = time.perf_counter()
            fn().block_until_ready()
            times[name].append(time.perf_counter() - t0)
    lim = spread(times["limit"], 1e3)
    speed_rows = []
    for label, _ in speed.METHODS:
        s = spread(times[label], 1e3)
        speed_rows.append({"method": label, "sample_ms": s, "limit_ms": lim, "ratio": s["median"] / lim["median"],
                           "samples_per_s": batch / s["median"] * 1e3, "shards": shards[label]})

    # -- batch scaling: DPM-Solver++(2M) ----------------------------------------------------
    scaling_rows = batch_scaling.measure(128, batches, repeats, sharding_for=lambda _: batch_sharding)

    if jax.process_index() != 0:
        return 0
    kind = devices[0].device_kind
    stem = os.path.join(args.out_dir, f"{jax.default_backend()}-{_slug(kind)}")
    lines = [f"# dpmjax on {jax.default_backend()} ({kind} x {n_dev})", ""] + header(prov) + [
        f"Batch sharded over {n_dev} device(s) ({jax.process_count()} process(es)) with a `NamedSharding` over a 1-D "
        f"mesh; parameters replicated; float32; {repeats} interleaved repeats after two warm-up calls. Times: median "
        "[interquartile range] in ms; ratio = median of `sample()` / median of the limit (a jitted `lax.scan` of the "
        "same model calls and one fused update per step).",
        "",
        f"## Speed: MLP width {width}, batch {batch}, NFE {speed.NFE}, logSNR",
        "",
        "| method | limit (ms) | sample() (ms) | samples/s | ratio to the limit | result on devices |",
        "|---|---:|---:|---:|---:|---:|",
    ] + [f"| {r['method']} | {fmt(r['limit_ms'])} | {fmt(r['sample_ms'])} | {r['samples_per_s']:.0f} | "
         f"{r['ratio']:.3f} | {r['shards']} |" for r in speed_rows] + [
        "",
        f"## Batch scaling: DPM-Solver++(2M), MLP width 128, NFE {batch_scaling.STEPS}, logSNR",
        "",
    ] + batch_scaling.table(scaling_rows)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"provenance": prov, "speed": {"width": width, "batch": batch, "nfe": speed.NFE, "rows": speed_rows},
                   "batch_scaling": {"width": 128, "nfe": batch_scaling.STEPS, "rows": scaling_rows}}, f, indent=1)
    print("\n".join(lines))
    print(f"written {stem}.md and .json")
    return 0


def _multiple(n: int, k: int) -> int:
    return -(-n // k) * k


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "device"


if __name__ == "__main__":
    sys.exit(main())
