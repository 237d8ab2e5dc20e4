"""Distribution distances between sample sets, in ``jnp``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("num_projections",))
def sliced_wasserstein(x, y, key, *, num_projections: int = 256):
    """Sliced 2-Wasserstein distance between two equal-sized sample sets.

    ``SW_2(x, y) = sqrt(E_theta W_2^2(theta.x, theta.y))`` with ``theta`` uniform on the
    unit sphere (Rabin et al. 2011; Bonneel et al. 2015); the 1-D ``W_2`` between
    empirical measures of equal size is the root mean square difference of the sorted
    projections. The expectation is a Monte Carlo average over ``num_projections``
    directions drawn from ``key``; use the same key to compare methods.

    Args:
      x, y: arrays of shape ``(n, ...)`` (flattened to ``(n, d)``), same ``n`` and ``d``.
      key: PRNG key for the projection directions.

    Returns:
      a scalar; 0 when the two sets coincide.
    """
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    y = y.reshape(y.shape[0], -1).astype(jnp.float32)
    theta = jax.random.normal(key, (x.shape[1], num_projections))
    theta = theta / jnp.linalg.norm(theta, axis=0, keepdims=True)
    px = jnp.sort(x @ theta, axis=0)
    py = jnp.sort(y @ theta, axis=0)
    return jnp.sqrt(jnp.mean((px - py) ** 2))
