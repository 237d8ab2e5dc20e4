"""A diffusers ``scheduler_config.json`` as a dpmjax schedule and ``sample()`` options.

::

    schedule, options = dpmjax.from_diffusers("model/scheduler", num_inference_steps=25)
    print(options)       # what was chosen: method, algorithm, orders, the time grid ...
    x = dpmjax.sample(wrap_model(net, config), params, key, shape, schedule=schedule, **options)

reproduces diffusers' loop ``for t in scheduler.timesteps: x = scheduler.step(net(x, t),
t, x).prev_sample`` (to about 1e-6 relative in float64; diffusers itself steps in float32),
the network receiving the same timestep values diffusers passes it.

What diffusers does, and how it is mapped (diffusers 0.42):

* **Reading the config.** As diffusers' ``cls.from_config(config)``: the class's
  ``__init__`` parameters are read and every other key is ignored (another class's keys
  that ``from_config(...).save_config(...)`` carries along, e.g. Stable Diffusion's
  ``clip_sample``, ``set_alpha_to_one``, ``skip_prk_steps``; ``_``-prefixed metadata); the
  ignored keys are named in one ``UserWarning`` (the options stay plain ``sample()``
  keywords). Keys listed in ``_use_default_values`` take the class's default. A missing
  key takes diffusers' default (``dynamic_thresholding_ratio=0.995``,
  ``sample_max_value=1.0``, ...). Values diffusers rewrites are rewritten the same way
  (``algorithm_type="deis"`` -> ``"dpmsolver++"``; for the DPM-Solver classes
  ``solver_type`` bh1/bh2/logrho -> midpoint, for UniPC midpoint/heun/logrho -> bh2;
  ``variance_type`` other than learned/learned_range is inert); with both
  ``use_karras_sigmas`` and ``use_lu_lambdas`` diffusers uses the Karras sigmas, and so
  does this, saying so in the warning. A parameter of the class that dpmjax does not
  follow raises ValueError naming it, unless it has its default value.

* **The table.** diffusers builds ``betas`` and ``alphas_cumprod`` in float32; we rebuild
  them the same way (float32 ``alpha = 1 - beta``, product accumulated in float64 and
  rounded to float32) and keep the whole table (:class:`VPDiscrete`, ``lambda_min=None``).
  ``rescale_betas_zero_snr`` (Lin et al. 2024) rescales ``sqrt(alphas_cumprod)`` to end at
  0 and then sets the last entry to ``2**-24`` as diffusers does.
* **The grid.** diffusers' sigmas are VE noise levels ``sigma = sqrt((1 - abar)/abar)``,
  i.e. ``lambda = -log sigma``. Each becomes the solver time whose lambda is that value
  (integer training steps sit on the table's knots ``(i + 1)/N`` exactly). The network
  time is a separate array (``FittedGrid.model_timesteps``): diffusers feeds the integer
  step index -- for Karras and Lu sigmas the *rounded* index of the sigma, for
  exponential and beta sigmas the *truncated* one (an int64 cast), while its solver uses
  the unrounded sigmas. Flow sigmas feed ``int(sigma * num_train_timesteps)``,
  ``FlowMatchEulerDiscreteScheduler`` the float32 product ``sigma * num_train_timesteps``.
  The options carry solver-unit times that :func:`dpmjax.sample` turns into exactly these
  values (on the host, in float64, then rounded once: exact in float32 and float64).
* **The last step.** ``final_sigmas_type="zero"`` ends at sigma = 0: a trailing ``0.0``
  in ``timesteps`` (the result is the data prediction at the last evaluation).
  ``"sigma_min"`` ends at the table's smallest sigma; where that equals the last grid
  sigma (Karras, exponential and beta sigmas, EDM), or lies a few float32 ulps from it
  (Lu lambdas), diffusers takes a zero-length final step, an identity at first order
  (NaN in diffusers at orders 2 and 3): it is dropped. ``order`` is then at most the
  number of steps left (1 step with ``solver_order=2`` is one first-order step).
* **Orders.** Multistep: warm-up ``1, 2, ...``; the last step is first order when
  ``euler_at_final``, ``final_sigmas_type="zero"`` or (``lower_order_final`` and fewer
  than 15 steps), the one before at most second order under the same 15-step gate.
  UniPC: ``min(order, steps - i)`` with ``lower_order_final`` (no gate). Singlestep: the
  outer orders of diffusers' ``order_list``; inner points are grid points.
* **UniPC bh1 ending at 0.** diffusers computes ``0 * inf`` and returns NaN; we return
  the finite limit (the data prediction at the last evaluation).

``DPMSolverMultistepInverseScheduler`` maps to :func:`dpmjax.invert`: the options are
for ``dpmjax.invert(model_fn, params, x0, schedule=schedule, **options)`` and carry
``"invert": True`` to say so (pop it before the call). With ``use_flow_sigmas`` diffusers'
inverse scheduler steps its flow sigmas *downwards* (from about 1 towards the data, as
sampling does); that is reproduced as a sampling run: ``"invert": False``, for
``dpmjax.sample(..., noise=x)``.

Networks that need wrapping (:func:`wrap_model`): EDM's preconditioning and
``variance_type="learned"/"learned_range"`` (the variance half of the channels is
dropped: diffusers keeps channels ``[:, :3]``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from typing import Mapping

import numpy as np

from .schedules import EDM, RectifiedFlow, VPDiscrete
from .timesteps import FittedGrid

__all__ = ["from_diffusers", "wrap_model", "SCHEDULERS"]

MULTISTEP = "DPMSolverMultistepScheduler"
SINGLESTEP = "DPMSolverSinglestepScheduler"
UNIPC = "UniPCMultistepScheduler"
EDM_MULTISTEP = "EDMDPMSolverMultistepScheduler"
INVERSE = "DPMSolverMultistepInverseScheduler"
FLOW_MATCH = "FlowMatchEulerDiscreteScheduler"

#: the scheduler classes :func:`from_diffusers` maps
SCHEDULERS = (MULTISTEP, SINGLESTEP, UNIPC, EDM_MULTISTEP, INVERSE, FLOW_MATCH)

_PREDICTION = {"epsilon": "noise", "sample": "x_start", "v_prediction": "v", "flow_prediction": "flow"}

# Keys each class accepts; value None: any value is honoured; otherwise the honoured values.
_VP_TABLE = {"num_train_timesteps": None, "beta_start": None, "beta_end": None, "beta_schedule": None,
             "trained_betas": None}
_SOLVER = {"solver_order": (1, 2, 3), "prediction_type": tuple(_PREDICTION), "thresholding": (False, True),
           "dynamic_thresholding_ratio": None, "sample_max_value": None, "lower_order_final": (True, False)}
_SIGMAS = {"use_karras_sigmas": (True, False), "use_exponential_sigmas": (True, False),
           "use_beta_sigmas": (True, False), "use_flow_sigmas": (True, False), "flow_shift": None}
_KEYS = {
    MULTISTEP: {**_VP_TABLE, **_SOLVER, **_SIGMAS,
                "algorithm_type": ("dpmsolver", "dpmsolver++", "sde-dpmsolver++"),
                "solver_type": ("midpoint", "heun"), "euler_at_final": (True, False),
                "use_lu_lambdas": (True, False), "final_sigmas_type": ("zero", "sigma_min"),
                "lambda_min_clipped": None, "variance_type": None,
                "timestep_spacing": ("linspace", "leading", "trailing"), "steps_offset": None,
                "rescale_betas_zero_snr": (True, False), "use_dynamic_shifting": (True, False),
                "time_shift_type": ("exponential",)},
    SINGLESTEP: {**_VP_TABLE, **_SOLVER, **_SIGMAS,
                 "algorithm_type": ("dpmsolver", "dpmsolver++"), "solver_type": ("midpoint", "heun"),
                 "final_sigmas_type": ("zero", "sigma_min"), "lambda_min_clipped": None,
                 "variance_type": None, "use_dynamic_shifting": (True, False),
                 "time_shift_type": ("exponential",)},
    UNIPC: {**_VP_TABLE, **_SOLVER, **_SIGMAS,
            "predict_x0": (True, False), "solver_type": ("bh1", "bh2"), "disable_corrector": None,
            "solver_p": (None,), "timestep_spacing": ("linspace", "leading", "trailing"), "steps_offset": None,
            "final_sigmas_type": ("zero", "sigma_min"), "rescale_betas_zero_snr": (True, False),
            "use_dynamic_shifting": (True, False), "time_shift_type": ("exponential",),
            "sigma_min": (None,), "sigma_max": (None,), "shift_terminal": (None,)},
    EDM_MULTISTEP: {"sigma_min": None, "sigma_max": None, "sigma_data": None,
                    "sigma_schedule": ("karras", "exponential"), "num_train_timesteps": None,
                    "prediction_type": ("epsilon", "v_prediction"), "rho": None, "solver_order": (1, 2, 3),
                    "thresholding": (False,), "dynamic_thresholding_ratio": None, "sample_max_value": None,
                    "algorithm_type": ("dpmsolver++",), "solver_type": ("midpoint", "heun"),
                    "lower_order_final": (True, False), "euler_at_final": (True, False),
                    "final_sigmas_type": ("zero", "sigma_min")},
    INVERSE: {**_VP_TABLE, **_SOLVER, **_SIGMAS,
              "algorithm_type": ("dpmsolver", "dpmsolver++"), "solver_type": ("midpoint", "heun"),
              "euler_at_final": (True, False), "lambda_min_clipped": None,
              "variance_type": None,
              "timestep_spacing": ("linspace", "leading", "trailing"), "steps_offset": None},
    FLOW_MATCH: {"num_train_timesteps": None, "shift": None, "use_dynamic_shifting": (True, False),
                 "base_shift": None, "max_shift": None, "base_image_seq_len": None, "max_image_seq_len": None,
                 "invert_sigmas": (False,), "shift_terminal": (None,), "use_karras_sigmas": (False,),
                 "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
                 "time_shift_type": ("exponential",), "stochastic_sampling": (False,)},
}
# Each class's ``__init__`` parameters with their defaults (diffusers 0.42): what the class
# reads from a config. Any other key is ignored by diffusers' ``from_config`` (and so here).
_VP_SIG = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "trained_betas": None, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
           "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_SIGNATURES = {
    MULTISTEP: {**_VP_SIG, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
                "euler_at_final": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False, "flow_shift": 1.0,
                "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf, "variance_type": None,
                "timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": False,
                "use_dynamic_shifting": False, "time_shift_type": "exponential"},
    SINGLESTEP: {**_VP_SIG, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": False,
                 "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                 "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero",
                 "lambda_min_clipped": -math.inf, "variance_type": None, "use_dynamic_shifting": False,
                 "time_shift_type": "exponential"},
    UNIPC: {**_VP_SIG, "predict_x0": True, "solver_type": "bh2", "lower_order_final": True, "disable_corrector": [],
            "solver_p": None, "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
            "use_flow_sigmas": False, "flow_shift": 1.0, "timestep_spacing": "linspace", "steps_offset": 0,
            "final_sigmas_type": "zero", "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
            "time_shift_type": "exponential", "sigma_min": None, "sigma_max": None, "shift_terminal": None},
    EDM_MULTISTEP: {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "sigma_schedule": "karras",
                    "num_train_timesteps": 1000, "prediction_type": "epsilon", "rho": 7.0, "solver_order": 2,
                    "thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
                    "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
                    "euler_at_final": False, "final_sigmas_type": "zero"},
    INVERSE: {**_VP_SIG, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
              "euler_at_final": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
              "use_beta_sigmas": False, "use_flow_sigmas": False, "flow_shift": 1.0, "lambda_min_clipped": -math.inf,
              "variance_type": None, "timestep_spacing": "linspace", "steps_offset": 0},
    FLOW_MATCH: {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
                 "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False,
                 "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                 "use_beta_sigmas": False, "time_shift_type": "exponential", "stochastic_sampling": False},
}
# Values diffusers' ``__init__`` rewrites (a config of another solver family, e.g. DEIS or UniPC
# loaded by DPMSolverMultistepScheduler.from_config): {class: {key: {given: used}}}.
_DPM_REWRITES = {"algorithm_type": {"deis": "dpmsolver++"},
                 "solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}}
_REWRITES = {MULTISTEP: _DPM_REWRITES, SINGLESTEP: _DPM_REWRITES, INVERSE: _DPM_REWRITES, EDM_MULTISTEP: _DPM_REWRITES,
             UNIPC: {"solver_type": {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}}}
# The values of keys a class does not have, for the code paths shared between classes
# (each means "this feature is off").
_INERT = {"use_lu_lambdas": False, "euler_at_final": False, "final_sigmas_type": "zero", "timestep_spacing": "linspace",
          "steps_offset": 0, "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
          "algorithm_type": "dpmsolver++", "predict_x0": True, "disable_corrector": [], "variance_type": None,
          "lambda_min_clipped": -math.inf, "use_karras_sigmas": False, "use_exponential_sigmas": False,
          "use_beta_sigmas": False, "use_flow_sigmas": False, "flow_shift": 1.0, "trained_betas": None,
          "prediction_type": "flow_prediction", "thresholding": False}  # FlowMatch: a flow model, no thresholding
_DEFAULTS = {**_SIGNATURES[MULTISTEP], **_INERT}  # the multistep solver's defaults (FlowMatch's orders)

# Keys whose value must be a real number: (key, lower bound, bound included?, upper bound, "what").
_REALS = {"beta_start": (0.0, True, 1.0), "beta_end": (0.0, True, 1.0), "dynamic_thresholding_ratio": (0.0, False, 1.0),
          "sample_max_value": (0.0, False, math.inf), "flow_shift": (0.0, False, math.inf),
          "shift": (0.0, False, math.inf), "sigma_min": (0.0, False, math.inf), "sigma_max": (0.0, False, math.inf),
          "sigma_data": (0.0, False, math.inf), "rho": (0.0, False, math.inf),
          "base_shift": (-math.inf, True, math.inf), "max_shift": (-math.inf, True, math.inf)}


# --------------------------------------------------------------------------- reading
def _read(config) -> tuple[dict, str]:
    """``(mapping, where)``: a Mapping, a path to a JSON file or to a directory holding
    ``scheduler_config.json``, or an object with a ``.config`` mapping."""
    if isinstance(config, Mapping):
        return dict(config), "the config mapping"
    if not isinstance(config, (str, os.PathLike)) and isinstance(getattr(config, "config", None), Mapping):
        return dict(config.config), f"{type(config).__name__}.config"
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError("config must be a Mapping, a path (str or os.PathLike) to scheduler_config.json or "
                        f"to a directory holding one, or an object with a .config mapping; got {type(config).__name__}")
    path = os.fspath(config)
    if os.path.isdir(path):
        inner = os.path.join(path, "scheduler_config.json")
        if not os.path.isfile(inner):
            raise ValueError(f"directory {path!r} holds no scheduler_config.json")
        path = inner
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path!r} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"config file {path!r} is nested too deeply to be a scheduler config") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a JSON object, got a JSON {type(data).__name__}")
    return data, repr(path)


def _unsupported(name, where):
    return ValueError(
        f"scheduler class {name!r} (in {where}) is not supported; supported: {SCHEDULERS}. To sample with this "
        f"model's table and prediction type as diffusers' DPMSolverMultistepScheduler.from_config(config) does, "
        f"pass scheduler='DPMSolverMultistepScheduler' (or 'UniPCMultistepScheduler', "
        f"'DPMSolverSinglestepScheduler'; 'FlowMatchEulerDiscreteScheduler' for a flow model's config)")


def _same(value, allowed):
    """``value`` is ``allowed`` as JSON would hold it (``True`` is not ``1``; ``1`` is ``1.0``)."""
    if isinstance(value, bool) or isinstance(allowed, bool) or value is None or allowed is None:
        return value is allowed
    if isinstance(value, numbers.Real) and isinstance(allowed, numbers.Real):
        return value == allowed
    if isinstance(value, (list, tuple)) and isinstance(allowed, (list, tuple)):
        return len(value) == len(allowed) and all(_same(a, b) for a, b in zip(value, allowed))
    return type(value) is type(allowed) and value == allowed


def _check_value(name, key, value, where):
    """Type and range checks of the keys whose value is a number (before any arithmetic)."""
    if key in _REALS:
        lo, closed, hi = _REALS[key]
        if key in ("sigma_min", "sigma_max") and name != EDM_MULTISTEP:
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} config {key} must be a real number (in {where}), got {value!r}")
        v = float(value)
        if not (math.isfinite(v) and (v >= lo if closed else v > lo) and v <= hi):
            bounds = f"{'[' if closed else '('}{lo}, {hi}]"
            raise ValueError(f"{name} config {key} must be a finite number in {bounds} (in {where}), got {value!r}")
    elif key == "lambda_min_clipped":
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) \
                or value == math.inf:
            raise ValueError(f"{name} config lambda_min_clipped must be a real number or -inf (in {where}), "
                             f"got {value!r}")
    elif key in ("steps_offset", "base_image_seq_len", "max_image_seq_len"):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} config {key} must be an integer >= 0 (in {where}), got {value!r}")
    elif key == "disable_corrector":
        if not isinstance(value, (list, tuple)) or any(
                isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0 for i in value):
            raise ValueError(f"{name} config disable_corrector must be a list of step indices (integers >= 0) "
                             f"(in {where}), got {value!r}")
    elif key == "trained_betas" and value is not None:
        if not isinstance(value, (list, tuple)) or any(
                isinstance(b, bool) or not isinstance(b, numbers.Real) or not 0 < b < 1 for b in value):
            raise ValueError(f"{name} config trained_betas must be a list of numbers in (0, 1) (in {where})")


def _resolve(config, scheduler, *, warn=True):
    """``(class name, full config)``, as diffusers' ``cls.from_config(config)`` reads it.

    diffusers keeps the class's ``__init__`` parameters and ignores every other key (another
    class's, e.g. Stable Diffusion's ``clip_sample``; ``_``-prefixed metadata); keys listed
    in ``_use_default_values`` take the class's default. The ignored keys are named in a
    UserWarning. A parameter dpmjax does not follow raises ValueError unless it has the
    default value.
    """
    cfg, where = _read(config)
    given = cfg.get("_class_name")
    if given is not None and not isinstance(given, str):
        raise TypeError(f"_class_name must be a string (in {where}), got {given!r}")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r} is not supported; supported: {SCHEDULERS}")
    name = scheduler if scheduler is not None else given
    if name is None:
        raise ValueError(f"{where} has no _class_name: pass scheduler= (one of {SCHEDULERS})")
    if name not in SCHEDULERS:
        raise _unsupported(name, where)
    defaulted = cfg.get("_use_default_values", [])
    if not isinstance(defaulted, (list, tuple)) or not all(isinstance(k, str) for k in defaulted):
        raise ValueError(f"_use_default_values must be a list of key names (in {where}), got {defaulted!r}")
    signature = _SIGNATURES[name]
    ignored = [k for k in cfg if not k.startswith("_") and k not in signature]
    cfg = {k: v for k, v in cfg.items() if k in signature and k not in defaulted}
    notes = []
    given_algorithm = cfg.get("algorithm_type", signature.get("algorithm_type"))
    for key, table in _REWRITES.get(name, {}).items():
        if isinstance(cfg.get(key), str) and cfg[key] in table:
            notes.append(f"{key}={cfg[key]!r} is read as {table[cfg[key]]!r}")
            cfg[key] = table[cfg[key]]
    if cfg.get("use_karras_sigmas") is True and cfg.get("use_lu_lambdas") is True:
        notes.append("use_lu_lambdas=True is not used with use_karras_sigmas=True (Karras sigmas take precedence)")
        cfg["use_lu_lambdas"] = False
    if cfg.get("use_lu_lambdas") is True and (cfg.get("use_exponential_sigmas") is True
                                              or cfg.get("use_beta_sigmas") is True):
        notes.append("use_exponential_sigmas/use_beta_sigmas are not used with use_lu_lambdas=True "
                     "(Lu lambdas take precedence)")
        cfg["use_exponential_sigmas"] = cfg["use_beta_sigmas"] = False
    if "variance_type" in cfg and cfg["variance_type"] not in ("learned", "learned_range"):
        cfg["variance_type"] = None  # diffusers acts only on these two (DDPM's "fixed_small" is inert)
    allowed = _KEYS[name]
    for key, value in cfg.items():
        _check_value(name, key, value, where)
        if key not in allowed:
            if not _same(value, signature[key]):
                raise ValueError(f"{name} config {key}={value!r} (in {where}) is not honoured by dpmjax; "
                                 f"only its default {signature[key]!r} is")
            continue
        ok = allowed[key]
        if ok is not None and not any(_same(value, v) for v in ok):
            raise ValueError(f"{name} config {key}={value!r} (in {where}) is not honoured by dpmjax; "
                             f"supported values: {ok}")
    if warn and (ignored or notes):
        parts = []
        if ignored:
            parts.append(f"ignored keys {ignored} (not parameters of {name})")
        warnings.warn(f"from_diffusers: {where} read as diffusers' {name}.from_config reads it: "
                      + "; ".join(parts + notes), UserWarning, stacklevel=3)
    full = {**_INERT, **signature, **cfg}
    if cfg.get("trained_betas") is not None and "num_train_timesteps" not in cfg:
        full["num_train_timesteps"] = len(cfg["trained_betas"])
    n = full["num_train_timesteps"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2 (in {where}), got {n!r}")
    if name == EDM_MULTISTEP and not full["sigma_min"] < full["sigma_max"]:
        raise ValueError(f"sigma_min must be < sigma_max (in {where}), got {full['sigma_min']}, {full['sigma_max']}")
    if sum(bool(full[k]) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")) > 1:
        raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be set")
    if full["use_flow_sigmas"] and (full["use_karras_sigmas"] or full["use_exponential_sigmas"]
                                    or full["use_beta_sigmas"] or full["use_lu_lambdas"]):
        raise ValueError("use_flow_sigmas together with Karras/exponential/beta/Lu sigmas is not honoured")
    if full["use_dynamic_shifting"] and name != FLOW_MATCH and not full["use_flow_sigmas"]:
        raise ValueError("use_dynamic_shifting is honoured only with use_flow_sigmas=True")
    if given_algorithm not in ("dpmsolver++", "sde-dpmsolver++") and full["final_sigmas_type"] == "zero" \
            and name in (MULTISTEP, SINGLESTEP, EDM_MULTISTEP):
        raise ValueError(f"algorithm_type={given_algorithm!r} needs final_sigmas_type='sigma_min' (diffusers' {name} "
                         "refuses it with final_sigmas_type='zero')")
    if full["prediction_type"] == "flow_prediction" and not (full["use_flow_sigmas"] or name == FLOW_MATCH):
        raise ValueError("prediction_type='flow_prediction' needs use_flow_sigmas=True")
    if full["use_flow_sigmas"] and full["prediction_type"] != "flow_prediction":
        raise ValueError("use_flow_sigmas needs prediction_type='flow_prediction'")
    if full["variance_type"] is not None and full["prediction_type"] != "epsilon":
        raise ValueError("variance_type='learned'/'learned_range' is honoured with prediction_type='epsilon'")
    return name, full


# --------------------------------------------------------------------------- tables
def _alphas_cumprod(cfg) -> np.ndarray:
    """diffusers' float32 ``alphas_cumprod`` (as float64 values)."""
    n = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
        if betas.shape != (n,):
            raise ValueError(f"trained_betas must have num_train_timesteps = {n} entries, got {betas.shape}")
    elif cfg["beta_schedule"] == "linear":
        betas = np.linspace(cfg["beta_start"], cfg["beta_end"], n)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":
        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)])
    else:
        raise ValueError(f"beta_schedule must be one of ('linear', 'scaled_linear', 'squaredcos_cap_v2'), "
                         f"got {cfg['beta_schedule']!r}")
    betas = betas.astype(np.float32)
    if cfg.get("rescale_betas_zero_snr"):
        ab = np.sqrt(np.cumprod((np.float32(1) - betas).astype(np.float64)))
        a0, aT = ab[0], ab[-1]
        ab = (ab - aT) * (a0 / (a0 - aT))
        abar = ab**2
        alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
        betas = (1.0 - alphas).astype(np.float32)
    alphas = (np.float32(1) - betas).astype(np.float32)
    ac = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    if cfg.get("rescale_betas_zero_snr"):
        # diffusers sets the last entry to 2**-24, above the two before it (~4e-9, ~2e-8 for
        # the linear table): its table is not monotone there. Those entries are replaced by
        # a geometric bridge (they are never on a grid of fewer than ~300 steps; grids that
        # visit them are refused in _vp_grid).
        ac[-1] = 2.0**-24
        bad = np.nonzero(ac[:-1] <= ac[-1])[0]
        if bad.size:
            k0 = bad[0] - 1
            w = (np.arange(k0, n) - k0) / (n - 1 - k0)
            ac[k0:] = np.exp((1 - w) * np.log(np.float64(ac[k0])) + w * np.log(np.float64(ac[-1])))
            cfg["_bridged"] = (int(k0) + 1, n - 1)
    if np.any(ac <= 0) or np.any(np.diff(ac) >= 0):
        raise ValueError("the config's betas give alphas_cumprod that are not strictly decreasing in (0, 1)")
    return ac.astype(np.float64)


def _sigma_to_t(sigma, log_sigmas):
    """diffusers' piecewise-linear map from a sigma to a (fractional) training index."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    n = log_sigmas.shape[0]
    low = np.clip(np.sum(log_sigmas[None, :] <= log_sigma[:, None], axis=1) - 1, 0, n - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
    return (1 - w) * low + w * (low + 1)


def _karras(smin, smax, n, rho=7.0):
    ramp = np.linspace(0, 1, n)
    return (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


def _flow_shift(cfg, sigmas, mu):
    if cfg["use_dynamic_shifting"]:
        if mu is None:
            raise ValueError("use_dynamic_shifting=True needs mu= (diffusers' set_timesteps(mu=...))")
        try:
            e = math.exp(mu)
        except OverflowError:
            raise ValueError(f"mu={mu!r} is too large: exp(mu) overflows (every sigma would be 1)") from None
        return e / (e + (1 / sigmas - 1))
    if mu is not None:
        raise ValueError("mu= is used only with use_dynamic_shifting=True")
    s = cfg["flow_shift"] if "flow_shift" in cfg and cfg.get("use_flow_sigmas") else cfg["shift"]
    return s * sigmas / (1 + (s - 1) * sigmas)


def _vp_grid(name, cfg, steps, mu):
    """diffusers' ``(sigmas (steps + 1, float32 values), network timesteps (steps,))``."""
    n_train = cfg["num_train_timesteps"]
    ac = _alphas_cumprod(cfg)
    ac32 = ac.astype(np.float32)
    table = np.sqrt((np.float32(1) - ac32) / ac32).astype(np.float32)  # float32 like diffusers
    log_sigmas = np.log(table)
    lam32 = (np.log(np.sqrt(ac32)) - np.log(np.sqrt(np.float32(1) - ac32))).astype(np.float32)
    clipped = int(np.searchsorted(lam32[::-1], np.float32(cfg["lambda_min_clipped"]), side="left"))
    spacing = cfg["timestep_spacing"]
    if name == SINGLESTEP:
        spacing = "linspace"
    if name == INVERSE:
        noisiest = n_train - 1 - clipped
        if spacing == "linspace":
            idx = np.linspace(0, noisiest, steps + 1).round()[:-1].astype(np.int64)
        elif spacing == "leading":
            idx = (np.arange(steps + 1) * ((noisiest + 1) // (steps + 1))).round()[:-1].astype(np.int64)
            idx += cfg["steps_offset"]
        else:
            idx = np.arange(noisiest + 1, 0, -n_train / steps).round()[::-1].astype(np.int64) - 1
    else:
        last = n_train - clipped
        if spacing == "linspace":
            idx = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            ratio = (last if name == MULTISTEP else n_train) // (steps + 1)
            idx = (np.arange(steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg["steps_offset"]
        else:
            start = last if name == MULTISTEP else n_train
            idx = np.arange(start, 0, -n_train / steps).round().astype(np.int64) - 1
    rounded = name != MULTISTEP or cfg["beta_schedule"] != "squaredcos_cap_v2"
    flip = (lambda a: a) if name == INVERSE else (lambda a: a[::-1])
    in_sig = flip(table)
    smin_k, smax_k = float(in_sig[-1]), float(in_sig[0])
    flow = False
    if cfg["use_karras_sigmas"]:
        sig = _karras(smin_k, smax_k, steps)
        t = _sigma_to_t(sig, log_sigmas)
        t = t.round() if rounded else t
    elif cfg["use_lu_lambdas"]:
        lams = np.linspace(float(log_sigmas[-1]), float(log_sigmas[0]), steps)
        sig = np.exp(lams)
        t = _sigma_to_t(sig, log_sigmas)
        t = t.round() if rounded else t
    elif cfg["use_exponential_sigmas"]:
        sig = np.exp(np.linspace(math.log(smax_k), math.log(smin_k), steps))
        t = _sigma_to_t(sig, log_sigmas)
    elif cfg["use_beta_sigmas"]:
        from scipy.stats import beta as _beta  # scikit-learn's dependency; only this option needs it
        ppf = _beta.ppf(1 - np.linspace(0, 1, steps), 0.6, 0.6)
        sig = smin_k + ppf * (smax_k - smin_k)
        t = _sigma_to_t(sig, log_sigmas)
    elif cfg["use_flow_sigmas"]:
        flow = True
        if name == UNIPC:
            sig = _flow_shift(cfg, np.linspace(1, 1 / n_train, steps + 1)[:-1], mu)
            if abs(sig[0] - 1) < 1e-6:
                sig[0] -= 1e-6
        else:
            if mu is not None:
                if not cfg["use_dynamic_shifting"]:
                    raise ValueError("mu= is used only with use_dynamic_shifting=True")
                cfg = {**cfg, "flow_shift": math.exp(mu), "use_dynamic_shifting": False}
            elif cfg["use_dynamic_shifting"]:
                raise ValueError("use_dynamic_shifting=True needs mu= (diffusers' set_timesteps(mu=...))")
            s0 = 1.0 - np.linspace(1, 1 / n_train, steps + 1)
            # (the inverse scheduler builds the same decreasing sigmas: it steps them downwards)
            sig = np.flip(cfg["flow_shift"] * s0 / (1 + (cfg["flow_shift"] - 1) * s0))[:-1].copy()
        t = sig * n_train
    else:
        sig = np.interp(idx, np.arange(n_train), table.astype(np.float64))
        t = idx.astype(np.float64)
    if mu is not None and not flow:
        raise ValueError("mu= is used only with use_dynamic_shifting=True and use_flow_sigmas=True")
    if name == INVERSE:
        last_sigma = sig[-1] if (cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"]
                                 or cfg["use_beta_sigmas"] or flow) else float(table[noisiest])
    elif cfg["final_sigmas_type"] == "zero":
        last_sigma = 0.0
    elif name == UNIPC and (cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"]
                            or cfg["use_beta_sigmas"] or flow):
        last_sigma = sig[-1]
    else:
        last_sigma = float(np.sqrt((1 - ac32[0]) / ac32[0]))
    sigmas = np.concatenate([sig, [last_sigma]]).astype(np.float32).astype(np.float64)
    model_t = np.trunc(t).astype(np.int64).astype(np.float64)
    if "_bridged" in cfg and not flow:
        lo, hi = cfg["_bridged"]
        if np.any((model_t >= lo) & (model_t < hi)):
            raise ValueError(f"with rescale_betas_zero_snr diffusers' alphas_cumprod is not monotone at training "
                             f"steps {lo}..{hi - 1}; this grid visits them (use fewer steps)")
    if name == INVERSE:
        _, first = np.unique(model_t, return_index=True)
        if len(first) != len(model_t):
            raise ValueError("this inverse grid repeats a training index (diffusers drops it, shifting its grid); "
                             "use fewer steps")
    return sigmas, model_t, ac, flow


# --------------------------------------------------------------------------- orders
def _multistep_orders(name, cfg, steps):
    gate = cfg["lower_order_final"] and steps < 15
    final_zero = name != INVERSE and cfg["final_sigmas_type"] == "zero"
    orders = []
    for i in range(steps):
        last = i == steps - 1 and (cfg["euler_at_final"] or gate or final_zero)
        second = i == steps - 2 and gate
        if cfg["solver_order"] == 1 or i < 1 or last:
            orders.append(1)
        elif cfg["solver_order"] == 2 or i < 2 or second:
            orders.append(2)
        else:
            orders.append(3)
    return orders


def _unipc_orders(cfg, steps):
    orders = []
    for i in range(steps):
        k = min(cfg["solver_order"], steps - i) if cfg["lower_order_final"] else cfg["solver_order"]
        orders.append(min(k, i + 1))
    return orders


def _singlestep_order_list(cfg, steps):
    """diffusers' per-evaluation ``order_list`` (after its own lower_order_final rewrites)."""
    order = cfg["solver_order"]
    lof = cfg["lower_order_final"]
    if (not lof and steps % order != 0) or (not lof and cfg["final_sigmas_type"] == "zero"):
        lof = True
    if lof:
        if order == 3:
            tail = {0: [1, 2, 1], 1: [1], 2: [1, 2]}[steps % 3]
            orders = [1, 2, 3] * (steps // 3 - (1 if steps % 3 == 0 else 0)) + tail
        elif order == 2:
            orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
        else:
            orders = [1] * steps
    else:
        orders = {3: [1, 2, 3] * (steps // 3), 2: [1, 2] * (steps // 2), 1: [1] * steps}[order]
    if cfg["final_sigmas_type"] == "zero":
        orders[-1] = 1
    return orders


def _outer(order_list):
    """Per-evaluation orders ``1, 2, .., k`` of each group -> the groups' orders."""
    outer = []
    for o in order_list:
        if o == 1:
            outer.append(1)
        else:
            outer[-1] = o
    return outer


# --------------------------------------------------------------------------- public
def from_diffusers(config, num_inference_steps: int, *, scheduler: str | None = None, mu: float | None = None):
    """Map a diffusers scheduler config to ``(schedule, options)`` for :func:`dpmjax.sample`.

    Args:
      config: a Mapping, a path to ``scheduler_config.json``, a directory holding one, or
        an object with a ``.config`` mapping (a diffusers scheduler).
      num_inference_steps: diffusers' ``set_timesteps(num_inference_steps)``.
      scheduler: the solver class when the config has no ``_class_name`` (one of
        :data:`SCHEDULERS`), or to use another class's config with this solver, as
        diffusers' ``DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`` does
        (e.g. Stable Diffusion 1.5 ships a ``PNDMScheduler`` config, SDXL an
        ``EulerDiscreteScheduler`` one): the keys that class does not take are dropped, as
        diffusers drops them, and named in a ``UserWarning``.
      mu: diffusers' ``set_timesteps(mu=...)`` for ``use_dynamic_shifting=True`` (a finite
        number).

    Returns ``(schedule, options)``; ``options`` is a plain dict of :func:`dpmjax.sample`
    keyword arguments (``timesteps`` a :class:`dpmjax.FittedGrid` holding the solver
    grid and the network's times, ``orders``, ``method``, ``algorithm``, ``model_type`` ...).
    Keys diffusers ignores for the class are ignored and named in one ``UserWarning``; a
    parameter of the class, or a value, that dpmjax does not honour raises ``ValueError``
    (``TypeError`` for a wrong type) naming it; nothing is half-applied. See the module
    docstring for what diffusers does at each option.

    Example::

        schedule, options = dpmjax.from_diffusers({"_class_name": "DPMSolverMultistepScheduler",
                                                    "use_karras_sigmas": True}, 20)
        x = dpmjax.sample(model_fn, params, key, (4, 3, 32, 32), schedule=schedule, **options)
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
            or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    steps = int(num_inference_steps)
    if mu is not None and (isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not math.isfinite(mu)):
        raise ValueError(f"mu must be a finite real number (diffusers' set_timesteps(mu=...)), got {mu!r}")
    name, cfg = _resolve(config, scheduler)
    if mu is not None and not cfg["use_dynamic_shifting"]:
        raise ValueError("mu= is used only with use_dynamic_shifting=True")
    if name == FLOW_MATCH:
        return _flow_match(cfg, steps, mu)
    if name == EDM_MULTISTEP:
        return _edm(cfg, steps)
    sigmas, model_t, ac, flow = _vp_grid(name, cfg, steps, mu)
    n_train = cfg["num_train_timesteps"]
    if name == SINGLESTEP:
        orders = _singlestep_order_list(cfg, steps)
    elif name == UNIPC:
        orders = _unipc_orders(cfg, steps)
    else:
        orders = _multistep_orders(name, cfg, steps)
    sigmas, model_t, orders = _drop_zero_length(name, sigmas, model_t, orders)
    _check_grid(sigmas, cfg, mu, increasing=name == INVERSE and not flow)
    if flow:
        schedule = RectifiedFlow(T=float(sigmas.max()), t_eps=float(min(1e-3, sigmas[sigmas > 0].min() / 2)),
                                 time_scale=float(n_train))
        ts = sigmas.copy()
    else:
        schedule = VPDiscrete.from_alphas_cumprod(ac, lambda_min=None)
        ts = _vp_solver_times(ac, sigmas)
    model_ts = _exact_model_times(schedule, model_t)
    options = _solver_options(name, cfg, steps=len(model_t), flow=flow)
    if name == SINGLESTEP:
        options["orders"] = tuple(_outer(orders))
    else:
        options["orders"] = tuple(orders)
        options["order"] = min(options["order"], len(orders))  # max(orders) <= this; sample needs <= steps
    if name == INVERSE and flow:
        # diffusers' inverse scheduler with use_flow_sigmas steps its sigmas downwards, from the
        # noisiest towards the data as sampling does (its timesteps are not reversed): reproduced
        # as a sampling run (dpmjax.sample with noise=x) over the same sigmas.
        options["invert"] = False
        options["timesteps"] = FittedGrid(ts, model_ts)
    elif name == INVERSE:
        options["invert"] = True
        options["timesteps"] = ts
        options["model_timesteps"] = model_ts
    else:
        options["timesteps"] = FittedGrid(ts, model_ts)
    return schedule, options


def _drop_zero_length(name, sigmas, model_t, orders):
    """Drop a final step of zero length: diffusers' last two sigmas equal, or a few float32
    ulps apart (Lu lambdas end at ``exp(log sigma_min)``, ``sigma_min`` is computed
    separately): an identity to rounding in diffusers, and a step the solver cannot take
    (its lambda does not move in float32)."""
    if len(sigmas) >= 3 and abs(sigmas[-1] - sigmas[-2]) <= 4 * np.finfo(np.float32).eps * sigmas[-2]:
        if name == SINGLESTEP and orders[-1] != 1:
            raise ValueError("this singlestep grid ends with a zero-length step inside a higher-order group; "
                             "use final_sigmas_type='zero' or another step count")
        return sigmas[:-1], model_t[:-1], orders[:-1]
    return sigmas, model_t, orders


def _exact_model_times(schedule, values):
    """Solver times ``u`` (float64) with ``schedule.model_time(u) == values`` exactly, as
    :func:`dpmjax.sample` computes it on the host: the network receives diffusers' values
    (integers stay integers; rounded once to float32 they are still exact)."""
    values = np.asarray(values, np.float64)
    out = np.asarray(schedule.solver_time(values), np.float64).copy()
    for j, (u, v) in enumerate(zip(out, values)):
        lo = hi = u
        for _ in range(8):  # u itself, then the nearest float64 numbers on either side
            hit = [c for c in dict.fromkeys((lo, hi)) if float(schedule.model_time(np.float64(c))) == v]
            if hit:
                out[j] = hit[0]
                break
            lo, hi = np.nextafter(lo, -np.inf), np.nextafter(hi, np.inf)
    return out


def _check_grid(sigmas, cfg, mu, increasing=False):
    """diffusers' sigmas must be strictly monotone in float32 and positive (but a final 0):
    a shift or ``mu`` that collapses them is refused here, naming it."""
    body = sigmas[:-1] if sigmas[-1] == 0 else sigmas
    d = np.diff(body.astype(np.float32))
    if body.size and (np.any(body <= 0) or np.any(d <= 0 if increasing else d >= 0) or not np.all(np.isfinite(body))):
        what = ", ".join(f"{k}={cfg[k]!r}" for k in ("flow_shift", "shift") if k in cfg and cfg.get(k) != 1.0)
        what = (what + ", " if what else "") + (f"mu={mu!r}" if mu is not None else "")
        raise ValueError(f"this config gives sigmas that are not strictly {'in' if increasing else 'de'}creasing "
                         f"positive numbers in float32 ({what or 'the table'}): {body}")


def _vp_solver_times(ac, sigmas):
    """Solver times whose VPDiscrete lambda is ``-log sigma`` (knots ``(i + 1)/N`` exactly)."""
    n = ac.shape[0]
    log_alpha = 0.5 * np.log(ac)
    knots = (np.arange(n) + 1.0) / n
    out = np.zeros_like(sigmas)
    table32 = np.sqrt((np.float32(1) - ac.astype(np.float32)) / ac.astype(np.float32)).astype(np.float32)
    for j, s in enumerate(sigmas):
        if s == 0.0:
            out[j] = 0.0
            continue
        hit = np.nonzero(table32.astype(np.float64) == s)[0]
        if hit.size:
            out[j] = knots[hit[0]]
            continue
        la = -0.5 * np.log1p(s * s)  # alpha = 1/sqrt(1 + sigma^2)
        out[j] = np.interp(la, log_alpha[::-1], knots[::-1], left=knots[-1], right=knots[0])
        if la > log_alpha[0]:  # beyond the first knot: the table's linear extrapolation
            out[j] = knots[0] + (la - log_alpha[0]) * (knots[1] - knots[0]) / (log_alpha[1] - log_alpha[0])
    return out


def _solver_options(name, cfg, *, steps, flow):
    options = {"steps": steps, "model_type": _PREDICTION[cfg["prediction_type"]]}
    if name == UNIPC:
        options.update(method="unipc", algorithm="dpmsolver++" if cfg["predict_x0"] else "dpmsolver",
                       order=cfg["solver_order"], variant=cfg["solver_type"],
                       disable_corrector=tuple(int(i) + 1 for i in cfg["disable_corrector"]))
    else:
        # diffusers' singlestep "midpoint" also takes DPM-Solver-3's second stage by the midpoint rule
        midpoint = "midpoint" if name == SINGLESTEP else "dpmsolver"
        options.update(method="singlestep" if name == SINGLESTEP else "multistep", algorithm=cfg["algorithm_type"],
                       order=cfg["solver_order"],
                       solver_type={"midpoint": midpoint, "heun": "taylor"}[cfg["solver_type"]])
    if cfg.get("thresholding"):
        if not options["algorithm"].endswith("++"):
            raise ValueError(f"thresholding=True with a noise-prediction solver ({cfg.get('algorithm_type')!r} / "
                             "predict_x0=False) is not supported: diffusers thresholds x0 and converts it back to "
                             "noise; use a data-prediction solver (algorithm_type='dpmsolver++', predict_x0=True)")
        # diffusers clamps the per-sample quantile to [1, sample_max_value]
        options.update(thresholding=True, dynamic_thresholding_ratio=float(cfg["dynamic_thresholding_ratio"]),
                       thresholding_max_val=1.0, sample_max_value=float(cfg["sample_max_value"]))
    return options


def _edm(cfg, steps):
    smin, smax, rho = float(cfg["sigma_min"]), float(cfg["sigma_max"]), float(cfg["rho"])
    if cfg["sigma_schedule"] == "karras" and not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"config key 'rho' (the exponent of the Karras sigmas) must be a finite number > 0; got {rho}")
    if cfg["sigma_schedule"] == "karras":
        sig = _karras(smin, smax, steps, rho)
    else:
        sig = np.exp(np.linspace(math.log(smin), math.log(smax), steps))[::-1]
    last = 0.0 if cfg["final_sigmas_type"] == "zero" else smin
    sigmas = np.concatenate([sig, [last]]).astype(np.float32).astype(np.float64)
    orders = _multistep_orders(EDM_MULTISTEP, cfg, steps)
    sigmas, _, orders = _drop_zero_length(EDM_MULTISTEP, sigmas, np.zeros(steps), orders)
    schedule = EDM(sigma_min=min(smin, float(sigmas[sigmas > 0].min())), sigma_max=max(smax, float(sigmas[0])),
                   sigma_data=float(cfg["sigma_data"]))
    options = {"steps": len(orders), "model_type": "edm", "method": "multistep", "algorithm": cfg["algorithm_type"],
               "order": min(cfg["solver_order"], len(orders)),
               "solver_type": {"midpoint": "dpmsolver", "heun": "taylor"}[cfg["solver_type"]],
               "orders": tuple(orders), "timesteps": FittedGrid(sigmas, None)}
    return schedule, options


def _flow_match(cfg, steps, mu):
    n = cfg["num_train_timesteps"]
    # diffusers' training sigmas, in float32 as it builds them (their ends bound the grid)
    s_train = np.arange(n, 0, -1).astype(np.float32) / np.float32(n)
    if not cfg["use_dynamic_shifting"]:
        s_train = np.float32(cfg["shift"]) * s_train / (np.float32(1) + np.float32(cfg["shift"] - 1) * s_train)
    smax, smin = float(s_train[0]), float(s_train[-1])
    sig = np.linspace(smax * n, smin * n, steps) / n
    sig = _flow_shift({**cfg, "use_flow_sigmas": False}, sig, mu)
    sig32 = sig.astype(np.float32)
    net_t = (sig32 * np.float32(n)).astype(np.float64)  # diffusers' timesteps: a float32 product
    sig = sig32.astype(np.float64)
    _check_grid(np.concatenate([sig, [0.0]]), cfg, mu)
    time_scale = float(n)
    if sig[0] >= 1.0:
        sig = sig.copy()
        sig[0] = float(np.nextafter(np.float32(1.0), np.float32(0.0)))  # lambda is infinite at sigma = 1
        # the network still gets diffusers' time n at this first evaluation: time_scale = n / sig[0]
        # (1 + 6e-8 times n) maps the solver's first time to it exactly
        time_scale = n / sig[0]
    sigmas = np.concatenate([sig, [0.0]])
    schedule = RectifiedFlow(T=float(sig[0]), t_eps=float(min(1e-3, sig[-1] / 2)), time_scale=time_scale)
    model_ts = np.minimum(_exact_model_times(schedule, net_t), sig[0])
    options = {"steps": steps, "model_type": "flow", "method": "multistep", "algorithm": "dpmsolver++",
               "order": min(2, steps), "solver_type": "dpmsolver",
               "orders": tuple(_multistep_orders(MULTISTEP, _DEFAULTS, steps)),
               "timesteps": FittedGrid(sigmas, model_ts)}
    return schedule, options


def wrap_model(model_fn, config, *, scheduler: str | None = None):
    """The network as :func:`dpmjax.sample` must see it for this config (identity for most).

    * ``EDMDPMSolverMultistepScheduler``: diffusers feeds the raw network ``F`` the
      preconditioned input and time, ``F(c_in x, c_noise)`` with
      ``c_in = 1/sqrt(sigma^2 + sigma_data^2)``, ``c_noise = log(sigma)/4``, and forms
      the denoiser ``D = c_skip x + c_out F`` (``c_skip = sigma_data^2/(sigma^2 + sigma_data^2)``,
      ``c_out = ±sigma sigma_data/sqrt(sigma^2 + sigma_data^2)``, minus for v_prediction):
      returned as ``model_type="edm"``'s ``D(x; sigma)``.
    * ``variance_type="learned"/"learned_range"``: the output's first 3 channels (the
      mean; diffusers slices ``[:, :3]``), dropping the predicted variance.
    """
    name, cfg = _resolve(config, scheduler, warn=False)
    if name == EDM_MULTISTEP:
        import jax.numpy as jnp

        sd = float(cfg["sigma_data"])
        sign = 1.0 if cfg["prediction_type"] == "epsilon" else -1.0

        def edm_denoiser(params, x, sigma, *args, **kwargs):
            s = jnp.reshape(jnp.asarray(sigma, x.dtype), jnp.shape(sigma) + (1,) * (x.ndim - jnp.ndim(sigma)))
            c_in = 1.0 / jnp.sqrt(s**2 + sd**2)
            c_noise = 0.25 * jnp.log(jnp.asarray(sigma, x.dtype))
            f = model_fn(params, c_in * x, c_noise, *args, **kwargs)
            return sd**2 / (s**2 + sd**2) * x + sign * s * sd / jnp.sqrt(s**2 + sd**2) * f

        return edm_denoiser
    if cfg.get("variance_type") in ("learned", "learned_range"):
        def mean_only(params, x, t, *args, **kwargs):
            return model_fn(params, x, t, *args, **kwargs)[:, :3]

        return mean_only
    return model_fn
