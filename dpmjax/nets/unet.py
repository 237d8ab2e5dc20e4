"""A small UNet noise-prediction network for 8x8 single-channel images (Flax NNX).

Residual blocks with group norm and a time embedding as a per-channel scale and shift,
one down/up-sampling level, and an optional class embedding with an extra *null* class
(index ``num_classes``) for classifier-free guidance (Ho & Salimans 2022): training
replaces a fraction of the labels by the null class, and sampling with
``condition=labels, unconditional_condition=full(num_classes)`` combines the two.
Images are NHWC: ``x`` has shape ``(B, H, W, C)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ._init import embedding_normal, lecun_normal
from .embeddings import sinusoidal_embedding


def _dense(n_in, n_out, *, rngs, **kw):
    kw.setdefault("kernel_init", lecun_normal)
    return nnx.Linear(n_in, n_out, rngs=rngs, **kw)


def _conv(c_in, c_out, kernel_size, *, rngs, **kw):
    kw.setdefault("kernel_init", lecun_normal)
    return nnx.Conv(c_in, c_out, kernel_size, rngs=rngs, **kw)


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class _ResBlock(nnx.Module):
    """``skip(x) + conv(silu(GN(h) (1 + scale) + shift))``, ``h = conv(silu(GN x))``.

    The time (and class) embedding enters as a per-channel scale and shift applied
    after the second group norm (FiLM; "scale-shift norm" of Nichol & Dhariwal 2021).
    Added before the norm, as in the original DDPM block, a per-channel constant is
    removed again by a group norm with one channel per group.
    """

    def __init__(self, c_in: int, c_out: int, temb_dim: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.GroupNorm(c_in, num_groups=_groups(c_in), rngs=rngs)
        self.conv1 = _conv(c_in, c_out, (3, 3), padding="SAME", rngs=rngs)
        self.temb = _dense(temb_dim, 2 * c_out, rngs=rngs)
        self.norm2 = nnx.GroupNorm(c_out, num_groups=_groups(c_out), rngs=rngs)
        self.conv2 = _conv(c_out, c_out, (3, 3), padding="SAME",
                           kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
        self.skip = _conv(c_in, c_out, (1, 1), rngs=rngs) if c_in != c_out else None

    def __call__(self, x, temb):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        scale, shift = jnp.split(self.temb(jax.nn.silu(temb))[:, None, None, :], 2, axis=-1)
        h = self.norm2(h) * (1.0 + scale) + shift
        h = self.conv2(jax.nn.silu(h))
        return (x if self.skip is None else self.skip(x)) + h


class UNet(nnx.Module):
    """Noise predictor ``eps_theta(x, t[, class])`` for ``(B, H, W, C)`` images, H and W even.

    Layout: ``conv -> [res(c)] -> down -> [res(2c)] -> res(2c) -> res(2c + 2c -> 2c) -> up
    -> res(2c + c -> c) -> GN, silu, conv``.

    Args:
      image_channels: channels of ``x`` (1 for digits).
      channels: base width ``c``.
      num_classes: number of labels; 0 makes the network unconditional. With labels the
        class embedding has ``num_classes + 1`` rows, the last being the null class used
        when ``condition`` is ``None`` and for classifier-free guidance.
      temb_dim: width of the time (and class) embedding.
      time_scale: model time is multiplied by this before the sinusoidal embedding.
      rngs: ``nnx.Rngs`` for the initialisation.

    Example::

        net = UNet(1, channels=16, num_classes=10, rngs=nnx.Rngs(0))
        eps = net(jnp.zeros((4, 8, 8, 1)), jnp.full((4,), 0.3), jnp.array([0, 1, 2, 10]))
    """

    def __init__(self, image_channels: int = 1, *, channels: int = 32, num_classes: int = 0,
                 temb_dim: int = 128, time_scale: float = 1000.0, rngs: nnx.Rngs):
        c = channels
        self.num_classes = int(num_classes)
        self.temb_dim = temb_dim
        self.time_scale = float(time_scale)
        self.time1 = _dense(temb_dim, temb_dim, rngs=rngs)
        self.time2 = _dense(temb_dim, temb_dim, rngs=rngs)
        self.class_embed = (nnx.Embed(self.num_classes + 1, temb_dim, embedding_init=embedding_normal, rngs=rngs)
                            if self.num_classes > 0 else None)
        self.conv_in = _conv(image_channels, c, (3, 3), padding="SAME", rngs=rngs)
        self.down0 = _ResBlock(c, c, temb_dim, rngs=rngs)
        self.downsample = _conv(c, c, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
        self.down1 = _ResBlock(c, 2 * c, temb_dim, rngs=rngs)
        self.mid = _ResBlock(2 * c, 2 * c, temb_dim, rngs=rngs)
        self.up1 = _ResBlock(4 * c, 2 * c, temb_dim, rngs=rngs)
        self.upsample = _conv(2 * c, 2 * c, (3, 3), padding="SAME", rngs=rngs)
        self.up0 = _ResBlock(3 * c, c, temb_dim, rngs=rngs)
        self.norm_out = nnx.GroupNorm(c, num_groups=_groups(c), rngs=rngs)
        self.conv_out = _conv(c, image_channels, (3, 3), padding="SAME",
                                 kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(self, x, t, condition=None):
        x = jnp.asarray(x)  # JAX's dtype (a float64 NumPy input is float32 without jax_enable_x64)
        b = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        temb = sinusoidal_embedding(t, self.temb_dim, time_scale=self.time_scale)
        temb = self.time2(jax.nn.silu(self.time1(temb)))
        if self.class_embed is not None:
            if condition is None:
                condition = jnp.full((b,), self.num_classes, jnp.int32)
            temb = temb + self.class_embed(jnp.asarray(condition, jnp.int32))
        elif condition is not None:
            raise ValueError("this UNet was built with num_classes=0; condition must be None")

        h0 = self.down0(self.conv_in(x), temb)
        h1 = self.down1(self.downsample(h0), temb)
        h = self.mid(h1, temb)
        h = self.up1(jnp.concatenate([h, h1], axis=-1), temb)
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour upsampling
        h = self.upsample(h)
        h = self.up0(jnp.concatenate([h, h0], axis=-1), temb)
        return self.conv_out(jax.nn.silu(self.norm_out(h))).astype(x.dtype)
