"""The run configuration: what defines a training run, stored as JSON beside its checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

from .data import get_dataset

SCHEDULES = ("linear", "cosine", "discrete")
CONFIG_FILE = "config.json"


def make_schedule(name: str):
    """The dpmjax noise schedule called ``name``.

    ``linear``: :class:`dpmjax.VPLinear` (beta 0.1 -> 20); ``cosine``: :class:`dpmjax.VPCosine`;
    ``discrete``: ``dpmjax.VPDiscrete.from_named("linear", 1000)`` (DDPM's table).
    """
    import dpmjax

    if name == "linear":
        return dpmjax.VPLinear()
    if name == "cosine":
        return dpmjax.VPCosine()
    if name == "discrete":
        return dpmjax.VPDiscrete.from_named("linear", 1000)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def default_model_spec(data: str, schedule: str) -> dict:
    """Network spec for a data set: a residual MLP for 2-D data, a class-conditional UNet for digits.

    ``time_scale`` maps the largest model time of the schedule to 1000.
    """
    sched = make_schedule(schedule)
    time_scale = 1000.0 / float(sched.model_time(sched.T))
    ds = get_dataset(data)
    if ds.is_image:
        return {"kind": "unet", "image_channels": ds.shape[-1], "channels": 16,
                "num_classes": ds.num_classes, "temb_dim": 128, "time_scale": time_scale}
    return {"kind": "mlp", "data_dim": ds.shape[0], "width": 64, "depth": 3, "temb_dim": 64,
            "time_scale": time_scale}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (and so must match to resume one).

    The data order, noise and times at step ``k`` are drawn from
    ``fold_in(key(seed), k)``, so a run resumed from a checkpoint repeats exactly the
    losses of an uninterrupted run with the same config.

    ``checkpoint_every`` and ``keep_checkpoints`` only control bookkeeping and may change
    between a run and its resumption.
    """

    data: str = "8gaussians"
    schedule: str = "linear"
    model: Optional[Mapping[str, Any]] = None  # None: default_model_spec(data, schedule)
    steps: int = 5000
    batch_size: Optional[int] = None  # None: 256 for 2-D data, 64 for images
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3

    BOOKKEEPING = ("checkpoint_every", "keep_checkpoints")

    def resolved(self) -> "TrainConfig":
        """Validated copy with the model spec and batch size filled in."""
        ds = get_dataset(self.data)
        make_schedule(self.schedule)
        if self.batch_size is None:
            self = dataclasses.replace(self, batch_size=64 if ds.is_image else 256)
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("learning_rate", "grad_clip"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("ema_decay", "label_dropout"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        model = dict(self.model) if self.model is not None else default_model_spec(self.data, self.schedule)
        return dataclasses.replace(self, model=model)

    def to_dict(self) -> dict:
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), Mapping) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return cls(**d)

    def mismatches(self, other: "TrainConfig") -> list[str]:
        """Fields (other than bookkeeping) on which two configs differ, as ``name: a != b``."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if k not in self.BOOKKEEPING and a[k] != b[k]]


def write_config(directory: str, config: TrainConfig) -> None:
    """Write ``config.json`` atomically (temporary file + ``os.replace``)."""
    from .._files import write_file

    os.makedirs(directory, exist_ok=True)
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    write_file(os.path.join(directory, CONFIG_FILE), lambda f: f.write(text.encode("utf-8")))


def read_config(directory: str) -> TrainConfig:
    """The run config saved in ``directory``; ``FileNotFoundError``/``ValueError`` naming it otherwise."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (not a dpmjax training directory)")
    try:
        with open(path) as f:
            return TrainConfig.from_dict(json.load(f))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: corrupt run config ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the run config ({e.strerror or e})") from None
