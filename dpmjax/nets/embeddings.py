"""Time embeddings shared by the score networks.

The sampler feeds the network ``schedule.model_time(t)``: ``t`` itself for continuous
schedules (``t in [t_eps, T]``) and the training index ``t N - 1 in [0, N - 1]`` for
discrete ones. Both are rescaled by ``time_scale`` (so that the largest model time is
about 1000, the DDPM convention) before the sinusoidal features of
Vaswani et al. (2017) / Ho et al. (2020), ``[sin(s w_k), cos(s w_k)]`` with
``w_k = max_period^(-k / (dim/2))``, are taken.
"""

from __future__ import annotations

import jax.numpy as jnp


def sinusoidal_embedding(t, dim: int, *, time_scale: float = 1.0, max_period: float = 10_000.0):
    """Sinusoidal features of ``t * time_scale``.

    Args:
      t: model times, shape ``(B,)`` (a scalar is broadcast to ``(1,)``).
      dim: even number of features.
      time_scale: multiplies ``t`` first; pick it so that ``t * time_scale`` spans ~[0, 1000].
      max_period: the slowest period, in units of scaled time.

    Returns:
      ``(B, dim)`` array ``[sin(s w_0..w_{d/2-1}), cos(s w_0..w_{d/2-1})]`` with ``s = t * time_scale``.
    """
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    s = jnp.atleast_1d(jnp.asarray(t, dtype=jnp.float32)) * time_scale
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = s[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
