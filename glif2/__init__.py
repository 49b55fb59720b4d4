"""glif2: the GLIF spiking neuron, fused by torch.compile, with the paper's networks and their released checkpoints.

This is the library's public API. Importing it changes no global torch setting (glif2.compile applies what compiled
GLIF code needs where it compiles). The training application lives in glif2.train.
"""

from glif2.analysis import FiringRates, firing_rates, glif_layers
from glif2.checkpoint import load_checkpoint, load_model, load_reference_checkpoint, save_checkpoint
from glif2.compile import eager_kernels
from glif2.cost import CostCounter
from glif2.errors import CheckpointError, ConfigError, ExportError
from glif2.kernels import GLIFCoeffs, GLIFFunction, GLIFState, glif_step
from glif2.layers import TimeMerged, merge_time, split_time, tdBatchNorm
from glif2.models import create_model, list_models, register_model
from glif2.neuron import GLIF, randomize_gates
from glif2.released import clean_state_dict
from glif2.surrogate import SURROGATES, spike

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CostCounter",
    "ExportError",
    "FiringRates",
    "GLIF",
    "GLIFCoeffs",
    "GLIFFunction",
    "GLIFState",
    "SURROGATES",
    "TimeMerged",
    "clean_state_dict",
    "create_model",
    "eager_kernels",
    "firing_rates",
    "glif_layers",
    "glif_step",
    "list_models",
    "load_checkpoint",
    "load_model",
    "load_reference_checkpoint",
    "merge_time",
    "randomize_gates",
    "register_model",
    "save_checkpoint",
    "spike",
    "split_time",
    "tdBatchNorm",
]
