"""What each dataset is: one table, the single source of every dataset fact the rest of the project uses (names,
class counts, input layout and size, normalisation, backends). The loaders read their constants from here.

Shape letters: b batch, t steps, c channels, h w space.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset as the models see it."""

    name: str
    num_classes: int
    """Classes of the standard dataset (an ImageNet folder with fewer class folders reports its own count)."""
    in_channels: int
    input_size: int
    """Side of the square input the model sees."""
    kind: str
    """"image": x is `b c h w` (the model repeats it over t); "frames": x is `b t c h w` (T frames per recording)."""
    mean: tuple[float, ...]
    """Per-channel mean the loaders subtract, as a fraction of 255 (the reference's, docs/training.md §4)."""
    std: tuple[float, ...]
    """Per-channel standard deviation the loaders divide by, as a fraction of 255."""
    backends: tuple[str, ...]
    """Loader backends that can serve it (the first is the default when installed)."""


# CIFAR10-DVS frames are raw event counts (the reference normalises nothing): mean 0 and std 1 say so. digits: the
# mean and std of load_digits().data / 16 over all 1797 images (a test recomputes them).
DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "cifar10",
            10,
            3,
            32,
            "image",
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.247, 0.243, 0.261),
            backends=("dali", "torch"),
        ),
        DatasetInfo(
            "cifar100",
            100,
            3,
            32,
            "image",
            mean=(129.3 / 255, 124.1 / 255, 112.4 / 255),
            std=(68.2 / 255, 65.4 / 255, 70.4 / 255),
            backends=("dali", "torch"),
        ),
        DatasetInfo(
            "imagenet",
            1000,
            3,
            224,
            "image",
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            backends=("dali", "torch"),
        ),
        DatasetInfo("cifar10dvs", 10, 2, 48, "frames", mean=(0.0, 0.0), std=(1.0, 1.0), backends=("torch",)),
        DatasetInfo(
            "digits", 10, 1, 8, "image", mean=(0.30526028624095713,), std=(0.3760492217920148,), backends=("torch",)
        ),
    )
}
DALI_DATASETS = tuple(name for name, info in DATASETS.items() if "dali" in info.backends)


def dataset_info(name: str) -> DatasetInfo:
    """The table entry of `name`; ValueError naming the choices for an unknown dataset."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


__all__ = ["DALI_DATASETS", "DATASETS", "DatasetInfo", "dataset_info"]
