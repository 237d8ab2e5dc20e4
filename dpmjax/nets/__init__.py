"""Flax NNX noise-prediction networks for the demos, and their functional form.

A trained module becomes a pure function of a parameter pytree through
``graphdef, params = nnx.split(module)``::

    model = MLP(2, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    model_fn = as_model_fn(graphdef)           # model_fn(params, x, t, condition=None)
    x = dpmjax.sample(model_fn, params, key, (1000, 2), schedule=dpmjax.VPLinear())

The sampler itself never imports flax; only this package does.
"""

try:
    import flax  # noqa: F401
except ImportError as e:  # the sampler does not need flax; say which extra brings it
    raise ImportError(f"dpmjax.nets needs flax: pip install 'dpmjax[train]' ({e})") from e

from .embeddings import sinusoidal_embedding
from .functional import as_model_fn, build_model, split
from .mlp import MLP
from .unet import UNet

__all__ = ["MLP", "UNet", "as_model_fn", "build_model", "sinusoidal_embedding", "split"]
