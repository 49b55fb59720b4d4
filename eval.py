"""Evaluate checkpoints: top-1, top-5, loss, mean firing rate per GLIF layer, images/s.

Shape letters: b batch, k classes.

    python eval.py --checkpoint runs/digits/best.pt
    python eval.py --checkpoint "trained models/resCifar19-CIFAR10-step4-CW.pth.tar" --data-dir data
    python eval.py --checkpoint "trained models/" --dataset cifar100 --json results.json   # a folder: one row each

Our checkpoints and the paper's released files are told apart automatically (glif2.load_model); the model is
rebuilt from the file alone. The dataset defaults to the one the checkpoint names (its train config, the released
file name, or else the class count). Timing: the first batch is a warm-up (kernel compilation) and is left out of
images/s.
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from glif2.checkpoint import load_model
from glif2.models import FiringRates

DATASETS = ("cifar10", "cifar100", "imagenet", "cifar10dvs", "digits")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".tar", ".ckpt")


def find_checkpoints(path: str | Path) -> list[Path]:
    """The file itself, or every checkpoint file directly inside a folder, sorted by name."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES))
        if not files:
            raise ValueError(f"no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) in {path}")
        return files
    if not path.is_file():
        raise ValueError(f"--checkpoint {path}: no such file or folder")
    return [path]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # timing only: a host sync


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: str | torch.device = "cpu", *, progress: bool = True,
             desc: str = "eval") -> dict[str, Any]:
    """One pass over `loader` (batches `(x, y)`, y int64 `b`) in eval mode.

    Returns:
        {top1, top5 (percent), loss (mean cross-entropy), firing_rate (spikes per neuron per step over all GLIF
        layers), firing_rates ({layer: rate}), images_per_s, seconds, num_samples}.
    """
    device = torch.device(device)
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    n = timed_n = 0
    start = begin = time.perf_counter()
    with FiringRates(model) as fr:
        for i, (x, y) in enumerate(tqdm(loader, total=len(loader), desc=desc, disable=not progress, leave=False)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x).float()  # b k
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
            correct1 += top[:, 0].sum()
            correct5 += top.any(dim=1).sum()
            n += len(y)
            if i == 0:  # warm-up batch: compilation and allocation stay out of images/s
                _sync(device)
                start = time.perf_counter()
            else:
                timed_n += len(y)
        _sync(device)
    end = time.perf_counter()
    if n == 0:
        raise ValueError("the loader yielded no batches")
    if timed_n == 0:  # a single batch: report it, warm-up included
        timed_n, start = n, begin
    rates = fr.rates()
    spikes = sum(float(fr.sums[k]) for k in rates)
    return {
        "top1": 100.0 * correct1.item() / n,
        "top5": 100.0 * correct5.item() / n,
        "loss": loss_sum.item() / n,
        "firing_rate": spikes / max(1, sum(fr.counts.values())),
        "firing_rates": rates,
        "images_per_s": timed_n / max(end - start, 1e-9),
        "seconds": end - begin,
        "num_samples": n,
    }


def format_row(row: dict[str, Any]) -> str:
    head = (
        f"{row['checkpoint']}  [{row['format']}] {row['arch']} T={row['T']} on {row['dataset']}: "
        f"top-1 {row['top1']:.2f}  top-5 {row['top5']:.2f}  loss {row['loss']:.4f}  "
        f"firing rate {row['firing_rate']:.4f}  {row['images_per_s']:.1f} images/s ({row['num_samples']} images)"
    )
    width = max((len(k) for k in row["firing_rates"]), default=0)
    layers = [f"    {name:<{width}}  {rate:.4f}" for name, rate in row["firing_rates"].items()]
    return "\n".join([head, "  mean firing rate per layer:", *layers])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description="Evaluate glif2 or released GLIF checkpoints.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file, or a folder of them (one row each)")
    parser.add_argument("--dataset", choices=DATASETS, default=None,
                        help="test set (default: the one the checkpoint names, else from its class count)")
    parser.add_argument("--data-dir", default="data", help="dataset root (digits needs none)")
    parser.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    parser.add_argument("--json", default=None, help="write the rows (a list of dicts) to this JSON file")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")

    import pipelines  # the data side is imported only when evaluating

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaders: dict[tuple[str, int | None], Any] = {}
    rows = []
    for path in find_checkpoints(args.checkpoint):
        model = load_model(path, map_location=device)
        config, meta = model.model_config, model.checkpoint_meta
        dataset = args.dataset or meta.get("dataset")
        if dataset is None:
            parser.error(f"{path}: cannot tell which dataset it was trained on; pass --dataset")
        T = config["T"] if dataset == "cifar10dvs" else None  # DVS frames are binned into the model's T
        if (dataset, T) not in loaders:
            loaders[dataset, T] = pipelines.build_loader(
                dataset, "test", data_dir=args.data_dir, batch_size=args.batch_size, T=T, device=device
            )
        result = evaluate(model, loaders[dataset, T], device, desc=path.name)
        row = {"checkpoint": str(path), "format": meta["format"], "arch": config["name"], "T": config["T"],
               "num_classes": config["num_classes"], "dataset": dataset, **result}
        print(format_row(row), flush=True)
        rows.append(row)
    if len(rows) > 1:
        print("\ncheckpoint, top-1, top-5, loss, firing rate, images/s")
        for row in rows:
            print(f"{row['checkpoint']}, {row['top1']:.2f}, {row['top5']:.2f}, {row['loss']:.4f}, "
                  f"{row['firing_rate']:.4f}, {row['images_per_s']:.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
