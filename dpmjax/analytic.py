"""Diffusion models with exact noise predictors, for testing and benchmarking samplers.

For data ``x0 ~ sum_k w_k N(mu_k, diag(s_k^2))`` the noised marginal is the mixture
``p_t(x) = sum_k w_k N(x; alpha_t mu_k, diag(alpha_t^2 s_k^2 + sigma_t^2))``, whose score
is known in closed form, so the optimal noise predictor
``eps(x, t) = -sigma_t grad log p_t(x)`` needs no training. With one component the
probability-flow ODE is solved exactly too: the standardised value
``z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2)`` is constant along a trajectory.

The mixture is a pytree and serves as the ``params`` of its own ``model_fn``, so
gradients with respect to the data distribution can be taken through a sampler.

Example::

    gm = dpmjax.GaussianMixture.isotropic(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), 0.5)
    schedule = dpmjax.VPLinear()
    x = dpmjax.sample(gm.model_fn(schedule), gm, key, (512, 2), schedule=schedule, steps=10)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["GaussianMixture"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """Mixture of diagonal Gaussians: ``weights (K,)``, ``means (K, D)``, ``stds (K, D)``."""

    weights: jax.Array
    means: jax.Array
    stds: jax.Array

    @classmethod
    def isotropic(cls, means, std, weights=None):
        means = jnp.asarray(means, jnp.result_type(float))
        k = means.shape[0]
        w = jnp.full((k,), 1.0 / k, means.dtype) if weights is None else jnp.asarray(weights, means.dtype)
        return cls(weights=w / jnp.sum(w), means=means, stds=jnp.full_like(means, std))

    @classmethod
    def gaussian(cls, mean, std):
        """A single Gaussian ``N(mean, diag(std^2))``."""
        mean = jnp.asarray(mean, jnp.result_type(float))
        std = jnp.broadcast_to(jnp.asarray(std, mean.dtype), mean.shape)
        return cls(weights=jnp.ones((1,), mean.dtype), means=mean[None], stds=std[None])

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def sample(self, key, n: int):
        """``n`` draws from the data distribution, shape ``(n, D)``."""
        kc, kz = jax.random.split(key)
        comp = jax.random.choice(kc, self.weights.shape[0], (n,), p=self.weights)
        z = jax.random.normal(kz, (n, self.dim), self.means.dtype)
        return self.means[comp] + self.stds[comp] * z

    def eps(self, x, alpha, sigma):
        """Exact noise prediction at signal/noise scales ``alpha``, ``sigma`` (shape ``(B,)`` or scalar)."""
        alpha = jnp.reshape(alpha, jnp.shape(alpha) + (1, 1))
        sigma = jnp.reshape(sigma, jnp.shape(sigma) + (1, 1))
        var = alpha**2 * self.stds**2 + sigma**2  # (B, K, D)
        diff = x[..., None, :] - alpha * self.means  # (B, K, D)
        logp = jnp.log(self.weights) - 0.5 * jnp.sum(diff**2 / var + jnp.log(var), axis=-1)
        resp = jax.nn.softmax(logp, axis=-1)  # (B, K)
        score = -jnp.sum(resp[..., None] * diff / var, axis=-2)
        return -sigma[..., 0, :] * score

    def model_fn(self, schedule):
        """``model_fn(params, x, t_model)`` for :func:`dpmjax.sample` (``params`` is a mixture)."""

        def model_fn(params, x, t_model):
            t = schedule.solver_time(t_model)
            scale = jnp.asarray(schedule.state_scale(t))  # user-scale input -> VP scale (EDM)
            x = x * scale.reshape(scale.shape + (1,) * (x.ndim - scale.ndim))
            return params.eps(x, schedule.alpha(t), schedule.sigma(t))

        return model_fn

    def ode_solution(self, x_start, schedule, t_start, t_end):
        """Exact probability-flow ODE solution from ``t_start`` to ``t_end`` (one component only)."""
        if self.means.shape[0] != 1:
            raise ValueError("ode_solution is exact only for a single Gaussian (K = 1)")
        mu, s = self.means[0], self.stds[0]
        a0, s0 = schedule.alpha(t_start), schedule.sigma(t_start)
        a1, s1 = schedule.alpha(t_end), schedule.sigma(t_end)
        z = (x_start - a0 * mu) / jnp.sqrt(a0**2 * s**2 + s0**2)
        return a1 * mu + jnp.sqrt(a1**2 * s**2 + s1**2) * z
