"""ImageNet: `train/CLASS/*.JPEG` and `val/CLASS/*.JPEG` folders, DALI (file reader + decoder) or torchvision.

Shape letters: b batch, c channels (3), h w space (224 x 224), n samples in a split.

Train: random-resized crop 224 with area scale (0.2, 1.0) and aspect (3/4, 4/3), horizontal flip, normalise.
Val: resize the short side to 256, center crop 224, normalise (docs/training.md §4.2). Output x float32 `b 3 224 224`,
y int64 `b`; class k is the k-th class folder in sorted order (as ImageFolder numbers them).

"dali": `fn.readers.file` over this rank's file list (sharding and the per-epoch permutation are done here, from
seed + epoch, so every backend shards the same way), `mixed` (nvJPEG) decode on CUDA and `cpu` decode otherwise,
fused decode + crop (`decoders.image_slice`) for training. The reader pads the last batch of a shard; padded rows
are dropped.
"torch": the ImageFolder layout and order read by DataLoader workers with PIL and torchvision's functional ops
(resized crop: bilinear with antialias, as RandomResizedCrop).

Training windows are torchvision's RandomResizedCrop.get_params (10 attempts of area ~ U(SCALE) and log-aspect
~ U(log RATIO), accepted when the window fits, then a uniform position; else the center crop clamped to RATIO), but
every draw is `sample_uniforms(key of (seed, epoch), sample index)` computed on the host, so the window and flip of
a sample depend on nothing but (seed, epoch, sample). The window needs the image size: the torch backend computes it
in numpy (`rrc_window`) after PIL opens the file; DALI computes the same float32 arithmetic in the graph
(`dali_rrc_window`) from the encoded size (`peek_image_shape`), with the host's draws fed as per-sample inputs, and
the two agree bitwise (a test checks), so both backends crop the same windows.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from pipelines._common import (
    DaliLoader,
    DataError,
    MapLoader,
    MissingDataError,
    ShardedLoader,
    check_common,
    is_train_split,
    sample_uniforms,
)
from pipelines.datasets import DATASETS

SIZE = DATASETS["imagenet"].input_size
MEAN, STD = DATASETS["imagenet"].mean, DATASETS["imagenet"].std
RESIZE = 256
SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)
EXTENSIONS = (".jpeg", ".jpg", ".png")
VERIFY_LIMIT = 200_000  # signatures of splits up to this many files are checked up front (ImageNet val: 50k)
ATTEMPTS = 10  # RandomResizedCrop's tries before its center-crop fallback
DRAWS = 2 * ATTEMPTS + 3  # uniforms per training sample: area and aspect per attempt, row, column, mirror

_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


# helpers


def list_images(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """Lists `root/CLASS/*` images in ImageFolder order (classes sorted, files sorted).

    Returns:
        (paths, labels, class names).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise MissingDataError(
            f"ImageNet folder {root!r} not found: expected {root}/CLASS/*.JPEG (one folder per class, the val "
            f"split sorted into class folders too). Pass data_dir holding train/ and val/."
        )
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise MissingDataError(f"{root!r} has no class folders: expected {root}/CLASS/*.JPEG")
    paths, labels = [], []
    for k, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(e.path for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(EXTENSIONS))
        if not files:
            # Class k would exist with no sample: the labels would still count it, silently skewing the task.
            raise DataError(
                f"class folder {folder!r} has no {'/'.join(EXTENSIONS)} images (an interrupted "
                f"extraction?); restore its images, or remove the folder from every split"
            )
        paths += files
        labels += [k] * len(files)
    return paths, labels, classes


def verify_images(paths: list[str]) -> None:
    """Checks that every file starts with a JPEG or PNG signature (cheap: a few bytes per file).

    Raises:
        DataError: naming the first unreadable file.
    """
    for path in paths:
        with open(path, "rb") as f:
            head = f.read(8)
        if not head:
            raise DataError(f"{path!r} is empty (0 bytes). Replace it with a good copy or delete it.")
        if not head.startswith(_SIGNATURES):
            raise DataError(
                f"{path!r} is not a JPEG or PNG image (truncated or another format). Replace it with a good copy or "
                f"delete it."
            )


def _pil_loader(path: str) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as err:  # PIL fails in many ways on a bad file
        raise DataError(f"cannot decode image {path!r} ({err}); replace it with a good copy or delete it.") from err


def rrc_factors(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per attempt, the window sides as multiples of sqrt(H W): width sqrt(s a), height sqrt(s / a).

    Args:
        u: `b DRAWS` uniforms; columns [0, ATTEMPTS) give the area fraction s ~ U(SCALE), the next ATTEMPTS the
            aspect a = exp(U(log RATIO)), as torchvision draws them.

    Returns:
        (fw, fh) float32 `b ATTEMPTS`.
    """
    s = SCALE[0] + (SCALE[1] - SCALE[0]) * u[:, :ATTEMPTS].astype(np.float64)
    lo, hi = np.log(RATIO)
    a = np.exp(lo + (hi - lo) * u[:, ATTEMPTS : 2 * ATTEMPTS].astype(np.float64))
    return np.sqrt(s * a).astype(np.float32), np.sqrt(s / a).astype(np.float32)


def rrc_draws(u: np.ndarray) -> tuple[np.ndarray, ...]:
    """Everything a training sample's augmentation takes from its `b DRAWS` uniforms: (fw, fh) float32 `b ATTEMPTS`
    (`rrc_factors`), (uy, ux) float32 `b` for the window's row and column (`rrc_window`), mirror bool `b`."""
    return (*rrc_factors(u), u[:, -3], u[:, -2], u[:, -1] < 0.5)


def rrc_window(
    h: np.ndarray, w: np.ndarray, fw: np.ndarray, fh: np.ndarray, uy: np.ndarray, ux: np.ndarray
) -> tuple[np.ndarray, ...]:
    """RandomResizedCrop.get_params in float32 from given draws; the numpy twin of `dali_rrc_window`.

    Args:
        h: float32 `b` image heights.
        w: float32 `b` image widths.
        fw: float32 `b ATTEMPTS` width factors (`rrc_factors`).
        fh: float32 `b ATTEMPTS` height factors.
        uy: float32 `b` uniform for the row of the window.
        ux: float32 `b` uniform for the column.

    Returns:
        (top, left, height, width) int64 `b`.
    """
    h, w = h[:, None], w[:, None]
    side = np.sqrt(h * w)
    ws, hs = np.floor(side * fw + np.float32(0.5)), np.floor(side * fh + np.float32(0.5))
    ok = (ws <= w) & (hs <= h) & (ws >= 1) & (hs >= 1)
    found = ok.any(axis=1)
    first = ok.argmax(axis=1)[:, None]
    h, w = h[:, 0], w[:, 0]
    # No attempt fits: the whole image, cut to the nearest allowed aspect ratio, centered.
    ratio = w / h
    wf = np.where(ratio > np.float32(RATIO[1]), np.floor(h * np.float32(RATIO[1]) + np.float32(0.5)), w)
    hf = np.where(ratio < np.float32(RATIO[0]), np.floor(w / np.float32(RATIO[0]) + np.float32(0.5)), h)
    cw = np.where(found, np.take_along_axis(ws, first, 1)[:, 0], wf)
    ch = np.where(found, np.take_along_axis(hs, first, 1)[:, 0], hf)
    top = np.where(found, np.floor(uy * (h - ch + 1)), np.floor((h - ch) * np.float32(0.5)))
    left = np.where(found, np.floor(ux * (w - cw + 1)), np.floor((w - cw) * np.float32(0.5)))
    return tuple(a.astype(np.int64) for a in (top, left, ch, cw))


def dali_rrc_window(shape: Any, fw: Any, fh: Any, uyx: Any) -> tuple[Any, Any]:
    """`rrc_window` as DALI graph nodes, op for op in float32 (so both give the same windows bitwise).

    Args:
        shape: float32 `3` (h, w, c) per sample (`fn.peek_image_shape(..., dtype=FLOAT)`).
        fw: float32 `ATTEMPTS` width factors per sample.
        fh: float32 `ATTEMPTS` height factors per sample.
        uyx: float32 `2` uniforms (row, column) per sample.

    Returns:
        (start, size): int32 `2` nodes, (top, left) and (height, width), for `decoders.image_slice(axis_names="HW")`.
    """
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    h, w = shape[0], shape[1]
    side = dmath.sqrt(h * w)
    ws, hs = dmath.floor(side * fw + 0.5), dmath.floor(side * fh + 0.5)
    k = types.Constant(np.arange(ATTEMPTS, dtype=np.float32))
    # The first fitting attempt: failed attempts are pushed past ATTEMPTS, so the minimum is it (or >= ATTEMPTS).
    first = fn.reductions.min(k + ATTEMPTS * ((ws > w) | (hs > h) | (ws < 1) | (hs < 1)))
    found = first < ATTEMPTS
    pick = k == first
    wp, hp = fn.reductions.sum(ws * pick), fn.reductions.sum(hs * pick)
    ratio = w / h
    wf = w + (ratio > np.float32(RATIO[1])) * (dmath.floor(h * np.float32(RATIO[1]) + 0.5) - w)
    hf = h + (ratio < np.float32(RATIO[0])) * (dmath.floor(w / np.float32(RATIO[0]) + 0.5) - h)
    # Blends with a 0/1 flag are exact here (integers, or a product with 0 or 1), so they act as np.where.
    cw, ch = wf + found * (wp - wf), hf + found * (hp - hf)
    top = dmath.floor(found * (uyx[0] * (h - ch + 1)) + (1 - found) * ((h - ch) * 0.5))
    left = dmath.floor(found * (uyx[1] * (w - cw + 1)) + (1 - found) * ((w - cw) * 0.5))
    return (fn.cast(fn.stack(top, left), dtype=types.INT32), fn.cast(fn.stack(ch, cw), dtype=types.INT32))


def dali_pipeline(
    files: list[str],
    labels: list[int],
    *,
    train: bool,
    cuda: bool,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    draws: Any = None,
) -> Any:
    """The DALI ImageNet graph over an explicit file list, read in list order.

    Args:
        files: image paths in the order they are to be read (this rank's plan for one pass).
        labels: class index of each file.
        train: random-resized crop + flip; otherwise resize 256 + center crop 224.
        cuda: decode with nvJPEG ("mixed") and run the ops on the GPU.
        batch_size: per-rank batch size.
        num_threads: DALI CPU threads.
        device_id: CUDA device, or None for a CPU-only pipeline.
        draws: training only: `draws(i)` gives the i-th batch's (fw, fh, uyx, mirror) as float32 `b ATTEMPTS`,
            `b ATTEMPTS`, `b 2` and int32 `b`, b = batch_size (padded like the reader's last batch).

    Returns:
        A built `nvidia.dali.Pipeline` yielding float32 `b 3 224 224` and int32 `b 1`.
    """
    from nvidia.dali import fn, pipeline_def, types

    # No DALI random op: every choice comes from `draws`, so the pipeline holds no random state to resume.
    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=2)
    def imagenet():
        # pad_last_batch repeats the shard's last sample instead of wrapping into the next epoch's files.
        jpegs, label = fn.readers.file(
            files=files, labels=labels, random_shuffle=False, pad_last_batch=True, name="Reader"
        )
        decode = "mixed" if cuda else "cpu"
        if train:
            fw, fh, uyx, mirror = fn.external_source(
                source=lambda info: draws(info.iteration),
                num_outputs=4,
                batch=True,
                batch_info=True,
                dtype=[types.FLOAT, types.FLOAT, types.FLOAT, types.INT32],
            )
            start, size = dali_rrc_window(fn.peek_image_shape(jpegs, dtype=types.FLOAT), fw, fh, uyx)
            images = fn.decoders.image_slice(
                jpegs, start=start, shape=size, axis_names="HW", device=decode, output_type=types.RGB
            )
            images = fn.resize(images, resize_x=SIZE, resize_y=SIZE, interp_type=types.INTERP_LINEAR)
            crop = {"mirror": mirror}
        else:
            images = fn.decoders.image(jpegs, device=decode, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=RESIZE, interp_type=types.INTERP_LINEAR)
            crop = {"crop": (SIZE, SIZE)}
        images = fn.crop_mirror_normalize(
            images,
            mean=[255 * m for m in MEAN],
            std=[255 * s for s in STD],
            dtype=types.FLOAT,
            output_layout="CHW",
            **crop,
        )
        return images, label

    pipe = imagenet()
    pipe.build()
    return pipe


# classes


class ImageFiles(torch.utils.data.Dataset):
    """The torch backend's dataset: PIL decode, then the reference transforms. Item: (float32 `3 224 224`, label).

    Training items are indexed by `(index, key)` (MapLoader with `keyed`): the resized-crop window and the mirror
    come from `sample_uniforms(key, index)`, computed in the worker, so no worker RNG is involved.
    """

    def __init__(self, paths: list[str], labels: list[int], *, train: bool) -> None:
        from torchvision import transforms as tv

        self.paths, self.labels, self.train = paths, labels, train
        self.val_transform = tv.Compose([tv.Resize(RESIZE), tv.CenterCrop(SIZE)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        i, key = item if self.train else (item, None)
        img = _pil_loader(self.paths[i])
        if self.train:
            *window, mirror = rrc_draws(sample_uniforms(key, np.array([i]), DRAWS))
            top, left, h, w = (
                int(a[0]) for a in rrc_window(np.float32([img.height]), np.float32([img.width]), *window)
            )
            img = TF.resized_crop(img, top, left, h, w, [SIZE, SIZE], InterpolationMode.BILINEAR, antialias=True)
            if mirror[0]:
                img = TF.hflip(img)
        else:
            img = self.val_transform(img)
        return TF.normalize(TF.to_tensor(img), MEAN, STD), self.labels[i]


class ImageNetDali(DaliLoader):
    """ImageNet through DALI: one file-reader pipeline per pass, reading this rank's (remaining) plan in order."""

    def __init__(
        self,
        paths: list[str],
        labels: list[int],
        *,
        num_classes: int,
        train: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: str | torch.device,
        num_threads: int | None = None,
    ) -> None:
        super().__init__(
            n=len(paths),
            num_classes=num_classes,
            train=train,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            device=device,
        )
        self.paths, self.labels = paths, labels
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)

    def _pipeline(self, batches: list[np.ndarray], key: int) -> Any:
        # The reader's file list is fixed at build time, so each pass (a new permutation, or the rest of one) gets a
        # new pipeline; building it costs well under a second, against minutes per ImageNet epoch.
        order = np.concatenate(batches)

        def draws(i: int) -> tuple[np.ndarray, ...]:
            if i >= len(batches):
                raise StopIteration  # DALI prefetches past the plan; those iterations are never run
            # Pad like the reader's last batch (repeat the last sample), so both sources give full batches.
            idx = np.pad(batches[i], (0, self.batch_size - len(batches[i])), mode="edge")
            fw, fh, uy, ux, mirror = rrc_draws(sample_uniforms(key, idx, DRAWS))
            return fw, fh, np.stack([uy, ux], axis=1), mirror.astype(np.int32)

        return dali_pipeline(
            [self.paths[i] for i in order],
            [self.labels[i] for i in order],
            train=self.train,
            cuda=self.device.type == "cuda",
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self._device_id(),
            draws=draws if self.train else None,
        )

    def _run_error(self, batches: list[np.ndarray], i: int, err: RuntimeError) -> Exception:
        # DALI says only "decoder failure"; the culprit is in the failing batch or a prefetched one: decode those
        # few files with PIL to name it.
        for idx in batches[i : i + 3]:
            for j in idx:
                _pil_loader(self.paths[j])  # raises DataError naming the file
        return DataError(
            f"DALI failed on a batch of {os.path.dirname(os.path.dirname(self.paths[0]))!r} ({err}); "
            f"retry with backend='torch' to find the file."
        )


def build_imagenet(
    split: str,
    *,
    data_dir: str | os.PathLike,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    seed: int = 0,
    num_threads: int | None = None,
    num_workers: int | None = None,
    verify: bool | None = None,
) -> ShardedLoader:
    """Builds the ImageNet loader (see `pipelines.build_loader` for the contract).

    Args:
        split: "train", or "test"/"val" (the `val/` folder).
        data_dir: folder holding `train/` and `val/`.
        batch_size: per-rank batch size.
        rank: this process's rank.
        world_size: number of processes.
        device: where batches are produced.
        backend: "dali" or "torch".
        seed: base seed of the permutations and augmentation.
        num_threads: DALI CPU threads (default min(8, cores)).
        num_workers: DataLoader workers of the torch backend (default min(8, cores)).
        verify: check every file's image signature before starting (default: when the split has at most
            VERIFY_LIMIT files, i.e. always for val, not for the 1.28M-image train split).

    Returns:
        A loader yielding float32 `b 3 224 224` and int64 `b`.
    """
    check_common(batch_size=batch_size, rank=rank, world_size=world_size)
    train = is_train_split(split)
    root = os.path.join(os.fspath(data_dir), "train" if train else "val")
    paths, labels, classes = list_images(root)
    if verify or (verify is None and len(paths) <= VERIFY_LIMIT):
        verify_images(paths)
    common = {
        "num_classes": len(classes),
        "train": train,
        "batch_size": batch_size,
        "rank": rank,
        "world_size": world_size,
        "seed": seed,
        "device": device,
    }
    if backend == "dali":
        return ImageNetDali(paths, labels, num_threads=num_threads, **common)
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
    return MapLoader(ImageFiles(paths, labels, train=train), n=len(paths), num_workers=workers, keyed=train, **common)
