"""The paper's spiking ResNets: CIFAR ResNet-18/19, ImageNet ResNet-34 and ResNet-18MS/34MS (the plain CIFARNet and
the digits net are glif2.models.convnets). Layer by layer as docs/networks.md §1-§3.

Shape letters: t steps, b batch, c channels, h w space, k classes.

Images `b c h w` are repeated over t (direct coding: the first conv + BN + GLIF is the encoder); conv and BN run
on the time-merged batch `(t b) c h w` (TimeMerged, whose children are named like SpikingJelly's container, so
the reference checkpoints' keys map one to one); GLIF loops over t; the readout pools to `t b c`, applies the
head per step (`t b k`) and averages over t. No biases anywhere, no softmax.
"""

import math
from collections.abc import Callable

from einops import reduce
from torch import Tensor, nn

from glif2.layers import TimeMerged, neuron_factory, norm_factory, split_time
from glif2.memory.fused import Branch, unit
from glif2.memory.grid import SPIKES, Grid
from glif2.memory.lean import (
    Act,
    LeanModule,
    LeanSequential,
    bn_branch,
    conv_bn_plain,
    conv_bn_spike,
    conv_branch,
    link_grids,
)
from glif2.models.registry import register_model

SQRT1_2 = 1.0 / math.sqrt(2.0)  # the tdBN scale of every residual sum's two inputs
HEADS = ("auto", "linear", "two_linear")

Neuron = Callable[[int], nn.Module]
Norm = Callable[..., nn.Module]

# helpers


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int, padding: int, norm: Norm, alpha: float = 1.0):
    """`t b c h w -> t b c' h' w'`: bias-free conv then BN, on the time-merged batch (keys `.0.weight`, `.1.*`)."""
    return TimeMerged(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False), norm(c_out, alpha))


def shortcut(c_in: int, c_out: int, stride: int, norm: Norm) -> nn.Module:
    """The residual branch: a BN(1/sqrt 2) of the input when shapes match, else 1x1 conv (stride) + BN(1/sqrt 2).
    Blocks keep it under the reference's name `downsample` (checkpoint keys), although the BN-only form does not
    downsample."""
    if c_in == c_out and stride == 1:
        return TimeMerged(norm(c_out, SQRT1_2))  # key `downsample.0.*`
    return nn.Sequential(conv_bn(c_in, c_out, 1, stride, 0, norm, SQRT1_2))  # keys `downsample.0.{0,1}.*`


def init_weights(model: nn.Module) -> None:
    """The reference's `_initialize_weights` (docs/networks.md §1.3); GLIF parameters keep their own init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            nn.init.zeros_(m.running_mean)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)


def head(c_in: int, num_classes: int, two_linear: bool) -> nn.Sequential:
    """`t b c -> t b k` per step: Linear(c, k), or Linear(c, 256) then Linear(256, k) with nothing between."""
    if two_linear:
        return nn.Sequential(nn.Linear(c_in, 256, bias=False), nn.Linear(256, num_classes, bias=False))
    return nn.Sequential(nn.Linear(c_in, num_classes, bias=False))


def shortcut_branches(downsample: nn.Module, act: Act, mode: str) -> list[Branch]:
    """The residual shortcut as a branch of the block's unit: BN of the input, or 1x1 conv + BN."""
    if isinstance(downsample, TimeMerged) and len(downsample) == 1:
        return [bn_branch(downsample[0], act)]
    return [conv_branch(downsample[0], act, mode)]


# classes


class BasicBlock(LeanModule):
    """body: conv3x3(s)-BN-GLIF-conv3x3-BN(1/sqrt 2); out = GLIF(body(x) + shortcut(x)). `t b c h w` spikes."""

    def __init__(self, c_in: int, c_out: int, stride: int, *, neuron: Neuron, norm: Norm):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(c_in, c_out, 3, stride, 1, norm),
            neuron(c_out),
            conv_bn(c_out, c_out, 3, 1, 1, norm, SQRT1_2),
        )
        self.downsample = shortcut(c_in, c_out, stride, norm)  # named as in the reference's checkpoints
        self.lif = neuron(c_out)  # the block's output neuron; `lif` is the reference's key name

    def plain(self, x: Tensor) -> Tensor:
        return self.lif(self.body(x) + self.downsample(x))

    def lean(self, act: Act, mode: str) -> Act:
        """The same block on the lean path (glif2.memory): two units, the second with the shortcut as a branch."""
        s1 = conv_bn_spike(self.body[0], self.body[1], act, mode)
        branches = [conv_branch(self.body[2], s1, mode), *shortcut_branches(self.downsample, act, mode)]
        return act.then(unit(branches, self.lif, act.x.shape[0]), SPIKES)

    def out_grid(self, in_grid: Grid | None) -> Grid | None:
        return SPIKES


class MSBlock(LeanModule):
    """Membrane shortcut: out = BN(conv(GLIF(BN(conv_s(GLIF(x)))))) + shortcut(x), real-valued, no neuron after."""

    def __init__(self, c_in: int, c_out: int, stride: int, *, neuron: Neuron, norm: Norm):
        super().__init__()
        self.body = nn.Sequential(
            neuron(c_in),
            conv_bn(c_in, c_out, 3, stride, 1, norm),
            neuron(c_out),
            conv_bn(c_out, c_out, 3, 1, 1, norm, SQRT1_2),
        )
        self.downsample = shortcut(c_in, c_out, stride, norm)

    def plain(self, x: Tensor) -> Tensor:
        return self.body(x) + self.downsample(x)

    def lean(self, act: Act, mode: str) -> Act:
        """The same block on the lean path. Its input and output are real-valued (membrane sums): only the spikes
        inside the body are packed; in "recompute" the output sum is one unit without a neuron."""
        t = act.x.shape[0]
        s0 = act.then(self.body[0](act.x), SPIKES)
        s1 = conv_bn_spike(self.body[1], self.body[2], s0, mode)
        if mode == "lean":
            return act.then(conv_bn_plain(self.body[3], s1, mode) + self.downsample(act.x))
        branches = [conv_branch(self.body[3], s1, mode), *shortcut_branches(self.downsample, act, mode)]
        return act.then(split_time(unit(branches, None, t), t=t))

    def out_grid(self, in_grid: Grid | None) -> Grid | None:
        return None  # membrane sums


class SpikingResNet(nn.Module):
    """Stem conv-BN-GLIF, residual stages, per-step global-average-pool head, mean over t.

    Args:
        num_classes: classes K.
        T: time steps (the image is repeated T times).
        block: BasicBlock or MSBlock.
        repeats: blocks per stage.
        strides: stride of each stage's first block.
        widths: channels of the stem followed by each stage's channels.
        stem: (kernel, stride, padding) of the stem conv.
        two_linear: head Linear(c, 256) -> Linear(256, K) instead of Linear(c, K).
        neuron: `neuron(c) -> GLIF`.
        norm: `norm(c, alpha) -> BN`.
        in_channels: image channels (3; 1 for digits).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        T: int,
        block: type[nn.Module],
        repeats: tuple[int, ...],
        strides: tuple[int, ...],
        widths: tuple[int, ...],
        stem: tuple[int, int, int],
        two_linear: bool,
        neuron: Neuron,
        norm: Norm,
        in_channels: int = 3,
    ):
        super().__init__()
        self.T = T
        kernel, stride, padding = stem
        self.conv1 = LeanSequential(
            conv_bn(in_channels, widths[0], kernel, stride, padding, norm), neuron(widths[0]), image_steps=T
        )  # the stem: takes the image, repeats it over t
        blocks, c_in = [], widths[0]
        for c_out, n, s in zip(widths[1:], repeats, strides, strict=True):
            for i in range(n):
                blocks.append(block(c_in, c_out, s if i == 0 else 1, neuron=neuron, norm=norm))
                c_in = c_out
        self.features = nn.ModuleList(blocks)
        self.lastave = head(c_in, num_classes, two_linear)  # the head; `lastave` is the reference's key name
        link_grids([self.conv1, *self.features], None)
        init_weights(self)

    def regions(self) -> list[nn.Module]:
        """What regional compilation compiles one by one: the stem, each block, the head."""
        return [self.conv1, *self.features, self.lastave]

    def forward_features(self, x: Tensor) -> Tensor:
        """`b c h w -> t b c' h' w'` (spikes, or real-valued sums for the membrane-shortcut nets)."""
        x = self.conv1(x)
        for blk in self.features:
            x = blk(x)
        return x

    def forward_head(self, x: Tensor) -> Tensor:
        """`t b c h w -> t b k`: global average pool, then the head per step."""
        return self.lastave(reduce(x, "t b c h w -> t b c", "mean"))

    def forward_steps(self, x: Tensor) -> Tensor:
        """`b c h w -> t b k`: per-step logits."""
        return self.forward_head(self.forward_features(x))

    def forward(self, x: Tensor) -> Tensor:
        """`b c h w -> b k`: logits, the mean of the per-step logits over t."""
        return reduce(self.forward_steps(x), "t b k -> b k", "mean")


def _two_linear(head_kind: str, num_classes: int, reference_rule: bool) -> bool:
    if head_kind not in HEADS:
        raise ValueError(f"head={head_kind!r}; choose one of {HEADS}")
    if head_kind == "auto":
        return reference_rule and num_classes <= 50
    return head_kind == "two_linear"


def _resnet(num_classes, T, *, bn, in_channels, neuron_options, **arch) -> SpikingResNet:
    return SpikingResNet(
        num_classes=num_classes,
        T=T,
        neuron=neuron_factory(T, **neuron_options),
        norm=norm_factory(bn),
        in_channels=in_channels,
        **arch,
    )


# entrypoints. Every one takes `bn` ("td" | "plain"), `in_channels`, and the GLIF options (channel_wise=True,
# variant, gate_mode, gate_init, params, tau, v_th, leak, v_reset, conduct, surrogate, surrogate_width).
# `head`: "auto" follows the reference (two linears for <= 50 classes in the channel-wise GLIF CIFAR nets and the
# MS nets; one linear otherwise), "linear" or "two_linear" force one.

_CIFAR_STEM = (3, 1, 1)
_IMAGENET_STEM = (7, 2, 1)  # padding 1, not 3, and no max-pool: 224 -> 110


@register_model
def resnet18(num_classes: int, T: int, *, bn: str = "td", head: str = "auto", in_channels: int = 3, **neuron):
    """CIFAR "stand18": strides [1, 1, 2, 2] (the 128 stage does not downsample), docs/networks.md §2.1."""
    cw_glif = neuron.get("channel_wise", True) and neuron.get("variant", "glif") == "glif"
    return _resnet(
        num_classes,
        T,
        bn=bn,
        in_channels=in_channels,
        neuron_options=neuron,
        block=BasicBlock,
        repeats=(2, 2, 2, 2),
        strides=(1, 1, 2, 2),
        widths=(64, 64, 128, 256, 512),
        stem=_CIFAR_STEM,
        two_linear=_two_linear(head, num_classes, cw_glif),
    )


@register_model
def resnet19(num_classes: int, T: int, *, bn: str = "td", head: str = "auto", in_channels: int = 3, **neuron):
    """CIFAR ResNet-19: stem 128, stages [3, 3, 2] x 128/256/512, strides [1, 2, 2], docs/networks.md §2.2."""
    glif = neuron.get("variant", "glif") == "glif"
    return _resnet(
        num_classes,
        T,
        bn=bn,
        in_channels=in_channels,
        neuron_options=neuron,
        block=BasicBlock,
        repeats=(3, 3, 2),
        strides=(1, 2, 2),
        widths=(128, 128, 256, 512),
        stem=_CIFAR_STEM,
        two_linear=_two_linear(head, num_classes, glif),
    )


@register_model
def resnet34(num_classes: int, T: int, *, bn: str = "td", head: str = "auto", in_channels: int = 3, **neuron):
    """ImageNet ResNet-34 "stand": 7x7/2 stem (padding 1), stages [3, 4, 6, 3] all stride 2, docs/networks.md §3.1."""
    return _resnet(
        num_classes,
        T,
        bn=bn,
        in_channels=in_channels,
        neuron_options=neuron,
        block=BasicBlock,
        repeats=(3, 4, 6, 3),
        strides=(2, 2, 2, 2),
        widths=(64, 64, 128, 256, 512),
        stem=_IMAGENET_STEM,
        two_linear=_two_linear(head, num_classes, False),
    )


@register_model
def resnet18ms(num_classes: int, T: int, *, bn: str = "td", head: str = "auto", in_channels: int = 3, **neuron):
    """ImageNet ResNet-18MS (membrane shortcut), stages [2, 2, 2, 2] all stride 2. The released model
    was trained with plain BN: load it with bn="plain". docs/networks.md §3.2."""
    return _resnet(
        num_classes,
        T,
        bn=bn,
        in_channels=in_channels,
        neuron_options=neuron,
        block=MSBlock,
        repeats=(2, 2, 2, 2),
        strides=(2, 2, 2, 2),
        widths=(64, 64, 128, 256, 512),
        stem=_IMAGENET_STEM,
        two_linear=_two_linear(head, num_classes, True),
    )


@register_model
def resnet34ms(num_classes: int, T: int, *, bn: str = "td", head: str = "auto", in_channels: int = 3, **neuron):
    """ImageNet ResNet-34MS (membrane shortcut), stages [3, 4, 6, 3] all stride 2, docs/networks.md §3.2."""
    return _resnet(
        num_classes,
        T,
        bn=bn,
        in_channels=in_channels,
        neuron_options=neuron,
        block=MSBlock,
        repeats=(3, 4, 6, 3),
        strides=(2, 2, 2, 2),
        widths=(64, 64, 128, 256, 512),
        stem=_IMAGENET_STEM,
        two_linear=_two_linear(head, num_classes, True),
    )


__all__ = ["BasicBlock", "MSBlock", "SpikingResNet", "conv_bn", "init_weights"]
