"""The paper's parameter figure: per-layer distributions of the learned GLIF gates and neuron parameters.

    python -m glif2.plot runs/cifar10/best.pt --out glif_params.png
    python -m glif2.plot "trained models/resCifar19-CIFAR10-step4-CW.pth.tar" --out r19.png

Shape letters: t steps, c channels.

One panel per quantity (glif2.neuron.GLIF_PARAMS: alpha ... conduct), effective values (the sigmoid of
the stored logits, after the gate mode); each GLIF layer is one horizontal violin of its channels' values
(conduct: all `t c` entries). Layer-wise neurons have one value per layer and are drawn as points. Needs
matplotlib (the `plot` extra).
"""

import argparse
from pathlib import Path

import torch
from torch import nn

from glif2.analysis import glif_layers
from glif2.checkpoint import load_model
from glif2.neuron import GLIF_PARAMS

LABELS = {  # one per name of GLIF_PARAMS, in its order (a test checks)
    "alpha": "α (leakage gate)",
    "beta": "β (integration gate)",
    "gamma": "γ (reset gate)",
    "tau": "τ (decay)",
    "v_th": "V_th (threshold)",
    "leak": "ℓ (linear leak)",
    "v_reset": "V_re (soft-reset amount)",
    "conduct": "c_t (conductance)",
}


@torch.no_grad()
def parameter_values(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{quantity: {layer name: flat float64 values}} over every GLIF layer (GLIF_f layers have no alpha/beta;
    their unused gamma is left out)."""
    out: dict[str, dict[str, torch.Tensor]] = {q: {} for q in GLIF_PARAMS}
    for name, m in glif_layers(model):
        for q, v in m.effective_values().items():
            out[q][name] = v.detach().double().flatten().cpu()
    return {q: layers for q, layers in out.items() if layers}


def plot_parameters(model: nn.Module, out: str | Path, title: str | None = None) -> Path:
    """Draws the figure for `model` and writes it to `out` (PNG, PDF or SVG by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # matplotlib 3.10 renamed violinplot's vert=False to orientation="horizontal"
    major, minor = (int(v) for v in matplotlib.__version__.split(".")[:2])
    horizontal = {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}
    values = parameter_values(model)
    if not values:
        raise ValueError("the model has no GLIF layers")
    layers = list(next(iter(values.values())))
    cols = 4
    rows = (len(values) + cols - 1) // cols
    height = max(3.0, 0.22 * len(layers) + 1.2)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, height * rows), sharey=True, squeeze=False)
    for ax, (q, per_layer) in zip(axes.flat, values.items(), strict=False):
        for i, name in enumerate(layers):
            v = per_layer.get(name)
            if v is None:
                continue
            y = len(layers) - 1 - i  # first layer on top
            if v.numel() > 1 and float(v.std()) > 1e-9:
                parts = ax.violinplot(v.numpy(), positions=[y], widths=0.9, **horizontal, showextrema=False)
                for body in parts["bodies"]:
                    body.set_alpha(0.6)
                ax.plot([float(v.median())], [y], "k|", markersize=6)
            else:
                ax.plot(v.numpy(), [y] * v.numel(), "o", color="C0", markersize=4)
        ax.set_title(LABELS[q])
        ax.set_xlim(-0.02, 1.02)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes.flat[len(values) :]:
        ax.axis("off")
    axes[0, 0].set_yticks(range(len(layers)))
    axes[0, 0].set_yticklabels(list(reversed(layers)))
    for ax in axes.flat:
        ax.tick_params(axis="y", labelsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Plot the per-layer distributions of a checkpoint's GLIF parameters.")
    parser.add_argument("checkpoint", help="a glif2 checkpoint or a released GLIF file")
    parser.add_argument("--out", required=True, help="output image (.png, .pdf, .svg)")
    args = parser.parse_args(argv)
    model = load_model(args.checkpoint)
    cfg = model.model_config
    out = plot_parameters(model, args.out, title=f"{Path(args.checkpoint).name}: {cfg['name']}, T={cfg['T']}")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
