"""Training-mode BatchNorm for the fused unit: the statistics as an opaque custom op, their exact recomputation in
the backward, and SyncBatchNorm across processes on any device.

Shape letters: n batch (time-merged), c channels, h w space.

torch's own SyncBatchNorm runs on GPUs only. Here the statistics are those of the whole global batch (two
collectives); the weight and bias gradients are the local ones (DDP averages them) and the input gradient uses the
globally reduced sums, as torch's SyncBatchNorm does.
"""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from einops import rearrange
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from glif2.layers import tdBatchNorm

_C = "c -> 1 c 1 1"


@torch.library.custom_op("glif2::batch_norm_train", mutates_args=("running_mean", "running_var"))
def batch_norm_train(
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float,
    eps: float,
    group: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN of y without autograd: (output, batch mean, batch invstd), running statistics updated in
    place (empty running tensors: none kept; group "": this process's batch). The ATen kernel the plain path runs,
    kept opaque under torch.compile so that the backward's recomputation (the same kernel) rebuilds the output bit
    for bit."""
    rm, rv = (r if r.numel() else None for r in (running_mean, running_var))
    if not group:
        return torch.ops.aten.native_batch_norm(y, weight, bias, rm, rv, True, momentum, eps)
    return _sync_forward(y, weight, bias, rm, rv, momentum, eps, resolve_group(group))


@batch_norm_train.register_fake
def _(y, weight, bias, running_mean, running_var, momentum, eps, group):
    acc = torch.promote_types(y.dtype, torch.float32)
    return y.new_empty(y.shape), y.new_empty((y.shape[1],), dtype=acc), y.new_empty((y.shape[1],), dtype=acc)


def bn_apply(y: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor, eps: float, group) -> Tensor:
    """Training-mode BN output from the batch statistics, bit for bit what the forward computed."""
    if group is None:
        # The ATen kernel recomputes the same statistics and applies them in its own order: an explicit formula
        # would differ from the forward by an ulp.
        return torch.ops.aten.native_batch_norm(y, weight, bias, None, None, True, 0.0, eps)[0]
    return _sync_apply(y, weight, bias, mean, invstd)


def bn_backward(
    dv: Tensor,
    y: Tensor,
    weight: Tensor,
    mean: Tensor,
    invstd: Tensor,
    eps: float,
    group,
    mask: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(d input, d weight, d bias) of training-mode BN, each where `mask` asks for it: ATen's own backward, or the
    synchronized one."""
    if group is None:
        return torch.ops.aten.native_batch_norm_backward(dv, y, weight, None, None, mean, invstd, True, eps, list(mask))
    return _sync_backward(dv, y, weight, mean, invstd, group, mask)


def bn_parts(bn: _BatchNorm) -> tuple[Tensor, Tensor, float]:
    """(training weight, bias, momentum) exactly as the module's own training forward would use them, counting the
    batch as its forward does."""
    if not bn.affine:
        raise ValueError("the lean memory modes need affine BatchNorm layers; use memory='off'")
    if bn.momentum is None:
        raise ValueError(
            "the lean memory modes need BatchNorm layers with a momentum (not the cumulative average of "
            "momentum=None); use memory='off'"
        )
    weight = bn.train_weight() if isinstance(bn, tdBatchNorm) else bn.weight
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
    return weight, bn.bias, bn.momentum


def sync_group_name(bn: nn.Module) -> str:
    """The process group a SyncBatchNorm synchronises over, by name ("" for a plain BN or a single process)."""
    if not isinstance(bn, nn.SyncBatchNorm) or not (dist.is_available() and dist.is_initialized()):
        return ""
    group = bn.process_group or dist.group.WORLD
    return group.group_name if dist.get_world_size(group) > 1 else ""


def resolve_group(name: str):
    """The process group named `name`, or None for ""."""
    return dist.distributed_c10d._resolve_process_group(name) if name else None


# SyncBatchNorm across processes


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


def _sync_forward(
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    group,
) -> tuple[Tensor, Tensor, Tensor]:
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
        gy = (
            (dv_acc - mean_dy - xmu * rearrange(invstd, _C) ** 2 * mean_dy_xmu) * rearrange(invstd * weight.to(acc), _C)
        ).to(y.dtype)
    return gy, g_w, g_b


__all__ = ["batch_norm_train", "bn_apply", "bn_backward", "bn_parts", "resolve_group", "sync_group_name"]
