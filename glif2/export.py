"""NIR export: a glif2 network as a graph of the Neuromorphic Intermediate Representation (the `nir` package).

NIR is the exchange format that snnTorch, Norse, SpikingJelly, Sinabs, Rockpool, Lava and SpiNNaker2 read.

    python -m glif2.export runs/digits/best.pt --nir digits.nir
    python -m glif2.export resCifar19-CIFAR10-step4-CW.pth.tar --nir r19.nir --approximate

Shape letters: t steps, b batch, c channels, h w space, n the flattened space, k classes.

The graph is one time step of the network in evaluation mode (docs/export.md §4): each conv with its BN folded in
(`Conv2d`), a BN-only shortcut as a diagonal 1x1 `Conv2d`, average pools, flatten, linear layers, residual sums as
several edges into one node (or a `Scale` of ones where the sum is a block's output), and each GLIF as a `LIF` with
per-channel parameters, wherever that is exact (docs/export.md §2-§3). A net that is not exactly expressible is
refused, every layer named, before anything is written; `approximate=True` exports the nearest LIFs and measures per
layer how far they differ on a probe input (docs/export.md §6). Parameters are float64.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import nir
import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from glif2.checkpoint import load_model, unwrap_model
from glif2.errors import CheckpointError, ConfigError, ExportError
from glif2.layers import tdBatchNorm
from glif2.models.convnets import CIFARNet, GLIFNetSmall
from glif2.models.resnet import BasicBlock, MSBlock, SpikingResNet
from glif2.models.sew import SEWBlock, SEWResNetGLIF
from glif2.neuron import GLIF
from glif2.nir_neuron import DT, as_float64, glif_to_lif, measure, report

# The paper's input side per network, for models whose config does not say (`input_size` wins).
INPUT_SIDE = {
    "resnet18": 32,
    "resnet19": 32,
    "cifarnet": 32,
    "resnet34": 224,
    "resnet18ms": 224,
    "resnet34ms": 224,
    "glifnet_small": 8,
    "sew7b_wide": 48,
}
PROBE_BATCH = 4


# the layers


def bn_affine(bn: _BatchNorm) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation-mode BN (plain or tdBN) as y = scale * x + shift per channel, in float64 (docs/export.md §3)."""
    c = bn.num_features
    k = bn.alpha * float(bn.v_th) if isinstance(bn, tdBatchNorm) else 1.0
    weight, bias = (as_float64(bn.weight), as_float64(bn.bias)) if bn.affine else (np.ones(c), np.zeros(c))
    scale = k * weight / np.sqrt(as_float64(bn.running_var) + bn.eps)
    return scale, bias - scale * as_float64(bn.running_mean)


# the graph


class Signal(NamedTuple):
    """What flows to the next node: the nodes whose outputs NIR sums into it, and the per-sample shape."""

    sources: tuple[str, ...]
    shape: tuple[int, ...]


class _Builder:
    """Walks a network by module type and attribute names, adding one NIR node per layer. Problems are collected,
    not raised, so that one error can name every layer: `neuron_problems` could be approximated, `problems` not."""

    def __init__(self, dt: float):
        self.dt = dt
        self.nodes: dict[str, nir.NIRNode] = {}
        self.edges: list[tuple[str, str]] = []
        self.problems: list[str] = []
        self.neuron_problems: list[str] = []
        self.neurons: dict[str, GLIF] = {}

    def add(self, name: str, node: nir.NIRNode, x: Signal, shape) -> Signal:
        self.nodes[name] = node
        self.edges += [(s, name) for s in x.sources]
        return Signal((name,), tuple(int(v) for v in shape))

    def module(self, name: str, m: nn.Module, x: Signal) -> Signal:
        kinds = (
            (nn.Sequential, self.sequence),
            (GLIF, self.neuron),
            (nn.Conv2d, self.conv),
            (_BatchNorm, self.norm),
            (nn.AvgPool2d, self.avg_pool),
            (nn.Linear, self.linear),
            (BasicBlock, self.basic_block),
            (MSBlock, self.ms_block),
            (SEWBlock, self.sew_block),
        )
        for kind, build in kinds:
            if isinstance(m, kind):
                return build(name, m, x)
        self.problems.append(f"{name}: {type(m).__name__} has no NIR form in this exporter")
        return x

    def sequence(self, name: str, seq: nn.Sequential, x: Signal) -> Signal:
        children = [(f"{name}.{k}", m) for k, m in seq.named_children()]
        i = 0
        while i < len(children):
            (n, m), after = children[i], children[i + 1] if i + 1 < len(children) else (None, None)
            if isinstance(m, nn.Conv2d) and isinstance(after[1], _BatchNorm):  # conv + BN: one node, BN folded
                x, i = self.conv(n, m, x, bn=after), i + 2
            else:
                x, i = self.module(n, m, x), i + 1
        return x

    def conv(self, name: str, conv: nn.Conv2d, x: Signal, bn: tuple[str, _BatchNorm] | None = None) -> Signal:
        if len(x.shape) != 3 or conv.padding_mode != "zeros":
            self.problems.append(
                f"{name}: a conv needs a `c h w` input and zero padding (got {x.shape}, {conv.padding_mode!r})"
            )
            return x
        weight = as_float64(conv.weight)
        bias = as_float64(conv.bias) if conv.bias is not None else np.zeros(conv.out_channels)
        meta = {}
        if bn is not None and self._has_stats(*bn):
            scale, shift = bn_affine(bn[1])
            weight, bias = weight * rearrange(scale, "c -> c 1 1 1"), bias * scale + shift
            meta = {"folded_batchnorm": bn[0]}
        geometry = {k: getattr(conv, k) for k in ("stride", "padding", "dilation", "groups")}
        node = nir.Conv2d(input_shape=x.shape[1:], weight=weight, bias=bias, metadata=meta, **geometry)
        return self.add(name, node, x, node.output_type["output"])

    def norm(self, name: str, bn: _BatchNorm, x: Signal) -> Signal:
        """A BN alone (the shortcut of a block whose shape does not change): a 1x1 conv with a diagonal weight, which
        every NIR reader runs (a grouped conv would be smaller, but nir 1.0 types it wrongly)."""
        if len(x.shape) != 3:
            self.problems.append(f"{name}: a BN alone needs a `c h w` input, got {x.shape}")
        if len(x.shape) != 3 or not self._has_stats(name, bn):
            return x
        scale, shift = bn_affine(bn)
        weight = rearrange(np.diag(scale), "c d -> c d 1 1")
        geometry = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        node = nir.Conv2d(input_shape=x.shape[1:], weight=weight, bias=shift, metadata={"batchnorm": name}, **geometry)
        return self.add(name, node, x, x.shape)

    def _has_stats(self, name: str, bn: _BatchNorm) -> bool:
        if bn.track_running_stats and bn.running_mean is not None:
            return True
        self.problems.append(f"{name}: BN without running statistics normalises by each batch, not a fixed map")
        return False

    def neuron(self, name: str, glif: GLIF, x: Signal) -> Signal:
        node, problems = glif_to_lif(glif, x.shape, self.dt)
        node.metadata = {"glif2_layer": name, "exact": int(not problems), "problems": "; ".join(problems)}
        self.neuron_problems += [f"{name}: {'; '.join(problems)}"] if problems else []
        self.neurons[name] = glif
        return self.add(name, node, x, x.shape)

    def avg_pool(self, name: str, pool: nn.AvgPool2d | None, x: Signal, kernel=None) -> Signal:
        pair = nn.modules.utils._pair
        kernel = pair(kernel or pool.kernel_size)
        stride = pair(pool.stride or kernel) if pool is not None else kernel
        if pool is not None and (pair(pool.padding) != (0, 0) or pool.ceil_mode or pool.divisor_override):
            self.problems.append(f"{name}: average pool with padding, ceil_mode or a divisor override")
        c, h, w = x.shape
        out = (c, (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1)
        return self.add(name, nir.AvgPool2d(np.array(kernel), np.array(stride), np.array([0, 0])), x, out)

    def global_pool(self, x: Signal) -> Signal:
        """The ResNets' readout `t b c h w -> t b c` (a mean over space): a pool over the whole map, then flatten."""
        return self.flatten(self.avg_pool("global_pool", None, x, kernel=x.shape[1:]))

    def flatten(self, x: Signal) -> Signal:
        node = nir.Flatten(input_type={"input": np.array(x.shape)}, start_dim=0, end_dim=-1)
        return self.add("flatten", node, x, node.output_type["output"])

    def linear(self, name: str, lin: nn.Linear, x: Signal) -> Signal:
        if x.shape != (lin.in_features,):
            self.problems.append(f"{name}: a linear layer needs a flat input of {lin.in_features}, got {x.shape}")
        weight = as_float64(lin.weight)
        node = nir.Linear(weight=weight) if lin.bias is None else nir.Affine(weight=weight, bias=as_float64(lin.bias))
        return self.add(name, node, x, (lin.out_features,))

    def summed(self, name: str, a: Signal, b: Signal) -> Signal:
        """A residual sum that leaves its block: a Scale of ones with both inputs, so every consumer gets one edge."""
        if a.shape != b.shape:
            self.problems.append(f"{name}: residual branches of shapes {a.shape} and {b.shape}")
        return self.add(f"{name}.sum", nir.Scale(np.ones(a.shape)), Signal(a.sources + b.sources, a.shape), a.shape)

    def basic_block(self, name: str, blk: BasicBlock, x: Signal) -> Signal:
        body, short = self.module(f"{name}.body", blk.body, x), self.module(f"{name}.downsample", blk.downsample, x)
        return self.module(f"{name}.lif", blk.lif, Signal(body.sources + short.sources, body.shape))  # LIF sums

    def ms_block(self, name: str, blk: MSBlock, x: Signal) -> Signal:
        body, short = self.module(f"{name}.body", blk.body, x), self.module(f"{name}.downsample", blk.downsample, x)
        return self.summed(name, body, short)

    def sew_block(self, name: str, blk: SEWBlock, x: Signal) -> Signal:
        a = self.module(f"{name}.conv", blk.conv, x)
        if blk.connect != "ADD":  # AND: a x, IAND: x (1 - a): products of two signals, which no NIR node forms
            self.problems.append(f"{name}: SEW connect {blk.connect} multiplies spikes; only ADD has a NIR form")
        return self.summed(name, a, x)

    def walk(self, model: nn.Module, x: Signal) -> Signal:
        """The network's layers in forward order, by class (docs/networks.md §2-§5)."""
        if isinstance(model, SpikingResNet):
            x = self.module("conv1", model.conv1, x)
            for i, blk in enumerate(model.features):
                x = self.module(f"features.{i}", blk, x)
            return self.module("lastave", model.lastave, self.global_pool(x))
        if isinstance(model, GLIFNetSmall):
            return self.module("lastave", model.lastave, self.global_pool(self.module("features", model.features, x)))
        if isinstance(model, CIFARNet):
            return self.module("classifier", model.classifier, self.flatten(self.module("features", model.features, x)))
        if isinstance(model, SEWResNetGLIF):
            return self.module("out", model.out, self.flatten(self.module("conv", model.conv, x)))
        raise ExportError(
            f"{type(model).__name__}: no NIR export for this network; exportable: SpikingResNet, "
            "CIFARNet, GLIFNetSmall, SEWResNetGLIF"
        )


# export


def input_shape_of(model: nn.Module, side: int | None = None) -> tuple[int, int, int]:
    """`c h w` of one input step: c from the first conv; the side given, else the model config's `input_size`, else
    the paper's side for the network (INPUT_SIDE)."""
    config = getattr(model, "model_config", None) or {}
    side = side or config.get("input_size") or INPUT_SIDE.get(config.get("name"))
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if side is None or conv is None:
        raise ConfigError(
            f"{type(model).__name__}: its input size is unknown; pass input_shape=(c, h, w) "
            "(--input-size on the command line)"
        )
    return conv.in_channels, int(side), int(side)


def export_nir(
    model: nn.Module,
    path: str | os.PathLike | None = None,
    *,
    input_shape: tuple[int, int, int] | None = None,
    approximate: bool = False,
    dt: float = DT,
    probe: Tensor | None = None,
) -> nir.NIRGraph:
    """The network as a NIR graph of one time step in evaluation mode (docs/export.md), written to `path` if given.

    Args:
        model: a SpikingResNet, CIFARNet, GLIFNetSmall or SEWResNetGLIF (compiled or DDP wrappers are looked through).
        path: where to write the graph (nir.write's HDF5), atomically; nothing is written when the export fails.
        input_shape: `c h w` of one input step (default: input_shape_of(model)).
        approximate: export GLIF layers that no NIR LIF equals as the nearest LIF, and record in each LIF node's
            metadata how far it differs from the GLIF on a probe input (spike_mismatch, membrane_max_diff,
            membrane_mean_diff). Layers with no NIR form at all are refused either way.
        dt: the forward-Euler step that the LIF time constants assume (docs/export.md §2.4).
        probe: the model input that `approximate` measures on (images `b c h w`, or frames `b t c h w`); default:
            PROBE_BATCH standard-normal images (event frames of 0-3 events for the DVS net), seed 0. Real data
            gives the more telling figures.

    Raises:
        ExportError: naming every layer that is not exactly expressible and what is not (docs/export.md §6).
    """
    model = unwrap_model(model)
    shape = tuple(int(v) for v in (input_shape or input_shape_of(model)))
    if len(shape) != 3 or min(shape) < 1 or not dt > 0:
        raise ConfigError(f"input_shape={shape} must be three positive sizes (c, h, w) and dt={dt} positive")
    b = _Builder(dt)
    b.nodes["input"] = nir.Input(input_type=np.array(shape))
    out = b.walk(model, Signal(("input",), shape))
    if b.problems or (b.neuron_problems and not approximate):
        raise ExportError(_refusal(model, b, approximate))
    b.add("output", nir.Output(output_type=np.array(out.shape)), out, out.shape)
    if approximate:
        measure(model, b.neurons, b.nodes, _probe(model, shape, probe), dt)
    graph = nir.NIRGraph(nodes=b.nodes, edges=b.edges, metadata=_metadata(model, b))
    if path is not None:
        _write(graph, Path(path))
    return graph


def _refusal(model: nn.Module, b: _Builder, approximate: bool) -> str:
    name = (getattr(model, "model_config", None) or {}).get("name", type(model).__name__)
    lines = [f"{name} cannot be exported to NIR{'' if b.problems else ' exactly'}."]
    if b.neuron_problems and not approximate:
        lines.append(f"{len(b.neuron_problems)} of {len(b.neurons)} GLIF layers are not a NIR LIF:")
        lines += [f"  {p}" for p in b.neuron_problems]
    if b.problems:
        lines.append(f"{len(b.problems)} layers have no NIR form at all (--approximate cannot help):")
        lines += [f"  {p}" for p in b.problems]
    elif b.neuron_problems and not approximate:
        lines.append(
            "Pass approximate=True (--approximate) to export the nearest LIFs with their differences per "
            "layer, or train with hard reset gates: gate_mode='static_hard', gate_init=(1, 0, 1) "
            "(docs/export.md §6)."
        )
    return "\n".join(lines)


def _metadata(model: nn.Module, b: _Builder) -> dict:
    frames = isinstance(model, SEWResNetGLIF)
    return {
        "producer": "glif2 (docs/export.md)",
        "model": str(getattr(model, "model_config", type(model).__name__)),
        "dt": float(b.dt),
        "time_steps": int(model.T),
        "input": "one event frame per step" if frames else "the same image at every step (direct coding)",
        "readout": "the mean over the time steps of the output",
        "threshold": "strict: a spike when v > v_threshold",
        "reset": "v = v_reset in the step that spikes; v = 0 before the first step of every sample",
        "exact": int(not b.neuron_problems),
    }


def _write(graph: nir.NIRGraph, path: Path) -> None:
    # A temporary file beside the target, then a rename: an interrupted write never leaves a torn graph.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        nir.write(tmp, graph)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --approximate


def _probe(model: nn.Module, shape: tuple[int, int, int], x: Tensor | None) -> Tensor:
    """The probe batch: `x`, or PROBE_BATCH standard-normal images (event frames of 0-3 events for the DVS net)."""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    g = torch.Generator().manual_seed(0)
    if x is None and isinstance(model, SEWResNetGLIF):
        x = torch.randint(0, 4, (PROBE_BATCH, model.T, *shape), generator=g)
    elif x is None:
        x = torch.randn((PROBE_BATCH, *shape), generator=g, dtype=torch.float64)
    return x.to(conv.weight.device, conv.weight.dtype)


def main(argv: list[str] | None = None) -> nir.NIRGraph:
    """The command line. A checkpoint that cannot be read or a net that cannot be exported is one line on stderr (the
    refusal lists its layers) and exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m glif2.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a glif2 checkpoint, or one of the authors' released files")
    parser.add_argument("--nir", required=True, metavar="OUT.nir", help="where to write the NIR graph (HDF5)")
    parser.add_argument(
        "--approximate",
        action="store_true",
        help="export GLIFs that no NIR LIF equals as the nearest LIF, and report per layer how far "
        "each differs on a probe input",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=None,
        metavar="SIDE",
        help="input height = width (default: the model's config, else the paper's size for the net)",
    )
    parser.add_argument("--dt", type=float, default=DT, help=f"the Euler step of the LIF time constants ({DT:g})")
    args = parser.parse_args(argv)
    if args.input_size is not None and args.input_size < 1:
        parser.error("--input-size must be positive")
    try:
        model = load_model(args.checkpoint)
        shape = input_shape_of(model, args.input_size)
        graph = export_nir(model, args.nir, input_shape=shape, approximate=args.approximate, dt=args.dt)
    except (CheckpointError, ConfigError, ExportError, FileNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    lifs = sum(isinstance(n, nir.LIF) for n in graph.nodes.values())
    kind = "exact" if graph.metadata["exact"] else "approximate"
    print(f"{args.checkpoint} -> {args.nir}: {len(graph.nodes)} nodes, {lifs} LIF layers, {kind}, dt {args.dt:g}")
    if args.approximate:
        print("\n".join(report(graph)))
    return graph


__all__ = ["DT", "INPUT_SIDE", "PROBE_BATCH", "Signal", "bn_affine", "export_nir", "input_shape_of", "main"]


if __name__ == "__main__":
    main()
