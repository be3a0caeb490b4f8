"""The one training loop (offline and online) on accelerate, plus checkpointing and reporting."""

from mmalign.train.trainer import TrainConfig, Trainer, TrainingError

__all__ = ["TrainConfig", "Trainer", "TrainingError"]
