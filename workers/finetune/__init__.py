"""Fine-tuning: the training loop (and, later, the linearized model)."""

from workers.finetune.loop import DivergenceError, TrainConfig, train

__all__ = ["DivergenceError", "TrainConfig", "train"]
