"""Record the DPM-Solver and UniPC authors' own PyTorch samplers on a closed-form model.

Writes ``tests/data/authors_reference.npz``, which ``tests/test_authors_reference.py``
compares :func:`dpmjax.sample` against (float64, 1e-6 relative). The authors' files are
*not* part of this repository; fetch them yourself and pass their paths:

* ``dpm_solver_pytorch.py`` from https://github.com/LuChengTHU/dpm-solver
  (recorded with commit 52bc3fbcd5de56d60917b826b15d2b69460fc2fa, 2023-12-06);
* ``uni_pc.py`` from https://github.com/wl-zhao/UniPC (top-level file; recorded with
  commit cf9de85bf2ed68137e6fba5f165f451677b174c4, 2023-09-22). The dpm-solver
  repository has no copy of it.

For example::

    git clone https://github.com/LuChengTHU/dpm-solver /tmp/dpm-solver
    git clone https://github.com/wl-zhao/UniPC /tmp/UniPC
    python -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy
    /tmp/torchvenv/bin/python scripts/make_authors_reference.py \\
        --dpm-solver /tmp/dpm-solver/dpm_solver_pytorch.py --unipc /tmp/UniPC/uni_pc.py \\
        --dpm-solver-commit $(git -C /tmp/dpm-solver rev-parse HEAD) \\
        --unipc-commit $(git -C /tmp/UniPC rev-parse HEAD)

Needs torch and numpy only (not dpmjax, not jax). Everything runs in float64
(``torch.set_default_dtype(torch.float64)`` and float64 schedule tables).

The model is the exact predictor of a Gaussian data distribution
``x0 ~ N(MEAN, diag(STD^2))``: with ``v_t = alpha_t^2 STD^2 + sigma_t^2``,

    eps(x, t) = sigma_t (x - alpha_t MEAN) / v_t,
    x0(x, t)  = MEAN + alpha_t STD^2 (x - alpha_t MEAN) / v_t,

evaluated with the authors' own ``marginal_alpha``/``marginal_std`` at the continuous
time recovered from the network input (discrete: ``t = t_input / 1000 + 1/N``, the
inverse of their ``(t - 1/N) * 1000``; dpmjax feeds ``t N - 1``, the same for N = 1000).
The test implements the same formula in JAX. Both samplers are given
``dpm_solver_pytorch.model_wrapper`` (see ``_run_one``).

Schedules: ``NoiseScheduleVP('linear')`` (beta 0.1..20, the dpmjax ``VPLinear()``) and
``NoiseScheduleVP('discrete', betas=linspace(1e-4, 0.02, 1000))`` (the dpmjax
``VPDiscrete.from_named("linear", 1000)``).

Each configuration is a dict of :func:`dpmjax.sample` keyword arguments plus
``"schedule"``; the script translates it to the authors' API. The number of model calls
the authors' code makes is recorded too (``nfe``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import sys

import numpy as np

B, D = 4, 3
#: the sample shape: UniPC's bh update contracts image-shaped tensors ('k,bkchw->bchw'),
#: so every configuration runs on (B, D, 1, 1)
SHAPE = (B, D, 1, 1)
MEAN = np.array([0.5, -1.0, 1.5])
STD = np.array([0.3, 0.6, 0.9])
N_TRAIN = 1000
T_START, T_END = 1.0, 1e-3
THRESHOLD_MAX_VAL = 1.0
THRESHOLD_RATIO = 0.9  # interpolates between the sorted |x0| of a row of D = 3 values


def _configs():
    """The fixture matrix: every factor is covered, not the full cross (each configuration
    is one compilation in dpmjax)."""
    out = []

    def add(**kw):
        base = dict(schedule="linear", model_type="noise", algorithm="dpmsolver++", method="multistep", order=2,
                    steps=7, skip_type="logSNR", solver_type="dpmsolver", lower_order_final=True,
                    denoise_to_zero=False, thresholding=False)
        base.update(kw)
        out.append(base)

    # multistep: algorithm x order x schedule
    for sched in ("linear", "discrete"):
        for alg in ("dpmsolver", "dpmsolver++"):
            for order in (1, 2, 3):
                add(schedule=sched, algorithm=alg, order=order)
    for alg in ("dpmsolver", "dpmsolver++"):  # taylor
        for order in (2, 3):
            add(algorithm=alg, order=order, solver_type="taylor")
    for sched in ("linear", "discrete"):  # skip types
        for skip in ("time_uniform", "time_quadratic"):
            add(schedule=sched, order=3, skip_type=skip)
    add(algorithm="dpmsolver", skip_type="time_quadratic", solver_type="taylor")
    for steps in (5, 7):  # lower_order_final off
        add(order=3, steps=steps, lower_order_final=False)
    add(algorithm="dpmsolver", steps=5, lower_order_final=False, skip_type="time_uniform")
    add(order=3, steps=5)  # steps: 5 and 10 (10 is past the steps < 10 gate of lower_order_final)
    add(order=3, steps=10)
    add(schedule="discrete", algorithm="dpmsolver", steps=10, skip_type="time_uniform")
    add(steps=5, denoise_to_zero=True)
    add(schedule="discrete", algorithm="dpmsolver", order=3, denoise_to_zero=True)
    # thresholding with a data-prediction model
    add(model_type="x_start", thresholding=True)
    add(model_type="x_start", thresholding=True, schedule="discrete", order=3, skip_type="time_uniform")
    # singlestep (DPM-Solver-fast)
    for alg in ("dpmsolver", "dpmsolver++"):
        for order in (2, 3):
            for skip in ("logSNR", "time_uniform"):
                add(method="singlestep", algorithm=alg, order=order, skip_type=skip)
    add(method="singlestep", order=3, steps=6)
    add(method="singlestep", order=3, steps=5, skip_type="time_quadratic")
    add(method="singlestep", order=2, steps=10, schedule="discrete", skip_type="time_uniform")
    add(method="singlestep", order=2, solver_type="taylor", algorithm="dpmsolver")
    add(method="singlestep", order=3, solver_type="taylor")
    add(method="singlestep", order=3, model_type="x_start", thresholding=True)
    add(method="singlestep", order=2, denoise_to_zero=True)
    # singlestep_fixed
    for alg in ("dpmsolver", "dpmsolver++"):
        for order in (2, 3):
            add(method="singlestep_fixed", algorithm=alg, order=order)
    add(method="singlestep_fixed", order=3, steps=10, schedule="discrete", skip_type="time_uniform")
    # adaptive (DPM-Solver-12 and -23)
    for alg in ("dpmsolver", "dpmsolver++"):
        for order in (2, 3):
            add(method="adaptive", algorithm=alg, order=order)
    add(method="adaptive", order=3, schedule="discrete")
    add(method="adaptive", order=3, solver_type="taylor")
    # UniPC (multistep predictor-corrector), data ("dpmsolver++") and noise prediction
    for variant in ("bh1", "bh2"):
        for order in (1, 2, 3):
            add(method="unipc", variant=variant, order=order)
        add(method="unipc", variant=variant, algorithm="dpmsolver")
    add(method="unipc", variant="bh2", order=3, schedule="discrete", skip_type="time_uniform")
    add(method="unipc", variant="bh1", order=3, steps=5, lower_order_final=False)
    add(method="unipc", variant="bh2", order=2, steps=5)
    add(method="unipc", variant="bh2", order=2, steps=10, skip_type="time_quadratic")
    add(method="unipc", variant="bh1", order=2, denoise_to_zero=True)
    add(method="unipc", variant="bh2", order=2, model_type="x_start", thresholding=True)
    for c in out:
        c.update(t_start=T_START, t_end=T_END)
        if c["thresholding"]:
            c.update(thresholding_max_val=THRESHOLD_MAX_VAL, dynamic_thresholding_ratio=THRESHOLD_RATIO)
    return out


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gaussian_model(torch, ns, model_type, discrete, counter):
    mean, std = torch.tensor(MEAN).reshape(1, D, 1, 1), torch.tensor(STD).reshape(1, D, 1, 1)

    def model(x, t_input):
        counter[0] += 1
        t = t_input / 1000.0 + 1.0 / ns.total_N if discrete else t_input
        alpha = ns.marginal_alpha(t).reshape(-1, 1, 1, 1)
        sigma = ns.marginal_std(t).reshape(-1, 1, 1, 1)
        v = alpha**2 * std**2 + sigma**2
        if model_type == "noise":
            return sigma * (x - alpha * mean) / v
        return mean + alpha * std**2 * (x - alpha * mean) / v

    return model


def _run_one(torch, dpm, uni, c, x_T):
    mod = uni if c["method"] == "unipc" else dpm
    discrete = c["schedule"] == "discrete"
    if discrete:
        betas = torch.linspace(1e-4, 0.02, N_TRAIN, dtype=torch.float64)
        ns = mod.NoiseScheduleVP("discrete", betas=betas, dtype=torch.float64)
    else:
        ns = mod.NoiseScheduleVP("linear", continuous_beta_0=0.1, continuous_beta_1=20.0, dtype=torch.float64)
    counter = [0]
    net = _gaussian_model(torch, ns, c["model_type"], discrete, counter)
    # dpm_solver_pytorch's model_wrapper for both: uni_pc.py's converts an x_start output with
    # alpha_t of shape (B,) broadcast against the *last* axis (no expand_dims), which is wrong
    # unless that axis happens to be B; the two wrappers are otherwise the same.
    model_fn = dpm.model_wrapper(net, ns, model_type=c["model_type"])
    correcting = "dynamic_thresholding" if c["thresholding"] else None
    thr = dict(thresholding_max_val=c.get("thresholding_max_val", 1.0),
               dynamic_thresholding_ratio=c.get("dynamic_thresholding_ratio", 0.995))
    x = torch.tensor(x_T)
    with contextlib.redirect_stdout(io.StringIO()):  # both files print progress
        if c["method"] == "unipc":
            solver = uni.UniPC(model_fn, ns, algorithm_type="data_prediction" if c["algorithm"] == "dpmsolver++"
                               else "noise_prediction", correcting_x0_fn=correcting, variant=c["variant"], **thr)
            out = solver.sample(x, steps=c["steps"], t_start=c["t_start"], t_end=c["t_end"], order=c["order"],
                                skip_type=c["skip_type"], method="multistep",
                                lower_order_final=c["lower_order_final"], denoise_to_zero=c["denoise_to_zero"])
        else:
            solver = dpm.DPM_Solver(model_fn, ns, algorithm_type=c["algorithm"], correcting_x0_fn=correcting, **thr)
            out = solver.sample(x, steps=c["steps"], t_start=c["t_start"], t_end=c["t_end"], order=c["order"],
                                skip_type=c["skip_type"], method=c["method"],
                                lower_order_final=c["lower_order_final"], denoise_to_zero=c["denoise_to_zero"],
                                solver_type=c["solver_type"])
    out = out.detach().numpy()
    assert out.shape == SHAPE and out.dtype == np.float64 and np.all(np.isfinite(out)), (out.shape, c)
    return out, counter[0]


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dpm-solver", required=True, help="path to the authors' dpm_solver_pytorch.py")
    p.add_argument("--unipc", required=True, help="path to the authors' uni_pc.py")
    p.add_argument("--dpm-solver-commit", default="52bc3fbcd5de56d60917b826b15d2b69460fc2fa")
    p.add_argument("--unipc-commit", default="cf9de85bf2ed68137e6fba5f165f451677b174c4")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data",
                                                  "authors_reference.npz"))
    args = p.parse_args(argv)

    import torch

    torch.set_default_dtype(torch.float64)
    dpm = _load(args.dpm_solver, "authors_dpm_solver_pytorch")
    uni = _load(args.unipc, "authors_uni_pc")
    x_T = np.random.default_rng(20240601).standard_normal(SHAPE)
    configs = _configs()
    results, nfes = [], []
    for i, c in enumerate(configs):
        out, nfe = _run_one(torch, dpm, uni, c, x_T)
        results.append(out)
        nfes.append(nfe)
        print(f"[{i + 1}/{len(configs)}] nfe {nfe:3d} {json.dumps(c, sort_keys=True)}", file=sys.stderr)
    meta = dict(
        dpm_solver=dict(repo="https://github.com/LuChengTHU/dpm-solver", file="dpm_solver_pytorch.py",
                        commit=args.dpm_solver_commit, sha256=_sha256(args.dpm_solver)),
        unipc=dict(repo="https://github.com/wl-zhao/UniPC", file="uni_pc.py", commit=args.unipc_commit,
                   sha256=_sha256(args.unipc)),
        torch=torch.__version__, mean=MEAN.tolist(), std=STD.tolist(), n_train=N_TRAIN,
        discrete_betas="linspace(1e-4, 0.02, 1000)", linear_betas=[0.1, 20.0],
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".partial.npz"
    np.savez_compressed(
        tmp, x_T=x_T, results=np.stack(results), nfe=np.asarray(nfes, np.int64),
        configs=np.asarray([json.dumps(c, sort_keys=True) for c in configs]), meta=np.asarray(json.dumps(meta)),
    )
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(configs)} configurations", file=sys.stderr)


if __name__ == "__main__":
    main()
