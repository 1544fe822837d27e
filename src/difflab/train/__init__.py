"""Training: the loop, EMA, mixed precision, accumulation, checkpoints and exact resume,
distributed setup.  ``train(config)`` is the entry point; ``load_config`` reads a YAML run
config with ``--set key.sub=value`` overrides.  Knows nothing of sampler internals.
"""

from .checkpoint import Checkpoint, find_checkpoint, load_checkpoint, save_checkpoint
from .config import (
    DataConfig,
    DiffusionConfig,
    LoopConfig,
    SampleConfig,
    TrainConfig,
    apply_overrides,
    load_config,
    save_config,
)
from .ema import EMA, ema_decay_at
from .loop import Trainer, TrainingInterrupted, TrainResult, train
from .nonfinite import NonFiniteError
from .optim import build_optimizer, lr_factor
from .stream import BatchStream, epoch_order

__all__ = [
    "EMA",
    "BatchStream",
    "Checkpoint",
    "DataConfig",
    "DiffusionConfig",
    "LoopConfig",
    "NonFiniteError",
    "SampleConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingInterrupted",
    "apply_overrides",
    "build_optimizer",
    "ema_decay_at",
    "epoch_order",
    "find_checkpoint",
    "load_checkpoint",
    "load_config",
    "lr_factor",
    "save_checkpoint",
    "save_config",
    "train",
]
