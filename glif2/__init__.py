"""glif2: the GLIF spiking neuron, fused by torch.compile, with the paper's networks, data and training."""

from glif2.checkpoint import (
    CheckpointError,
    clean_state_dict,
    load_checkpoint,
    load_model,
    load_reference_checkpoint,
    save_checkpoint,
)
from glif2.config import PRESETS, TrainConfig
from glif2.layers import TimeMerged, merge_time, split_time, tdBatchNorm
from glif2.neuron import GLIF, GLIFCoeffs, GLIFFunction, GLIFState, glif_step, randomize_gates
from glif2.models import FiringRates, create_model, firing_rates, list_models, register_model
from glif2.surrogate import SURROGATES, spike

__all__ = [
    "CheckpointError",
    "FiringRates",
    "clean_state_dict",
    "create_model",
    "firing_rates",
    "list_models",
    "load_checkpoint",
    "load_model",
    "load_reference_checkpoint",
    "register_model",
    "save_checkpoint",
    "GLIF",
    "GLIFCoeffs",
    "GLIFFunction",
    "GLIFState",
    "PRESETS",
    "SURROGATES",
    "TimeMerged",
    "TrainConfig",
    "glif_step",
    "merge_time",
    "randomize_gates",
    "spike",
    "split_time",
    "tdBatchNorm",
]
