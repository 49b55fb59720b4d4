"""Exact BPTT in a fraction of the memory: packed spikes and a fused BN -> GLIF backward (docs/performance.md §5).

Shape letters: t steps, b batch, c channels, h w space, n flattened trailing dims, m packed bytes.

Training keeps, for every layer and step, what its backward needs. With autograd as is ("off"), a conv -> BN -> GLIF
unit keeps three float tensors of the unit's size: the conv's input spikes, the BN input and the GLIF input. Yet
spikes carry one bit, and the GLIF input is a per-channel affine function of the BN input. The memory modes:

- "lean" (the default): every tensor of few known values that a layer keeps (spikes, pooled spikes, SEW sums) is
  kept packed, `Grid.bits` bits per value; BN (with the residual add) and the GLIF after it form one autograd unit
  (the custom ops glif2::unit_forward / unit_backward) that keeps the BN input once plus per-channel statistics,
  and recomputes the GLIF input in its backward. No extra convolution.
- "recompute": the unit also drops the conv output and recomputes it in the backward from the packed spikes (one
  extra convolution forward per layer), keeping about one bit per neuron-step.
- "off": plain autograd, for comparison and debugging.

Every mode computes the same numbers: the forward runs the same kernels in the same order, and every backward
calls the ATen backward that autograd itself would call (convolution_backward, native_batch_norm_backward,
avg_pool2d_backward), on inputs rebuilt bit for bit. Evaluation and no-grad inference always take the plain path.
"""

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.utils import _pair

from glif2.analysis import FiringRates
from glif2.compile import compile_kernel
from glif2.layers import merge_time, split_time, tdBatchNorm
from glif2.neuron import GLIF, GLIFCoeffs, fused_kernels

MEMORY_MODES = ("lean", "recompute", "off")

# helpers


@dataclass(frozen=True)
class Grid:
    """Values known to be k / scale for integers 0 <= k <= top: spikes are Grid(1, 1), the sum of two spike tensors
    Grid(1, 2), a 2x2 average of spikes Grid(4, 4). scale is a power of two, so k / scale is exact in floating
    point and the packed integers rebuild the values bit for bit."""

    scale: int = 1
    top: int = 1

    @property
    def bits(self) -> int | None:
        """Bits per value when packed (1, 2, 4 or 8; a byte holds 8 / bits values), or None if more than 8."""
        return next((b for b in (1, 2, 4, 8) if self.top < 2**b), None)

    def __add__(self, other: "Grid") -> "Grid":
        scale = max(self.scale, other.scale)  # powers of two: the larger is a multiple of the smaller
        return Grid(scale, self.top * (scale // self.scale) + other.top * (scale // other.scale))

    def __mul__(self, other: "Grid") -> "Grid":
        return Grid(self.scale * other.scale, self.top * other.top)

    def pooled(self, window: int) -> "Grid | None":
        """The grid of an average over `window` values (None unless window is a power of two)."""
        return Grid(self.scale * window, self.top * window) if window & (window - 1) == 0 else None


SPIKES = Grid(1, 1)


def pack(x: Tensor, grid: Grid) -> Tensor:
    """x (every value on `grid`) -> uint8 `m`: 8 / bits values per byte, in x's flat order, zero-padded."""
    bits = grid.bits
    per = 8 // bits
    q = (x.detach().reshape(-1) * grid.scale).to(torch.uint8)  # exact: the values are integers / scale
    q = rearrange(F.pad(q, (0, (-q.numel()) % per)), "(m k) -> m k", k=per)
    # One OR per field, unrolled: a pointwise kernel over the `per` strided columns (a sum over the last dim of
    # size `per` made inductor emit a kernel 15x slower than eager).
    packed = q[:, 0]
    for k in range(1, per):
        packed = packed | (q[:, k] << (bits * k))
    return packed


def unpack(packed: Tensor, grid: Grid, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The inverse of `pack`: the tensor of `shape` and `dtype` whose values were packed."""
    bits = grid.bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    q = (rearrange(packed, "m -> m 1") >> shifts) & (2**bits - 1)
    values = q.reshape(-1)[: math.prod(shape)].reshape(shape).to(dtype)
    return values / grid.scale if grid.scale != 1 else values


_pack_kernel = compile_kernel(pack)
_unpack_kernel = compile_kernel(unpack)

# How a layer keeps an input for its backward (`Encoding`, a tuple of plain values so that it can travel through
# autograd.Function arguments under dynamo): None keeps the tensor itself; ("bits", scale, top) keeps it packed;
# ("repeat", t) keeps the image `b c h w` that was repeated into `(t b) c h w`.
Encoding = tuple | None


def decode(saved: Tensor, encoding: Encoding, shape: tuple[int, ...], dtype: torch.dtype, eager: bool) -> Tensor:
    """Rebuilds, bit for bit, the tensor a layer kept as `saved` under `encoding`.

    Under torch.compile the rebuilt tensor starts from an alias of `saved`: a node the forward does not have, so that
    common-subexpression elimination cannot merge the rebuilding with the forward's own computation (the backward
    would then use, and the partitioner keep, the forward's tensor itself: the T copies of a repeated image, say).
    Inductor drops the alias; eagerly nothing is done."""
    if torch.compiler.is_compiling():
        saved = torch.ops.aten.alias(saved)
    if encoding is None:
        return saved
    if encoding[0] == "bits":
        return _unpack_kernel(eager)(saved, Grid(encoding[1], encoding[2]), shape, dtype)
    return repeat(saved, "b c h w -> (t b) c h w", t=encoding[1]).to(dtype)


class Act:
    """An activation `t b c ...` on the lean path, with what is known of its values: a Grid (then consumers keep it
    packed, packing once however many consumers there are) or the image it repeats over t."""

    def __init__(self, x: Tensor, grid: Grid | None = None, image: Tensor | None = None, eager: bool = False):
        self.x, self.grid, self.image, self.eager = x, grid, image, eager
        self._packed: Tensor | None = None

    def kept(self) -> tuple[Tensor, Encoding]:
        """(what a consumer keeps for its backward, the encoding that rebuilds x from it)."""
        if self.grid is not None and self.grid.bits is not None:
            if self._packed is None:
                self._packed = _pack_kernel(self.eager)(self.x, self.grid)
            return self._packed, ("bits", self.grid.scale, self.grid.top)
        if self.image is not None:
            return self.image, ("repeat", self.x.shape[0])
        return self.x, None

    def then(self, x: Tensor, grid: Grid | None = None) -> "Act":
        """The next activation (same eagerness)."""
        return Act(x, grid, eager=self.eager)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    # What autocast does to a conv's inputs, done explicitly (and recorded by autograd) so that the custom Functions
    # below can run with autocast off and their backward sees the same dtypes as autograd's would.
    return t if dtype is None or t.dtype == dtype or not t.is_floating_point() else t.to(dtype)


# classes: the autograd Functions


class PackedConv(torch.autograd.Function):
    """conv2d (no bias) whose input is kept encoded (packed spikes, or the repeated image) for the backward."""

    @staticmethod
    def forward(x: Tensor, kept: Tensor | None, weight: Tensor, encoding: Encoding, conv: tuple, eager: bool) -> Tensor:
        return F.conv2d(x, weight, None, *conv)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, kept, weight, encoding, conv, eager = inputs
        ctx.save_for_backward(x if kept is None else kept, weight)  # kept None: the input itself
        ctx.meta = (tuple(x.shape), x.dtype, encoding, conv, eager)

    @staticmethod
    def backward(ctx, grad: Tensor):
        kept, weight = ctx.saved_tensors
        shape, dtype, encoding, conv, eager = ctx.meta
        x = decode(kept, encoding, shape, dtype, eager)
        gx, gw = _conv_backward(grad, x, weight, conv, ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        return gx, None, gw, None, None, None


class PackedLinear(torch.autograd.Function):
    """linear (no bias) on `n f` whose input is kept packed for the backward."""

    @staticmethod
    def forward(x: Tensor, kept: Tensor, weight: Tensor, encoding: Encoding, eager: bool) -> Tensor:
        return F.linear(x, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, kept, weight, encoding, eager = inputs
        ctx.save_for_backward(kept, weight)
        ctx.meta = (tuple(x.shape), x.dtype, encoding, eager)

    @staticmethod
    def backward(ctx, grad: Tensor):
        kept, weight = ctx.saved_tensors
        shape, dtype, encoding, eager = ctx.meta
        x = decode(kept, encoding, shape, dtype, eager)
        gx = grad.mm(weight) if ctx.needs_input_grad[0] else None  # what autograd's linear backward computes
        gw = grad.t().mm(x) if ctx.needs_input_grad[2] else None
        return gx, None, gw, None, None


class AvgPoolNoSave(torch.autograd.Function):
    """avg_pool2d keeping nothing: its backward needs only the input's shape."""

    @staticmethod
    def forward(x: Tensor, args: tuple) -> Tensor:
        return F.avg_pool2d(x, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, args = inputs
        ctx.meta = (tuple(x.shape), args)

    @staticmethod
    def backward(ctx, grad: Tensor):
        shape, (kernel, stride, padding, ceil_mode, count_include_pad, divisor) = ctx.meta
        like = grad.new_zeros(()).expand(shape)  # shape and dtype only: the kernel never reads the values
        return torch.ops.aten.avg_pool2d_backward(grad, like, kernel, stride, padding, ceil_mode, count_include_pad,
                                                  divisor), None


class GridMul(torch.autograd.Function):
    """a * b (SEW's AND / IAND connections) keeping both factors packed."""

    @staticmethod
    def forward(a: Tensor, a_kept: Tensor | None, b: Tensor, b_kept: Tensor | None, encodings: tuple,
                eager: bool) -> Tensor:
        return a * b

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, a_kept, b, b_kept, encodings, eager = inputs
        ctx.save_for_backward(a if a_kept is None else a_kept, b if b_kept is None else b_kept)
        ctx.meta = (tuple(a.shape), a.dtype, tuple(b.shape), b.dtype, encodings, eager)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a_kept, b_kept = ctx.saved_tensors
        a_shape, a_dtype, b_shape, b_dtype, (a_enc, b_enc), eager = ctx.meta
        ga = grad * decode(b_kept, b_enc, b_shape, b_dtype, eager) if ctx.needs_input_grad[0] else None
        gb = grad * decode(a_kept, a_enc, a_shape, a_dtype, eager) if ctx.needs_input_grad[2] else None
        return ga, None, gb, None, None, None


def _conv_backward(grad: Tensor, x: Tensor, weight: Tensor, conv: tuple, need_x: bool, need_w: bool):
    stride, padding, dilation, groups = conv
    gx, gw, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False,
                                                    [0] * len(stride), groups, [need_x, need_w, False])
    return gx, gw


# The fused unit. Per branch k, the GLIF input is the sum of BN_k(y_k); y_k is the BN's input (kept as it is, or
# packed when it is on a grid) or, in "recompute", conv_k(z_k) rebuilt from the conv's packed input z_k. Each branch
# contributes BRANCH_TENSORS tensors: z (the BN or conv input, for the gradient's path), what is kept of it (None:
# z itself), the conv weight (or None), the BN's training weight and bias, and the batch mean and invstd.
#
# The unit is a pair of custom ops rather than an autograd.Function so that it stays opaque under torch.compile:
# traced into the joint graph, the backward's recomputation (BN output, the T-step membrane) depends on forward
# values only, and the partitioner would move it into the forward and save its intermediates (a mask per step).
BRANCH_TENSORS = 7


@dataclass(frozen=True)
class Branch:
    """One BN input of a unit: static facts (plain values) and its tensors."""

    bn: _BatchNorm
    z: Tensor
    kept: Tensor | None  # None: z itself is kept
    encoding: Encoding
    conv_weight: Tensor | None = None
    conv: tuple | None = None


@torch.library.custom_op("glif2::batch_norm_train", mutates_args=("running_mean", "running_var"))
def batch_norm_train(y: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                     momentum: float, eps: float, group: str) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN of y without autograd: (output, batch mean, batch invstd), running statistics updated in
    place (empty running tensors: none kept; group "": this process's batch). The ATen kernel the plain path runs, kept
    opaque under torch.compile so that the backward's recomputation (the same kernel) rebuilds the output bit for
    bit."""
    rm, rv = (r if r.numel() else None for r in (running_mean, running_var))
    if not group:
        return torch.ops.aten.native_batch_norm(y, weight, bias, rm, rv, True, momentum, eps)
    return _sync_forward(y, weight, bias, rm, rv, momentum, eps, _group(group))


@batch_norm_train.register_fake
def _(y, weight, bias, running_mean, running_var, momentum, eps, group):
    acc = torch.promote_types(y.dtype, torch.float32)
    return y.new_empty(y.shape), y.new_empty((y.shape[1],), dtype=acc), y.new_empty((y.shape[1],), dtype=acc)


@functools.lru_cache(maxsize=1024)
def _parse(spec: str) -> list:
    # A unit's spec is the same string every step: parse it once. Read-only: the result is shared.
    return json.loads(spec)


@torch.library.custom_op("glif2::unit_forward", mutates_args=())
def unit_forward(v: Tensor, tensors: list[Tensor], coeffs: list[Tensor], spec: str) -> Tensor:
    """GLIF over the (already computed, time-merged) input v, or v itself when the unit has no neuron. `tensors`
    (each branch's; an empty tensor stands for None) and `spec` (JSON: the branches' static facts, the neuron's) are
    for the backward."""
    neuron, eager = _parse(spec)[1:]
    if neuron is None:
        return v.clone()
    v_t = split_time(v, neuron["t"])
    return fused_kernels(eager)[0](rearrange(v_t, neuron["pattern"]), GLIFCoeffs(*coeffs)).reshape(v_t.shape)


@unit_forward.register_fake
def _(v, tensors, coeffs, spec):
    neuron = _parse(spec)[1]
    return v.new_empty(split_time(v, neuron["t"]).shape if neuron is not None else v.shape)


@torch.library.custom_op("glif2::unit_backward", mutates_args=())
def unit_backward(grad: Tensor, kept: list[Tensor], conv_weights: list[Tensor], stats: list[Tensor],
                  coeffs: list[Tensor], needs: list[bool], spec: str) -> list[Tensor]:
    """The unit's backward: rebuild each BN input bit for bit (unpack, or redo the conv), the BN outputs and their
    sum (the GLIF input), run the fused GLIF backward, then each BN's and conv's ATen backward. `stats` holds
    (weight, bias, mean, invstd) per branch, and `needs` which of (z, conv weight, BN weight, BN bias) need a gradient.
    Returns per branch the gradients of z, the conv weight, the BN weight and bias, then the coefficients' gradients
    (empty tensors where none is needed)."""
    branches, neuron, eager = _parse(spec)
    ys, parts = [], []
    for k, br in enumerate(branches):
        weight, bias, mean, invstd = stats[4 * k : 4 * k + 4]
        encoding = tuple(br["encoding"]) if br["encoding"] is not None else None
        z = decode(kept[k], encoding, tuple(br["shape"]), getattr(torch, br["dtype"]), eager)
        conv = _conv_tuple(br["conv"])
        y = F.conv2d(z, conv_weights[k], None, *conv) if conv is not None else z
        ys.append((z, y))
        parts.append(_bn_apply(y, weight, bias, mean, invstd, br["eps"], _group(br["group"])))
    d_coeffs: list[Tensor] = []
    if neuron is None:
        dv = grad
    else:
        v = parts[0]
        for part in parts[1:]:
            v = v + part  # the plain path's add, in its order
        v_t, pattern = split_time(v, neuron["t"]), neuron["pattern"]
        d_flat, d = fused_kernels(eager)[1](rearrange(grad, pattern), rearrange(v_t, pattern), GLIFCoeffs(*coeffs),
                                            neuron["surrogate"], neuron["width"])
        dv, d_coeffs = merge_time(d_flat.reshape(v_t.shape)), list(d)
    out = []
    for k, br in enumerate(branches):
        weight, _, mean, invstd = stats[4 * k : 4 * k + 4]
        z, y = ys[k]
        conv = _conv_tuple(br["conv"])
        need_z, need_cw, need_w, need_b = needs[4 * k : 4 * k + 4]
        gy, g_w, g_b = _bn_backward(dv, y, weight, mean, invstd, br["eps"], _group(br["group"]),
                                    (need_z or need_cw, need_w, need_b))
        gz, g_cw = gy, None
        if conv is not None:
            gz, g_cw = _conv_backward(gy, z, conv_weights[k], conv, need_z, need_cw) if need_z or need_cw else (None,
                                                                                                                None)
        out += [_or_empty(g, grad) for g in (gz, g_cw, g_w, g_b)]
    return out + d_coeffs


@unit_backward.register_fake
def _(grad, kept, conv_weights, stats, coeffs, needs, spec):
    branches, neuron, _ = _parse(spec)
    out = []
    for k, br in enumerate(branches):
        z_shape, (need_z, need_cw, need_w, need_b) = br["shape"], needs[4 * k : 4 * k + 4]
        weight = stats[4 * k]
        out += [grad.new_empty(z_shape if need_z else (0,), dtype=getattr(torch, br["dtype"])),
                grad.new_empty(conv_weights[k].shape if need_cw else (0,), dtype=conv_weights[k].dtype),
                grad.new_empty(weight.shape if need_w else (0,), dtype=weight.dtype),
                grad.new_empty(weight.shape if need_b else (0,), dtype=weight.dtype)]
    return out + ([c.new_empty(c.shape) for c in coeffs] if neuron is not None else [])


def _or_empty(g: Tensor | None, like: Tensor) -> Tensor:
    # A custom op returns tensors only: an empty one stands for "no gradient".
    return g if g is not None else like.new_empty((0,))


def _conv_tuple(conv) -> tuple | None:
    return None if conv is None else (tuple(conv[0]), tuple(conv[1]), tuple(conv[2]), conv[3])


def _group(name: str | None):
    return None if name is None else dist.distributed_c10d._resolve_process_group(name)


def _unit_setup_context(ctx, inputs, output):
    v, tensors, coeffs, spec = inputs
    branches = _parse(spec)[0]
    kept, conv_weights, stats = [], [], []
    for k, br in enumerate(branches):
        z, kept_k, conv_w, bn_w, bn_b, mean, invstd = tensors[k * BRANCH_TENSORS : (k + 1) * BRANCH_TENSORS]
        kept.append(z if br["kept_is_z"] else kept_k)
        conv_weights.append(conv_w)  # an empty tensor when the branch has no conv
        stats += [bn_w, bn_b, mean, invstd]
    ctx.save_for_backward(*kept, *conv_weights, *stats, *coeffs)
    ctx.counts = len(branches)
    ctx.spec = spec
    # per branch: does z, its conv weight, the BN weight, the BN bias need a gradient (BRANCH_TENSORS 0, 2, 3, 4)
    ctx.needs = [tensors[k * BRANCH_TENSORS + i].requires_grad for k in range(len(branches)) for i in (0, 2, 3, 4)]


def _unit_backward(ctx, grad: Tensor):
    n = ctx.counts
    saved = ctx.saved_tensors
    kept, conv_weights, stats, coeffs = saved[:n], saved[n : 2 * n], saved[2 * n : 6 * n], saved[6 * n :]
    out = unit_backward(grad, list(kept), list(conv_weights), list(stats), list(coeffs), ctx.needs, ctx.spec)
    grads = [g if need else None for g, need in zip(out[: 4 * n], ctx.needs, strict=True)]
    tensor_grads = []
    for k in range(n):
        gz, g_cw, g_w, g_b = grads[4 * k : 4 * k + 4]
        tensor_grads += [gz, None, g_cw, g_w, g_b, None, None]
    return None, tensor_grads, list(out[4 * n :]), None


torch.library.register_autograd("glif2::unit_forward", _unit_backward, setup_context=_unit_setup_context)


def _bn_apply(y: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor, eps: float, group) -> Tensor:
    """Training-mode BN output from the batch statistics, bit for bit what the forward computed."""
    if group is None:
        # The ATen kernel recomputes the same statistics and applies them in its own order: an explicit formula
        # would differ from the forward by an ulp.
        return torch.ops.aten.native_batch_norm(y, weight, bias, None, None, True, 0.0, eps)[0]
    return _sync_apply(y, weight, bias, mean, invstd)


def _bn_backward(dv: Tensor, y: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, eps: float, group,
                 mask: tuple[bool, bool, bool]):
    if group is None:
        return torch.ops.aten.native_batch_norm_backward(dv, y, weight, None, None, mean, invstd, True, eps,
                                                         list(mask))
    return _sync_backward(dv, y, weight, mean, invstd, group, mask)


# SyncBatchNorm across processes (any device: torch's own SyncBatchNorm runs on GPUs only). The statistics are
# those of the whole global batch; the weight and bias gradients are the local ones (DDP averages them), the input
# gradient uses the globally reduced sums, as torch's SyncBatchNorm does.

_C = "c -> 1 c 1 1"


def _all_sum(t: Tensor, group) -> Tensor:
    # Functional collectives: the same in eager and traceable by dynamo (a compiled step keeps one graph).
    return funcol.all_reduce(t, "sum", group)


def _sync_stats(y: Tensor, eps: float, group) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, biased var, invstd, total count) over the batch of every rank; two collectives, two passes."""
    acc = torch.promote_types(y.dtype, torch.float32)
    count = torch.full((1,), y.numel() / y.shape[1], dtype=acc, device=y.device)
    sums = _all_sum(torch.cat([y.sum((0, 2, 3), dtype=acc), count]), group)
    count = sums[-1]
    mean = sums[:-1] / count
    m2 = _all_sum(((y.to(acc) - rearrange(mean, _C)) ** 2).sum((0, 2, 3)), group)
    var = m2 / count
    return mean, var, torch.rsqrt(var + eps), count


def _sync_forward(y: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                  momentum: float, eps: float, group) -> tuple[Tensor, Tensor, Tensor]:
    """(BN output, mean, invstd) with the statistics of the global batch; running statistics updated in place."""
    mean, var, invstd, count = _sync_stats(y, eps, group)
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        unbiased = var * count / (count - 1).clamp(min=1)
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return _sync_apply(y, weight, bias, mean, invstd), mean, invstd


def _sync_apply(y: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    acc = mean.dtype
    out = (y.to(acc) - rearrange(mean, _C)) * rearrange(invstd * weight.to(acc), _C) + rearrange(bias.to(acc), _C)
    return out.to(y.dtype)


def _sync_backward(dv: Tensor, y: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, group, mask):
    acc = mean.dtype
    dv_acc, xmu = dv.to(acc), y.to(acc) - rearrange(mean, _C)
    local = torch.stack([dv_acc.sum((0, 2, 3)), (dv_acc * xmu).sum((0, 2, 3))])
    g_w = (local[1] * invstd).to(weight.dtype) if mask[1] else None
    g_b = local[0].to(weight.dtype) if mask[2] else None
    gy = None
    if mask[0]:
        count = torch.full((1, 1), y.numel() / y.shape[1], dtype=acc, device=y.device)
        total = _all_sum(torch.cat([local, count.expand(1, local.shape[1])]), group)
        mean_dy, mean_dy_xmu = rearrange(total[:2] / total[2:], "k c -> k 1 c 1 1")
        gy = ((dv_acc - mean_dy - xmu * rearrange(invstd, _C) ** 2 * mean_dy_xmu)
              * rearrange(invstd * weight.to(acc), _C)).to(y.dtype)
    return gy, g_w, g_b


# helpers: the lean building blocks the networks call


@dataclass(frozen=True)
class Lean:
    """How a training forward saves memory: mode "lean" or "recompute"; eager: the kernels uncompiled."""

    mode: str
    eager: bool = False


def lean_of(model: nn.Module) -> Lean | None:
    """The lean setting for this forward of `model`, or None for the plain path (memory "off", evaluation, or no
    gradient being recorded)."""
    mode = getattr(model, "memory", "off")
    if mode == "off" or not model.training or not torch.is_grad_enabled():
        return None
    return Lean(mode, eager=any(getattr(m, "eager", False) for m in model.modules() if isinstance(m, GLIF)))


def _bn_parts(bn: _BatchNorm) -> tuple[Tensor, Tensor, float]:
    """(training weight, bias, momentum) exactly as the module's own training forward would use them, counting the
    batch as its forward does."""
    if not bn.affine:
        raise ValueError("the lean memory modes need affine BatchNorm layers; use memory='off'")
    if bn.momentum is None:
        raise ValueError("the lean memory modes need BatchNorm layers with a momentum (not the cumulative average of "
                         "momentum=None); use memory='off'")
    weight = bn.train_weight() if isinstance(bn, tdBatchNorm) else bn.weight
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
    return weight, bn.bias, bn.momentum


def _sync_group(bn: nn.Module):
    if not isinstance(bn, nn.SyncBatchNorm) or not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def unit(branches: list[Branch], neuron: GLIF | None, lean: Lean, t: int) -> Tensor:
    """GLIF(sum_k BN_k(y_k)) as one unit (the GLIF input is never kept). Returns `t b c h w` spikes, or the
    time-merged sum `(t b) c h w` when there is no neuron."""
    tensors, statics = [], []
    v = None
    for br in branches:
        weight, bias, momentum = _bn_parts(br.bn)  # with autograd: the training weight's gradient path
        group = _sync_group(br.bn)
        none = br.z.new_empty((0,))  # a custom op takes no None in a tensor list
        running = (br.bn.running_mean, br.bn.running_var) if br.bn.track_running_stats else (none, none)
        with torch.no_grad():
            y = F.conv2d(br.z, br.conv_weight, None, *br.conv) if br.conv is not None else br.z
            out, mean, invstd = batch_norm_train(y, weight.detach(), bias.detach(), *running, momentum, br.bn.eps,
                                                 "" if group is None else group.group_name)
        v = out if v is None else v + out  # the plain path's add, in its order
        tensors += [br.z, none if br.kept is None else br.kept, none if br.conv_weight is None else br.conv_weight,
                    weight, bias, mean, invstd]
        statics.append((br.encoding, br.conv, br.bn.eps, br.kept is None, None if group is None else group.group_name,
                        tuple(br.z.shape), br.z.dtype))
    spec_neuron, coeffs = None, []
    if neuron is not None:
        spec_neuron = (t, neuron.flat_pattern(), neuron.surrogate, neuron.surrogate_width)
        coeffs = list(neuron.coefficients())
    spec = _spec_string((tuple(statics), spec_neuron, lean.eager))
    return unit_forward(v, tensors, coeffs, spec)


@torch.compiler.assume_constant_result
def _spec_string(spec: tuple) -> str:
    """The unit's static facts as the JSON string its custom ops take (computed once per trace under compile)."""
    statics, neuron, eager = spec
    branches = [{"encoding": enc, "conv": conv, "eps": eps, "kept_is_z": kept_is_z, "group": group,
                 "shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
                for enc, conv, eps, kept_is_z, group, shape, dtype in statics]
    if neuron is not None:
        neuron = dict(zip(("t", "pattern", "surrogate", "width"), neuron, strict=True))
    return json.dumps([branches, neuron, eager])


def _conv_args(conv: nn.Conv2d) -> tuple:
    if isinstance(conv.padding, str) or conv.bias is not None:
        raise ValueError("the lean memory modes need bias-free convolutions with numeric padding; use memory='off'")
    return tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups


def conv_branch(conv_bn: nn.Sequential, act: Act, lean: Lean) -> Branch:
    """The BN input of a time-merged conv -> BN pair (conv_bn[0], conv_bn[1]) on `act`."""
    conv, bn = conv_bn[0], conv_bn[1]
    dtype = _autocast_dtype(act.x.device)
    x, weight = _cast(merge_time(act.x), dtype), _cast(conv.weight, dtype)
    kept, encoding = act.kept()
    kept = None if encoding is None else kept  # None: the (merged, cast) input itself
    if lean.mode == "recompute":
        return Branch(bn, x, kept, encoding, weight, _conv_args(conv))
    with torch.autocast(act.x.device.type, enabled=False):
        y = PackedConv.apply(x, kept, weight, encoding, _conv_args(conv), lean.eager)
    return Branch(bn, y, None, None)


def bn_branch(bn: _BatchNorm, act: Act) -> Branch:
    """BN applied straight to `act` (the identity-shaped residual shortcut)."""
    kept, encoding = act.kept()
    return Branch(bn, merge_time(act.x), None if encoding is None else kept, encoding)


def conv_bn_spike(conv_bn: nn.Sequential, neuron: GLIF, act: Act, lean: Lean) -> Act:
    """conv -> BN -> GLIF on `act`; spikes out."""
    spikes = unit([conv_branch(conv_bn, act, lean)], neuron, lean, act.x.shape[0])
    return act.then(spikes, SPIKES)


def conv_bn_plain(conv_bn: nn.Sequential, act: Act, lean: Lean) -> Tensor:
    """conv -> BN whose output is not a GLIF's input: the conv keeps its input packed; in "recompute" the BN input
    is dropped too. Returns `t b c h w`."""
    if lean.mode == "recompute":
        return split_time(unit([conv_branch(conv_bn, act, lean)], None, lean, act.x.shape[0]), t=act.x.shape[0])
    y = conv_branch(conv_bn, act, lean).z
    return split_time(conv_bn[1](y), t=act.x.shape[0])


def pool(module: nn.AvgPool2d, act: Act) -> Act:
    """A time-merged average pool that keeps nothing; pooled spikes stay on a (finer) grid."""
    kernel, stride, padding = _pair(module.kernel_size), _pair(module.stride), _pair(module.padding)
    args = (list(kernel), list(stride), list(padding), module.ceil_mode, module.count_include_pad,
            module.divisor_override)
    y = split_time(AvgPoolNoSave.apply(merge_time(act.x), args), t=act.x.shape[0])
    exact = padding == (0, 0) and module.divisor_override is None and act.grid is not None
    return act.then(y, act.grid.pooled(kernel[0] * kernel[1]) if exact else None)


def linear(module: nn.Linear, act: Act, lean: Lean) -> Tensor:
    """A bias-free linear on `act` (`n f`, already merged) keeping its input packed."""
    dtype = _autocast_dtype(act.x.device)
    kept, encoding = act.kept()
    if encoding is None or module.bias is not None:
        return module(act.x)
    with torch.autocast(act.x.device.type, enabled=False):
        return PackedLinear.apply(_cast(act.x, dtype), kept, _cast(module.weight, dtype), encoding, lean.eager)


def multiply(a: Act, b: Act) -> Act:
    """a * b keeping both packed (spikes times spikes)."""
    (a_kept, a_enc), (b_kept, b_enc) = a.kept(), b.kept()
    out = GridMul.apply(a.x, None if a_enc is None else a_kept, b.x, None if b_enc is None else b_kept,
                        (a_enc, b_enc), a.eager)
    return a.then(out, a.grid * b.grid if a.grid and b.grid else None)


def is_conv_bn(m: nn.Module) -> bool:
    return (isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], nn.Conv2d)
            and isinstance(m[1], _BatchNorm))


def is_pool(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and len(m) == 1 and isinstance(m[0], nn.AvgPool2d)


def run_sequence(modules: nn.Sequential, act: Act, lean: Lean) -> Act:
    """A Sequential of time-merged conv -> BN pairs, GLIFs, time-merged average pools and lean-aware blocks (a
    `lean(act, lean)` method), run on the lean path. A conv -> BN followed by a GLIF is one unit."""
    mods = list(modules)
    i = 0
    while i < len(mods):
        m, nxt = mods[i], mods[i + 1] if i + 1 < len(mods) else None
        if is_conv_bn(m) and isinstance(nxt, GLIF):
            act, i = conv_bn_spike(m, nxt, act, lean), i + 2
            continue
        if is_conv_bn(m):
            act = act.then(conv_bn_plain(m, act, lean))
        elif isinstance(m, GLIF):
            act = act.then(m(act.x), SPIKES)
        elif is_pool(m):
            act = pool(m[0], act)
        elif hasattr(m, "lean"):
            act = m.lean(act, lean)
        elif isinstance(m, nn.Sequential):
            act = run_sequence(m, act, lean)
        else:
            act = act.then(m(act.x))
        i += 1
    return act


def image_act(x: Tensor, T: int, lean: Lean) -> Act:
    """An image batch `b c h w` repeated over t (direct coding); the first conv keeps the image, not T copies."""
    return Act(repeat(x, "b c h w -> t b c h w", t=T), image=x, eager=lean.eager)


def set_memory(model: nn.Module, mode: str) -> nn.Module:
    """Sets the memory mode of a model built by glif2 (it must have a lean path: `supports_memory`)."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory={mode!r}; choose one of {MEMORY_MODES}")
    if mode != "off" and not getattr(model, "supports_memory", False):
        raise ValueError(f"{type(model).__name__} has no lean path; build it with memory='off'")
    model.memory = mode
    return model


# measuring


def neuron_steps(model: nn.Module, x: Tensor) -> int:
    """GLIF outputs of one forward of `model` on x, over all layers and steps (the plain path, no autograd)."""
    with torch.no_grad(), FiringRates(model) as counter:
        model(x)
    return sum(counter.counts.values())


def saved_activation_bytes(model: nn.Module, step) -> dict[str, Any]:
    """Bytes of the activations autograd keeps for backward during `step()` (a training forward of `model`): the
    unique storages that torch.autograd.graph.saved_tensors_hooks sees, the model's parameters and buffers not
    counted (the model holds them anyway). Returns {bytes, tensors, by_dtype: {dtype: bytes}}; divide by
    `neuron_steps` for bytes per neuron-step."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, tuple[int, torch.dtype]] = {}

    def keep(t: Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = (storage.nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        result = step()
    del result
    by_dtype: dict[torch.dtype, int] = {}
    for nbytes, dtype in seen.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    return {"bytes": sum(by_dtype.values()), "tensors": len(seen), "by_dtype": by_dtype}


__all__ = ["MEMORY_MODES", "SPIKES", "Act", "Grid", "Lean", "lean_of", "neuron_steps", "pack",
           "run_sequence", "saved_activation_bytes", "set_memory", "unpack"]
