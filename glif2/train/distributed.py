"""Process-group plumbing for torchrun: rank from the environment, NCCL on CUDA, gloo on CPU, print0.

    torchrun --nproc_per_node 4 train.py ...   # sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT

Without those variables everything runs as a single process (rank 0 of 1) and no process group is created.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from glif2.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 outside torchrun), read before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str = "auto") -> DistInfo:
    """Creates the process group when launched by torchrun (NCCL on CUDA, gloo on CPU) and picks this rank's device.

    Args:
        device: "auto" (cuda:LOCAL_RANK when CUDA is present, else cpu), "cpu" or "cuda".
    """
    rank, local_rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), env_world_size()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available; use --device cpu or auto")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(rank, local_rank, world, dev)


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only, flushed."""
    if is_main():
        print(*args, **kwargs, flush=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (identity in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (identity in a single process); `obj` must pickle."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DistInfo", "all_reduce_sum", "barrier", "broadcast_object", "destroy", "env_world_size", "init", "is_main",
           "print0"]
