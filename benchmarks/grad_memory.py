"""Memory of a gradient through the sampler: plain, rematerialised, truncated.

Differentiating through ``steps`` solver steps stores, by default, every activation of
every network call for the backward pass: memory grows as ``steps x (activations of one
call)``. Three ways to trade it for compute or for bias:

* ``jax.checkpoint(model_fn)``: each call keeps only its inputs and recomputes its
  activations in the backward pass (``sample(jax.checkpoint(model_fn), ...)``);
* a ``jax.checkpoint`` on each step of a one-step-API scan (``dpmjax.solver``), which
  keeps only the solver state between steps;
* truncated backprop (DRaFT-K, Clark et al. 2024, arXiv:2309.17400): ``lax.stop_gradient``
  on the state before the last K steps, so only those K steps are stored (a biased
  gradient: the earlier steps' dependence on the parameters is dropped).

Measured here without running anything big: the *compiled* temporary buffer size of the
jitted gradient (``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``),
for a width-1024 MLP sampled with DPM-Solver++(2M) over 60 steps (float32). Each gradient
is then run once to check that it is finite, and the rematerialised ones are compared
with the plain one.

Run::

    python benchmarks/grad_memory.py     # about half a minute on 2 CPU cores
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
from report import provenance, write_markdown

FEATURES = 64
WIDTH = 1024
BATCH = 64
STEPS = 60
K = 5
SOLVER = dict(algorithm="dpmsolver++", method="multistep", order=2, steps=STEPS, skip_type="logSNR")


def init_mlp(key, width=WIDTH):
    """``64 -> width -> width -> width -> 64`` with a sinusoidal time embedding."""
    ks = jax.random.split(key, 5)
    dense = lambda k, i, o: jax.random.normal(k, (i, o), jnp.float32) / np.sqrt(i)  # noqa: E731
    return {"w1": dense(ks[0], FEATURES, width), "wt": dense(ks[1], 32, width), "w2": dense(ks[2], width, width),
            "w3": dense(ks[3], width, width), "w4": dense(ks[4], width, FEATURES) * 0.1}


def model_fn(params, x, t):
    freqs = jnp.exp(jnp.linspace(0.0, np.log(1000.0), 16))
    ang = t[:, None] * freqs
    h = jax.nn.silu(x @ params["w1"] + jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], -1) @ params["wt"])
    h = jax.nn.silu(h @ params["w2"])
    h = jax.nn.silu(h @ params["w3"])
    return h @ params["w4"]


def loss_of(x):
    return jnp.mean(x**2)


def variants(schedule):
    """``{label: loss(params, x_T)}`` for each way of taking the gradient."""
    solver = dpmjax.solver(schedule, **SOLVER)

    def sampled(fn):
        return lambda p, x_T: loss_of(dpmjax.sample(fn, p, None, x_T.shape, schedule=schedule, noise=x_T, **SOLVER))

    def body(p):
        def step(state, _):
            x, t = solver.model_inputs(state)
            return solver.step(state, model_fn(p, x, t)), None
        return step

    def per_step(p, x_T):
        state, _ = jax.lax.scan(jax.checkpoint(body(p)), solver.init(x_T), None, length=solver.num_evals)
        return loss_of(solver.result(state))

    def truncated(p, x_T):
        state, _ = jax.lax.scan(body(p), solver.init(x_T), None, length=solver.num_evals - K)
        state = jax.lax.stop_gradient(state)
        state, _ = jax.lax.scan(body(p), state, None, length=K)
        return loss_of(solver.result(state))

    return {
        "plain `jax.grad` through `sample()`": sampled(model_fn),
        "`sample(jax.checkpoint(model_fn), ...)`": sampled(jax.checkpoint(model_fn)),
        "one-step API scan, `jax.checkpoint` on each step": per_step,
        f"one-step API, truncated to the last K = {K} steps": truncated,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "grad_memory.md"))
    args = p.parse_args(argv)
    prov = provenance(None if argv is None else [__file__, *argv])
    schedule = dpmjax.VPLinear()
    params = init_mlp(jax.random.key(0))
    x_T = jax.random.normal(jax.random.key(1), (BATCH, FEATURES), jnp.float32)
    n_params = sum(int(np.prod(v.shape)) for v in params.values())
    act = BATCH * WIDTH * 4  # bytes of one (BATCH, WIDTH) float32 activation
    rows, grads = [], {}
    for label, loss in variants(schedule).items():
        t0 = time.perf_counter()
        grad = jax.jit(jax.grad(loss))
        compiled = grad.lower(params, x_T).compile()
        mem = compiled.memory_analysis()
        g = jax.block_until_ready(compiled(params, x_T))
        seconds = time.perf_counter() - t0
        finite = all(bool(jnp.all(jnp.isfinite(v))) for v in g.values())
        grads[label] = g
        rows.append((label, mem.temp_size_in_bytes, finite, seconds))
        print(f"{label}: temp {mem.temp_size_in_bytes / 2**20:.1f} MiB, finite {finite}, {seconds:.1f}s", flush=True)
    plain = grads[rows[0][0]]
    base = rows[0][1]
    lines = [
        "# Gradient memory through the sampler",
        "",
        f"`jax.grad` of `mean(x**2)` with respect to the parameters of a width-{WIDTH} MLP "
        f"(3 hidden layers, {n_params / 1e6:.2f} M parameters), sampled with DPM-Solver++(2M) over {STEPS} steps "
        f"(logSNR grid, VPLinear, float32, batch {BATCH} x {FEATURES}). **temp** = the compiled program's temporary "
        "buffers, `jax.jit(jax.grad(loss)).lower(params, x_T).compile().memory_analysis().temp_size_in_bytes` "
        f"(a compile-time figure; one ({BATCH}, {WIDTH}) float32 activation is {act / 2**10:.0f} KiB). Each "
        "gradient was run once: `finite` checks it, `max |g - g_plain|` compares it with the plain one "
        "(float32; the truncated gradient is a different quantity by design).",
        "",
        "| gradient | temp (MiB) | vs plain | finite | max \\|g - g_plain\\| / max \\|g_plain\\| | compile + run (s) |",
        "|---|---:|---:|:---:|---:|---:|",
    ]
    scale = max(float(jnp.max(jnp.abs(v))) for v in plain.values())
    for label, temp, finite, seconds in rows:
        diff = max(float(jnp.max(jnp.abs(grads[label][k] - plain[k]))) for k in plain) / scale
        lines.append(f"| {label} | {temp / 2**20:.1f} | {temp / base:.3f} | {'yes' if finite else 'NO'} | "
                     f"{diff:.1e} | {seconds:.1f} |")
    write_markdown(args.out, lines, prov=prov)
    print(f"written {args.out}")
    return 0 if all(r[2] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
