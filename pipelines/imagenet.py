"""ImageNet: `train/CLASS/*.JPEG` and `val/CLASS/*.JPEG` folders, DALI (file reader + decoder) or torchvision.

Shape letters: b batch, c channels (3), h w space (224 x 224), n samples in a split.

Train: random-resized crop 224 with area scale (0.2, 1.0) and aspect (3/4, 4/3), horizontal flip, normalise.
Val: resize the short side to 256, center crop 224, normalise (docs/training.md §4.2). Output x float32 `b 3 224 224`,
y int64 `b`; class k is the k-th class folder in sorted order (as ImageFolder numbers them).

"dali": `fn.readers.file` over this rank's file list (sharding and the per-epoch permutation are done here, from
seed + epoch, so every backend shards the same way), `mixed` (nvJPEG) decode on CUDA and `cpu` decode otherwise,
fused decode + random crop for training. The reader pads the last batch of a shard; padded rows are dropped.
"torch": torchvision `ImageFolder` with the reference transforms, read by DataLoader workers.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from pipelines._common import DaliLoader, MapLoader, ShardedLoader, check_common, epoch_seed, is_train_split
from pipelines.datasets import DATASETS, IMAGENET_MEAN, IMAGENET_STD

SIZE = DATASETS["imagenet"].input_size
RESIZE = 256
SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)
EXTENSIONS = (".jpeg", ".jpg", ".png")
VERIFY_LIMIT = 200_000  # signatures of splits up to this many files are checked up front (ImageNet val: 50k)

_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


# helpers


def list_images(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """Lists `root/CLASS/*` images in ImageFolder order (classes sorted, files sorted).

    Returns:
        (paths, labels, class names).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"ImageNet folder {root!r} not found: expected {root}/CLASS/*.JPEG (one folder per class, the val "
            f"split sorted into class folders too). Pass data_dir holding train/ and val/.")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root!r} has no class folders: expected {root}/CLASS/*.JPEG")
    paths, labels = [], []
    for k, name in enumerate(classes):
        files = sorted(e.path for e in os.scandir(os.path.join(root, name))
                       if e.is_file() and e.name.lower().endswith(EXTENSIONS))
        paths += files
        labels += [k] * len(files)
    if not paths:
        raise FileNotFoundError(f"{root!r} has class folders but no {'/'.join(EXTENSIONS)} images in them")
    return paths, labels, classes


def verify_images(paths: list[str]) -> None:
    """Checks that every file starts with a JPEG or PNG signature (cheap: a few bytes per file).

    Raises:
        ValueError: naming the first unreadable file.
    """
    for path in paths:
        with open(path, "rb") as f:
            head = f.read(8)
        if not head.startswith(_SIGNATURES):
            raise ValueError(
                f"{path!r} is not a JPEG or PNG image (empty, truncated or another format). Replace it with a good "
                f"copy or delete it.")


def _is_image(path: str) -> bool:
    return path.lower().endswith(EXTENSIONS)


def _pil_loader(path: str) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as err:
        raise ValueError(f"cannot decode image {path!r} ({err}); replace it with a good copy or delete it.") from err


def torch_transforms(train: bool) -> Any:
    """The reference torchvision transforms (PIL in, float32 `c h w` out)."""
    from torchvision import transforms as tv

    norm = [tv.ToTensor(), tv.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        return tv.Compose([tv.RandomResizedCrop(SIZE, scale=SCALE, ratio=RATIO), tv.RandomHorizontalFlip(), *norm])
    return tv.Compose([tv.Resize(RESIZE), tv.CenterCrop(SIZE), *norm])


def dali_pipeline(files: list[str], labels: list[int], *, train: bool, cuda: bool, batch_size: int,
                  num_threads: int, device_id: int | None, seed: int) -> Any:
    """The DALI ImageNet graph over an explicit file list, read in list order.

    Args:
        files: image paths in the order they are to be read (this rank's plan for one epoch).
        labels: class index of each file.
        train: random-resized crop + flip; otherwise resize 256 + center crop 224.
        cuda: decode with nvJPEG ("mixed") and run the ops on the GPU.
        batch_size: per-rank batch size.
        num_threads: DALI CPU threads.
        device_id: CUDA device, or None for a CPU-only pipeline.
        seed: DALI's seed for crops and flips.

    Returns:
        A built `nvidia.dali.Pipeline` yielding float32 `b 3 224 224` and int32 `b 1`.
    """
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def imagenet():
        # pad_last_batch repeats the shard's last sample instead of wrapping into the next epoch's files.
        jpegs, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, pad_last_batch=True,
                                       name="Reader")
        decode = "mixed" if cuda else "cpu"
        if train:
            images = fn.decoders.image_random_crop(jpegs, device=decode, output_type=types.RGB,
                                                   random_area=list(SCALE), random_aspect_ratio=list(RATIO),
                                                   num_attempts=10)
            images = fn.resize(images, resize_x=SIZE, resize_y=SIZE, interp_type=types.INTERP_LINEAR)
            crop = {"mirror": fn.random.coin_flip()}
        else:
            images = fn.decoders.image(jpegs, device=decode, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=RESIZE, interp_type=types.INTERP_LINEAR)
            crop = {"crop": (SIZE, SIZE)}
        images = fn.crop_mirror_normalize(images, mean=[255 * m for m in IMAGENET_MEAN],
                                          std=[255 * s for s in IMAGENET_STD], dtype=types.FLOAT,
                                          output_layout="CHW", **crop)
        return images, label

    pipe = imagenet()
    pipe.build()
    return pipe


# classes


class ImageNetDali(DaliLoader):
    """ImageNet through DALI: one file-reader pipeline per pass, reading this rank's plan in order."""

    def __init__(self, paths: list[str], labels: list[int], *, num_classes: int, train: bool, batch_size: int,
                 rank: int, world_size: int, seed: int, device: str | torch.device,
                 num_threads: int | None = None) -> None:
        super().__init__(n=len(paths), num_classes=num_classes, train=train, batch_size=batch_size, rank=rank,
                         world_size=world_size, seed=seed, device=device)
        self.paths, self.labels = paths, labels
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)

    def _pipeline(self, batches: list[np.ndarray]) -> Any:
        # The reader's file list is fixed at build time, so each epoch (a new permutation) gets a new pipeline;
        # building it costs well under a second, against minutes per ImageNet epoch.
        order = np.concatenate(batches)
        return dali_pipeline([self.paths[i] for i in order], [self.labels[i] for i in order], train=self.train,
                             cuda=self.device.type == "cuda", batch_size=self.batch_size,
                             num_threads=self.num_threads, device_id=self._device_id(),
                             seed=epoch_seed(self.seed, self.epoch, self.rank) % 2**31)


    def _run_error(self, batches: list[np.ndarray], i: int, err: RuntimeError) -> Exception:
        # DALI says only "decoder failure"; the culprit is in the failing batch or a prefetched one: decode those
        # few files with PIL to name it.
        for idx in batches[i:i + 3]:
            for j in idx:
                _pil_loader(self.paths[j])  # raises ValueError naming the file
        return ValueError(f"DALI failed on a batch of {os.path.dirname(os.path.dirname(self.paths[0]))!r} ({err}); "
                          f"retry with backend='torch' to find the file.")


def build_imagenet(split: str, *, data_dir: str | os.PathLike, batch_size: int, rank: int = 0, world_size: int = 1,
                   device: str | torch.device = "cpu", backend: str = "auto", seed: int = 0,
                   num_threads: int | None = None, num_workers: int | None = None,
                   verify: bool | None = None) -> ShardedLoader:
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
    common = {"num_classes": len(classes), "train": train, "batch_size": batch_size, "rank": rank,
              "world_size": world_size, "seed": seed, "device": device}
    if backend == "dali":
        return ImageNetDali(paths, labels, num_threads=num_threads, **common)
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(root, transform=torch_transforms(train), loader=_pil_loader, is_valid_file=_is_image)
    assert [p for p, _ in dataset.samples] == paths, "ImageFolder and list_images disagree on the file order"
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
    return MapLoader(dataset, n=len(paths), num_workers=workers, **common)
