"""pyllm.train: the training loop every stage shares, and pretraining on text or token shards.

- ``TrainConfig`` (config.py): the typed configuration, presets, ``--key value`` overrides.
- ``Trainer(model, cfg, batches, loss_fn=None, eval_fn=None).fit()`` (trainer.py): precision and loss
  scaling, accumulation, clipping, schedule, checkpoints, logging, DDP/FSDP2.
- ``train(cfg)`` (run.py): build data + model from the config, train, save ``<out_dir>/final``.
"""

from .checkpoint import CheckpointError
from .config import PRESETS, ConfigError, TrainConfig, parse_overrides, preset
from .data import DataError, RandomWindows
from .run import train
from .trainer import Trainer, lm_loss

__all__ = ["TrainConfig", "Trainer", "train", "lm_loss", "preset", "PRESETS", "parse_overrides", "ConfigError",
           "DataError", "CheckpointError", "RandomWindows"]
