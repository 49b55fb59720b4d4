"""Time-merged stateless layers, threshold-dependent BatchNorm (tdBN), and the neuron / norm factories the networks
are built from.

Shape letters: t steps, b batch, c channels, h w space.

Stateless layers (conv, BN, pooling, linear) see every step at once on the time-merged batch `(t b) c h w`;
that is also why tdBN's statistics are taken jointly over time, batch and space.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from glif2.neuron import GLIF, rename_deprecated

BN_KINDS = ("td", "plain")

# Merge and split patterns by the rank of the time-first tensor.
_MERGE = {5: ("t b c h w -> (t b) c h w", "(t b) c h w -> t b c h w"), 3: ("t b c -> (t b) c", "(t b) c -> t b c")}


def merge_time(x: Tensor) -> Tensor:
    """`t b c h w -> (t b) c h w` (or `t b c -> (t b) c`)."""
    if x.dim() not in _MERGE:
        raise ValueError(f"expected a time-first `t b c h w` or `t b c` tensor, got shape {tuple(x.shape)}")
    return rearrange(x, _MERGE[x.dim()][0])


def split_time(x: Tensor, t: int) -> Tensor:
    """`(t b) c h w -> t b c h w` (or `(t b) c -> t b c`)."""
    if x.dim() + 1 not in _MERGE:
        raise ValueError(f"expected a time-merged `(t b) c h w` or `(t b) c` tensor, got shape {tuple(x.shape)}")
    return rearrange(x, _MERGE[x.dim() + 1][1], t=t)


class TimeMerged(nn.Sequential):
    """Runs stateless layers on `(t b) ...` and splits the result back to `t b ...`.

    Children are named 0, 1, ... like SpikingJelly's SeqToANNContainer, so the reference checkpoints' keys
    (`conv1.0.0.weight`) map one to one.
    """

    def forward(self, x: Tensor) -> Tensor:
        return split_time(super().forward(merge_time(x)), t=x.shape[0])


class tdBatchNorm(nn.BatchNorm2d):
    """Threshold-dependent BatchNorm (Zheng et al. 2021) on time-merged input `(t b) c h w`.

    y = alpha * v_th * (x - mean) / sqrt(var + eps) * weight + bias, with mean and var per channel over
    `(t b) h w`: an ordinary BN whose affine weight is pre-scaled by alpha * v_th. ``alpha`` is a plain attribute
    (not saved, as in the reference: 1 or 1/sqrt(2) by position); ``v_th`` is a saved buffer holding the fixed
    threshold constant (0.5), not the neuron's learnable threshold (docs/neuron.md §6, §9 Q11).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        alpha: float = 1.0,
        affine: bool = True,
        track_running_stats: bool = True,
        v_th: float = 0.5,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.alpha = alpha
        self.register_buffer("v_th", torch.tensor(float(v_th)))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={self.alpha:.6g}"

    def train_weight(self) -> Tensor:
        """The affine weight of the training-mode batch_norm: alpha * v_th * weight (`c`)."""
        scale = self.alpha * self.v_th
        return scale * self.weight if self.weight is not None else scale.expand(self.num_features)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training and self.track_running_stats:
            # Evaluation with running statistics follows the reference's operation order exactly, so a released
            # checkpoint gives bit-identical float32 activations: folding the scale into the weight instead rounds
            # differently, and one membrane within an ulp of threshold then flips a spike that cascades.
            c = "c -> 1 c 1 1"
            y = (
                self.alpha
                * self.v_th
                * (x - rearrange(self.running_mean, c))
                / torch.sqrt(rearrange(self.running_var, c) + self.eps)
            )
            y = y * rearrange(self.weight, c) + rearrange(self.bias, c) if self.affine else y
            return y.to(x.dtype)  # bf16 in, bf16 out (as in training) under autocast; a no-op for float32
        # Training: one fused batch_norm whose affine weight is pre-scaled by alpha * v_th (same values, fewer passes).
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as BatchNorm2d
                momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(
            x,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.train_weight(),
            self.bias,
            True,
            momentum,
            self.eps,
        )


# factories


def neuron_factory(T: int, channel_wise: bool = True, **glif_options) -> Callable[[int], GLIF]:
    """Returns `make(channels) -> GLIF` with the shared options; channel_wise=False gives layer-wise neurons.
    The options are validated once, here, before any network is built."""
    glif_options = rename_deprecated(glif_options)
    GLIF(T, 1 if channel_wise else None, **glif_options)

    def make(channels: int) -> GLIF:
        return GLIF(T, channels if channel_wise else None, **glif_options)

    return make


def norm_factory(bn: str) -> Callable[..., nn.Module]:
    """`norm(c, alpha=1.0)`: tdBN (alpha * v_th scaled) or plain BatchNorm2d (the released ImageNet model)."""
    if bn == "td":
        return lambda c, alpha=1.0: tdBatchNorm(c, alpha=alpha)
    if bn == "plain":
        return lambda c, alpha=1.0: nn.BatchNorm2d(c)
    raise ValueError(f"bn={bn!r}; choose one of {BN_KINDS}")
