"""glif2.cost: synaptic operations and MACs against counts made by hand and by independent loops over the layers'
actual inputs, the input kinds of the registered networks, and the energy arithmetic.

Shape letters: t steps, b batch, c channels, h w space, k classes.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from einops import rearrange, reduce, repeat
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import glif2
from glif2.cost import E_AC, E_MAC, CostCounter, conv_accumulates, format_report
from glif2.errors import ConfigError

pytestmark = pytest.mark.usefixtures("uncompiled")  # the fused kernels are not what these tests are about

# independent counting: loops over positions, no convolution


def reach_table(h: int, w: int, conv: nn.Conv2d) -> np.ndarray:
    """How many times each input position (of a zero-padded `h w` map) is read by one output channel's kernels."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    table = np.zeros((h, w), np.int64)
    for oy, ox, ky, kx in itertools.product(range(oh), range(ow), range(kh), range(kw)):
        y, x = oy * sh - ph + ky * dh, ox * sw - pw + kx * dw
        if 0 <= y < h and 0 <= x < w:
            table[y, x] += 1
    return table


def loop_accumulates(x: torch.Tensor, conv: nn.Conv2d) -> float:
    """sum over inputs of value * (outputs reached): each input channel feeds out_channels / groups channels."""
    table = reach_table(x.shape[-2], x.shape[-1], conv)
    per_channel = conv.out_channels // conv.groups
    return float((x.double().numpy() * table).sum() * per_channel)


def pooled_accumulates(pre: torch.Tensor, conv: nn.Conv2d, k: int) -> float:
    """The accumulates of conv(avg_pool_k(pre)) done on the counts `pre` themselves: each count reaches what its
    pooled cell reaches."""
    table = reach_table(pre.shape[-2] // k, pre.shape[-1] // k, conv)
    fine = np.kron(table, np.ones((k, k), np.int64))
    return float((pre.double().numpy() * fine).sum() * (conv.out_channels // conv.groups))


def dense_macs(out: torch.Tensor, module: nn.Module) -> int:
    """Every output's whole receptive field, padding included."""
    if isinstance(module, nn.Conv2d):
        return out.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
    return out.numel() * module.in_features


# a small net with every input kind


class Tiny(nn.Module):
    """`b 2 8 8` images -> encoder conv (MACs) -> GLIF -> grouped strided conv on spikes -> GLIF -> 1x1 conv -> GLIF,
    ADD with the previous spikes (counts 0..2) -> 2x2 average pool -> 3x3 conv on pooled counts -> GLIF -> flatten ->
    Linear on spikes -> Linear on real values -> mean over t."""

    def __init__(self, T: int = 2):
        super().__init__()
        self.T = T
        self.enc = glif2.TimeMerged(nn.Conv2d(2, 4, 3, padding=1, bias=False))
        self.s1 = glif2.GLIF(T, 4, v_th=0.3)
        self.c2 = glif2.TimeMerged(nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, bias=False))
        self.s2 = glif2.GLIF(T, 4, v_th=0.3)
        self.c3 = glif2.TimeMerged(nn.Conv2d(4, 4, 1, bias=False))
        self.s3 = glif2.GLIF(T, 4, v_th=0.3)
        self.pool = glif2.TimeMerged(nn.AvgPool2d(2))
        self.c4 = glif2.TimeMerged(nn.Conv2d(4, 3, 3, padding=1, bias=False))
        self.s4 = glif2.GLIF(T, 3, v_th=0.3)
        self.fc1 = nn.Linear(3 * 2 * 2, 5, bias=False)
        self.fc2 = nn.Linear(5, 3, bias=False)
        with torch.no_grad():  # 4 x the default init: every layer fires
            for conv in (self.enc, self.c2, self.c3, self.c4):
                conv[0].weight.mul_(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s2 = self.s2(self.c2(self.s1(self.enc(repeat(x, "b c h w -> t b c h w", t=self.T)))))
        counts = self.s3(self.c3(s2)) + s2
        s4 = self.s4(self.c4(self.pool(counts)))
        return reduce(self.fc2(self.fc1(rearrange(s4, "t b c h w -> t b (c h w)"))), "t b k -> b k", "mean")


def test_hand_counted_spikes():
    """Counted on paper: a 3x3 map with spikes at the corner (0, 0) and the centre (1, 1), 2 output channels."""
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 0, 0] = x[0, 0, 1, 1] = 1
    same = nn.Conv2d(1, 2, 3, padding=1)  # the corner reaches 4 outputs, the centre all 9
    assert conv_accumulates(x, same).item() == (4 + 9) * 2
    strided = nn.Conv2d(1, 2, 3, stride=2, padding=1)  # outputs at rows/cols 0, 2: the corner 1 output, the centre 4
    assert conv_accumulates(x, strided).item() == (1 + 4) * 2
    x[0, 0, 1, 1] = 3  # a count of 3 is 3 spikes delivered
    assert conv_accumulates(x, same).item() == (4 + 3 * 9) * 2


@given(
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    size=st.integers(3, 6),
    seed=st.integers(0, 2**16),
)
def test_conv_accumulates_equal_a_loop(kernel, stride, padding, dilation, groups, mode, size, seed):
    """Against a loop over every output and kernel tap of the padded input (numpy's pad: its own modes)."""
    assume(size + 2 * padding > dilation * (kernel - 1))  # the kernel fits the padded input
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=mode)
    x = torch.randint(0, 3, (2, 4, size, size), generator=torch.Generator().manual_seed(seed)).float()
    pad = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}[mode]
    xp = np.pad(x.numpy(), [(0, 0), (0, 0), (padding, padding), (padding, padding)], mode=pad)
    span = dilation * (kernel - 1)
    out = (xp.shape[-1] - span - 1) // stride + 1
    per_group = 4 // groups
    total = 0.0
    for o, oy, ox, ky, kx in itertools.product(range(6), range(out), range(out), range(kernel), range(kernel)):
        g = o // (6 // groups)
        y, x_ = oy * stride + ky * dilation, ox * stride + kx * dilation
        total += xp[:, g * per_group : (g + 1) * per_group, y, x_].sum()
    assert conv_accumulates(x, conv).item() == total


def test_counts_match_a_hand_count_on_a_small_net():
    """Every layer's SOPs and MACs over two batches of different sizes, against loops over the inputs the layers
    actually got (recorded by hooks of the test's own)."""
    torch.manual_seed(0)
    model = Tiny().eval()
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    modules = {
        "enc": model.enc[0],
        "c2": model.c2[0],
        "c3": model.c3[0],
        "c4": model.c4[0],
        "fc1": model.fc1,
        "fc2": model.fc2,
        "pool": model.pool[0],
    }
    for name, m in modules.items():
        m.register_forward_hook(lambda m, i, o, n=name: seen.setdefault(n, []).append((i[0].clone(), o.clone())))
    batches = [torch.randn(3, 2, 8, 8) * 2, torch.randn(2, 2, 8, 8) * 2]
    with torch.no_grad(), CostCounter(model) as counter:
        for x in batches:
            model(x)
    report = counter.report(e_ac=0.5, e_mac=2.0)
    expected = {
        "enc": (0.0, sum(dense_macs(o, model.enc[0]) for _, o in seen["enc"])),
        "c2": (sum(loop_accumulates(i, model.c2[0]) for i, _ in seen["c2"]), 0),
        "c3": (sum(loop_accumulates(i, model.c3[0]) for i, _ in seen["c3"]), 0),
        "c4": (sum(pooled_accumulates(i, model.c4[0], 2) for i, _ in seen["pool"]), 0),
        "fc1": (sum(float(i.sum()) * 5 for i, _ in seen["fc1"]), 0),
        "fc2": (0.0, sum(dense_macs(o, model.fc2) for _, o in seen["fc2"])),
    }
    rows = {r["name"].split(".")[0]: r for r in report["layers"]}
    assert list(rows) == list(expected) and report["samples"] == 5 and report["steps"] == 2
    for name, (sops, macs) in expected.items():
        assert rows[name]["sops"] == pytest.approx(sops / 5, rel=1e-12), name
        assert rows[name]["macs"] == pytest.approx(macs / 5, rel=1e-12), name
        assert rows[name]["energy_uj"] == pytest.approx((0.5 * sops + 2.0 * macs) / 5 * 1e-6, rel=1e-12), name
    # the spikes were real: every synaptic layer past the encoder saw some, and the ADD made counts of 2
    assert all(v[0] > 0 for k, v in expected.items() if k not in ("enc", "fc2"))
    assert max(float(i.max()) for i, _ in seen["pool"]) == 2
    assert [rows[n]["input"] for n in expected] == ["input", "spikes", "spikes", "pooled counts", "spikes", "real"]
    s1 = torch.cat([i for i, _ in seen["c2"]]).double()
    assert rows["c2"]["in_rate"] == pytest.approx(float(s1.mean()), rel=1e-12)
    assert report["sops"] == pytest.approx(sum(s for s, _ in expected.values()) / 5, rel=1e-12)
    assert report["macs"] == pytest.approx(sum(m for _, m in expected.values()) / 5, rel=1e-12)
    assert report["sops_per_step"] == pytest.approx(report["sops"] / 2)
    # the ANN: every layer dense, once per sample (the time-merged ones run T = 2 steps)
    ann = sum(dense_macs(o, modules[n]) / 2 for n in expected for _, o in seen[n]) / 5
    assert report["ann_macs"] == pytest.approx(ann, rel=1e-12)
    assert report["ann_energy_uj"] == pytest.approx(ann * 2.0 * 1e-6, rel=1e-12)
    # c2 is fed by s1 alone: its input rate is s1's firing rate
    assert report["firing_rates"]["s1"] == pytest.approx(rows["c2"]["in_rate"], rel=1e-12)


def _firing(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BN statistics of x and BN bias 0.3, so that every layer of a fresh network fires in evaluation on x."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        model.train()(x)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.bias, 0.3)
    return model.eval()


@pytest.mark.parametrize(
    "arch, x, kinds",
    [
        ("glifnet_small", torch.rand(4, 1, 8, 8), ["input", "spikes", "pooled spikes", "real"]),
        (
            "sew7b_wide",
            torch.randint(0, 3, (2, 2, 2, 16, 16)).float(),
            [
                "input",
                "spikes",
                "spikes",
                "counts",
                "spikes",
                "counts",
                "spikes",
                "counts",
                "spikes",
                "pooled counts",
                "spikes",
                "spikes",
                "pooled counts",
                "spikes",
                "real",
                "spikes",
                "real",
            ],
        ),
    ],
)
def test_registered_nets_name_their_inputs(arch, x, kinds):
    """What feeds each synaptic layer of the digits net and the SEW net (ADD sums are counts; after the second
    pool, the sums of spikes and pooled counts are no longer counts of anything: real); totals add up."""
    options = {"input_size": 16} if arch == "sew7b_wide" else {}
    model = _firing(glif2.create_model(arch, 10, 2, **options), x)
    with torch.no_grad(), CostCounter(model) as counter, glif2.FiringRates(model) as fr:
        model(x)
    report = counter.report()
    assert [r["input"] for r in report["layers"]] == kinds
    assert report["sops"] == pytest.approx(sum(r["sops"] for r in report["layers"]))
    assert report["energy_uj"] == pytest.approx((report["sops"] * E_AC + report["macs"] * E_MAC) * 1e-6)
    assert report["firing_rates"] == pytest.approx(fr.rates()) and report["firing_rate"] == pytest.approx(fr.overall())
    assert all(r["sops"] > 0 for r in report["layers"] if r["input"] not in ("input", "real"))
    assert all(r["macs"] > 0 for r in report["layers"] if r["input"] in ("input", "real"))


def test_table_and_errors():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8)
    model = _firing(glif2.create_model("glifnet_small", 10, 2), x)
    with torch.no_grad(), CostCounter(model) as counter:
        model(x)
    table = format_report(counter.report(e_ac=0.1, e_mac=1.0))
    assert "0.1 pJ per accumulate, 1 pJ per MAC" in table and "features.2.0" in table and "total" in table
    assert len(table.splitlines()) == 10  # title, head, rule, 4 layers, rule, total, the ANN line
    for bad in ({"e_ac": -1.0}, {"e_mac": float("nan")}):
        with pytest.raises(ConfigError, match="--e-(ac|mac)"):
            counter.report(**bad)
    with pytest.raises(ValueError, match="saw no samples"):
        CostCounter(model).report()
    assert not any(m._forward_hooks for m in model.modules())  # the hooks went with the context
