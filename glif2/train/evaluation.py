"""Evaluation: the one loop that scores a model on a loader (train.py after every epoch, eval.py on checkpoint
files), and eval.py's sweep over checkpoint files.

Shape letters: b batch, k classes.
"""

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import glif2.train.distributed as dist
import pipelines
from glif2.analysis import FiringRates
from glif2.checkpoint import CHECKPOINT_SUFFIXES, load_model, unwrap_model
from glif2.compile import regions_uncompiled
from glif2.cost import E_AC, E_MAC, CostCounter, check_energies, format_report
from glif2.errors import CheckpointError, ConfigError


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # timing only: a host sync


@torch.no_grad()
def evaluate(
    logits_of: Callable[[Tensor, Tensor], Tensor],
    loader,
    device: torch.device,
    *,
    cudagraphs: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """One pass over `loader` (batches `(x, y)`, y int64 `b`): every sample counted once, summed over all ranks.

    Args:
        logits_of: `(x, y) -> logits b k` (the model in eval mode, or train.py's compiled objective).
        loader: the test loader of this rank (every rank calls this with its own shard).
        device: where the sums live.
        cudagraphs: mark a new CUDA-graph step before each batch (train and eval replay graphs from one pool).
        progress: a tqdm bar.

    Returns:
        {loss (mean plain cross-entropy), top1, top5 (percent), num_samples, images_per_s (the first batch, with
        compilation, left out), seconds}.
    """
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, samples
    start = begin = time.perf_counter()
    timed = 0
    for i, (x, y) in enumerate(tqdm(loader, total=len(loader), desc=desc, disable=not progress, leave=False)):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits = logits_of(x, y).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        sums += torch.stack(
            [
                F.cross_entropy(logits, y, reduction="sum").double(),
                top[:, 0].sum().double(),
                top.any(dim=1).sum().double(),
                torch.tensor(len(y), dtype=torch.float64, device=device),
            ]
        )
        if i == 0:  # warm-up batch: compilation and allocation stay out of images/s
            _sync(device)
            start = time.perf_counter()
        else:
            timed += len(y)
    _sync(device)
    end = time.perf_counter()
    loss, top1, top5, n = dist.all_reduce_sum(sums).tolist()  # a host sync, once per evaluation
    if n == 0:
        raise ConfigError("the test loader yielded no samples")
    if timed == 0:  # a single batch: report it, warm-up included
        timed, start = int(n), begin
    return {
        "loss": loss / n,
        "top1": 100.0 * top1 / n,
        "top5": 100.0 * top5 / n,
        "num_samples": int(n),
        "images_per_s": timed / max(end - start, 1e-9),
        "seconds": end - begin,
    }


def evaluate_model(
    model: nn.Module,
    loader,
    device: torch.device,
    *,
    progress: bool = True,
    desc: str = "eval",
    report: bool = False,
    e_ac: float = E_AC,
    e_mac: float = E_MAC,
) -> dict[str, Any]:
    """`evaluate` on an uncompiled model in eval mode, plus the mean firing rate of every GLIF layer (hooks).

    With `report`, also the cost report of the same pass (glif2.cost: SOPs, MACs and energy per sample, per layer and
    in total, with e_ac and e_mac pJ per accumulate and per MAC) under "cost"."""
    model.eval()
    counter = CostCounter(model) if report else FiringRates(model)
    with counter:
        result = evaluate(lambda x, y: model(x), loader, device, progress=progress, desc=desc)
    fr = counter.firing if report else counter
    extra = {"cost": counter.report(e_ac, e_mac, all_reduce=dist.all_reduce_sum)} if report else {}
    return {**result, "firing_rate": fr.overall(), "firing_rates": fr.rates(), **extra}


def evaluate_epoch(
    objective: nn.Module,
    model: nn.Module,
    loader,
    device: torch.device,
    *,
    cudagraphs: bool,
    report: bool,
    e_ac: float,
    e_mac: float,
) -> tuple[dict[str, Any], dict[str, float]]:
    """train.py's test pass after an epoch: `evaluate` through the compiled objective `(x, y) -> (loss, logits)`; with
    `report`, through the uncompiled one with uncompiled regions (a compiled graph does not call hooks) under
    glif2.cost's counter of `model` (the raw module inside it). Returns (evaluate's result, the cost fields of the
    epoch record, per test sample: test_firing_rate, test_sops, test_macs, test_energy_uj; empty without
    `report`)."""
    if not report:
        return evaluate(lambda x, y: objective(x, y)[1], loader, device, cudagraphs=cudagraphs), {}
    plain = unwrap_model(objective)
    with regions_uncompiled(model), CostCounter(model) as counter:
        result = evaluate(lambda x, y: plain(x, y)[1], loader, device)
    cost = counter.report(e_ac, e_mac, all_reduce=dist.all_reduce_sum)
    return result, {f"test_{k}": cost[k] for k in ("firing_rate", "sops", "macs", "energy_uj")}


# eval.py


def find_checkpoints(path: str | Path) -> list[Path]:
    """The file itself, or every checkpoint file directly inside a folder, sorted by name."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES))
        if not files:
            raise ConfigError(f"no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) in {path}")
        return files
    if not path.is_file():
        raise ConfigError(f"--checkpoint {path}: no such file or folder")
    return [path]


def guess_dataset(model_config: dict[str, Any]) -> str | None:
    """The dataset a model was most likely trained on, when its file does not say: by input kind and channels, then
    by class count (pipelines.DATASETS)."""
    if model_config.get("name") == "sew7b_wide":
        return "cifar10dvs"
    if model_config.get("in_channels") == 1:
        return "digits"
    k = model_config.get("num_classes")
    return next(
        (
            n
            for n, info in pipelines.DATASETS.items()
            if info.kind == "image" and info.in_channels == 3 and info.num_classes == k
        ),
        None,
    )


def format_row(row: dict[str, Any]) -> str:
    head = (
        f"{row['checkpoint']}  [{row['format']}] {row['arch']} T={row['T']} on {row['dataset']}: "
        f"top-1 {row['top1']:.2f}  top-5 {row['top5']:.2f}  loss {row['loss']:.4f}  "
        f"firing rate {row['firing_rate']:.4f}  {row['images_per_s']:.1f} images/s ({row['num_samples']} images)"
    )
    width = max((len(k) for k in row["firing_rates"]), default=0)
    layers = [f"    {name:<{width}}  {rate:.4f}" for name, rate in row["firing_rates"].items()]
    cost = ["  " + line for line in format_report(row["cost"]).splitlines()] if "cost" in row else []
    return "\n".join([head, "  mean firing rate per layer:", *layers, *cost])


def evaluate_checkpoints(
    checkpoint: str,
    *,
    dataset: str | None,
    data_dir: str,
    batch_size: int,
    json_path: str | None = None,
    device: torch.device | None = None,
    report: bool = False,
    e_ac: float = E_AC,
    e_mac: float = E_MAC,
) -> list[dict[str, Any]]:
    """eval.py: every checkpoint file at `checkpoint` (a file or a folder) on its test set; prints a row each (with
    `report`, its cost report too: glif2.cost, e_ac and e_mac in pJ).

    In a folder, a file that cannot be read is reported and skipped so that one damaged download does not cost
    the other rows; the rows are still printed and written, then a CheckpointError names every skipped file."""
    check_energies(e_ac, e_mac)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaders: dict[tuple[str, int | None], Any] = {}
    paths = find_checkpoints(checkpoint)
    rows, unreadable = [], []
    for path in paths:
        try:
            model = load_model(path, map_location=device)
        except CheckpointError as e:
            if len(paths) == 1:
                raise
            print(f"glif2-eval: skipped: {e}", file=sys.stderr, flush=True)
            unreadable.append(path.name)
            continue
        rows.append(
            _evaluate_one(
                model,
                path,
                dataset,
                data_dir,
                batch_size,
                device,
                loaders,
                {"report": report, "e_ac": e_ac, "e_mac": e_mac},
            )
        )
        print(format_row(rows[-1]), flush=True)
    if len(rows) > 1:
        print("\ncheckpoint, top-1, top-5, loss, firing rate, images/s")
        for row in rows:
            print(
                f"{row['checkpoint']}, {row['top1']:.2f}, {row['top5']:.2f}, {row['loss']:.4f}, "
                f"{row['firing_rate']:.4f}, {row['images_per_s']:.1f}"
            )
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rows, indent=2) + "\n")
    if unreadable:
        raise CheckpointError(
            f"{len(unreadable)} of {len(paths)} files in {checkpoint} could not be read and were "
            f"skipped ({', '.join(unreadable)}; the reason for each is printed above); the other "
            "rows were evaluated" + (f" and written to {json_path}" if json_path else "")
        )
    return rows


def _evaluate_one(
    model: nn.Module,
    path: Path,
    dataset: str | None,
    data_dir: str,
    batch_size: int,
    device: torch.device,
    loaders: dict[tuple[str, int | None], Any],
    cost: dict[str, Any],
) -> dict[str, Any]:
    """One checkpoint's row; test loaders are built once per (dataset, T) and shared across checkpoints."""
    config, meta = model.model_config, model.checkpoint_meta
    name = dataset or meta.get("dataset") or guess_dataset(config)
    if name is None:
        raise ConfigError(f"{path}: cannot tell which dataset it was trained on; pass --dataset")
    T = config["T"] if pipelines.DATASETS[name].kind == "frames" else None  # recordings binned into the model's T
    if (name, T) not in loaders:
        loaders[name, T] = pipelines.build_loader(
            name, "test", data_dir=data_dir, batch_size=batch_size, T=T, device=device
        )
    result = evaluate_model(model, loaders[name, T], device, desc=path.name, **cost)
    return {
        "checkpoint": str(path),
        "format": meta["format"],
        "arch": config["name"],
        "T": config["T"],
        "num_classes": config["num_classes"],
        "dataset": name,
        **result,
    }


__all__ = [
    "evaluate",
    "evaluate_checkpoints",
    "evaluate_model",
    "find_checkpoints",
    "format_row",
    "guess_dataset",
    "evaluate_epoch",
]
