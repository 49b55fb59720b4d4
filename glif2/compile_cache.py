"""The portable compile cache: what a process compiled, saved next to a run and loaded by the next one
(docs/performance.md §8.3), and the deferral of inductor's precompiled C++ header to the first kernel that needs it.

Everything here leans on inductor's internals where torch has no public API (its C++ kernel libraries, its build
step); where those moved in another torch, the cache still carries torch's own artifacts and says so in one warning.
"""

import functools
import hashlib
import json
import os
import platform
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

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


# precompiled headers whose build deferred_headers() put off: target .gch -> (lock path, builders)
_PENDING_HEADERS: dict[str, tuple[str, Sequence]] = {}
_PENDING_LOCK = threading.Lock()


@functools.cache  # one wrapper per build step: deferred_headers() runs on every glif2-compiled call
def _deferring_headers(build: Callable) -> Callable:
    """inductor's C++ build step (a lock path and builders), changed in one way: a precompiled header is recorded
    instead of built, and built before the first build that runs the compiler (its own lock and existence check
    make that once per machine, whichever thread comes first)."""

    def run(lock_path: str, builders: Sequence) -> None:
        targets = [builder.get_target_file_path() for builder in builders]
        if all(os.path.exists(target) for target in targets):
            return build(lock_path, builders)
        if len(builders) == 1 and targets[0].endswith(".gch"):
            with _PENDING_LOCK:
                _PENDING_HEADERS[targets[0]] = (lock_path, builders)
            return None
        with _PENDING_LOCK:
            pending = list(_PENDING_HEADERS.items())
        for target, (header_lock, header) in pending:
            build(header_lock, header)
            with _PENDING_LOCK:
                _PENDING_HEADERS.pop(target, None)
        return build(lock_path, builders)

    run.defers_headers = True
    return run


@contextmanager
def deferred_headers() -> Iterator[None]:
    """While inductor compiles inside, its precompiled C++ header is built only when a kernel library is really
    compiled. Inductor builds the header (~5 s of g++ on the 2-core CPU) the first time a process loads any CPU
    kernel, even one whose library is already in its cache; the header lives under the temporary folder, so on a
    fresh machine a start from a saved cache file paid it for nothing. A kernel compiled meanwhile by code outside
    glif2 still compiles, reading the header's text instead. Nested uses and a torch without this build step leave
    things as they are."""
    from torch._inductor import codecache

    build = getattr(codecache, "_worker_compile_cpp", None)
    if build is None or getattr(build, "defers_headers", False):
        yield
        return
    codecache._worker_compile_cpp = _deferring_headers(build)
    try:
        yield
    finally:
        codecache._worker_compile_cpp = build


__all__ = ["CACHE_FORMAT", "cache_key", "deferred_headers", "load_compile_cache", "save_compile_cache"]
