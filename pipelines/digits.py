"""scikit-learn's bundled handwritten digits: the embedded default dataset (no download, no files).

Shape letters: b batch, c channels (1), h w space (8 x 8), n samples in a split.

1797 grey 8 x 8 images with values 0..16 in 10 classes. A stratified 80/20 split with a fixed seed gives
1437 train / 360 test samples, the same on every machine. Pixels are scaled to [0, 1] and normalised with the
mean and std of all 1797 images; batches are float32 `b 1 8 8` so the CIFAR-style conv nets run on them
unchanged. No augmentation: flips and 4-pixel crops would destroy an 8 x 8 digit.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange

from pipelines._common import ShardedLoader, TensorLoader, check_common, is_train_split
from pipelines.datasets import DATASETS

TEST_FRACTION = 0.2
SPLIT_SEED = 0  # fixed: the split must not move with the training seed
(MEAN,), (STD,) = DATASETS["digits"].mean, DATASETS["digits"].std  # one grey channel


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns the split as (float32 `n 1 8 8` in [0, 1], int64 `n`), stratified and deterministic."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.images, data.target, test_size=TEST_FRACTION, stratify=data.target, random_state=SPLIT_SEED
    )
    x, y = (x_train, y_train) if is_train_split(split) else (x_test, y_test)
    return rearrange(x / 16.0, "n h w -> n 1 h w").astype(np.float32), y.astype(np.int64)


def _normalize(x: torch.Tensor, u: np.ndarray) -> torch.Tensor:
    return (x - MEAN) / STD


def build_digits(
    split: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> ShardedLoader:
    """Builds the digits loader (see `pipelines.build_loader` for the contract).

    Args:
        split: "train" or "test".
        batch_size: per-rank batch size.
        rank: this process's rank.
        world_size: number of processes.
        device: where batches are produced.
        seed: base seed of the per-epoch permutations.

    Returns:
        A loader yielding float32 `b 1 8 8` and int64 `b`.
    """
    check_common(batch_size=batch_size, rank=rank, world_size=world_size)
    x, y = load_digits_split(split)
    return TensorLoader(
        torch.from_numpy(x),
        torch.from_numpy(y),
        transform=_normalize,
        draws=0,
        num_classes=DATASETS["digits"].num_classes,
        train=is_train_split(split),
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        device=device,
    )
