"""GLIF against the paper's equations: a float64 reference, reductions, worked vectors, SpikingJelly, errors."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import naive_glif

from glif2 import GLIF, GLIFState, glif_step, randomize_gates
from glif2.neuron import GATE_MODES

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
def neuron_and_input(draw):
    t = draw(st.integers(1, 5))
    channels = draw(st.sampled_from([None, 3]))
    variant = draw(st.sampled_from(["glif", "glif_f"]))
    gates = draw(st.sampled_from(GATE_MODES))
    seed = draw(st.integers(0, 2**16))
    trailing = draw(st.sampled_from([(), (2,), (2, 3)]))
    g = torch.Generator().manual_seed(seed)
    m = perturbed(GLIF(t, channels, variant=variant, gate_mode=gates, eager=True), seed)
    x = torch.randn((t, 2, 3, *trailing), generator=g) * 0.8 + 0.4
    return m, x


@given(neuron_and_input())
def test_spikes_are_binary_with_input_shape_and_dtype(case):
    m, x = case
    s = m(x)
    assert s.shape == x.shape and s.dtype == x.dtype
    assert set(s.unique().tolist()) <= {0.0, 1.0}


@given(neuron_and_input(), st.data())
def test_causality(case, data):
    m, x = case
    t = data.draw(st.integers(0, x.shape[0] - 1))
    y = x.clone()
    y[t + 1 :] = torch.randn_like(y[t + 1 :]) * 3
    assert torch.equal(m(x)[: t + 1], m(y)[: t + 1])


@given(neuron_and_input())
def test_forward_matches_float64_reference(case):
    m, x = case
    m, x = m.double(), x.double()
    expected, _ = run_reference(m, x)
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
def test_gate_extremes_reduce_to_lif_variants(gates, mode):
    m = perturbed(GLIF(6, 4, gate_mode=mode, eager=True), seed=3).double()
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
    m = perturbed(GLIF(T, 5, eager=True), seed=7).double()
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


def test_glif_f_after_a_spike():
    # GLIF_f: after a spike u_t = -leak + c_t x_t - v_reset (docs/neuron.md §2.2), whatever u_{t-1} was.
    m = perturbed(GLIF(3, 2, variant="glif_f", eager=True), seed=5).double()
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
    ("static", lambda: negate_gates(GLIF(4, gate_mode="static_hard")), 1.0, [0.9375, 1.375, 1.8125, 2.25],
     [1, 1, 1, 1]),
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
    assert [n for n, _ in cw.named_parameters()] == names
    assert [n for n, _ in f.named_parameters()] == ["gamma", "tau", "v_th", "leak", "v_reset", "conduct"]
    torch.testing.assert_close(cw.alpha, torch.full((8,), 0.2006707))  # logit(0.25 + 0.6 / 2), docs/neuron.md §3.2
    assert torch.sigmoid(GLIF(2, 1, gate_init=(1.0, 1.0, 1.0)).alpha).item() == pytest.approx(0.75)


def test_randomize_gates():
    torch.manual_seed(0)
    net = torch.nn.Sequential(GLIF(4, 64), GLIF(4), GLIF(4, 64, variant="glif_f"))
    before = net[2].gamma.clone()
    randomize_gates(net)
    for m in net[:2]:
        for name in ("alpha", "beta", "gamma"):
            v = getattr(m, name)
            assert v.abs().max() <= 0.1 and not torch.allclose(v, torch.zeros_like(v) + v.flatten()[0] + 1)
    assert net[0].alpha.std() > 0.03  # per channel, not one value
    assert torch.equal(net[2].gamma, before)  # GLIF_f keeps its init, as in the reference


# --- gradients --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, gates", [("glif", g) for g in GATE_MODES] + [("glif_f", "soft")])
@pytest.mark.parametrize("channels", [None, 4])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
def test_backward_matches_autograd_of_float64_reference(variant, gates, channels, eager):
    m = perturbed(GLIF(5, channels, variant=variant, gate_mode=gates, eager=eager), seed=11).double()
    ref = perturbed(GLIF(5, channels, variant=variant, gate_mode=gates), seed=11).double()
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(5, 3, 4, 3, 3, generator=g, dtype=torch.float64) * 0.6 + 0.3).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    weight = torch.randn(5, 3, 4, 3, 3, generator=g, dtype=torch.float64)  # a dense, uneven upstream gradient

    out = m(x)
    (out * weight).sum().backward()
    out_ref, _ = run_reference(ref, xr)
    (out_ref * weight).sum().backward()

    assert torch.equal(out, out_ref) and 0.05 < out.mean() < 0.8
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-12)
    nonzero = 0
    for (name, p), p_ref in zip(m.named_parameters(), ref.parameters(), strict=True):
        if p_ref.grad is None:  # static gates and GLIF_f's gamma take no gradient
            assert p.grad is None or not p.grad.any(), name
            continue
        nonzero += bool(p_ref.grad.any())  # hard gates at 1 legitimately zero some (e.g. leak when alpha = 1)
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-12, msg=name)
    assert nonzero >= 4


def test_reduced_precision_input_accumulates_in_float32():
    m = perturbed(GLIF(T, 4), seed=1)
    x = torch.randn(T, 2, 4, 5, 5) * 0.6 + 0.3
    for dtype in (torch.bfloat16, torch.float16):
        xl = x.to(dtype).requires_grad_()
        s = m(xl)
        assert s.dtype == dtype
        expected, _ = run_reference(m, xl.detach().float())  # the same rounded inputs, float32 membrane
        assert torch.equal(s.float(), expected)
        s.float().sum().backward()
        assert xl.grad.dtype == dtype and torch.isfinite(xl.grad).all() and xl.grad.abs().sum() > 0


def test_float64_parameters_promote_the_membrane():
    # The released CIFAR10-DVS gates are float64 (docs/neuron.md §9 Q13): the membrane is float64, spikes keep x's
    # dtype.
    m = perturbed(GLIF(T, 3), seed=4)
    for name in ("alpha", "beta", "gamma"):
        setattr(m, name, torch.nn.Parameter(getattr(m, name).detach().double()))
    x = torch.randn(T, 2, 3, 4, 4)
    s = m(x)
    assert s.dtype == torch.float32
    assert m.coefficients().decay.dtype == torch.float64


def test_rect_window_edges_through_the_fused_backward():
    # u_0 = c x - leak with c = leak = v_th = 0.5 exactly: x = 1, 3 put u_0 - v_th at -0.5, +0.5 (no gradient),
    # x = 1.02, 2.98 just inside (gradient c), x = 2 exactly on the threshold (no spike: strict).
    for eager in (True, False):
        m = GLIF(1, 1, variant="glif_f", eager=eager)
        with torch.no_grad():
            m.conduct.zero_(), m.leak.zero_(), m.v_th.zero_()
        x = torch.tensor([1.0, 1.02, 2.0, 2.98, 3.0, 0.5, 3.5]).reshape(1, 7, 1).requires_grad_()
        s = m(x)
        s.sum().backward()
        assert s.flatten().tolist() == [0, 0, 0, 1, 1, 0, 1]
        assert x.grad.flatten().tolist() == [0, 0.5, 0.5, 0.5, 0, 0, 0]


# --- SpikingJelly's GatedLIFNode as an independent oracle (docs/neuron.md §10) ------------------------------------

@pytest.mark.parametrize("channels", [None, 8])
def test_matches_spikingjelly_gated_lif(channels):
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
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
            torch.testing.assert_close(p.grad, dict(sj.named_parameters())[rename.get(name, name)].grad,
                                       rtol=1e-4, atol=1e-5, msg=name)


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


def test_all_gate_modes_and_variants_build():
    for variant, gates, channels in itertools.product(("glif", "glif_f"), GATE_MODES, (None, 2)):
        m = GLIF(2, channels, variant=variant, gate_mode=gates)
        assert m(torch.randn(2, 1, 2, 3)).shape == (2, 1, 2, 3)
