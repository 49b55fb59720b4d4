"""glif2: the GLIF spiking neuron, fused by torch.compile, with the paper's networks, data and training."""

from glif2.layers import TimeMerged, merge_time, split_time, tdBatchNorm
from glif2.neuron import GLIF, GLIFCoeffs, GLIFFunction, GLIFState, glif_step, randomize_gates
from glif2.surrogate import SURROGATES, spike

__all__ = [
    "GLIF",
    "GLIFCoeffs",
    "GLIFFunction",
    "GLIFState",
    "SURROGATES",
    "TimeMerged",
    "glif_step",
    "merge_time",
    "randomize_gates",
    "spike",
    "split_time",
    "tdBatchNorm",
]
