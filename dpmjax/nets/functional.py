"""The functional form of an NNX network: ``model_fn(params, x, t, condition=None)``."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flax import nnx

from .mlp import MLP
from .unet import UNet


def split(module: nnx.Module):
    """``(graphdef, params)``: the static structure and the parameter pytree (an ``nnx.State``)."""
    return nnx.split(module)


def as_model_fn(graphdef) -> Callable[..., Any]:
    """A pure ``model_fn(params, x, t, condition=None)`` for :func:`dpmjax.sample`.

    ``params`` is the state from ``nnx.split`` (or one restored from a checkpoint, or an
    EMA of it); the module is rebuilt with ``nnx.merge`` at trace time, so under ``jit``
    this costs nothing per call.
    """

    def model_fn(params, x, t, condition=None):
        model = nnx.merge(graphdef, params)
        if condition is None:
            return model(x, t)
        return model(x, t, condition)

    return model_fn


_KINDS = {"mlp": MLP, "unet": UNet}


def build_model(spec: Mapping[str, Any], *, seed: int = 0) -> nnx.Module:
    """Build a network from a JSON-able spec ``{"kind": "mlp"|"unet", **kwargs}``.

    ``mlp`` takes ``data_dim, width, depth, temb_dim, time_scale``; ``unet`` takes
    ``image_channels, channels, num_classes, temb_dim, time_scale``.
    """
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"model kind must be one of {sorted(_KINDS)}, got {kind!r}")
    try:
        return _KINDS[kind](**spec, rngs=nnx.Rngs(seed))
    except TypeError as e:
        raise ValueError(f"bad {kind} model spec {spec}: {e}") from None
