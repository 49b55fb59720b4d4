"""Exact BPTT in a fraction of the memory: packed spikes and a fused BN -> GLIF backward (docs/performance.md §5;
how to add a block: docs/performance.md §7).

Training keeps, for every layer and step, what its backward needs. With autograd as is ("off"), a conv -> BN -> GLIF
unit keeps three float tensors of the unit's size: the conv's input spikes, the BN input and the GLIF input. Yet
spikes carry one bit, and the GLIF input is a per-channel affine function of the BN input. The memory modes:

- "lean" (the default): every tensor of few known values that a layer keeps (spikes, pooled spikes, SEW sums) is
  kept packed, `Grid.bits` bits per value; BN (with the residual add) and the GLIF after it form one autograd unit
  (the custom ops glif2::unit_forward / unit_backward) that keeps the BN input once plus per-channel statistics,
  and recomputes the GLIF input in its backward. No extra convolution.
- "recompute": the unit also drops the conv output and recomputes it in the backward from the packed spikes (one
  extra convolution forward per layer), keeping about one bit per neuron-step.
- "off": plain autograd, for comparison and debugging.

Every mode computes the same numbers: the forward runs the same kernels in the same order, and every backward
calls the ATen backward that autograd itself would call (convolution_backward, native_batch_norm_backward,
avg_pool2d_backward), on inputs rebuilt bit for bit. Evaluation and no-grad inference always take the plain path.

The submodules, each owning one thing:
- grid: Grid, bit packing, Encoding (how a kept tensor is rebuilt);
- saving: the autograd Functions that keep their inputs encoded (conv, linear, pool, product);
- batchnorm: the BN statistics op, its exact recomputation, SyncBatchNorm on any device;
- fused: the fused BN -> GLIF unit and its custom ops, with named layouts;
- lean: what the networks use (LeanModule, Act, the building blocks of a lean twin, set_memory);
- measure: bytes kept and neuron-steps, for bench/ and the tests.
"""

from glif2.memory.fused import unit
from glif2.memory.grid import SPIKES, Grid
from glif2.memory.lean import (
    MEMORY_MODES,
    Act,
    LeanModule,
    LeanSequential,
    bn_branch,
    conv_bn_plain,
    conv_bn_spike,
    conv_branch,
    linear,
    link_grids,
    memory_mode,
    multiply,
    pool,
    run_sequence,
    set_memory,
)

__all__ = [
    "MEMORY_MODES",
    "SPIKES",
    "Act",
    "Grid",
    "LeanModule",
    "LeanSequential",
    "bn_branch",
    "conv_bn_plain",
    "conv_bn_spike",
    "conv_branch",
    "link_grids",
    "linear",
    "memory_mode",
    "multiply",
    "pool",
    "run_sequence",
    "set_memory",
    "unit",
]
