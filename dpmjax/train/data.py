"""Training data generated in code (no downloads).

Four 2-D toy distributions sampled with ``jax.random`` inside ``jit`` (so a batch is a
pure function of its key, which makes training runs exactly resumable), normalised to
roughly unit scale, and scikit-learn's bundled 8x8 digits (``load_digits``, 1797
images) scaled to ``[-1, 1]`` with their labels.

``get_dataset(name).sample(key, n)`` returns ``(x, labels)``; ``labels`` is ``None``
for the unlabelled 2-D sets.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _moons(key, n):
    # Two interleaving half circles (as sklearn.datasets.make_moons, noise 0.05),
    # centred and scaled to roughly unit standard deviation.
    k_side, k_angle, k_noise = jax.random.split(key, 3)
    side = jax.random.bernoulli(k_side, 0.5, (n,))
    theta = jax.random.uniform(k_angle, (n,), maxval=jnp.pi)
    upper = jnp.stack([jnp.cos(theta), jnp.sin(theta)], -1)
    lower = jnp.stack([1.0 - jnp.cos(theta), 0.5 - jnp.sin(theta)], -1)
    x = jnp.where(side[:, None], upper, lower) + 0.05 * jax.random.normal(k_noise, (n, 2))
    return (x - jnp.array([0.5, 0.25])) / jnp.array([0.87, 0.5]) * 0.8


def _swissroll(key, n):
    # The 2-D swiss roll (x, z) of sklearn.datasets.make_swiss_roll, noise 0.5, scaled by 1/7.
    k_t, k_noise = jax.random.split(key)
    t = 1.5 * jnp.pi * (1.0 + 2.0 * jax.random.uniform(k_t, (n,)))
    x = jnp.stack([t * jnp.cos(t), t * jnp.sin(t)], -1) + 0.5 * jax.random.normal(k_noise, (n, 2))
    return x / 7.0


def _eight_gaussians(key, n):
    # Eight tight Gaussians (std 0.1) on a circle of radius 1.5.
    k_mode, k_noise = jax.random.split(key)
    angle = jax.random.randint(k_mode, (n,), 0, 8) * (jnp.pi / 4)
    centres = 1.5 * jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)
    return centres + 0.1 * jax.random.normal(k_noise, (n, 2))


def _checkerboard(key, n):
    # Uniform on the 8 black squares of a 4x4 checkerboard covering [-2, 2]^2.
    k_x, k_y, k_row = jax.random.split(key, 3)
    x = jax.random.uniform(k_x, (n,), minval=-2.0, maxval=2.0)
    y = jax.random.uniform(k_y, (n,)) + 2.0 * jax.random.randint(k_row, (n,), 0, 2).astype(jnp.float32)
    y = y - 2.0 + (jnp.floor(x) % 2)
    return jnp.stack([x, y], -1)


@functools.lru_cache(maxsize=1)
def load_digits_array():
    """``(images, labels)``: 1797 digits as float32 ``(N, 8, 8, 1)`` in [-1, 1] and int32 labels."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    d = load_digits()
    images = (d.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    return images, d.target.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A named data distribution.

    Attributes:
      name: the name used on the command line.
      shape: the shape of one sample.
      num_classes: number of labels (0 when unlabelled).
      sample: ``sample(key, n) -> (x, labels or None)``, traceable under ``jit``.
    """

    name: str
    shape: tuple
    num_classes: int
    sample: Callable[[jax.Array, int], tuple]

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3


def _unlabelled(fn):
    return lambda key, n: (fn(key, n), None)


def _digits_sample(key, n):
    images, labels = load_digits_array()
    idx = jax.random.randint(key, (n,), 0, images.shape[0])
    return jnp.asarray(images)[idx], jnp.asarray(labels)[idx]


_DATASETS = {
    "moons": Dataset("moons", (2,), 0, _unlabelled(_moons)),
    "swissroll": Dataset("swissroll", (2,), 0, _unlabelled(_swissroll)),
    "8gaussians": Dataset("8gaussians", (2,), 0, _unlabelled(_eight_gaussians)),
    "checkerboard": Dataset("checkerboard", (2,), 0, _unlabelled(_checkerboard)),
    "digits": Dataset("digits", (8, 8, 1), 10, _digits_sample),
}

DATASETS = tuple(_DATASETS)


def get_dataset(name: str) -> Dataset:
    """The data set called ``name``; one of :data:`DATASETS`."""
    try:
        return _DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}") from None
