"""Data pipelines on tiny datasets written in the real on-disk formats; DALI runs on CPU (device_id=None).

Shape letters: b batch, c channels, h w space, t steps, n samples.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

import pipelines
from pipelines import cifar, cifar10dvs, digits, imagenet
from pipelines._common import DataError, augment_key, crop_flip, sample_uniforms, shard_indices

sys.path.insert(0, os.path.dirname(__file__))
from conftest import needs, require
from datasets_fixtures import write_aedat4, write_cifar, write_cifar10dvs, write_imagenet

# DALI cases are always collected: skipped where DALI is missing, failing in CI (conftest.needs).
BACKENDS = [pytest.param("dali", marks=needs("nvidia.dali")), "torch"]
dali = needs("nvidia.dali")
cuda = pytest.mark.gpu


# helpers


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(x.cpu(), y.cpu()) for x, y in loader], strict=False)
    return torch.cat(xs), torch.cat(ys)


def denormalize(x: torch.Tensor, mean, std) -> np.ndarray:
    """float32 `b c h w` -> uint8 `b h w c` (exact: the pipelines normalise uint8 data)."""
    m = rearrange(torch.tensor(mean), "c -> c 1 1")
    s = rearrange(torch.tensor(std), "c -> c 1 1")
    u8 = torch.round((x * s + m) * 255)
    assert u8.min() >= 0 and u8.max() <= 255
    return rearrange(u8.to(torch.uint8), "b c h w -> b h w c").numpy()


def colour_ids(n: int) -> np.ndarray:
    """uint8 `n 32 32 3` images of one colour each, unique per index (recoverable after any crop/flip)."""
    ids = np.arange(n)
    rgb = np.stack([ids % 251 + 1, ids // 251 + 1, np.full(n, 200)], axis=1).astype(np.uint8)
    return np.broadcast_to(rgb[:, None, None, :], (n, 32, 32, 3)).copy()


def ids_of(x: torch.Tensor, mean, std) -> np.ndarray:
    # Pixel (16, 16) always comes from inside the unpadded image: crop offsets are at most 4.
    px = denormalize(x, mean, std)[:, 16, 16].astype(np.int64)
    return (px[:, 0] - 1) + 251 * (px[:, 1] - 1)


# fixtures


@pytest.fixture(scope="module")
def cifar_data(tmp_path_factory):
    """Random-pixel CIFAR-10 and CIFAR-100 (for augmentation checks) and colour-id CIFAR-10 (for sharding)."""
    rng = np.random.default_rng(0)
    root = str(tmp_path_factory.mktemp("cifar"))
    xtr = rng.integers(0, 256, (96, 32, 32, 3), dtype=np.uint8)
    ytr = rng.integers(0, 10, 96)
    xte = rng.integers(0, 256, (45, 32, 32, 3), dtype=np.uint8)
    yte = rng.integers(0, 10, 45)
    write_cifar(root, "cifar10", xtr, ytr, xte, yte)
    write_cifar(root, "cifar100", xtr, ytr * 10 + 3, xte, yte * 10 + 3)
    ids_root = str(tmp_path_factory.mktemp("cifar_ids"))
    write_cifar(ids_root, "cifar10", colour_ids(203), np.arange(203) % 10, colour_ids(77), np.arange(77) % 10)
    return {"root": root, "ids_root": ids_root, "train": (xtr, ytr), "test": (xte, yte)}


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagenet"))
    write_imagenet(root, classes=3, train_per_class=4, val_per_class=3)
    return root


@pytest.fixture(scope="module")
def dvs_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dvs"))
    # 12 per class: the lexicographic order 0, 1, 10, 11, 2, ..., 9 makes the split order visible.
    write_cifar10dvs(root, per_class=12, events=(30, 300))
    return root


# contract: shapes, dtypes, labels, counts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_contract(cifar_data, name, backend):
    n_classes = 10 if name == "cifar10" else 100
    train = pipelines.build_loader(name, "train", data_dir=cifar_data["root"], batch_size=20, backend=backend)
    assert (train.num_samples, train.dataset_size, train.num_classes, len(train)) == (80, 96, n_classes, 4)
    batches = list(train)
    assert len(batches) == 4
    for x, y in batches:
        assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (20,) and y.dtype == torch.int64
    test = pipelines.build_loader(name, "test", data_dir=cifar_data["root"], batch_size=20, backend=backend)
    assert (test.num_samples, test.dataset_size, len(test)) == (45, 45, 3)
    x, y = collect(test)
    assert [len(b[1]) for b in test] == [20, 20, 5]
    xte, yte = cifar_data["test"]
    expect_y = yte if name == "cifar10" else yte * 10 + 3
    np.testing.assert_array_equal(y.numpy(), expect_y)
    mean, std = pipelines.DATASETS[name].mean, pipelines.DATASETS[name].std
    # The test split is the plain normalised image, in file order.
    ref = (
        torch.from_numpy(rearrange(xte, "n h w c -> n c h w")).float() / 255
        - rearrange(torch.tensor(mean), "c -> c 1 1")
    ) / rearrange(torch.tensor(std), "c -> c 1 1")
    torch.testing.assert_close(x, ref, atol=2e-5, rtol=0)


def test_normalisation_constants():
    info = pipelines.DATASETS
    assert info["cifar10"].mean == (0.4914, 0.4822, 0.4465) and info["cifar10"].std == (0.247, 0.243, 0.261)
    np.testing.assert_allclose(info["cifar100"].mean, (0.507059, 0.486667, 0.440784), atol=1e-6)
    np.testing.assert_allclose(info["cifar100"].std, (0.267451, 0.256471, 0.276078), atol=1e-6)
    assert info["imagenet"].mean == (0.485, 0.456, 0.406) and info["imagenet"].std == (0.229, 0.224, 0.225)
    from sklearn.datasets import load_digits

    data = load_digits().data / 16.0
    np.testing.assert_allclose((info["digits"].mean, info["digits"].std), ((data.mean(),), (data.std(),)), rtol=1e-12)
    # the loaders normalise with the table's values
    assert (imagenet.MEAN, imagenet.STD) == (info["imagenet"].mean, info["imagenet"].std)
    assert ((digits.MEAN,), (digits.STD,)) == (info["digits"].mean, info["digits"].std)
    assert all(len(i.mean) == len(i.std) == i.in_channels for i in info.values())


@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_imagenet_contract(imagenet_root, backend, split):
    loader = pipelines.build_loader(
        "imagenet", split, data_dir=imagenet_root, batch_size=5, backend=backend, num_workers=0, num_threads=1
    )
    x, y = collect(loader)
    assert loader.num_classes == 3
    if split == "train":
        assert (loader.dataset_size, loader.num_samples, len(loader)) == (12, 10, 2)
        assert x.shape == (10, 3, 224, 224)
    else:
        assert (loader.dataset_size, loader.num_samples, len(loader)) == (9, 9, 2)
        assert x.shape == (9, 3, 224, 224)
        # Validation is in ImageFolder order: classes sorted, 3 files each.
        assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    # Normalised random pixels: roughly zero mean, unit-ish spread, within the normalised [0, 255] range.
    info = pipelines.DATASETS["imagenet"]
    lo = min((0 - m) / s for m, s in zip(info.mean, info.std, strict=True))
    hi = max((1 - m) / s for m, s in zip(info.mean, info.std, strict=True))
    assert lo - 1e-4 <= x.min() and x.max() <= hi + 1e-4 and abs(x.mean()) < 0.5


@dali
def test_imagenet_val_backends_agree(imagenet_root):
    """DALI's resize/crop and torchvision's differ only by interpolation details."""
    a = collect(
        pipelines.build_loader("imagenet", "val", data_dir=imagenet_root, batch_size=4, backend="dali", num_threads=1)
    )
    b = collect(
        pipelines.build_loader("imagenet", "val", data_dir=imagenet_root, batch_size=4, backend="torch", num_workers=0)
    )
    assert torch.equal(a[1], b[1])
    assert (a[0] - b[0]).abs().mean() < 0.15  # random-pixel images: a wrong crop or channel order gives ~1


def test_loader_options_are_the_builders_keywords(tmp_path, monkeypatch):
    """build_loader's dataset-specific keywords are each builder's own keyword-only parameters (read from its
    signature); an unknown one is refused naming them; num_workers and num_threads are accepted everywhere."""
    assert pipelines.builder_options("cifar10dvs") == ("remap", "cache_dir", "cache", "num_workers", "verify")
    assert pipelines.builder_options("imagenet") == ("num_threads", "num_workers", "verify")
    assert pipelines.builder_options("cifar100") == ("num_threads",) and pipelines.builder_options("digits") == ()
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['remap'\] for digits; allowed: \[\]"):
        pipelines.build_loader("digits", "train", data_dir=None, batch_size=8, remap="h1")
    with pytest.raises(ValueError, match=r"\['cache_dri'\] for cifar10dvs; allowed: \['cache', 'cache_dir', "):
        pipelines.build_loader("cifar10dvs", "train", data_dir=tmp_path, batch_size=2, T=4, cache_dri=tmp_path)
    assert (
        len(pipelines.build_loader("digits", "train", data_dir=None, batch_size=100, num_workers=2, num_threads=3))
        == 14
    )

    def fake(split, *, batch_size, rank, world_size, device, seed, flavour="plain"):
        return split, flavour

    monkeypatch.setattr(pipelines, "_builder", lambda dataset: fake)  # a new keyword needs no table entry
    assert pipelines.build_loader("digits", "test", data_dir=None, batch_size=8, flavour="salty", num_workers=2) == (
        "test",
        "salty",
    )
    with pytest.raises(ValueError, match=r"allowed: \['flavour'\]"):
        pipelines.build_loader("digits", "test", data_dir=None, batch_size=8, remap="h1")


def test_digits_contract():
    train = pipelines.build_loader("digits", "train", data_dir=None, batch_size=100)
    test = pipelines.build_loader("digits", "test", data_dir=None, batch_size=100)
    assert (train.dataset_size, test.dataset_size, train.num_classes) == (1437, 360, 10)
    assert (train.num_samples, len(train), test.num_samples, len(test)) == (1400, 14, 360, 4)
    x, y = collect(test)
    assert x.shape == (360, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Stratified: every class has 36 (+-1) test samples; the split is the same on every call.
    assert np.bincount(y.numpy(), minlength=10).min() >= 35
    torch.testing.assert_close(collect(pipelines.build_loader("digits", "test", data_dir=None, batch_size=7))[0], x)
    raw, _ = digits.load_digits_split("test")
    (mean,), (std,) = pipelines.DATASETS["digits"].mean, pipelines.DATASETS["digits"].std
    torch.testing.assert_close(x, (torch.from_numpy(raw) - mean) / std)
    xtr, _ = collect(train)
    assert abs(xtr.mean()) < 0.05 and abs(xtr.std() - 1) < 0.05


def test_cifar10dvs_contract(dvs_root, tmp_path):
    kw = {"data_dir": dvs_root, "batch_size": 8, "T": 4, "num_workers": 0, "cache_dir": str(tmp_path)}
    train = pipelines.build_loader("cifar10dvs", "train", **kw)
    test = pipelines.build_loader("cifar10dvs", "test", **kw)
    # 12 per class: ceil(0.9 * 12) = 11 train, 1 test.
    assert (train.dataset_size, test.dataset_size, train.num_classes) == (110, 10, 10)
    assert (train.num_samples, len(train), test.num_samples, len(test)) == (104, 13, 10, 2)
    for x, y in train:
        assert x.shape == (8, 4, 2, 48, 48) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, y = collect(test)
    assert x.shape == (10, 4, 2, 48, 48) and y.tolist() == list(range(10))
    assert x.min() >= 0 and x.sum() > 0


# augmentation


def _variants(images: np.ndarray, pad: int) -> dict[bytes, tuple[int, int, int, bool]]:
    """Every (crop offset, mirror) of every zero-padded source image, keyed by its bytes."""
    table = {}
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    for i, img in enumerate(padded):
        for oy in range(2 * pad + 1):
            for ox in range(2 * pad + 1):
                win = img[oy : oy + 32, ox : ox + 32]
                table[np.ascontiguousarray(win).tobytes()] = (i, oy, ox, False)
                table[np.ascontiguousarray(win[:, ::-1]).tobytes()] = (i, oy, ox, True)
    return table


@pytest.mark.parametrize("backend", BACKENDS)
def test_cifar_train_is_padded_crop_and_mirror(cifar_data, backend):
    """Each training image is a 32 x 32 window of the zero-padded source (inside the 40 x 40 frame), mirrored or
    not, with the source's label; offsets cover the 9 x 9 grid and both mirror states occur."""
    xtr, ytr = cifar_data["train"]
    table = _variants(xtr, cifar.PAD)
    seen = []
    loader = pipelines.build_loader("cifar10", "train", data_dir=cifar_data["root"], batch_size=32, backend=backend)
    for epoch in range(3):
        loader.set_epoch(epoch)
        for x, y in loader:
            info = pipelines.DATASETS["cifar10"]
            for img, label in zip(denormalize(x, info.mean, info.std), y.tolist(), strict=True):
                hit = table.get(img.tobytes())
                assert hit is not None, "output is not a padded crop (or mirror) of any source image"
                assert ytr[hit[0]] == label
                seen.append(hit)
    offsets = {(oy, ox) for _, oy, ox, _ in seen}
    assert len(offsets) >= 40 and {0, 8} <= {oy for oy, _ in offsets} and {0, 8} <= {ox for _, ox in offsets}
    flips = [f for *_, f in seen]
    assert 0.3 < np.mean(flips) < 0.7


@given(
    b=st.integers(1, 4),
    c=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    pad=st.integers(0, 4),
    data=st.data(),
)
def test_crop_flip_matches_pad_slice_mirror(b, c, h, w, pad, data):
    seed = data.draw(st.integers(0, 2**16))
    x = torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    oy = torch.tensor(data.draw(st.lists(st.integers(0, 2 * pad), min_size=b, max_size=b)))
    ox = torch.tensor(data.draw(st.lists(st.integers(0, 2 * pad), min_size=b, max_size=b)))
    flip = torch.tensor(data.draw(st.lists(st.booleans(), min_size=b, max_size=b)))
    out = crop_flip(x, oy, ox, flip, pad=pad)
    padded = F.pad(x, [pad] * 4)
    for i in range(b):
        ref = padded[i, :, oy[i] : oy[i] + h, ox[i] : ox[i] + w]
        assert torch.equal(out[i], ref.flip(-1) if flip[i] else ref)
    assert out.dtype == torch.uint8
    assert torch.equal(
        crop_flip(x, oy, ox, None, pad=pad), crop_flip(x, oy, ox, torch.zeros(b, dtype=torch.bool), pad=pad)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_is_deterministic_and_epochs_permute(cifar_data, backend):
    kw = {"data_dir": cifar_data["root"], "batch_size": 16, "backend": backend}
    test = pipelines.build_loader("cifar10", "test", **kw)
    a = collect(test)
    test.set_epoch(5)
    b = collect(test)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Training order: a function of (seed, epoch) only.
    train, again = (pipelines.build_loader("cifar10", "train", **kw) for _ in range(2))

    def ids(ld):
        return collect(ld)[1].tolist()

    train.set_epoch(1)
    again.set_epoch(1)
    order1 = ids(train)
    assert order1 == ids(again)
    train.set_epoch(2)
    assert ids(train) != order1


@dali
def test_cifar_backends_agree_on_test(cifar_data):
    kw = {"data_dir": cifar_data["root"], "batch_size": 16}
    a = collect(pipelines.build_loader("cifar100", "test", backend="dali", **kw))
    b = collect(pipelines.build_loader("cifar100", "test", backend="torch", **kw))
    torch.testing.assert_close(a[0], b[0], atol=2e-5, rtol=0)
    assert torch.equal(a[1], b[1])


def test_dali_pipeline_survives_an_abandoned_pass(cifar_data):
    require("nvidia.dali")
    loader = pipelines.build_loader("cifar10", "test", data_dir=cifar_data["ids_root"], batch_size=10, backend="dali")
    full = collect(loader)[1]
    for i, _ in enumerate(loader):
        if i == 2:
            break
    assert torch.equal(collect(loader)[1], full)


def test_auto_backend():
    assert pipelines.resolve_backend("cifar10", "auto") == ("dali" if pipelines.dali_available() else "torch")
    assert pipelines.resolve_backend("digits", "auto") == "torch"
    assert pipelines.resolve_backend("cifar10dvs", "auto") == "torch"


# exact resume: augmentation is a function of (seed, epoch, sample)

# (dataset, backend) of every training pipeline that runs here, and a mid-epoch batch to start from.
IMAGE_RESUME_CASES = [
    pytest.param(d, b, marks=dali) if b == "dali" else (d, b)
    for b in ("dali", "torch")
    for d in ("cifar10", "imagenet")
]
RESUME_CASES = IMAGE_RESUME_CASES + [(d, "torch") for d in ("cifar10dvs", "digits")]


@pytest.fixture
def make_train_loader(cifar_data, imagenet_root, dvs_root, tmp_path):
    roots = {"cifar10": cifar_data["root"], "imagenet": imagenet_root, "cifar10dvs": dvs_root, "digits": None}
    batch = {"cifar10": 16, "imagenet": 3, "cifar10dvs": 8, "digits": 100}

    def make(dataset, backend):
        kw = {"num_threads": 1} if backend == "dali" else {"num_workers": 0}
        if dataset == "cifar10dvs":
            kw.update(T=3, cache_dir=str(tmp_path))
        return pipelines.build_loader(
            dataset, "train", data_dir=roots[dataset], batch_size=batch[dataset], backend=backend, seed=5, **kw
        )

    return make


def run_pass(loader, epoch: int, start_batch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch, start_batch=start_batch)
    return [(x.cpu(), y.cpu()) for x, y in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize(("dataset", "backend"), RESUME_CASES)
def test_mid_epoch_start_yields_the_rest_of_a_full_pass(make_train_loader, dataset, backend):
    """set_epoch(e, start_batch=k) gives batches k.. of epoch e bitwise (images and labels), on a fresh loader (a
    resumed run) and on one that stopped mid-pass; len() stays a full epoch."""
    loader = make_train_loader(dataset, backend)
    full = run_pass(loader, epoch=3)
    k = len(full) // 2
    resumed = make_train_loader(dataset, backend)
    assert_same_batches(run_pass(resumed, epoch=3, start_batch=k), full[k:])
    assert len(resumed) == len(full) > k > 0
    next(iter(loader))  # a pass abandoned after one batch
    assert_same_batches(run_pass(loader, epoch=3, start_batch=k), full[k:])
    assert run_pass(loader, epoch=3, start_batch=len(full)) == []
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(3, start_batch=len(full) + 1)


@pytest.mark.parametrize(("dataset", "backend"), RESUME_CASES)
def test_fresh_loader_equals_one_that_ran_earlier_epochs(make_train_loader, dataset, backend):
    """No state but (seed, epoch) carries over: a loader built after a restart gives epoch 2 bitwise as one that ran
    epochs 0 and 1 first (the old DALI CIFAR pipeline kept one random stream for its lifetime)."""
    ran = make_train_loader(dataset, backend)
    for epoch in (0, 1):
        run_pass(ran, epoch)
    assert_same_batches(run_pass(make_train_loader(dataset, backend), 2), run_pass(ran, 2))


@pytest.mark.parametrize(("dataset", "backend"), RESUME_CASES)
def test_epochs_draw_new_augmentation(make_train_loader, dataset, backend):
    """The same sample is augmented differently in another epoch (digits, which has no augmentation, identically)."""
    loader = make_train_loader(dataset, backend)
    images = []
    for epoch in (0, 1):
        x = torch.cat([x for x, _ in run_pass(loader, epoch)])
        images.append(dict(zip(loader._indices().tolist(), x, strict=True)))
    common = sorted(set(images[0]) & set(images[1]))
    changed = np.mean([not torch.equal(images[0][i], images[1][i]) for i in common])
    assert len(common) > 5 and (changed == 0 if dataset == "digits" else changed > 0.8)


@dali
def test_cifar_backends_agree_on_train(cifar_data):
    """DALI and torch take the same crop offsets and mirrors from the host's draws: the same training batches."""
    a, b = (
        run_pass(
            pipelines.build_loader(
                "cifar10", "train", data_dir=cifar_data["root"], batch_size=16, backend=backend, seed=3
            ),
            epoch=4,
        )
        for backend in ("dali", "torch")
    )
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        torch.testing.assert_close(xa, xb, atol=2e-5, rtol=0)
        assert torch.equal(ya, yb)


def test_sample_uniforms_are_a_pure_function_of_key_and_sample():
    idx = np.arange(20_000)
    u = sample_uniforms(7, idx, 3)
    assert u.dtype == np.float32 and u.shape == (20_000, 3) and 0 <= u.min() and u.max() < 1
    np.testing.assert_array_equal(sample_uniforms(7, idx[::-1][:50], 3), u[::-1][:50])  # any subset, any order
    assert not np.array_equal(sample_uniforms(8, idx, 3), u)
    # Uniform and uncorrelated across columns and neighbouring samples.
    assert np.abs(np.histogram(u, bins=10, range=(0, 1))[0] / u.size - 0.1).max() < 0.005
    assert np.abs(np.corrcoef(np.concatenate([u[:-1], u[1:]], axis=1).T) - np.eye(6)).max() < 0.03


def _imagenet_draws(n: int, key: int = 11):
    fw, fh, uy, ux, mirror = imagenet.rrc_draws(sample_uniforms(key, np.arange(n), imagenet.DRAWS))
    return fw, fh, np.stack([uy, ux], axis=1), mirror


def test_imagenet_crop_window_distribution():
    """rrc_window from our draws has torchvision's RandomResizedCrop(scale=(0.2, 1)) distribution (the oracle, on
    its own RNG): area fraction, aspect ratio and position quantiles agree; the clamped center crop when nothing
    fits; flips half the time."""
    from torchvision.transforms import RandomResizedCrop

    n = 10_000
    fw, fh, uyx, flip = _imagenet_draws(n)
    h, w = np.full(n, 300, np.float32), np.full(n, 400, np.float32)
    ours = np.stack(imagenet.rrc_window(h, w, fw, fh, uyx[:, 0], uyx[:, 1]), axis=1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = np.array(
            [RandomResizedCrop.get_params(torch.empty(3, 300, 400), [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
        )

    def stats(win):  # area fraction, log aspect, relative row and column of the window
        top, left, ch, cw = win.T
        return (ch * cw / 120_000, np.log(cw / ch), top / np.maximum(300 - ch, 1), left / np.maximum(400 - cw, 1))

    q = np.linspace(0.05, 0.95, 19)
    for a, b in zip(stats(ours), stats(ref), strict=True):
        assert np.abs(np.quantile(a, q) - np.quantile(b, q)).max() < 0.03
    top, left, ch, cw = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + ch <= 300).all() and (left + cw <= 400).all()
    assert 0.199 < (ch * cw / 120_000).min() < 0.21 and 0.45 < np.mean(flip) < 0.55
    # Nothing fits a 10 x 500 strip: the whole height, width cut to aspect 4/3, centered.
    top, left, ch, cw = imagenet.rrc_window(np.float32([10]), np.float32([500]), fw[:1], fh[:1], uyx[:1, 0], uyx[:1, 1])
    assert (top[0], left[0], ch[0], cw[0]) == (0, (500 - 13) // 2, 10, 13)


@dali
def test_imagenet_crop_window_dali_equals_numpy():
    """The in-graph window (from the encoded size) equals the numpy one bitwise: ordinary, tiny and extreme
    shapes (the fallback), so both backends crop the same window from the same draws."""
    from nvidia.dali import fn, pipeline_def, types

    n = 600
    rng = np.random.default_rng(0)
    hw = np.concatenate(
        [
            rng.integers(1, 4000, (n // 3, 2)),
            rng.integers(1, 12, (n // 3, 2)),
            np.stack([rng.integers(1, 30, n // 3), rng.integers(100, 3000, n // 3)], axis=1)[:, ::-1],
        ]
    )
    hw = np.where(rng.random((n, 1)) < 0.5, hw, hw[:, ::-1]).astype(np.float32)
    fw, fh, uyx, _ = _imagenet_draws(n)
    shape = np.concatenate([hw, np.full((n, 1), 3, np.float32)], axis=1)

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def windows():
        inputs = fn.external_source(
            source=lambda: (shape, fw, fh, uyx), num_outputs=4, batch=True, dtype=[types.FLOAT] * 4
        )
        return imagenet.dali_rrc_window(*inputs)

    pipe = windows()
    pipe.build()
    start, size = (out.as_array() for out in pipe.run())
    top, left, ch, cw = imagenet.rrc_window(hw[:, 0], hw[:, 1], fw, fh, uyx[:, 0], uyx[:, 1])
    np.testing.assert_array_equal(start, np.stack([top, left], axis=1))
    np.testing.assert_array_equal(size, np.stack([ch, cw], axis=1))
    fallback = (ch == hw[:, 0]) | (cw == hw[:, 1])
    assert 50 < fallback.sum() < n - 50


def test_imagenet_torch_train_applies_the_window(imagenet_root):
    """Each torch training image is the resized crop of its window from sample_uniforms(key, index), then mirrored
    when the flip draw says so."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    loader = pipelines.build_loader(
        "imagenet", "train", data_dir=imagenet_root, batch_size=3, backend="torch", num_workers=0, seed=2
    )
    x = torch.cat([x for x, _ in run_pass(loader, epoch=1)])
    idx = loader._indices()
    u = sample_uniforms(augment_key(2, 1), idx, imagenet.DRAWS)
    for out, i, ui in zip(x, idx, u, strict=True):
        img = Image.open(loader.dataset.paths[i]).convert("RGB")
        top, left, h, w = (
            int(a[0])
            for a in imagenet.rrc_window(
                np.float32([img.height]), np.float32([img.width]), *imagenet.rrc_factors(ui[None]), ui[-3:-2], ui[-2:-1]
            )
        )
        ref = TF.resized_crop(img, top, left, h, w, [224, 224], InterpolationMode.BILINEAR, antialias=True)
        ref = TF.normalize(
            TF.to_tensor(TF.hflip(ref) if ui[-1] < 0.5 else ref),
            pipelines.DATASETS["imagenet"].mean,
            pipelines.DATASETS["imagenet"].std,
        )
        assert torch.equal(out, ref)


@dali
def test_imagenet_train_backends_agree(imagenet_root):
    """DALI crops and mirrors the same windows as the torch backend; only resampling details differ (a window off by
    a pixel or a wrong mirror gives ~0.7 on these random-pixel images)."""
    a, b = (
        run_pass(
            pipelines.build_loader(
                "imagenet",
                "train",
                data_dir=imagenet_root,
                batch_size=5,
                backend=backend,
                num_threads=1,
                num_workers=0,
                seed=4,
            ),
            epoch=2,
        )
        for backend in ("dali", "torch")
    )
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(ya, yb)
        assert (xa - xb).abs().mean(dim=(1, 2, 3)).max() < 0.02


# sharding


@given(n=st.integers(1, 300), world=st.integers(1, 5), batch_fraction=st.floats(0, 1), epoch=st.integers(0, 3))
def test_shard_indices(n, world, batch_fraction, epoch):
    # A batch no larger than a rank's share, so that the training shards are never all empty.
    batch = max(1, round(batch_fraction * (n // world))) if n >= world else 1
    train = [
        shard_indices(n, train=True, batch_size=batch, rank=r, world_size=world, seed=3, epoch=epoch)
        for r in range(world)
    ]
    per = (n // world) // batch * batch
    assert all(len(s) == per for s in train)
    flat = np.concatenate(train)
    assert len(np.unique(flat)) == len(flat) and (flat < n).all()  # disjoint; drops < world * batch samples
    assert n - len(flat) <= world * batch - 1  # drop-last: n mod world, plus each rank's partial batch
    test = [
        shard_indices(n, train=False, batch_size=batch, rank=r, world_size=world, seed=3, epoch=epoch)
        for r in range(world)
    ]
    np.testing.assert_array_equal(np.concatenate(test), np.arange(n))  # exactly once, in order
    assert max(map(len, test)) - min(map(len, test)) <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_cover_cifar_exactly_once(cifar_data, backend):
    """Training: the ranks' samples are disjoint, the same count each, whole batches; 203 // 2 = 101 per rank,
    floor(101 / 16) * 16 = 96, so 203 - 192 = 11 samples are dropped per epoch. Test: every id exactly once."""
    norm = pipelines.DATASETS["cifar10"].mean, pipelines.DATASETS["cifar10"].std
    kw = {"data_dir": cifar_data["ids_root"], "batch_size": 16, "backend": backend, "world_size": 2, "seed": 7}
    for epoch in (0, 1):
        shards = []
        for rank in (0, 1):
            loader = pipelines.build_loader("cifar10", "train", rank=rank, **kw)
            loader.set_epoch(epoch)
            x, y = collect(loader)
            ids = ids_of(x, *norm)
            np.testing.assert_array_equal(ids % 10, y.numpy())
            assert loader.num_samples == len(ids) == 96
            shards.append(ids)
        assert not set(shards[0]) & set(shards[1]) and len(set(shards[0])) == 96
    test_ids = []
    for rank in (0, 1):
        loader = pipelines.build_loader("cifar10", "test", rank=rank, **kw)
        test_ids.append(ids_of(collect(loader)[0], *norm))
        assert loader.num_samples == len(test_ids[-1])
    assert sorted(np.concatenate(test_ids).tolist()) == list(range(77))


@pytest.mark.parametrize("dataset", ["imagenet", "cifar10dvs", "digits"])
def test_two_rank_validation_equals_one_rank(dataset, imagenet_root, dvs_root, tmp_path):
    """Concatenating rank 0 and rank 1 of the test split reproduces the single-process pass exactly."""
    roots = {"imagenet": imagenet_root, "cifar10dvs": dvs_root, "digits": None}
    kw = {"data_dir": roots[dataset], "batch_size": 4, "T": 3, "num_workers": 0}
    if dataset == "cifar10dvs":
        kw["cache_dir"] = str(tmp_path)
    if dataset == "imagenet" and pipelines.dali_available():
        kw["num_threads"] = 1
    whole = collect(pipelines.build_loader(dataset, "test", **kw))
    parts = [pipelines.build_loader(dataset, "test", rank=r, world_size=2, **kw) for r in (0, 1)]
    assert sum(p.num_samples for p in parts) == parts[0].dataset_size == len(whole[1])
    x, y = (torch.cat(t) for t in zip(*(collect(p) for p in parts), strict=True))
    torch.testing.assert_close(x, whole[0])
    assert torch.equal(y, whole[1])


# CIFAR10-DVS frames


def _sj_reference(x_raw, y_raw, p_raw, T):
    """SpikingJelly 0.0.0.0.10, written from its formulas: remap of the raw address fields, then count binning."""
    xs, ys, ps = 127 - y_raw, 127 - x_raw, 1 - p_raw
    n = len(xs)
    d = n // T
    out = np.zeros((T, 2, 128, 128), np.float64)
    for j in range(T):
        lo, hi = j * d, ((j + 1) * d if j < T - 1 else n)
        np.add.at(out[j], (ps[lo:hi], ys[lo:hi], xs[lo:hi]), 1)
    return out


def _glyph_events(rng):
    """An "F" in raw DVS128 address space: ON on the stem, OFF on the bars, with a remainder for T = 4."""
    stem = [(20, y, 0) for y in range(10, 60)]
    bars = [(x, 10, 1) for x in range(21, 50)] + [(x, 33, 1) for x in range(21, 40)]
    ev = np.array(stem + bars + stem[:5], dtype=np.int64)  # 103 events: 103 mod 4 = 3
    ev = ev[rng.permutation(len(ev))]
    return ev[:, 0], ev[:, 1], ev[:, 2]


def test_glyph_lands_where_the_reference_puts_it(tmp_path):
    """Raw events -> .aedat4 in DV's convention under H1 -> our loader with remap="h1" == the reference frames."""
    x_raw, y_raw, p_raw = _glyph_events(np.random.default_rng(1))
    root = tmp_path / "d"
    folder = root / "CIFAR10DVS" / "airplane"
    folder.mkdir(parents=True)
    write_aedat4(str(folder / "cifar10_airplane_0.aedat4"), 127 - x_raw, 127 - y_raw, 1 - p_raw)  # H1 forward map
    frames = {}
    for remap in cifar10dvs.REMAPS:
        ds = cifar10dvs.DVSFrames(
            [str(folder / "cifar10_airplane_0.aedat4")], [0], data_dir=str(root), T=4, remap=remap, cache_dir=None
        )
        frames[remap] = ds.frames(0)
    ref = _sj_reference(x_raw, y_raw, p_raw, 4)
    np.testing.assert_array_equal(frames["h1"], ref)
    assert ref[:, 1].sum() == 55 and ref[:, 0].sum() == 48  # the stem (p_raw = 0) became p' = 1 (ON)
    # The reference puts the stem (raw column 20) on row 127 - 20 = 107: a horizontal stroke.
    assert ref[:, 1, 107, 127 - 59 : 127 - 9].sum() == 55
    # Every other map gives a different picture, so a transpose, flip or polarity slip cannot pass.
    flat = [f.tobytes() for f in frames.values()]
    assert len(set(flat)) == len(flat)


@given(n=st.integers(0, 400), T=st.integers(1, 12), seed=st.integers(0, 1000))
def test_equal_count_binning(n, T, seed):
    rng = np.random.default_rng(seed)
    x, y, p = rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n)
    frames = cifar10dvs.events_to_frames(x, y, p, T)
    per = frames.sum(axis=(1, 2, 3))
    assert frames.shape == (T, 2, 128, 128) and per.sum() == n
    d = n // T
    expect = [d] * (T - 1) + [n - d * (T - 1)]  # equal counts, the remainder (or all of n < T) in the last
    assert per.tolist() == expect
    np.testing.assert_array_equal(frames, _sj_reference(127 - y, 127 - x, 1 - p, T))  # identity remap


def test_binning_vs_tonic_toframe():
    """Frames 0..T-2 equal tonic's ToFrame(n_event_bins=T); the last adds the N mod T events ToFrame drops."""
    from tonic.transforms import ToFrame

    rng = np.random.default_rng(0)
    n, T = 1003, 10
    ev = np.zeros(n, dtype=[("t", np.uint64), ("x", np.uint16), ("y", np.uint16), ("p", bool)])
    ev["t"] = np.arange(n) * 5
    ev["x"], ev["y"], ev["p"] = rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n)
    ours = cifar10dvs.events_to_frames(*cifar10dvs.remap_events(ev["x"], ev["y"], ev["p"], "none"), T)
    tonic_frames = ToFrame(sensor_size=(128, 128, 2), n_event_bins=T)(ev)
    np.testing.assert_array_equal(ours[:-1], tonic_frames[:-1])
    tail = cifar10dvs.events_to_frames(ev["x"][900:], ev["y"][900:], ev["p"][900:].astype(int), 1)[0]
    np.testing.assert_array_equal(ours[-1], tail)
    assert ours[-1].sum() == tonic_frames[-1].sum() + 3


def test_binning_matches_spikingjelly(monkeypatch):
    """Oracle: SpikingJelly 2.0.0's integrate_events_by_fixed_frames_number (same rule as 0.0.0.0.10)."""
    spikingjelly = require("spikingjelly")
    # Import datasets/utils.py without datasets/__init__.py, which needs torchaudio for an unrelated dataset.
    pkg = types.ModuleType("spikingjelly.datasets")
    pkg.__path__ = [os.path.join(os.path.dirname(spikingjelly.__file__), "datasets")]
    monkeypatch.setitem(sys.modules, "spikingjelly.datasets", pkg)
    monkeypatch.delitem(sys.modules, "spikingjelly.datasets.utils", raising=False)
    sj = importlib.import_module("spikingjelly.datasets.utils")
    rng = np.random.default_rng(2)
    for n, T in ((1003, 10), (7, 16), (5000, 16)):
        ev = {"t": np.arange(n), "x": rng.integers(0, 128, n), "y": rng.integers(0, 128, n), "p": rng.integers(0, 2, n)}
        ref = sj.integrate_events_by_fixed_frames_number(ev, "number", T, 128, 128)
        np.testing.assert_array_equal(cifar10dvs.events_to_frames(ev["x"], ev["y"], ev["p"], T), ref)


def test_resize_matches_torchvision():
    from torchvision.transforms import Resize

    x = torch.rand(3, 2, 128, 128) * 5
    torch.testing.assert_close(cifar10dvs.resize(x), Resize([48, 48], antialias=False)(x))


def test_dvs_split_order_and_cache(dvs_root, tmp_path, monkeypatch):
    paths, labels = cifar10dvs.list_recordings(dvs_root)
    test = cifar10dvs.split_indices(labels, train=False)
    # Lexicographic order 0, 1, 10, 11, 2, ..., 9: the test sample of each class is file 9.
    assert [os.path.basename(paths[i]) for i in test] == [f"cifar10_{c}_9.aedat4" for c in cifar10dvs.CLASSES]
    assert len(cifar10dvs.split_indices(labels, train=True)) == 110
    kw = {"data_dir": dvs_root, "batch_size": 5, "T": 3, "num_workers": 0, "cache_dir": str(tmp_path)}
    first = collect(pipelines.build_loader("cifar10dvs", "test", **kw))
    cached = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.npz"))
    folder = cifar10dvs.cache_folder(cifar10dvs.frame_key(3, "h1"))
    assert len(cached) == 10 and all(p.startswith(f"{folder}/") for p in cached) and folder.startswith("frames_T3_")
    # The cache is used: with event decoding disabled the same batches still come out.
    monkeypatch.setattr(cifar10dvs.DVSFrames, "events", lambda self, i: pytest.fail("decoded events again"))
    again = collect(pipelines.build_loader("cifar10dvs", "test", **kw))
    torch.testing.assert_close(again[0], first[0])


def test_frame_cache_is_keyed_by_everything_that_shapes_a_frame(dvs_root, tmp_path, monkeypatch):
    """Another T, orientation, binning rule, sensor side or entry format is another cache (every recording decoded
    again, the frames those settings give); the same key reuses it (nothing decoded); a replaced recording is
    decoded again; what runs after the cache (the resize) reuses it; a folder holding another key is refused."""
    root = tmp_path / "data"
    shutil.copytree(dvs_root, root)
    decoded = []
    events = cifar10dvs.DVSFrames.events
    monkeypatch.setattr(cifar10dvs.DVSFrames, "events", lambda self, i: decoded.append(i) or events(self, i))
    kw = {"data_dir": str(root), "batch_size": 10, "T": 3, "num_workers": 0, "cache_dir": str(tmp_path / "c")}

    def frames(**changes) -> tuple[torch.Tensor, int, set[str]]:
        decoded.clear()
        ds = pipelines.build_loader("cifar10dvs", "test", **{**kw, **changes}).dataset
        x = torch.stack([torch.from_numpy(ds.frames(i)) for i in range(len(ds))])
        return x, len(decoded), {p.name for p in (tmp_path / "c").iterdir()}

    base, n, folders = frames()
    assert n == 10 and len(folders) == 1
    key = json.loads((tmp_path / "c" / folders.pop() / "key.json").read_text())
    assert key == {"version": cifar10dvs.CACHE_VERSION, "binning": "number", "T": 3, "sensor": 128, "remap": "h1"}
    again, n, _ = frames()
    assert n == 0 and torch.equal(again, base)
    other_T, n, _ = frames(T=4)
    assert n == 10 and other_T.shape[1] == 4 and torch.equal(other_T.sum(1), base.sum(1))
    other_map, n, _ = frames(remap="none")
    assert n == 10 and torch.equal(other_map, base.transpose(-1, -2))  # h1 is the transpose of tonic's map
    for name, value in (("BINNING", "time"), ("CACHE_VERSION", 99), ("SENSOR", 130)):
        with monkeypatch.context() as m:
            m.setattr(cifar10dvs, name, value)
            rebuilt, n, folders = frames()
        assert n == 10, name
        assert rebuilt.shape[-1] == 130 if name == "SENSOR" else torch.equal(rebuilt, base)
    assert len(folders) == 6  # base, T, remap, binning, version, sensor
    # The resize runs on every read: the cached counts serve it without decoding.
    decoded.clear()
    ds = pipelines.build_loader("cifar10dvs", "test", **kw).dataset
    ds.resize_to_48 = False
    assert torch.equal(ds[0][0], base[0].float()) and not decoded
    # A recording replaced by another (of another size) is decoded again; the others are not.
    path = root / "CIFAR10DVS" / "bird" / "cifar10_bird_9.aedat4"
    write_aedat4(str(path), np.arange(500) % 128, np.arange(500) // 4, np.arange(500) % 2)
    replaced, n, _ = frames()
    assert n == 1 and replaced[2].sum() == 500 and torch.equal(replaced[3:], base[3:])
    # A folder whose key.json holds another key is refused, not reused.
    folder = tmp_path / "c" / cifar10dvs.cache_folder(cifar10dvs.frame_key(3, "h1"))
    (folder / "key.json").write_text(json.dumps({**key, "T": 5}))
    with pytest.raises(DataError, match="holds frames for .*'T': 5.*delete the folder"):
        frames()


def test_dvs_train_crop_is_shared_over_time_and_polarity(dvs_root, tmp_path):
    """Each sample is one 48 x 48 window of the zero-padded frames for all steps and polarities; the offsets cover
    the 9 x 9 grid."""
    kw = {"data_dir": dvs_root, "batch_size": 8, "T": 3, "num_workers": 0, "cache_dir": str(tmp_path)}
    loader = pipelines.build_loader("cifar10dvs", "train", **kw)
    ds = loader.dataset
    offsets = []
    for epoch in (0, 1):
        x, y = collect(run_pass(loader, epoch))
        for out, i, label in zip(x, loader._indices(), y.tolist(), strict=True):
            full, k = ds[int(i)]
            assert k == label
            padded = F.pad(full, [cifar10dvs.PAD] * 4)
            hits = [
                (oy, ox)
                for oy in range(9)
                for ox in range(9)
                if torch.equal(padded[..., oy : oy + 48, ox : ox + 48], out)
            ]
            assert hits, "not a single window shared by all steps and polarities"
            offsets.append(hits[0])
    assert len(set(offsets)) >= 60 and {oy for oy, _ in offsets} == {ox for _, ox in offsets} == set(range(9))


# bad input


def test_bad_arguments(cifar_data):
    with pytest.raises(ValueError, match="unknown dataset"):
        pipelines.build_loader("mnist", "train", data_dir=".", batch_size=4)
    for bs in (0, -3, 2.5):
        with pytest.raises(ValueError, match="batch_size"):
            pipelines.build_loader("digits", "train", data_dir=None, batch_size=bs)
    with pytest.raises(ValueError, match="rank"):
        pipelines.build_loader("digits", "train", data_dir=None, batch_size=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="split"):
        pipelines.build_loader("digits", "validation", data_dir=None, batch_size=4)
    with pytest.raises(ValueError, match="backend"):
        pipelines.build_loader("digits", "train", data_dir=None, batch_size=4, backend="jax")
    with pytest.raises(ValueError, match="no DALI pipeline"):
        pipelines.build_loader("digits", "train", data_dir=None, batch_size=4, backend="dali")
    with pytest.raises(ValueError, match="T as a positive int"):
        pipelines.build_loader("cifar10dvs", "train", data_dir=".", batch_size=4)
    with pytest.raises(ValueError, match="no full batch"):
        pipelines.build_loader("cifar10", "train", data_dir=cifar_data["root"], batch_size=97, backend="torch")


def test_missing_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*download=True"):
        pipelines.build_loader("cifar10", "train", data_dir=tmp_path, batch_size=4)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        pipelines.build_loader("cifar100", "test", data_dir=tmp_path, batch_size=4)
    with pytest.raises(FileNotFoundError, match=r"val.*CLASS/\*\.JPEG"):
        pipelines.build_loader("imagenet", "val", data_dir=tmp_path, batch_size=4)
    with pytest.raises(FileNotFoundError, match=r"CIFAR10DVS.*<class>/\*\.aedat4"):
        pipelines.build_loader("cifar10dvs", "test", data_dir=tmp_path, batch_size=4, T=4)
    (tmp_path / "CIFAR10DVS" / "airplane").mkdir(parents=True)
    (tmp_path / "CIFAR10DVS" / "airplane" / "cifar10_airplane_0.aedat4").touch()
    with pytest.raises(FileNotFoundError, match="automobile"):
        pipelines.build_loader("cifar10dvs", "test", data_dir=tmp_path, batch_size=4, T=4)


def test_corrupt_pickle(cifar_data, tmp_path):
    xtr, ytr = cifar_data["train"]
    folder = write_cifar(str(tmp_path), "cifar10", xtr, ytr, *cifar_data["test"])
    with open(os.path.join(folder, "data_batch_3"), "r+b") as f:
        f.truncate(200)
    with pytest.raises(DataError, match="data_batch_3.*corrupt or truncated"):
        pipelines.build_loader("cifar10", "train", data_dir=tmp_path, batch_size=4)
    os.remove(os.path.join(folder, "test_batch"))
    with pytest.raises(FileNotFoundError, match="test_batch"):
        pipelines.build_loader("cifar10", "test", data_dir=tmp_path, batch_size=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreadable_jpeg(tmp_path, backend):
    write_imagenet(str(tmp_path), classes=2, train_per_class=2, val_per_class=2)
    bad = tmp_path / "val" / "n00000001" / "img_1_0.JPEG"
    bad.write_bytes(b"<html>not an image</html>")
    with pytest.raises(DataError, match="img_1_0.JPEG.*not a JPEG"):
        pipelines.build_loader("imagenet", "val", data_dir=tmp_path, batch_size=2, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_jpeg_named_at_decode(tmp_path, backend):
    """A JPEG whose header survives but whose data does not is caught when decoded, and the file is named."""
    write_imagenet(str(tmp_path), classes=1, train_per_class=1, val_per_class=5)
    path = tmp_path / "val" / "n00000000" / "img_0_3.JPEG"
    path.write_bytes(path.read_bytes()[:40])
    loader = pipelines.build_loader(
        "imagenet", "val", data_dir=tmp_path, batch_size=2, backend=backend, num_workers=0, num_threads=1
    )
    with pytest.raises(DataError, match="img_0_3.JPEG"):
        collect(loader)


@pytest.mark.parametrize("case", ["width", "float", "int64", "short_labels", "label_10", "label_neg"])
def test_malformed_cifar_batch(cifar_data, tmp_path, case):
    """A pickle batch that is not uint8 `n 3072` with n labels in [0, 10) is a DataError naming the file (a cast
    to uint8 would silently wrap int64 or float pixels)."""
    import pickle

    folder = write_cifar(str(tmp_path), "cifar10", *cifar_data["train"], *cifar_data["test"])
    path = os.path.join(folder, "data_batch_2")
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    data, labels = entry[b"data"], entry[b"labels"]
    entry.update(
        {
            "width": {b"data": data[:, :-1]},
            "float": {b"data": data.astype(np.float32)},
            "int64": {b"data": data.astype(np.int64)},
            "short_labels": {b"labels": labels[:-1]},
            "label_10": {b"labels": labels[:-1] + [10]},
            "label_neg": {b"labels": [-1] + labels[1:]},
        }[case]
    )
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    with pytest.raises(DataError, match="data_batch_2"):
        pipelines.build_loader("cifar10", "train", data_dir=tmp_path, batch_size=4)


def test_missing_data_is_a_data_error_and_file_not_found(tmp_path):
    """One `except DataError` covers missing data too, while FileNotFoundError still works as before."""
    for dataset in ("cifar10", "imagenet"):
        with pytest.raises(DataError) as info:
            pipelines.build_loader(dataset, "test", data_dir=tmp_path, batch_size=4)
        assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_imagenet_class_folder(tmp_path, backend):
    write_imagenet(str(tmp_path), classes=3, train_per_class=2, val_per_class=1)
    for path in (tmp_path / "train" / "n00000001").iterdir():
        path.unlink()
    with pytest.raises(DataError, match=r"n00000001.*no \.jpeg"):
        pipelines.build_loader("imagenet", "train", data_dir=tmp_path, batch_size=2, backend=backend)


def test_empty_dvs_class_folder(tmp_path):
    write_cifar10dvs(str(tmp_path), per_class=1)
    for path in (tmp_path / "CIFAR10DVS" / "dog").iterdir():
        path.unlink()
    with pytest.raises(DataError, match=r"dog.*no \.aedat4"):
        pipelines.build_loader("cifar10dvs", "train", data_dir=tmp_path, batch_size=2, T=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_byte_jpeg(tmp_path, backend):
    """Caught by the up-front check, and without it (verify=False, as for the full train split) when decoded."""
    write_imagenet(str(tmp_path), classes=2, train_per_class=3, val_per_class=3)
    (tmp_path / "val" / "n00000001" / "img_1_1.JPEG").write_bytes(b"")
    kw = {"data_dir": tmp_path, "batch_size": 2, "backend": backend, "num_workers": 0, "num_threads": 1}
    with pytest.raises(DataError, match="img_1_1.JPEG.*empty"):
        pipelines.build_loader("imagenet", "val", **kw)
    (tmp_path / "train" / "n00000000" / "img_0_2.JPEG").write_bytes(b"")
    loader = pipelines.build_loader("imagenet", "train", verify=False, **kw)
    with pytest.raises(DataError, match="img_0_2.JPEG"):
        collect(loader)


def test_zero_event_recording(tmp_path):
    """An empty recording is named when the files are checked, and (verify=False) when its events are read."""
    write_cifar10dvs(str(tmp_path), per_class=2)
    write_aedat4(str(tmp_path / "CIFAR10DVS" / "cat" / "cifar10_cat_0.aedat4"), *(np.zeros(0, np.int64),) * 3)
    kw = {"data_dir": tmp_path, "batch_size": 2, "T": 4, "num_workers": 0, "cache_dir": str(tmp_path / "c")}
    with pytest.raises(DataError, match="cifar10_cat_0.aedat4' holds no events"):
        pipelines.build_loader("cifar10dvs", "train", **kw)
    with pytest.raises(DataError, match="cifar10_cat_0.aedat4' holds no events"):
        collect(pipelines.build_loader("cifar10dvs", "train", verify=False, **kw))


def _damage(path, how: str) -> None:
    import zipfile

    data = path.read_bytes()
    mid = len(data) // 2
    if how == "truncated":
        path.write_bytes(data[:mid])
    elif how == "zeroed":  # a run of bytes inside the compressed member
        path.write_bytes(data[: mid - 16] + bytes(32) + data[mid + 16 :])
    elif how == "bad_crc":  # an uncompressed copy with one pixel changed: only the CRC-32 can tell
        with zipfile.ZipFile(path) as z:
            member = z.read("frames.npy")
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
            z.writestr("frames.npy", member)
        data = path.read_bytes()
        path.write_bytes(data[:mid] + bytes([data[mid] ^ 1]) + data[mid + 1 :])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif how == "other_T":  # a well-formed entry of another shape (e.g. copied from another cache folder)
        cifar10dvs._save_frames(str(path), np.zeros((5, 2, 128, 128), np.int32), source="test")
    else:  # another array name
        np.savez(path, counts=np.zeros((3, 2, 128, 128), np.uint8))


@pytest.mark.parametrize("how", ["truncated", "zeroed", "bad_crc", "empty", "garbage", "other_T", "other_key"])
def test_damaged_frame_cache_entry_is_rebuilt(dvs_root, tmp_path, how):
    kw = {"data_dir": dvs_root, "batch_size": 5, "T": 3, "num_workers": 0, "cache_dir": str(tmp_path)}
    first = collect(pipelines.build_loader("cifar10dvs", "test", **kw))
    entry = next(tmp_path.rglob("cifar10_dog_9-*.npz"))
    _damage(entry, how)
    with pytest.warns(UserWarning, match=r"cifar10_dog_9-\d+\.npz.*damaged.*rebuilding"):
        again = collect(pipelines.build_loader("cifar10dvs", "test", **kw))
    assert torch.equal(again[0], first[0])
    assert cifar10dvs.load_frames(str(entry), 3).sum() > 0  # rewritten whole


def test_frame_cache_write_is_atomic(tmp_path, monkeypatch):
    """A writer that dies mid-entry leaves the previous entry (or none) and no temporary file."""
    path = tmp_path / "a" / "x.npz"
    good = np.ones((3, 2, 128, 128), np.int32)
    cifar10dvs._save_frames(str(path), good, source="x")

    def dies(f, array, **kw):
        f.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np.lib.format, "write_array", dies)
    with pytest.raises(KeyboardInterrupt):
        cifar10dvs._save_frames(str(path), good * 2, source="x")
    with pytest.raises(KeyboardInterrupt):
        cifar10dvs._save_frames(str(tmp_path / "a" / "y.npz"), good, source="y")
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.npz"]
    np.testing.assert_array_equal(cifar10dvs.load_frames(str(path), 3), good)


@pytest.mark.parametrize("cut", [0.6, 0.97])
def test_truncated_aedat4(tmp_path, cut):
    root = tmp_path / "d"
    write_cifar10dvs(str(root), per_class=2, events=(2000, 2001))
    path = root / "CIFAR10DVS" / "dog" / "cifar10_dog_1.aedat4"
    data = path.read_bytes()
    path.write_bytes(data[: math.floor(len(data) * cut)])
    with pytest.raises(DataError, match="cifar10_dog_1.aedat4.*re-extract"):
        pipelines.build_loader("cifar10dvs", "train", data_dir=root, batch_size=2, T=4)
    # Without the up-front check, the decode error still names the file.
    ds = cifar10dvs.DVSFrames([str(path)], [5], data_dir=str(root), T=4, remap="h1", cache_dir=None)
    with pytest.raises(DataError, match="cifar10_dog_1.aedat4"):
        ds.frames(0)


# GPU (skipped without CUDA)


@cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_cifar_on_cuda_matches_cpu(cifar_data, backend):
    kw = {"data_dir": cifar_data["root"], "batch_size": 16, "backend": backend}
    gpu = pipelines.build_loader("cifar10", "test", device="cuda", **kw)
    x, y = next(iter(gpu))
    assert x.is_cuda and y.is_cuda
    cpu = collect(pipelines.build_loader("cifar10", "test", device="cpu", **kw))
    torch.testing.assert_close(collect(gpu)[0], cpu[0], atol=2e-5, rtol=0)
    train = pipelines.build_loader("cifar10", "train", device="cuda", **kw)
    table = _variants(cifar_data["train"][0], cifar.PAD)
    for x, _ in train:
        info = pipelines.DATASETS["cifar10"]
        assert all(img.tobytes() in table for img in denormalize(x.cpu(), info.mean, info.std))


@cuda
@dali
def test_imagenet_mixed_decode_on_cuda(imagenet_root):
    loader = pipelines.build_loader(
        "imagenet", "val", data_dir=imagenet_root, batch_size=4, device="cuda", backend="dali"
    )
    x, y = collect(loader)
    assert x.shape == (9, 3, 224, 224) and y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    ref = collect(pipelines.build_loader("imagenet", "val", data_dir=imagenet_root, batch_size=4, backend="dali"))
    assert (x - ref[0]).abs().mean() < 0.05  # nvJPEG vs libjpeg-turbo: small decoder differences only


@cuda
@pytest.mark.parametrize(("dataset", "backend"), IMAGE_RESUME_CASES)  # the GPU pipelines
def test_resume_on_cuda(cifar_data, imagenet_root, dataset, backend):
    """On the GPU too: a mid-epoch start is the suffix of a full pass (bitwise), and the training batches follow
    the CPU pipeline's choices (the same draws; only decoding and resampling details may differ)."""
    kw = {
        "data_dir": cifar_data["root"] if dataset == "cifar10" else imagenet_root,
        "backend": backend,
        "batch_size": 16 if dataset == "cifar10" else 3,
        "seed": 5,
        "num_workers": 0,
    }
    gpu = pipelines.build_loader(dataset, "train", device="cuda", **kw)
    full = run_pass(gpu, epoch=2)
    assert_same_batches(
        run_pass(pipelines.build_loader(dataset, "train", device="cuda", **kw), 2, start_batch=2), full[2:]
    )
    cpu = run_pass(pipelines.build_loader(dataset, "train", **kw), epoch=2)
    for (xg, yg), (xc, yc) in zip(full, cpu, strict=True):
        assert torch.equal(yg, yc)
        assert (xg - xc).abs().mean() < (2e-5 if dataset == "cifar10" else 0.05)
