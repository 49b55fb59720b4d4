"""Everything torch.compile: the GLIF kernels, whole models, and the dynamo settings they need (set only here)."""

from collections.abc import Callable

import einops
import torch
import torch._dynamo.config as dynamo_config
from torch import nn

COMPILE_MODES = ("none", "default", "max-autotune", "reduce-overhead")

# Every distinct GLIF input shape (layer, batch size, dtype) is its own static-shape specialisation of the
# kernels; a deep network with train and eval batch sizes easily passes dynamo's default limit of 8, after which
# it would silently fall back to eager.
dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 128)
dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 1024)

# einops ops enter graphs as single calls instead of being inlined: inlined, dynamo guards on the size of einops'
# per-tensor-type backend cache, which grows when tracing meets a new tensor subclass (FakeTensor, FunctionalTensor),
# and every growth recompiled the whole model once more (~30 s each for the digits net on CPU).
for _op in (einops.rearrange, einops.reduce, einops.repeat):
    torch._dynamo.allow_in_graph(_op)


def compile_kernel(fn: Callable) -> Callable:
    """One fused kernel per direction: fullgraph (a graph break would split the time loop), static shapes."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


def compile_model(model: nn.Module, mode: str = "default") -> nn.Module:
    """Compile a whole model (or training step) with fullgraph. ``mode`` is one of COMPILE_MODES."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}; choose one of {COMPILE_MODES}")
    if mode == "none":
        return model
    return torch.compile(model, mode=mode, fullgraph=True, dynamic=False)


def compile_step(fn: Callable, mode: str = "default") -> Callable:
    """Compile a training-step function that is not a module (e.g. `optimizer.step`). Not fullgraph: the optimizer's
    bookkeeping around its foreach kernels may break the graph harmlessly. With reduce-overhead its kernels replay as
    a CUDA graph; give the optimizer tensor learning rates so that the schedule does not recompile it every epoch."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}; choose one of {COMPILE_MODES}")
    if mode == "none":
        return fn
    return torch.compile(fn, mode=mode, fullgraph=False, dynamic=False)
