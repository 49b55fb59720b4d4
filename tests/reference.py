"""Independent, naive float64 references for the tests, written straight from the paper's equations
(docs/neuron.md §2.1) and the surrogate windows' formulas (docs/neuron.md §5); nothing here imports glif2.

naive_glif uses the gates alpha, beta, gamma directly (not the fused kernels' coefficient form) and autograd for the
gradients, with its own surrogate spike: a Heaviside forward whose backward is one of `WINDOWS`.
"""

import math

import torch

# dH/dz replaced by a window of unit area and width w (z = u - v_th), each written from its formula.
WINDOWS = {
    "rect": lambda z, w: (z.abs() < w / 2).to(z.dtype) / w,  # strict ends: |z| = w/2 gives 0
    # the logistic density with scale w/4 (symmetric, written with |z| so that it cannot overflow)
    "sigmoid": lambda z, w: (4 / w) * torch.exp(-4 * z.abs() / w) / (1 + torch.exp(-4 * z.abs() / w)) ** 2,
    # the Cauchy density with scale w/pi
    "atan": lambda z, w: (w / math.pi) / (math.pi * ((w / math.pi) ** 2 + z * z)),
    "triangle": lambda z, w: torch.where(z.abs() < w, (w - z.abs()) / (w * w), torch.zeros_like(z)),
}


class SurrogateSpike64(torch.autograd.Function):
    """o = H(z) (z = 0 gives no spike); backward: the named window."""

    @staticmethod
    def forward(ctx, z, name, width):
        ctx.save_for_backward(z)
        ctx.name, ctx.width = name, width
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return g * WINDOWS[ctx.name](z, ctx.width), None, None


def surrogate_spike(name: str = "rect", width: float = 1.0):
    """The spike function `z -> H(z)` with the named window as its gradient."""
    return lambda z: SurrogateSpike64.apply(z, name, width)


def naive_glif(x, alpha, beta, gamma, tau, v_th, leak, v_reset, conduct, variant="glif", spike=None):
    """x: [T, B, C, ...]; every parameter is an effective value (already through the sigmoid), shaped to broadcast
    against x[t] (e.g. [C, 1, 1] or a scalar); conduct has T in front. `spike` defaults to the rectangle of width 1
    (the reference). Returns (spikes, membranes)."""
    spike = spike or surrogate_spike("rect", 1.0)
    u = torch.zeros_like(x[0])
    o = torch.zeros_like(x[0])
    spikes, membranes = [], []
    for t in range(x.shape[0]):
        if variant == "glif":
            current = x[t] * (1 - beta * (1 - conduct[t]))
            u = (1 - alpha * (1 - tau)) * u * (1 - gamma * o) - (1 - alpha) * leak + current - (1 - gamma) * v_reset * o
        else:
            u = tau * u * (1 - o) - leak + conduct[t] * x[t] - v_reset * o
        o = spike(u - v_th)
        spikes.append(o)
        membranes.append(u)
    return torch.stack(spikes), torch.stack(membranes)
