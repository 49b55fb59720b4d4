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
  traced and lowered the gradient kernel's three graphs again.

One switch decides whether the fused kernels run compiled: `eager_kernels()`, read at call time
(docs/performance.md §7.4). Nothing else carries it: no module, autograd Function, custom op or saved config.

Regional compilation (docs/performance.md §8.1) compiles each region a network lists in `regions()` (its stem, each
residual block, its head) through one shared compiled function, so blocks of the same shape share one graph.
"""

import functools
import hashlib
import json
import os
import platform
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import einops
import torch
import torch._dynamo.config as dynamo_config
import torch._functorch.config as functorch_config
import torch._inductor
import torch._inductor.config as inductor_config
from torch import nn

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
    wrapper) or "none"."""
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope {scope!r}; choose one of {COMPILE_SCOPES}")
    if scope == "regional":
        return compile_regions(model, mode)
    if scope == "model":
        return compile_model(model, mode)
    return model


# the portable compile cache


CACHE_FORMAT = "glif2-compile-cache/2"
# where inductor keeps a compiled C++ kernel library, within its cache directory: <2 chars>/<key>[.main].so
_BINARY = re.compile(r"[a-z0-9]{2}/[a-z0-9]+(\.main)?\.so")


def cache_key(device: torch.device) -> dict[str, str]:
    """What saved compile artifacts must match to be loaded: this file format, the torch and Python versions and
    the device kind. Within a file, inductor keys each graph by its own content (code, shapes, dtypes, settings), so
    a graph that differs is simply compiled afresh."""
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    return {"format": CACHE_FORMAT, "torch": torch.__version__, "python": platform.python_version(), "device": kind}


def _toolchain() -> str:
    """What a compiled C++ kernel library needs beyond cache_key to run here: the same C++ compiler and C library."""
    from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler

    text = f"{get_compiler_version_info(get_cpp_compiler())} {platform.libc_ver()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _kernel_binaries() -> dict[str, bytes]:
    """The C++ libraries inductor built for this process, by path within its cache directory: the CPU kernels it
    loaded, and the probes of the instruction sets this CPU runs (each loaded once in a child process; the marker of
    that success is not carried, so a fresh cache probes again, without the compiler). torch's artifacts hold the
    kernels' source, not the libraries, so without these a fresh cache runs the C++ compiler once per kernel again:
    most of a CPU cold start (docs/performance.md §8.3)."""
    from torch._inductor import codecache

    root = Path(codecache.cache_dir()).resolve()
    names = getattr(getattr(codecache, "CppPythonBindingsCodeCache", None), "_loaded_module_names", ())
    files = [getattr(sys.modules.get(name), "__file__", None) for name in list(names)]
    files += [str(marker)[: -len(".load_ok")] for marker in root.glob("*/*.so.load_ok")]
    found = {}
    for file in files:
        path = Path(file).resolve() if file else None
        if path is not None and path.is_file() and path.is_relative_to(root):
            rel = path.relative_to(root).as_posix()
            if _BINARY.fullmatch(rel):
                found[rel] = path.read_bytes()
    return found


def _install_binaries(binaries: dict[str, bytes]) -> None:
    """Writes kernel libraries into inductor's cache directory where absent (atomically: a process compiling the
    same kernel meanwhile sees one whole file or the other). Inductor names a library by a hash of its source and
    compile command, so one that is not wanted here is never looked up."""
    from torch._inductor import codecache

    root = Path(codecache.cache_dir())
    for rel, data in binaries.items():
        if not _BINARY.fullmatch(rel):
            raise ValueError(f"damaged (kernel library path {rel!r})")
        dest = root / rel
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


def save_compile_cache(path: str | os.PathLike, device: torch.device) -> bool:
    """Writes every compile artifact this process made (torch.compiler.save_cache_artifacts) and the C++ kernel
    libraries it loaded to `path`, atomically: a JSON header line (cache_key, the toolchain, the parts' sizes, a
    sha256 of the payload) then the payload. Returns False when there is nothing to save."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None or not saved[0]:
        return False
    artifacts = saved[0]
    try:
        binaries = _kernel_binaries()
        toolchain = _toolchain() if binaries else None
    except Exception as err:  # inductor's internals moved (another torch): torch's artifacts alone still help
        warnings.warn(f"compile cache {path}: kernel libraries not saved: {err}", stacklevel=2)
        binaries, toolchain = {}, None
    payload = b"".join([artifacts, *binaries.values()])
    header = {
        **cache_key(device),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "bytes": len(payload),
        "artifacts": len(artifacts),
        "binaries": [[rel, len(data)] for rel, data in binaries.items()],
        "toolchain": toolchain,
    }
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(json.dumps(header).encode() + b"\n" + payload)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _read_cache(path: str | os.PathLike, device: torch.device) -> tuple[dict, bytes, dict[str, bytes]]:
    """The header, the artifacts and the kernel libraries of a cache file; raises ValueError naming what is wrong."""
    blob = Path(path).read_bytes()
    head, _, payload = blob.partition(b"\n")
    header = json.loads(head)
    want = cache_key(device)
    if not isinstance(header, dict) or {k: header.get(k) for k in want} != want:
        got = header if isinstance(header, dict) else {}
        reason = "; ".join(f"{k} {got.get(k)!r}, here {v!r}" for k, v in want.items() if got.get(k) != v)
        raise ValueError(f"made elsewhere ({reason})")
    if len(payload) != header.get("bytes") or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise ValueError("damaged (its checksum does not match)")
    start = header["artifacts"]
    binaries = {}
    for rel, size in header["binaries"]:
        binaries[rel] = payload[start : start + size]
        start += size
    return header, payload[: header["artifacts"]], binaries


def load_compile_cache(path: str | os.PathLike, device: torch.device) -> bool:
    """Loads compile artifacts saved by `save_compile_cache`, so that the graphs they hold compile from them instead
    of from scratch, and installs its C++ kernel libraries where this machine's compiler and C library are those
    that built them. A file that is damaged, of another format, or made by another torch, Python or device kind is
    ignored with a one-line warning, never an error. Returns whether it was loaded."""
    try:
        header, artifacts, binaries = _read_cache(path, device)
        torch.compiler.load_cache_artifacts(artifacts)
    except Exception as err:  # any failure only costs the compile time it would have saved
        warnings.warn(f"compile cache {path} ignored: {err}", stacklevel=2)
        return False
    try:
        if binaries and header["toolchain"] != _toolchain():
            raise ValueError("built by another C++ compiler or C library; they are compiled afresh")
        _install_binaries(binaries)
    except Exception as err:
        warnings.warn(f"compile cache {path}: kernel libraries ignored: {err}", stacklevel=2)
    return True


__all__ = [
    "CACHE_FORMAT",
    "COMPILE_MODES",
    "COMPILE_SCOPES",
    "DYNAMO_LIMITS",
    "cache_key",
    "compile_kernel",
    "compile_model",
    "compile_regions",
    "compile_scope",
    "eager_kernels",
    "kernels_are_eager",
    "load_compile_cache",
    "regions",
    "regions_uncompiled",
    "run_region",
    "save_compile_cache",
    "scoped",
]
