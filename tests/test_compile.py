"""The fused kernels: zero graph breaks, compiled == eager, one loop nest per direction, composition with an
outer torch.compile of a whole network."""

import re

import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

from glif2 import GLIF, TimeMerged, tdBatchNorm
from glif2.neuron import GLIFCoeffs, fused_backward, fused_forward


def small_net(eager: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        TimeMerged(nn.Conv2d(3, 8, 3, padding=1, bias=False), tdBatchNorm(8)),
        GLIF(3, 8, eager=eager),
        TimeMerged(nn.Conv2d(8, 8, 3, padding=1, bias=False), tdBatchNorm(8, alpha=0.7)),
        GLIF(3, 8, eager=eager),
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
    a, b = GLIF(4, 5), GLIF(4, 5, eager=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 5, 6, 6) * 0.6 + 0.3
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    (a(xa) * g).sum().backward()
    (b(xb) * g).sum().backward()
    assert torch.equal(a(x), b(x))
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_outer_compile_of_a_network_matches_eager():
    eager_net, net = small_net(eager=True), small_net(eager=False)
    compiled = torch.compile(net, fullgraph=True, dynamic=False)
    x = torch.randn(3, 2, 3, 8, 8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_eager, out = eager_net(xa), compiled(xb)
    assert torch.equal(out, out_eager)
    out_eager.sum().backward()
    out.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    for (name, pa), pb in zip(eager_net.named_parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-4, msg=name)
