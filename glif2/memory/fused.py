"""The fused unit: BN (with the residual add) and the GLIF after it as one autograd node that keeps the BN input
once and recomputes the GLIF input in its backward. docs/performance.md §5.2.

Shape letters: t steps, b batch, n the time-merged batch `(t b)`, c channels, h w space.

Per branch k, the GLIF input is the sum of BN_k(y_k); y_k is the BN's input (kept as it is, or packed when it is on
a grid) or, in "recompute", conv_k(z_k) rebuilt from the conv's packed input z_k. Every layout the unit's ops pass
around is a NamedTuple with one `flatten` / `unflatten` pair: BranchTensors (what the forward op receives per
branch), SavedBranch (what it keeps), BranchGrads (what the backward returns, and as booleans which gradients are
needed); the static facts are a UnitSpec.

The unit is a pair of custom ops rather than an autograd.Function so that it stays opaque under torch.compile:
traced into the joint graph, the backward's recomputation (BN output, the T-step membrane) depends on forward values
only, and the partitioner would move it into the forward and save its intermediates (a mask per step). A custom
op's schema takes tensors and plain values only, so the UnitSpec crosses it as its canonical text (`encode` /
`parse`): content, not an id, so that a compiled graph saved in one process (the portable compile cache) means the
same in another.
"""

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from glif2.kernels import GLIFCoeffs, fused_backward_kernel, fused_forward_kernel
from glif2.layers import merge_time, split_time
from glif2.memory.batchnorm import batch_norm_train, bn_apply, bn_backward, bn_parts, resolve_group, sync_group_name
from glif2.memory.grid import Encoding, decode
from glif2.memory.saving import ConvSpec, conv_backward
from glif2.neuron import GLIF

# layouts


class BranchSpec(NamedTuple):
    """Static facts of one branch. encoding: how z is kept ("as_is": z itself); conv: the conv that rebuilds the
    BN input from z ("recompute"), or None (z is the BN input); group: the SyncBN process group's name or ""."""

    encoding: Encoding
    conv: ConvSpec | None
    eps: float
    group: str
    shape: tuple[int, ...]
    dtype: str


class NeuronSpec(NamedTuple):
    """Static facts of the unit's GLIF: steps, the einops pattern to the kernels' `t b c n`, its surrogate."""

    t: int
    pattern: str
    surrogate: str
    width: float


class UnitSpec(NamedTuple):
    branches: tuple[BranchSpec, ...]
    neuron: NeuronSpec | None  # None: the unit returns the BN sum itself (no neuron follows)

    def encode(self) -> str:
        return _text(self)


@functools.lru_cache(maxsize=1024)
def parse(text: str) -> UnitSpec:
    """The UnitSpec `encode` wrote (each unit's text is the same every step: parsed once; read-only)."""
    branches, neuron = json.loads(text.replace("'", '"'))
    typed = []
    for encoding, conv, eps, group, shape, dtype in branches:
        conv = ConvSpec(tuple(conv[0]), tuple(conv[1]), tuple(conv[2]), conv[3]) if conv is not None else None
        typed.append(BranchSpec(Encoding(*encoding), conv, eps, group, tuple(shape), dtype))
    return UnitSpec(tuple(typed), NeuronSpec(*neuron) if neuron is not None else None)


class BranchTensors(NamedTuple):
    """What the forward op receives per branch. An empty tensor stands for None (a custom op takes no None in a
    tensor list): kept is empty when z itself is kept, conv_weight when the branch has no conv."""

    z: Tensor  # the BN input, or the conv input in "recompute": the gradient's path
    kept: Tensor
    conv_weight: Tensor
    bn_weight: Tensor  # the training weight (tdBN's alpha * v_th * weight)
    bn_bias: Tensor
    mean: Tensor
    invstd: Tensor


class SavedBranch(NamedTuple):
    """What the unit keeps per branch for its backward."""

    kept: Tensor  # z itself, packed spikes, or the image
    conv_weight: Tensor
    bn_weight: Tensor
    bn_bias: Tensor
    mean: Tensor
    invstd: Tensor


class BranchGrads(NamedTuple):
    """Per branch: the gradients the backward returns (empty tensors where none is needed), or, as booleans, which
    of them are needed."""

    z: Tensor | bool
    conv_weight: Tensor | bool
    bn_weight: Tensor | bool
    bn_bias: Tensor | bool


def flatten(items: Sequence[tuple]) -> list:
    return [v for item in items for v in item]


def unflatten(layout: type, flat: Sequence, count: int) -> list:
    """The first `count` layouts from `flat` (flatten's inverse); the rest of `flat` is the caller's."""
    n = len(layout._fields)
    return [layout(*flat[k * n : (k + 1) * n]) for k in range(count)]


def empty_like_none(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# the custom ops


@torch.library.custom_op("glif2::unit_forward", mutates_args=())
def unit_forward(v: Tensor, tensors: list[Tensor], coeffs: list[Tensor], spec: str) -> Tensor:
    """GLIF over the (already computed, time-merged) input v, or v itself when the unit has no neuron. `tensors`
    (flattened BranchTensors) and `spec` (UnitSpec.encode) are for the backward."""
    neuron = parse(spec).neuron
    if neuron is None:
        return v.clone()
    v_t = split_time(v, neuron.t)
    return fused_forward_kernel(rearrange(v_t, neuron.pattern), GLIFCoeffs(*coeffs)).reshape(v_t.shape)


@unit_forward.register_fake
def _(v, tensors, coeffs, spec):
    neuron = parse(spec).neuron
    return v.new_empty(split_time(v, neuron.t).shape if neuron is not None else v.shape)


def _rebuild(saved: SavedBranch, spec: BranchSpec) -> tuple[Tensor, Tensor, Tensor]:
    """(z, the BN input y, the BN output) rebuilt bit for bit from what the branch kept."""
    z = decode(saved.kept, spec.encoding, spec.shape, getattr(torch, spec.dtype))
    y = F.conv2d(z, saved.conv_weight, None, *spec.conv) if spec.conv is not None else z
    out = bn_apply(y, saved.bn_weight, saved.bn_bias, saved.mean, saved.invstd, spec.eps, resolve_group(spec.group))
    return z, y, out


def _branch_backward(
    dv: Tensor, z: Tensor, y: Tensor, saved: SavedBranch, spec: BranchSpec, needs: BranchGrads
) -> BranchGrads:
    """One branch's BN (and conv) backward from the GLIF input's gradient dv."""
    gy, g_w, g_b = bn_backward(
        dv,
        y,
        saved.bn_weight,
        saved.mean,
        saved.invstd,
        spec.eps,
        resolve_group(spec.group),
        (needs.z or needs.conv_weight, needs.bn_weight, needs.bn_bias),
    )
    gz, g_cw = gy, None
    if spec.conv is not None:
        gz, g_cw = (
            conv_backward(gy, z, saved.conv_weight, spec.conv, needs.z, needs.conv_weight)
            if needs.z or needs.conv_weight
            else (None, None)
        )
    return BranchGrads(*(g if g is not None else empty_like_none(dv) for g in (gz, g_cw, g_w, g_b)))


@torch.library.custom_op("glif2::unit_backward", mutates_args=())
def unit_backward(
    grad: Tensor, saved: list[Tensor], coeffs: list[Tensor], needs: list[bool], spec: str
) -> list[Tensor]:
    """The unit's backward: rebuild each BN input bit for bit (unpack, or redo the conv), the BN outputs and their
    sum (the GLIF input), run the fused GLIF backward, then each BN's and conv's ATen backward. `saved` is the
    flattened SavedBranch list and `needs` the flattened BranchGrads masks. Returns the flattened BranchGrads, then
    the coefficients' gradients."""
    unit = parse(spec)
    count = len(unit.branches)
    branches, masks = unflatten(SavedBranch, saved, count), unflatten(BranchGrads, needs, count)
    rebuilt = [_rebuild(s, b) for s, b in zip(branches, unit.branches, strict=True)]
    d_coeffs: list[Tensor] = []
    if unit.neuron is None:
        dv = grad
    else:
        v = rebuilt[0][2]
        for _, _, part in rebuilt[1:]:
            v = v + part  # the plain path's add, in its order
        v_t, pattern = split_time(v, unit.neuron.t), unit.neuron.pattern
        d_flat, d = fused_backward_kernel(
            rearrange(grad, pattern),
            rearrange(v_t, pattern),
            GLIFCoeffs(*coeffs),
            unit.neuron.surrogate,
            unit.neuron.width,
        )
        dv, d_coeffs = merge_time(d_flat.reshape(v_t.shape)), list(d)
    grads = [
        _branch_backward(dv, z, y, s, b, m)
        for (z, y, _), s, b, m in zip(rebuilt, branches, unit.branches, masks, strict=True)
    ]
    return flatten(grads) + d_coeffs


@unit_backward.register_fake
def _(grad, saved, coeffs, needs, spec):
    unit = parse(spec)
    count = len(unit.branches)
    out = []
    for s, b, m in zip(
        unflatten(SavedBranch, saved, count), unit.branches, unflatten(BranchGrads, needs, count), strict=True
    ):
        out.append(
            BranchGrads(
                z=grad.new_empty(b.shape if m.z else (0,), dtype=getattr(torch, b.dtype)),
                conv_weight=grad.new_empty(s.conv_weight.shape if m.conv_weight else (0,), dtype=s.conv_weight.dtype),
                bn_weight=grad.new_empty(s.bn_weight.shape if m.bn_weight else (0,), dtype=s.bn_weight.dtype),
                bn_bias=grad.new_empty(s.bn_weight.shape if m.bn_bias else (0,), dtype=s.bn_weight.dtype),
            )
        )
    return flatten(out) + ([c.new_empty(c.shape) for c in coeffs] if unit.neuron is not None else [])


def _setup_context(ctx, inputs, output):
    v, tensors, coeffs, spec = inputs
    unit = parse(spec)
    branches = unflatten(BranchTensors, tensors, len(unit.branches))
    saved = [
        SavedBranch(
            b.z if s.encoding.kind == "as_is" else b.kept, b.conv_weight, b.bn_weight, b.bn_bias, b.mean, b.invstd
        )
        for b, s in zip(branches, unit.branches, strict=True)
    ]
    ctx.save_for_backward(*flatten(saved), *coeffs)
    ctx.spec = spec
    ctx.needs = [
        BranchGrads(*(t.requires_grad for t in (b.z, b.conv_weight, b.bn_weight, b.bn_bias))) for b in branches
    ]


def _backward(ctx, grad: Tensor):
    count = len(ctx.needs)
    flat = ctx.saved_tensors
    n = count * len(SavedBranch._fields)
    out = unit_backward(grad, list(flat[:n]), list(flat[n:]), flatten(ctx.needs), ctx.spec)
    grads = unflatten(BranchGrads, out, count)
    tensor_grads = []
    for g, need in zip(grads, ctx.needs, strict=True):
        g = BranchGrads(*(t if wanted else None for t, wanted in zip(g, need, strict=True)))
        tensor_grads += BranchTensors(
            z=g.z,
            kept=None,
            conv_weight=g.conv_weight,
            bn_weight=g.bn_weight,
            bn_bias=g.bn_bias,
            mean=None,
            invstd=None,
        )
    return None, tensor_grads, list(out[count * len(BranchGrads._fields) :]), None


torch.library.register_autograd("glif2::unit_forward", _backward, setup_context=_setup_context)


# building a unit


@dataclass(frozen=True)
class Branch:
    """One BN input of a unit, as the lean path builds it."""

    bn: _BatchNorm
    z: Tensor
    kept: Tensor | None  # None: z itself is kept (encoding "as_is")
    encoding: Encoding
    conv_weight: Tensor | None = None
    conv: ConvSpec | None = None  # "recompute": the conv that rebuilds the BN input from z


def _plain(value):
    # NamedTuples as plain tuples: dynamo cannot hand NamedTuple instances to an assume_constant_result function
    return tuple(_plain(v) for v in value) if isinstance(value, tuple) else value


def _text(spec: tuple) -> str:
    # JSON (NamedTuples are tuples: nested lists in a fixed field order) with single quotes: the text is pasted into
    # generated code as a string literal (inductor's C++ wrapper does not escape double quotes). No value of a spec
    # holds a quote.
    return json.dumps(spec).replace('"', "'")


@torch.compiler.assume_constant_result
def _encode(plain: tuple) -> str:
    # UnitSpec.encode of the plain tuples (the same text); computed once per trace under torch.compile, where the
    # text is a constant of the graph
    return _text(plain)


def unit(branches: list[Branch], neuron: GLIF | None, t: int) -> Tensor:
    """GLIF(sum_k BN_k(y_k)) as one unit (the GLIF input is never kept). Returns `t b c h w` spikes, or the
    time-merged sum `(t b) c h w` when there is no neuron."""
    tensors, specs = [], []
    v = None
    for br in branches:
        weight, bias, momentum = bn_parts(br.bn)  # with autograd: the training weight's gradient path
        group = sync_group_name(br.bn)
        none = empty_like_none(br.z)
        running = (br.bn.running_mean, br.bn.running_var) if br.bn.track_running_stats else (none, none)
        with torch.no_grad():
            y = F.conv2d(br.z, br.conv_weight, None, *br.conv) if br.conv is not None else br.z
            out, mean, invstd = batch_norm_train(
                y, weight.detach(), bias.detach(), *running, momentum, br.bn.eps, group
            )
        v = out if v is None else v + out  # the plain path's add, in its order
        tensors.append(
            BranchTensors(
                br.z,
                none if br.kept is None else br.kept,
                none if br.conv_weight is None else br.conv_weight,
                weight,
                bias,
                mean,
                invstd,
            )
        )
        specs.append(
            BranchSpec(
                br.encoding if br.kept is not None else Encoding(),
                br.conv,
                br.bn.eps,
                group,
                tuple(br.z.shape),
                str(br.z.dtype).removeprefix("torch."),
            )
        )
    spec_neuron, coeffs = None, []
    if neuron is not None:
        spec_neuron = NeuronSpec(t, neuron.flat_pattern(), neuron.surrogate, neuron.surrogate_width)
        coeffs = list(neuron.coefficients())
    return unit_forward(v, flatten(tensors), coeffs, _encode(_plain(UnitSpec(tuple(specs), spec_neuron))))


__all__ = [
    "Branch",
    "BranchGrads",
    "BranchSpec",
    "BranchTensors",
    "NeuronSpec",
    "SavedBranch",
    "UnitSpec",
    "flatten",
    "parse",
    "unflatten",
    "unit",
    "unit_backward",
    "unit_forward",
]
