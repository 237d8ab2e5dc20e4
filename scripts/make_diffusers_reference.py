"""Record diffusers' own sampling loops as reference arrays for ``tests/test_diffusers.py``.

Runs in a separate environment holding torch and diffusers (never a dependency of
dpmjax or its tests)::

    python scripts/make_diffusers_reference.py            # writes tests/data/diffusers_reference.npz

For every configuration in ``CONFIGS`` it builds the scheduler with
``cls.from_config(config)``, calls ``set_timesteps(steps)`` and runs diffusers'
loop, as a pipeline does::

    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(net(scheduler.scale_model_input(x, t), t), t, x).prev_sample

with the toy network (the same formula is written in jax.numpy in the tests)::

    net(x, t)[:, c] = 1.5 * tanh(W[c] * x[:, c mod C] + 0.1 * sin(t / 97) + 0.05 * c)

``W = (0.9, -0.7, 1.1, 0.5, -1.2, 0.8, 0.6, -0.9)``; the output has ``C`` channels, or
``2 C`` for ``variance_type="learned_range"`` (the mean and the variance halves).

``MODELS`` adds the scheduler configs released models ship (``tests/data/scheduler_configs``:
Stable Diffusion 1.5, 2.1 (v-prediction), SDXL, SD3, Flux, Wan 2.1, a DDPM model), loaded
into a solver class as users do: ``cls.from_config(model_config, **kwargs)``, then either
``save_config`` (the file diffusers writes, other classes' keys and metadata included, is
what ``from_diffusers`` reads) or the model's own file read with ``scheduler=cls``.

Stored per configuration ``k`` (all float64 unless said):
``config_k`` (JSON text of ``scheduler.config`` with ``_class_name``, or of the file read),
``scheduler_k`` (the ``scheduler=`` class, ``""`` for none), ``steps_k`` (int),
``mu_k`` (NaN when unused), ``x_T_k`` (the loop's starting ``x``, after
``init_noise_sigma``), ``model_t_k`` (the timestep values the network received),
``sigmas_k`` (``scheduler.sigmas`` after ``set_timesteps``), ``orders_k`` (the order
of the update diffusers applied at each step; for the singlestep solver the per-step
``order_list``), ``x_final_k`` (NaN allowed: recorded as diffusers returns it) and, for
SDE algorithms, ``noise_k`` (steps, *shape): the ``variance_noise`` fed to each step.
Where diffusers returns NaN (UniPC ``bh1`` ending at sigma = 0: ``0 * inf``), ``x_limit_k``
is its own loop ending at sigma = 1e-30 instead: the finite limit.
EDM with ``final_sigmas_type="sigma_min"`` repeats sigma_min as the last sigma: a
zero-length final step (identity at first order, NaN at orders 2 and 3 in diffusers).
``FlowMatchEulerDiscreteScheduler`` entries of ``CONFIGS`` store only ``sigmas_k`` and
``model_t_k``; those of ``MODELS`` also run diffusers' Euler loop (no ``orders_k``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile

import numpy as np
import torch
import diffusers

torch.set_default_dtype(torch.float64)

W = np.array([0.9, -0.7, 1.1, 0.5, -1.2, 0.8, 0.6, -0.9])
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "scheduler_configs")
SHAPE = (2, 4, 4, 4)

M = "DPMSolverMultistepScheduler"
S = "DPMSolverSinglestepScheduler"
U = "UniPCMultistepScheduler"
E = "EDMDPMSolverMultistepScheduler"
I = "DPMSolverMultistepInverseScheduler"
F = "FlowMatchEulerDiscreteScheduler"

# (name, class, config overrides, steps[, extra]) -- extra: {"mu": float, "channels": int}
CONFIGS = [
    ("ms_default_10", M, {}, 10),
    ("ms_order1_10", M, {"solver_order": 1}, 10),
    ("ms_order3_25", M, {"solver_order": 3}, 25),
    ("ms_order3_7_lof", M, {"solver_order": 3, "final_sigmas_type": "sigma_min"}, 7),
    ("ms_order3_6_nolof", M, {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, 6),
    ("ms_heun_12", M, {"solver_type": "heun"}, 12),
    ("ms_dpmsolver_9", M, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, 9),
    ("ms_dpmsolver3_heun_20", M,
     {"algorithm_type": "dpmsolver", "solver_order": 3, "solver_type": "heun", "final_sigmas_type": "sigma_min"}, 20),
    ("ms_karras_sd_15", M, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                            "use_karras_sigmas": True}, 15),
    ("ms_karras_sigmamin_9", M, {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 9),
    ("ms_exponential_11", M, {"use_exponential_sigmas": True}, 11),
    ("ms_beta_13", M, {"use_beta_sigmas": True}, 13),
    ("ms_lu_10", M, {"use_lu_lambdas": True}, 10),
    ("ms_leading_sd_20", M, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                             "timestep_spacing": "leading", "steps_offset": 1}, 20),
    ("ms_trailing_8", M, {"timestep_spacing": "trailing"}, 8),
    ("ms_euler_final_25", M, {"euler_at_final": True, "final_sigmas_type": "sigma_min"}, 25),
    ("ms_cos_clipped_10", M, {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, 10),
    ("ms_zsnr_v_10", M, {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                         "timestep_spacing": "trailing"}, 10),
    ("ms_sample_10", M, {"prediction_type": "sample"}, 10),
    ("ms_v_17", M, {"prediction_type": "v_prediction", "solver_order": 3}, 17),
    ("ms_threshold_10", M, {"prediction_type": "sample", "thresholding": True,
                            "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.3}, 10),
    ("ms_sde_10", M, {"algorithm_type": "sde-dpmsolver++"}, 10),
    ("ms_sde3_heun_12", M, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun"}, 12),
    ("ms_flow_10", M, {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"}, 10),
    ("ms_learned_range_10", M, {"variance_type": "learned_range"}, 10, {"channels": 3}),
    ("ss_default_10", S, {}, 10),
    ("ss_order3_13", S, {"solver_order": 3}, 13),
    ("ss_order3_25_lof", S, {"solver_order": 3, "lower_order_final": True, "final_sigmas_type": "sigma_min"}, 25),
    ("ss_dpmsolver_karras_11", S, {"algorithm_type": "dpmsolver", "use_karras_sigmas": True,
                                   "final_sigmas_type": "sigma_min"}, 11),
    ("ss_heun_9", S, {"solver_type": "heun", "final_sigmas_type": "sigma_min"}, 9),
    ("ss_order1_6", S, {"solver_order": 1}, 6),
    ("unipc_default_10", U, {}, 10),
    ("unipc_bh1_3_12", U, {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"}, 12),
    ("unipc_bh1_zero_8", U, {"solver_type": "bh1"}, 8),
    ("unipc_bh2_3_25_dc", U, {"solver_order": 3, "disable_corrector": [0]}, 25),
    ("unipc_karras_v_15", U, {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, 15),
    ("unipc_noise_pred_9", U, {"predict_x0": False, "final_sigmas_type": "sigma_min"}, 9),
    ("unipc_flow_12", U, {"use_flow_sigmas": True, "flow_shift": 2.0, "prediction_type": "flow_prediction"}, 12),
    ("unipc_trailing_7", U, {"timestep_spacing": "trailing", "lower_order_final": False,
                             "final_sigmas_type": "sigma_min"}, 7),
    ("edm_karras_10", E, {}, 10),
    ("edm_exp_v_3_12", E, {"sigma_schedule": "exponential", "prediction_type": "v_prediction",
                           "solver_order": 3, "final_sigmas_type": "sigma_min"}, 12),
    ("edm_sigmamin_3_15", E, {"solver_order": 3, "final_sigmas_type": "sigma_min"}, 15),
    ("inverse_10", I, {}, 10),
    ("inverse_order3_karras_12", I, {"solver_order": 3, "use_karras_sigmas": True}, 12),
    ("flowmatch_sd3_28", F, {"shift": 3.0}, 28),
    ("flowmatch_flux_mu_25", F, {"use_dynamic_shifting": True, "shift": 1.0}, 25, {"mu": 0.8}),
    # short grids whose per-step orders stop below solver_order; a final step of (nearly) zero length
    ("ms_1step", M, {}, 1),
    ("ms_order3_2steps", M, {"solver_order": 3}, 2),
    ("unipc_order3_2steps", U, {"solver_order": 3}, 2),
    ("unipc_1step", U, {}, 1),
    ("edm_sigmamin_2steps", E, {"final_sigmas_type": "sigma_min"}, 2),
    ("edm_sigmamin_order3_3steps", E, {"final_sigmas_type": "sigma_min", "solver_order": 3}, 3),
    ("ms_lu_sd_sigmamin_10", M, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                 "use_lu_lambdas": True, "final_sigmas_type": "sigma_min"}, 10),
    # both set: diffusers takes the Karras sigmas
    ("ms_karras_and_lu_12", M, {"use_karras_sigmas": True, "use_lu_lambdas": True}, 12),
    # the inverse scheduler on flow sigmas steps its sigmas downwards
    ("inverse_flow_10", I, {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"}, 10),
]

# Released models' scheduler configs (tests/data/scheduler_configs/<model>.json, as the models
# ship them), loaded the two ways a user does:
#   "saved":     cls.from_config(model_config, **kwargs).save_config(d); the test reads d's file
#   "scheduler": the model's file itself, from_diffusers(file, scheduler=cls), which must equal
#                cls.from_config(model_config)
# (name, model, class, mode, steps, from_config kwargs, extra)
MODELS = [
    ("sd15_dpm_saved_25", "sd15", M, "saved", 25, {}, {}),
    ("sd15_dpm_scheduler_20", "sd15", M, "scheduler", 20, {}, {}),
    ("sd15_unipc_saved_20", "sd15", U, "saved", 20, {}, {}),
    ("sd15_dpm_karras_saved_15", "sd15", M, "saved", 15, {"use_karras_sigmas": True}, {}),
    ("sd21_v_dpm_saved_20", "sd21", M, "saved", 20, {}, {}),
    ("sd21_v_unipc_scheduler_15", "sd21", U, "scheduler", 15, {}, {}),
    ("sdxl_dpm_karras_saved_25", "sdxl", M, "saved", 25, {"use_karras_sigmas": True}, {}),
    ("sdxl_dpm_saved_20", "sdxl", M, "saved", 20, {}, {}),
    ("sdxl_singlestep_scheduler_12", "sdxl", S, "scheduler", 12, {}, {}),
    ("sd3_flowmatch_saved_28", "sd3", F, "saved", 28, {}, {}),
    ("flux_flowmatch_saved_20", "flux", F, "saved", 20, {}, {"mu": 1.15}),
    ("wan_unipc_saved_30", "wan21", U, "saved", 30, {}, {}),
    ("wan_dpm_scheduler_20", "wan21", M, "scheduler", 20, {}, {}),  # UniPC's solver_type="bh2" -> midpoint
    ("wan_dpm_saved_20", "wan21", M, "saved", 20, {}, {}),
    ("ddpm_dpm_scheduler_10", "ddpm_cifar10", M, "scheduler", 10, {}, {}),  # variance_type="fixed_small"
    ("ddpm_unipc_saved_10", "ddpm_cifar10", U, "saved", 10, {}, {}),
    ("deis_unipc_scheduler_10", "deis", U, "scheduler", 10, {}, {}),  # solver_type="logrho" -> bh2
    ("deis_dpm_sigmamin_scheduler_10", "deis_sigma_min", M, "scheduler", 10, {}, {}),  # "deis" -> dpmsolver++
    ("dpm_midpoint_unipc_scheduler_12", "dpm_midpoint", U, "scheduler", 12, {}, {}),  # midpoint -> bh2
]


def net(x, t):
    """The toy network of the module docstring (torch, float64)."""
    c_in = x.shape[1]
    c_out = 2 * c_in if net.learned_range else c_in
    tt = float(t)
    outs = [1.5 * torch.tanh(W[c] * x[:, c % c_in] + 0.1 * math.sin(tt / 97.0) + 0.05 * c) for c in range(c_out)]
    return torch.stack(outs, dim=1)


def _instrument(sch, orders):
    """Record the order of each update diffusers applies (read-only wrappers)."""
    names = {
        "dpm_solver_first_order_update": 1,
        "multistep_dpm_solver_second_order_update": 2,
        "multistep_dpm_solver_third_order_update": 3,
    }
    for name, order in names.items():
        if hasattr(sch, name):
            fn = getattr(sch, name)

            def wrapped(*a, _fn=fn, _order=order, **k):
                orders.append(_order)
                return _fn(*a, **k)

            setattr(sch, name, wrapped)
    if hasattr(sch, "multistep_uni_p_bh_update"):
        fn = sch.multistep_uni_p_bh_update

        def wrapped_p(*a, _fn=fn, **k):
            orders.append(int(k.get("order", a[-1] if a else sch.this_order)))
            return _fn(*a, **k)

        sch.multistep_uni_p_bh_update = wrapped_p


def model_config(model):
    """A released model's scheduler config (``tests/data/scheduler_configs``); ``deis`` and
    ``dpm_midpoint`` are written by diffusers itself (a DEIS scheduler's defaults; a DPM-Solver
    config naming its solver_type)."""
    if model in ("deis", "deis_sigma_min"):
        # (with final_sigmas_type="zero", DPMSolverMultistepScheduler refuses algorithm_type="deis")
        with tempfile.TemporaryDirectory() as d:
            diffusers.DEISMultistepScheduler().save_config(d)
            with open(os.path.join(d, "scheduler_config.json")) as f:
                cfg = json.load(f)
        return dict(cfg, final_sigmas_type="sigma_min") if model == "deis_sigma_min" else cfg
    if model == "dpm_midpoint":
        return {"_class_name": M, "solver_type": "midpoint", "algorithm_type": "dpmsolver++", "solver_order": 2}
    with open(os.path.join(CONFIG_DIR, model + ".json")) as f:
        return json.load(f)


def _saved(sch):
    """The scheduler_config.json diffusers writes for ``sch`` (read back as a dict)."""
    with tempfile.TemporaryDirectory() as d:
        sch.save_config(d)
        with open(os.path.join(d, "scheduler_config.json")) as f:
            return json.load(f)


def run(name, cls_name, overrides, steps, extra, seed, source=None, mode=None):
    # UniPC's corrector solves a small system built at the default dtype against float32
    # sigmas; under a float64 default torch refuses it, so UniPC runs keep float32 there.
    torch.set_default_dtype(torch.float32 if cls_name == U else torch.float64)
    cls = getattr(diffusers, cls_name)
    if source is None:
        sch = cls.from_config(dict(overrides))
        config = dict(sch.config)  # as the user's file has it: set_timesteps may rewrite some keys
        config.pop("_use_default_values", None)
        config["_class_name"] = cls_name
    else:
        sch = cls.from_config(source, **overrides)
        # "saved": the file diffusers writes (hidden keys of the source class, metadata and all);
        # "scheduler": the model's own file, used with from_diffusers(..., scheduler=cls_name)
        config = _saved(sch) if mode == "saved" else source
    mu = extra.get("mu")
    if mu is not None:
        sch.set_timesteps(steps, mu=mu)
    else:
        sch.set_timesteps(steps)
    out = {
        "config": json.dumps(config),
        "scheduler": np.array(cls_name if mode == "scheduler" else ""),
        "steps": np.int64(steps),
        "mu": np.float64(np.nan if mu is None else mu),
        "sigmas": sch.sigmas.double().numpy(),
        "model_t": sch.timesteps.double().numpy(),
    }
    if cls_name == F and source is None:
        return out
    channels = extra.get("channels", SHAPE[1])
    shape = (SHAPE[0], channels) + SHAPE[2:]
    net.learned_range = overrides.get("variance_type") == "learned_range"
    gen = np.random.default_rng(seed)
    x = torch.from_numpy(gen.standard_normal(shape)) * float(getattr(sch, "init_noise_sigma", 1.0))
    out["x_T"] = x.numpy().copy()
    orders, received, noises = [], [], []
    _instrument(sch, orders)
    sde = str(config.get("algorithm_type", "")).startswith("sde")
    for t in sch.timesteps:
        received.append(float(t))
        kwargs = {}
        if sde:
            noise = torch.from_numpy(gen.standard_normal(shape))
            noises.append(noise.numpy())
            kwargs["variance_noise"] = noise
        x_in = sch.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
        x = sch.step(net(x_in, t), t, x, **kwargs).prev_sample
    if cls_name == S:
        orders = list(sch.order_list)
    out["model_t"] = np.asarray(received, dtype=np.float64)
    if cls_name != F:  # FlowMatch's loop is Euler: DPM-Solver++ of order 1 on a flow, exactly
        out["orders"] = np.asarray(orders, dtype=np.int64)
    out["x_final"] = x.double().numpy()
    if not np.all(np.isfinite(out["x_final"])) and cls_name == U:
        # diffusers' UniPC with solver_type="bh1" steps to sigma = 0 as 0 * inf; the limit of
        # its own arithmetic is found by ending at sigma = 1e-30 instead of 0.
        out["x_limit"] = _limit_run(cls, sch.config, steps, out["x_T"])
    if sde:
        out["noise"] = np.stack(noises)
    return out


def _limit_run(cls, config, steps, x_T):
    sch = cls.from_config({k: v for k, v in config.items() if k not in ("_class_name", "_use_default_values")})
    sch.set_timesteps(steps)
    assert float(sch.sigmas[-1]) == 0.0
    sch.sigmas[-1] = 1e-30
    x = torch.from_numpy(x_T)
    for t in sch.timesteps:
        x = sch.step(net(sch.scale_model_input(x, t), t), t, x).prev_sample
    return x.double().numpy()


def main(path=None):
    path = path or os.path.join(os.path.dirname(__file__), "..", "tests", "data", "diffusers_reference.npz")
    names = [c[0] for c in CONFIGS] + [m[0] for m in MODELS]
    arrays = {"diffusers_version": np.array(diffusers.__version__), "torch_version": np.array(torch.__version__),
              "names": np.array(names)}
    jobs = [(c[0], c[1], c[2], c[3], c[4] if len(c) > 4 else {}, None, None) for c in CONFIGS]
    jobs += [(name, cls_name, kwargs, steps, extra, model_config(model), mode)
             for name, model, cls_name, mode, steps, kwargs, extra in MODELS]
    for k, (name, cls_name, overrides, steps, extra, source, mode) in enumerate(jobs):
        rec = run(name, cls_name, overrides, steps, extra, seed=k, source=source, mode=mode)
        for key, value in rec.items():
            arrays[f"{key}_{name}"] = value
        print(f"{name:28s} steps={steps:3d} orders={rec.get('orders', '-')}"
              f" final finite={np.all(np.isfinite(rec['x_final'])) if 'x_final' in rec else '-'}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what the user's umask gives a new file
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    print(f"wrote {path} ({os.path.getsize(path)} bytes), diffusers {diffusers.__version__}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
