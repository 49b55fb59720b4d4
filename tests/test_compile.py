"""The fused kernels: zero graph breaks, compiled == eager, one loop nest per direction, GLIF really running them
(and nothing compiled inside `eager_kernels()`), composition with an outer torch.compile of a whole network (every
neuron form, with and without grad), and the dynamo bug GLIF.forward works around."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from einops import rearrange
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import glif2
from glif2 import GLIF, TimeMerged, tdBatchNorm
from glif2.compile import (
    compile_model,
    compile_regions,
    compile_scope,
    eager_kernels,
    kernels_are_eager,
    regions,
    regions_uncompiled,
    run_region,
)
from glif2.compile_cache import load_compile_cache, save_compile_cache
from glif2.kernels import GLIFCoeffs, GLIFFunction, fused_backward, fused_forward
from glif2.train.setup import Objective


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        TimeMerged(nn.Conv2d(3, 8, 3, padding=1, bias=False), tdBatchNorm(8)),
        GLIF(3, 8),
        TimeMerged(nn.Conv2d(8, 8, 3, padding=1, bias=False), tdBatchNorm(8, alpha=0.7)),
        GLIF(3, 8),
    )


def coeffs(c: int = 6, t: int = 3) -> GLIFCoeffs:
    torch.manual_seed(1)
    p = GLIF(t, c).coefficients()
    return GLIFCoeffs(*(v.detach() for v in p))


def test_module_has_no_graph_breaks():
    # The kernels themselves are compiled with fullgraph=True, which raises on any break (exercised below).
    explain = torch._dynamo.explain(GLIF(3, 6))(torch.randn(3, 2, 6, 4, 4))
    assert explain.graph_break_count == 0 and explain.graph_count == 1


def count_kernels(code: list[str]) -> int:
    return sum(len(re.findall(r"^cpp_fused_\w+ = async_compile", c, flags=re.M)) for c in code)


def full_size_buffers(code: list[str], numel: int) -> int:
    """Fresh allocations of at least one step's size in the generated wrapper code."""
    n = 0
    for c in code:
        for shape in re.findall(r"empty_strided_cpu\(\(([\d, ]+)\)", c):
            size = 1
            for d in shape.split(","):
                if d.strip():
                    size *= int(d)
            n += size >= numel
    return n


def test_one_loop_nest_forward_and_backward():
    T, B, C, N = 4, 3, 6, 64
    x, p = torch.randn(T, B, C, N), coeffs(C, T)
    _, fwd = run_and_get_code(torch.compile(fused_forward, fullgraph=True, dynamic=False), x, p)
    _, bwd = run_and_get_code(torch.compile(fused_backward, fullgraph=True, dynamic=False), x, x, p, "rect", 1.0)
    assert count_kernels(fwd) == 1  # the whole time loop in one kernel
    assert full_size_buffers(fwd, B * C * N) == 1  # the spikes, nothing else
    # One fused BPTT nest (writes dx, reduces over n) plus small kernels that sum the b c partials over b.
    assert count_kernels(bwd) <= 3
    assert full_size_buffers(bwd, B * C * N) == 1  # dx only: u and the spikes are recomputed in registers


def test_compiled_equals_eager():
    torch.manual_seed(0)
    a, b = GLIF(4, 5), GLIF(4, 5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 5, 6, 6) * 0.6 + 0.3
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    (a(xa) * g).sum().backward()
    with eager_kernels():
        (b(xb) * g).sum().backward()
        eager_out = b(x)
    assert torch.equal(a(x), eager_out)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_outer_compile_of_a_network_matches_eager():
    eager_net, net = small_net(), small_net()
    compiled = torch.compile(net, fullgraph=True, dynamic=False)
    x = torch.randn(3, 2, 3, 8, 8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with eager_kernels():
        out_eager = eager_net(xa)
        out_eager.sum().backward()
    out = compiled(xb)
    assert torch.equal(out, out_eager)
    out.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    for (name, pa), pb in zip(eager_net.named_parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_compiled_module_runs_the_inductor_kernels():
    # A shape no other test uses, so that this process compiles it here: one graph per direction, built by inductor.
    # A switch that ran the kernels eagerly (or compiled with another backend) compiles nothing and fails here.
    m = GLIF(3, 7)
    x = torch.randn(3, 5, 7, 11, requires_grad=True)
    counters.clear()
    out = m(x)
    assert counters["stats"]["unique_graphs"] == 1 and sum(counters["inductor"].values()) > 0, dict(counters)
    counters.clear()
    out.sum().backward()
    assert counters["stats"]["unique_graphs"] == 1 and sum(counters["inductor"].values()) > 0, dict(counters)
    assert not counters["graph_break"]
    counters.clear()
    with eager_kernels():
        GLIF(3, 7)(torch.randn(3, 5, 7, 13, requires_grad=True)).sum().backward()
    assert not counters["stats"] and not counters["inductor"]  # eager_kernels() compiles nothing


def test_eager_switch_is_scoped_and_the_old_keyword_still_works():
    assert not kernels_are_eager()
    with eager_kernels():
        assert kernels_are_eager()
        with eager_kernels(False):
            assert not kernels_are_eager()
        assert kernels_are_eager()
    assert not kernels_are_eager()
    for make in (lambda: GLIF(3, 7, eager=True), lambda: glif2.create_model("glifnet_small", 10, 2, eager=True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = make()  # the old per-module keyword: accepted, said to have no effect, not stored
        assert any(issubclass(w.category, DeprecationWarning) and "no effect" in str(w.message) for w in caught)
        assert "eager" not in getattr(model, "model_config", {}) and not kernels_are_eager()


def glif_args(m: GLIF, x: torch.Tensor) -> tuple:
    return (rearrange(x, m.flat_pattern()), m.surrogate, m.surrogate_width, *m.coefficients())


def test_no_grad_workaround_still_needed():
    """GLIF.forward calls GLIFFunction.forward itself when grad is off, because dynamo (torch 2.14) passes a ctx to
    a setup_context-style forward traced under no_grad, shifting every argument by one. This test fails once the
    installed torch traces `GLIFFunction.apply` under no_grad correctly: then drop the workaround in GLIF.forward
    (and this test)."""
    m = GLIF(2, 3)
    x = torch.randn(2, 4, 3, 5)
    with torch.no_grad(), eager_kernels():
        expected = GLIFFunction.apply(*glif_args(m, x))
        try:
            got = torch.compile(lambda v: GLIFFunction.apply(*glif_args(m, v)), fullgraph=True, backend="eager")(x)
        except Exception as e:  # the bug: the shifted arguments break GLIFCoeffs(*coeffs) (7 given, 6 expected)
            assert "Too many positional arguments" in str(e) or "FunctionCtx" in str(e), e
            return
    assert not torch.equal(got.reshape(x.shape), expected.reshape(x.shape)), (
        "dynamo now traces GLIFFunction.apply under no_grad: remove the workaround in GLIF.forward "
        "(glif2/neuron.py) and this test"
    )


def neuron_zoo() -> nn.Module:
    """One network with every neuron form: hard gates, layer-wise, GLIF_f, static parameters with static gates."""
    torch.manual_seed(0)
    forms = [
        dict(channels=8, gate_mode="hard"),
        dict(channels=None),
        dict(channels=8, variant="glif_f"),
        dict(channels=8, params="static", gate_mode="static_hard", surrogate="atan"),
    ]
    layers = []
    for i, form in enumerate(forms):
        layers += [
            TimeMerged(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1, bias=False), tdBatchNorm(8)),
            GLIF(3, **form),
        ]
    return nn.Sequential(*layers)


def test_every_neuron_form_compiles_into_one_graph_and_matches_eager():
    net = neuron_zoo()
    x = torch.randn(3, 2, 3, 8, 8)
    explain = torch._dynamo.explain(net)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    eager_net = neuron_zoo()
    compiled = torch.compile(net, fullgraph=True, dynamic=False)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(xb)
    with eager_kernels():
        out_eager = eager_net(xa)
    assert torch.equal(out, out_eager) and 0.02 < out.mean() < 0.9
    g = torch.randn_like(out)
    (out * g).sum().backward()
    with eager_kernels():
        (out_eager * g).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    for (name, pa), pb in zip(eager_net.named_parameters(), net.parameters(), strict=True):
        if pa.requires_grad:
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-4, msg=name)
        else:  # static parameters and gates, GLIF_f's gamma
            assert pb.grad is None, name
    # without grad (as in evaluation): GLIF.forward's no-grad path inside the compiled graph
    with torch.no_grad():
        out = compiled(x)
        with eager_kernels():
            out_eager = eager_net(x)
    assert torch.equal(out, out_eager) and 0.02 < out.mean() < 0.9


# regional compilation and the compile cache (docs/performance.md §8)


def region_graphs() -> int:
    """Graphs dynamo holds for regional compilation (all of them live on the one shared function's code)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(run_region.__code__))


def test_regional_compile_makes_one_graph_per_distinct_block_shape():
    """ResNet-19's regions are its stem, eight blocks of five shapes (three identity blocks of 128 channels, a
    downsampling block and two identity blocks of 256, a downsampling block and one identity block of 512) and its
    head: exactly one graph each for the distinct ones, counted independently from the regions' classes, parameter
    shapes and input shapes. A recompile per block (or per step) fails here. No graph breaks (fullgraph)."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = glif2.create_model("resnet19", 10, 2)  # lean, training: the forward graphs (the backward's compile lazily)
    seen = set()

    def record(module, args):
        seen.add(
            (
                type(module).__name__,
                tuple(tuple(p.shape) for p in module.parameters()),
                tuple(tuple(a.shape) for a in args),
                module.training,
            )
        )

    hooks = [r.register_forward_pre_hook(record) for r in regions(model)]
    compile_regions(model)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):  # a second step compiles nothing new
        model(x)
    for h in hooks:
        h.remove()
    assert len(seen) == 7  # stem, five block shapes, head
    assert region_graphs() == len(seen), (region_graphs(), sorted(seen))
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_graphs_holding_glif_enter_the_autograd_cache():
    """A compiled net holding GLIF's autograd Function is cached by AOTAutograd like any other graph (torch leaves
    such graphs out unless told; glif2's compiled callables tell it): compiled again after dynamo forgot it, the
    joint graph is a cache hit, not traced again."""
    x = torch.randn(3, 2, 3, 8, 8)
    compile_model(small_net())(x).sum().backward()
    torch._dynamo.reset()
    counters.clear()
    compile_model(small_net())(x).sum().backward()
    assert counters["aot_autograd"]["autograd_cache_hit"] >= 1, dict(counters["aot_autograd"])
    assert not counters["aot_autograd"]["autograd_cache_bypass"], dict(counters["aot_autograd"])


@pytest.mark.parametrize("scope", ["regional", "model"])
def test_every_graph_of_a_network_enters_the_autograd_cache(scope):
    """The digits net as train.py compiles it (lean memory, training), in both scopes: compiled again after dynamo
    forgot it, every graph is an AOTAutograd cache hit. Its head means over steps with einops.reduce and the lean
    unit's backward computes the GLIF's parameter gradients with it; torch does not list reduce as cacheable, and
    such a graph was traced and lowered again on every start (the whole model, under `model`)."""
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])

    def step():
        torch.manual_seed(0)
        model = glif2.create_model("glifnet_small", 10, 2)
        compile_scope(Objective(model, 0.0, None), scope)(x, y)[0].backward()

    step()
    torch._dynamo.reset()
    counters.clear()
    step()
    aot = dict(counters["aot_autograd"])
    assert aot.get("autograd_cache_hit", 0) >= 2 and aot["autograd_cache_hit"] == aot["total"], aot


def test_regions_uncompiled_runs_the_raw_forwards_and_restores():
    model = glif2.create_model("glifnet_small", 10, 2)
    compile_regions(model, "default")
    assert all("forward" in r.__dict__ for r in regions(model))
    with regions_uncompiled(model):
        assert not any("forward" in r.__dict__ for r in regions(model))
    assert all("forward" in r.__dict__ for r in regions(model))
    with pytest.raises(ValueError, match="regions"):
        compile_regions(small_net())


def test_compile_cache_round_trip_and_what_it_refuses(tmp_path):
    """save_compile_cache writes the process's artifacts behind a header; load_compile_cache loads them, and ignores
    with one warning (never raises) a damaged payload, a file made by another torch or device, and a file that is no
    cache at all."""
    torch.compile(lambda v: v.sin() * 3, fullgraph=True)(torch.randn(7))  # at least one artifact in this process
    cpu = torch.device("cpu")
    path = tmp_path / "compile_cache.bin"
    assert save_compile_cache(path, cpu)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically
    head, payload = path.read_bytes().split(b"\n", 1)
    header = json.loads(head)
    assert header["torch"] == torch.__version__ and header["bytes"] == len(payload)
    assert header["binaries"] and header["toolchain"]  # the sin kernel's C++ library at least
    assert header["artifacts"] + sum(size for _, size in header["binaries"]) == len(payload)
    assert load_compile_cache(path, cpu)

    def refused(blob: bytes, why: str) -> None:
        bad = tmp_path / "bad.bin"
        bad.write_bytes(blob)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not load_compile_cache(bad, cpu)
        assert len(caught) == 1 and "ignored" in str(caught[0].message) and why in str(caught[0].message), caught

    refused(head + b"\n" + payload[:-1] + bytes([payload[-1] ^ 1]), "damaged")
    refused(head + b"\n" + payload[: len(payload) // 2], "damaged")
    refused(json.dumps({**header, "torch": "1.0.0"}).encode() + b"\n" + payload, "torch '1.0.0'")
    refused(json.dumps({**header, "device": "NVIDIA H200"}).encode() + b"\n" + payload, "device 'NVIDIA H200'")
    refused(b"\x00\x01 not a cache", "")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not load_compile_cache(tmp_path / "missing.bin", cpu)
    assert len(caught) == 1


def saved_cache(tmp_path) -> tuple[Path, dict]:
    torch.compile(lambda v: v.cos() + 2, fullgraph=True)(torch.randn(5))
    path = tmp_path / "compile_cache.bin"
    assert save_compile_cache(path, torch.device("cpu"))
    return path, json.loads(path.read_bytes().split(b"\n", 1)[0])


def test_compile_cache_installs_kernel_libraries_where_the_toolchain_matches(tmp_path, monkeypatch):
    """The file carries the C++ libraries inductor built, and loading it writes them into an empty inductor cache
    byte for byte; from another compiler or C library, or under a path outside the cache, they are left out with a
    warning while the artifacts still load."""
    path, header = saved_cache(tmp_path)
    source = Path(torch._inductor.codecache.cache_dir())
    fresh = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(fresh))
    assert load_compile_cache(path, torch.device("cpu"))
    for rel, size in header["binaries"]:
        assert (fresh / rel).read_bytes() == (source / rel).read_bytes() and size > 0
    payload = path.read_bytes().split(b"\n", 1)[1]

    def libraries_ignored(changed: dict, why: str) -> None:
        shutil.rmtree(fresh)
        other = tmp_path / "other.bin"
        other.write_bytes(json.dumps({**header, **changed}).encode() + b"\n" + payload)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert load_compile_cache(other, torch.device("cpu"))  # the artifacts still load
        assert len(caught) == 1 and "kernel libraries ignored" in str(caught[0].message), caught
        assert why in str(caught[0].message)
        assert not list(fresh.rglob("*.so")) and not list(tmp_path.glob("*.so"))

    libraries_ignored({"toolchain": "0" * 16}, "another C++ compiler")
    escape = [["../../escape.so", header["binaries"][0][1]], *header["binaries"][1:]]
    libraries_ignored({"binaries": escape}, "escape.so")


def test_a_fresh_cache_compiles_nothing_from_a_saved_file(tmp_path):
    """A second process with an empty inductor cache, an empty temporary folder and the saved file runs the same
    function, compiled under glif2's settings, without building any C++ library (kernels and instruction-set probes
    come from the file) and without inductor's precompiled header: every library in its cache afterwards is one the
    file installed, untouched, and no header was built. A function the file does not hold then compiles with the
    header built first."""
    path, _ = saved_cache(tmp_path)
    fresh, temp = tmp_path / "inductor", tmp_path / "temp"
    temp.mkdir()
    script = f"""
import os, sys, torch
from pathlib import Path
from glif2.compile import scoped
from glif2.compile_cache import load_compile_cache
assert load_compile_cache({str(path)!r}, torch.device("cpu"))
root, temp = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]), Path({str(temp)!r})
installed = {{p: p.stat().st_ino for p in root.rglob("*.so")}}
x = torch.randn(5)
torch.testing.assert_close(scoped(torch.compile(lambda v: v.cos() + 2, fullgraph=True))(x), x.cos() + 2)
after = {{p: p.stat().st_ino for p in root.rglob("*.so")}}
assert installed and after == installed, sorted(str(p) for p in set(after) ^ set(installed))
assert not list(temp.rglob("*.gch")), "a precompiled header was built though no kernel was compiled"
torch.testing.assert_close(scoped(torch.compile(lambda v: v.tan() * 5, fullgraph=True))(x), x.tan() * 5)
assert len(list(temp.rglob("*.gch"))) == 1, "the kernel compiled without its precompiled header"
"""
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(fresh),
        "TMPDIR": str(temp),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
    }
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
