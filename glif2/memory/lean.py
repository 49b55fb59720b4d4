"""The lean path as the networks use it: `LeanModule` (a block that switches to its lean twin), `Act` (an activation
with what is known of its values), and the building blocks a lean twin is written with. The protocol is
docs/performance.md §7.

Shape letters: t steps, b batch, n the time-merged batch `(t b)`, c channels, h w space, f features.

A LeanModule runs `plain(x)` (ordinary autograd) unless the model's memory mode is "lean" or "recompute", the
module is training and autograd is recording; then it runs `lean(act, mode)`, which must use the plain path's ops in
the same order on the same values, keeping less for the backward. Each LeanModule is called with tensors only, so
that regional compilation can compile it on its own; what its input is known to hold is the static `in_grid` the
network links (`link_grids`), checked against what the producer's lean path really produced.
"""

import torch
from einops import repeat
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.utils import _pair

from glif2.layers import merge_time, split_time
from glif2.memory.fused import Branch, unit
from glif2.memory.grid import SPIKES, Encoding, Grid, pack_kernel
from glif2.memory.saving import AvgPoolNoSave, ConvSpec, GridMul, PackedConv, PackedLinear, PoolSpec
from glif2.neuron import GLIF

MEMORY_MODES = ("lean", "recompute", "off")


class Act:
    """An activation `t b c ...` on the lean path, with what is known of its values: a Grid (then consumers keep it
    packed, packing once however many consumers there are) or the image `b c h w` it repeats over t."""

    def __init__(self, x: Tensor, grid: Grid | None = None, image: Tensor | None = None):
        self.x, self.grid, self.image = x, grid, image
        self._packed: Tensor | None = None

    def kept(self) -> tuple[Tensor | None, Encoding]:
        """(what a consumer keeps for its backward, the encoding that rebuilds x from it); None: x itself."""
        if self.grid is not None and self.grid.bits is not None:
            if self._packed is None:
                self._packed = pack_kernel(self.x, self.grid)
            return self._packed, Encoding.packed(self.grid)
        if self.image is not None:
            return self.image, Encoding.repeated(self.x.shape[0])
        return None, Encoding()

    def then(self, x: Tensor, grid: Grid | None = None) -> "Act":
        """The next activation."""
        return Act(x, grid)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    # What autocast does to a conv's inputs, done explicitly (and recorded by autograd) so that the custom Functions
    # can run with autocast off and their backward sees the same dtypes as autograd's would.
    return t if dtype is None or t.dtype == dtype or not t.is_floating_point() else t.to(dtype)


# building blocks of a lean twin


def conv_branch(conv_bn: nn.Sequential, act: Act, mode: str) -> Branch:
    """The BN input of a time-merged conv -> BN pair (conv_bn[0], conv_bn[1]) on `act`, as a branch of a unit."""
    conv, bn = conv_bn[0], conv_bn[1]
    dtype = _autocast_dtype(act.x.device)
    x, weight = _cast(merge_time(act.x), dtype), _cast(conv.weight, dtype)
    kept, encoding = act.kept()
    if mode == "recompute":
        return Branch(bn, x, kept, encoding, weight, ConvSpec.of(conv))
    with torch.autocast(act.x.device.type, enabled=False):
        y = PackedConv.apply(x, kept, weight, encoding, ConvSpec.of(conv))
    return Branch(bn, y, None, Encoding())


def bn_branch(bn: _BatchNorm, act: Act) -> Branch:
    """BN applied straight to `act` (the identity-shaped residual shortcut), as a branch of a unit."""
    kept, encoding = act.kept()
    return Branch(bn, merge_time(act.x), kept, encoding)


def conv_bn_spike(conv_bn: nn.Sequential, neuron: GLIF, act: Act, mode: str) -> Act:
    """conv -> BN -> GLIF on `act`; spikes out."""
    spikes = unit([conv_branch(conv_bn, act, mode)], neuron, act.x.shape[0])
    return act.then(spikes, SPIKES)


def conv_bn_plain(conv_bn: nn.Sequential, act: Act, mode: str) -> Tensor:
    """conv -> BN whose output is not a GLIF's input: the conv keeps its input packed; in "recompute" the BN input
    is dropped too. Returns `t b c h w`."""
    t = act.x.shape[0]
    if mode == "recompute":
        return split_time(unit([conv_branch(conv_bn, act, mode)], None, t), t=t)
    return split_time(conv_bn[1](conv_branch(conv_bn, act, mode).z), t=t)


def pool_spec(module: nn.AvgPool2d) -> PoolSpec:
    return PoolSpec(
        _pair(module.kernel_size),
        _pair(module.stride),
        _pair(module.padding),
        module.ceil_mode,
        module.count_include_pad,
        module.divisor_override,
    )


def pooled_grid(module: nn.AvgPool2d, grid: Grid | None) -> Grid | None:
    """The grid an average pool's output lies on, given its input's (None: nothing known). A pool that would put
    values on a grid off the k / window one (partial windows of ceil_mode, a divisor override, padding that does not
    count towards the divisor) is refused: packing its output would be silently wrong."""
    if grid is None:
        return None
    spec = pool_spec(module)
    problems = [
        why
        for why, bad in (
            ("ceil_mode=True averages partial windows", spec.ceil_mode),
            (f"divisor_override={spec.divisor}", spec.divisor is not None),
            (
                "padding with count_include_pad=False divides edge windows by fewer values",
                spec.padding != (0, 0) and not spec.count_include_pad,
            ),
        )
        if bad
    ]
    if problems:
        raise ValueError(
            f"lean memory modes: {module} on values of {grid} gives values off the k / window grid "
            f"({'; '.join(problems)}); use the default pooling options or memory='off'"
        )
    return grid.pooled(spec.kernel[0] * spec.kernel[1])


def pool(module: nn.AvgPool2d, act: Act) -> Act:
    """A time-merged average pool that keeps nothing; pooled spikes stay on a (finer) grid."""
    grid = pooled_grid(module, act.grid)
    y = split_time(AvgPoolNoSave.apply(merge_time(act.x), pool_spec(module)), t=act.x.shape[0])
    return act.then(y, grid)


def linear(module: nn.Linear, act: Act) -> Tensor:
    """A bias-free linear on `act` (`n f`, already merged) keeping its input packed."""
    dtype = _autocast_dtype(act.x.device)
    kept, encoding = act.kept()
    if encoding.kind != "packed" or module.bias is not None:
        return module(act.x)
    with torch.autocast(act.x.device.type, enabled=False):
        return PackedLinear.apply(_cast(act.x, dtype), kept, _cast(module.weight, dtype), encoding)


def multiply(a: Act, b: Act) -> Act:
    """a * b keeping both packed (spikes times spikes)."""
    (a_kept, a_enc), (b_kept, b_enc) = a.kept(), b.kept()
    out = GridMul.apply(a.x, a_kept, b.x, b_kept, (a_enc, b_enc))
    return a.then(out, a.grid * b.grid if a.grid is not None and b.grid is not None else None)


def is_conv_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], nn.Conv2d) and isinstance(m[1], _BatchNorm)


def is_pool(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and len(m) == 1 and isinstance(m[0], nn.AvgPool2d)


def run_sequence(modules: nn.Sequential, act: Act, mode: str) -> Act:
    """A Sequential of time-merged conv -> BN pairs, GLIFs, time-merged average pools and LeanModules, run on the
    lean path. A conv -> BN followed by a GLIF is one unit."""
    mods = list(modules)
    i = 0
    while i < len(mods):
        m, nxt = mods[i], mods[i + 1] if i + 1 < len(mods) else None
        if is_conv_bn(m) and isinstance(nxt, GLIF):
            act, i = conv_bn_spike(m, nxt, act, mode), i + 2
            continue
        if is_conv_bn(m):
            act = act.then(conv_bn_plain(m, act, mode))
        elif isinstance(m, GLIF):
            act = act.then(m(act.x), SPIKES)
        elif is_pool(m):
            act = pool(m[0], act)
        elif isinstance(m, LeanModule):
            act = m.lean(act, mode)
        elif isinstance(m, nn.Sequential):
            act = run_sequence(m, act, mode)
        else:
            act = act.then(m(act.x))
        i += 1
    return act


def sequence_grid(modules: nn.Sequential, grid: Grid | None) -> Grid | None:
    """The grid `run_sequence` leaves its output on, given its input's: the same walk, on grids alone."""
    out = grid
    for m in modules:
        if isinstance(m, GLIF):
            out = SPIKES
        elif is_pool(m):
            out = pooled_grid(m[0], out)
        elif isinstance(m, LeanModule):
            out = m.out_grid(out)
        elif isinstance(m, nn.Sequential) and not is_conv_bn(m):
            out = sequence_grid(m, out)
        else:
            out = None
    return out


# the protocol


class LeanModule(nn.Module):
    """A module with a lean path (docs/performance.md §7). Subclasses define `plain(x)`, `lean(act, mode)` (the same
    ops in the same order, keeping less) and `out_grid(in_grid)` (what `lean` leaves its output on); `forward`
    switches between them. `in_grid` (what the input holds when the module is called with a tensor) is set by the
    network through `link_grids`."""

    memory_mode: str = "off"  # set for the whole model by set_memory
    in_grid: Grid | None = None

    def forward(self, x: Tensor) -> Tensor:
        mode = active_mode(self)
        if mode is None:
            return self.plain(x)
        act = self.lean(self.enter(x), mode)
        if not torch.compiler.is_compiling():  # eagerly (every test): the static grid is what lean produced
            expected = self.out_grid(self.in_grid)
            if act.grid != expected:
                raise AssertionError(
                    f"{type(self).__name__}.lean left its output on {act.grid}, but out_grid says "
                    f"{expected}: fix out_grid"
                )
        return act.x

    def enter(self, x: Tensor) -> Act:
        """The input as an Act (what the lean twin starts from)."""
        return Act(x, self.in_grid)

    def plain(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def lean(self, act: Act, mode: str) -> Act:
        raise NotImplementedError

    def out_grid(self, in_grid: Grid | None) -> Grid | None:
        """The grid `lean` leaves its output on when its input lies on `in_grid` (None: nothing known)."""
        return None


class LeanSequential(LeanModule, nn.Sequential):
    """A Sequential of time-merged conv -> BN pairs, GLIFs, pools and LeanModules with a lean path (`run_sequence`).

    With `image_steps` = T it takes an image batch `b c h w` and repeats it over t (direct coding): the lean path's
    first conv keeps the image, not its T copies."""

    def __init__(self, *modules: nn.Module, image_steps: int = 0):
        super().__init__(*modules)
        self.image_steps = image_steps

    def _steps(self, x: Tensor) -> Tensor:
        if not self.image_steps:
            return x
        if x.dim() != 4:
            raise ValueError(f"expected an image batch `b c h w`, got shape {tuple(x.shape)}")
        return repeat(x, "b c h w -> t b c h w", t=self.image_steps)

    def plain(self, x: Tensor) -> Tensor:
        return nn.Sequential.forward(self, self._steps(x))

    def enter(self, x: Tensor) -> Act:
        return Act(self._steps(x), image=x) if self.image_steps else Act(x, self.in_grid)

    def lean(self, act: Act, mode: str) -> Act:
        return run_sequence(self, act, mode)

    def out_grid(self, in_grid: Grid | None) -> Grid | None:
        return sequence_grid(self, None if self.image_steps else in_grid)


def active_mode(module: nn.Module) -> str | None:
    """The lean mode this forward of `module` runs in, or None for the plain path (memory "off", evaluation, or no
    gradient being recorded)."""
    mode = module.memory_mode
    if mode == "off" or not module.training or not torch.is_grad_enabled():
        return None
    return mode


def link_grids(modules: list[nn.Module], grid: Grid | None) -> None:
    """Sets each LeanModule's `in_grid` from the one before it, for modules called one after the other with tensors;
    `grid` is what the first one's input holds. A module that is not a LeanModule leaves nothing known."""
    for m in modules:
        if isinstance(m, LeanModule):
            m.in_grid = grid
            grid = m.out_grid(grid)
        else:
            grid = None


def set_memory(model: nn.Module, mode: str) -> nn.Module:
    """Sets the memory mode of every LeanModule in `model` (and `model.memory_mode`). A model without any LeanModule
    has no lean path and accepts "off" only."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory={mode!r}; choose one of {MEMORY_MODES}")
    lean_modules = [m for m in model.modules() if isinstance(m, LeanModule)]
    if mode != "off" and not lean_modules:
        raise ValueError(f"{type(model).__name__} has no lean path; build it with memory='off'")
    for m in lean_modules:
        m.memory_mode = mode
    model.memory_mode = mode
    return model


def memory_mode(model: nn.Module) -> str:
    """The memory mode `set_memory` gave `model` ("off" if none)."""
    return getattr(model, "memory_mode", "off")


__all__ = [
    "MEMORY_MODES",
    "Act",
    "LeanModule",
    "LeanSequential",
    "active_mode",
    "bn_branch",
    "conv_bn_plain",
    "conv_bn_spike",
    "conv_branch",
    "link_grids",
    "linear",
    "memory_mode",
    "multiply",
    "pool",
    "pooled_grid",
    "run_sequence",
    "set_memory",
]
