"""CIFAR-10/100: the pickled batches on disk, pad-4 random crop + flip + normalise, DALI or plain torch.

Shape letters: b batch, c channels (3), h w space (32 x 32), n samples in a split.

Both backends read the python-pickle release (`cifar-10-batches-py/`, `cifar-100-python/`) into one uint8
`n h w c` array and keep it uint8 until the last op (it is 4x cheaper to move and crop than float):
- "dali": a `@pipeline_def` over that array via `fn.external_source`; zero-pad to 40 x 40, random 32 x 32 window
  (the 9 x 9 positions of torchvision's RandomCrop(32, padding=4), uniformly), coin-flip mirror and normalise
  in one `crop_mirror_normalize`. GPU ops when device is CUDA, the same graph on CPU with `device_id=None`.
- "torch": the whole split as a uint8 `n c h w` tensor on `device`, one batched gather for crop + mirror.
Test split: normalisation only. Output x is float32 `b c h w`, y int64 `b`.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import torch
from einops import rearrange

from pipelines._common import (
    DaliLoader,
    ShardedLoader,
    TensorLoader,
    check_common,
    crop_flip,
    epoch_seed,
    is_train_split,
    random_crop_flip_params,
)
from pipelines.datasets import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, DATASETS

PAD = 4  # RandomCrop(32, padding=4)

# name: (folder, train files, test files, label key, classes, mean, std)
_LAYOUT: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], bytes, int, tuple, tuple]] = {
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels",
                DATASETS["cifar10"].num_classes, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": ("cifar-100-python", ("train",), ("test",), b"fine_labels", DATASETS["cifar100"].num_classes,
                 CIFAR100_MEAN, CIFAR100_STD),
}


# helpers


def _folder(name: str, data_dir: str | os.PathLike, download: bool) -> str:
    """Finds (or, with `download`, fetches through torchvision) the pickle folder of `name` under `data_dir`."""
    folder = _LAYOUT[name][0]
    root = os.fspath(data_dir)
    # Accept both the torchvision root (which holds the folder) and the folder itself.
    path = root if os.path.basename(os.path.normpath(root)) == folder else os.path.join(root, folder)
    if not os.path.isdir(path) and download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(root=root, train=True, download=True)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{name}: folder {path!r} not found. Put the python-pickle release there (extract "
            f"{'cifar-10-python.tar.gz' if name == 'cifar10' else 'cifar-100-python.tar.gz'} into {root!r}) "
            f"or pass download=True.")
    return path


def _read_batch(path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Reads one pickled batch as (uint8 `n h w c`, int64 `n`); ValueError naming the file if it is not one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR batch file {path!r} is missing; re-extract the archive or pass download=True.")
    try:
        with open(path, "rb") as f:
            # The CIFAR release is a pickle (as torchvision reads it); only load files you obtained from it.
            entry = pickle.load(f, encoding="bytes")
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise ValueError(f"data shape {data.shape} with {len(labels)} labels, expected (n, 3072) and n labels")
    except Exception as err:
        raise ValueError(
            f"{path!r} is not a readable CIFAR pickle batch ({type(err).__name__}: {err}). The file is corrupt or "
            f"truncated: delete its folder and re-extract the archive, or pass download=True.") from err
    return rearrange(data, "n (c h w) -> n h w c", c=3, h=32), labels


def load_cifar(name: str, split: str, *, data_dir: str | os.PathLike, download: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
    """Loads a CIFAR split from the pickled batches.

    Args:
        name: "cifar10" or "cifar100".
        split: "train" or "test".
        data_dir: the torchvision root holding `cifar-10-batches-py/` or `cifar-100-python/` (or that folder).
        download: fetch the archive through torchvision when the folder is missing.

    Returns:
        images uint8 `n h w c`, labels int64 `n`.
    """
    _, train_files, test_files, label_key, num_classes, _, _ = _LAYOUT[name]
    path = _folder(name, data_dir, download)
    files = train_files if is_train_split(split) else test_files
    parts = [_read_batch(os.path.join(path, f), label_key) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{path!r}: labels outside [0, {num_classes}); the folder does not hold {name}")
    return images, labels


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 `b c h w` -> float32 `b c h w`, (x / 255 - mean) / std per channel, as one fused multiply-add."""
    scale = rearrange(torch.tensor([1 / (255 * s) for s in std], device=x.device), "c -> c 1 1")
    shift = rearrange(torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=x.device), "c -> c 1 1")
    return torch.addcmul(shift, x.float(), scale)


def torch_transform(*, train: bool, mean: tuple[float, ...], std: tuple[float, ...]):
    """The batched torch transform: uint8 `b c h w` -> float32 `b c h w` (crop + flip first when `train`)."""

    def transform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if train:
            oy, ox, flip = random_crop_flip_params(x.shape[0], pad=PAD, flip=True, generator=generator)
            x = crop_flip(x, oy.to(x.device), ox.to(x.device), flip.to(x.device), pad=PAD)
        return normalize(x, mean, std)

    return transform


def dali_pipeline(source: Any, *, train: bool, mean: tuple[float, ...], std: tuple[float, ...], cuda: bool,
                  batch_size: int, num_threads: int, device_id: int | None, seed: int) -> Any:
    """The DALI CIFAR graph: uint8 `b h w c` from `source` -> float32 `b c h w` and int64 labels.

    Args:
        source: a zero-argument callable returning (uint8 `b h w c`, int64 `b`) per call, StopIteration at the end.
        train: random crop (pad 4) + mirror before normalising; otherwise normalise only.
        mean: per-channel mean (fractions of 255).
        std: per-channel std (fractions of 255).
        cuda: run the ops on the GPU (`device_id` must then be set).
        batch_size: the largest batch `source` returns.
        num_threads: DALI CPU threads.
        device_id: CUDA device, or None for a CPU-only pipeline.
        seed: DALI's seed for the crop positions and mirrors.

    Returns:
        A built `nvidia.dali.Pipeline`.
    """
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def cifar():
        images, labels = fn.external_source(source=source, num_outputs=2, batch=True, layout=["HWC", ""],
                                            dtype=[types.UINT8, types.INT64])
        if cuda:
            images = images.gpu()
        crop = {}
        if train:
            # Centered 40 x 40 window with zero fill = pad 4; then a 32 x 32 window at one of the 9 x 9 offsets.
            images = fn.crop(images, crop=(32 + 2 * PAD, 32 + 2 * PAD), out_of_bounds_policy="pad", fill_values=0)
            positions = [i / (2 * PAD) for i in range(2 * PAD + 1)]
            crop = {"crop": (32, 32), "crop_pos_x": fn.random.uniform(values=positions),
                        "crop_pos_y": fn.random.uniform(values=positions), "mirror": fn.random.coin_flip()}
        images = fn.crop_mirror_normalize(images, mean=[255 * m for m in mean], std=[255 * s for s in std],
                                          dtype=types.FLOAT, output_layout="CHW", **crop)
        return images, labels

    pipe = cifar()
    pipe.build()
    return pipe


# classes


class _Feed:
    """External source of the DALI pipeline: hands out the batches of the current plan, then StopIteration."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels
        self.batches: list[np.ndarray] = []
        self.i = 0

    def start(self, batches: list[np.ndarray]) -> None:
        self.batches, self.i = batches, 0

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        if self.i >= len(self.batches):
            raise StopIteration
        idx = self.batches[self.i]
        self.i += 1
        return self.images[idx], self.labels[idx]


class CifarDali(DaliLoader):
    """CIFAR through DALI: the plan of each epoch is fed to one long-lived pipeline via external source."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, num_classes: int, train: bool, mean: tuple,
                 std: tuple, batch_size: int, rank: int, world_size: int, seed: int, device: str | torch.device,
                 num_threads: int | None = None) -> None:
        super().__init__(n=len(labels), num_classes=num_classes, train=train, batch_size=batch_size, rank=rank,
                         world_size=world_size, seed=seed, device=device)
        self.feed = _Feed(np.ascontiguousarray(images), labels)
        self.mean, self.std = mean, std
        self.num_threads = num_threads or min(4, os.cpu_count() or 1)
        self._pipe = None
        self._pipe_epoch = -1

    def _pipeline(self, batches: list[np.ndarray]) -> Any:
        # Training crops and mirrors are drawn from a seed of (seed, epoch, rank), like every other loader's, so a run
        # resumed at epoch e sees the augmentation an uninterrupted one does: a new pipeline for every epoch.
        if self._pipe is None or not self._clean or (self.train and self._pipe_epoch != self.epoch):
            # A pass abandoned mid-epoch leaves prefetched batches queued: start from a fresh pipeline.
            self._pipe = None
            self.feed.start([])
            self._pipe = dali_pipeline(
                self.feed, train=self.train, mean=self.mean, std=self.std, cuda=self.device.type == "cuda",
                batch_size=self.batch_size, num_threads=self.num_threads, device_id=self._device_id(),
                seed=epoch_seed(self.seed, self.epoch, 1 + self.rank) % 2**31)
            self._pipe_epoch = self.epoch
        self.feed.start(batches)
        return self._pipe

    def _end_epoch(self, pipe: Any) -> None:
        # The source has raised StopIteration; DALI reports it on the next run, after which it must be reset.
        try:
            pipe.run()
        except StopIteration:
            pipe.reset()
            return
        raise AssertionError("DALI pipeline produced more batches than the epoch plan")


def build_cifar(name: str, split: str, *, data_dir: str | os.PathLike, batch_size: int, rank: int = 0,
                world_size: int = 1, device: str | torch.device = "cpu", backend: str = "auto", seed: int = 0,
                download: bool = False, num_threads: int | None = None) -> ShardedLoader:
    """Builds the CIFAR-10/100 loader (see `pipelines.build_loader` for the contract).

    Args:
        name: "cifar10" or "cifar100".
        split: "train" or "test".
        data_dir: root holding the pickle folder.
        batch_size: per-rank batch size.
        rank: this process's rank.
        world_size: number of processes.
        device: where batches are produced ("cpu", "cuda", "cuda:1").
        backend: "dali" or "torch" ("auto" is resolved by the caller).
        seed: base seed of the permutations and augmentation.
        download: fetch the data through torchvision if the folder is missing.
        num_threads: DALI CPU threads (default min(4, cores)).

    Returns:
        A loader yielding float32 `b 3 32 32` and int64 `b`.
    """
    check_common(batch_size=batch_size, rank=rank, world_size=world_size)
    train = is_train_split(split)
    *_, num_classes, mean, std = _LAYOUT[name]
    images, labels = load_cifar(name, split, data_dir=data_dir, download=download)
    common = {"num_classes": num_classes, "train": train, "batch_size": batch_size, "rank": rank,
              "world_size": world_size, "seed": seed, "device": device}
    if backend == "dali":
        return CifarDali(images, labels, mean=mean, std=std, num_threads=num_threads, **common)
    x = torch.from_numpy(rearrange(images, "n h w c -> n c h w").copy())
    return TensorLoader(x, torch.from_numpy(labels), transform=torch_transform(train=train, mean=mean, std=std),
                        **common)

