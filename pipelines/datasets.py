"""What each dataset is: one table, the single source of every dataset fact the rest of the project uses (names,
class counts, input layout and size, normalisation, backends). The loaders read their constants from here.

Shape letters: b batch, t steps, c channels, h w space.
"""

from dataclasses import dataclass

# Normalisation constants of the reference (docs/training.md §4), as fractions of 255.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)
CIFAR100_MEAN = (129.3 / 255, 124.1 / 255, 112.4 / 255)
CIFAR100_STD = (68.2 / 255, 65.4 / 255, 70.4 / 255)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CIFAR10-DVS frames are raw event counts (no normalisation in the reference); these constants make that explicit.
CIFAR10DVS_MEAN = (0.0, 0.0)
CIFAR10DVS_STD = (1.0, 1.0)
# Mean and std of load_digits().data / 16 over all 1797 images (a test recomputes them).
DIGITS_MEAN = (0.30526028624095713,)
DIGITS_STD = (0.3760492217920148,)


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
    std: tuple[float, ...]
    backends: tuple[str, ...]
    """Loader backends that can serve it (the first is the default when installed)."""


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("cifar10", 10, 3, 32, "image", CIFAR10_MEAN, CIFAR10_STD, ("dali", "torch")),
        DatasetInfo("cifar100", 100, 3, 32, "image", CIFAR100_MEAN, CIFAR100_STD, ("dali", "torch")),
        DatasetInfo("imagenet", 1000, 3, 224, "image", IMAGENET_MEAN, IMAGENET_STD, ("dali", "torch")),
        DatasetInfo("cifar10dvs", 10, 2, 48, "frames", CIFAR10DVS_MEAN, CIFAR10DVS_STD, ("torch",)),
        DatasetInfo("digits", 10, 1, 8, "image", DIGITS_MEAN, DIGITS_STD, ("torch",)),
    )
}
DALI_DATASETS = tuple(name for name, info in DATASETS.items() if "dali" in info.backends)


def dataset_info(name: str) -> DatasetInfo:
    """The table entry of `name`; ValueError naming the choices for an unknown dataset."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


__all__ = ["DALI_DATASETS", "DATASETS", "DatasetInfo", "dataset_info"]
