"""The paper's plain (non-residual) networks: CIFARNet, and a small digits net for the CPU demo. Layer by layer as
docs/networks.md §2.3 and §5.

Shape letters: t steps, b batch, c channels, h w space, f features, k classes.

Images `b c h w` are repeated over t inside the first region (direct coding); conv and BN run on the time-merged
batch `(t b) c h w`; the readout applies the head per step (`t b k`) and averages over t. No biases, no softmax.
"""

import math

from einops import rearrange, reduce
from torch import Tensor, nn

from glif2.layers import TimeMerged, merge_time, neuron_factory, norm_factory, split_time
from glif2.memory.lean import Act, LeanModule, LeanSequential, linear, link_grids
from glif2.models.registry import register_model
from glif2.models.resnet import Neuron, Norm, conv_bn, init_weights

# classes


class SpikeHead(LeanModule, TimeMerged):
    """`t b f -> t b k`: bias-free linears on the time-merged spikes (CIFARNet's classifier); the lean path keeps
    the first linear's input packed."""

    def plain(self, x: Tensor) -> Tensor:
        return TimeMerged.forward(self, x)

    def lean(self, act: Act, mode: str) -> Act:
        t = act.x.shape[0]
        y = linear(self[0], act.then(merge_time(act.x), act.grid))
        for layer in list(self)[1:]:
            y = layer(y)
        return act.then(split_time(y, t=t))


class CIFARNet(nn.Module):
    """VGG-like [128, 256, A, 512, A, 1024, 512] conv-BN-GLIF stack ("A" = 2x2 average pool of the spikes),
    flattened, three bias-free linears per step (no activations between), mean over t.

    Args:
        num_classes: classes K.
        T: time steps.
        neuron: `neuron(c) -> GLIF`.
        norm: `norm(c, alpha) -> BN`.
        in_channels: image channels.
        input_size: image side (32 for CIFAR); fixes the flattened width `512 (input_size / 4)^2`.
    """

    arch = (128, 256, "A", 512, "A", 1024, 512)

    def __init__(
        self, *, num_classes: int, T: int, neuron: Neuron, norm: Norm, in_channels: int = 3, input_size: int = 32
    ):
        super().__init__()
        if input_size % 4:
            raise ValueError(f"input_size={input_size} must be a multiple of 4 (two 2x2 average pools)")
        self.T = T
        layers, c_in = [], in_channels
        for v in self.arch:
            if v == "A":
                layers.append(TimeMerged(nn.AvgPool2d(2, 2)))
            else:
                layers += [conv_bn(c_in, v, 3, 1, 1, norm), neuron(v)]
                c_in = v
        self.features = LeanSequential(*layers, image_steps=T)
        flat = c_in * (input_size // 4) ** 2
        self.classifier = SpikeHead(
            nn.Linear(flat, 1024, bias=False), nn.Linear(1024, 512, bias=False), nn.Linear(512, num_classes, bias=False)
        )
        link_grids([self.features, self.classifier], None)  # flattening between them keeps the values
        init_weights(self)

    def regions(self) -> list[nn.Module]:
        return [self.features, self.classifier]

    def forward_features(self, x: Tensor) -> Tensor:
        """`b c h w -> t b c' h' w'` spikes."""
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        """`t b c h w -> t b k`."""
        return self.classifier(rearrange(x, "t b c h w -> t b (c h w)"))

    def forward_steps(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward(self, x: Tensor) -> Tensor:
        return reduce(self.forward_steps(x), "t b k -> b k", "mean")


class GLIFNetSmall(nn.Module):
    """A small faithful GLIF net for 8x8 digits (the CPU demo): three conv-tdBN-GLIF layers, one 2x2 average
    pool, global average pool, Linear per step, mean over t. ~0.1 M parameters.

    conv 3x3 in->32, conv 3x3 32->64, avg-pool 2, conv 3x3 64->128, GAP, Linear(128 -> K).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        T: int,
        neuron: Neuron,
        norm: Norm,
        in_channels: int = 1,
        widths: tuple[int, int, int] = (32, 64, 128),
    ):
        super().__init__()
        self.T = T
        c1, c2, c3 = widths
        self.features = LeanSequential(
            conv_bn(in_channels, c1, 3, 1, 1, norm),
            neuron(c1),
            conv_bn(c1, c2, 3, 1, 1, norm),
            neuron(c2),
            TimeMerged(nn.AvgPool2d(2, 2)),
            conv_bn(c2, c3, 3, 1, 1, norm),
            neuron(c3),
            image_steps=T,
        )
        self.lastave = nn.Sequential(nn.Linear(c3, num_classes, bias=False))  # named like the ResNets' head
        init_weights(self)
        nn.init.normal_(self.lastave[0].weight, 0.0, 1.0 / math.sqrt(c3))  # 0.01 would start too slowly here

    def regions(self) -> list[nn.Module]:
        return [self.features, self.lastave]

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.lastave(reduce(x, "t b c h w -> t b c", "mean"))

    def forward_steps(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward(self, x: Tensor) -> Tensor:
        return reduce(self.forward_steps(x), "t b k -> b k", "mean")


# entrypoints


@register_model
def cifarnet(num_classes: int, T: int, *, bn: str = "td", in_channels: int = 3, input_size: int = 32, **neuron):
    """CIFARNet, docs/networks.md §2.3 (~45.0 M parameters at 32x32)."""
    return CIFARNet(
        num_classes=num_classes,
        T=T,
        neuron=neuron_factory(T, **neuron),
        norm=norm_factory(bn),
        in_channels=in_channels,
        input_size=input_size,
    )


@register_model
def glifnet_small(num_classes: int, T: int, *, bn: str = "td", in_channels: int = 1, **neuron):
    """The small digits net (8x8 grey images by default)."""
    return GLIFNetSmall(
        num_classes=num_classes, T=T, neuron=neuron_factory(T, **neuron), norm=norm_factory(bn), in_channels=in_channels
    )


__all__ = ["CIFARNet", "GLIFNetSmall", "SpikeHead"]
