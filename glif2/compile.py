"""Everything torch.compile: the fused kernels, regional and whole-model compilation, and the settings they need.

Importing glif2 changes no global torch setting. What compiled glif2 code needs is applied where glif2 compiles:
- the recompile limits are raised only while a glif2-compiled callable runs (a scoped `config.patch`): every
  distinct input shape (layer, batch size, dtype) is its own static-shape specialisation, and a deep network with
  train and eval batch sizes easily passes dynamo's default limit of 8, after which it would silently fall back to
  eager;
- einops ops are allowed in the graph (as single calls instead of being inlined) the first time glif2 compiles
  something: inlined, dynamo guards on the size of einops' per-tensor-type backend cache, which grows when
  tracing meets a new tensor subclass (FakeTensor, FunctionalTensor), and every growth recompiled the whole model
  once more (~30 s each for the digits net on CPU);
- graphs holding glif2's custom autograd Functions may enter AOTAutograd's cache (torch leaves them out by
  default, so a warm start traced every block's joint graph again, ~5 s for ResNet-19 on CPU): dynamo traces each
  Function's forward and backward into the graph, so both are part of the cache key;
- graphs calling einops.reduce (the GLIF's parameter gradients, a network's mean over steps) may enter it too:
  torch lists einops' rearrange and repeat as cacheable but not reduce, which is as pure a function of its tensor
  and pattern; the mark holds einops' version, so another einops is another key. Left out, ResNet-19's warm start
  traced and lowered the gradient kernel's three graphs again;
- inductor's precompiled C++ header is built only before the first kernel that needs the compiler, not whenever
  a cached kernel is loaded (glif2/compile_cache.py `deferred_headers`).

One switch decides whether the fused kernels run compiled: `eager_kernels()`, read at call time
(docs/performance.md §7.4). Nothing else carries it: no module, autograd Function, custom op or saved config.

Regional compilation (docs/performance.md §8.1) compiles each region a network lists in `regions()` (its stem, each
residual block, its head) through one shared compiled function, so blocks of the same shape share one graph.
"""

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import einops
import torch
import torch._dynamo.config as dynamo_config
import torch._functorch.config as functorch_config
import torch._inductor
import torch._inductor.config as inductor_config
from torch import nn

from glif2.compile_cache import deferred_headers

COMPILE_MODES = ("none", "default", "max-autotune", "reduce-overhead")  # inductor's modes, and no compilation
COMPILE_SCOPES = ("regional", "model", "none")  # what is compiled: each region, the whole model, nothing
DYNAMO_LIMITS = {"recompile_limit": 128, "accumulated_recompile_limit": 1024}
# Graphs holding a custom autograd.Function (the GLIF's surrogate, the lean unit) may enter AOTAutograd's cache
# (see the module docstring).
AUTOGRAD_CACHE = {"autograd_cache_allow_custom_autograd_functions": True}
CACHEABLE = {"einops.einops.reduce": einops.__version__}  # may enter AOTAutograd's cache (the module docstring)


class _Switch:
    """The one execution switch: when `eager` is True, glif2's fused kernels run as plain PyTorch code."""

    eager = False


_SWITCH = _Switch()


@contextmanager
def eager_kernels(enabled: bool = True) -> Iterator[None]:
    """Within this block glif2's fused kernels (GLIF, bit packing) run uncompiled: the same code, op by op, for
    debugging and for tests that should not pay compilation. Restores the previous setting on exit."""
    before = _SWITCH.eager
    _SWITCH.eager = bool(enabled)
    try:
        yield
    finally:
        _SWITCH.eager = before


def kernels_are_eager() -> bool:
    """Whether the fused kernels currently run uncompiled (`eager_kernels`)."""
    return _SWITCH.eager


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
        cacheable = {**inductor_config.unsafe_marked_cacheable_functions, **CACHEABLE}
        with (
            dynamo_config.patch(**_limits()),
            functorch_config.patch(**AUTOGRAD_CACHE),
            inductor_config.patch(unsafe_marked_cacheable_functions=cacheable),
            deferred_headers(),
        ):
            return fn(*args, **kwargs)

    return run


def compile_kernel(fn: Callable) -> Callable:
    """One fused kernel: fullgraph (a graph break would split the time loop), static shapes.

    Returns a callable that runs the compiled kernel, or `fn` itself inside `eager_kernels()` and when already
    inside a compiled graph (an outer torch.compile traces `fn` into its own graph)."""
    compiled = scoped(torch.compile(fn, fullgraph=True, dynamic=False))

    @functools.wraps(fn)
    def kernel(*args, **kwargs):
        if _SWITCH.eager or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        return compiled(*args, **kwargs)

    return kernel


def _options(on_cpu: bool, mode: str) -> dict:
    """torch.compile's keyword arguments for `mode`. On the CPU inductor's layout optimisation is off: it converts
    every conv weight to channels-last and keeps that copy for the backward (as many bytes as the weights, on top of
    the activations), and measured no faster here (docs/performance.md §5.5)."""
    if on_cpu:
        return {"options": {**torch._inductor.list_mode_options(mode), "layout_optimization": False}}
    return {"mode": mode}


def _on_cpu(model: nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])


def _check_mode(mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}; choose one of {COMPILE_MODES}")


def compile_model(model: nn.Module, mode: str = "default", fullgraph: bool = True) -> nn.Module:
    """Compile a whole model (or training objective), by default with fullgraph. ``mode`` is one of COMPILE_MODES.
    Returns torch.compile's wrapper (the raw module stays at `._orig_mod`), whose calls run with glif2's dynamo
    settings."""
    _check_mode(mode)
    if mode == "none":
        return model
    compiled = torch.compile(model, fullgraph=fullgraph, dynamic=False, **_options(_on_cpu(model), mode))
    compiled.forward = scoped(compiled.forward)
    return compiled


def run_region(region: nn.Module, *args):
    """A region's own forward: the one function regional compilation compiles. Dynamo keeps its graphs on this
    function's code, so two regions of the same class and shapes (parameters are graph inputs) hit the same graph
    instead of compiling their own copy."""
    return type(region).forward(region, *args)


@functools.cache
def _region_runner(on_cpu: bool, mode: str) -> Callable:
    return scoped(torch.compile(run_region, fullgraph=True, dynamic=False, **_options(on_cpu, mode)))


def regions(model: nn.Module) -> list[nn.Module]:
    """The modules regional compilation compiles one by one: `model.regions()`, which every registered network
    defines (its stem, each block, its head). A model without it is refused with the fix."""
    if not callable(getattr(model, "regions", None)):
        raise ValueError(
            f"{type(model).__name__} defines no regions() for regional compilation; compile the whole "
            "model instead (compile_model, or train.py --compile model)"
        )
    return list(model.regions())


def compile_regions(model: nn.Module, mode: str = "default") -> nn.Module:
    """Compile each region of `model` in place (its forward goes through the shared compiled function); the
    module, its state_dict keys and its hooks are unchanged. Code between regions (pooling over time, the loss)
    runs eagerly. Returns the model. ``mode`` is one of COMPILE_MODES ("none": nothing is compiled)."""
    _check_mode(mode)
    if mode == "none":
        return model
    run = _region_runner(_on_cpu(model), mode)
    for region in regions(model):
        region.forward = functools.partial(run, region)
    return model


@contextmanager
def regions_uncompiled(model: nn.Module) -> Iterator[nn.Module]:
    """Within this block the regions of a model compiled by `compile_regions` run their own (uncompiled) forward, e.g.
    for a pass that must call hooks; on exit they run compiled again (the graphs already made are reused). A model
    whose regions are not compiled is left as it is."""
    compiled = {}
    for region in getattr(model, "regions", list)():
        if "forward" in region.__dict__:
            compiled[region] = region.__dict__.pop("forward")
    try:
        yield model
    finally:
        for region, forward in compiled.items():
            region.forward = forward


def compile_scope(model: nn.Module, scope: str, mode: str = "default") -> nn.Module:
    """`scope` "regional" (compile_regions, in place; returns the model), "model" (compile_model; returns the
    wrapper) or "none". `model` may be a training objective whose regions() are its network's: train.py compiles
    the objective (network and loss) as one graph under "model" and the network's blocks under "regional"."""
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope {scope!r}; choose one of {COMPILE_SCOPES}")
    if scope == "regional":
        return compile_regions(model, mode)
    if scope == "model":
        return compile_model(model, mode)
    return model


__all__ = [
    "COMPILE_MODES",
    "COMPILE_SCOPES",
    "DYNAMO_LIMITS",
    "compile_kernel",
    "compile_model",
    "compile_regions",
    "compile_scope",
    "eager_kernels",
    "kernels_are_eager",
    "regions",
    "regions_uncompiled",
    "run_region",
    "scoped",
]
