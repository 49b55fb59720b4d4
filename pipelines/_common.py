"""Loader plumbing shared by every dataset: rank shards, per-epoch permutations, augmentation draws, batched crop/flip.

Shape letters: b batch, c channels, h w space, t steps, n samples in a split, k draws per sample.

Sharding rules (the contract of `pipelines.build_loader`):
- train: a permutation of the whole split drawn from (seed, epoch), identical on every rank; rank r takes every
  `world_size`-th index starting at r, trimmed to whole batches, so shards are disjoint and batch shapes static.
  Per epoch at most `world_size * batch_size - 1` samples are left out (and a different few each epoch).
- test: no shuffling; the split is cut into `world_size` contiguous blocks (sizes differ by at most one) and the
  last batch of a rank may be partial, so every sample is counted exactly once over all ranks.

Augmentation state: none is carried from batch to batch or epoch to epoch. Every random choice of sample i in epoch e
(crop offsets, flips, resized-crop windows) is computed from `sample_uniforms(augment_key(seed, e), i, k)`, a pure
function of (seed, epoch, sample index), on the host, and handed to whichever backend applies it (DALI as per-sample
argument inputs, torch as tensors). So a pass started at batch j (`set_epoch(e, start_batch=j)`) gives exactly the
batches j.. of a full pass, a loader rebuilt after a restart gives the same batches as one that ran earlier epochs,
and the same sample gets the same augmentation on any rank and any world size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from einops import rearrange

Batch = tuple[torch.Tensor, torch.Tensor]

_AUGMENT = 1  # salt of the augmentation key, apart from the permutation's (seed, epoch)


# errors


class DataError(ValueError):
    """A dataset file or folder is unusable (empty, truncated, wrong shape or labels); the message names it and
    says what to do. A ValueError, so callers that catch those keep working; bugs stay ordinary exceptions."""


class MissingDataError(DataError, FileNotFoundError):
    """A dataset folder or file does not exist: a DataError, and still the FileNotFoundError raised before."""


# helpers


def check_common(*, batch_size: int, rank: int, world_size: int) -> None:
    """Validates the arguments every loader takes; raises ValueError before any data is touched."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")


def is_train_split(split: str) -> bool:
    """Returns True for "train" and False for "test" (or its alias "val"); raises ValueError otherwise."""
    if split == "train":
        return True
    if split in ("test", "val"):
        return False
    raise ValueError(f"split must be 'train' or 'test' (or 'val'), got {split!r}")


def epoch_seed(seed: int, epoch: int, *salt: int) -> int:
    """A 63-bit seed from (seed, epoch, *salt): the same on every rank unless a rank is part of `salt`."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, *salt]).generate_state(2, np.uint64)[0] >> 1)


def augment_key(seed: int, epoch: int) -> int:
    """The key of epoch `epoch`'s augmentation draws (the same on every rank)."""
    return epoch_seed(seed, epoch, _AUGMENT)


def sample_uniforms(key: int, idx: np.ndarray, k: int) -> np.ndarray:
    """`b k` float32 uniforms in [0, 1) for the samples `idx`: a pure function of (key, sample index, column).

    Counter-based (SplitMix64's output mix over the counter `idx * k + column`, offset by the key), so the draws of any
    batch are computed directly, with no generator state to advance, save or restore. 24-bit values are exact in
    float32, so a value never rounds up to 1.0 when DALI or torch read it as float32.
    """
    counter = np.asarray(idx, np.uint64)[:, None] * np.uint64(k) + np.arange(1, k + 1, dtype=np.uint64)
    z = np.uint64(key) + counter * np.uint64(0x9E3779B97F4A7C15)  # uint64 arrays wrap around (modulo 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


def shard_indices(
    n: int, *, train: bool, batch_size: int, rank: int, world_size: int, seed: int, epoch: int
) -> np.ndarray:
    """The sample indices rank `rank` visits in epoch `epoch`, in visiting order.

    Args:
        n: samples in the split.
        train: shuffled, disjoint, whole batches (True) or ordered contiguous blocks, nothing dropped (False).
        batch_size: per-rank batch size.
        rank: this process's rank.
        world_size: number of processes.
        seed: base seed; the permutation is a function of (seed, epoch) only, so every rank draws the same one.
        epoch: epoch number set through `set_epoch`.

    Returns:
        int64 array of indices into the split.
    """
    if train:
        perm = np.random.default_rng(epoch_seed(seed, epoch)).permutation(n)
        take = (n // world_size) // batch_size * batch_size
        return perm[rank::world_size][:take].astype(np.int64)
    return np.array_split(np.arange(n, dtype=np.int64), world_size)[rank]


def batches_of(idx: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Splits an index array into consecutive batches; only the last may be short."""
    return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]


def crop_flip(
    x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor | None, *, pad: int
) -> torch.Tensor:
    """Per-sample crop of a zero-padded batch (and optional horizontal mirror) as one gather.

    Equivalent to `F.pad(x, [pad] * 4)[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w]`, mirrored along w where `flip[i]`,
    for each sample i; works on any dtype, so uint8 stays uint8 (cheaper than float) until normalisation.

    Args:
        x: `b c h w` batch.
        oy: `b` int64 row offsets in [0, 2 * pad].
        ox: `b` int64 column offsets in [0, 2 * pad].
        flip: `b` bool, or None for no mirroring.
        pad: zero padding on every side.

    Returns:
        `b c h w` tensor of the same dtype and device.
    """
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, [pad, pad, pad, pad])
    rows = oy[:, None] + torch.arange(h, device=x.device)  # b h
    cols = torch.arange(w, device=x.device).expand(b, w)
    if flip is not None:
        # A mirrored crop reads the same window right to left.
        cols = torch.where(flip[:, None], w - 1 - cols, cols)
    cols = ox[:, None] + cols  # b w
    flat = rearrange(padded, "b c h w -> b c (h w)")
    gather = rearrange(rows[:, :, None] * (w + 2 * pad) + cols[:, None, :], "b h w -> b 1 (h w)")
    out = torch.gather(flat, 2, gather.expand(b, c, h * w))
    return rearrange(out, "b c (h w) -> b c h w", h=h)


def crop_flip_params(u: np.ndarray, *, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """RandomCrop(padding=pad) offsets, uniform over the 2*pad+1 positions, and (with a third column) coin-flip mirrors.

    Args:
        u: `b 2` or `b 3` uniforms in [0, 1) (`sample_uniforms`).
        pad: zero padding on every side.

    Returns:
        (oy, ox) int64 `b` in [0, 2 * pad], and bool `b` mirrors or None.
    """
    oy, ox = (np.floor(u[:, j] * (2 * pad + 1)).astype(np.int64) for j in (0, 1))
    return oy, ox, (u[:, 2] < 0.5 if u.shape[1] > 2 else None)


def random_crop_flip(x: torch.Tensor, u: np.ndarray, *, pad: int) -> torch.Tensor:
    """`crop_flip` of `x` (`b c h w`, on any device) at the offsets and mirrors `crop_flip_params` reads from u."""
    oy, ox, flip = (None if a is None else torch.from_numpy(a).to(x.device) for a in crop_flip_params(u, pad=pad))
    return crop_flip(x, oy, ox, flip, pad=pad)


# classes


class ShardedLoader:
    """Base of every loader: index plan, epoch, length and the attributes train.py and eval.py read.

    Subclasses implement `_iter_batches(batches, key)` yielding `(x, y)` for the given list of index batches, with
    augmentation draws `sample_uniforms(key, idx, k)`.

    Attributes:
        num_samples: samples this rank covers per epoch.
        num_classes: k, the number of classes.
        dataset_size: samples in the whole split (all ranks).
        batch_size: per-rank batch size.
        train: True for the training split.
    """

    def __init__(
        self,
        *,
        n: int,
        num_classes: int,
        train: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: str | torch.device,
    ) -> None:
        self.dataset_size = n
        self.num_classes = num_classes
        self.train = train
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.device = torch.device(device)
        self.epoch = 0
        self.start_batch = 0
        if train and (n // world_size) < batch_size:
            raise ValueError(
                f"training split has {n} samples: fewer than batch_size={batch_size} per rank over "
                f"world_size={world_size} ranks, so no full batch exists; lower batch_size"
            )
        self.num_samples = len(self._indices())

    def _indices(self) -> np.ndarray:
        return shard_indices(
            self.dataset_size,
            train=self.train,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=self.epoch,
        )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects what the next passes yield: batches `start_batch`, ... of epoch `epoch`.

        The permutation and the augmentation are functions of (seed, epoch) only, so these batches are bitwise those
        of a full pass over the epoch (a mid-epoch resume reads nothing it skips), on a fresh loader as on one that
        ran earlier epochs. The selection holds until the next call; `len()` stays the length of a full epoch.

        Args:
            epoch: epoch number.
            start_batch: first batch of the epoch's plan to yield, in [0, len(self)].
        """
        if not isinstance(start_batch, (int, np.integer)) or not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be an int in [0, {len(self)}] (batches per epoch), got {start_batch!r}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        batches = batches_of(self._indices(), self.batch_size)[self.start_batch :]
        return self._iter_batches(batches, augment_key(self.seed, self.epoch))

    def _iter_batches(self, batches: list[np.ndarray], key: int) -> Iterator[Batch]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(train={self.train}, num_samples={self.num_samples}, "
            f"dataset_size={self.dataset_size}, batch_size={self.batch_size}, rank={self.rank}/"
            f"{self.world_size}, device={self.device})"
        )


class TensorLoader(ShardedLoader):
    """Batches of an in-memory tensor, transformed on `device` with batched torch ops (no worker processes).

    The whole split is moved to `device` once (CIFAR as uint8 is 150 MB), so on CUDA a batch is a gather plus
    a few fused pointwise kernels and never touches the host. `transform(x, u)` gets the batch and its `b draws`
    augmentation uniforms.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        transform: Callable[[torch.Tensor, np.ndarray], torch.Tensor],
        draws: int,
        num_classes: int,
        train: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: str | torch.device,
    ) -> None:
        super().__init__(
            n=len(y),
            num_classes=num_classes,
            train=train,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            device=device,
        )
        self.x = x.to(self.device)
        self.y = y.to(self.device, torch.int64)
        self.transform = transform
        self.draws = draws

    def _iter_batches(self, batches: list[np.ndarray], key: int) -> Iterator[Batch]:
        for idx in batches:
            i = torch.from_numpy(idx).to(self.device)
            yield self.transform(self.x[i], sample_uniforms(key, idx, self.draws)), self.y[i]


class _PlanSampler(torch.utils.data.Sampler):
    """A batch sampler over a fixed list of index batches (the plan of one pass); yields `(index, key)` pairs
    instead of indices when `key` is set, so datasets that augment in the workers know the epoch."""

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self.batches = batches
        self.key: int | None = None

    def __iter__(self) -> Iterator[list]:
        if self.key is None:
            return (b.tolist() for b in self.batches)
        return ([(i, self.key) for i in b.tolist()] for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class MapLoader(ShardedLoader):
    """Batches of a map-style dataset read by a torch DataLoader (worker processes), then moved to `device`.

    Two places to augment, both driven by `sample_uniforms` (no RNG in the workers):
    - `post(x, u)` runs on the device batch with its `b draws` uniforms (e.g. a random crop shared across time), so
      workers only decode;
    - with `keyed`, the dataset is indexed by `(index, key)` and draws its own uniforms in the worker (per-image
      augmentation of variable-size images, before they can be batched).
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        *,
        n: int,
        num_classes: int,
        train: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: str | torch.device,
        num_workers: int = 0,
        post: Callable[[torch.Tensor, np.ndarray], torch.Tensor] | None = None,
        draws: int = 0,
        keyed: bool = False,
        loader_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            n=n,
            num_classes=num_classes,
            train=train,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            device=device,
        )
        self.dataset = dataset
        self.num_workers = num_workers
        self.post = post
        self.draws = draws
        self.keyed = keyed
        self.loader_kwargs = loader_kwargs or {}
        self._sampler = _PlanSampler([])
        self._loader: torch.utils.data.DataLoader | None = None

    def _iter_batches(self, batches: list[np.ndarray], key: int) -> Iterator[Batch]:
        if self._loader is None:
            # One DataLoader for the loader's lifetime: persistent workers skip a fork + dataset set-up per epoch;
            # the batch sampler is iterated in this process, so swapping its plan is enough for a new epoch.
            self._loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=self._sampler,
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=self.num_workers > 0,
                **self.loader_kwargs,
            )
        self._sampler.batches = batches
        self._sampler.key = key if self.keyed else None
        for (x, y), idx in zip(self._loader, batches, strict=True):
            x = x.to(self.device, non_blocking=True)
            if self.post is not None:
                x = self.post(x, sample_uniforms(key, idx, self.draws))
            yield x, y.to(self.device, torch.int64, non_blocking=True)


class DaliLoader(ShardedLoader):
    """Drives a DALI pipeline over the index plan of each pass and hands out torch tensors on `device`.

    Subclasses implement `_pipeline(batches, key)`, returning a built pipeline whose i-th `run()` yields the batch
    `batches[i]` as (images, labels), augmented with `sample_uniforms(key, batches[i], k)` fed as per-sample
    arguments (a reader may pad the last batch; the extra rows are cut off here), and `_end_epoch(pipe)`, called
    after the last batch of a fully consumed pass. A pass that stops early leaves the pipeline mid-plan;
    `self._clean` is then False and subclasses rebuild instead of reusing it.
    """

    _clean = True

    def _pipeline(self, batches: list[np.ndarray], key: int) -> Any:
        raise NotImplementedError

    def _end_epoch(self, pipe: Any) -> None:
        pass

    def _run_error(self, batches: list[np.ndarray], i: int, err: RuntimeError) -> Exception:
        """The exception to raise when batch i fails in DALI (whose messages do not name the input file)."""
        return err

    def _to_torch(self, tensor_list: Any) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        # GPU outputs (they have `as_cpu`) stay on the GPU; CPU outputs land in host memory first.
        device = self.device if hasattr(tensor_list, "as_cpu") else torch.device("cpu")
        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
        # Copy on torch's current stream so the consumer's kernels are ordered after it without a host sync.
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)
        return out

    def _device_id(self) -> int | None:
        if self.device.type != "cuda":
            return None  # CPU-only pipeline: DALI needs no GPU at all.
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _iter_batches(self, batches: list[np.ndarray], key: int) -> Iterator[Batch]:
        if not batches:
            return
        pipe = self._pipeline(batches, key)
        self._clean = False
        for i, idx in enumerate(batches):
            try:
                images, labels = pipe.run()
            except RuntimeError as err:
                raise self._run_error(batches, i, err) from err
            x, y = self._to_torch(images), self._to_torch(labels)
            # A reader pads the last batch of a shard with copies of its last sample: those are cut off here.
            x, y = x[: len(idx)], y.reshape(-1)[: len(idx)]
            yield x.to(self.device, non_blocking=True), y.to(self.device, torch.int64, non_blocking=True)
        self._end_epoch(pipe)
        self._clean = True
