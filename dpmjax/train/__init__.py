"""Training the demo networks: data sets, the training loop, checkpoints, metrics.

Needs the ``train`` extra (flax, orbax-checkpoint, tqdm; ``pip install 'dpmjax[train]'``),
and scikit-learn for the ``digits`` data (the ``demo`` extra); the sampler needs none of
them. The names below are imported on first use, so ``dpmjax.train.config`` and
``dpmjax.train.data`` (the data sets and schedules the command line lists) load without
the extras.
"""

import importlib

_EXPORTS = {
    "CheckpointError": "checkpoint",
    "read_losses": "checkpoint",
    "SCHEDULES": "config",
    "TrainConfig": "config",
    "make_schedule": "config",
    "read_config": "config",
    "DATASETS": "data",
    "Dataset": "data",
    "get_dataset": "data",
    "sliced_wasserstein": "metrics",
    "Trainer": "trainer",
    "TrainResult": "trainer",
    "TrainState": "trainer",
    "diffusion_loss": "trainer",
    "load_trained": "trainer",
    "make_optimizer": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    except ModuleNotFoundError as e:  # an extra that is not installed: say which
        missing = (e.name or "").split(".")[0]
        if missing not in ("flax", "orbax", "tqdm"):
            raise
        raise ImportError(f"dpmjax.train.{name} needs {missing}: pip install 'dpmjax[train]'") from e
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
