"""Model parameterisations, guidance and thresholding.

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

import jax
import jax.numpy as jnp

__all__ = ["MODEL_TYPES", "to_noise", "to_data", "dynamic_threshold"]

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
