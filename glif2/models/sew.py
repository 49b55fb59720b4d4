"""The CIFAR10-DVS 7B-wideNet: a spike-element-wise (SEW) ResNet with GLIF neurons, docs/networks.md §4.

Shape letters: t steps, b batch, c channels (2 polarities at the input), h w space (48 x 48), k classes.

Frames `b t 2 h w` -> `t b 2 h w`; 1x1 unit 2->64; 4 SEW blocks of 64; pool; 1x1 unit 64->128; then
(SEW block of 128, pool) x 3; flatten to `t b (c h w)` = 1152; mean over t; Linear(1152 -> 10) with a bias.
A unit is conv (no bias) + plain BatchNorm2d on the time-merged batch, then a channel-wise GLIF. A SEW block is
two 3x3 units and a connect function g(conv(x), x): ADD (the paper's run, block outputs are spike counts, not
re-spiked), AND, or IAND.

Neuron init (docs/neuron.md §8): tau 0.5, v_th = v_reset = 0.99999, leak 0.99999 / 32, conduct 0.9, and gates drawn from
U(-0.1, 0.1) as float64 parameters (the reference's numpy-made gates; float64 gates make the membrane float64).
"""

from collections.abc import Callable

import torch
from einops import rearrange, reduce
from torch import Tensor, nn

from glif2.layers import TimeMerged, neuron_factory, norm_factory
from glif2.memory.grid import SPIKES, Grid
from glif2.memory.lean import Act, LeanModule, LeanSequential, link_grids, multiply, run_sequence
from glif2.models.registry import register_model
from glif2.neuron import GATE_NAMES, randomize_gates

CONNECTS = ("ADD", "AND", "IAND")
# leak = v_th / (2 T) with the DVS code's T = 16, computed as it is there (not the rounded 0.0312497)
DVS_NEURON = {"tau": 0.5, "v_th": 0.99999, "leak": 0.99999 / 32, "v_reset": 0.99999, "conduct": 0.9}

Neuron = Callable[[int], nn.Module]

# helpers


def unit(c_in: int, c_out: int, kernel: int, *, neuron: Neuron, norm) -> LeanSequential:
    """`t b c h w -> t b c' h w` spikes: conv k x k (padding k // 2) + BN, then GLIF (keys `.0.0`, `.0.1`, `.1`)."""
    conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False)
    return LeanSequential(TimeMerged(conv, norm(c_out)), neuron(c_out))


def pool() -> LeanSequential:
    """2x2 average pool on the time-merged batch (no parameters); its lean path keeps nothing."""
    return LeanSequential(TimeMerged(nn.AvgPool2d(2, 2)))


# classes


class SEWBlock(LeanModule):
    """out = g(conv(x), x) with conv two 3x3 units (c -> mid -> c); g = ADD: a + x, AND: a * x, IAND: x (1 - a)."""

    def __init__(self, channels: int, mid: int, *, connect: str, neuron: Neuron, norm):
        super().__init__()
        if connect not in CONNECTS:
            raise ValueError(f"connect={connect!r}; choose one of {CONNECTS}")
        self.connect = connect
        self.conv = nn.Sequential(
            unit(channels, mid, 3, neuron=neuron, norm=norm), unit(mid, channels, 3, neuron=neuron, norm=norm)
        )

    def plain(self, x: Tensor) -> Tensor:
        a = self.conv(x)
        if self.connect == "ADD":
            return a + x
        if self.connect == "AND":
            return a * x
        return x * (1.0 - a)

    def lean(self, act: Act, mode: str) -> Act:
        """The same block on the lean path: ADD's sums stay on a grid (0, 1, 2, ...), AND / IAND keep their factors
        packed."""
        a = run_sequence(self.conv, act, mode)
        if self.connect == "ADD":
            return act.then(a.x + act.x, a.grid + act.grid if act.grid is not None else None)
        if self.connect == "AND":
            return multiply(a, act)
        return multiply(act, a.then(1.0 - a.x, SPIKES))

    def out_grid(self, in_grid: Grid | None) -> Grid | None:
        if in_grid is None:
            return None
        return SPIKES + in_grid if self.connect == "ADD" else SPIKES * in_grid


class SEWResNetGLIF(nn.Module):
    """The 7B-wideNet (`SEWResNet_GLIF_dsr`).

    Args:
        num_classes: classes K (10).
        T: frames per sample (16).
        connect: SEW connect function, "ADD" | "AND" | "IAND".
        neuron: `neuron(c) -> GLIF`.
        norm: `norm(c, alpha) -> BN` (plain BatchNorm2d in the paper).
        input_size: frame side (48); fixes the flattened width 128 (input_size / 16)^2.
        in_channels: polarity channels (2).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        T: int,
        connect: str,
        neuron: Neuron,
        norm,
        input_size: int = 48,
        in_channels: int = 2,
    ):
        super().__init__()
        if input_size % 16:
            raise ValueError(f"input_size={input_size} must be a multiple of 16 (four 2x2 average pools)")
        self.T = T

        def sew(c: int) -> SEWBlock:
            return SEWBlock(c, c, connect=connect, neuron=neuron, norm=norm)

        self.conv = nn.Sequential(
            unit(in_channels, 64, 1, neuron=neuron, norm=norm),  # conv.0
            *[sew(64) for _ in range(4)],  # conv.1-4
            pool(),  # conv.5
            unit(64, 128, 1, neuron=neuron, norm=norm),  # conv.6
            sew(128),
            pool(),  # conv.7, 8
            sew(128),
            pool(),  # conv.9, 10
            sew(128),
            pool(),  # conv.11, 12
        )
        self.out = nn.Linear(128 * (input_size // 16) ** 2, num_classes, bias=True)
        link_grids(list(self.conv), None)  # event counts in; then spikes, SEW sums, pooled sums

    def regions(self) -> list[nn.Module]:
        """What regional compilation compiles one by one: each unit, block and pool, and the head."""
        return [*self.conv, self.out]

    def forward_features(self, x: Tensor) -> Tensor:
        """`b t c h w -> t b (c h w)`."""
        if x.dim() != 5 or x.shape[1] != self.T:
            raise ValueError(f"expected frames `b t c h w` with t={self.T}, got shape {tuple(x.shape)}")
        x = self.conv(rearrange(x, "b t c h w -> t b c h w"))
        return rearrange(x, "t b c h w -> t b (c h w)")

    def forward_steps(self, x: Tensor) -> Tensor:
        """`b t c h w -> t b k`: the head applied per step (its mean over t equals `forward`)."""
        return self.out(self.forward_features(x))

    def forward(self, x: Tensor) -> Tensor:
        """`b t c h w -> b k`: mean over t, then the linear head (as the reference)."""
        return self.out(reduce(self.forward_features(x), "t b f -> b f", "mean"))


@register_model(inputs="frames")
def sew7b_wide(
    num_classes: int,
    T: int,
    *,
    connect: str = "ADD",
    bn: str = "plain",
    random_gates: bool = True,
    gate_dtype: str = "float64",
    input_size: int = 48,
    in_channels: int = 2,
    **neuron,
):
    """CIFAR10-DVS 7B-wideNet (1,236,298 parameters at T=16, 10 classes).

    `random_gates` draws the gates from U(-0.1, 0.1) (the reference always does; False keeps the `gate` init);
    `gate_dtype` "float64" (the reference) or "float32". GLIF options default to the DVS values (docs/neuron.md §8).
    """
    if gate_dtype not in ("float64", "float32"):
        raise ValueError(f"gate_dtype={gate_dtype!r}; choose 'float64' (reference) or 'float32'")
    model = SEWResNetGLIF(
        num_classes=num_classes,
        T=T,
        connect=connect,
        input_size=input_size,
        in_channels=in_channels,
        neuron=neuron_factory(T, **{**DVS_NEURON, **neuron}),
        norm=norm_factory(bn),
    )
    dtype = getattr(torch, gate_dtype)
    if random_gates:
        randomize_gates(model, dtype=dtype)
    else:  # keep the gate_init values, in the gate dtype
        for m in model.modules():
            for name in GATE_NAMES:
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter) and p.dtype != dtype:
                    setattr(m, name, nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad))
    return model


__all__ = ["SEWBlock", "SEWResNetGLIF"]
