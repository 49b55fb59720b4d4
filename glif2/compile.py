"""Everything torch.compile: the GLIF kernels, whole models, and the dynamo settings they need.

Importing glif2 changes no global torch setting. What compiled GLIF code needs is applied where glif2 compiles:
- the recompile limits are raised only while a glif2-compiled callable runs (a scoped `config.patch`): every
  distinct GLIF input shape (layer, batch size, dtype) is its own static-shape specialisation of the kernels, and
  a deep network with train and eval batch sizes easily passes dynamo's default limit of 8, after which it would
  silently fall back to eager;
- einops ops are allowed in the graph (as single calls instead of being inlined) the first time glif2 compiles
  something: inlined, dynamo guards on the size of einops' per-tensor-type backend cache, which grows when
  tracing meets a new tensor subclass (FakeTensor, FunctionalTensor), and every growth recompiled the whole model
  once more (~30 s each for the digits net on CPU).
"""

import functools
from collections.abc import Callable

import einops
import torch
import torch._dynamo.config as dynamo_config
import torch._inductor
from torch import nn

COMPILE_MODES = ("none", "default", "max-autotune", "reduce-overhead")
DYNAMO_LIMITS = {"recompile_limit": 128, "accumulated_recompile_limit": 1024}


@functools.cache
def _allow_einops_in_graph() -> None:
    for op in (einops.rearrange, einops.reduce, einops.repeat):
        torch._dynamo.allow_in_graph(op)


def _limits() -> dict[str, int]:
    # Never lower a limit the user raised further themselves.
    return {k: max(v, getattr(dynamo_config, k)) for k, v in DYNAMO_LIMITS.items()}


def scoped(fn: Callable) -> Callable:
    """`fn` (a torch.compile'd callable) run with glif2's dynamo settings, restored on return."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        _allow_einops_in_graph()
        with dynamo_config.patch(**_limits()):
            return fn(*args, **kwargs)

    return run


def compile_kernel(fn: Callable) -> Callable[[bool], Callable]:
    """One fused kernel per direction: fullgraph (a graph break would split the time loop), static shapes.

    Returns `kernel(eager)`: the compiled kernel, or `fn` itself when `eager` or when already inside a compiled
    graph (an outer torch.compile traces `fn` into its own graph)."""
    compiled = scoped(torch.compile(fn, fullgraph=True, dynamic=False))

    def kernel(eager: bool) -> Callable:
        return fn if eager or torch.compiler.is_compiling() else compiled

    return kernel


def compile_model(model: nn.Module, mode: str = "default", fullgraph: bool = True) -> nn.Module:
    """Compile a whole model (or training objective), by default with fullgraph. ``mode`` is one of COMPILE_MODES.

    On the CPU inductor's layout optimisation is off: it converts every conv weight to channels-last and keeps that
    copy for the backward (as many bytes as the weights, on top of the activations), and measured no faster here
    (bench/memory.py, docs/performance.md §5.5). Returns torch.compile's wrapper (the raw module stays at
    `._orig_mod`), whose calls run with glif2's dynamo settings."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}; choose one of {COMPILE_MODES}")
    if mode == "none":
        return model
    on_cpu = all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    if on_cpu:
        options = {**torch._inductor.list_mode_options(mode), "layout_optimization": False}
        compiled = torch.compile(model, options=options, fullgraph=fullgraph, dynamic=False)
    else:
        compiled = torch.compile(model, mode=mode, fullgraph=fullgraph, dynamic=False)
    compiled.forward = scoped(compiled.forward)
    return compiled


def compile_step(fn: Callable, mode: str = "default") -> Callable:
    """Compile a training-step function that is not a module (e.g. `optimizer.step`). Not fullgraph: the optimizer's
    bookkeeping around its foreach kernels may break the graph harmlessly. With reduce-overhead its kernels replay as
    a CUDA graph; give the optimizer tensor learning rates so that the schedule does not recompile it every epoch."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}; choose one of {COMPILE_MODES}")
    if mode == "none":
        return fn
    return scoped(torch.compile(fn, mode=mode, fullgraph=False, dynamic=False))


__all__ = ["COMPILE_MODES", "DYNAMO_LIMITS", "compile_kernel", "compile_model", "compile_step", "scoped"]
