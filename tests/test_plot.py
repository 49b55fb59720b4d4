"""glif2.plot: the parameter figure is written for our checkpoints and reference-format files."""

import pytest
import torch
from conftest import needs
from spec_layouts import layout, random_state_dict

import glif2
from glif2 import plot
from glif2.neuron import GLIF_PARAMS

pytestmark = [needs("matplotlib"), pytest.mark.usefixtures("uncompiled")]


def test_plot_writes_png(tmp_path):
    model = glif2.create_model("glifnet_small", 10, 2)
    glif2.randomize_gates(model)
    ckpt = glif2.save_checkpoint(tmp_path / "m.pt", model=model)
    out = plot.main([str(ckpt), "--out", str(tmp_path / "fig" / "params.png")])
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    values = plot.parameter_values(model)
    assert list(values) == list(plot.LABELS) == list(GLIF_PARAMS)  # a panel, with its label, per parameter
    assert list(values["conduct"]) == ["features.1", "features.3", "features.6"]
    assert values["conduct"]["features.1"].numel() == 2 * 32


def test_plot_layerwise_and_reference_file(tmp_path):
    ref = tmp_path / "resCifar19-CIFAR10-step2-CW.pth.tar"
    torch.save({"state_dict": random_state_dict(layout("resnet19", 10, 2, channel_wise=False))}, ref)
    out = plot.main([str(ref), "--out", str(tmp_path / "lw.png")])
    assert out.stat().st_size > 10_000
