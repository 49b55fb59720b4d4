"""The training run: set-up, one epoch, end of epoch, and the loop that ties them together.

Shape letters: b batch, k classes.

Build order (S13): checks (before any work), data, model, compile, DDP, optimizer, loop. Rank 0 logs and saves the
raw module (never the compiled or DDP wrapper). Outputs in the run folder (rank 0): last.pt (every epoch, on
SIGTERM and at max_steps) and best.pt (best test top-1), written atomically; metrics.jsonl, glif_params.jsonl and
tb/ (glif2.train.records); config.json, the resolved config.
"""

import enum
import json
import math
import os
import random
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pipelines
from glif2.analysis import glif_layers
from glif2.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from glif2.compile import compile_model, compile_step
from glif2.errors import CheckpointError, ConfigError
from glif2.models import create_model
from glif2.models.registry import model_inputs
from glif2.neuron import randomize_gates
from glif2.train import distributed as dist
from glif2.train.config import TrainConfig
from glif2.train.evaluation import evaluate_epoch
from glif2.train.optim import build_optimizer, build_scheduler
from glif2.train.records import Logger, neuron_record

# The fields a resumed run must share with its checkpoint (anything else, e.g. epochs or lr, may change).
RESUME_FIELDS = ("model", "T", "dataset", "batch_size", "channel_wise", "variant", "gate_mode", "params", "bn",
                 "sync_bn")


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf."""


class StopReason(enum.Enum):
    DONE = "done"  # every epoch ran
    MAX_STEPS = "max_steps"  # cfg.max_steps optimizer steps were taken
    SIGTERM = "sigterm"  # asked to stop (a scheduler's preemption): checkpointed, continue with --resume auto


class Objective(nn.Module):
    """model + cross-entropy in one module, so that one compiled graph (and one CUDA graph) covers forward and loss.
    Returns (mean loss, logits `b k`)."""

    def __init__(self, model: nn.Module, label_smoothing: float, amp_dtype: torch.dtype | None):
        super().__init__()
        self.model, self.label_smoothing, self.amp_dtype = model, label_smoothing, amp_dtype

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(x.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            logits = self.model(x)
        logits = logits.float()
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits


@dataclass
class Run:
    """Everything a running training holds."""

    cfg: TrainConfig
    info: dist.DistInfo
    run_dir: Path
    model: nn.Module  # the raw module (what is saved)
    objective: nn.Module  # compiled Objective (evaluation runs it directly)
    step_module: nn.Module  # the objective under DDP when distributed
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    opt_step: Any
    train_loader: Any
    test_loader: Any
    cudagraphs: bool
    logger: Logger | None = None
    epoch: int = 0
    step: int = 0
    best_acc: float = 0.0
    test_acc: float = float("nan")
    stop_requested: bool = False  # set by SIGTERM; acted on at the next log point

    @property
    def device(self) -> torch.device:
        return self.info.device

    def save(self, name: str) -> None:
        if self.info.is_main:
            save_checkpoint(self.run_dir / name, model=self.model, config=self.cfg.to_dict(), optimizer=self.optimizer,
                            scheduler=self.scheduler, scaler=self.scaler, rng=rng_state(), epoch=self.epoch,
                            step=self.step, best_acc=self.best_acc, test_acc=self.test_acc,
                            world_size=self.info.world_size)


# set-up


def preflight(cfg: TrainConfig, world_size: int) -> tuple[Path, dict[str, Any]] | None:
    """Every check that can fail before any work is done; returns the checkpoint to resume from, (its path, its
    contents on the CPU), or None."""
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} (global) does not divide over {world_size} ranks; "
                          f"use a multiple of {world_size}")
    eval_batch = cfg.eval_batch_size or cfg.batch_size
    if eval_batch % world_size:
        raise ConfigError(f"eval_batch_size={eval_batch} (global) does not divide over {world_size} ranks")
    if cfg.dataset != "digits" and not cfg.download and not Path(cfg.data_dir).is_dir():
        raise ConfigError(f"data folder {cfg.data_dir!r} does not exist (dataset {cfg.dataset}); pass --data-dir "
                          "with the dataset root" + (", or --download" if cfg.dataset != "imagenet" else ""))
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cfg.compile == "reduce-overhead" and not cuda:
        raise ConfigError("compile=reduce-overhead needs CUDA (it is CUDA graphs); use auto, default or none")
    if cfg.sync_bn and world_size > 1 and not cuda:
        raise ConfigError("sync_bn across processes needs GPUs: torch's DDP refuses SyncBatchNorm on the CPU; "
                          "drop --sync-bn (each process then normalises its own shard)")
    model_options(cfg)  # a model that cannot take the dataset's input is refused here, before any data is read
    if cfg.resume == "":
        return None
    path = Path(cfg.run_dir) / "last.pt" if cfg.resume == "auto" else Path(cfg.resume)
    if not path.is_file():
        if cfg.resume == "auto":
            return None  # nothing to continue: a fresh run
        raise ConfigError(f"--resume {cfg.resume}: no such checkpoint file")
    try:
        ckpt = load_checkpoint(path, map_location="cpu")
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume: {e}. Resume from another checkpoint (--resume PATH, e.g. the run's "
                              "best.pt) or start a new run under another --name") from None
    saved = ckpt.get("config")
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} has no training config: not a train.py checkpoint")
    saved = TrainConfig.from_dict(saved)
    for key in RESUME_FIELDS:
        if getattr(saved, key) != getattr(cfg, key):
            raise ConfigError(f"cannot resume {path}: it was trained with {key}={getattr(saved, key)!r} but this run "
                              f"has {key}={getattr(cfg, key)!r}; pass --{key.replace('_', '-')} "
                              f"{getattr(saved, key)} or a new --name")
    saved_world = ckpt.get("world_size", world_size)
    if saved_world != world_size:
        raise ConfigError(f"cannot resume {path}: it was written by a run on {saved_world} processes and this one has "
                          f"{world_size}; the data order and batches per rank would differ. Resume with "
                          f"{saved_world} processes, or start a new --name")
    return path, ckpt


def model_options(cfg: TrainConfig) -> dict[str, Any]:
    """Options for create_model: the neuron and BN settings, and what the dataset's input fixes (input channels,
    input size). A model whose input does not match the dataset's is refused with the reason."""
    info = pipelines.DATASETS[cfg.dataset]
    inputs = model_inputs(cfg.model)
    if inputs["kind"] != info.kind:
        shapes = {"image": "images `b c h w`", "frames": "event frames `b t c h w`"}
        raise ConfigError(f"model {cfg.model} takes {shapes[inputs['kind']]} but dataset {cfg.dataset} gives "
                          f"{shapes[info.kind]}; pick a model for {cfg.dataset}")
    options = dict(channel_wise=cfg.channel_wise, gate_mode=cfg.gate_mode, gate_init=tuple(cfg.gate_init),
                   variant=cfg.variant, params=cfg.params,
                   bn="plain" if cfg.sync_bn else cfg.bn, in_channels=info.in_channels, memory=cfg.memory)
    if inputs["input_size"]:
        options["input_size"] = info.input_size
    return options


def run_folder(cfg: TrainConfig, resuming: bool, info: dist.DistInfo) -> Path:
    """The run's folder: <out_dir>/<name>, or, when that already holds another run's files and this run is not
    continuing it, the first free <out_dir>/<name>-2, -3, ... (an existing run is never overwritten). Rank 0
    decides and every rank follows."""
    base = Path(cfg.run_dir)
    choice = base
    if info.is_main and not resuming and cfg.resume != "auto":
        k = 2
        while choice.exists() and any(choice.iterdir()):
            choice, k = base.with_name(f"{base.name}-{k}"), k + 1
    return Path(dist.broadcast_object(str(choice)))


@contextmanager
def process_state(cfg: TrainConfig):
    """Seeds and sets threads and determinism for the run, and puts back on exit what it found (RNG states, threads,
    cuDNN flags, deterministic algorithms, CUBLAS_WORKSPACE_CONFIG), so that train() leaves the process as it was."""
    saved = (rng_state(), torch.get_num_threads(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.benchmark = not cfg.deterministic
    torch.backends.cudnn.deterministic = cfg.deterministic
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        yield
    finally:
        rng, threads, benchmark, deterministic, algorithms, cublas = saved
        set_rng_state(rng)
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic
        torch.use_deterministic_algorithms(algorithms)
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def build_run(cfg: TrainConfig, info: dist.DistInfo, resume: tuple[Path, dict[str, Any]] | None) -> Run:
    """Data, model, compile, DDP, optimizer, and the state of the checkpoint being resumed (preflight's)."""
    device, world = info.device, info.world_size
    compile_mode = cfg.compile if cfg.compile != "auto" else ("reduce-overhead" if device.type == "cuda" else "default")
    cudagraphs = compile_mode == "reduce-overhead"
    # data: static training batches (whole batches only), every test sample counted once over the ranks
    common = dict(data_dir=cfg.data_dir, T=cfg.T if pipelines.DATASETS[cfg.dataset].kind == "frames" else None,
                  rank=info.rank, world_size=world, device=device, backend=cfg.backend, seed=cfg.seed,
                  download=cfg.download, num_workers=cfg.num_workers)
    train_loader = pipelines.build_loader(cfg.dataset, "train", batch_size=cfg.batch_size // world, **common)
    test_loader = pipelines.build_loader(cfg.dataset, "test", batch_size=(cfg.eval_batch_size or cfg.batch_size)
                                         // world, **common)
    # model: built identically on every rank (same seed); the raw module is what gets saved
    model = create_model(cfg.model, train_loader.num_classes, cfg.T, **model_options(cfg))
    if cfg.randomgate:
        randomize_gates(model)
    if cfg.sync_bn:  # plain BN already (model_options), now synchronised; one process: plain BN
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if resume is not None:
        model.load_state_dict(resume[1]["model"], strict=True)
    model.to(device)
    dist.print0(f"{cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
                f"{len(list(glif_layers(model)))} GLIF layers; compile={compile_mode}")
    # compile before DDP (keeps DDP out of the graph), then DDP over the compiled objective
    amp_dtype = getattr(torch, cfg.amp_dtype) if cfg.amp else None
    objective = compile_model(Objective(model, cfg.label_smoothing, amp_dtype), compile_mode)
    step_module = objective
    if info.distributed:
        step_module = nn.parallel.DistributedDataParallel(objective, device_ids=[device.index]
                                                          if device.type == "cuda" else None)
    # optimizer, schedule, scaler (as the reference: SGD groups by name, per-epoch cosine)
    optimizer = build_optimizer(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                mode=cfg.param_groups, tunable_lif=cfg.tunable_lif, gate_lr_divisor=cfg.gate_lr_divisor)
    kind = cfg.scheduler if cfg.scheduler != "auto" else ("soft-cosine" if cfg.tunable_lif else "cosine")
    scheduler = build_scheduler(optimizer, kind=kind, epochs=cfg.epochs, t_max=cfg.t_max)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    run = Run(cfg=cfg, info=info, run_dir=Path(cfg.run_dir), model=model, objective=objective,
              step_module=step_module, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
              opt_step=compile_step(optimizer.step, compile_mode) if cudagraphs else optimizer.step,
              train_loader=train_loader, test_loader=test_loader, cudagraphs=cudagraphs)
    if resume is not None:
        restore(run, *resume)
    if cudagraphs:  # the compiled step reads the learning rates as tensors: a new lr is new data, not a recompile
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
    return run


def restore(run: Run, path: Path, ckpt: dict[str, Any]) -> None:
    """The optimizer, schedule, scaler, counters and RNG of a checkpoint (the model is loaded before compiling)."""
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.epoch, run.step, run.best_acc = ckpt["epoch"], ckpt["step"], ckpt["best_acc"]
    run.test_acc = ckpt.get("test_acc", float("nan"))
    set_rng_state(ckpt["rng"])
    dist.print0(f"resumed {path}: epoch {run.epoch}, step {run.step}, best top-1 {run.best_acc:.2f}")


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
        self.sums += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                                  torch.tensor(len(y), dtype=torch.float64, device=self.device)])
        self.steps += 1

    def reduce(self, sigterm: bool) -> tuple[list[float], bool, bool]:
        """All-reduced (loss x n, correct, n), any rank non-finite, any rank asked to stop. A host sync."""
        flags = torch.stack([self.bad.double(), torch.tensor(float(sigterm), dtype=torch.float64,
                                                             device=self.device)])
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
        run.opt_step()
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
            "--lr, or turn off --amp, and resume with --resume auto")
    elapsed = time.perf_counter() - window.start
    ips = w_n / elapsed if run.step > window.steps else float("nan")  # the first window includes compilation
    record = {"kind": "train", "epoch": run.epoch + 1, "step": run.step, "loss": w_loss / w_n,
              "acc": 100.0 * w_correct / w_n, "lr": float(run.optimizer.param_groups[0]["lr"]), "images_per_s": ips}
    run.logger.log(record, {"train/loss": record["loss"], "train/acc": record["acc"],
                            **({"train/images_per_s": ips} if math.isfinite(ips) else {})}, run.step)
    dist.print0(f"epoch {run.epoch + 1}/{run.cfg.epochs}  step {i + 1}/{steps}  loss {record['loss']:.4f}  "
                f"acc {record['acc']:5.1f}%  {ips:7.1f} img/s")
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
    result, cost = evaluate_epoch(run.objective, run.model, run.test_loader, run.device, cudagraphs=run.cudagraphs,
                                  report=run.cfg.report, e_ac=run.cfg.e_ac, e_mac=run.cfg.e_mac)
    run.test_acc = result["top1"]
    lr = float(run.optimizer.param_groups[0]["lr"])
    run.scheduler.step()
    run.epoch += 1
    is_best = run.test_acc > run.best_acc or not (run.run_dir / "best.pt").exists()  # the first epoch writes one
    run.best_acc = max(run.best_acc, run.test_acc)
    e_loss, e_correct, e_n = dist.all_reduce_sum(epoch_sums.clone()).tolist()
    record = {"kind": "epoch", "epoch": run.epoch, "step": run.step, "train_loss": e_loss / max(e_n, 1),
              "train_acc": 100.0 * e_correct / max(e_n, 1), "test_loss": result["loss"], "test_acc": run.test_acc,
              "test_top5": result["top5"], "best_acc": run.best_acc, "lr": lr, "seconds": time.perf_counter() - start,
              **cost}
    run.logger.log(record, {"test/loss": result["loss"], "test/acc": run.test_acc, "test/top5": result["top5"],
                            **{k.replace("test_", "test/", 1): v for k, v in cost.items()},
                            **{f"lr/{g.get('name', j)}": float(g["lr"])
                               for j, g in enumerate(run.optimizer.param_groups)}}, run.step)
    run.logger.log_params(neuron_record(run.model, run.epoch, run.step))
    dist.print0(f"epoch {run.epoch}/{run.cfg.epochs}: train loss {record['train_loss']:.4f} acc "
                f"{record['train_acc']:.2f}% ({train_seconds:.1f} s) | test loss {result['loss']:.4f} top-1 "
                f"{run.test_acc:.2f}% top-5 {result['top5']:.2f}% | best {run.best_acc:.2f}% | lr {lr:.4g}")
    run.save("last.pt")
    if is_best:
        run.save("best.pt")


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
            dist.print0(f"stopped ({stopped.value}) at step {run.step}, epoch {run.epoch + 1}: saved "
                        f"{run.run_dir / 'last.pt'}; continue with --resume auto")
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
            dist.print0(f"{cfg.run_dir} holds another run: this one writes to {run.run_dir} (--resume auto continues "
                        f"{cfg.run_dir}; --name picks another name)")
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
    dist.print0(f"{'finished' if stopped is StopReason.DONE else 'stopped'}: epoch {run.epoch}, step {run.step}, "
                f"best test top-1 {run.best_acc:.2f}%; checkpoints in {run.run_dir}")
    return {"model": run.model, "epoch": run.epoch, "step": run.step, "best_acc": run.best_acc,
            "test_acc": run.test_acc, "stopped": stopped, "run_dir": str(run.run_dir)}


def format_config(cfg: TrainConfig) -> str:
    """One `field = value` line per field, for the log."""
    fields = cfg.to_dict()
    width = max(len(k) for k in fields)
    return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in fields.items())


__all__ = ["Objective", "Run", "StopReason", "build_run", "fit", "model_options", "preflight", "train"]
