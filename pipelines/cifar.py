"""CIFAR-10/100: the pickled batches on disk, pad-4 random crop + flip + normalise, DALI or plain torch.

Shape letters: b batch, c channels (3), h w space (32 x 32), n samples in a split.

Both backends read the python-pickle release (`cifar-10-batches-py/`, `cifar-100-python/`) into one uint8
`n h w c` array and keep it uint8 until the last op (it is 4x cheaper to move and crop than float):
- "dali": a `@pipeline_def` over that array via `fn.external_source`; zero-pad to 40 x 40, a 32 x 32 window at one
  of the 9 x 9 offsets of torchvision's RandomCrop(32, padding=4), mirror and normalise in one
  `crop_mirror_normalize`. GPU ops when device is CUDA, the same graph on CPU with `device_id=None`.
- "torch": the whole split as a uint8 `n c h w` tensor on `device`, one batched gather for crop + mirror.
Both draw the offsets (uniform over the 9 x 9) and the mirror (probability 1/2) of each sample from
`sample_uniforms(key of (seed, epoch), sample index)` on the host (DALI takes them as per-sample arguments), so the
two backends make the same choices and a pass can start at any batch. Test split: normalisation only. Output x is
float32 `b c h w`, y int64 `b`.
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
    DataError,
    MissingDataError,
    ShardedLoader,
    TensorLoader,
    check_common,
    crop_flip_params,
    is_train_split,
    random_crop_flip,
    sample_uniforms,
)
from pipelines.datasets import DATASETS

PAD = 4  # RandomCrop(32, padding=4)
DRAWS = 3  # uniforms per training sample: row offset, column offset, mirror

# name: (folder, train files, test files, label key); classes, mean and std are in DATASETS
_LAYOUT: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], bytes]] = {
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels"),
    "cifar100": ("cifar-100-python", ("train",), ("test",), b"fine_labels"),
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
        raise MissingDataError(
            f"{name}: folder {path!r} not found. Put the python-pickle release there (extract "
            f"{'cifar-10-python.tar.gz' if name == 'cifar10' else 'cifar-100-python.tar.gz'} into {root!r}) "
            f"or pass download=True."
        )
    return path


def _read_batch(path: str, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads one pickled batch as (uint8 `n h w c`, int64 `n`); DataError naming the file if it is not one."""
    if not os.path.isfile(path):
        raise MissingDataError(f"CIFAR batch file {path!r} is missing; re-extract the archive or pass download=True.")
    fix = "delete its folder and re-extract the archive, or pass download=True"
    try:
        with open(path, "rb") as f:
            # The CIFAR release is a pickle (as torchvision reads it); only load files you obtained from it.
            entry = pickle.load(f, encoding="bytes")
        data, labels = np.asarray(entry[b"data"]), np.asarray(entry[label_key])
    except Exception as err:  # unpickling a damaged file can fail in any way; all of them mean "damaged"
        raise DataError(
            f"{path!r} is not a readable CIFAR pickle batch ({type(err).__name__}: {err}). The file is "
            f"corrupt or truncated: {fix}."
        ) from err
    # The release stores uint8 rows of 3 x 32 x 32 pixels (channel-major) and a list of ints; anything else (a cast
    # would silently wrap values) is a different or damaged file.
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{path!r}: 'data' is {data.dtype} {data.shape}, expected uint8 (n, 3072) as in the CIFAR release; {fix}."
        )
    if labels.ndim != 1 or len(labels) != len(data) or (len(labels) and labels.dtype.kind not in "iu"):
        raise DataError(
            f"{path!r}: {label_key.decode()} is {labels.dtype} {labels.shape}, expected {len(data)} "
            f"integer labels (one per image); {fix}."
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path!r}: labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes}): the "
            f"file does not belong to this dataset; {fix}."
        )
    return rearrange(data, "n (c h w) -> n h w c", c=3, h=32), labels.astype(np.int64)


def load_cifar(
    name: str, split: str, *, data_dir: str | os.PathLike, download: bool = False
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
    _, train_files, test_files, label_key = _LAYOUT[name]
    path = _folder(name, data_dir, download)
    files = train_files if is_train_split(split) else test_files
    parts = [_read_batch(os.path.join(path, f), label_key, DATASETS[name].num_classes) for f in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 `b c h w` -> float32 `b c h w`, (x / 255 - mean) / std per channel, as one fused multiply-add."""
    scale = rearrange(torch.tensor([1 / (255 * s) for s in std], device=x.device), "c -> c 1 1")
    shift = rearrange(torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=x.device), "c -> c 1 1")
    return torch.addcmul(shift, x.float(), scale)


def torch_transform(*, train: bool, mean: tuple[float, ...], std: tuple[float, ...]):
    """The batched torch transform: uint8 `b c h w` and `b DRAWS` uniforms -> float32 `b c h w` (crop + flip first
    when `train`)."""

    def transform(x: torch.Tensor, u: np.ndarray) -> torch.Tensor:
        if train:
            x = random_crop_flip(x, u, pad=PAD)
        return normalize(x, mean, std)

    return transform


def dali_pipeline(
    source: Any,
    *,
    train: bool,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    cuda: bool,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
) -> Any:
    """The DALI CIFAR graph: uint8 `b h w c` from `source` -> float32 `b c h w` and int64 labels.

    Args:
        source: a zero-argument callable returning (uint8 `b h w c`, int64 `b`) per call, and for training also
            the crop positions (float32 `b`, row and column, offset / 8) and mirror flags (int32 `b`);
            StopIteration at the end.
        train: crop (pad 4) + mirror at the given positions before normalising; otherwise normalise only.
        mean: per-channel mean (fractions of 255).
        std: per-channel std (fractions of 255).
        cuda: run the ops on the GPU (`device_id` must then be set).
        batch_size: the largest batch `source` returns.
        num_threads: DALI CPU threads.
        device_id: CUDA device, or None for a CPU-only pipeline.

    Returns:
        A built `nvidia.dali.Pipeline`.
    """
    from nvidia.dali import fn, pipeline_def, types

    # No DALI random op: every choice comes from `source`, so the pipeline holds no random state to resume.
    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=2)
    def cifar():
        layout, dtype = ["HWC", ""], [types.UINT8, types.INT64]
        if train:
            layout, dtype = layout + ["", "", ""], dtype + [types.FLOAT, types.FLOAT, types.INT32]
        images, labels, *choices = fn.external_source(
            source=source, num_outputs=len(dtype), batch=True, layout=layout, dtype=dtype
        )
        if cuda:
            images = images.gpu()
        crop = {}
        if train:
            # Centered 40 x 40 window with zero fill = pad 4; then a 32 x 32 window at crop_pos * 8 = the offset.
            images = fn.crop(images, crop=(32 + 2 * PAD, 32 + 2 * PAD), out_of_bounds_policy="pad", fill_values=0)
            crop = dict(zip(("crop_pos_y", "crop_pos_x", "mirror"), choices, strict=True), crop=(32, 32))
        images = fn.crop_mirror_normalize(
            images,
            mean=[255 * m for m in mean],
            std=[255 * s for s in std],
            dtype=types.FLOAT,
            output_layout="CHW",
            **crop,
        )
        return images, labels

    pipe = cifar()
    pipe.build()
    return pipe


# classes


class _Feed:
    """External source of the DALI pipeline: hands out the batches of the current plan (with their crop positions
    and mirrors from `sample_uniforms(key, idx)` when training), then StopIteration."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, train: bool) -> None:
        self.images, self.labels, self.train = images, labels, train
        self.batches: list[np.ndarray] = []
        self.key = 0
        self.i = 0

    def start(self, batches: list[np.ndarray], key: int) -> None:
        self.batches, self.key, self.i = batches, key, 0

    def __call__(self) -> tuple[np.ndarray, ...]:
        if self.i >= len(self.batches):
            raise StopIteration
        idx = self.batches[self.i]
        self.i += 1
        if not self.train:
            return self.images[idx], self.labels[idx]
        oy, ox, flip = crop_flip_params(sample_uniforms(self.key, idx, DRAWS), pad=PAD)
        # offset / (2 * PAD) is exact in float32, and DALI maps it back to the offset exactly.
        pos_y, pos_x = (np.float32(o / (2 * PAD)) for o in (oy, ox))
        return self.images[idx], self.labels[idx], pos_y, pos_x, flip.astype(np.int32)


class CifarDali(DaliLoader):
    """CIFAR through DALI: the plan of each epoch is fed to one long-lived pipeline via external source."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        num_classes: int,
        train: bool,
        mean: tuple,
        std: tuple,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: str | torch.device,
        num_threads: int | None = None,
    ) -> None:
        super().__init__(
            n=len(labels),
            num_classes=num_classes,
            train=train,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            device=device,
        )
        self.feed = _Feed(np.ascontiguousarray(images), labels, train=train)
        self.mean, self.std = mean, std
        self.num_threads = num_threads or min(4, os.cpu_count() or 1)
        self._pipe = None

    def _pipeline(self, batches: list[np.ndarray], key: int) -> Any:
        if self._pipe is None or not self._clean:
            # A pass abandoned mid-epoch leaves prefetched batches queued: start from a fresh pipeline.
            self._pipe = None
            self.feed.start([], key)
            self._pipe = dali_pipeline(
                self.feed,
                train=self.train,
                mean=self.mean,
                std=self.std,
                cuda=self.device.type == "cuda",
                batch_size=self.batch_size,
                num_threads=self.num_threads,
                device_id=self._device_id(),
            )
        self.feed.start(batches, key)
        return self._pipe

    def _end_epoch(self, pipe: Any) -> None:
        # The source has raised StopIteration; DALI reports it on the next run, after which it must be reset.
        try:
            pipe.run()
        except StopIteration:
            pipe.reset()
            return
        raise AssertionError("DALI pipeline produced more batches than the epoch plan")


def build_cifar(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    seed: int = 0,
    download: bool = False,
    num_threads: int | None = None,
) -> ShardedLoader:
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
    info = DATASETS[name]
    images, labels = load_cifar(name, split, data_dir=data_dir, download=download)
    common = {
        "num_classes": info.num_classes,
        "train": train,
        "batch_size": batch_size,
        "rank": rank,
        "world_size": world_size,
        "seed": seed,
        "device": device,
    }
    if backend == "dali":
        return CifarDali(images, labels, mean=info.mean, std=info.std, num_threads=num_threads, **common)
    x = torch.from_numpy(rearrange(images, "n h w c -> n c h w").copy())
    transform = torch_transform(train=train, mean=info.mean, std=info.std)
    return TensorLoader(x, torch.from_numpy(labels), transform=transform, draws=DRAWS if train else 0, **common)
