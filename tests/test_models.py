"""glif2.models: every registered network (shape, finite logits, a gradient for every parameter, the spec's
parameter counts and key layouts), the neuron options passed through, and the analysis helpers."""

import subprocess
import sys

import pytest
import torch
from spec_layouts import count_params, layout

import glif2
from glif2.analysis import FiringRates, firing_rates, glif_layers
from glif2.layers import tdBatchNorm
from glif2.models.resnet import SQRT1_2
from glif2.released import REFERENCE_KEYS

pytestmark = pytest.mark.usefixtures("uncompiled")  # the fused kernels are not what these tests are about

# name -> (classes, small input `b ...` for a CPU smoke run, extra options)
SMOKE = {
    "resnet18": (10, (2, 3, 16, 16), {}),
    "resnet19": (100, (2, 3, 16, 16), {}),
    "cifarnet": (10, (2, 3, 16, 16), {"input_size": 16}),
    "resnet34": (1000, (1, 3, 32, 32), {}),
    "resnet18ms": (1000, (1, 3, 32, 32), {"bn": "plain"}),
    "resnet34ms": (1000, (1, 3, 32, 32), {}),
    "sew7b_wide": (10, (2, 2, 2, 16, 16), {"input_size": 16}),
    "glifnet_small": (10, (4, 1, 8, 8), {}),
}

# docs/networks.md §6
SPEC_COUNTS = [
    ("resnet18", 10, 6, 11_355_264),
    ("resnet18", 100, 6, 11_272_832),
    ("resnet19", 10, 6, 12_758_784),
    ("resnet19", 100, 6, 12_676_352),
    ("resnet18ms", 1000, 6, 11_739_584),
    ("resnet34", 1000, 6, 21_905_536),
    ("resnet34ms", 1000, 6, 21_899_712),
    ("cifarnet", 10, 6, 45_035_520),
    ("sew7b_wide", 10, 16, 1_236_298),
]


def test_registry_lists_every_model():
    # A fresh interpreter: other test modules register probe models of their own into this process's registry.
    out = subprocess.run(
        [sys.executable, "-c", "import glif2; print(*glif2.list_models())"], capture_output=True, text=True, check=True
    ).stdout
    assert set(out.split()) == set(SMOKE)
    with pytest.raises(ValueError, match="unknown model"):
        glif2.create_model("resnet50", 10, 4)


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_forward_backward(name):
    K, shape, opts = SMOKE[name]
    T = 2
    torch.manual_seed(0)
    model = glif2.create_model(name, K, T, **opts)
    x = torch.randn(shape) if name != "sew7b_wide" else torch.rand(shape).round()  # DVS: b t 2 h w event counts
    logits = model(x)
    assert logits.shape == (shape[0], K)
    assert torch.isfinite(logits).all()
    # the reference's head starts at N(0, 0.01): scale the loss so some gradient reaches every layer
    (logits.square().sum() + logits.sum()).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name, K, T, expected", SPEC_COUNTS, ids=[f"{c[0]}-{c[1]}" for c in SPEC_COUNTS])
def test_parameter_counts_and_key_layout(name, K, T, expected):
    model = glif2.create_model(name, K, T, **({"bn": "plain"} if name == "resnet18ms" else {}))
    assert sum(p.numel() for p in model.parameters()) == expected
    spec = layout(name, K, T, **({"td": False} if name == "resnet18ms" else {}))
    assert count_params(spec) == expected
    ours = model.state_dict()
    mapped = {
        ".".join([*k.split(".")[:-1], REFERENCE_KEYS.get(k.split(".")[-1], k.split(".")[-1])]): shape
        for k, (shape, _) in spec.items()
    }
    assert list(ours) == list(mapped)  # same names, same registration order
    assert all(tuple(ours[k].shape) == tuple(s) for k, s in mapped.items())


def test_glif_and_bn_counts_and_alphas():
    model = glif2.create_model("resnet18", 10, 2)
    assert len(list(glif_layers(model))) == 17
    bns = [m for m in model.modules() if isinstance(m, tdBatchNorm)]
    assert len(bns) == 25
    block = model.features[2]
    assert block.body[0][1].alpha == 1.0 and block.body[2][1].alpha == pytest.approx(SQRT1_2)
    assert block.downsample[0][1].alpha == pytest.approx(SQRT1_2)
    assert model.features[0].downsample[0].alpha == pytest.approx(SQRT1_2)
    assert [b.body[0][0].stride for b in model.features] == [(1, 1)] * 4 + [(2, 2), (1, 1), (2, 2), (1, 1)]
    stem = glif2.create_model("resnet34", 1000, 2).conv1[0][0]
    assert (stem.kernel_size, stem.stride, stem.padding) == ((7, 7), (2, 2), (1, 1))
    assert all(m.bias is None for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


def test_neuron_options_pass_through():
    lw = glif2.create_model("resnet19", 10, 3, channel_wise=False, gate_mode="static_hard", tau=0.5)
    glifs = [m for _, m in glif_layers(lw)]
    assert all(m.channels is None and m.gate_mode == "static_hard" and m.conduct.shape == (3,) for m in glifs)
    assert torch.allclose(glifs[0].effective_values()["tau"], torch.tensor(0.5))
    f = glif2.create_model("resnet18", 100, 2, variant="glif_f")
    assert not hasattr(dict(glif_layers(f))["conv1.1"], "alpha")
    assert len(f.lastave) == 1  # the GLIF_f and layer-wise CIFAR nets always have one linear
    assert len(glif2.create_model("resnet18", 10, 2, channel_wise=False).lastave) == 1
    assert len(glif2.create_model("resnet18", 10, 2).lastave) == 2
    assert len(glif2.create_model("resnet18", 10, 2, head="linear").lastave) == 1
    plain = glif2.create_model("resnet34", 1000, 2, bn="plain")
    assert not any(k.endswith("v_th") and "conv1.0.1" in k for k in plain.state_dict())
    with pytest.raises(ValueError, match="bn="):
        glif2.create_model("resnet19", 10, 2, bn="group")
    with pytest.raises(ValueError, match="gate_mode="):
        glif2.create_model("resnet19", 10, 2, gate_mode="soft_mode")
    with pytest.raises(ValueError, match="connect="):
        glif2.create_model("sew7b_wide", 10, 2, connect="OR")


def test_dvs_neuron_init():
    model = glif2.create_model("sew7b_wide", 10, 16)
    g = dict(glif_layers(model))["conv.0.1"]
    v = g.effective_values()
    assert g.alpha.dtype == torch.float64 and g.alpha.abs().max() <= 0.1 and g.alpha.std() > 0
    assert torch.allclose(v["tau"], torch.tensor(0.5))
    assert torch.allclose(v["v_th"], torch.tensor(0.99999)) and torch.allclose(v["v_reset"], torch.tensor(0.99999))
    assert torch.allclose(v["leak"], torch.tensor(0.0312497)) and torch.allclose(v["conduct"], torch.tensor(0.9))
    assert not any(isinstance(m, tdBatchNorm) for m in model.modules())
    assert model.out.bias is not None
    det = glif2.create_model("sew7b_wide", 10, 2, random_gates=False, gate_dtype="float32")
    assert dict(glif_layers(det))["conv.0.1"].alpha.dtype == torch.float32


@pytest.mark.parametrize("connect", ["ADD", "AND", "IAND"])
def test_sew_connect_functions(connect):
    model = glif2.create_model("sew7b_wide", 10, 2, input_size=16, connect=connect).eval()
    x = torch.rand(1, 2, 2, 16, 16).round()
    assert torch.isfinite(model(x)).all()
    blk = model.conv[1]
    s = (torch.rand(2, 1, 64, 4, 4) > 0.5).float()
    a = blk.conv(s)
    expected = {"ADD": a + s, "AND": a * s, "IAND": s * (1 - a)}[connect]
    assert torch.equal(blk(s), expected)


def test_small_inputs_and_in_channels():
    for name, opts in [("resnet18", {}), ("resnet19", {}), ("cifarnet", {"input_size": 8}), ("glifnet_small", {})]:
        model = glif2.create_model(name, 10, 2, in_channels=1, **opts).eval()
        assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def captured(module: torch.nn.Module, run) -> torch.Tensor:
    """The output of `module` during `run()` (a forward hook, removed afterwards)."""
    out = []
    handle = module.register_forward_hook(lambda m, i, o: out.append(o.detach()))
    try:
        run()
    finally:
        handle.remove()
    (value,) = out
    return value


def test_per_step_logits_and_their_mean():
    # The head by hand, per step, from the last block's output: pool over space, then the head's matrices.
    torch.manual_seed(0)
    # batch statistics (fresh BN fires in training); memory off: the hooks below need the modules' own forward
    model = glif2.create_model("resnet19", 10, 3, memory="off").double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    feats = captured(model.features[-1], lambda: model(x))  # t b c h w
    w1, w2 = model.lastave[0].weight, model.lastave[1].weight
    by_hand = torch.stack([feats[t].mean(dim=(2, 3)) @ w1.T @ w2.T for t in range(3)])  # t b k
    assert not torch.allclose(by_hand[0], by_hand[1])  # the steps differ, so the mean is a real check
    torch.testing.assert_close(model.forward_steps(x), by_hand, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x), (by_hand[0] + by_hand[1] + by_hand[2]) / 3, rtol=1e-12, atol=1e-12)

    # The DVS net applies its linear head to the mean over t of the flattened features (as the reference).
    dvs = glif2.create_model("sew7b_wide", 10, 2, input_size=16).double().eval()
    frames = torch.rand(2, 2, 2, 16, 16, dtype=torch.float64).round()
    f = captured(dvs.conv, lambda: dvs(frames)).flatten(2)  # t b (c h w)
    w, bias = dvs.out.weight, dvs.out.bias
    torch.testing.assert_close(dvs(frames), (f[0] + f[1]) / 2 @ w.T + bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        dvs.forward_steps(frames), torch.stack([f[0] @ w.T + bias, f[1] @ w.T + bias]), rtol=1e-12, atol=1e-12
    )


def test_firing_rates_count_every_spike():
    # Per layer: the spikes it emits over the neurons and steps it has, counted by hand from its own output.
    torch.manual_seed(0)
    # batch statistics (fresh BN fires in training); memory off: the hooks need the modules' own forward
    model = glif2.create_model("glifnet_small", 10, 3, memory="off")
    x = torch.randn(5, 1, 8, 8)
    layers = dict(glif_layers(model))
    spikes = {
        sign: {name: captured(layer, lambda s=sign: model(s * x)) for name, layer in layers.items()} for sign in (1, -1)
    }  # t b c h w per layer, for two different batches
    once = {name: s.sum().item() / s.numel() for name, s in spikes[1].items()}
    assert len(set(once.values())) == len(once) and all(0 < r < 1 for r in once.values())
    rates = firing_rates(model, x)
    assert list(rates) == list(layers)
    assert rates == pytest.approx(once, rel=1e-12)

    with FiringRates(model) as fr:  # accumulated over calls
        model(x)
        model(-x)
    both = {
        name: (spikes[1][name].sum() + spikes[-1][name].sum()).item() / (2 * spikes[1][name].numel()) for name in layers
    }
    assert fr.rates() == pytest.approx(both, rel=1e-12) and fr.rates() != pytest.approx(once, rel=1e-3)
    assert fr.counts["features.1"] == 2 * 3 * 5 * 32 * 8 * 8
    total = sum((spikes[1][n].sum() + spikes[-1][n].sum()).item() for n in layers)
    assert fr.overall() == pytest.approx(total / sum(2 * spikes[1][n].numel() for n in layers), rel=1e-12)
    assert not any(m._forward_hooks for m in model.modules())  # hooks are gone afterwards


def test_input_contract_errors():
    model = glif2.create_model("glifnet_small", 10, 2)
    with pytest.raises(ValueError, match="b c h w"):
        model(torch.randn(2, 2, 1, 8, 8))
    dvs = glif2.create_model("sew7b_wide", 10, 4, input_size=16)
    with pytest.raises(ValueError, match="t=4"):
        dvs(torch.rand(1, 2, 2, 16, 16))


def test_model_config_is_plain():
    model = glif2.create_model("resnet19", 10, 2, gate_init=(0.5, 0.5, 0.5), channel_wise=False)
    assert model.model_config == {
        "name": "resnet19",
        "num_classes": 10,
        "T": 2,
        "gate_init": [0.5, 0.5, 0.5],
        "memory": "lean",
        "channel_wise": False,
    }
    with pytest.raises(ValueError, match="plain"):
        glif2.create_model("resnet19", 10, 2, surrogate=object())


def test_no_graph_breaks():
    model = glif2.create_model("glifnet_small", 10, 2)
    explain = torch._dynamo.explain(model)(torch.randn(2, 1, 8, 8))
    assert explain.graph_break_count == 0
