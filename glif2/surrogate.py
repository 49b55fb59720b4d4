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
from collections.abc import Callable

import torch
from torch import Tensor


def _rect(z: Tensor, width: float) -> Tensor:
    return (z.abs() < 0.5 * width).to(z.dtype) / width


def _rect_primitive(z: Tensor, width: float) -> Tensor:
    # Piecewise linear; its gradient equals the window everywhere except exactly on the two edges.
    return (z / width + 0.5).clamp(0.0, 1.0)


def _sigmoid(z: Tensor, width: float) -> Tensor:
    s = torch.sigmoid(4.0 / width * z)
    return 4.0 / width * s * (1.0 - s)


def _sigmoid_primitive(z: Tensor, width: float) -> Tensor:
    return torch.sigmoid(4.0 / width * z)


def _atan(z: Tensor, width: float) -> Tensor:
    return 1.0 / (width * (1.0 + (math.pi / width * z) ** 2))


def _atan_primitive(z: Tensor, width: float) -> Tensor:
    return torch.atan(math.pi / width * z) / math.pi + 0.5


def _triangle(z: Tensor, width: float) -> Tensor:
    return (1.0 - z.abs() / width).clamp(min=0.0) / width


def _triangle_primitive(z: Tensor, width: float) -> Tensor:
    r = (z / width).clamp(-1.0, 1.0)
    return 0.5 + r - 0.5 * r * r.abs()


def _spike_function(name: str, derivative: Callable, primitive: Callable) -> type[torch.autograd.Function]:
    """A Heaviside-forward Function whose backward is ``derivative``. Built by a factory (not by subclassing with a
    classmethod backward) so that each backward is a plain staticmethod, which dynamo traces without breaks."""

    class Spike(torch.autograd.Function):
        @staticmethod
        def forward(z: Tensor, width: float) -> Tensor:
            return (z > 0).to(z.dtype)

        @staticmethod
        def setup_context(ctx, inputs, output):
            z, width = inputs
            ctx.save_for_backward(z)
            ctx.width = width

        @staticmethod
        def backward(ctx, grad_out: Tensor):
            (z,) = ctx.saved_tensors
            return grad_out * derivative(z, ctx.width), None

    Spike.derivative, Spike.primitive = staticmethod(derivative), staticmethod(primitive)
    Spike.__name__ = Spike.__qualname__ = name
    return Spike


RectSpike = _spike_function("RectSpike", _rect, _rect_primitive)
SigmoidSpike = _spike_function("SigmoidSpike", _sigmoid, _sigmoid_primitive)
AtanSpike = _spike_function("AtanSpike", _atan, _atan_primitive)
TriangleSpike = _spike_function("TriangleSpike", _triangle, _triangle_primitive)

SURROGATES: dict[str, type[torch.autograd.Function]] = {
    "rect": RectSpike,
    "sigmoid": SigmoidSpike,
    "atan": AtanSpike,
    "triangle": TriangleSpike,
}


def get_surrogate(name: str) -> type[torch.autograd.Function]:
    """The surrogate Function registered under ``name`` (one of ``SURROGATES``)."""
    if name not in SURROGATES:
        raise ValueError(f"unknown surrogate {name!r}; choose one of {sorted(SURROGATES)}")
    return SURROGATES[name]


def spike(z: Tensor, surrogate: str = "rect", width: float = 1.0) -> Tensor:
    """o = H(z) with the named surrogate gradient. z: any shape; returns the same shape and dtype."""
    return get_surrogate(surrogate).apply(z, width)
