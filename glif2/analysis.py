"""Looking inside a trained network: its GLIF layers, their firing rates, summaries of their learned parameters.

Shape letters: t steps, c channels.
"""

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from glif2.neuron import GLIF

QUANTILES = {"min": 0.0, "q25": 0.25, "median": 0.5, "q75": 0.75, "max": 1.0}


def glif_layers(model: nn.Module) -> Iterator[tuple[str, GLIF]]:
    """(name, module) of every GLIF layer, in registration order (the order of the forward pass)."""
    for name, m in model.named_modules():
        if isinstance(m, GLIF):
            yield name, m


class FiringRates:
    """Accumulates each GLIF layer's mean firing rate over any number of forward passes, through hooks.

    The model's own forward stays hook-free and stateless; while the context is open every GLIF output adds its
    spike sum and element count to on-device tensors (no host sync until `rates()` is read). Hooks need an
    uncompiled model (a compiled graph does not call them).

        with FiringRates(model) as fr:
            for x, y in loader:
                model(x)
        fr.rates()   # {layer name: spikes per neuron per step}
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles = []

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs, output: Tensor) -> None:
            total = output.detach().sum(dtype=torch.float64)
            self.sums[name] = self.sums[name] + total if name in self.sums else total
            self.counts[name] = self.counts.get(name, 0) + output.numel()

        return hook

    def __enter__(self):
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in glif_layers(self.model)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def rates(self) -> dict[str, float]:
        """Mean firing rate per layer (a host sync)."""
        return {name: float(total) / self.counts[name] for name, total in self.sums.items()}

    def overall(self) -> float:
        """Spikes per neuron per step over every layer together (a host sync)."""
        return sum(float(v) for v in self.sums.values()) / max(1, sum(self.counts.values()))


@torch.no_grad()
def firing_rates(model: nn.Module, x: Tensor) -> dict[str, float]:
    """Per-layer mean firing rate of one forward pass on x (analysis only)."""
    with FiringRates(model) as fr:
        model(x)
    return fr.rates()


def summary(values: Tensor) -> dict[str, float]:
    """mean, std and the QUANTILES of a tensor's values (float64 on the host)."""
    v = values.detach().double().flatten().cpu()
    q = torch.quantile(v, torch.tensor(list(QUANTILES.values()), dtype=torch.float64))
    return {
        "mean": float(v.mean()),
        "std": float(v.std()) if v.numel() > 1 else 0.0,
        **{name: float(x) for name, x in zip(QUANTILES, q, strict=True)},
    }


@torch.no_grad()
def parameter_summary(model: nn.Module) -> dict[str, dict[str, dict[str, float]]]:
    """{layer: {quantity: summary}} of every GLIF layer's effective values (alpha ... conduct, over the layer's
    channels; conduct over all `t c` entries)."""
    return {name: {q: summary(v) for q, v in m.effective_values().items()} for name, m in glif_layers(model)}


__all__ = ["QUANTILES", "FiringRates", "firing_rates", "glif_layers", "parameter_summary", "summary"]
