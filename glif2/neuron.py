"""The GLIF neuron (Yao et al., NeurIPS 2022): one module for the whole family, fused by torch.compile.

Shape letters: t steps, b batch, c channels, n the flattened trailing (spatial) dims, r = (b c) rows.

Per step, with u_{-1} = 0 and o_{-1} = 0 (docs/neuron.md §2):

    I_t = x_t * (1 - beta * (1 - c_t))
    u_t = (1 - alpha * (1 - tau)) * u_{t-1} * (1 - gamma * o_{t-1}) - (1 - alpha) * leak + I_t
          - (1 - gamma) * v_reset * o_{t-1}
    o_t = H(u_t - v_th)                      (strict: u_t == v_th gives no spike)

GLIF_f (the "coarsely fused" ablation) sums every feature without gates:

    u_t = tau * u_{t-1} * (1 - o_{t-1}) - leak + c_t * x_t - v_reset * o_{t-1}

Both are one recursion over per-channel coefficients, which is what the fused kernels (glif2.kernels) run:

    u_t = decay * u_{t-1} * (1 - reset_mul * o_{t-1}) - drift + gain_t * x_t - reset_sub * o_{t-1}

    GLIF:   decay = 1 - alpha (1 - tau), reset_mul = gamma, drift = (1 - alpha) leak,
            reset_sub = (1 - gamma) v_reset, gain_t = 1 - beta (1 - c_t)
    GLIF_f: decay = tau, reset_mul = 1, drift = leak, reset_sub = v_reset, gain_t = c_t

reset_mul is the share of the previous potential a spike clears (the hard-reset part), reset_sub what a spike
subtracts (the soft-reset part); docs/neuron.md §2.3.

The coefficients are computed once per call from the sigmoid of the stored logits (a few tiny ops); their
gradients flow back to the logits through ordinary autograd, so hard (straight-through) and static (detached)
gates need nothing from the kernels. The reset terms are not detached (as in the reference).
"""

import warnings

import torch
from einops import rearrange
from torch import Tensor, nn

from glif2.kernels import GLIFCoeffs, GLIFFunction
from glif2.surrogate import get_surrogate

VARIANTS = ("glif", "glif_f")
GATE_MODES = ("soft", "hard", "static_soft", "static_hard")
PARAM_MODES = ("learned", "static")
GATE_INIT = (0.6, 0.8, 0.6)  # the authors' default --gate
GATE_INIT_RANGE = (-0.5, 1.5)  # open: the paper code's squash sigmoid(logit) = 0.25 + g / 2 must stay in (0, 1)
# The stored logits, in registration order: the gates, then the neuron parameters (optimizers group them this way).
GATE_NAMES = ("alpha", "beta", "gamma")
NEURON_NAMES = ("tau", "v_th", "leak", "v_reset", "conduct")
GLIF_PARAMS = (*GATE_NAMES, *NEURON_NAMES)
EAGER_DEPRECATED = (
    "the eager= option is deprecated and has no effect: run the code under "
    "`with glif2.eager_kernels():` to run the fused kernels uncompiled"
)


class _StraightThrough(torch.autograd.Function):
    """Hard gate (the reference's ArchAct): 1 where sigmoid(logit) > 0.5 else 0; identity gradient."""

    @staticmethod
    def forward(p: Tensor) -> Tensor:
        return (p > 0.5).to(p.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def _logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p, dtype=torch.float64)))


def _check_open_unit(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name}={value} must lie in (0, 1): it is stored as a logit and used through a sigmoid")


def check_gate_init(gate_init: tuple[float, ...]) -> None:
    """ValueError unless `gate_init` holds one value per gate, each inside the open GATE_INIT_RANGE."""
    lo, hi = GATE_INIT_RANGE
    if len(gate_init) != len(GATE_NAMES) or not all(lo < g < hi for g in gate_init):
        raise ValueError(
            f"gate_init={tuple(gate_init)!r} must be {len(GATE_NAMES)} values in ({lo}, {hi}) for "
            f"({', '.join(GATE_NAMES)})"
        )


class GLIF(nn.Module):
    """Gated leaky integrate-and-fire neuron over T steps (stateless: u and o start at 0 on every call).

    Args:
        T: number of time steps; the input's first dim must equal it.
        channels: None for the layer-wise neuron (scalar parameters, conduct `t`), or C for the channel-wise
            neuron (parameters `c`, conduct `t c`; the input's dim 2 must equal C).
        variant: "glif" (gated) or "glif_f" (the gate-free GLIF_f ablation).
        gate_mode: "soft" (sigmoid gates), "hard" (binary forward, straight-through backward), "static_soft" or
            "static_hard" (the same, fixed: not learned).
        gate_init: initial (alpha, beta, gamma) gate values g in (-0.5, 1.5), squashed as in the paper's code to
            sigmoid(logit) = 0.25 + g / 2 (so the defaults start at 0.55, 0.65, 0.55).
        params: "learned", or "static": tau, v_th, leak, v_reset and conduct keep their initial values (the
            authors' --static-param; with static gates this is the plain LIF baseline, docs/neuron.md §3.3).
        tau, v_th, leak, v_reset, conduct: initial values in (0, 1) of the decay factor, threshold, linear leak,
            soft-reset amount and conductance.
        surrogate: "rect" (the reference window |u - v_th| < 0.5), "sigmoid", "atan" or "triangle".
        surrogate_width: width of the surrogate window (1.0 reproduces the reference rectangle).
        eager: deprecated and without effect (a DeprecationWarning says so): run code under `glif2.eager_kernels()`
            instead, the one switch for every fused kernel, forward and backward.

    Parameters are stored as logits under the names alpha, beta, gamma, tau, v_th, leak, v_reset, conduct.
    Quantities that are never learned (static gates or parameters, GLIF_f's gamma) stay parameters, so checkpoints
    keep one layout, but with requires_grad=False: optimizers and DDP see nothing to update. GLIF_f has no
    alpha/beta but keeps an unused gamma so that the reference's GLIF_f checkpoints load strictly. The layer-wise
    neuron stores +logit for its gates like the channel-wise one; the reference stores -logit there
    (docs/neuron.md §9 Q3), which only changes its initial values; loaded logits mean the same in both.

    `gates=` and `gate=` are deprecated aliases of `gate_mode=` and `gate_init=` (removed in the next release).

    Input x: `t b c ...` (any trailing dims: `t b c h w` after a conv, `t b c` after a linear layer), float.
    Output: spikes in {0, 1}, same shape and dtype.
    """

    def __init__(
        self,
        T: int,
        channels: int | None = None,
        *,
        variant: str = "glif",
        gate_mode: str = "soft",
        gate_init: tuple[float, float, float] = GATE_INIT,
        params: str = "learned",
        tau: float = 0.25,
        v_th: float = 0.5,
        leak: float = 0.0625,
        v_reset: float = 0.5,
        conduct: float = 0.5,
        surrogate: str = "rect",
        surrogate_width: float = 1.0,
        eager: bool | None = None,
        **deprecated,
    ):
        super().__init__()
        # A deprecated alias beside its new name given other than the default is a TypeError (rename_deprecated).
        given = {"gate_mode": gate_mode, "gate_init": tuple(gate_init)}
        defaults = {"gate_mode": "soft", "gate_init": GATE_INIT}
        renamed = rename_deprecated({**{k: v for k, v in given.items() if v != defaults[k]}, **deprecated})
        unknown = set(renamed) - {"gate_mode", "gate_init"}
        if unknown:
            raise TypeError(f"GLIF got unexpected keyword arguments {sorted(unknown)}")
        gate_mode, gate_init = renamed.get("gate_mode", gate_mode), tuple(renamed.get("gate_init", gate_init))
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"T={T!r} must be a positive int")
        if channels is not None and (not isinstance(channels, int) or channels < 1):
            raise ValueError(f"channels={channels!r} must be None (layer-wise) or a positive int (channel-wise)")
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r}; choose one of {VARIANTS}")
        if gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode={gate_mode!r}; choose one of {GATE_MODES}")
        if params not in PARAM_MODES:
            raise ValueError(f"params={params!r}; choose one of {PARAM_MODES}")
        check_gate_init(gate_init)
        for name, value in dict(tau=tau, v_th=v_th, leak=leak, v_reset=v_reset, conduct=conduct).items():
            _check_open_unit(name, value)
        get_surrogate(surrogate)
        if not surrogate_width > 0:
            raise ValueError(f"surrogate_width={surrogate_width} must be positive")

        self.T, self.channels, self.variant, self.gate_mode, self.params = T, channels, variant, gate_mode, params
        self.surrogate, self.surrogate_width = surrogate, float(surrogate_width)
        if eager is not None:
            warnings.warn(EAGER_DEPRECATED, DeprecationWarning, stacklevel=2)
        shape = () if channels is None else (channels,)

        def param(value: float, learned: bool, size=shape) -> nn.Parameter:
            return nn.Parameter(torch.full(size, _logit(value)), requires_grad=learned)

        gates_learned = not gate_mode.startswith("static")
        names = GATE_NAMES if variant == "glif" else ("gamma",)
        for name, g in zip(GATE_NAMES, gate_init, strict=True):
            if name in names:  # the paper code's squashed gate init; GLIF_f's gamma is never used
                self.register_parameter(name, param(0.25 + g / 2, gates_learned and variant == "glif"))
        learned = params == "learned"
        self.tau = param(tau, learned)
        self.v_th = param(v_th, learned)
        self.leak = param(leak, learned)
        self.v_reset = param(v_reset, learned)  # initialised like v_th, but an independent parameter
        self.conduct = param(conduct, learned, (T, *shape))

    def extra_repr(self) -> str:
        return (
            f"T={self.T}, channels={self.channels}, variant={self.variant!r}, gate_mode={self.gate_mode!r}, "
            f"surrogate={self.surrogate!r}" + (", params='static'" if self.params == "static" else "")
        )

    def _gate(self, logit: Tensor) -> Tensor:
        if self.gate_mode.startswith("static"):
            logit = logit.detach()
        p = torch.sigmoid(logit)
        return _StraightThrough.apply(p) if self.gate_mode.endswith("hard") else p

    def effective_values(self) -> dict[str, Tensor]:
        """The values the equations use (sigmoids of the logits; gates after the gate mode): alpha ... conduct."""
        out = {}
        if self.variant == "glif":
            out.update(alpha=self._gate(self.alpha), beta=self._gate(self.beta), gamma=self._gate(self.gamma))
        for name in NEURON_NAMES:
            logit = getattr(self, name)
            out[name] = torch.sigmoid(logit if self.params == "learned" else logit.detach())
        return out

    def values(self) -> dict[str, Tensor]:
        """Deprecated alias of `effective_values` (it read like `Mapping.values`); removed in the next release."""
        warnings.warn("GLIF.values() is deprecated; use GLIF.effective_values()", DeprecationWarning, stacklevel=2)
        return self.effective_values()

    def coefficients(self) -> GLIFCoeffs:
        """The recursion's coefficients, shaped `c 1` (gain `t c 1`); c = 1 for the layer-wise neuron."""
        v = self.effective_values()
        if self.variant == "glif":
            decay = 1.0 - v["alpha"] * (1.0 - v["tau"])
            reset_mul, drift = v["gamma"], (1.0 - v["alpha"]) * v["leak"]
            reset_sub, gain = (1.0 - v["gamma"]) * v["v_reset"], 1.0 - v["beta"] * (1.0 - v["conduct"])
        else:
            decay, reset_mul, drift = v["tau"], torch.ones_like(v["tau"]), v["leak"]
            reset_sub, gain = v["v_reset"], v["conduct"]
        col = "c -> c 1" if self.channels is not None else " -> 1 1"
        return GLIFCoeffs(
            decay=rearrange(decay, col),
            reset_mul=rearrange(reset_mul, col),
            drift=rearrange(drift, col),
            reset_sub=rearrange(reset_sub, col),
            v_th=rearrange(v["v_th"], col),
            gain=rearrange(gain, "t c -> t c 1" if self.channels is not None else "t -> t 1 1"),
        )

    def check_input(self, x: Tensor) -> None:
        """Raises ValueError, naming the fix, unless x is a float `t b c ...` tensor with this neuron's T and C."""
        if not (x.is_floating_point()):
            raise ValueError(f"GLIF input must be a float tensor, got {x.dtype}; cast it, e.g. x.float()")
        if x.dim() < 3:
            raise ValueError(
                f"GLIF input must be time-first `t b c ...` (rank >= 3), got shape {tuple(x.shape)}; "
                "repeat static inputs over T first"
            )
        if x.shape[0] != self.T:
            raise ValueError(
                f"GLIF was built for T={self.T} steps but the input has {x.shape[0]} on dim 0 "
                f"(shape {tuple(x.shape)}); pass `t b c ...` with t={self.T} or build GLIF(T={x.shape[0]})"
            )
        if self.channels is not None and x.shape[2] != self.channels:
            raise ValueError(
                f"GLIF has {self.channels} channels but the input has {x.shape[2]} on dim 2 "
                f"(shape {tuple(x.shape)}); build GLIF(T, channels={x.shape[2]}) or fix the layer before it"
            )

    def flat_pattern(self) -> str:
        """The einops pattern to the kernels' `t b c n`: channels on dim 2 (one "channel" for the layer-wise neuron),
        every trailing dim flattened into n."""
        return "t b c ... -> t b c (...)" if self.channels is not None else "t b ... -> t b 1 (...)"

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        flat = rearrange(x, self.flat_pattern())
        args = (flat, self.surrogate, self.surrogate_width, *self.coefficients())
        # Without grad nothing is saved for backward, so the forward runs directly. This also sidesteps a dynamo bug
        # (torch 2.14: under no_grad it passes a ctx to a setup_context-style forward, shifting every argument);
        # tests/test_compile.py::test_no_grad_workaround_still_needed fails once the installed torch is fixed.
        spikes = GLIFFunction.apply(*args) if torch.is_grad_enabled() else GLIFFunction.forward(*args)
        return spikes.reshape(x.shape)  # t b c n -> x's own `t b c ...` (a view)


_DEPRECATED = {"gates": "gate_mode", "gate": "gate_init"}


def rename_deprecated(options: dict, warn: bool = True) -> dict:
    """A copy of `options` with the deprecated keywords `gates` / `gate` renamed to `gate_mode` / `gate_init` (one
    DeprecationWarning each, unless `warn` is False: a stored config the user did not write). Both spellings at once
    is a TypeError."""
    out = dict(options)
    for old, new in _DEPRECATED.items():
        if old in out:
            if new in out:
                raise TypeError(f"pass {new}= only ({old}= is its deprecated alias)")
            if warn:
                warnings.warn(f"the GLIF option {old}= is deprecated; use {new}=", DeprecationWarning, stacklevel=3)
            out[new] = out.pop(old)
    return out


@torch.no_grad()
def randomize_gates(
    module: nn.Module, low: float = -0.1, high: float = 0.1, dtype: torch.dtype | None = None
) -> nn.Module:
    """The paper's `--randomgate`: every sub-module with alpha, beta and gamma gets logits drawn from U(low, high).

    With `dtype` the gates are replaced by new parameters of that dtype (the CIFAR10-DVS model's float64 gates,
    docs/neuron.md §8), keeping their names and registration order. GLIF_f modules (no alpha/beta) keep their
    initial gates, as in the reference. Returns the module.
    """
    for m in module.modules():
        if all(isinstance(getattr(m, name, None), torch.Tensor) for name in GATE_NAMES):
            for name in GATE_NAMES:
                old = getattr(m, name)
                if dtype is None or dtype == old.dtype:
                    old.uniform_(low, high)
                else:
                    new = torch.empty(old.shape, dtype=dtype, device=old.device).uniform_(low, high)
                    setattr(m, name, nn.Parameter(new, requires_grad=old.requires_grad))
    return module
