"""Model parameterisations, guidance and thresholding, and the one path from a solver to the network
(docs/algorithms.md "Model parameterisations").

The solver needs either the noise prediction ``eps(x, t)`` ("dpmsolver") or the data
prediction ``x0(x, t) = (x - sigma_t eps) / alpha_t`` ("dpmsolver++"). Each network
output type maps to both by an affine map in the output:

============  =================================  =================================
model_type    eps                                x0
============  =================================  =================================
"noise"       out                                (x - sigma out) / alpha
"x_start"     (x - alpha out) / sigma            out
"v"           (sigma x + alpha out) / r2         (alpha x - sigma out) / r2
"score"       -sigma out                         (x + sigma^2 out) / alpha
"edm"         (x - alpha out) / sigma            out   (a denoiser D(x; sigma))
"flow"        x + alpha out                      x - sigma out   (v = eps - x0, alpha + sigma = 1)
============  =================================  =================================

``v = alpha eps - sigma x0`` (Salimans & Ho 2022, Sec. 4, for VP schedules). With
``x = alpha x0 + sigma eps``, ``alpha x - sigma v = (alpha^2 + sigma^2) x0`` and
``sigma x + alpha v = (alpha^2 + sigma^2) eps``, so for any schedule the two predictions
divide by ``r2 = alpha^2 + sigma^2``; it is 1 for the VP schedules (up to rounding), and
``(1 - t)^2 + t^2`` for a rectified flow, where the VP forms ``alpha x - sigma v`` would be
wrong. Which types go with which schedule: ``dpmjax.schedules.check_model_type``.

Because the maps are affine with the same ``x``, classifier-free guidance
``eps_u + s (eps_c - eps_u)`` can be applied to the raw outputs before conversion.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["MODEL_TYPES", "to_noise", "to_data", "dynamic_threshold", "Thresholding", "ClassifierFree",
           "ClassifierGuidance", "Network"]

MODEL_TYPES = ("noise", "x_start", "v", "score", "edm", "flow")


def _bcast(a, x):
    """Per-sample ``(B,)`` or scalar coefficient broadcast against ``x`` of shape ``(B, ...)``."""
    a = jnp.asarray(a)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def to_noise(out, x, alpha, sigma, model_type: str):
    """Noise prediction ``eps`` from a network output of ``model_type``."""
    alpha, sigma = _bcast(alpha, x), _bcast(sigma, x)
    if model_type == "noise":
        return out
    if model_type == "flow":
        return x + alpha * out
    if model_type in ("x_start", "edm"):
        return (x - alpha * out) / sigma
    if model_type == "v":
        return (sigma * x + alpha * out) / (alpha**2 + sigma**2)
    if model_type == "score":
        return -sigma * out
    raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")


def to_data(out, x, alpha, sigma, model_type: str):
    """Data prediction ``x0`` from a network output of ``model_type``."""
    alpha, sigma = _bcast(alpha, x), _bcast(sigma, x)
    if model_type == "noise":
        return (x - sigma * out) / alpha
    if model_type in ("x_start", "edm"):
        return out
    if model_type == "flow":
        return x - sigma * out
    if model_type == "v":
        return (alpha * x - sigma * out) / (alpha**2 + sigma**2)
    if model_type == "score":
        return (x + sigma**2 * out) / alpha
    raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")


def dynamic_threshold(x0, ratio=0.995, max_val=1.0, sample_max_value=None):
    """Dynamic thresholding of Imagen (Saharia et al. 2022), as in DPM-Solver++.

    Per sample, ``q = quantile(|x0|, ratio)`` (a fraction: ``jnp.quantile``, not
    ``percentile``), ``q = max(q, max_val)``, ``x0 = clip(x0, -q, q) / q``. With
    ``sample_max_value`` also ``q = min(q, sample_max_value)`` (diffusers' form, which
    clamps ``q`` to ``[1, sample_max_value]``).
    """
    b = x0.shape[0]
    q = jnp.quantile(jnp.abs(x0).reshape(b, -1), ratio, axis=1)
    q = jnp.maximum(q, max_val)
    if sample_max_value is not None:
        q = jnp.minimum(q, sample_max_value)
    q = _bcast(q, x0)
    return jnp.clip(x0, -q, q) / q


def classifier_gradient(classifier_fn, x, t_model, condition):
    """``grad_x sum_b log p(c_b | x_b, t)`` for a classifier returning per-sample log-probs."""

    def total(x_):
        return jnp.sum(classifier_fn(x_, t_model, condition))

    return jax.grad(total)(x)


# --------------------------------------------------------------------------- options of the model call


def _real(name, value):
    from .schedules import _real as real

    return real(None, name, value)


@dataclasses.dataclass(frozen=True)
class Thresholding:
    """Dynamic thresholding of the data prediction (Saharia et al. 2022; data-prediction
    solvers only): per sample ``q = quantile(|x0|, ratio)``, clamped to
    ``[max_val, sample_max_value]``, then ``x0 = clip(x0, -q, q) / q``.

    Args:
      ratio: the quantile, a fraction in ``(0, 1]`` (the authors' ``dynamic_thresholding_ratio``).
      max_val: the smallest threshold, > 0 (the authors' ``thresholding_max_val``).
      sample_max_value: optional largest threshold, ``>= max_val`` (diffusers' option).
    """

    ratio: float = 0.995
    max_val: float = 1.0
    sample_max_value: Optional[float] = None

    def __post_init__(self):
        ratio = _real("dynamic_thresholding_ratio", self.ratio)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be a fraction in (0, 1]; got {ratio}")
        max_val = _real("thresholding_max_val", self.max_val)
        if max_val <= 0:
            raise ValueError(f"thresholding_max_val must be > 0; got {max_val}")
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "max_val", max_val)
        if self.sample_max_value is not None:
            smv = _real("sample_max_value", self.sample_max_value)
            if smv < max_val:
                raise ValueError(f"sample_max_value must be >= thresholding_max_val = {max_val}; got {smv}")
            object.__setattr__(self, "sample_max_value", smv)

    def __call__(self, x0):
        return dynamic_threshold(x0, self.ratio, self.max_val, self.sample_max_value)


def thresholding_from_keywords(thresholding=False, ratio=0.995, max_val=1.0, sample_max_value=None):
    """A :class:`Thresholding` (or ``None``) from the authors' flat keywords; the numbers
    without ``thresholding=True`` are refused rather than ignored."""
    if isinstance(thresholding, Thresholding):
        given = [n for n, v, d in (("dynamic_thresholding_ratio", ratio, 0.995), ("thresholding_max_val", max_val, 1.0),
                                   ("sample_max_value", sample_max_value, None)) if not _is_default(v, d)]
        if given:
            raise ValueError(f"{', '.join(given)} cannot be combined with a dpmjax.Thresholding: give them to it")
        return thresholding
    if not isinstance(thresholding, (bool, np.bool_)):
        raise TypeError(f"thresholding must be a bool or a dpmjax.Thresholding; got {type(thresholding).__name__} "
                        f"{thresholding!r}")
    if thresholding:
        return Thresholding(ratio, max_val, sample_max_value)
    if sample_max_value is not None:
        raise ValueError("sample_max_value (the largest threshold) needs thresholding=True")
    for name, v, d in (("dynamic_thresholding_ratio", ratio, 0.995), ("thresholding_max_val", max_val, 1.0)):
        if not _is_default(v, d):
            raise ValueError(f"{name}={v!r} needs thresholding=True (it is an option of dynamic thresholding); "
                             "remove it or set thresholding=True")
    return None


def _is_default(v, d):
    try:
        return (v is None and d is None) or (v is not None and d is not None and bool(v == d))
    except (TypeError, ValueError):
        return False


@functools.partial(jax.tree_util.register_dataclass, data_fields=["unconditional", "scale"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class ClassifierFree:
    """Classifier-free guidance: ``out_u + scale (out_c - out_u)`` of the raw network outputs
    with the call's ``condition`` and with ``unconditional``, from ONE network call on the
    concatenated batch ``[unconditional, condition]`` (at ``scale == 1`` only the conditional
    call runs). A pytree: ``scale`` is traced, so a new scale never recompiles.

    Args:
      unconditional: the unconditional condition, of the condition's structure and shapes.
      scale: the guidance scale (a scalar; for one scale per sample, vmap over the sampler).
    """

    unconditional: Any
    scale: Any = 1.0


@dataclasses.dataclass(frozen=True)
class ClassifierGuidance:
    """Classifier guidance: ``eps <- eps - scale sigma_t grad_x log p(condition | x, t)``.

    Args:
      classifier_fn: ``classifier_fn(x, t, condition)`` returning per-sample
        log-probabilities, shape ``(B,)`` (``x`` the network's input, ``t`` its time).
      scale: the guidance scale (traced).

    The noise model is called without the condition; the classifier gets it.
    """

    classifier_fn: Callable
    scale: Any = 1.0

    def __post_init__(self):
        if not callable(self.classifier_fn):
            raise TypeError(f"classifier_fn must be callable; got {type(self.classifier_fn).__name__}")


def guidance_kind(guidance) -> str:
    """``"none"``, ``"cfg"`` or ``"classifier"``."""
    if guidance is None:
        return "none"
    if isinstance(guidance, ClassifierFree):
        return "cfg"
    if isinstance(guidance, ClassifierGuidance):
        return "classifier"
    raise TypeError(f"guidance must be None, a dpmjax.ClassifierFree or a dpmjax.ClassifierGuidance; got "
                    f"{type(guidance).__name__}")


def guidance_from_keywords(unconditional_condition=None, guidance_scale=1.0, classifier_fn=None):
    """The guidance object of the authors' flat keywords (``None`` for none)."""
    if unconditional_condition is not None and classifier_fn is not None:
        raise ValueError("use either classifier-free guidance (unconditional_condition) or classifier_fn, not both")
    if classifier_fn is not None:
        return ClassifierGuidance(classifier_fn, guidance_scale)
    if unconditional_condition is not None:
        return ClassifierFree(unconditional_condition, guidance_scale)
    if not (type(guidance_scale) in (float, int) and guidance_scale == 1):
        check_scale(guidance_scale, "none")
    return None


def pop_guidance(guidance, keywords: dict):
    """``guidance``, or the guidance object of the authors' flat keywords popped from
    ``keywords`` (``unconditional_condition``, ``guidance_scale``, ``classifier_fn``); both
    at once are refused."""
    flat = {k: keywords.pop(k) for k in ("unconditional_condition", "guidance_scale", "classifier_fn")
            if k in keywords}
    if not flat:
        return guidance
    if guidance is not None:
        raise ValueError(f"give guidance either as guidance= or as {', '.join(flat)}=, not both")
    return guidance_from_keywords(**flat)


def check_scale(scale, kind):
    """Validate a guidance scale: a finite real scalar (or a traced scalar)."""
    if isinstance(scale, jax.core.Tracer):
        if kind == "none":
            raise ValueError("guidance_scale is traced but no guidance is configured: give unconditional_condition "
                             "(classifier-free) or classifier_fn (classifier guidance)")
        if jnp.ndim(scale) != 0:
            raise ValueError(f"guidance_scale must be a scalar; got shape {jnp.shape(scale)} "
                             "(for one scale per sample, vmap over sample)")
        return
    if scale is None or isinstance(scale, (str, bytes, bool)):
        raise TypeError(f"guidance_scale must be a real number; got {scale!r}")
    try:
        g = np.asarray(scale, np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"guidance_scale must be a real number; got {scale!r}") from None
    if g.ndim != 0:
        raise ValueError(f"guidance_scale must be a scalar; got shape {g.shape} (for one scale per sample, vmap "
                         "over sample)")
    if not np.isfinite(g):
        raise ValueError(f"guidance_scale must be finite; got {float(g)}")
    if kind == "none" and g != 1.0:
        raise ValueError(
            "guidance_scale != 1 needs unconditional_condition (classifier-free) or classifier_fn (classifier guidance)"
        )


def check_guidance(batch, condition, guidance) -> str:
    """Check ``condition`` and ``guidance`` against the batch size; returns the guidance kind."""
    kind = guidance_kind(guidance)
    if kind == "cfg":
        if condition is None:
            raise ValueError("unconditional_condition needs condition (classifier-free guidance)")
        c_leaves, c_def = jax.tree_util.tree_flatten(condition)
        u_leaves, u_def = jax.tree_util.tree_flatten(guidance.unconditional)
        if c_def != u_def:
            raise ValueError(f"condition and unconditional_condition must have the same structure; got {c_def} and "
                             f"{u_def}")
        for c, u in zip(c_leaves, u_leaves):
            cs, us = tuple(jnp.shape(c)), tuple(jnp.shape(u))
            if len(cs) < 1 or cs[0] != batch:
                raise ValueError(f"condition leaves must have the batch size {batch} as leading axis (they are "
                                 f"concatenated with unconditional_condition); got shape {cs}")
            if cs != us:
                raise ValueError(f"condition and unconditional_condition leaves must have the same shape; got {cs} "
                                 f"and {us}")
    if kind != "none":
        check_scale(guidance.scale, kind)
    return kind


def output_type(model_type: str, kind: str) -> str:
    """The type of the guided output a solver receives: the noise under classifier guidance."""
    return "noise" if kind == "classifier" else model_type


@dataclasses.dataclass(frozen=True)
class Network:
    """The one path from every solver to the network: condition, classifier-free guidance
    (one batched call) and classifier guidance, written once and used by ``sample``,
    ``invert``, the adaptive solver, ``fit_timesteps`` and ``compute_ems``.

    Built inside the traced program from the user's ``model_fn`` and the call's arrays;
    ``net(x_in, t_in, alpha, sigma, in_scale)`` returns the output in :func:`output_type`
    (``model_type``, or the noise under classifier guidance) as a ``dtype`` array of ``x_in``'s
    shape. ``x_in`` is the network's input (user scale), ``t_in`` its time values ``(B,)``;
    ``alpha``, ``sigma`` and ``in_scale`` (the state scale, ``x_solver = in_scale x_in``) are
    used by classifier guidance only.
    """

    model_fn: Callable
    params: Any
    condition: Any
    kind: str  # "none" | "cfg" | "classifier"
    unconditional: Any
    scale: Any
    classifier_fn: Optional[Callable]
    model_type: str
    dtype: Any
    #: classifier-free guidance: always the batched guided call, with no ``lax.cond`` on the
    #: scale (at scale 1 that differs from the conditional output by rounding only). For the
    #: unrolled fitting programs on CPU, where XLA runs the network inside a conditional
    #: several times more slowly than the scale-1 shortcut saves.
    guided_always: bool = False

    @property
    def out_type(self) -> str:
        return output_type(self.model_type, self.kind)

    def checked(self, out, x):
        """A ``model_fn`` output, checked (an array of ``x``'s shape) and cast."""
        if not hasattr(out, "shape") or not hasattr(out, "dtype"):
            raise TypeError(f"model_fn must return an array of its input's shape {x.shape}; got {type(out).__name__}")
        if tuple(out.shape) != tuple(x.shape):
            raise ValueError(f"model_fn output shape {tuple(out.shape)} != its input's shape {tuple(x.shape)}")
        return jnp.asarray(out).astype(self.dtype)

    def raw(self, x, t, cond):
        """One call of ``model_fn``, its output checked and cast."""
        return self.checked(self.model_fn(self.params, x, t) if cond is None else
                            self.model_fn(self.params, x, t, cond), x)

    def __call__(self, x, t, alpha=None, sigma=None, in_scale=1.0):
        if self.kind == "none":  # the network called from here: the fewest frames between sampler and model
            c = self.condition
            return self.checked(self.model_fn(self.params, x, t) if c is None else self.model_fn(self.params, x, t, c),
                                x)
        if self.kind == "classifier":
            # the noise model is unconditional; the classifier takes the condition
            eps = to_noise(self.raw(x, t, None), x * _bcast(in_scale, x), alpha, sigma, self.model_type)
            grad = classifier_gradient(self.classifier_fn, x, t, self.condition).astype(self.dtype)
            # grad_x_solver log p = grad_x_user log p / state scale
            return eps - self.scale * _bcast(sigma, x) * grad / _bcast(in_scale, x)
        def guided(_):
            both = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], 0), self.unconditional, self.condition)
            out = self.raw(jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0), both)
            out_u, out_c = jnp.split(out, 2, axis=0)
            return out_u + self.scale * (out_c - out_u)

        if isinstance(self.scale, numbers.Real):  # known when traced: the branch is chosen here
            return self.raw(x, t, self.condition) if self.scale == 1.0 else guided(None)
        if self.guided_always:
            return guided(None)
        return jax.lax.cond(self.scale == 1.0, lambda _: self.raw(x, t, self.condition), guided, None)


def convert(out, y, alpha, sigma, model_type, predict_data, thresholding=None):
    """The solver's model output: the data (``predict_data``) or noise prediction of the
    network output ``out`` of ``model_type`` at the solver-scale point ``y``, dynamically
    thresholded when ``thresholding`` (a :class:`Thresholding`) is given."""
    m = (to_data if predict_data else to_noise)(out, y, alpha, sigma, model_type)
    if predict_data and thresholding is not None:
        m = thresholding(m)
    return m
