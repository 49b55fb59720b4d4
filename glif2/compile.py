"""Everything torch.compile: the GLIF kernels, whole models, and the dynamo settings they need (set only here)."""

from collections.abc import Callable

import torch
import torch._dynamo.config as dynamo_config
from torch import nn

COMPILE_MODES = ("none", "default", "max-autotune", "reduce-overhead")

# Every distinct GLIF input shape (layer, batch size, dtype) is its own static-shape specialisation of the
# kernels; a deep network with train and eval batch sizes easily passes dynamo's default limit of 8, after which
# it would silently fall back to eager.
dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 128)
dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 1024)


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
