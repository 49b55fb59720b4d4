"""Surrogate spikes: strict Heaviside forward, the reference rectangle's exact window, backward = primitive' = the
window written independently in tests/reference.py, and the fused GLIF backward with every surrogate and width."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from reference import WINDOWS, naive_glif, surrogate_spike

from glif2 import GLIF, SURROGATES, spike
from glif2.compile import eager_kernels
from glif2.surrogate import get_surrogate

widths = st.floats(0.2, 3.0, allow_nan=False, allow_infinity=False)


def test_rect_window_edges_are_strict():
    z = torch.tensor([-0.6, -0.5, -0.49, 0.0, 0.49, 0.5, 0.6], requires_grad=True)
    out = spike(z)
    out.sum().backward()
    assert out.tolist() == [0, 0, 0, 0, 1, 1, 1]  # z = 0 gives no spike
    assert z.grad.tolist() == [0, 0, 1, 1, 1, 0, 0]


def test_rect_width_scales_window_and_height():
    z = torch.tensor([-1.0, -0.99, 0.99, 1.0], requires_grad=True)
    spike(z, "rect", 2.0).sum().backward()
    assert z.grad.tolist() == [0, 0.5, 0.5, 0]


def test_every_surrogate_has_an_independent_reference():
    assert set(SURROGATES) == set(WINDOWS)


@pytest.mark.parametrize("name", sorted(SURROGATES))
@given(r=st.lists(st.floats(-1.5, 1.5, allow_nan=False), min_size=1, max_size=40), width=widths)
@example(r=[-0.499, -0.47, 0.0, 0.46, 0.4999, 0.5, 0.98, 1.0], width=1.0)  # around the rectangle's and triangle's ends
def test_backward_equals_the_independent_window(name, r, width):
    z = torch.tensor(r, dtype=torch.float64) * width  # z in units of the width: the window's ends are always drawn
    a = z.clone().requires_grad_()
    out = spike(a, name, width)
    assert torch.equal(out, (z > 0).double())
    upstream = torch.linspace(0.5, 2.0, len(z), dtype=torch.float64)
    (out * upstream).sum().backward()
    torch.testing.assert_close(a.grad, upstream * WINDOWS[name](z, width), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", sorted(SURROGATES))
@given(z=st.lists(st.floats(-3, 3, allow_nan=False), min_size=1, max_size=20), width=widths)
def test_backward_equals_gradient_of_primitive(name, z, width):
    fn = get_surrogate(name)
    z = torch.tensor(z, dtype=torch.float64)
    if name == "rect":  # the primitive is not differentiable exactly on the two edges
        z = z[(z.abs() - width / 2).abs() > 1e-9]
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    spike(a, name, width).sum().backward()
    fn.primitive(b, width).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SURROGATES))
def test_window_has_unit_area_and_primitive_spans_zero_to_one(name):
    fn = get_surrogate(name)
    z = torch.linspace(-200, 200, 4_000_001, dtype=torch.float64)
    area = torch.trapezoid(fn.derivative(z, 0.7), z)
    assert area.item() == pytest.approx(1.0, abs=2e-3)
    assert fn.primitive(torch.tensor(-1e6, dtype=torch.float64), 0.7) == pytest.approx(0.0, abs=1e-6)
    assert fn.primitive(torch.tensor(1e6, dtype=torch.float64), 0.7) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", sorted(SURROGATES))
def test_compiles_without_graph_breaks(name):
    def f(z):
        return spike(z * 2.0, name, 0.5) * 3.0

    z = torch.randn(64)
    explain = torch._dynamo.explain(f)(z)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    f(a).sum().backward()
    torch.compile(f, fullgraph=True)(b).sum().backward()
    assert torch.equal(a.grad, b.grad)


CASES = [(name, width, True) for name in sorted(SURROGATES) for width in (0.5, 1.0, 1.7)]
CASES += [(name, 1.3, False) for name in sorted(SURROGATES)]  # compiled kernels: one width each (a recompile each)


@pytest.mark.parametrize("name, width, eager", CASES, ids=[f"{n}-{w}-{'eager' * e or 'compiled'}" for n, w, e in CASES])
def test_fused_glif_uses_the_chosen_surrogate(name, width, eager):
    m = GLIF(4, 3, surrogate=name, surrogate_width=width).double()
    with torch.no_grad():  # logits away from their defaults, so that every channel differs
        for p in m.parameters():
            p.add_(0.4 * torch.randn_like(p))
    x = (torch.randn(4, 2, 3, 5, dtype=torch.float64) * 0.6 + 0.3).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    upstream = torch.randn(4, 2, 3, 5, dtype=torch.float64)
    with eager_kernels(eager):
        out = m(x)
        (out * upstream).sum().backward()
    names = ("alpha", "beta", "gamma", "tau", "v_th", "leak", "v_reset")
    logits = {k: getattr(m, k).detach().clone().requires_grad_() for k in (*names, "conduct")}
    v = {k: torch.sigmoid(logits[k])[:, None] for k in names}
    ref, _ = naive_glif(
        xr, **v, conduct=torch.sigmoid(logits["conduct"])[..., None], spike=surrogate_spike(name, width)
    )
    (ref * upstream).sum().backward()
    assert torch.equal(out, ref) and 0.1 < out.mean() < 0.9
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-13)
    for k, logit in logits.items():
        torch.testing.assert_close(getattr(m, k).grad, logit.grad, rtol=1e-10, atol=1e-13, msg=k)
    assert xr.grad.count_nonzero() > xr.numel() // 4  # the window is wide enough to pass gradient


def test_unknown_surrogate():
    with pytest.raises(ValueError, match="unknown surrogate 'erf'"):
        spike(torch.zeros(1), "erf")
