"""The training run: one epoch, the end of an epoch, and the loop that ties them together (set-up is
glif2.train.setup).

Shape letters: b batch, k classes.

Rank 0 logs and saves the raw module (never the compiled or DDP wrapper). Outputs in the run folder (rank 0): last.pt
(every epoch, on SIGTERM and at max_steps) and best.pt (best test top-1), written atomically; compile_cache.bin (the
compile artifacts, after the first epoch); metrics.jsonl, glif_params.jsonl and tb/ (glif2.train.records);
config.json, the resolved config.
"""

import enum
import json
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import glif2.train.distributed as dist
from glif2.compile_cache import save_compile_cache
from glif2.errors import ConfigError
from glif2.train.config import TrainConfig
from glif2.train.evaluation import evaluate_epoch
from glif2.train.records import Logger, neuron_record
from glif2.train.setup import Run, build_run, preflight, process_state, run_folder


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf."""


class StopReason(enum.Enum):
    DONE = "done"  # every epoch ran
    MAX_STEPS = "max_steps"  # cfg.max_steps optimizer steps were taken
    SIGTERM = "sigterm"  # asked to stop (a scheduler's preemption): checkpointed, continue with --resume auto


# one epoch


class Window:
    """On-device sums since the last log point (loss x n, correct, n, any non-finite loss): read once per interval."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.start, self.steps = time.perf_counter(), 0

    def add(self, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        self.bad |= ~torch.isfinite(loss.detach())
        self.sums += torch.stack(
            [
                loss.detach().double() * len(y),
                (logits.argmax(1) == y).sum().double(),
                torch.tensor(len(y), dtype=torch.float64, device=self.device),
            ]
        )
        self.steps += 1

    def reduce(self, sigterm: bool) -> tuple[list[float], bool, bool]:
        """All-reduced (loss x n, correct, n), any rank non-finite, any rank asked to stop. A host sync."""
        flags = torch.stack([self.bad.double(), torch.tensor(float(sigterm), dtype=torch.float64, device=self.device)])
        reduced = dist.all_reduce_sum(torch.cat([self.sums, flags])).tolist()
        return reduced[:3], reduced[3] > 0, reduced[4] > 0


def train_step(run: Run, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Forward, backward and optimizer step on one batch; returns (loss, logits) without a host sync."""
    if run.cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()
    loss, logits = run.step_module(x, y)
    run.scaler.scale(loss).backward()
    if run.scaler.is_enabled():
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return loss, logits


def log_point(run: Run, window: Window, i: int, steps: int) -> bool:
    """Reduces the window, logs it, and returns True when any rank asked to stop. Raises NonFiniteLoss."""
    (w_loss, w_correct, w_n), bad, stop = window.reduce(run.stop_requested)
    if bad:
        raise NonFiniteLoss(
            f"the training loss became non-finite (NaN or inf) by step {run.step} (epoch {run.epoch + 1}); stopping "
            f"without saving. The last good checkpoint is {run.run_dir / 'last.pt'} (if any epoch finished); lower "
            "--lr, or turn off --amp, and resume with --resume auto"
        )
    elapsed = time.perf_counter() - window.start
    ips = w_n / elapsed if run.step > window.steps else float("nan")  # the first window includes compilation
    record = {
        "kind": "train",
        "epoch": run.epoch + 1,
        "step": run.step,
        "loss": w_loss / w_n,
        "acc": 100.0 * w_correct / w_n,
        "lr": float(run.optimizer.param_groups[0]["lr"]),
        "images_per_s": ips,
    }
    run.logger.log(
        record,
        {
            "train/loss": record["loss"],
            "train/acc": record["acc"],
            **({"train/images_per_s": ips} if math.isfinite(ips) else {}),
        },
        run.step,
    )
    dist.print0(
        f"epoch {run.epoch + 1}/{run.cfg.epochs}  step {i + 1}/{steps}  loss {record['loss']:.4f}  "
        f"acc {record['acc']:5.1f}%  {ips:7.1f} img/s"
    )
    return stop


def train_epoch(run: Run, skip: int) -> tuple[StopReason | None, bool, Tensor]:
    """One epoch of training from batch `skip` (a mid-epoch resume). Returns (why to stop, or None to go on; whether
    the epoch's training is complete; the on-device epoch sums loss x n, correct, n). Every rank returns the same:
    a stop asked on any rank is seen by all at the same log point."""
    cfg, steps = run.cfg, len(run.train_loader)
    # A mid-epoch resume starts at batch `skip`: the loader yields exactly the batches an uninterrupted epoch would
    # have yielded from there (augmentation is a function of seed, epoch and sample), without reading the others.
    run.train_loader.set_epoch(run.epoch, start_batch=skip)
    run.step_module.train()
    epoch_sums = torch.zeros(3, dtype=torch.float64, device=run.device)
    window = Window(run.device)
    for i, (x, y) in enumerate(run.train_loader, start=skip):
        loss, logits = train_step(run, x, y)
        window.add(loss, logits, y)
        last = i == steps - 1
        if run.step % cfg.log_interval == 0 or last or run.step == cfg.max_steps or run.stop_requested:
            stop = log_point(run, window, i, steps)
            epoch_sums += window.sums
            window = Window(run.device)
            if stop:
                return StopReason.SIGTERM, last, epoch_sums
        if run.step == cfg.max_steps:
            return StopReason.MAX_STEPS, last, epoch_sums
    return None, True, epoch_sums


def end_epoch(run: Run, epoch_sums: Tensor, start: float) -> None:
    """Test, schedule, records and checkpoints after an epoch's training."""
    train_seconds = time.perf_counter() - start
    run.objective.eval()
    result, cost = evaluate_epoch(
        run.objective,
        run.model,
        run.test_loader,
        run.device,
        cudagraphs=run.cudagraphs,
        report=run.cfg.report,
        e_ac=run.cfg.e_ac,
        e_mac=run.cfg.e_mac,
    )
    run.test_acc = result["top1"]
    lr = float(run.optimizer.param_groups[0]["lr"])
    run.scheduler.step()
    run.epoch += 1
    is_best = run.test_acc > run.best_acc or not (run.run_dir / "best.pt").exists()  # the first epoch writes one
    run.best_acc = max(run.best_acc, run.test_acc)
    e_loss, e_correct, e_n = dist.all_reduce_sum(epoch_sums.clone()).tolist()
    record = {
        "kind": "epoch",
        "epoch": run.epoch,
        "step": run.step,
        "train_loss": e_loss / max(e_n, 1),
        "train_acc": 100.0 * e_correct / max(e_n, 1),
        "test_loss": result["loss"],
        "test_acc": run.test_acc,
        "test_top5": result["top5"],
        "best_acc": run.best_acc,
        "lr": lr,
        "seconds": time.perf_counter() - start,
        **cost,
    }
    run.logger.log(
        record,
        {
            "test/loss": result["loss"],
            "test/acc": run.test_acc,
            "test/top5": result["top5"],
            **{k.replace("test_", "test/", 1): v for k, v in cost.items()},
            **{f"lr/{g.get('name', j)}": float(g["lr"]) for j, g in enumerate(run.optimizer.param_groups)},
        },
        run.step,
    )
    run.logger.log_params(neuron_record(run.model, run.epoch, run.step))
    dist.print0(
        f"epoch {run.epoch}/{run.cfg.epochs}: train loss {record['train_loss']:.4f} acc "
        f"{record['train_acc']:.2f}% ({train_seconds:.1f} s) | test loss {result['loss']:.4f} top-1 "
        f"{run.test_acc:.2f}% top-5 {result['top5']:.2f}% | best {run.best_acc:.2f}% | lr {lr:.4g}"
    )
    run.save("last.pt")
    if is_best:
        run.save("best.pt")
    if run.compile_cache is not None and run.info.is_main:  # every graph of a step and an evaluation is compiled now
        save_compile_cache(run.compile_cache, run.device)
        run.compile_cache = None


# the loop


def fit(run: Run) -> StopReason:
    """Epochs until done, max_steps or SIGTERM; a mid-epoch stop saves last.pt where it is."""
    steps = len(run.train_loader)
    skip = run.step - run.epoch * steps  # batches of a partly done epoch (a mid-epoch resume)
    if not 0 <= skip <= steps:
        raise ConfigError(f"checkpoint step {run.step} does not fit epoch {run.epoch} with {steps} steps per epoch")
    while run.epoch < run.cfg.epochs:
        start = time.perf_counter()
        stopped, complete, sums = train_epoch(run, skip)
        skip = 0
        if not complete:  # mid-epoch: save where we are; the next run skips the batches done
            run.save("last.pt")
            dist.print0(
                f"stopped ({stopped.value}) at step {run.step}, epoch {run.epoch + 1}: saved "
                f"{run.run_dir / 'last.pt'}; continue with --resume auto"
            )
            return stopped
        end_epoch(run, sums, start)
        if stopped is not None:
            return stopped
    return StopReason.DONE


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs (or continues) the training described by `cfg`. Returns {model (the raw module), epoch, step, best_acc,
    test_acc, stopped (a StopReason), run_dir}."""
    world_size = dist.env_world_size()
    resume = preflight(cfg, world_size)
    info = dist.init(cfg.device, cfg.dist_timeout)
    dist.print0(f"glif2 train: {cfg.name} on {world_size} x {info.device}")
    with process_state(cfg):
        run = build_run(cfg, info, resume)
        run.run_dir = run_folder(cfg, resume is not None, info)
        if run.run_dir != Path(cfg.run_dir):
            dist.print0(
                f"{cfg.run_dir} holds another run: this one writes to {run.run_dir} (--resume auto continues "
                f"{cfg.run_dir}; --name picks another name)"
            )
        dist.print0(format_config(cfg))
        # A resumed run keeps its records up to the checkpoint. `--resume auto` with no checkpoint yet restarts the
        # same run from scratch (e.g. torchrun restarting a group that died before its first checkpoint): the
        # records of that attempt go.
        keep_until = run.step if resume is not None else -1 if cfg.resume == "auto" else None
        run.logger = Logger(run.run_dir, info.is_main, cfg.tensorboard, keep_until)
        if info.is_main:
            (run.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            if resume is None:
                run.logger.log_params(neuron_record(run.model, 0, 0))

        def on_sigterm(signum, frame):
            run.stop_requested = True  # acted on at the next log point (every rank): checkpoint, then exit

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            # Distributed, SIGTERM may come from torchrun because a peer died: a stop that cannot finish must not wait.
            with dist.stop_deadline() if info.distributed else nullcontext():
                stopped = fit(run)
        finally:
            signal.signal(signal.SIGTERM, previous)
            run.logger.close()
    dist.barrier()
    dist.print0(
        f"{'finished' if stopped is StopReason.DONE else 'stopped'}: epoch {run.epoch}, step {run.step}, "
        f"best test top-1 {run.best_acc:.2f}%; checkpoints in {run.run_dir}"
    )
    return {
        "model": run.model,
        "epoch": run.epoch,
        "step": run.step,
        "best_acc": run.best_acc,
        "test_acc": run.test_acc,
        "stopped": stopped,
        "run_dir": str(run.run_dir),
    }


def format_config(cfg: TrainConfig) -> str:
    """One `field = value` line per field, for the log."""
    fields = cfg.to_dict()
    width = max(len(k) for k in fields)
    return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in fields.items())


__all__ = ["NonFiniteLoss", "StopReason", "end_epoch", "fit", "train", "train_epoch", "train_step"]
