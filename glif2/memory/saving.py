"""Layers that keep their inputs encoded for the backward: a conv or linear whose input is kept packed (or as the
image it repeats), an average pool that keeps nothing, and a product that keeps both factors packed.

Shape letters: n the time-merged batch `(t b)`, c channels, h w space, f features.

Each is an autograd.Function whose backward calls the ATen backward that autograd itself would call, on inputs
rebuilt bit for bit (`glif2.memory.grid.decode`), so its gradients equal plain autograd's.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glif2.memory.grid import AS_IS, Encoding, decode


class ConvSpec(NamedTuple):
    """A bias-free conv2d's static arguments."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @staticmethod
    def of(conv: nn.Conv2d) -> "ConvSpec":
        if isinstance(conv.padding, str) or conv.bias is not None:
            raise ValueError("the lean memory modes need bias-free convolutions with numeric padding; use memory='off'")
        return ConvSpec(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)


def conv_backward(
    grad: Tensor, x: Tensor, weight: Tensor, conv: ConvSpec, need_x: bool, need_w: bool
) -> tuple[Tensor | None, Tensor | None]:
    """(d input, d weight) of a bias-free conv2d: ATen's convolution_backward, as autograd calls it."""
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad,
        x,
        weight,
        None,
        conv.stride,
        conv.padding,
        conv.dilation,
        False,
        [0] * len(conv.stride),
        conv.groups,
        [need_x, need_w, False],
    )
    return gx, gw


def kept_or(x: Tensor, kept: Tensor | None) -> Tensor:
    """What to save for x: its encoded form, or x itself (kept None)."""
    return x if kept is None else kept


class PackedConv(torch.autograd.Function):
    """conv2d (no bias) whose input is kept encoded (packed spikes, or the repeated image) for the backward."""

    @staticmethod
    def forward(x: Tensor, kept: Tensor | None, weight: Tensor, encoding: Encoding, conv: ConvSpec) -> Tensor:
        return F.conv2d(x, weight, None, *conv)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, kept, weight, encoding, conv = inputs
        ctx.save_for_backward(kept_or(x, kept), weight)
        ctx.meta = (tuple(x.shape), x.dtype, encoding if kept is not None else AS_IS, conv)

    @staticmethod
    def backward(ctx, grad: Tensor):
        kept, weight = ctx.saved_tensors
        shape, dtype, encoding, conv = ctx.meta
        x = decode(kept, encoding, shape, dtype)
        gx, gw = conv_backward(grad, x, weight, conv, ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        return gx, None, gw, None, None


class PackedLinear(torch.autograd.Function):
    """linear (no bias) on `n f` whose input is kept packed for the backward."""

    @staticmethod
    def forward(x: Tensor, kept: Tensor, weight: Tensor, encoding: Encoding) -> Tensor:
        return F.linear(x, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, kept, weight, encoding = inputs
        ctx.save_for_backward(kept, weight)
        ctx.meta = (tuple(x.shape), x.dtype, encoding)

    @staticmethod
    def backward(ctx, grad: Tensor):
        kept, weight = ctx.saved_tensors
        shape, dtype, encoding = ctx.meta
        x = decode(kept, encoding, shape, dtype)
        gx = grad.mm(weight) if ctx.needs_input_grad[0] else None  # what autograd's linear backward computes
        gw = grad.t().mm(x) if ctx.needs_input_grad[2] else None
        return gx, None, gw, None


class PoolSpec(NamedTuple):
    """avg_pool2d's static arguments, as ATen takes them."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    ceil_mode: bool
    count_include_pad: bool
    divisor: int | None


class AvgPoolNoSave(torch.autograd.Function):
    """avg_pool2d keeping nothing: its backward needs only the input's shape."""

    @staticmethod
    def forward(x: Tensor, pool: PoolSpec) -> Tensor:
        return F.avg_pool2d(x, *pool)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, pool = inputs
        ctx.meta = (tuple(x.shape), pool)

    @staticmethod
    def backward(ctx, grad: Tensor):
        shape, pool = ctx.meta
        like = grad.new_zeros(()).expand(shape)  # shape and dtype only: the kernel never reads the values
        return torch.ops.aten.avg_pool2d_backward(grad, like, *pool), None


class GridMul(torch.autograd.Function):
    """a * b (SEW's AND / IAND connections) keeping both factors packed."""

    @staticmethod
    def forward(
        a: Tensor, a_kept: Tensor | None, b: Tensor, b_kept: Tensor | None, encodings: tuple[Encoding, Encoding]
    ) -> Tensor:
        return a * b

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, a_kept, b, b_kept, (a_enc, b_enc) = inputs
        ctx.save_for_backward(kept_or(a, a_kept), kept_or(b, b_kept))
        ctx.meta = (
            tuple(a.shape),
            a.dtype,
            a_enc if a_kept is not None else AS_IS,
            tuple(b.shape),
            b.dtype,
            b_enc if b_kept is not None else AS_IS,
        )

    @staticmethod
    def backward(ctx, grad: Tensor):
        a_kept, b_kept = ctx.saved_tensors
        a_shape, a_dtype, a_enc, b_shape, b_dtype, b_enc = ctx.meta
        ga = grad * decode(b_kept, b_enc, b_shape, b_dtype) if ctx.needs_input_grad[0] else None
        gb = grad * decode(a_kept, a_enc, a_shape, a_dtype) if ctx.needs_input_grad[2] else None
        return ga, None, gb, None, None


__all__ = ["AvgPoolNoSave", "ConvSpec", "GridMul", "PackedConv", "PackedLinear", "PoolSpec", "conv_backward", "kept_or"]
