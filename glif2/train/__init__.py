"""The training application: configuration and presets, the command lines, the training loop, evaluation and the
run's records. The library core (glif2's other modules) never imports it.

    from glif2.train import TrainConfig, train
    result = train(TrainConfig.from_name("digits", epochs=3))
"""

from glif2.train.config import PRESETS, TrainConfig
from glif2.train.evaluation import evaluate, evaluate_model
from glif2.train.loop import StopReason, train
from glif2.train.setup import Objective

__all__ = ["PRESETS", "Objective", "StopReason", "TrainConfig", "evaluate", "evaluate_model", "train"]
