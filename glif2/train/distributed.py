"""Process-group plumbing for torchrun: rank from the environment, NCCL on CUDA, gloo on CPU, print0.

    torchrun --nproc_per_node 4 train.py ...   # sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT

Without those variables everything runs as a single process (rank 0 of 1) and no process group is created.

A group that torchrun restarts (`--max-restarts`) must be able to form again, and a rank must never outlive its job:
- the process group gets a bounded timeout (`--dist-timeout`, 10 minutes by default; torch's is 30): a set-up or a
  collective that waits on a rank that is gone fails instead of hanging;
- the group's keys live under a prefix no earlier group used (`group_store`): torchrun keeps one store for the
  whole job, and a restarted rank that read the dead group's addresses failed with `connectFullMesh ... Connection
  refused` or waited out the timeout;
- a rank whose launcher dies gets SIGTERM (PR_SET_PDEATHSIG; torchrun starts every rank in a session of its own,
  so nothing else would end it);
- once asked to stop (SIGTERM), a rank of a distributed run has `STOP_GRACE_S` seconds to checkpoint and exit
  (`stop_deadline`): a stop that waits on a dead peer, or a save that cannot finish, ends the process instead.
"""

import ctypes
import datetime
import os
import signal
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from glif2.errors import ConfigError

DEFAULT_TIMEOUT_S = 600
# Time a rank has, once asked to stop, to finish its step, checkpoint and leave; under the 30 s after which torchrun
# (and Slurm) follow SIGTERM with SIGKILL.
STOP_GRACE_S = 25


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


def init(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Creates the process group when launched by torchrun (NCCL on CUDA, gloo on CPU) and picks this rank's device.

    Args:
        device: "auto" (cuda:LOCAL_RANK when CUDA is present, else cpu), "cpu" or "cuda".
        timeout_s: how long the set-up and every collective may wait for the other ranks.
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
        die_with_launcher()
        timeout = datetime.timedelta(seconds=timeout_s)
        options = dict(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None, timeout=timeout)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's store, shared by every restart
            dist.init_process_group(store=group_store(rank, world, timeout), rank=rank, world_size=world, **options)
        else:
            dist.init_process_group(**options)
    return DistInfo(rank, local_rank, world, dev)


def group_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's store (MASTER_ADDR:MASTER_PORT) under a prefix that no earlier group of the job used.

    torchrun keeps one store for the whole job and does not separate the groups it restarts, so a restarted rank
    finds the keys of the group before it, among them the addresses of ranks that are dead. Every rank posts a
    fresh random id under its rank; rank 0 answers each id it sees with its own, and waits until every rank has
    confirmed that answer. A rank only reads the answer to its own new id, so nothing stale is ever read.
    """
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    me = uuid.uuid4().hex
    if rank != 0:
        store.set(f"glif2/join/{rank}", me)
        store.wait([f"glif2/answer/{me}"])  # fails after `timeout`
        token = store.get(f"glif2/answer/{me}").decode()
        store.set(f"glif2/ready/{token}/{rank}", "1")
        return dist.PrefixStore(f"glif2/group/{token}", store)
    deadline, answered, waiting = time.monotonic() + timeout.total_seconds(), {}, set(range(1, world))
    while True:
        for r in sorted(waiting):
            if store.check([f"glif2/ready/{me}/{r}"]):
                waiting.discard(r)
            elif store.check([f"glif2/join/{r}"]) and answered.get(r) != (peer := store.get(f"glif2/join/{r}")):
                store.set(f"glif2/answer/{peer.decode()}", me)  # a dead rank's old id gets an answer nobody reads
                answered[r] = peer
        if not waiting:
            return dist.PrefixStore(f"glif2/group/{me}", store)
        if time.monotonic() > deadline:
            raise dist.DistError(
                f"ranks {sorted(waiting)} did not join the process group within {timeout.total_seconds():.0f} s"
            )
        time.sleep(0.02)


def die_with_launcher() -> None:
    """SIGTERM to this process when its parent (the torchrun agent) dies (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def stop_deadline(seconds: int = STOP_GRACE_S):
    """Inside this block, a SIGTERM gives the process `seconds` to exit: then it is ended by SIGALRM, whose default
    action the kernel carries out, so the end comes even while the main thread waits in a collective on a dead
    peer. (A Python signal handler only runs between bytecodes of the main thread, so the countdown is started by a
    thread that Python's C-level handler wakes, through `signal.set_wakeup_fd`.) The countdown, once started, runs
    until the process exits. Call from the main thread, with a Python handler installed for SIGTERM. (No SIGALRM,
    as on Windows: no deadline.)"""
    if not hasattr(signal, "SIGALRM"):
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch() -> None:
        armed = False
        while data := os.read(read_fd, 64):  # b"" once the write end is closed
            if not armed and signal.SIGTERM in data:
                signal.alarm(seconds)
                armed = True

    watcher = threading.Thread(target=watch, name="glif2-stop-deadline", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        os.close(write_fd)
        watcher.join()
        os.close(read_fd)


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


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "STOP_GRACE_S",
    "DistInfo",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "destroy",
    "die_with_launcher",
    "env_world_size",
    "group_store",
    "init",
    "is_main",
    "print0",
    "stop_deadline",
]
