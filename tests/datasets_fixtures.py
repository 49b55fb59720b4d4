"""Writers of tiny datasets in the real on-disk formats, for tests and benchmarks (nothing is downloaded).

Shape letters: n samples, h w space, c channels.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
from einops import rearrange

from pipelines.cifar10dvs import CLASSES as DVS_CLASSES


def write_cifar(
    root: str,
    name: str,
    images_train: np.ndarray,
    labels_train: np.ndarray,
    images_test: np.ndarray,
    labels_test: np.ndarray,
) -> str:
    """Writes the python-pickle release of CIFAR-10 (5 train batches) or CIFAR-100 under `root`.

    Args:
        root: the torchvision root.
        name: "cifar10" or "cifar100".
        images_train: uint8 `n h w c` (32 x 32 x 3).
        labels_train: ints `n`.
        images_test: uint8 `n h w c`.
        labels_test: ints `n`.

    Returns:
        The folder written.
    """

    def entry(images: np.ndarray, labels: np.ndarray, key: str) -> dict:
        data = rearrange(np.asarray(images, np.uint8), "n h w c -> n (c h w)")
        return {
            b"batch_label": b"fixture",
            key.encode(): [int(v) for v in labels],
            b"data": data,
            b"filenames": [f"{i}.png".encode() for i in range(len(labels))],
        }

    def dump(path: str, obj: dict) -> None:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    if name == "cifar10":
        folder = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(folder, exist_ok=True)
        for i, part in enumerate(np.array_split(np.arange(len(labels_train)), 5), start=1):
            dump(os.path.join(folder, f"data_batch_{i}"), entry(images_train[part], labels_train[part], "labels"))
        dump(os.path.join(folder, "test_batch"), entry(images_test, labels_test, "labels"))
        dump(os.path.join(folder, "batches.meta"), {b"label_names": [f"c{i}".encode() for i in range(10)]})
    else:
        folder = os.path.join(root, "cifar-100-python")
        os.makedirs(folder, exist_ok=True)
        for split, (x, y) in {"train": (images_train, labels_train), "test": (images_test, labels_test)}.items():
            obj = entry(x, y, "fine_labels")
            obj[b"coarse_labels"] = [int(v) // 5 for v in y]
            dump(os.path.join(folder, split), obj)
        dump(os.path.join(folder, "meta"), {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    return folder


def write_imagenet(root: str, *, classes: int, train_per_class: int, val_per_class: int, seed: int = 0) -> None:
    """Writes `root/train/CLASS/*.JPEG` and `root/val/CLASS/*.JPEG` with PIL (random sizes around 64-96 px)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for k in range(classes):
            folder = os.path.join(root, split, f"n{k:08d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                h, w = (int(v) for v in rng.integers(48, 97, size=2))
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"img_{k}_{i}.JPEG"), quality=90)


def write_aedat4(path: str, x: np.ndarray, y: np.ndarray, p: np.ndarray, t: np.ndarray | None = None) -> None:
    """Writes events (tonic's x, y, p convention) to an AEDAT 4.0 file with dv-processing, 128 x 128 sensor."""
    import dv_processing as dv

    n = len(x)
    t = np.arange(n, dtype=np.int64) * 10 + 1_000 if t is None else t
    store = dv.EventStore()
    columns = (t.tolist(), np.asarray(x).tolist(), np.asarray(y).tolist(), np.asarray(p).tolist())
    for ti, xi, yi, pi in zip(*columns, strict=True):
        store.push_back(int(ti), int(xi), int(yi), bool(pi))
    writer = dv.io.MonoCameraWriter(path, dv.io.MonoCameraWriter.EventOnlyConfig("DVS128", (128, 128)))
    if n:
        writer.writeEvents(store)
    del writer  # closing the writer appends the file's data table


def write_cifar10dvs(root: str, *, per_class: int, events: tuple[int, int] = (50, 400), seed: int = 0) -> list[str]:
    """Writes tonic's layout `root/CIFAR10DVS/<class>/cifar10_<class>_<k>.aedat4` with random events.

    Returns:
        The paths written.
    """
    rng = np.random.default_rng(seed)
    paths = []
    for name in DVS_CLASSES:
        folder = os.path.join(root, "CIFAR10DVS", name)
        os.makedirs(folder, exist_ok=True)
        for k in range(per_class):
            n = int(rng.integers(*events))
            path = os.path.join(folder, f"cifar10_{name}_{k}.aedat4")
            write_aedat4(path, rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n))
            paths.append(path)
    return paths
