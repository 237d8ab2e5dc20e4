"""A residual MLP noise-prediction network for 2-D toy data (Flax NNX)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ._init import lecun_normal
from .embeddings import sinusoidal_embedding


def _dense(n_in, n_out, rngs, **kw):
    kw.setdefault("kernel_init", lecun_normal)
    return nnx.Linear(n_in, n_out, rngs=rngs, **kw)


class _ResidualBlock(nnx.Module):
    """``h + W2 silu(W1 silu(h) + W_t temb)``.

    No normalisation layers: they would discard the magnitude of ``x``, and the
    noise prediction must grow linearly with ``x`` (``eps ~ x_t / sigma_t`` near ``T``)
    to handle the tails of ``x_T ~ N(0, I)`` that training rarely visits.
    """

    def __init__(self, width: int, temb_dim: int, *, rngs: nnx.Rngs):
        self.dense1 = _dense(width, width, rngs)
        self.temb = _dense(temb_dim, width, rngs)
        self.dense2 = _dense(width, width, rngs)

    def __call__(self, h, temb):
        y = self.dense1(jax.nn.silu(h)) + self.temb(temb)
        return h + self.dense2(jax.nn.silu(y))


class MLP(nnx.Module):
    """Noise predictor ``eps_theta(x, t)`` for flat data of shape ``(B, data_dim)``.

    ``x -> Linear -> depth x residual block (each fed the time embedding) -> silu -> Linear``.

    Args:
      data_dim: size of the last axis of ``x`` (2 for the toy data sets).
      width: hidden width.
      depth: number of residual blocks.
      temb_dim: size of the sinusoidal time features.
      time_scale: model time is multiplied by this before the embedding
        (see :func:`dpmjax.nets.embeddings.sinusoidal_embedding`).
      rngs: ``nnx.Rngs`` for the initialisation.

    Example::

        model = MLP(2, width=64, depth=2, rngs=nnx.Rngs(0))
        eps = model(jnp.zeros((8, 2)), jnp.full((8,), 0.5))   # (8, 2)
    """

    def __init__(self, data_dim: int = 2, *, width: int = 128, depth: int = 3, temb_dim: int = 64,
                 time_scale: float = 1000.0, rngs: nnx.Rngs):
        self.temb_dim = temb_dim
        self.time_scale = float(time_scale)
        self.time1 = _dense(temb_dim, width, rngs)
        self.time2 = _dense(width, width, rngs)
        self.inp = _dense(data_dim, width, rngs)
        self.blocks = nnx.List([_ResidualBlock(width, width, rngs=rngs) for _ in range(depth)])
        self.out = _dense(width, data_dim, rngs, kernel_init=nnx.initializers.zeros_init())

    def __call__(self, x, t, condition=None):
        if condition is not None:
            raise ValueError("MLP is unconditional; condition must be None")
        x = jnp.asarray(x)  # JAX's dtype (a float64 NumPy input is float32 without jax_enable_x64)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
        temb = sinusoidal_embedding(t, self.temb_dim, time_scale=self.time_scale)
        temb = self.time2(jax.nn.silu(self.time1(temb)))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(jax.nn.silu(h)).astype(x.dtype)
