"""Setting up a training run: the checks made before any work, the model's options, the run folder, the process
state, and the build (data, model, compile, DDP, optimizer, and the state of a resumed checkpoint).

Shape letters: b batch, k classes.

Build order: checks (before any work, so a bad setting fails before anything is built or written), data, model,
compile, DDP (it wraps the compiled module, which keeps DDP out of the graph), optimizer. Compilation is regional by
default (each block once per distinct shape, docs/performance.md §8), and loads the run's saved compile artifacts
when they are there.
"""

import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import glif2.train.distributed as dist
import pipelines
from glif2.analysis import glif_layers
from glif2.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from glif2.compile import compile_scope, regions
from glif2.compile_cache import load_compile_cache
from glif2.errors import CheckpointError, ConfigError
from glif2.models import create_model
from glif2.models.registry import model_inputs
from glif2.neuron import randomize_gates
from glif2.train.config import TrainConfig
from glif2.train.optim import build_optimizer, build_scheduler
from glif2.train.records import Logger

# The fields a resumed run must share with its checkpoint (anything else, e.g. epochs or lr, may change).
RESUME_FIELDS = (
    "model",
    "T",
    "dataset",
    "batch_size",
    "channel_wise",
    "variant",
    "gate_mode",
    "params",
    "bn",
    "sync_bn",
)


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

    def regions(self) -> list[nn.Module]:
        """The model's regions: regional compilation of the objective compiles its network's blocks."""
        return regions(self.model)


@dataclass
class Run:
    """Everything a running training holds."""

    cfg: TrainConfig
    info: dist.DistInfo
    run_dir: Path
    model: nn.Module  # the raw module (what is saved)
    objective: nn.Module  # the Objective (compiled whole, or over a model compiled by regions); evaluation runs it
    step_module: nn.Module  # the objective under DDP when distributed
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    train_loader: Any
    test_loader: Any
    cudagraphs: bool
    compile_cache: Path | None = None  # where the compile artifacts are saved after the first epoch (None: not)
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
            save_checkpoint(
                self.run_dir / name,
                model=self.model,
                config=self.cfg.to_dict(),
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                rng=rng_state(),
                epoch=self.epoch,
                step=self.step,
                best_acc=self.best_acc,
                test_acc=self.test_acc,
                world_size=self.info.world_size,
            )


# set-up


def preflight(cfg: TrainConfig, world_size: int) -> tuple[Path, dict[str, Any]] | None:
    """Every check that can fail before any work is done; returns the checkpoint to resume from, (its path, its
    contents on the CPU), or None."""
    if cfg.batch_size % world_size:
        raise ConfigError(
            f"batch_size={cfg.batch_size} (global) does not divide over {world_size} ranks; "
            f"use a multiple of {world_size}"
        )
    eval_batch = cfg.eval_batch_size or cfg.batch_size
    if eval_batch % world_size:
        raise ConfigError(f"eval_batch_size={eval_batch} (global) does not divide over {world_size} ranks")
    if cfg.dataset != "digits" and not cfg.download and not Path(cfg.data_dir).is_dir():
        raise ConfigError(
            f"data folder {cfg.data_dir!r} does not exist (dataset {cfg.dataset}); pass --data-dir "
            "with the dataset root" + (", or --download" if cfg.dataset != "imagenet" else "")
        )
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cfg.compile_mode == "reduce-overhead" and not cuda:
        raise ConfigError(
            "compile_mode=reduce-overhead needs CUDA (it is CUDA graphs); use auto, default or max-autotune"
        )
    if cfg.compile_cache not in ("", "off") and not Path(cfg.compile_cache).is_file():
        raise ConfigError(
            f"--compile-cache {cfg.compile_cache}: no such file; pass another run's compile_cache.bin, or leave it out"
        )
    if cfg.sync_bn and world_size > 1 and not cuda:
        raise ConfigError(
            "sync_bn across processes needs GPUs: torch's DDP refuses SyncBatchNorm on the CPU; "
            "drop --sync-bn (each process then normalises its own shard)"
        )
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
        raise CheckpointError(
            f"cannot resume: {e}. Resume from another checkpoint (--resume PATH, e.g. the run's "
            "best.pt) or start a new run under another --name"
        ) from None
    saved = ckpt.get("config")
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} has no training config: not a train.py checkpoint")
    saved = TrainConfig.from_dict(saved)
    for key in RESUME_FIELDS:
        if getattr(saved, key) != getattr(cfg, key):
            raise ConfigError(
                f"cannot resume {path}: it was trained with {key}={getattr(saved, key)!r} but this run "
                f"has {key}={getattr(cfg, key)!r}; pass --{key.replace('_', '-')} "
                f"{getattr(saved, key)} or a new --name"
            )
    saved_world = ckpt.get("world_size", world_size)
    if saved_world != world_size:
        raise ConfigError(
            f"cannot resume {path}: it was written by a run on {saved_world} processes and this one has "
            f"{world_size}; the data order and batches per rank would differ. Resume with "
            f"{saved_world} processes, or start a new --name"
        )
    return path, ckpt


def model_options(cfg: TrainConfig) -> dict[str, Any]:
    """Options for create_model: the neuron and BN settings, and what the dataset's input fixes (input channels,
    input size). A model whose input does not match the dataset's is refused with the reason."""
    info = pipelines.DATASETS[cfg.dataset]
    inputs = model_inputs(cfg.model)
    if inputs["kind"] != info.kind:
        shapes = {"image": "images `b c h w`", "frames": "event frames `b t c h w`"}
        raise ConfigError(
            f"model {cfg.model} takes {shapes[inputs['kind']]} but dataset {cfg.dataset} gives "
            f"{shapes[info.kind]}; pick a model for {cfg.dataset}"
        )
    options = dict(
        channel_wise=cfg.channel_wise,
        gate_mode=cfg.gate_mode,
        gate_init=tuple(cfg.gate_init),
        variant=cfg.variant,
        params=cfg.params,
        bn="plain" if cfg.sync_bn else cfg.bn,
        in_channels=info.in_channels,
        memory=cfg.memory,
    )
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
    saved = (
        rng_state(),
        torch.get_num_threads(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
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


def build_loaders(cfg: TrainConfig, info: dist.DistInfo) -> tuple[Any, Any]:
    """This rank's loaders: static training batches (whole batches only), every test sample counted once over the
    ranks."""
    common = dict(
        data_dir=cfg.data_dir,
        T=cfg.T if pipelines.DATASETS[cfg.dataset].kind == "frames" else None,
        rank=info.rank,
        world_size=info.world_size,
        device=info.device,
        backend=cfg.backend,
        seed=cfg.seed,
        download=cfg.download,
        num_workers=cfg.num_workers,
    )
    train_loader = pipelines.build_loader(cfg.dataset, "train", batch_size=cfg.batch_size // info.world_size, **common)
    test_batch = (cfg.eval_batch_size or cfg.batch_size) // info.world_size
    return train_loader, pipelines.build_loader(cfg.dataset, "test", batch_size=test_batch, **common)


def build_run(cfg: TrainConfig, info: dist.DistInfo, resume: tuple[Path, dict[str, Any]] | None) -> Run:
    """Data, model, compile, DDP, optimizer, and the state of the checkpoint being resumed (preflight's)."""
    device = info.device
    compile_mode = compile_mode_for(cfg, device)
    cudagraphs = compile_mode == "reduce-overhead"
    train_loader, test_loader = build_loaders(cfg, info)
    # model: built identically on every rank (same seed); the raw module is what gets saved
    model = create_model(cfg.model, train_loader.num_classes, cfg.T, **model_options(cfg))
    if cfg.randomgate:
        randomize_gates(model)
    if cfg.sync_bn:  # plain BN already (model_options), now synchronised; one process: plain BN
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if resume is not None:
        model.load_state_dict(resume[1]["model"], strict=True)
    model.to(device)
    dist.print0(
        f"{cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(list(glif_layers(model)))} GLIF layers; compile={cfg.compile} ({compile_mode})"
    )
    # compile before DDP (keeps DDP out of the graph), then DDP over the compiled objective
    amp_dtype = getattr(torch, cfg.amp_dtype) if cfg.amp else None
    cache = compile_cache_path(cfg)
    if cfg.compile != "none" and cache is not None and cache.is_file():
        load_compile_cache(cache, device)  # a damaged or mismatched file is ignored with a warning
    objective = compile_scope(Objective(model, cfg.label_smoothing, amp_dtype), cfg.compile, compile_mode)
    step_module = objective
    if info.distributed:
        step_module = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )
    # optimizer, schedule, scaler (as the reference: SGD groups by name, per-epoch cosine)
    optimizer = build_optimizer(
        model,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        mode=cfg.param_groups,
        tunable_lif=cfg.tunable_lif,
        gate_lr_divisor=cfg.gate_lr_divisor,
    )
    kind = cfg.scheduler if cfg.scheduler != "auto" else ("soft-cosine" if cfg.tunable_lif else "cosine")
    scheduler = build_scheduler(optimizer, kind=kind, epochs=cfg.epochs, t_max=cfg.t_max)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # The optimizer step stays eager: a few foreach kernels, whose state (momentum buffers) would otherwise be created
    # inside a CUDA graph's memory pool and overwritten by the next replay.
    run = Run(
        cfg=cfg,
        info=info,
        run_dir=Path(cfg.run_dir),
        model=model,
        objective=objective,
        step_module=step_module,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        train_loader=train_loader,
        test_loader=test_loader,
        cudagraphs=cudagraphs,
        compile_cache=None
        if cfg.compile == "none" or cfg.compile_cache == "off" or (cache and cache.is_file())
        else Path(cfg.run_dir) / COMPILE_CACHE,
    )
    if resume is not None:
        restore(run, *resume)
    return run


COMPILE_CACHE = "compile_cache.bin"  # the run folder's saved compile artifacts


def compile_mode_for(cfg: TrainConfig, device: torch.device) -> str:
    """Inductor's mode for this run: the config's, or for auto reduce-overhead (CUDA graphs) on CUDA and default on
    the CPU; "none" when nothing is compiled."""
    if cfg.compile == "none":
        return "none"
    if cfg.compile_mode != "auto":
        return cfg.compile_mode
    return "reduce-overhead" if device.type == "cuda" else "default"


def compile_cache_path(cfg: TrainConfig) -> Path | None:
    """The compile artifacts this run loads: --compile-cache's file, else the run folder's (None: "off")."""
    if cfg.compile_cache == "off":
        return None
    return Path(cfg.compile_cache) if cfg.compile_cache else Path(cfg.run_dir) / COMPILE_CACHE


def restore(run: Run, path: Path, ckpt: dict[str, Any]) -> None:
    """The optimizer, schedule, scaler, counters and RNG of a checkpoint (the model is loaded before compiling)."""
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.epoch, run.step, run.best_acc = ckpt["epoch"], ckpt["step"], ckpt["best_acc"]
    run.test_acc = ckpt.get("test_acc", float("nan"))
    set_rng_state(ckpt["rng"])
    dist.print0(f"resumed {path}: epoch {run.epoch}, step {run.step}, best top-1 {run.best_acc:.2f}")


__all__ = [
    "COMPILE_CACHE",
    "RESUME_FIELDS",
    "Objective",
    "Run",
    "build_run",
    "compile_cache_path",
    "compile_mode_for",
    "model_options",
    "preflight",
    "process_state",
    "restore",
    "run_folder",
]
