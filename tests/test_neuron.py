"""GLIF against the paper's equations: a float64 reference, reductions, worked vectors, SpikingJelly, errors."""

import copy
import itertools

import numpy as np
import pytest
import torch
from conftest import require
from hypothesis import given
from hypothesis import strategies as st
from reference import naive_glif

from glif2 import GLIF, GLIFState, glif_step, randomize_gates
from glif2.compile import eager_kernels
from glif2.neuron import GATE_MODES, GLIF_PARAMS

T = 4


def perturbed(m: GLIF, seed: int = 0, scale: float = 0.5) -> GLIF:
    """Random logits around the defaults, so that no two channels (or parameters) are alike."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def effective(m: GLIF, ndim: int) -> dict:
    """The reference's inputs: gates by the gate mode (written here independently of glif2), sigmoids of the rest,
    shaped to broadcast against one step `b c ...` of an input of rank `ndim`."""

    def gate(logit):
        if m.gate_mode.startswith("static"):
            logit = logit.detach()
        p = torch.sigmoid(logit)
        if m.gate_mode.endswith("hard"):
            p = p + ((p > 0.5).to(p.dtype) - p).detach()
        return p

    trail = ndim - 3  # trailing dims after c

    def shape(v):  # c -> c 1 1 (channel-wise); scalars stay scalars
        return v.reshape(v.shape + (1,) * trail) if m.channels is not None else v

    out = {name: shape(gate(getattr(m, name))) for name in ("alpha", "beta", "gamma") if hasattr(m, name)}
    if m.variant == "glif_f":
        out.update(alpha=None, beta=None, gamma=None)
    for name in ("tau", "v_th", "leak", "v_reset"):
        out[name] = shape(torch.sigmoid(getattr(m, name)))
    c = torch.sigmoid(m.conduct)
    out["conduct"] = c.reshape(c.shape + (1,) * trail) if m.channels is not None else c.reshape(-1, *(1,) * (ndim - 1))
    return out


def run_reference(m: GLIF, x: torch.Tensor):
    return naive_glif(x, **effective(m, x.dim()), variant=m.variant)


def membranes(m: GLIF, x: torch.Tensor) -> torch.Tensor:
    """u_t from glif2's own pure step (used for the worked vectors)."""
    p = m.coefficients()
    flat = x.reshape(x.shape[0], x.shape[1], -1 if m.channels is None else x.shape[2], 1)
    state = GLIFState(torch.zeros_like(flat[0]), torch.zeros_like(flat[0]))
    us = []
    for t in range(x.shape[0]):
        _, state = glif_step(flat[t], p.gain[t], state, p)
        us.append(state.u.reshape(x.shape[1:]))
    return torch.stack(us)


# --- properties -------------------------------------------------------------------------------------------------


@st.composite
def neuron_and_input(draw, min_t: int = 1):
    """A neuron of any variant, gate mode and parameter spread, eager or compiled, and an input for it. Compiled
    draws keep to a few shapes: each new shape is a new kernel compilation (seconds)."""
    eager = draw(st.booleans())
    channels = draw(st.sampled_from([None, 1, 2, 3, 5]) if eager else st.sampled_from([None, 3]))
    c = channels or draw(st.integers(1, 4))
    if eager:
        t, b = draw(st.integers(min_t, 6)), draw(st.integers(1, 3))
        trailing = draw(st.sampled_from([(), (1,), (2,), (2, 3), (3, 1, 2)]))
    else:
        t, b, c, trailing = max(min_t, 3), 2, 3, (2, 3)
    variant = draw(st.sampled_from(["glif", "glif_f"]))
    gates = draw(st.sampled_from(GATE_MODES))
    params = draw(st.sampled_from(["learned", "static"]))
    spread = draw(st.floats(0.0, 3.0))  # logits this far (std) from the defaults
    scale, offset = draw(st.floats(0.1, 3.0)), draw(st.floats(-1.0, 1.5))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    m = GLIF(t, channels, variant=variant, gate_mode=gates, params=params)
    m = perturbed(m, seed, spread)
    x = torch.randn((t, b, c, *trailing), generator=g) * scale + offset
    return m, x, eager


@given(neuron_and_input())
def test_spikes_are_binary_with_input_shape_and_dtype(case):
    m, x, eager = case
    with eager_kernels(eager):
        s = m(x)
    assert s.shape == x.shape and s.dtype == x.dtype
    assert set(s.unique().tolist()) <= {0.0, 1.0}


@given(neuron_and_input(min_t=2), st.data())
def test_causality(case, data):
    m, x, eager = case
    t = data.draw(st.integers(0, x.shape[0] - 2))  # at least one later step is changed
    y = x.clone()
    y[t + 1 :] = torch.randn_like(y[t + 1 :]) * 3 + 1
    with eager_kernels(eager):
        assert torch.equal(m(x)[: t + 1], m(y)[: t + 1])


@given(neuron_and_input())
def test_forward_matches_float64_reference(case):
    m, x, eager = case
    m, x = m.double(), x.double()
    expected, _ = run_reference(m, x)
    with eager_kernels(eager):
        assert torch.equal(m(x), expected)


def test_no_state_between_calls():
    m = perturbed(GLIF(T, 3))
    x = torch.randn(T, 2, 3, 4, 4)
    first = m(x)
    m(torch.randn(T, 2, 3, 4, 4) * 5)
    assert torch.equal(m(x), first)


# --- gate extremes (docs/neuron.md §7.1) ---------------------------------------------------------------------------

# (alpha, beta, gamma) -> one step of the named LIF variant, written out by hand.
REDUCTIONS = {
    (1, 0, 1): lambda u, o, x, c, p: p["tau"] * u * (1 - o) + x,  # LIF, hard reset (STBP-tdBN)
    (1, 0, 0): lambda u, o, x, c, p: p["tau"] * u + x - p["v_reset"] * o,  # LIF, soft reset
    (0, 0, 1): lambda u, o, x, c, p: u * (1 - o) - p["leak"] + x,  # linear-leak IF, hard reset
    (0, 0, 0): lambda u, o, x, c, p: u - p["leak"] + x - p["v_reset"] * o,  # linear-leak IF, soft reset
    (1, 1, 1): lambda u, o, x, c, p: p["tau"] * u * (1 - o) + c * x,
    (1, 1, 0): lambda u, o, x, c, p: p["tau"] * u + c * x - p["v_reset"] * o,
    (0, 1, 1): lambda u, o, x, c, p: u * (1 - o) - p["leak"] + c * x,
    (0, 1, 0): lambda u, o, x, c, p: u - p["leak"] + c * x - p["v_reset"] * o,
}


@pytest.mark.parametrize("gates", sorted(REDUCTIONS))
@pytest.mark.parametrize("mode", ["static_hard", "hard", "soft"])
def test_gate_extremes_reduce_to_lif_variants(gates, mode, uncompiled):
    m = perturbed(GLIF(6, 4, gate_mode=mode), seed=3).double()
    with torch.no_grad():  # hard modes binarise +-3; soft mode needs +-40 to be exactly 0/1 in float64
        for name, on in zip(("alpha", "beta", "gamma"), gates, strict=True):
            getattr(m, name).fill_((1 if on else -1) * (3.0 if "hard" in mode else 40.0))
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64) * 0.7 + 0.5
    p = {k: torch.sigmoid(getattr(m, k))[:, None] for k in ("tau", "v_th", "leak", "v_reset")}
    c = torch.sigmoid(m.conduct)[..., None]
    u = o = torch.zeros_like(x[0])
    spikes = []
    for t in range(6):
        u = REDUCTIONS[gates](u, o, x[t], c[t], p)
        o = (u > p["v_th"]).double()
        spikes.append(o)
    assert torch.stack(spikes).sum() > 0
    torch.testing.assert_close(m(x), torch.stack(spikes), rtol=0, atol=0)


@pytest.mark.parametrize("gate", ["alpha", "beta", "gamma"])
def test_one_step_is_affine_in_each_gate(gate):
    m = perturbed(GLIF(T, 5), seed=7).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    u_prev = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    state = GLIFState(u_prev, (torch.rand(2, 5, 6, generator=g) > 0.5).double())

    def step(logit):
        with torch.no_grad():
            getattr(m, gate).copy_(logit)
        p = m.coefficients()
        return glif_step(x, p.gain[1], state, p)[1].u

    logit = torch.randn(5, generator=g, dtype=torch.float64)
    a = torch.sigmoid(logit)[:, None]
    mixed = step(logit)
    on, off = step(torch.full((5,), 40.0, dtype=torch.float64)), step(torch.full((5,), -40.0, dtype=torch.float64))
    torch.testing.assert_close(mixed, a * on + (1 - a) * off, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(on, off)


def test_glif_f_after_a_spike(uncompiled):
    # GLIF_f: after a spike u_t = -leak + c_t x_t - v_reset (docs/neuron.md §2.2), whatever u_{t-1} was.
    m = perturbed(GLIF(3, 2, variant="glif_f"), seed=5).double()
    assert not hasattr(m, "alpha") and not hasattr(m, "beta") and m.gamma.shape == (2,)
    x = torch.tensor([5.0, 0.3, 0.2], dtype=torch.float64)[:, None, None].expand(3, 1, 2).contiguous()
    u = membranes(m, x)
    v = {k: torch.sigmoid(getattr(m, k)) for k in ("leak", "v_reset")}
    c = torch.sigmoid(m.conduct)
    assert m(x)[0].eq(1).all()
    torch.testing.assert_close(u[1, 0], -v["leak"] + c[1] * 0.3 - v["v_reset"], rtol=1e-12, atol=1e-12)


# --- worked vectors (docs/neuron.md §7.2) --------------------------------------------------------------------------


def negate_gates(m: GLIF) -> GLIF:
    """The reference layer-wise class stores -logit for its gates (docs/neuron.md §9 Q3); this reproduces its init."""
    with torch.no_grad():
        for name in ("alpha", "beta", "gamma"):
            getattr(m, name).neg_()
    return m


WORKED = [
    ("cw", lambda: GLIF(4, 1), 1.0, [0.646875, 0.5928925, 0.5786209, 0.5748478], [1, 1, 1, 1]),
    ("cw", lambda: GLIF(4, 1), 0.3, [0.174375, 0.2768203, 0.3370069, 0.3723665], [0, 0, 0, 0]),
    ("layer", lambda: negate_gates(GLIF(4)), 1.0, [0.790625, 0.8037089, 0.8084764, 0.8102137], [1, 1, 1, 1]),
    ("glif_f", lambda: GLIF(4, 1, variant="glif_f"), 1.0, [0.4375, 0.546875, -0.0625, 0.421875], [0, 1, 0, 0]),
    ("hard", lambda: GLIF(4, 1, gate_mode="hard"), 1.0, [0.5, 0.625, 0.5, 0.625], [0, 1, 0, 1]),
    (
        "static",
        lambda: negate_gates(GLIF(4, gate_mode="static_hard")),
        1.0,
        [0.9375, 1.375, 1.8125, 2.25],
        [1, 1, 1, 1],
    ),
]


@pytest.mark.parametrize("name, build, x, u, spikes", WORKED, ids=[w[0] + str(w[2]) for w in WORKED])
def test_worked_vectors(name, build, x, u, spikes):
    m = build()
    inp = torch.full((4, 1, 1, 1, 1), x)
    torch.testing.assert_close(membranes(m, inp).flatten(), torch.tensor(u), rtol=0, atol=1e-6)
    assert m(inp).flatten().tolist() == spikes


def test_default_init_values():
    cw, lw, f = GLIF(6, 8), GLIF(6), GLIF(6, 8, variant="glif_f")
    expected = {"alpha": 0.55, "beta": 0.65, "gamma": 0.55, "tau": 0.25, "v_th": 0.5, "leak": 0.0625, "v_reset": 0.5}
    for m in (cw, lw):
        v = m.effective_values()
        for name, value in expected.items():
            torch.testing.assert_close(v[name], torch.full_like(v[name], value))
    assert cw.conduct.shape == (6, 8) and lw.conduct.shape == (6,) and lw.alpha.shape == ()
    names = ["alpha", "beta", "gamma", "tau", "v_th", "leak", "v_reset", "conduct"]
    assert [n for n, _ in cw.named_parameters()] == names == list(GLIF_PARAMS) == list(cw.effective_values())
    assert [n for n, _ in f.named_parameters()] == ["gamma", "tau", "v_th", "leak", "v_reset", "conduct"]
    torch.testing.assert_close(cw.alpha, torch.full((8,), 0.2006707))  # logit(0.25 + 0.6 / 2), docs/neuron.md §3.2
    assert torch.sigmoid(GLIF(2, 1, gate_init=(1.0, 1.0, 1.0)).alpha).item() == pytest.approx(0.75)


def test_randomize_gates():
    net = torch.nn.Sequential(GLIF(4, 64), GLIF(4), GLIF(4, 64, variant="glif_f"), GLIF(4, 64, gate_mode="static_soft"))
    before = net[2].gamma.clone()
    randomize_gates(net)
    drawn = []
    for m in (net[0], net[3]):  # channel-wise: every channel its own draw from U(-0.1, 0.1)
        for name in ("alpha", "beta", "gamma"):
            v = getattr(m, name)
            assert v.dtype == torch.float32 and v.requires_grad == (m.gate_mode == "soft"), name
            assert v.abs().max() <= 0.1 and v.unique().numel() == 64, name
            # the spread of U(-0.1, 0.1) over 64 draws: std 0.058, both ends reached
            assert 0.04 < v.std() < 0.075 and v.min() < -0.07 and v.max() > 0.07, (name, v.std(), v.min(), v.max())
            drawn.append(v.detach().clone())
    assert all(not torch.equal(a, b) for a, b in itertools.combinations(drawn, 2))  # independent draws
    layer = [getattr(net[1], name).item() for name in ("alpha", "beta", "gamma")]
    assert all(abs(v) <= 0.1 for v in layer) and len(set(layer)) == 3  # redrawn (the init logits are >= 0.2)
    assert torch.equal(net[2].gamma, before)  # GLIF_f keeps its init, as in the reference

    wide = torch.nn.Sequential(GLIF(4, 64))
    names = [n for n, _ in wide.named_parameters()]
    randomize_gates(wide, low=-2.0, high=3.0, dtype=torch.float64)  # the CIFAR10-DVS gates: new float64 parameters
    assert [n for n, _ in wide.named_parameters()] == names
    for name in ("alpha", "beta", "gamma"):
        v = getattr(wide[0], name)
        assert isinstance(v, torch.nn.Parameter) and v.dtype == torch.float64 and v.requires_grad
        assert -2.0 <= v.min() < -1.5 and 2.5 < v.max() <= 3.0 and v.unique().numel() == 64


# --- gradients --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, gates", [("glif", g) for g in GATE_MODES] + [("glif_f", "soft")])
@pytest.mark.parametrize("channels", [None, 4])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
def test_backward_matches_autograd_of_float64_reference(variant, gates, channels, eager):
    m = perturbed(GLIF(5, channels, variant=variant, gate_mode=gates), seed=11).double()
    ref = perturbed(GLIF(5, channels, variant=variant, gate_mode=gates), seed=11).double()
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(5, 3, 4, 3, 3, generator=g, dtype=torch.float64) * 0.6 + 0.3).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    weight = torch.randn(5, 3, 4, 3, 3, generator=g, dtype=torch.float64)  # a dense, uneven upstream gradient

    with eager_kernels(eager):
        out = m(x)
        (out * weight).sum().backward()
    out_ref, _ = run_reference(ref, xr)
    (out_ref * weight).sum().backward()

    assert torch.equal(out, out_ref) and 0.05 < out.mean() < 0.8
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-13)
    nonzero = 0
    for (name, p), p_ref in zip(m.named_parameters(), ref.parameters(), strict=True):
        if p_ref.grad is None:  # static gates and GLIF_f's gamma take no gradient
            assert p.grad is None or not p.grad.any(), name
            continue
        nonzero += bool(p_ref.grad.any())  # hard gates at 1 legitimately zero some (e.g. leak when alpha = 1)
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-13, msg=name)
    assert nonzero >= 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
def test_reduced_precision_matches_the_float64_reference(dtype, eager):
    # bf16/fp16 inputs: the membrane runs in float32, spikes and dL/dx come back in the input's dtype.
    m = perturbed(GLIF(T, 4), seed=1)
    ref = perturbed(GLIF(T, 4), seed=1).double()
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(T, 2, 4, 5, 5, generator=g) * 0.6 + 0.3).to(dtype).requires_grad_()
    xr = x.detach().double().requires_grad_()  # the same rounded inputs, in float64
    upstream = torch.randn(x.shape, generator=g).to(dtype)  # what reaches the spikes is in their dtype anyway

    with eager_kernels(eager):
        s = m(x)
        (s * upstream).sum().backward()
    expected, _ = run_reference(ref, xr)
    (expected * upstream.double()).sum().backward()

    assert s.dtype == dtype and x.grad.dtype == dtype
    assert torch.equal(s.double(), expected) and 0.1 < expected.mean() < 0.9
    # dL/dx is computed in float32 and rounded once to the input's dtype: within one rounding of it
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=eps, atol=1e-6)
    assert xr.grad.count_nonzero() > xr.numel() // 4
    for (name, p), p_ref in zip(m.named_parameters(), ref.parameters(), strict=True):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad.double(), p_ref.grad, rtol=2e-5, atol=1e-6, msg=name)  # float32 sums


def near_threshold_input(m: GLIF, steps: int = 40) -> torch.Tensor:
    """float32 `2 b c` input (b = 2 steps) whose first-step membrane lies within a few float32 ulps of the threshold:
    per channel, the consecutive float32 values around the input that would hit it exactly; then a random step."""
    v = {k: val.detach().double() for k, val in m.effective_values().items()}
    gain = 1 - v["beta"] * (1 - v["conduct"][0])
    hit = (v["v_th"] + (1 - v["alpha"]) * v["leak"]) / gain  # u_0 = gain x_0 - drift = v_th, per channel
    columns = []
    for h in hit.tolist():
        x = np.float32(h)
        for _ in range(steps):
            x = np.nextafter(x, np.float32(-np.inf))
        column = []
        for _ in range(2 * steps):
            column.append(x)
            x = np.nextafter(x, np.float32(np.inf))
        columns.append(column)
    first = torch.from_numpy(np.array(columns, dtype=np.float32)).T  # b c
    return torch.stack([first, torch.randn(first.shape) * 0.5 + 0.3])


def test_float64_gates_give_a_float64_membrane():
    # The released CIFAR10-DVS gates are float64 (docs/neuron.md §9 Q13): the membrane is float64, spikes and dL/dx
    # keep x's dtype. The input puts u_0 within float32 rounding of v_th, where a float32 membrane decides otherwise.
    m = perturbed(GLIF(2, 3), seed=4)
    for name in ("alpha", "beta", "gamma"):
        setattr(m, name, torch.nn.Parameter(getattr(m, name).detach().double()))
    ref = copy.deepcopy(m)
    x = near_threshold_input(m).requires_grad_()
    xr = x.detach().double().requires_grad_()
    upstream = torch.randn(x.shape)

    s = m(x)
    (s * upstream).sum().backward()
    expected, _ = run_reference(ref, xr)  # float64 membrane (float32 sigmoids of the float32 logits, as glif2)
    (expected * upstream.double()).sum().backward()
    in_float32, _ = run_reference(copy.deepcopy(m).float(), x.detach())

    assert s.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert torch.equal(s.double(), expected)
    assert not torch.equal(in_float32.double(), expected)  # the input does tell a float32 membrane apart
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=torch.finfo(torch.float32).eps, atol=1e-12)
    assert x.grad[0].count_nonzero() == x[0].numel()  # every first step sits in the surrogate window
    for (name, p), p_ref in zip(m.named_parameters(), ref.parameters(), strict=True):
        assert p.grad.dtype == p.dtype, name
        rtol = 1e-10 if p.dtype == torch.float64 else 1e-5  # the float32 parameters' sigmoids run in float32
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=rtol, atol=1e-12, msg=name)


def test_rect_window_edges_through_the_fused_backward():
    # u_0 = c x - leak with c = leak = v_th = 0.5 exactly: x = 1, 3 put u_0 - v_th at -0.5, +0.5 (no gradient),
    # x = 1.02, 2.98 just inside (gradient c), x = 2 exactly on the threshold (no spike: strict).
    for eager in (True, False):
        m = GLIF(1, 1, variant="glif_f")
        with torch.no_grad():
            m.conduct.zero_(), m.leak.zero_(), m.v_th.zero_()
        x = torch.tensor([1.0, 1.02, 2.0, 2.98, 3.0, 0.5, 3.5]).reshape(1, 7, 1).requires_grad_()
        with eager_kernels(eager):
            s = m(x)
            s.sum().backward()
        assert s.flatten().tolist() == [0, 0, 0, 1, 1, 0, 1]
        assert x.grad.flatten().tolist() == [0, 0.5, 0.5, 0.5, 0, 0, 0]


# --- SpikingJelly's GatedLIFNode as an independent oracle (docs/neuron.md §10) ------------------------------------


@pytest.mark.parametrize("channels", [None, 8])
def test_matches_spikingjelly_gated_lif(channels):
    sj_neuron = require("spikingjelly.activation_based.neuron")
    from spikingjelly.activation_based import functional, surrogate

    torch.manual_seed(0)
    m = perturbed(GLIF(4, channels), seed=9)
    randomize_gates(m)
    sj = sj_neuron.GatedLIFNode(4, channels, surrogate_function=surrogate.Rect(alpha=1.0))
    rename = {"v_th": "v_threshold", "leak": "linear_decay", "v_reset": "v_subreset"}
    sj.load_state_dict({rename.get(k, k): v for k, v in m.state_dict().items()})

    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(4, 6, 8, 5, 5, generator=g) * 0.6 + 0.3
        weight = torch.randn(x.shape, generator=g)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        m.zero_grad(), sj.zero_grad()
        functional.reset_net(sj)  # its membrane persists between calls; ours starts from 0 by design
        out, out_sj = m(xa), sj(xb)
        assert torch.equal(out, out_sj)
        (out * weight).sum().backward()
        (out_sj * weight).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
        for name, p in m.named_parameters():
            torch.testing.assert_close(
                p.grad, dict(sj.named_parameters())[rename.get(name, name)].grad, rtol=1e-4, atol=1e-5, msg=name
            )


# --- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m, x, match",
    [
        (GLIF(4, 3), torch.randn(3, 2, 3, 4, 4), "built for T=4"),
        (GLIF(4, 3), torch.randn(4, 2, 5, 4, 4), "has 3 channels"),
        (GLIF(4, 3), torch.randn(4, 3), "rank >= 3"),
        (GLIF(4), torch.ones(4, 2, 3, dtype=torch.int64), "float tensor"),
    ],
)
def test_bad_input_errors(m, x, match):
    with pytest.raises(ValueError, match=match):
        m(x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(T=0), "positive int"),
        (dict(T=4, channels=0), "channels"),
        (dict(T=4, variant="lif"), "variant"),
        (dict(T=4, gate_mode="gumbel"), "gate_mode"),
        (dict(T=4, gate_init=(0.6, 0.8, 2.0)), "gate_init"),
        (dict(T=4, tau=1.0), "tau"),
        (dict(T=4, surrogate="erf"), "surrogate"),
    ],
)
def test_bad_construction_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GLIF(**kwargs)


def test_deprecated_gate_keywords_still_work_for_one_release():
    """gates= / gate= (the names before gate_mode= / gate_init=) and GLIF.values() keep working with a
    DeprecationWarning; an alias next to its new name is refused, also when the new name is given a value."""
    with pytest.warns(DeprecationWarning) as caught:
        old = GLIF(T, 3, gates="hard", gate=(0.1, 0.2, 0.3))
    assert sorted(str(w.message) for w in caught) == [
        "the GLIF option gate= is deprecated; use gate_init=",
        "the GLIF option gates= is deprecated; use gate_mode=",
    ]
    new = GLIF(T, 3, gate_mode="hard", gate_init=(0.1, 0.2, 0.3))
    assert old.gate_mode == "hard"
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values(), strict=True))
    with pytest.warns(DeprecationWarning, match="use GLIF.effective_values"):
        values = old.values()
    assert {k: v.tolist() for k, v in values.items()} == {k: v.tolist() for k, v in new.effective_values().items()}
    for both in (
        dict(gates="hard", gate_mode="hard"),
        dict(gates="soft", gate_mode="hard"),
        dict(gate=(0.1, 0.2, 0.3), gate_init=(0.2, 0.2, 0.2)),
    ):
        with pytest.raises(TypeError, match="only .* is its deprecated alias"):
            GLIF(T, 3, **both)


def test_all_gate_modes_and_variants_build():
    for variant, gates, channels in itertools.product(("glif", "glif_f"), GATE_MODES, (None, 2)):
        m = GLIF(2, channels, variant=variant, gate_mode=gates)
        assert m(torch.randn(2, 1, 2, 3)).shape == (2, 1, 2, 3)


def test_static_params_stay_fixed_and_keep_the_checkpoint_layout():
    """params="static" (the authors' --static-param): tau, v_th, leak, v_reset and conduct keep their initial values
    through training (no gradient, nothing for an optimizer or DDP to update), the gates still learn, and the state
    dict has the same keys as the learned neuron's, so either loads the other's checkpoints."""
    learned, static = GLIF(T, 3), GLIF(T, 3, params="static")
    assert list(static.state_dict()) == list(learned.state_dict())
    fixed = ("tau", "v_th", "leak", "v_reset", "conduct")
    assert all(not getattr(static, n).requires_grad for n in fixed) and static.alpha.requires_grad
    before = {k: v.clone() for k, v in static.state_dict().items()}
    optimizer = torch.optim.SGD(static.parameters(), lr=1.0, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        static(torch.randn(T, 2, 3, 4, 4) + 0.5).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = static.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in fixed)
    assert not torch.equal(after["alpha"], before["alpha"])
    static.load_state_dict(learned.state_dict())  # the same layout both ways
