"""Train a GLIF network: one process, or DDP under torchrun.

Shape letters: b batch, k classes.

    python train.py                                               # the digits demo on CPU (~2 minutes)
    python train.py --preset cifar10-resnet19-t4 --data-dir data  # a README run (--list-presets shows them all)
    python train.py --preset cifar10-resnet19-t4 --resume auto    # continue <out_dir>/<name>/last.pt exactly
    torchrun --nproc_per_node 8 train.py --preset imagenet-resnet18ms-t6 --data-dir /data/imagenet

Every flag overrides one field of the preset (glif2/config.py). Build order: checks (before any work), data,
model, compile, DDP, optimizer, loop. Rank 0 logs and saves the raw module (never the compiled or DDP wrapper).

Outputs in <out_dir>/<name>/ (rank 0):
- last.pt (every epoch, on SIGTERM and at --max-steps) and best.pt (best test top-1), written atomically: a crash
  leaves the previous file intact. Fields: version, model, model_config, config, optimizer, scheduler, scaler, rng,
  epoch (completed epochs), step (optimizer steps), best_acc, test_acc. `--resume auto` restores all of it and
  skips the batches of a partly done epoch, so a resumed run follows the uninterrupted trajectory (bitwise on CPU
  with --deterministic).
- metrics.jsonl: one JSON object per line; {"kind": "train", epoch, step, loss, acc, lr, images_per_s} at every
  log point and {"kind": "epoch", epoch, step, train_loss, train_acc, test_loss, test_acc, test_top5, best_acc,
  lr, seconds} after each epoch (accuracies in percent, epoch counted from 1).
- glif_params.jsonl: the learned neuron parameters over training, one line per record: {"epoch": completed epochs
  (0 = at initialisation), "step": int, "layers": {layer: {quantity: {"mean", "std", "min", "q25", "median",
  "q75", "max"}}}} with quantity in alpha, beta, gamma, tau, v_th, leak, v_reset, conduct (effective values, the
  sigmoid of the logits, over the layer's channels; conduct over all `t c` entries).
- tb/: TensorBoard scalars (train/loss, train/acc, train/images_per_s, test/loss, test/acc, test/top5, lr/<group>).
- config.json: the resolved config (also printed, and stored in every checkpoint).
"""

import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import glif2.distributed as dist
import pipelines
from glif2.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from glif2.compile import compile_model, compile_step
from glif2.config import TrainConfig, format_config, parse_args
from glif2.models import create_model, glif_layers
from glif2.neuron import randomize_gates
from glif2.optim import build_optimizer, build_scheduler

QUANTILES = {"min": 0.0, "q25": 0.25, "median": 0.5, "q75": 0.75, "max": 1.0}


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf."""


# helpers


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


def preflight(cfg: TrainConfig, world_size: int) -> Path | None:
    """Every check that can fail before any work is done; returns the checkpoint to resume from (or None)."""
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size={cfg.batch_size} (global) does not divide over {world_size} ranks; "
                         f"use a multiple of {world_size}")
    eval_batch = cfg.eval_batch_size or cfg.batch_size
    if eval_batch % world_size:
        raise ValueError(f"eval_batch_size={eval_batch} (global) does not divide over {world_size} ranks")
    if cfg.dataset != "digits" and not cfg.download and not Path(cfg.data_dir).is_dir():
        raise ValueError(f"data folder {cfg.data_dir!r} does not exist (dataset {cfg.dataset}); pass --data-dir "
                         "with the dataset root" + (", or --download" if cfg.dataset != "imagenet" else ""))
    if cfg.compile == "reduce-overhead" and not torch.cuda.is_available():
        raise ValueError("compile=reduce-overhead needs CUDA (it is CUDA graphs); use auto, default or none")
    if cfg.resume == "":
        return None
    path = Path(cfg.run_dir) / "last.pt" if cfg.resume == "auto" else Path(cfg.resume)
    if not path.is_file():
        if cfg.resume == "auto":
            return None  # nothing to continue: a fresh run
        raise ValueError(f"--resume {cfg.resume}: no such checkpoint file")
    saved = load_checkpoint(path).get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"{path} has no training config: not a train.py checkpoint")
    for key in ("model", "T", "dataset", "batch_size", "channel_wise", "variant", "gates", "bn", "sync_bn"):
        if saved.get(key) != getattr(cfg, key):
            raise ValueError(f"cannot resume {path}: it was trained with {key}={saved.get(key)!r} but this run has "
                             f"{key}={getattr(cfg, key)!r}; pass --{key.replace('_', '-')} {saved.get(key)} or a "
                             "new --name")
    return path


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def summary(values: Tensor) -> dict[str, float]:
    v = values.detach().double().flatten().cpu()
    q = torch.quantile(v, torch.tensor(list(QUANTILES.values()), dtype=torch.float64))
    return {"mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0,
            **{name: float(x) for name, x in zip(QUANTILES, q)}}


@torch.no_grad()
def neuron_record(model: nn.Module, epoch: int, step: int) -> dict[str, Any]:
    """One glif_params.jsonl line: per layer, per quantity, summary statistics of the effective values."""
    layers = {name: {q: summary(v) for q, v in m.values().items()} for name, m in glif_layers(model)}
    return {"epoch": epoch, "step": step, "layers": layers}


class Logger:
    """Rank 0's outputs: the JSONL files and TensorBoard (other ranks get a logger that writes nothing)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = self._open(run_dir / "metrics.jsonl", resume_step)
        self.params = self._open(run_dir / "glif_params.jsonl", resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("tensorboard is not installed (pip install 'glif2[train]'): no TensorBoard scalars", flush=True)
            else:
                self.tb = SummaryWriter(str(run_dir / "tb"))

    @staticmethod
    def _open(path: Path, resume_step: int | None):
        """A fresh run starts the file anew; a resumed one keeps the records up to the checkpoint's step (those
        written after it, before the interruption, are replayed by this run)."""
        if resume_step is None or not path.exists():
            return open(path, "w")
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        return open(path, "a")

    def log(self, record: dict[str, Any], scalars: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
            self.tb.flush()

    def log_params(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.params.write(json.dumps(record) + "\n")
            self.params.flush()

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            self.params.close()
            if self.tb is not None:
                self.tb.close()


def make_progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on a terminal; None (plain lines instead) when stderr is not a TTY or on other ranks."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


@torch.no_grad()
def evaluate(objective: nn.Module, loader, device: torch.device, cudagraphs: bool) -> dict[str, float]:
    """Test loss (plain cross-entropy), top-1 and top-5 in percent, summed over every rank's shard."""
    objective.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, samples
    for x, y in loader:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # train and eval replay graphs from one pool
        _, logits = objective(x, y)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), top[:, 0].sum().double(),
                             top.any(dim=1).sum().double(), torch.tensor(len(y), dtype=torch.float64, device=device)])
    loss, top1, top5, n = dist.all_reduce_sum(sums).tolist()  # a host sync, once per evaluation
    return {"loss": loss / n, "acc": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


# main


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs (or continues) the training described by `cfg`. Returns {model (the raw module), epoch, step, best_acc,
    test_acc, stopped ("done", "max_steps" or "sigterm"), run_dir}."""
    world_size = dist.env_world_size()
    resume_path = preflight(cfg, world_size)
    info = dist.init(cfg.device)
    device, rank0 = info.device, info.is_main
    run_dir = Path(cfg.run_dir)
    dist.print0(f"glif2 train: {cfg.name} on {world_size} x {device}\n{format_config(cfg)}")
    seed_everything(cfg.seed, cfg.deterministic)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    compile_mode = cfg.compile if cfg.compile != "auto" else ("reduce-overhead" if device.type == "cuda" else "default")
    cudagraphs = compile_mode == "reduce-overhead"

    # data: static training batches (whole batches only), every test sample counted once over the ranks
    per_rank, eval_per_rank = cfg.batch_size // world_size, (cfg.eval_batch_size or cfg.batch_size) // world_size
    common = dict(data_dir=cfg.data_dir, T=cfg.T if cfg.dataset == "cifar10dvs" else None, rank=info.rank,
                  world_size=world_size, device=device, backend=cfg.backend, seed=cfg.seed, download=cfg.download,
                  num_workers=cfg.num_workers)
    train_loader = pipelines.build_loader(cfg.dataset, "train", batch_size=per_rank, **common)
    test_loader = pipelines.build_loader(cfg.dataset, "test", batch_size=eval_per_rank, **common)
    steps_per_epoch = len(train_loader)

    # model: built identically on every rank (same seed); the raw module is what gets saved
    model = create_model(cfg.model, train_loader.num_classes, cfg.T, **cfg.model_options)
    if cfg.randomgate:
        randomize_gates(model)
    if cfg.sync_bn:  # plain BN already (model_options), now synchronised; one process: plain BN
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ckpt = load_checkpoint(resume_path, map_location="cpu") if resume_path else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"], strict=True)
    model.to(device)
    dist.print0(f"{cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
                f"{len(list(glif_layers(model)))} GLIF layers; compile={compile_mode}")

    # compile before DDP (keeps DDP out of the graph), then DDP over the compiled objective
    amp_dtype = getattr(torch, cfg.amp_dtype) if cfg.amp else None
    objective = compile_model(Objective(model, cfg.label_smoothing, amp_dtype), compile_mode)
    step_module = objective
    if info.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        step_module = nn.parallel.DistributedDataParallel(objective, device_ids=device_ids)

    # optimizer, schedule, scaler (as the reference: SGD groups by name, per-epoch cosine)
    optimizer = build_optimizer(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                mode=cfg.param_groups, tunable_lif=cfg.tunable_lif,
                                gate_lr_divisor=cfg.gate_lr_divisor)
    kind = cfg.scheduler if cfg.scheduler != "auto" else ("soft-cosine" if cfg.tunable_lif else "cosine")
    if cudagraphs:  # the compiled step reads the learning rates as tensors: a new lr is new data, not a recompile
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(group["lr"], device=device)
    scheduler = build_scheduler(optimizer, kind=kind, epochs=cfg.epochs, t_max=cfg.t_max)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    opt_step = compile_step(optimizer.step, compile_mode) if cudagraphs else optimizer.step
    epoch, step, best_acc, test_acc = 0, 0, 0.0, float("nan")
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        epoch, step, best_acc = ckpt["epoch"], ckpt["step"], ckpt["best_acc"]
        test_acc = ckpt.get("test_acc", float("nan"))
        set_rng_state(ckpt["rng"])
        if cudagraphs:  # a checkpoint written without CUDA graphs holds float learning rates
            for group in optimizer.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
        dist.print0(f"resumed {resume_path}: epoch {epoch}, step {step}, best top-1 {best_acc:.2f}")
    skip = step - epoch * steps_per_epoch  # batches of a partly done epoch (a mid-epoch resume)
    if not 0 <= skip <= steps_per_epoch:
        raise ValueError(f"checkpoint step {step} does not fit epoch {epoch} with {steps_per_epoch} steps per epoch")

    logger = Logger(run_dir, rank0, cfg.tensorboard, None if ckpt is None else step)
    if rank0 and ckpt is None and (run_dir / "last.pt").exists():
        dist.print0(f"starting afresh in {run_dir}: its checkpoints will be replaced (--resume auto continues them)")
    if rank0:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if ckpt is None:
            logger.log_params(neuron_record(model, 0, 0))

    def save(name: str) -> None:
        if rank0:
            save_checkpoint(run_dir / name, model=model, config=cfg.to_dict(), optimizer=optimizer,
                            scheduler=scheduler, scaler=scaler, rng=rng_state(), epoch=epoch, step=step,
                            best_acc=best_acc, test_acc=test_acc)

    stop = {"sigterm": False}

    def on_sigterm(signum, frame):
        stop["sigterm"] = True  # acted on after the current step: checkpoint, then exit

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    stopped = "done"
    try:
        while epoch < cfg.epochs and stopped == "done":
            # --- one epoch of training
            train_loader.set_epoch(epoch)
            step_module.train()
            start = time.perf_counter()
            sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, samples over the epoch
            window = torch.zeros(3, dtype=torch.float64, device=device)  # the same since the last log point
            bad = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss since the last check
            window_start, window_steps = time.perf_counter(), 0
            bar = make_progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", rank0)
            for i, (x, y) in enumerate(train_loader):
                if i < skip:  # a mid-epoch resume: these batches were trained on before the checkpoint
                    continue
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                loss, logits = step_module(x, y)
                scaler.scale(loss).backward()
                if scaler.is_enabled():
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    opt_step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window_steps += 1
                bad |= ~torch.isfinite(loss.detach())
                window += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                                       torch.tensor(len(y), dtype=torch.float64, device=device)])
                last = i == steps_per_epoch - 1 or step == cfg.max_steps
                if step % cfg.log_interval == 0 or last or stop["sigterm"]:
                    # all-reduce, then read on the host: a CPU-GPU sync point, once per log interval
                    reduced = dist.all_reduce_sum(torch.cat([window, bad.double()[None],
                                                             torch.tensor([float(stop["sigterm"])], device=device,
                                                                          dtype=torch.float64)]))
                    w_loss, w_correct, w_n, w_bad, w_stop = reduced.tolist()
                    if w_bad:
                        raise NonFiniteLoss(
                            f"the training loss became non-finite (NaN or inf) by step {step} (epoch {epoch + 1}); "
                            f"stopping without saving. The last good checkpoint is {run_dir / 'last.pt'} (if any "
                            "epoch finished); lower --lr, or turn off --amp, and resume with --resume auto")
                    sums += window
                    elapsed = time.perf_counter() - window_start
                    # the first window of a run includes compilation: no throughput for it
                    ips = w_n / elapsed if step > window_steps else float("nan")
                    lr = float(optimizer.param_groups[0]["lr"])
                    record = {"kind": "train", "epoch": epoch + 1, "step": step, "loss": w_loss / w_n,
                              "acc": 100.0 * w_correct / w_n, "lr": lr, "images_per_s": ips}
                    logger.log(record, {"train/loss": record["loss"], "train/acc": record["acc"],
                                        **({"train/images_per_s": ips} if math.isfinite(ips) else {})}, step)
                    text = f"loss {record['loss']:.4f}  acc {record['acc']:5.1f}%  {ips:7.1f} img/s"
                    if bar is not None:
                        bar.update(i + 1 - bar.n)
                        bar.set_postfix_str(text)
                    else:
                        dist.print0(f"epoch {epoch + 1}/{cfg.epochs}  step {i + 1}/{steps_per_epoch}  {text}")
                    window.zero_()
                    bad.zero_()
                    window_start, window_steps = time.perf_counter(), 0
                    if w_stop:
                        stopped = "sigterm"
                        break
                if step == cfg.max_steps:
                    stopped = "max_steps"
                    break
            if bar is not None:
                bar.close()
            skip = 0
            if stopped != "done":  # mid-epoch: save where we are; the next run skips the batches done
                if i == steps_per_epoch - 1 and stopped == "max_steps":
                    stopped = "max_steps_epoch_end"  # the epoch's training is complete: finish it below
                else:
                    save("last.pt")
                    dist.print0(f"stopped ({stopped}) at step {step}, epoch {epoch + 1}: saved {run_dir / 'last.pt'}; "
                                "continue with --resume auto")
                    break
            train_seconds = time.perf_counter() - start

            # --- test, schedule, checkpoints
            result = evaluate(objective, test_loader, device, cudagraphs)
            test_acc = result["acc"]
            lr = float(optimizer.param_groups[0]["lr"])
            scheduler.step()
            epoch += 1
            is_best = test_acc > best_acc or not (run_dir / "best.pt").exists()  # the first epoch always writes one
            best_acc = max(best_acc, test_acc)
            e_loss, e_correct, e_n = dist.all_reduce_sum(sums.clone()).tolist()
            record = {"kind": "epoch", "epoch": epoch, "step": step, "train_loss": e_loss / max(e_n, 1),
                      "train_acc": 100.0 * e_correct / max(e_n, 1), "test_loss": result["loss"], "test_acc": test_acc,
                      "test_top5": result["top5"], "best_acc": best_acc, "lr": lr,
                      "seconds": time.perf_counter() - start}
            logger.log(record, {"test/loss": result["loss"], "test/acc": test_acc, "test/top5": result["top5"],
                                **{f"lr/{g.get('name', j)}": float(g["lr"])
                                   for j, g in enumerate(optimizer.param_groups)}}, step)
            logger.log_params(neuron_record(model, epoch, step))
            dist.print0(f"epoch {epoch}/{cfg.epochs}: train loss {record['train_loss']:.4f} acc "
                        f"{record['train_acc']:.2f}% ({train_seconds:.1f} s) | test loss {result['loss']:.4f} top-1 "
                        f"{test_acc:.2f}% top-5 {result['top5']:.2f}% | best {best_acc:.2f}% | lr {lr:.4g}")
            save("last.pt")
            if is_best:
                save("best.pt")
            if stopped == "max_steps_epoch_end":
                stopped = "max_steps"
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        logger.close()
        torch.set_num_threads(threads)
    dist.barrier()
    dist.print0(f"{'finished' if stopped == 'done' else 'stopped'}: epoch {epoch}, step {step}, "
                f"best test top-1 {best_acc:.2f}%; checkpoints in {run_dir}")
    return {"model": model, "epoch": epoch, "step": step, "best_acc": best_acc, "test_acc": test_acc,
            "stopped": stopped, "run_dir": str(run_dir)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    try:
        cfg = parse_args(argv)
        return train(cfg)
    except ValueError as e:  # a user error: one clear line, no traceback
        dist.print0(f"train.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteLoss as e:
        dist.print0(f"train.py: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        dist.destroy()


if __name__ == "__main__":
    main()
