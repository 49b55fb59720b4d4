"""Values on a grid, kept packed: the `Grid` a tensor's values are known to lie on, bit packing, and the `Encoding`
that says how a layer keeps an input for its backward and rebuilds it bit for bit.

Shape letters: b batch, c channels, h w space, m packed bytes, k values per byte.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from glif2.compile import compile_kernel


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


pack_kernel = compile_kernel(pack)
unpack_kernel = compile_kernel(unpack)


class Encoding(NamedTuple):
    """How a layer keeps a tensor for its backward. A tuple of plain values, so that it travels through
    autograd.Function arguments and custom-op specs as a constant.

    kind: "as_is" (the tensor itself), "packed" (uint8, `pack` on Grid(scale, top)) or "repeated" (the image
    `b c h w` that was repeated over `steps` into `(t b) c h w`).
    """

    kind: str = "as_is"
    scale: int = 1
    top: int = 1
    steps: int = 1

    @staticmethod
    def packed(grid: Grid) -> "Encoding":
        return Encoding("packed", grid.scale, grid.top)

    @staticmethod
    def repeated(steps: int) -> "Encoding":
        return Encoding("repeated", steps=steps)


AS_IS = Encoding()


def decode(saved: Tensor, encoding: Encoding, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Rebuilds, bit for bit, the tensor of `shape` and `dtype` that a layer kept as `saved` under `encoding`.

    Under torch.compile the rebuilt tensor starts from an alias of `saved`: a node the forward does not have, so that
    common-subexpression elimination cannot merge the rebuilding with the forward's own computation (the backward
    would then use, and the partitioner keep, the forward's tensor itself: the T copies of a repeated image, say).
    Inductor drops the alias; eagerly nothing is done."""
    if torch.compiler.is_compiling():
        saved = torch.ops.aten.alias(saved)
    if encoding.kind == "as_is":
        return saved
    if encoding.kind == "packed":
        return unpack_kernel(saved, Grid(encoding.scale, encoding.top), shape, dtype)
    return repeat(saved, "b c h w -> (t b) c h w", t=encoding.steps).to(dtype)


__all__ = ["AS_IS", "SPIKES", "Encoding", "Grid", "decode", "pack", "pack_kernel", "unpack", "unpack_kernel"]
