"""The GLIF recursion as fused kernels: one step, all T steps forward, the hand-derived BPTT, and the autograd
Function that runs them compiled (docs/performance.md §1). glif2.neuron builds the coefficients from the neuron's
parameters; this module only sees coefficients.

Shape letters: t steps, b batch, c channels, n the flattened trailing (spatial) dims, r = (b c) rows.

The one recursion both GLIF and GLIF_f reduce to (docs/neuron.md §2.3):

    u_t = decay * u_{t-1} * (1 - reset_mul * o_{t-1}) - drift + gain_t * x_t - reset_sub * o_{t-1}
    o_t = H(u_t - v_th)                      (strict: u_t == v_th gives no spike)

with u_{-1} = 0 and o_{-1} = 0.
"""

from typing import NamedTuple

import torch
from einops import rearrange, reduce, repeat
from torch import Tensor

from glif2.compile import compile_kernel
from glif2.surrogate import get_surrogate


class GLIFState(NamedTuple):
    u: Tensor  # membrane potential before reset, r n
    o: Tensor  # spike of the previous step, r n


class GLIFCoeffs(NamedTuple):
    """Per-channel coefficients of the recursion; every field is `c 1` except gain (`t c 1`)."""

    decay: Tensor
    reset_mul: Tensor
    drift: Tensor
    reset_sub: Tensor
    v_th: Tensor
    gain: Tensor


def glif_step(x_t: Tensor, gain_t: Tensor, state: GLIFState, p: GLIFCoeffs) -> tuple[Tensor, GLIFState]:
    """One time step. x_t: r n (compute dtype), every coefficient broadcastable to it. Returns (spike, state)."""
    u = p.decay * state.u * (1.0 - p.reset_mul * state.o) - p.drift + gain_t * x_t - p.reset_sub * state.o
    o = (u > p.v_th).to(u.dtype)
    return o, GLIFState(u, o)


def _compute_dtype(x: Tensor, p: GLIFCoeffs) -> torch.dtype:
    # The membrane is accumulated in at least float32 (bf16/fp16 inputs), and in float64 when the neuron's
    # parameters are float64 (the released CIFAR10-DVS gates, docs/neuron.md §9 Q13).
    return torch.promote_types(torch.promote_types(x.dtype, p.decay.dtype), torch.float32)


def glif_forward(x: Tensor, p: GLIFCoeffs) -> Tensor:
    """All T steps. x: t r n (r rows, each with its own coefficients `r 1`, gain `t r 1`) -> spikes, x's dtype."""
    dtype = _compute_dtype(x, p)
    zero = torch.zeros(x.shape[1:], dtype=dtype, device=x.device)
    state = GLIFState(zero, zero)
    spikes = []
    for t in range(x.shape[0]):
        o, state = glif_step(x[t].to(dtype), p.gain[t], state, p)
        spikes.append(o.to(x.dtype))
    return torch.stack(spikes)


def glif_backward(
    grad_out: Tensor, x: Tensor, p: GLIFCoeffs, surrogate: str, width: float
) -> tuple[Tensor, GLIFCoeffs]:
    """Hand-derived BPTT over x: t r n. Recomputes u from x (nothing else is saved), then runs backwards in time.

    With h_t = 1 - reset_mul * o_{t-1} and sg_t = surrogate'(u_t - v_th):
        dL/do_t = g_t - du_{t+1} * (decay * reset_mul * u_t + reset_sub)
        du_t    = dL/do_t * sg_t + du_{t+1} * decay * h_{t+1}
    and each coefficient's gradient follows from u_t's dependence on it. Returns dL/dx (t r n, x's dtype) and the
    coefficient gradients summed over n only (`r 1`, gain `t r 1`).
    """
    derivative = get_surrogate(surrogate).derivative
    dtype = _compute_dtype(x, p)
    steps = x.shape[0]
    zero = torch.zeros(x.shape[1:], dtype=dtype, device=x.device)
    state = GLIFState(zero, zero)
    us, os_ = [], []
    for t in range(steps):
        _, state = glif_step(x[t].to(dtype), p.gain[t], state, p)
        us.append(state.u)
        os_.append(state.o)

    d_decay = d_mul = d_drift = d_sub = d_vth = zero
    d_gain, d_x = [], []
    du_next = zero
    for t in reversed(range(steps)):
        u, o = us[t], os_[t]
        u_prev, o_prev = (us[t - 1], os_[t - 1]) if t > 0 else (zero, zero)
        d_o = grad_out[t].to(dtype)
        if t < steps - 1:
            d_o = d_o - du_next * (p.decay * p.reset_mul * u + p.reset_sub)
        d_fire = d_o * derivative(u - p.v_th, width)
        du = d_fire if t == steps - 1 else d_fire + du_next * p.decay * (1.0 - p.reset_mul * o)
        d_decay = d_decay + du * u_prev * (1.0 - p.reset_mul * o_prev)
        d_mul = d_mul - du * p.decay * u_prev * o_prev
        d_drift = d_drift - du
        d_sub = d_sub - du * o_prev
        d_vth = d_vth - d_fire
        d_gain.append((du * x[t].to(dtype)).sum(-1, keepdim=True))
        d_x.append((du * p.gain[t]).to(x.dtype))
        du_next = du

    def over_n(g: Tensor) -> Tensor:
        return g.sum(-1, keepdim=True)

    grads = GLIFCoeffs(
        over_n(d_decay), over_n(d_mul), over_n(d_drift), over_n(d_sub), over_n(d_vth), torch.stack(d_gain[::-1])
    )
    return torch.stack(d_x[::-1]), grads


def _rows(p: GLIFCoeffs, b: int) -> GLIFCoeffs:
    """`c 1` coefficients -> one per row of `(b c) n`. The kernels index every operand by row alone, which keeps
    inductor's backward in a single loop nest (per-channel operands made it split the nest and spill temporaries)."""
    rows = (repeat(v, "c 1 -> (b c) 1", b=b) for v in p[:5])
    return GLIFCoeffs(*rows, gain=repeat(p.gain, "t c 1 -> t (b c) 1", b=b))


def fused_forward(x: Tensor, p: GLIFCoeffs) -> Tensor:
    """x: t b c n, coefficients `c 1` -> spikes t b c n."""
    b = x.shape[1]
    spikes = glif_forward(rearrange(x, "t b c n -> t (b c) n"), _rows(p, b))
    return rearrange(spikes, "t (b c) n -> t b c n", b=b)


def fused_backward(
    grad_out: Tensor, x: Tensor, p: GLIFCoeffs, surrogate: str, width: float
) -> tuple[Tensor, GLIFCoeffs]:
    """Gradients for x (t b c n) and for the `c 1` coefficients (summed over n in the fused loop, then over b)."""
    b = x.shape[1]
    d_x, g = glif_backward(
        rearrange(grad_out, "t b c n -> t (b c) n"), rearrange(x, "t b c n -> t (b c) n"), _rows(p, b), surrogate, width
    )
    grads = GLIFCoeffs(
        *(reduce(v, "(b c) 1 -> c 1", "sum", b=b).to(v_p.dtype) for v, v_p in zip(g[:5], p[:5], strict=True)),
        gain=reduce(g.gain, "t (b c) 1 -> t c 1", "sum", b=b).to(p.gain.dtype),
    )
    return rearrange(d_x, "t (b c) n -> t b c n", b=b), grads


# glif2's compiled kernels; the plain functions inside eager_kernels() or an outer compiled graph (compile_kernel)
fused_forward_kernel = compile_kernel(fused_forward)
fused_backward_kernel = compile_kernel(fused_backward)


class GLIFFunction(torch.autograd.Function):
    """Fused GLIF over all steps on x: t b c n: compiled forward, compiled hand-derived backward, only x saved."""

    @staticmethod
    def forward(x: Tensor, surrogate: str, width: float, *coeffs: Tensor) -> Tensor:
        return fused_forward_kernel(x, GLIFCoeffs(*coeffs))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, surrogate, width, *coeffs = inputs
        ctx.save_for_backward(x, *coeffs)
        ctx.surrogate, ctx.width = surrogate, width

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, *coeffs = ctx.saved_tensors
        d_x, d_coeffs = fused_backward_kernel(grad_out, x, GLIFCoeffs(*coeffs), ctx.surrogate, ctx.width)
        return d_x, None, None, *d_coeffs


__all__ = [
    "GLIFCoeffs",
    "GLIFFunction",
    "GLIFState",
    "fused_backward",
    "fused_backward_kernel",
    "fused_forward",
    "fused_forward_kernel",
    "glif_backward",
    "glif_forward",
    "glif_step",
]
