"""Parameter initialisers that draw on the host with NumPy.

Flax's initialisers run ``jax.random`` once per parameter; outside ``jit`` each new
shape compiles a small threefry program, inside ``jit`` the whole initialisation becomes
one large program, and on a CPU either takes tens of seconds for a UNet. These draw
the same kind of numbers (``N(0, 1/fan_in)``, LeCun) with NumPy, seeded from the
``nnx.Rngs`` key, so building a network compiles nothing beyond a ``fold_in``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _host_rng(key) -> np.random.Generator:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key).astype(np.uint32).ravel())


def lecun_normal(key, shape, dtype=jnp.float32):
    """``N(0, 1/fan_in)`` with ``fan_in = prod(shape[:-1])`` (dense and convolution kernels)."""
    fan_in = max(1, int(np.prod(shape[:-1])))
    return jnp.asarray(_host_rng(key).standard_normal(shape) / np.sqrt(fan_in), dtype)


def embedding_normal(key, shape, dtype=jnp.float32):
    """``N(0, 1/features)`` for an ``(num_embeddings, features)`` table (flax's default scale)."""
    return jnp.asarray(_host_rng(key).standard_normal(shape) / np.sqrt(shape[-1]), dtype)
