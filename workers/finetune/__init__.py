"""Fine-tuning: the training loop, its engines and the linearized (tangent-space) model.

The DeepSpeed engine lives in `workers.finetune.deepspeed_engine`, imported only when used.
"""

from workers.finetune.engine import Classifier, Engine, TorchEngine, TrainState
from workers.finetune.linearized import (
    LinearizedModel,
    delta_between,
    jvp_many,
    jvp_outputs,
    linearized_forward,
    pack_linearized,
    tangent_names,
    unpack_linearized,
)
from workers.finetune.loop import DivergenceError, TrainConfig, fit, train

__all__ = [
    "Classifier",
    "DivergenceError",
    "Engine",
    "LinearizedModel",
    "TorchEngine",
    "TrainConfig",
    "TrainState",
    "delta_between",
    "fit",
    "jvp_many",
    "jvp_outputs",
    "linearized_forward",
    "pack_linearized",
    "tangent_names",
    "train",
    "unpack_linearized",
]
