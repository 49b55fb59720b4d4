"""Pipeline throughput, side by side in one run, on fabricated data written in the real formats.

Shape letters: b batch, c channels, h w space, t steps.

1. CIFAR-10 training pipeline (pad-4 crop, flip, normalise), images/s:
   - DALI on CPU (`device_id=None`) vs a torchvision DataLoader (2 workers, PIL transforms, as the reference);
     target DALI >= 2x;
   - our plain-torch backend (batched uint8 gather) for reference;
   - on CUDA, also the DALI GPU pipeline (target >= 100k images/s on an H200) and the torch backend on the GPU.
2. CIFAR10-DVS samples/s (T = 16, `b 16 2 48 48`): decoding `.aedat4` events every time vs reading the frame cache
   (warm workers; the cache-writing first pass is shown too).

Usage: python bench/loaders.py [--images 10000] [--batch 256] [--epochs 2] [--dvs-files 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

# The tests' writers of tiny datasets in the real on-disk formats.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from datasets_fixtures import write_cifar

import pipelines
from pipelines.cifar import load_cifar
from pipelines.cifar10dvs import CLASSES
from pipelines.datasets import DATASETS


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # host sync: the timer must include the queued GPU work


def throughput(loader, *, epochs: int, device: str) -> float:
    """Samples/s over `epochs` full passes after one warm-up pass (worker start-up, pipeline build, caches)."""
    for _ in loader:
        pass
    sync(device)
    n, start = 0, time.perf_counter()
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch + 1)
        for x, _ in loader:
            n += x.shape[0]
    sync(device)
    return n / (time.perf_counter() - start)


class PilCifar(torch.utils.data.Dataset):
    """torchvision CIFAR10's __getitem__ (PIL image, then transforms) over the same arrays."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def torchvision_loader(root: str, batch: int, workers: int) -> torch.utils.data.DataLoader:
    from torchvision import transforms as tv

    transform = tv.Compose(
        [
            tv.RandomCrop(32, padding=4),
            tv.RandomHorizontalFlip(),
            tv.ToTensor(),
            tv.Normalize(DATASETS["cifar10"].mean, DATASETS["cifar10"].std),
        ]
    )
    images, labels = load_cifar("cifar10", "train", data_dir=root)
    return torch.utils.data.DataLoader(
        PilCifar(images, labels, transform),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def write_dvs(root: str, files: int, events: int) -> None:
    """tonic's CIFAR10-DVS layout with `files` recordings of `events` uniform random events each."""
    import dv_processing as dv

    per_class = max(1, files // len(CLASSES))
    for k, name in enumerate(CLASSES):
        folder = os.path.join(root, "CIFAR10DVS", name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            store = dv.EventStore()
            for chunk in range(10):  # ten time slices, so timestamps increase as in a recording
                store.add(
                    dv.data.generate.uniformlyDistributedEvents(
                        1_000 + 100_000 * chunk, (128, 128), events // 10, 1000 * k + 10 * i + chunk
                    )
                )
            writer = dv.io.MonoCameraWriter(
                os.path.join(folder, f"cifar10_{name}_{i}.aedat4"),
                dv.io.MonoCameraWriter.EventOnlyConfig("DVS128", (128, 128)),
            )
            writer.writeEvents(store)
            del writer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000, help="fabricated CIFAR training images")
    parser.add_argument("--batch", type=int, default=256, help="batch size of the CIFAR loaders")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    parser.add_argument("--dvs-files", type=int, default=100, help="fabricated CIFAR10-DVS recordings")
    parser.add_argument("--dvs-events", type=int, default=100_000, help="events per recording")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (torchvision and DVS)")
    args = parser.parse_args()
    assert args.images >= args.batch > 0

    cores = os.cpu_count() or 1
    has_dali = pipelines.dali_available()
    cuda = torch.cuda.is_available()
    print(
        f"torch {torch.__version__}, {cores} CPU cores, CUDA: "
        f"{torch.cuda.get_device_name() if cuda else 'none'}, DALI: {'yes' if has_dali else 'no'}"
    )
    rows: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
        write_cifar(tmp, "cifar10", images, rng.integers(0, 10, args.images), images[:1000], rng.integers(0, 10, 1000))
        print(
            f"CIFAR-10 train: {args.images} fabricated images as pickles, batch {args.batch}, "
            f"{args.epochs} timed epochs after a warm-up"
        )

        kw = {"data_dir": tmp, "batch_size": args.batch}
        tv = throughput(torchvision_loader(tmp, args.batch, args.workers), epochs=args.epochs, device="cpu")
        rows.append(("cifar10 train", f"torchvision DataLoader, {args.workers} workers, PIL (CPU)", tv))
        if has_dali:
            dali_cpu = pipelines.build_loader("cifar10", "train", backend="dali", num_threads=cores, **kw)
            rows.append(
                (
                    "cifar10 train",
                    f"DALI CPU pipeline, {cores} threads",
                    throughput(dali_cpu, epochs=args.epochs, device="cpu"),
                )
            )
        rows.append(
            (
                "cifar10 train",
                "torch backend, batched uint8 ops (CPU)",
                throughput(
                    pipelines.build_loader("cifar10", "train", backend="torch", **kw), epochs=args.epochs, device="cpu"
                ),
            )
        )
        if cuda:
            if has_dali:
                dali_gpu = pipelines.build_loader(
                    "cifar10", "train", backend="dali", device="cuda", num_threads=min(cores, 4), **kw
                )
                rows.append(
                    (
                        "cifar10 train",
                        "DALI GPU pipeline",
                        throughput(dali_gpu, epochs=max(args.epochs, 5), device="cuda"),
                    )
                )
            rows.append(
                (
                    "cifar10 train",
                    "torch backend on the GPU",
                    throughput(
                        pipelines.build_loader("cifar10", "train", backend="torch", device="cuda", **kw),
                        epochs=max(args.epochs, 5),
                        device="cuda",
                    ),
                )
            )

        dvs_root = os.path.join(tmp, "dvs")
        start = time.perf_counter()
        write_dvs(dvs_root, args.dvs_files, args.dvs_events)
        n_files = len(CLASSES) * max(1, args.dvs_files // len(CLASSES))
        print(
            f"CIFAR10-DVS: {n_files} fabricated .aedat4 recordings of {args.dvs_events} events "
            f"(written in {time.perf_counter() - start:.1f} s), T = 16, batch 8, {args.workers} workers"
        )
        dvs_kw = {
            "data_dir": dvs_root,
            "batch_size": 8,
            "T": 16,
            "num_workers": args.workers,
            "cache_dir": os.path.join(tmp, "cache"),
        }

        def timed_pass(loader) -> float:
            n, start = 0, time.perf_counter()
            for x, _ in loader:
                n += x.shape[0]
            return n / (time.perf_counter() - start)

        raw = pipelines.build_loader("cifar10dvs", "train", cache=False, **dvs_kw)
        timed_pass(raw)  # warm-up: worker start-up (workers persist across passes)
        rows.append(("cifar10dvs train", "raw events (tonic decode + binning + resize)", timed_pass(raw)))
        cached = pipelines.build_loader("cifar10dvs", "train", **dvs_kw)
        rows.append(("cifar10dvs train", "first pass: raw events + writing the frame cache", timed_pass(cached)))
        rows.append(("cifar10dvs train", "frame cache (npz read + resize)", timed_pass(cached)))

    width = max(len(r[1]) for r in rows)
    print(f"\n{'pipeline':<17} {'loader':<{width}} {'samples/s':>12}")
    for name, what, rate in rows:
        print(f"{name:<17} {what:<{width}} {rate:>12,.0f}")
    if has_dali:
        ratio = rows[1][2] / rows[0][2]
        print(f"\nDALI CPU / torchvision DataLoader: {ratio:.2f}x (target >= 2x): {'PASS' if ratio >= 2 else 'FAIL'}")
        gpu = [r for r in rows if r[1] == "DALI GPU pipeline"]
        if gpu:
            print(
                f"DALI GPU: {gpu[0][2]:,.0f} images/s (target >= 100,000 on an H200): "
                f"{'PASS' if gpu[0][2] >= 100_000 else 'FAIL'}"
            )


if __name__ == "__main__":
    main()
