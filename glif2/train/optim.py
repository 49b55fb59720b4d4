"""The reference's optimisation (docs/training.md §2): SGD parameter groups by name, and its cosine schedules.

Groups are chosen by the last component of a parameter's name:
- gates ("choice"): glif2.neuron.GATE_NAMES (the gate logits);
- neuron ("cal"): glif2.neuron.NEURON_NAMES (the other GLIF logits);
- other: conv, BN and linear weights (BN affine parameters do decay, as in the reference).

| mode                | groups (lr, weight decay)                                                  |
|---------------------|----------------------------------------------------------------------------|
| glif                | other (lr, wd), GLIF = cal + choice (lr, 0)                                |
| glif, tunable_lif   | other (lr, wd), cal (lr, 0), choice (lr / gate_lr_divisor, 0)              |
| single (DVS script) | everything (lr, wd)                                                        |
"""

import math
from functools import partial

import torch
from torch import nn

from glif2.neuron import GATE_NAMES, NEURON_NAMES

PARAM_GROUPS = ("glif", "single")  # the `mode` of param_groups
SCHEDULERS = ("cosine", "soft-cosine")  # the `kind` of build_scheduler


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    mode: str = "glif",
    tunable_lif: bool = False,
    gate_lr_divisor: float = 10.0,
) -> list[dict]:
    """SGD parameter groups as docs/training.md §2 (each group also carries a `name`)."""
    if mode == "single":
        return [dict(name="all", params=[p for p in model.parameters()], lr=lr, weight_decay=weight_decay)]
    if mode != "glif":
        raise ValueError(f"param_groups={mode!r}; choose one of {', '.join(PARAM_GROUPS)}")
    other, cal, choice = [], [], []
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        (choice if leaf in GATE_NAMES else cal if leaf in NEURON_NAMES else other).append(p)
    if not tunable_lif:
        return [
            dict(name="other", params=other, lr=lr, weight_decay=weight_decay),
            dict(name="glif", params=cal + choice, lr=lr, weight_decay=0.0),
        ]
    return [
        dict(name="other", params=other, lr=lr, weight_decay=weight_decay),
        dict(name="neuron", params=cal, lr=lr, weight_decay=0.0),
        dict(name="gates", params=choice, lr=lr / gate_lr_divisor, weight_decay=0.0),
    ]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    mode: str,
    tunable_lif: bool,
    gate_lr_divisor: float,
) -> torch.optim.SGD:
    """SGD (no Nesterov, dampening 0) over `param_groups`."""
    groups = param_groups(
        model, lr=lr, weight_decay=weight_decay, mode=mode, tunable_lif=tunable_lif, gate_lr_divisor=gate_lr_divisor
    )
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def soft_cosine_factor(k: int, t_max: int) -> float:
    """The reference's CosineAnnealingLR_Multi_Params_soft with eta_min 0, in closed form: (1 + cos(pi k / T)) / 2
    for k <= T, and 0 (not a rise) after T."""
    return 0.5 * (1.0 + math.cos(math.pi * min(k, t_max) / t_max))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, kind: str, epochs: int, t_max: int = 0
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule. cosine: PyTorch's CosineAnnealingLR(T_max = t_max or epochs, eta_min 0), periodic when
    t_max < epochs (the DVS run); soft-cosine: the reference's multi-parameter scheduler (one T_max per group)."""
    t_max = t_max or epochs
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=0.0)
    if kind == "soft-cosine":
        factors = [partial(soft_cosine_factor, t_max=t_max) for _ in optimizer.param_groups]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    raise ValueError(f"scheduler={kind!r}; choose one of {', '.join(SCHEDULERS)}")


__all__ = ["PARAM_GROUPS", "SCHEDULERS", "build_optimizer", "build_scheduler", "param_groups", "soft_cosine_factor"]
