"""CIFAR10-DVS: tonic's `.aedat4` events -> T equal-count frames (SpikingJelly 0.0.0.0.10's rule) -> 48 x 48.

Shape letters: b batch, t steps (frames), c channels (2 polarities), h w space, n events or samples.

Events to frames (docs/dvs.md §2-§4): with N events and d = N // T, frame j < T-1 counts the
events with index in [j*d, (j+1)*d) and frame T-1 counts [(T-1)*d, N), so the last frame takes the remainder
(tonic's `ToFrame(n_event_bins=T)` drops it, and gives T empty frames when N < T; SpikingJelly puts all N events
in the last frame, as here). Frame [t, c, y, x] counts events with polarity c at pixel (x, y): `t 2 128 128`.

Orientation (`remap`, an explicit option because the true map is unproven, docs/dvs.md §3): tonic's events are
the AEDAT 4.0 (x, y, on) that DV wrote when the original AEDAT 2.0 files were converted; how DV mapped the DVS128
address bits is not documented. The released model saw SpikingJelly's (127 - y_raw, 127 - x_raw, 1 - p_raw).
- "h1" (default, best-supported hypothesis, DV = libcaer convention): x_s = y_t, y_s = x_t, p_s = p_t (transpose).
- "h2": (y_t, 127 - x_t, 1 - p_t); "h3": (127 - y_t, x_t, p_t); "h4": (127 - y_t, 127 - x_t, 1 - p_t).
- "none": tonic's coordinates as they are (x_s = x_t, y_s = y_t, p_s = p_t).
Confirm on real data before trusting accuracies (docs/dvs.md §8.3: sweep the maps with the released checkpoint).

Split: classes alphabetical, files sorted by name (lexicographic, SpikingJelly's DatasetFolder order); per class
the first ceil(0.9 n_c) files train, the rest test (900/100 with the full data). Frames are cached once on disk as
compressed uint8/uint16 `.npz` under `<cache_dir>/<folder>/<class>/<stem>-<bytes>.npz`, the folder named by a hash
of everything that shapes a frame (`frame_key`: T, the binning rule, the sensor side, `remap`, the entry format) and
holding that key as `key.json`, checked before the folder is used; `<bytes>` is the recording's size, so a replaced
recording gets a new entry (docs/dvs.md §6). Entries are written atomically (temporary file + rename) and checked
on every read: the ZIP member's CRC-32, which the format already stores and `zipfile` verifies when it reads a whole
member (so no checksum of our own), plus the member name, shape `t 2 128 128` and dtype. That costs a CRC over
~0.5 MB next to the decompression we do anyway, and catches truncated, hand-edited or half-written (crash before the
data reached the disk) entries; a damaged entry is rebuilt from the events with a warning. No fsync per entry: the
check repairs what a crash leaves behind.

Transforms (`dsr_da`): bilinear resize 128 -> 48 without antialias (in the workers), then for training a random
48 x 48 crop of the zero-padded (4) frames, one window per sample shared by all steps and both polarities (on the
device, batched; offsets from `sample_uniforms(key of (seed, epoch), sample index)`, no flip). Batches are float32
`b t 2 48 48` (the model rearranges to time-first), y int64 `b`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
import tempfile
import warnings
import zipfile
import zlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from pipelines._common import (
    DataError,
    MapLoader,
    MissingDataError,
    ShardedLoader,
    check_common,
    is_train_split,
    random_crop_flip,
)
from pipelines.datasets import DATASETS

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SENSOR = 128
SIZE = DATASETS["cifar10dvs"].input_size  # dsr_da resolution
PAD = 4
DRAWS = 2  # uniforms per training sample: the crop's row and column offsets (no mirror)
TRAIN_FRACTION = 0.9
REMAPS = ("h1", "h2", "h3", "h4", "none")
# The frame cache's key (frame_key) names these; change them with what they describe, so no old frame is reused.
CACHE_VERSION = 2  # the entry format (2: the cache key's folder and key.json, the recording's size in entry names)
BINNING = "number"  # events_to_frames' rule: equal event counts per frame, the remainder in the last (SpikingJelly's)

_MAGIC = b"#!AER-DAT4.0\r\n"
_MEMBER = "frames.npy"
# What reading a damaged `.npz` can raise: zip structure (BadZipFile, NotImplementedError for a garbled compression
# method), deflate stream (zlib.error, EOFError), short or garbled .npy data (ValueError), the file itself (OSError).
_DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError, OSError)


# helpers


def remap_events(x: np.ndarray, y: np.ndarray, p: np.ndarray, remap: str) -> tuple[np.ndarray, ...]:
    """Maps tonic event coordinates (x_t, y_t, p_t) to the reference's (x_s, y_s, p_s) under hypothesis `remap`.

    Args:
        x: `n` ints in [0, 128).
        y: `n` ints in [0, 128).
        p: `n` polarities (bool or 0/1).
        remap: one of REMAPS (see the module docstring).

    Returns:
        (x_s, y_s, p_s) as int64 arrays.
    """
    x, y, p = (np.asarray(a, dtype=np.int64) for a in (x, y, p))
    m = SENSOR - 1
    maps = {
        "h1": (y, x, p),
        "h2": (y, m - x, 1 - p),
        "h3": (m - y, x, p),
        "h4": (m - y, m - x, 1 - p),
        "none": (x, y, p),
    }
    if remap not in maps:
        raise ValueError(f"remap must be one of {REMAPS}, got {remap!r}")
    return maps[remap]


def events_to_frames(x: np.ndarray, y: np.ndarray, p: np.ndarray, T: int, *, size: int = SENSOR) -> np.ndarray:
    """Integrates events into T frames of (nearly) equal event count, the remainder going to the last frame.

    Args:
        x: `n` column indices (already remapped).
        y: `n` row indices.
        p: `n` polarities in {0, 1} (the channel).
        T: number of frames.
        size: sensor side.

    Returns:
        int32 `t 2 h w` counts; frame j sums events [j*d, (j+1)*d), d = n // T, the last one [(T-1)*d, n).
    """
    n = len(x)
    d = n // T
    # With d = 0 (n < T) every event goes to the last frame, like SpikingJelly (tonic would return T empty frames).
    j = np.minimum(np.arange(n) // d, T - 1) if d > 0 else np.full(n, T - 1)
    flat = ((j * 2 + np.asarray(p, np.int64)) * size + np.asarray(y, np.int64)) * size + np.asarray(x, np.int64)
    counts = np.bincount(flat, minlength=T * 2 * size * size).astype(np.int32)
    return rearrange(counts, "(t c h w) -> t c h w", t=T, c=2, h=size)


def resize(frames: torch.Tensor) -> torch.Tensor:
    """`... h w` -> `... 48 48`, bilinear without antialias (torchvision 0.11 tensor Resize), float32."""
    lead = frames.shape[:-2]
    x = rearrange(frames.float(), "... h w -> (...) 1 h w")
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=False)
    return x.reshape(*lead, SIZE, SIZE)


def check_aedat4(path: str) -> None:
    """Walks the packet headers of an AEDAT 4.0 file without decompressing anything.

    A complete file is the magic line, a size-prefixed IOHeader, then packets (int32 stream id, int32 size, data)
    ending exactly at the data table (or at the end of the file if it has none). A file without packets holds no
    events (a recording has at least one event packet).

    Raises:
        DataError: naming the file when it is not AEDAT 4.0, a packet runs past the end (truncated copy) or it has
            no packets.
    """
    size = os.path.getsize(path)
    hint = "re-extract it from the dataset archive (the copy is truncated or corrupt)"
    with open(path, "rb") as f:
        if f.read(len(_MAGIC)) != _MAGIC:
            raise DataError(f"{path!r} is not an AEDAT 4.0 file (no '#!AER-DAT4.0' header); {hint}")
        raw = f.read(4)
        header_len = struct.unpack("<i", raw)[0] if len(raw) == 4 else -1
        header = f.read(max(header_len, 0))
        if header_len <= 0 or len(header) != header_len:
            raise DataError(f"{path!r}: AEDAT 4.0 header is cut short; {hint}")
        table = _data_table_position(header)
        end = table if 0 < table <= size else size
        if table > size:
            raise DataError(f"{path!r}: data table at byte {table} but the file has {size} bytes; {hint}")
        start = pos = len(_MAGIC) + 4 + header_len
        while pos < end:
            f.seek(pos)
            raw = f.read(8)
            if len(raw) < 8:
                raise DataError(f"{path!r}: packet header at byte {pos} is cut short; {hint}")
            length = struct.unpack("<ii", raw)[1]
            pos += 8 + length
            if length < 0 or pos > end:
                raise DataError(f"{path!r}: packet at byte {pos - 8 - length} runs past byte {end}; {hint}")
    if pos == start:
        raise DataError(
            f"{path!r} holds no events (an empty recording); re-extract it from the dataset archive, or "
            f"delete it to train without it"
        )


def _data_table_position(header: bytes) -> int:
    """Reads IOHeader.dataTablePosition (flatbuffer field 1, int64, default -1) from the IOHeader bytes."""
    try:
        root = struct.unpack_from("<I", header, 0)[0]
        vtable = root - struct.unpack_from("<i", header, root)[0]
        vsize = struct.unpack_from("<H", header, vtable)[0]
        if vsize < 4 + 2 * 2:
            return -1
        offset = struct.unpack_from("<H", header, vtable + 4 + 2 * 1)[0]
        return struct.unpack_from("<q", header, root + offset)[0] if offset else -1
    except struct.error:
        return -1


def list_recordings(data_dir: str | os.PathLike) -> tuple[list[str], list[int]]:
    """Lists `<data_dir>/CIFAR10DVS/<class>/*.aedat4` in the reference order (classes alphabetical, names sorted)."""
    root = os.path.join(os.fspath(data_dir), "CIFAR10DVS")
    layout = (
        f"expected tonic's layout {root}/<class>/*.aedat4 with the 10 class folders {', '.join(CLASSES)} "
        f"(extract CIFAR10DVS.zip and its per-class zips there, or pass download=True where a network exists)"
    )
    if not os.path.isdir(root):
        raise MissingDataError(f"CIFAR10-DVS folder {root!r} not found; {layout}")
    paths, labels = [], []
    for k, name in enumerate(CLASSES):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            raise MissingDataError(f"CIFAR10-DVS class folder {folder!r} is missing; {layout}")
        files = sorted(e.name for e in os.scandir(folder) if e.name.endswith(".aedat4"))
        if not files:
            raise DataError(
                f"CIFAR10-DVS class folder {folder!r} has no .aedat4 files (an interrupted extraction?); {layout}"
            )
        paths += [os.path.join(folder, f) for f in files]
        labels += [k] * len(files)
    return paths, labels


def _save_frames(path: str, frames: np.ndarray, *, source: str) -> None:
    """Writes int counts `t c h w` as a `.npz` (key "frames"), uint8 when it fits, else uint16.

    zlib level 1 instead of np.savez_compressed's 6: 5-7x faster to write, files ~30% larger (DVS frames are
    sparse either way), and np.load reads both the same.
    """
    top = int(frames.max(initial=0))
    if top > np.iinfo(np.uint16).max:
        raise DataError(
            f"{source!r}: a pixel count of {top} exceeds 65535 and cannot be cached as uint16; pass cache=False"
        )
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    # A unique name in the same folder (same file system, so the rename is atomic): concurrent workers or ranks
    # never see a half-written entry, and a killed writer leaves only a `.tmp` file behind.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z,
            z.open(_MEMBER, "w") as f,
        ):
            np.lib.format.write_array(f, frames.astype(np.uint8 if top <= 255 else np.uint16))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_frames(path: str, T: int, *, size: int = SENSOR) -> np.ndarray:
    """Reads a frame-cache entry as int32 `t 2 size size` counts (128: the sensor), checking it (see the module
    docstring).

    Raises:
        DataError: the entry is damaged: not a ZIP, a CRC-32 mismatch, another member, shape or dtype.
    """
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if names != [_MEMBER]:
                raise ValueError(f"members {names}, expected [{_MEMBER!r}]")
            raw = z.read(_MEMBER)  # reads the whole member, so zipfile compares its CRC-32
        frames = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
    except _DAMAGED as err:
        raise DataError(f"frame cache entry {path!r} is damaged ({type(err).__name__}: {err})") from err
    if frames.shape != (T, 2, size, size) or frames.dtype not in (np.uint8, np.uint16):
        raise DataError(
            f"frame cache entry {path!r} is damaged: it holds {frames.dtype} {frames.shape}, expected "
            f"uint8 or uint16 {(T, 2, size, size)}"
        )
    return frames.astype(np.int32)


def frame_key(T: int, remap: str) -> dict[str, Any]:
    """Everything that shapes a cached frame: the entry format, the binning rule, T, the sensor side the events are
    counted on, and the orientation map. The train/test split picks recordings and the resize and crop run on every
    read, so they change no cached frame and are not in the key (docs/dvs.md §6)."""
    return {"version": CACHE_VERSION, "binning": BINNING, "T": T, "sensor": SENSOR, "remap": remap}


def cache_folder(key: dict[str, Any]) -> str:
    """The cache folder of a frame key: readable fields plus a hash of the whole key (canonical JSON)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"frames_T{key['T']}_{key['binning']}_{key['remap']}_{digest}"


def claim_cache_folder(folder: str, key: dict[str, Any]) -> None:
    """Makes sure `folder` holds frames of `key`: writes its `key.json` (atomically) when it has none, else checks it.

    Raises:
        DataError: the folder's key.json holds another key (a hash collision or a hand-made folder).
    """
    path = os.path.join(folder, "key.json")
    try:
        with open(path) as f:
            stored = json.load(f)
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="key.json.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(key, f, sort_keys=True)
        os.replace(tmp, path)  # workers racing here write the same key
        return
    except (OSError, ValueError) as err:
        stored = f"unreadable ({type(err).__name__}: {err})"
    if stored != key:
        raise DataError(
            f"frame cache folder {folder!r} holds frames for {stored}, not {key}; delete the folder (it "
            f"is rebuilt from the events) or pass another cache_dir"
        )


def split_indices(labels: list[int], train: bool) -> np.ndarray:
    """Per class, the first ceil(0.9 n_c) samples (in listing order) are train and the rest test."""
    labels_np = np.asarray(labels)
    out = []
    for k in range(len(CLASSES)):
        idx = np.flatnonzero(labels_np == k)
        cut = math.ceil(TRAIN_FRACTION * len(idx))
        out.append(idx[:cut] if train else idx[cut:])
    return np.concatenate(out)


def _tonic_dataset(data_dir: str, download: bool) -> Any:
    try:
        from tonic.datasets import CIFAR10DVS
    except ImportError as err:
        raise ImportError("cifar10dvs needs tonic and aedat: pip install 'glif2[dvs]'") from err
    if download:
        return CIFAR10DVS(save_to=data_dir)

    # tonic re-downloads unless CIFAR10DVS.zip and >= 1000 files exist; our own layout check has already run. The
    # subclass keeps the name CIFAR10DVS because tonic derives the data folder from the class name.
    present = type("CIFAR10DVS", (CIFAR10DVS,), {"_check_exists": lambda self: True})
    return present(save_to=data_dir)


# classes


class DVSFrames(torch.utils.data.Dataset):
    """Recordings -> resized frames. Item i: (float32 `t 2 48 48`, int label); frames cached as `.npz`.

    Args:
        paths: the .aedat4 files (the reference order).
        labels: class of each file.
        data_dir: tonic's save_to (holds CIFAR10DVS/).
        T: frames per recording.
        remap: orientation hypothesis (REMAPS).
        cache_dir: cache root, or None to decode the events every time.
        resize_to_48: apply the dsr_da resize (False gives the raw `t 2 128 128` counts as float32).
    """

    def __init__(
        self,
        paths: list[str],
        labels: list[int],
        *,
        data_dir: str,
        T: int,
        remap: str,
        cache_dir: str | None,
        resize_to_48: bool = True,
    ) -> None:
        self.paths, self.labels = paths, labels
        self.data_dir, self.T, self.remap, self.cache_dir = data_dir, T, remap, cache_dir
        self.resize_to_48 = resize_to_48
        self.key = frame_key(T, remap)
        self._claimed = False  # the cache folder's key.json checked (once per process)
        self._tonic = None
        self._tonic_index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def cache_path(self, i: int) -> str:
        """The entry of recording i: the key's folder, its class, its stem and byte size (a replaced recording of
        another size is another entry)."""
        assert self.cache_dir is not None
        folder = os.path.join(self.cache_dir, cache_folder(self.key))
        if not self._claimed:
            claim_cache_folder(folder, self.key)
            self._claimed = True
        stem = os.path.splitext(os.path.basename(self.paths[i]))[0]
        size = os.path.getsize(self.paths[i])
        return os.path.join(folder, CLASSES[self.labels[i]], f"{stem}-{size}.npz")

    def events(self, i: int) -> np.ndarray:
        """tonic's structured events (t, x, y, p) of recording i, read through tonic's CIFAR10DVS."""
        if self._tonic is None:
            # Built lazily so each DataLoader worker opens its own dataset object.
            self._tonic = _tonic_dataset(self.data_dir, download=False)
            self._tonic_index = {os.path.normpath(p): j for j, p in enumerate(self._tonic.data)}
        path = os.path.normpath(self.paths[i])
        try:
            events, _ = self._tonic[self._tonic_index[path]]
        except Exception as err:  # tonic and aedat fail in many ways on a bad file
            check_aedat4(path)  # names the problem when the packet structure shows it (truncated, no events)
            raise DataError(
                f"cannot read events from {path!r} ({type(err).__name__}: {err}); re-extract the file "
                f"from the dataset archive."
            ) from err
        if len(events) == 0:
            raise DataError(
                f"{path!r} holds no events (an empty recording); re-extract it from the dataset archive, "
                f"or delete it to train without it"
            )
        return events

    def frames(self, i: int) -> np.ndarray:
        """int32 `t 2 128 128` counts of recording i, from the cache when present (a damaged entry is rebuilt)."""
        cache = self.cache_path(i) if self.cache_dir is not None else None
        if cache is not None and os.path.exists(cache):
            try:
                return load_frames(cache, self.T, size=self.key["sensor"])
            except DataError as err:
                warnings.warn(f"{err}; rebuilding it from {self.paths[i]!r}", stacklevel=2)
        ev = self.events(i)
        x, y, p = remap_events(ev["x"], ev["y"], ev["p"], self.remap)
        frames = events_to_frames(x, y, p, self.T, size=self.key["sensor"])
        if cache is not None:
            _save_frames(cache, frames, source=self.paths[i])
        return frames

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.frames(i)).float()
        return (resize(x) if self.resize_to_48 else x), self.labels[i]


def _train_crop(x: torch.Tensor, u: np.ndarray) -> torch.Tensor:
    """Random 48 x 48 crop of the zero-padded frames, one window per sample for all steps and polarities.

    Args:
        x: float32 `b t c h w` frames.
        u: `b 2` uniforms: the row and column offsets.
    """
    t = x.shape[1]
    out = random_crop_flip(rearrange(x, "b t c h w -> b (t c) h w"), u, pad=PAD)
    return rearrange(out, "b (t c) h w -> b t c h w", t=t)


def build_cifar10dvs(
    split: str,
    *,
    data_dir: str | os.PathLike,
    batch_size: int,
    T: int | None,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    seed: int = 0,
    download: bool = False,
    remap: str = "h1",
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
    num_workers: int | None = None,
    verify: bool = True,
) -> ShardedLoader:
    """Builds the CIFAR10-DVS loader (see `pipelines.build_loader` for the contract).

    Args:
        split: "train" (900 per class) or "test" (100 per class).
        data_dir: tonic's save_to, holding `CIFAR10DVS/<class>/*.aedat4`.
        batch_size: per-rank batch size.
        T: frames per recording (16 for the released model).
        rank: this process's rank.
        world_size: number of processes.
        device: where batches are produced.
        seed: base seed of the permutations and crops.
        download: let tonic download the archive if the folder is missing.
        remap: orientation hypothesis, one of REMAPS ("h1" default; see the module docstring).
        cache_dir: frame cache root (default `<data_dir>/CIFAR10DVS_frames`).
        cache: read and write the frame cache (False decodes events on every access).
        num_workers: DataLoader workers (default min(8, cores)).
        verify: walk every file's AEDAT 4.0 packet headers before starting (about 0.1 ms per file).

    Returns:
        A loader yielding float32 `b t 2 48 48` and int64 `b`.
    """
    check_common(batch_size=batch_size, rank=rank, world_size=world_size)
    if not isinstance(T, int) or T <= 0:
        raise ValueError(f"cifar10dvs needs the number of frames T as a positive int, got T={T!r}")
    if remap not in REMAPS:
        raise ValueError(f"remap must be one of {REMAPS}, got {remap!r}")
    train = is_train_split(split)
    data_dir = os.fspath(data_dir)
    if download and not os.path.isdir(os.path.join(data_dir, "CIFAR10DVS")):
        _tonic_dataset(data_dir, download=True)
    paths, labels = list_recordings(data_dir)
    if verify:
        for path in paths:
            check_aedat4(path)
    idx = split_indices(labels, train)
    root = os.fspath(cache_dir) if cache_dir is not None else os.path.join(data_dir, "CIFAR10DVS_frames")
    dataset = DVSFrames(
        [paths[i] for i in idx],
        [labels[i] for i in idx],
        data_dir=data_dir,
        T=T,
        remap=remap,
        cache_dir=root if cache else None,
    )
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
    return MapLoader(
        dataset,
        n=len(dataset),
        num_classes=len(CLASSES),
        train=train,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        device=device,
        num_workers=workers,
        post=_train_crop if train else None,
        draws=DRAWS,
    )
