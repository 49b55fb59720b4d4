"""The cost of inference, counted on the data: firing rates, synaptic operations (accumulates driven by spikes), MACs
(multiply-accumulates driven by real values) and an energy estimate, per layer and per sample. docs/performance.md §6.

Shape letters: t steps, b batch, g groups, c channels, h w space, n rows (`(t b)` or `b`).

Every nn.Conv2d and nn.Linear is looked at through a forward hook on its actual input:
- the first of them in a forward pass (the encoder, fed by the image or the event frames): MACs, always;
- an input of non-negative integers (spikes, SEW ADD's spike counts): accumulates, a count of n being n spikes
  delivered: the sum over the inputs of value * fan-out, which is sum(conv(x, ones)), exact at padding and stride
  edges;
- the output of a non-overlapping average pool of such counts: the pool folds into the layer (a strided layer with
  weights / area on the counts), so the accumulates on the counts, area * sum(conv(x, ones));
- anything else (membrane sums, a global average, a linear layer's output): dense MACs, every output's whole
  receptive field.
BN folds into the conv before it at inference and costs nothing; neuron updates, residual adds and pooling are not
counted. Everything stays on the device until `report()` (one host sync).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import reduce
from torch import Tensor, nn

from glif2.analysis import FiringRates
from glif2.errors import ConfigError

# 45 nm CMOS, 32-bit float (Horowitz, ISSCC 2014): an add 0.9 pJ, a multiply 3.7 pJ, so a MAC 4.6 pJ.
E_AC = 0.9  # pJ per accumulate (synaptic operation)
E_MAC = 4.6  # pJ per multiply-accumulate

# What each synaptic layer sums on the device: accumulates, MACs, input events and the input elements they were
# found in (for the input rate), the calls whose input was counts, and those with a count above 1.
_FIELDS = ("sops", "macs", "events", "event_elements", "count_calls", "multi_calls")


@dataclass
class _Shapes:
    """A layer's counts that follow from shapes and hook order alone (host numbers, summed over calls)."""

    calls: int = 0
    pooled_calls: int = 0  # calls whose input was a tracked average pool's output
    first_calls: int = 0  # calls as the pass's first synaptic layer
    ann: float = 0.0  # dense MACs of one step per sample (the same layer in an ANN), times samples


# helpers


def check_energies(e_ac: float, e_mac: float) -> None:
    """Raises ConfigError (a ValueError) unless both energies (pJ) are finite and non-negative."""
    for name, value in (("e_ac", e_ac), ("e_mac", e_mac)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ConfigError(
                f"{name}={value!r} (--{name.replace('_', '-')}): an energy per operation must be a "
                f"finite number of pJ >= 0 (the 45 nm defaults are e_ac={E_AC}, e_mac={E_MAC})"
            )


def _root(x: Tensor) -> Tensor:
    return x._base if x._base is not None else x


def _is_counts(x: Tensor) -> Tensor:
    """A 0-dim bool on the device: every value a non-negative integer (no host sync)."""
    return ((x >= 0) & (x == torch.round(x))).all()


def _folds(pool: nn.AvgPool2d) -> bool:
    """Non-overlapping and unpadded: every input lands in exactly one output, so the pool folds into the next layer."""
    pair = nn.modules.utils._pair
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return pair(pool.kernel_size) == pair(stride) and pair(pool.padding) == (0, 0) and not pool.ceil_mode


def conv_accumulates(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """The accumulates `conv` does on counts `n c h w`: the sum over the inputs of value * the outputs it reaches
    (float64, 0-dim). Each group's channels are summed, then an all-ones kernel per group counts the receptive
    fields, padding and stride edges included."""
    g = conv.groups
    s = reduce(x.float(), "n (g c) h w -> n g h w", "sum", g=g)
    padding = conv.padding
    if conv.padding_mode != "zeros":  # reflect / replicate / circular pads with copies of real inputs
        s, padding = F.pad(s, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0
    ones = s.new_ones(g, 1, *conv.kernel_size)
    reach = F.conv2d(s, ones, stride=conv.stride, padding=padding, dilation=conv.dilation, groups=g)
    return reach.sum(dtype=torch.float64) * (conv.out_channels // g)


# classes


class CostCounter:
    """Counts firing rates, synaptic operations and MACs of a model over any number of forward passes (hooks).

        with CostCounter(model) as cost:
            for x, y in loader:
                model(x)
        cost.report()   # per layer and in total, per sample

    The model must run uncompiled (a compiled graph does not call hooks; evaluation runs glif2's plain path). Counting
    adds a few cheap passes over each synaptic layer's input, on its device, and no host sync.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.firing = FiringRates(model)
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        self.acc: dict[str, Tensor] = {}
        self.shapes = {name: _Shapes() for name in self.layers}
        self.samples = 0
        self._batch = 0  # samples of the pass under way
        self._first = False
        # this pass's average pools: (output, area, its input were counts, a count above 1)
        self._pooled: list[tuple[Tensor, int, Tensor, Tensor]] = []
        self._handles = []

    def __enter__(self) -> "CostCounter":
        self.firing.__enter__()
        self._handles = [self.model.register_forward_pre_hook(self._start)]
        self._handles += [m.register_forward_hook(self._hook(name)) for name, m in self.layers.items()]
        self._handles += [
            m.register_forward_hook(self._pool)
            for m in self.model.modules()
            if isinstance(m, nn.AvgPool2d) and _folds(m)
        ]
        return self

    def __exit__(self, *exc) -> None:
        self.firing.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles, self._pooled = [], []

    def _start(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        self._batch = int(inputs[0].shape[0])  # images `b c h w` and frames `b t c h w` both lead with b
        self.samples += self._batch
        self._first, self._pooled = True, []

    def _pool(self, module: nn.AvgPool2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        area = math.prod(nn.modules.utils._pair(module.kernel_size))
        x = inputs[0].detach()
        self._pooled.append((_root(output), area, _is_counts(x), x.amax() > 1))  # held until the next pass

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            with torch.autocast(output.device.type, enabled=False):  # counts stay exact, not rounded to bf16
                self._count(name, module, inputs[0], output)

        return hook

    def _count(self, name: str, module: nn.Module, x: Tensor, output: Tensor) -> None:
        shapes = self.shapes[name]
        shapes.calls += 1
        pool = next((p for p in self._pooled if p[0] is _root(x)), None)  # before detach(), which drops the base
        x = x.detach()
        area, counts, multi = 1, _is_counts(x), x.amax() > 1
        if pool is not None:  # an average pool of counts: area * x are those counts again
            _, area, counts, multi = pool
            shapes.pooled_calls += 1
        if self._first:  # the encoder: MACs whatever it is fed
            self._first, counts = False, torch.zeros_like(counts)
            shapes.first_calls += 1
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
            rows, reach = x.shape[0], conv_accumulates(x, module)
        else:
            fan_in = module.in_features
            rows, reach = x.numel() // fan_in, x.sum(dtype=torch.float64) * module.out_features
        dense = output.numel() * fan_in
        shapes.ann += dense * self._batch / rows
        zero = reach.new_zeros(())
        step = torch.stack(
            [
                torch.where(counts, area * reach, zero),
                torch.where(counts, zero, zero + dense),
                torch.where(counts, area * x.sum(dtype=torch.float64), zero),
                torch.where(counts, zero + x.numel() * area, zero),
                counts.double(),
                (counts & multi).double(),
            ]
        )
        self.acc[name] = self.acc[name] + step if name in self.acc else step

    def report(
        self, e_ac: float = E_AC, e_mac: float = E_MAC, all_reduce: Callable[[Tensor], Tensor] | None = None
    ) -> dict[str, Any]:
        """Per layer and in total, per sample: SOPs, MACs, energy (µJ), the ANN-equivalent MACs, and the firing rate
        of every GLIF layer and overall. One host sync (and one all-reduce when given).

        Args:
            e_ac: pJ per accumulate (default E_AC, 45 nm).
            e_mac: pJ per multiply-accumulate (default E_MAC, 45 nm).
            all_reduce: sums a float64 tensor over processes (DDP evaluation on shards); None in one process.

        Returns:
            {samples, steps, e_ac_pj, e_mac_pj, firing_rate, firing_rates, sops, macs, energy_uj, ann_macs,
            ann_energy_uj, sops_per_step, layers: [{name, kind, input, in_rate, sops, macs, energy_uj, ann_macs}]}.
        """
        check_energies(e_ac, e_mac)
        names, glifs = [n for n in self.acc], list(self.firing.sums)
        device = next((t.device for t in [*self.acc.values(), *self.firing.sums.values()]), torch.device("cpu"))
        host = [
            [float(s.calls), float(s.pooled_calls), float(s.first_calls), s.ann]
            for s in (self.shapes[n] for n in names)
        ]
        parts = [
            torch.cat([self.acc[n], torch.tensor(h, dtype=torch.float64, device=device)])
            for n, h in zip(names, host, strict=True)
        ]
        parts += [
            torch.stack(
                [
                    self.firing.sums[n].to(device, torch.float64),
                    torch.tensor(float(self.firing.counts[n]), dtype=torch.float64, device=device),
                ]
            )
            for n in glifs
        ]
        flat = torch.cat([*parts, torch.tensor([float(self.samples)], dtype=torch.float64, device=device)])
        values = (all_reduce(flat) if all_reduce is not None else flat).tolist()  # the host sync
        samples = values.pop()
        if samples == 0:
            raise ValueError("the cost counter saw no samples: run the model inside `with CostCounter(model)`")
        width = len(_FIELDS) + 4
        layers = [
            _layer(n, self.layers[n], values[i * width : (i + 1) * width], samples, e_ac, e_mac)
            for i, n in enumerate(names)
        ]
        spikes = values[len(names) * width :]
        sops, macs = sum(r["sops"] for r in layers), sum(r["macs"] for r in layers)
        ann = sum(r["ann_macs"] for r in layers)
        steps = getattr(self.model, "T", None)
        return {
            "samples": int(samples),
            "steps": steps,
            "e_ac_pj": e_ac,
            "e_mac_pj": e_mac,
            "firing_rate": sum(spikes[0::2]) / max(1.0, sum(spikes[1::2])),
            "firing_rates": {n: spikes[2 * i] / max(1.0, spikes[2 * i + 1]) for i, n in enumerate(glifs)},
            "sops": sops,
            "macs": macs,
            "energy_uj": energy_uj(sops, macs, e_ac, e_mac),
            "ann_macs": ann,
            "ann_energy_uj": energy_uj(0.0, ann, e_ac, e_mac),
            "sops_per_step": sops / steps if isinstance(steps, int) and steps > 0 else None,
            "layers": layers,
        }


def energy_uj(sops: float, macs: float, e_ac: float = E_AC, e_mac: float = E_MAC) -> float:
    """sops * e_ac + macs * e_mac, in µJ (the energies in pJ)."""
    return (sops * e_ac + macs * e_mac) * 1e-6


def _layer(
    name: str, module: nn.Module, values: list[float], samples: float, e_ac: float, e_mac: float
) -> dict[str, Any]:
    """One layer's row from its summed values (_FIELDS, then calls, pooled calls, first calls, ANN MACs)."""
    v = dict(zip((*_FIELDS, "calls", "pooled_calls", "first_calls", "ann"), values, strict=True))
    if v["first_calls"] == v["calls"]:
        kind = "input"
    elif v["count_calls"] == 0:
        kind = "real"
    elif v["count_calls"] == v["calls"]:
        kind = ("pooled " if v["pooled_calls"] == v["calls"] else "") + ("counts" if v["multi_calls"] else "spikes")
    else:
        kind = "mixed"
    sops, macs = v["sops"] / samples, v["macs"] / samples
    return {
        "name": name,
        "kind": "conv" if isinstance(module, nn.Conv2d) else "linear",
        "input": kind,
        "in_rate": v["events"] / v["event_elements"] if v["event_elements"] else None,
        "sops": sops,
        "macs": macs,
        "energy_uj": energy_uj(sops, macs, e_ac, e_mac),
        "ann_macs": v["ann"] / samples,
    }


def _si(value: float) -> str:
    """3 significant digits with a k / M / G / T suffix."""
    for factor, suffix in ((1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def format_report(report: dict[str, Any]) -> str:
    """The report as a table: a row per synaptic layer (the firing rate of its input, SOPs, MACs, energy), then the
    total (the firing rate over every GLIF neuron) and the same layers in an ANN. All figures per sample."""
    head = ("layer", "type", "input", "in rate", "SOPs", "MACs", "energy µJ")
    rows = [
        (
            r["name"],
            r["kind"],
            r["input"],
            "-" if r["in_rate"] is None else f"{r['in_rate']:.4f}",
            _si(r["sops"]),
            _si(r["macs"]),
            f"{r['energy_uj']:.4g}",
        )
        for r in report["layers"]
    ]
    rows.append(
        (
            "total",
            "",
            "",
            f"{report['firing_rate']:.4f}",
            _si(report["sops"]),
            _si(report["macs"]),
            f"{report['energy_uj']:.4g}",
        )
    )
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]

    def line(row: tuple[str, ...]) -> str:
        cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    steps = f"T={report['steps']}, " if report["steps"] else ""
    title = (
        f"cost per sample ({steps}{report['samples']} samples; {report['e_ac_pj']:g} pJ per accumulate, "
        f"{report['e_mac_pj']:g} pJ per MAC)"
    )
    ann = (
        f"the same layers as an ANN (one step, dense): {_si(report['ann_macs'])} MACs, {report['ann_energy_uj']:.4g} µJ"
    )
    rule = "-" * len(line(head))
    return "\n".join([title, line(head), rule, *map(line, rows[:-1]), rule, line(rows[-1]), ann])


__all__ = ["E_AC", "E_MAC", "CostCounter", "check_energies", "conv_accumulates", "energy_uj", "format_report"]
