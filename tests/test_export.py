"""glif2.export (NIR): export, write, read back with the `nir` package, run the graph with a small NIR interpreter
written here from NIR's node definitions (nothing from glif2), and compare with glif2 layer by layer.

Shape letters: t steps, b batch, c channels, h w space, k classes.

Both sides run in float64: the export folds BN into the conv and writes the neuron as NIR's Euler step, which round
differently from glif2's float32 order of operations (docs/export.md §5); in float64 a membrane would have to come
within ~1e-15 of its threshold for the two to disagree on a spike.
"""

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import require
from hypothesis import event, given
from hypothesis import strategies as st
from reference import naive_glif
from spec_layouts import layout, random_state_dict

import glif2
from glif2 import GLIF, eager_kernels

ROOT = Path(__file__).resolve().parents[1]
T = 2
HARD_LIF = {"gate_mode": "static_hard", "gate_init": (1, 0, 1)}  # alpha 1, beta 0, gamma 1: LIF, hard reset


@pytest.fixture(scope="module")
def nir():
    return require("nir")


@pytest.fixture(scope="module")
def export(nir):
    from glif2 import export

    return export


# --- an independent NIR interpreter -------------------------------------------------------------------------------


def _order(graph) -> tuple[list[str], dict[str, list[str]]]:
    """Nodes in topological order, and each node's sources."""
    sources = defaultdict(list)
    for a, b in graph.edges:
        sources[b].append(a)
    order, done = [], set()

    def visit(name):
        if name not in done:
            done.add(name)
            for s in sources[name]:
                visit(s)
            order.append(name)

    for name in graph.nodes:
        visit(name)
    return order, sources


def _ints(v) -> tuple[int, ...]:
    return tuple(int(a) for a in np.broadcast_to(np.asarray(v), (2,)))


def run_nir(nir, graph, steps: list[torch.Tensor], dt: float, potentials: bool = False):
    """Every node's output at every step, `b ...` per node, float64 (and, with `potentials`, every LIF's potential
    before its reset). Edges into a node are summed; an edge carries the source's output of the same step. LIF:
    v += dt / tau * (v_leak - v + r I), spike where v > v_threshold, then v = v_reset there; v starts at 0."""
    order, sources = _order(graph)
    tensor = {}  # node parameters as float64 tensors, converted once
    v = {}
    outputs, before_reset = [], []
    for x in steps:
        out = {}
        before_reset.append({})
        for name in order:
            node = graph.nodes[name]
            p = tensor.setdefault(
                name,
                {
                    k: torch.tensor(a, dtype=torch.float64)
                    for k, a in vars(node).items()
                    if isinstance(a, np.ndarray) and a.dtype.kind == "f"
                },
            )
            i = x if isinstance(node, nir.Input) else sum(out[s] for s in sources[name])
            if isinstance(node, (nir.Input, nir.Output)):
                y = i
            elif isinstance(node, nir.Conv2d):
                y = F.conv2d(
                    i,
                    p["weight"],
                    p["bias"],
                    stride=_ints(node.stride),
                    padding=_ints(node.padding),
                    dilation=_ints(node.dilation),
                    groups=int(node.groups),
                )
            elif isinstance(node, nir.AvgPool2d):
                y = F.avg_pool2d(i, _ints(node.kernel_size), _ints(node.stride), _ints(node.padding))
            elif isinstance(node, nir.Flatten):
                end = int(node.end_dim)
                y = i.flatten(int(node.start_dim) + 1, end if end < 0 else end + 1)
            elif isinstance(node, nir.Linear):
                y = i @ p["weight"].T
            elif isinstance(node, nir.Affine):
                y = i @ p["weight"].T + p["bias"]
            elif isinstance(node, nir.Scale):
                y = i * p["scale"]
            elif isinstance(node, nir.LIF):
                u = v.get(name, torch.zeros_like(i))
                u = u + dt / p["tau"] * (p["v_leak"] - u + p["r"] * i)
                y = (u > p["v_threshold"]).to(i.dtype)
                v[name], before_reset[-1][name] = torch.where(y > 0, p["v_reset"], u), u
            else:
                raise NotImplementedError(type(node).__name__)
            out[name] = y
        outputs.append(out)
    return (outputs, before_reset) if potentials else outputs


# --- helpers ------------------------------------------------------------------------------------------------------


def randomized(model, seed: int = 1):
    """Evaluation-mode float64 model whose BN statistics and neuron parameters differ per channel."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.normal_(1.0, 0.2, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
            if isinstance(m, GLIF):
                for name in ("tau", "v_th", "leak", "v_reset"):
                    p = getattr(m, name)
                    p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval().double()


def glif_spikes(model, x, compiled: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(each GLIF layer's output spikes `t b ...`, the per-step logits `t b k`) of glif2's own eval forward, with its
    compiled GLIF kernels or (`compiled=False`, to spare the tests a compilation per new shape) the same kernels run
    eagerly, which tests/test_neuron.py holds equal."""
    spikes, hooks = {}, []
    for name, m in glif2.glif_layers(model):
        hooks.append(m.register_forward_hook(lambda _, __, out, name=name: spikes.__setitem__(name, out.clone())))
    try:
        with torch.no_grad(), eager_kernels(not compiled):
            logits = model.forward_steps(x)
    finally:
        for h in hooks:
            h.remove()
    return spikes, logits


def round_trip(nir, export, model, x, tmp_path, input_shape, compiled=True, write=True):
    """Exports, writes, reads back (or, with `write=False`, keeps the graph in memory: ~8 bytes a weight take seconds
    to write), runs; asserts identical spikes in every layer and equal logits. Returns each layer's firing rate."""
    path = tmp_path / "net.nir" if write else None
    graph = export.export_nir(model, path, input_shape=input_shape)
    graph = nir.read(path) if write else graph
    frames = x.dim() == 5
    steps = list(x.transpose(0, 1)) if frames else [x] * model.T
    outputs = run_nir(nir, graph, steps, float(graph.metadata["dt"]))
    spikes, logits = glif_spikes(model, x, compiled)
    lifs = [n for n, node in graph.nodes.items() if isinstance(node, nir.LIF)]
    assert sorted(lifs) == sorted(spikes)
    for name in lifs:
        ours = torch.stack([out[name] for out in outputs])
        assert torch.equal(ours, spikes[name]), f"{name}: {int((ours != spikes[name]).sum())} spikes differ"
    out = [n for n, node in graph.nodes.items() if isinstance(node, nir.Output)][0]
    torch.testing.assert_close(torch.stack([o[out] for o in outputs]), logits, rtol=1e-10, atol=1e-12)
    return {name: float(s.mean()) for name, s in spikes.items()}


# --- exact round trips ----------------------------------------------------------------------------------------------


def test_resnet19_hard_reset_round_trip_on_ten_inputs(nir, export, tmp_path):
    """The figure: ResNet-19 with hard-reset LIF gates, per-channel neuron parameters and BN statistics, 10 random
    images: every layer's spikes identical, logits equal."""
    model = randomized(glif2.create_model("resnet19", 10, T, **HARD_LIF))
    x = 2.0 * torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rates = round_trip(nir, export, model, x, tmp_path, (3, 16, 16))
    assert len(rates) == 17
    assert all(0.01 < r < 0.6 for r in rates.values()), rates  # the net spikes, neither never nor always


def _soft_alpha_hard_reset(model):
    """Soft gates whose gamma and beta sit at logits +-40, where float64's sigmoid gives exactly 1 and a gain of
    exactly 1: a hard reset with a soft leak gate, so v_leak is not 0."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GLIF):
                m.gamma.fill_(40.0)
                m.beta.fill_(-40.0)
                m.alpha.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    return model


CASES = {
    "glifnet_small": lambda: glif2.create_model("glifnet_small", 10, T, **HARD_LIF),
    "glifnet_small-hard-learned": lambda: glif2.create_model(
        "glifnet_small", 10, T, gate_mode="hard", gate_init=(1, 0, 1)
    ),
    "glifnet_small-layerwise": lambda: glif2.create_model("glifnet_small", 10, T, channel_wise=False, **HARD_LIF),
    "glifnet_small-glif_f": lambda: glif2.create_model("glifnet_small", 10, T, variant="glif_f", conduct=0.9, tau=0.6),
    "glifnet_small-soft-alpha": lambda: _soft_alpha_hard_reset(glif2.create_model("glifnet_small", 10, T)),
    "cifarnet": lambda: glif2.create_model("cifarnet", 10, T, input_size=8, **HARD_LIF),
    "resnet18ms": lambda: glif2.create_model("resnet18ms", 10, T, **HARD_LIF),
    "sew7b_wide": lambda: glif2.create_model("sew7b_wide", 10, T, input_size=16, random_gates=False, **HARD_LIF),
}
INPUTS = {"glifnet_small": (1, 8, 8), "cifarnet": (3, 8, 8), "resnet18ms": (3, 32, 32), "sew7b_wide": (2, 16, 16)}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_identical_spikes(nir, export, tmp_path, case):
    """Every network class and neuron form that NIR expresses: spikes identical in every layer (stem, pools, MS and
    SEW sums, BN-only shortcuts, layer-wise and GLIF_f neurons, a soft leak gate)."""
    model = randomized(CASES[case]())
    shape = INPUTS[case.split("-")[0]]
    g = torch.Generator().manual_seed(4)
    if case == "sew7b_wide":
        x = torch.randint(0, 3, (3, T, *shape), generator=g).double()
    else:
        x = 2.0 * torch.randn(3, *shape, generator=g, dtype=torch.float64)
    big = case in ("cifarnet", "resnet18ms")  # ~100 MB of float64 weights; their node types are written elsewhere
    rates = round_trip(nir, export, model, x, tmp_path, shape, compiled=False, write=not big)
    assert 0.01 < float(np.mean(list(rates.values()))) < 0.6, rates


def test_the_comparison_sees_a_small_threshold_change(nir, export, tmp_path):
    """The round trip is not vacuous: the same check fails once one layer's thresholds move by a relative 1e-4."""
    model = randomized(CASES["glifnet_small"]())
    graph = export.export_nir(model, input_shape=(1, 8, 8))
    node = graph.nodes["features.3"]
    node.v_threshold = node.v_threshold * (1 + 1e-4)
    x = 2.0 * torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    outputs = run_nir(nir, graph, [x] * T, export.DT)
    spikes, _ = glif_spikes(model, x, compiled=False)
    assert torch.equal(torch.stack([o["features.1"] for o in outputs]), spikes["features.1"])
    assert not torch.equal(torch.stack([o["features.3"] for o in outputs]), spikes["features.3"])


# --- refusals -------------------------------------------------------------------------------------------------------


def test_default_soft_net_is_refused_naming_every_layer(export, tmp_path):
    """The figure: a default (soft-gated) ResNet-19 has a soft reset in all 17 GLIF layers; the error names each, and
    nothing is written."""
    model = glif2.create_model("resnet19", 10, T)
    path = tmp_path / "r19.nir"
    with pytest.raises(glif2.ExportError) as e:
        export.export_nir(model, path)
    message = str(e.value)
    layers = [name for name, _ in glif2.glif_layers(model)]
    assert len(layers) == 17 and "17 of 17 GLIF layers" in message
    for name in layers:
        assert f"\n  {name}: gamma 0.55 (soft reset) in " in message, name
    assert "--approximate" in message and not path.exists()


def _expected_refusals(model) -> set[str]:
    """The GLIF layers that are no NIR LIF, read off the hard gates' logits (a gate is 1 where its logit > 0):
    a reset gate 0, a leak gate 0 (no decay), or an integration gate 1 with a conductance that changes over t."""
    out = set()
    for name, m in glif2.glif_layers(model):
        varies = (m.conduct != m.conduct[0]).any(0)
        if (m.gamma <= 0).any() or (m.alpha <= 0).any() or ((m.beta > 0) & varies).any():
            out.add(name)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_hard_gates_export_exactly_where_they_select_a_lif(export, seed):
    """A hard-gated net is refused in exactly the layers whose binary gates select something other than a LIF."""
    model = glif2.create_model("resnet19", 10, T, gate_mode="hard", gate_init=(1, 0, 1))
    g = torch.Generator().manual_seed(seed)
    layers = list(glif2.glif_layers(model))
    with torch.no_grad():
        for i, (_, m) in enumerate(layers):
            if i % 3 == seed % 3:  # some layers get a random gate in a random channel
                c = int(torch.randint(0, m.channels, (1,), generator=g))
                gate = ("alpha", "beta", "gamma")[int(torch.randint(0, 3, (1,), generator=g))]
                getattr(m, gate)[c] = -getattr(m, gate)[c]
            if i % 4 == 0:
                m.conduct.add_(0.3 * torch.randn(m.conduct.shape, generator=g))
    expected = _expected_refusals(model)
    assert 0 < len(expected) < len(layers)  # both kinds of layer occur
    with pytest.raises(glif2.ExportError) as e:
        export.export_nir(model)
    named = {line.strip().split(":")[0] for line in str(e.value).splitlines() if line.startswith("  ")}
    assert named == expected


def test_products_and_unknown_layers_are_refused_even_approximately(export):
    """SEW AND / IAND multiply two signals, which no NIR node does; an unknown module has no NIR form. Both are named,
    with every neuron problem, and --approximate does not help."""
    model = glif2.create_model("sew7b_wide", 10, T, connect="AND", input_size=16)
    for approximate in (False, True):
        with pytest.raises(glif2.ExportError) as e:
            export.export_nir(model, approximate=approximate)
        message = str(e.value)
        for i in (1, 2, 3, 4, 7, 9, 11):
            assert f"\n  conv.{i}: SEW connect AND multiplies spikes" in message
        assert ("16 of 16 GLIF layers" in message) is not approximate
    model = glif2.create_model("glifnet_small", 10, T, **HARD_LIF)
    model.features[3] = torch.nn.ReLU()
    with pytest.raises(glif2.ExportError, match=r"\n  features\.3: ReLU has no NIR form"):
        export.export_nir(model, approximate=True)


def test_bad_input_shape_and_unknown_networks(export):
    model = glif2.create_model("glifnet_small", 10, T, **HARD_LIF)
    with pytest.raises(glif2.ConfigError, match="three positive sizes"):
        export.export_nir(model, input_shape=(8, 8))
    with pytest.raises(glif2.ExportError, match="Sequential: no NIR export for this network"):
        export.export_nir(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)), input_shape=(1, 8, 8))
    bare = glif2.models.convnets.GLIFNetSmall(
        num_classes=10, T=T, neuron=lambda c: GLIF(T, c), norm=torch.nn.BatchNorm2d
    )
    with pytest.raises(glif2.ConfigError, match="input size is unknown"):
        export.export_nir(bare)


# --- the neuron mapping ---------------------------------------------------------------------------------------------


@st.composite
def neurons(draw):
    """A float64 GLIF of either variant and granularity with random logits; soft gates may sit at +-40, where the
    sigmoid is exactly 0 or 1, and the conductance may or may not change over t. Half the draws push the reset and
    leak gates towards a LIF (gamma 1, alpha > 0), so that exact cases are common. With an input `t b c n`."""
    t, channels = draw(st.integers(1, 5)), draw(st.sampled_from([None, 3]))
    variant, mode = draw(st.sampled_from(["glif", "glif_f"])), draw(st.sampled_from(["soft", "hard", "static_hard"]))
    lif_like = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    m = GLIF(t, channels, variant=variant, gate_mode=mode).double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            if lif_like and name in ("alpha", "gamma"):
                p.abs_()
            if name in ("beta", "gamma") and mode == "soft" and draw(st.booleans()):
                p.copy_(
                    torch.full_like(p, 40.0 if lif_like and name == "gamma" else draw(st.sampled_from([-40.0, 40.0])))
                )
        if draw(st.booleans()):
            m.conduct.copy_(m.conduct[0].clone().expand_as(m.conduct))
    x = torch.randn(t, 2, 3, 4, generator=g, dtype=torch.float64) * draw(st.floats(0.5, 3.0)) + 0.5
    return m, x


@given(neurons())
def test_lif_mapping_is_exact_where_it_claims_to_be(nir, export, case):
    """Over random neurons: the mapping calls a GLIF exact iff its reset is hard, its input gain the same at every
    step and its decay below 1 (computed here from the gates, docs/neuron.md §2.1); where exact, NIR's LIF with the
    exported parameters gives the float64 reference GLIF's spikes exactly and its membranes to 1e-12."""
    m, x = case
    v = {k: val.detach() for k, val in m.effective_values().items()}
    if m.variant == "glif":
        hard_reset, decay = bool((v["gamma"] == 1).all()), 1 - v["alpha"] * (1 - v["tau"])
        gain = 1 - v["beta"] * (1 - v["conduct"])
    else:
        hard_reset, decay, gain = True, v["tau"], v["conduct"]
    leaky, constant = bool((decay < 1).all()), bool((gain == gain[0]).all())
    node, problems = export.glif_to_lif(m, (3, 4))
    assert (not problems) == (hard_reset and leaky and constant), problems
    event("exact" if not problems else "refused")
    if problems:
        return
    graph = nir.NIRGraph(
        nodes={"input": nir.Input(np.array([3, 4])), "lif": node, "output": nir.Output(np.array([3, 4]))},
        edges=[("input", "lif"), ("lif", "output")],
    )
    outputs, potentials = run_nir(nir, graph, list(x), export.DT, potentials=True)
    p = {k: val.reshape(-1, 1) if m.channels is not None else val for k, val in v.items() if k != "conduct"}
    conduct = v["conduct"].reshape(m.T, -1, 1) if m.channels is not None else v["conduct"]
    expected, u = naive_glif(
        x, **{**dict.fromkeys(("alpha", "beta", "gamma")), **p}, conduct=conduct, variant=m.variant
    )
    assert torch.equal(torch.stack([o["lif"] for o in outputs]), expected)
    torch.testing.assert_close(torch.stack([p["lif"] for p in potentials]), u, rtol=0, atol=1e-12)


# --- approximate ----------------------------------------------------------------------------------------------------


def test_approximate_export_measures_every_layer(nir, export, tmp_path):
    """--approximate exports a soft net and writes per layer how far its LIF is from the GLIF on the probe; an exact
    net measured the same way differs nowhere."""
    path, layers = tmp_path / "soft.nir", ["features.1", "features.3", "features.6"]
    probe = 3.0 * torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with eager_kernels():
        export.export_nir(randomized(glif2.create_model("glifnet_small", 10, 4)), path, approximate=True, probe=probe)
        exact = export.export_nir(
            randomized(glif2.create_model("glifnet_small", 10, 4, **HARD_LIF)), approximate=True, probe=probe
        )
    graph = nir.read(path)
    assert int(graph.metadata["exact"]) == 0
    assert [line.split()[:2] for line in export.report(graph)] == [[name, "approx"] for name in layers]
    for name in layers:
        meta = graph.nodes[name].metadata
        assert int(meta["exact"]) == 0 and "gamma 0.55 (soft reset)" in meta["problems"]
        assert 0.0 < float(meta["spike_mismatch"]) < 0.05  # a soft reset 0.55 is a hard reset now and then
        assert float(meta["membrane_max_diff"]) > 0.01 and float(meta["membrane_mean_diff"]) > 1e-5
        meta = exact.nodes[name].metadata
        assert int(meta["exact"]) == 1 and float(meta["spike_mismatch"]) == 0.0
        assert float(meta["membrane_max_diff"]) < 1e-12


# --- the command line -----------------------------------------------------------------------------------------------


def test_command_line_end_to_end(nir, tmp_path):
    model = randomized(CASES["glifnet_small"]()).float()
    checkpoint = glif2.save_checkpoint(tmp_path / "net.pt", model=model)
    out = tmp_path / "net.nir"
    run = subprocess.run(
        [sys.executable, "-m", "glif2.export", str(checkpoint), "--nir", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    assert f"{checkpoint} -> {out}: 12 nodes, 3 LIF layers, exact, dt 0.0001" in run.stdout
    graph = nir.read(out)
    assert int(graph.metadata["time_steps"]) == T and graph.nodes["input"].input_type["input"].tolist() == [1, 8, 8]


def test_command_line_refuses_a_released_file_naming_every_layer(export, tmp_path, capsys):
    """A file in the authors' format under a released name: loaded as eval.py does, refused with all 17 layers,
    exit status 2, nothing written."""
    path = tmp_path / "resCifar19-CIFAR10-step2-CW.pth.tar"
    torch.save({"state_dict": random_state_dict(layout("resnet19", 10, 2))}, path)
    out = tmp_path / "r19.nir"
    with pytest.raises(SystemExit) as e:
        export.main([str(path), "--nir", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("python -m glif2.export: error: resnet19 cannot be exported")
    for name, _ in glif2.glif_layers(glif2.create_model("resnet19", 10, 2)):
        assert f"\n  {name}: gamma " in err, name
    assert not out.exists()


def test_command_line_approximate_prints_each_layer(export, tmp_path, capsys):
    checkpoint = glif2.save_checkpoint(tmp_path / "soft.pt", model=glif2.create_model("glifnet_small", 10, T))
    with eager_kernels():
        export.main([str(checkpoint), "--nir", str(tmp_path / "soft.nir"), "--approximate"])
    lines = capsys.readouterr().out.splitlines()
    assert "3 LIF layers, approximate" in lines[0]
    assert [line.split()[:3] for line in lines[1:]] == [
        [n, "approx", "spikes"] for n in ("features.1", "features.3", "features.6")
    ]


@pytest.mark.parametrize(
    "content, message", [(b"not a checkpoint at all", "cannot be read"), (None, "no checkpoint file")]
)
def test_command_line_unreadable_checkpoints(export, tmp_path, capsys, content, message):
    path = tmp_path / "net.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        export.main([str(path), "--nir", str(tmp_path / "net.nir")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "net.nir").exists()
