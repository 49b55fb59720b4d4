"""An independent, naive float64 GLIF written straight from the paper's equations (docs/neuron.md §2.1), for tests.

It uses the gates alpha, beta, gamma directly (not the fused kernels' coefficient form) and autograd for the
gradients, with its own rectangle-surrogate spike.
"""

import torch


class RectSpike64(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return g * (z.abs() < 0.5).to(z.dtype)


def naive_glif(x, alpha, beta, gamma, tau, v_th, leak, v_reset, conduct, variant="glif", spike=RectSpike64.apply):
    """x: [T, B, C, ...]; every parameter is an effective value (already through the sigmoid), shaped to broadcast
    against x[t] (e.g. [C, 1, 1] or a scalar); conduct has T in front. Returns (spikes, membranes)."""
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
