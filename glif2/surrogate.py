"""Surrogate gradients for the spike nonlinearity o = H(z), z = u - v_th.

Forward is always the strict Heaviside step (z = 0 gives no spike, as in the reference). Backward replaces
dH/dz by a window of unit area whose size is set by ``width``:

    rect      1/w            where |z| < w/2 (strict ends; w = 1 is the reference: height 1, width 1)
    sigmoid   d/dz sigmoid(4 z / w)            (peak 1/w)
    atan      d/dz (atan(pi z / w) / pi + 1/2) (peak 1/w)
    triangle  max(0, 1 - |z| / w) / w          (support |z| < w)

Each surrogate is an ``autograd.Function`` (``setup_context`` style, compiles without graph breaks) with two
pure helpers: ``derivative(z, width)``, which the fused GLIF kernel calls directly, and ``primitive(z, width)``,
a smooth function whose autograd gradient equals ``derivative`` (checked by the tests).
"""

import math

import torch
from torch import Tensor


class _Spike(torch.autograd.Function):
    """Heaviside forward, ``derivative`` backward. Subclasses supply the two helpers."""

    @staticmethod
    def derivative(z: Tensor, width: float) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def primitive(z: Tensor, width: float) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def forward(z: Tensor, width: float) -> Tensor:
        return (z > 0).to(z.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, width = inputs
        ctx.save_for_backward(z)
        ctx.width = width

    @classmethod
    def backward(cls, ctx, grad_out: Tensor):
        (z,) = ctx.saved_tensors
        return grad_out * cls.derivative(z, ctx.width), None


class RectSpike(_Spike):
    @staticmethod
    def derivative(z: Tensor, width: float) -> Tensor:
        return (z.abs() < 0.5 * width).to(z.dtype) / width

    @staticmethod
    def primitive(z: Tensor, width: float) -> Tensor:
        # Piecewise linear; its gradient equals ``derivative`` everywhere except exactly at the two edges.
        return (z / width + 0.5).clamp(0.0, 1.0)


class SigmoidSpike(_Spike):
    @staticmethod
    def derivative(z: Tensor, width: float) -> Tensor:
        s = torch.sigmoid(4.0 / width * z)
        return 4.0 / width * s * (1.0 - s)

    @staticmethod
    def primitive(z: Tensor, width: float) -> Tensor:
        return torch.sigmoid(4.0 / width * z)


class AtanSpike(_Spike):
    @staticmethod
    def derivative(z: Tensor, width: float) -> Tensor:
        return 1.0 / (width * (1.0 + (math.pi / width * z) ** 2))

    @staticmethod
    def primitive(z: Tensor, width: float) -> Tensor:
        return torch.atan(math.pi / width * z) / math.pi + 0.5


class TriangleSpike(_Spike):
    @staticmethod
    def derivative(z: Tensor, width: float) -> Tensor:
        return (1.0 - z.abs() / width).clamp(min=0.0) / width

    @staticmethod
    def primitive(z: Tensor, width: float) -> Tensor:
        r = (z / width).clamp(-1.0, 1.0)
        return 0.5 + r - 0.5 * r * r.abs()


SURROGATES: dict[str, type[_Spike]] = {
    "rect": RectSpike,
    "sigmoid": SigmoidSpike,
    "atan": AtanSpike,
    "triangle": TriangleSpike,
}


def get_surrogate(name: str) -> type[_Spike]:
    """The surrogate Function registered under ``name`` (one of ``SURROGATES``)."""
    if name not in SURROGATES:
        raise ValueError(f"unknown surrogate {name!r}; choose one of {sorted(SURROGATES)}")
    return SURROGATES[name]


def spike(z: Tensor, surrogate: str = "rect", width: float = 1.0) -> Tensor:
    """o = H(z) with the named surrogate gradient. z: any shape; returns the same shape and dtype."""
    return get_surrogate(surrogate).apply(z, width)
