"""Data pipelines: one entry point, `build_loader`, for CIFAR-10/100, ImageNet, CIFAR10-DVS and digits.

Shape letters: b batch, c channels, h w space, t steps, k classes.

| dataset      | x (float32)          | backends      |
|--------------|----------------------|---------------|
| "cifar10"    | `b 3 32 32`          | dali, torch   |
| "cifar100"   | `b 3 32 32`          | dali, torch   |
| "imagenet"   | `b 3 224 224`        | dali, torch   |
| "cifar10dvs" | `b t 2 48 48`        | torch (tonic) |
| "digits"     | `b 1 8 8`            | torch         |

y is int64 `b`. Every dataset fact (classes, channels, size, normalisation) is in `pipelines.datasets.DATASETS`.
DALI and tonic are imported only when their pipelines are built, so `import pipelines` needs neither.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from collections.abc import Callable
from typing import Any

import torch

from pipelines._common import DataError, ShardedLoader, check_common
from pipelines.datasets import DALI_DATASETS, DATASETS, DatasetInfo, dataset_info

BACKENDS = ("auto", "dali", "torch")

__all__ = [
    "BACKENDS",
    "DALI_DATASETS",
    "DATASETS",
    "DataError",
    "DatasetInfo",
    "GENERIC_OPTIONS",
    "ShardedLoader",
    "build_loader",
    "builder_options",
    "dali_available",
    "dataset_info",
    "resolve_backend",
]


def dali_available() -> bool:
    """True when NVIDIA DALI is installed (checked without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def resolve_backend(dataset: str, backend: str) -> str:
    """Turns "auto" into "dali" (installed and the dataset has a DALI path) or "torch"; validates the choice."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "dali" if dataset in DALI_DATASETS and dali_available() else "torch"
    if backend == "dali":
        if dataset not in DALI_DATASETS:
            raise ValueError(f"{dataset} has no DALI pipeline (DALI: {', '.join(DALI_DATASETS)}); use backend='torch'")
        if not dali_available():
            raise ValueError(
                "backend='dali' but NVIDIA DALI is not installed: pip install 'glif2[dali]' or use backend='torch'"
            )
    return backend


# Loader knobs every dataset accepts (train.py can pass them unconditionally); dropped where the builder has no use
# for them.
GENERIC_OPTIONS = ("num_workers", "num_threads")


def _builder(dataset: str) -> Callable[..., ShardedLoader]:
    """The dataset's builder, imported here: its module is loaded only when its loader is built."""
    if dataset in ("cifar10", "cifar100"):
        from pipelines.cifar import build_cifar

        return build_cifar
    if dataset == "imagenet":
        from pipelines.imagenet import build_imagenet

        return build_imagenet
    if dataset == "cifar10dvs":
        from pipelines.cifar10dvs import build_cifar10dvs

        return build_cifar10dvs
    from pipelines.digits import build_digits

    return build_digits


def builder_options(dataset: str) -> tuple[str, ...]:
    """The dataset-specific keywords of build_loader: its builder's keyword-only parameters that build_loader does not
    set itself (read from the builder's signature, so the two cannot disagree)."""
    own = inspect.signature(build_loader).parameters
    params = inspect.signature(_builder(dataset)).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in own)


def _options(dataset: str, options: dict[str, Any]) -> dict[str, Any]:
    allowed = builder_options(dataset)
    unknown = set(options) - set(allowed) - set(GENERIC_OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for {dataset}; allowed: {sorted(allowed)}")
    return {k: v for k, v in options.items() if k in allowed}


def build_loader(
    dataset: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None,
    batch_size: int,
    T: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    seed: int = 0,
    download: bool = False,
    **options: Any,
) -> ShardedLoader:
    """Builds the loader of one split of one dataset for one rank.

    Training (`split="train"`): a new permutation each epoch from (seed, epoch), the same on every rank (call
    `set_epoch(e)`); each rank takes a disjoint shard and only whole batches (static shapes for CUDA graphs), so
    up to `world_size * batch_size - 1` samples per epoch are skipped. Augmentation is a function of (seed, epoch,
    sample) on every backend, so `set_epoch(e, start_batch=j)` resumes mid-epoch exactly: the pass yields batches
    j.. of epoch e, bitwise those of a full pass. Test (`"test"`, or `"val"`): in order,
    contiguous per-rank blocks, the last batch may be short, every sample is seen exactly once over all ranks.

    Args:
        dataset: one of DATASETS.
        split: "train" or "test" ("val" is accepted as "test", e.g. ImageNet's val folder).
        data_dir: dataset root (CIFAR: the torchvision root; ImageNet: holds train/ and val/; CIFAR10-DVS: tonic's
            save_to, holding CIFAR10DVS/). Unused by digits.
        batch_size: per-rank batch size.
        T: frames per recording (cifar10dvs only; static images are repeated over time by the model).
        rank: this process's rank.
        world_size: number of processes.
        device: where the batches are produced ("cpu", "cuda", "cuda:N").
        backend: "auto" (DALI when installed and the dataset has a DALI path), "dali" or "torch".
        seed: base seed of permutations and augmentation.
        download: fetch missing data where the library supports it (CIFAR via torchvision, CIFAR10-DVS via tonic).
        **options: dataset-specific keywords (`builder_options(dataset)`: the builder's own, e.g. `remap`, `cache_dir`
            for cifar10dvs, `verify` for imagenet); `num_workers` and `num_threads` are accepted for every dataset.

    Returns:
        An iterable of `(x, y)` on `device` with `len()` (batches of a full epoch), `set_epoch(epoch,
        start_batch=0)`, and the attributes `num_samples` (this rank, per epoch), `num_classes` and `dataset_size`
        (the whole split).

    Raises:
        DataError: unusable data: empty, truncated or malformed files, empty class folders, labels out of range (the
            message names the file and what to do); raised here where a cheap check finds it, else while iterating.
            Missing folders or files raise a DataError that is also a FileNotFoundError (as before), naming the
            expected layout. DataError is a ValueError.
        ValueError: bad arguments.
    """
    dataset_info(dataset)
    check_common(batch_size=batch_size, rank=rank, world_size=world_size)
    backend = resolve_backend(dataset, backend)
    if dataset != "digits" and data_dir is None:
        raise ValueError(f"{dataset} needs data_dir")
    options = _options(dataset, options)
    common = {"batch_size": batch_size, "rank": rank, "world_size": world_size, "device": device, "seed": seed}
    build = _builder(dataset)
    if dataset in ("cifar10", "cifar100"):
        return build(dataset, split, data_dir=data_dir, backend=backend, download=download, **common, **options)
    if dataset == "imagenet":
        return build(split, data_dir=data_dir, backend=backend, **common, **options)
    if dataset == "cifar10dvs":
        return build(split, data_dir=data_dir, T=T, download=download, **common, **options)
    return build(split, **common, **options)
