"""Training the demo networks: data sets, the training loop, checkpoints, metrics.

Needs the ``demo`` extra (orbax-checkpoint, scikit-learn, tqdm); the sampler does not.
"""

from .checkpoint import CheckpointError, read_losses
from .config import SCHEDULES, TrainConfig, make_schedule, read_config
from .data import DATASETS, Dataset, get_dataset
from .metrics import sliced_wasserstein
from .trainer import Trainer, TrainResult, TrainState, diffusion_loss, load_trained, make_optimizer

__all__ = [
    "CheckpointError",
    "DATASETS",
    "Dataset",
    "SCHEDULES",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "diffusion_loss",
    "get_dataset",
    "load_trained",
    "make_optimizer",
    "make_schedule",
    "read_config",
    "read_losses",
    "sliced_wasserstein",
]
