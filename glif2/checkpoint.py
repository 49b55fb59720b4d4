"""Checkpoints: our format (one atomic file that rebuilds its model) and loading the authors' released files.

Shape letters: t steps, c channels, k classes.

Our format is a dict {version, model (state_dict), model_config, config, optimizer, scheduler, scaler, rng, epoch,
step, best_acc, ...} written atomically and loaded with `weights_only=True`. The authors' files are recognised by
name through the table in glif2.released (shape inference as the fallback) and loaded strictly, or one error lists
everything that did not fit.
"""

import argparse
import logging
import os
import pickle
import random
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import glif2.released as released
from glif2.errors import CheckpointError
from glif2.models import create_model
from glif2.neuron import rename_deprecated
from glif2.released import clean_state_dict

VERSION = 1
log = logging.getLogger(__name__)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".tar", ".ckpt")  # what eval.py picks up in a folder and --resume accepts


# helpers


def unwrap_model(model: nn.Module) -> nn.Module:
    """The raw module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states, as types a weights_only load accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what `rng_state` captured (missing entries are left alone)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ours


def save_checkpoint(path: str | os.PathLike, **fields: Any) -> Path:
    """Writes {version, **fields} atomically: a temporary file in the same folder, flush + fsync, os.replace,
    fsync of the folder. A crash at any point leaves either the old file or the new one, never a torn file.

    `model` may be a module (DDP / compiled wrappers are looked through): its state_dict is stored, cleaned, and
    its `model_config` (set by create_model) is stored too unless given. Any other field with a `state_dict()`
    (optimizer, scheduler, GradScaler) is stored as that state dict. Every value must be something a
    weights_only load accepts: tensors, plain Python types, lists/tuples/dicts of them.

    Returns:
        The path written.
    """
    path = Path(path)
    payload: dict[str, Any] = {"version": VERSION}
    for name, value in fields.items():
        if isinstance(value, nn.Module):
            raw = unwrap_model(value)
            if name == "model" and "model_config" not in fields and hasattr(raw, "model_config"):
                payload["model_config"] = dict(raw.model_config)
            value = clean_state_dict(raw.state_dict())
        elif hasattr(value, "state_dict") and callable(value.state_dict) and not isinstance(value, Tensor):
            value = value.state_dict()
        payload[name] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads any checkpoint file (ours or the reference's) with `weights_only=True`.

    `argparse.Namespace` is allow-listed (the original GLIF code may store its args). A file that cannot be read
    whole raises CheckpointError naming the file, what is wrong and what to do: empty, cut short (an interrupted
    copy or download), a zip member whose bytes fail their checksum (torch itself does not check tensor data), a
    pickle that needs code to load, or not a checkpoint at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    problem = _damage(path)
    if problem is not None:
        raise CheckpointError(f"{path}: cannot be read: {problem}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # on bad input torch.load raises OSError, IndexError, EOFError, RuntimeError, ...
        raise CheckpointError(f"{path}: cannot be read: {_explain(path, e)}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


# How torch.save's two formats begin: a zip archive (since torch 1.6), or the legacy pickle stream, whose first
# pickle is a magic number.
_ZIP_MAGIC = b"PK"  # a zip whose first member header is damaged still counts as a zip
_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
_AGAIN = "copy or download it again (an interrupted copy or download leaves such a file)"


def _format(path: Path) -> str:
    """zip, legacy or other, by the first bytes (a file cut inside the magic still counts as its format)."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    for name, magic in (("zip", _ZIP_MAGIC), ("legacy", _LEGACY_MAGIC)):
        n = min(len(head), len(magic))
        if n and head[:n] == magic[:n]:
            return name
    return "other"


def _damage(path: Path) -> str | None:
    """What is wrong with the file before any unpickling, or None: empty, or a zip checkpoint cut short or with a
    member whose bytes no longer match their CRC-32 (torch.load would return such tensors silently)."""
    size = path.stat().st_size
    if size == 0:
        return f"the file is empty (0 bytes); {_AGAIN}"
    if _format(path) != "zip":
        return None
    if not zipfile.is_zipfile(path):  # the zip directory, at the end of the file, is missing
        return f"it is a zip checkpoint cut short ({size} bytes; its end, the zip directory, is missing); {_AGAIN}"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member and checks its CRC-32
    except Exception as e:  # zipfile raises BadZipFile, EOFError, OSError, zlib.error, ... on a damaged archive
        return f"it is a damaged zip checkpoint ({type(e).__name__}: {e}); {_AGAIN}"
    if bad is not None:
        return f"its zip member {bad!r} is damaged (it fails the zip's checksum or header check); {_AGAIN}"
    return None


def _explain(path: Path, error: Exception) -> str:
    """Why torch.load failed on a file that passed `_damage`, and what to do."""
    text = " ".join(str(error).split())
    if "WeightsUnpickler error:" in text:  # skip torch's advice to load unsafely
        text = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation")[0].strip()
    needs = re.search(r"GLOBAL (\S+)", text) if isinstance(error, pickle.UnpicklingError) else None
    if needs:
        return (
            f"it holds a Python object of type {needs.group(1)}, which a safe load (weights_only=True) will not "
            "build, as that would run code from the file; glif2 reads tensors and plain values only. If you "
            "trust the file's source, save its tensors again: "
            "torch.save(torch.load(path, weights_only=False)['state_dict'], 'clean.pth')"
        )
    kind, cause = _format(path), f"{type(error).__name__}: {text[:160] or 'no message'}"
    if kind == "legacy":
        return f"it is a legacy (non-zip) PyTorch file that ends early or is damaged ({cause}); {_AGAIN}"
    if kind == "zip":
        return f"it is a zip file that torch cannot read as a checkpoint ({cause}); if it is one, {_AGAIN}"
    with open(path, "rb") as f:
        head = f.read(24)
    return (
        f"it is not a PyTorch checkpoint: it starts with {head!r}, which is neither torch.save format ({cause}); "
        "pass a file written by torch.save"
    )


def is_ours(ckpt: dict[str, Any]) -> bool:
    """True for a glif2 checkpoint (it carries a format version and the model's config)."""
    return "version" in ckpt and "model_config" in ckpt and "model" in ckpt


def strict_load(model: nn.Module, state_dict: dict[str, Tensor], what: str, hint: str) -> None:
    """load_state_dict(strict=True), but first one error listing missing, unexpected and wrongly shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:

        def listing(title: str, items: list[str]) -> str:
            if not items:
                return ""
            more = f" (+{len(items) - 12} more)" if len(items) > 12 else ""
            return f"\n  {title} ({len(items)}): " + ", ".join(items[:12]) + more

        raise CheckpointError(
            f"{what}: {len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrongly shaped keys"
            + listing("missing (in the model, not in the file)", missing)
            + listing("unexpected (in the file, not in the model)", unexpected)
            + listing("wrong shape", wrong)
            + f"\n  {hint}"
        )
    model.load_state_dict(state_dict, strict=True)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """Rebuilds a model from a checkpoint file alone: ours (from its model_config) or a released reference file.

    `overrides` replace model options (e.g. `memory="off"`); ones that change shapes make the strict
    load fail. The model gets `model_config` and `checkpoint_meta` ({format, path, dataset (None when the file
    does not say), epoch, step, best_acc}).
    """
    ckpt = load_checkpoint(path, map_location)
    if not is_ours(ckpt):
        return _load_reference(path, ckpt, **overrides).to(map_location)
    # Files written before the GLIF options were renamed say gates / gate: read them under the new names, quietly.
    saved = rename_deprecated(ckpt["model_config"], warn=False)
    saved.pop("eager", None)  # a debugging switch that older files stored; glif2.eager_kernels() replaces it
    config = {**saved, **rename_deprecated(overrides)}
    name, num_classes, T = config.pop("name"), config.pop("num_classes"), config.pop("T")
    model = create_model(name, num_classes, T, **config)
    strict_load(model, ckpt["model"], f"{path} -> {name}", f"the file's model_config is {ckpt['model_config']}")
    train_config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    model.checkpoint_meta = {
        "format": "glif2",
        "path": str(path),
        "dataset": train_config.get("dataset"),
        **{k: ckpt[k] for k in ("epoch", "step", "best_acc") if k in ckpt},
    }
    return model.to(map_location)


# the authors' files


def load_reference_checkpoint(
    path: str | os.PathLike,
    arch: str | None = None,
    num_classes: int | None = None,
    T: int | None = None,
    **options: Any,
) -> nn.Module:
    """Loads one of the paper's released files (or a file in their format) into a ready model.

    arch, num_classes and T come from the tensors (key layout, the classifier's rows, conduct's shape); the
    released-file table, by file name (`resCifar19-CIFAR100-step4-CW.pth.tar` -> resnet19, 100, 4), fills in what
    they leave open, and where they contradict the name they win with a one-line warning on this module's logger
    (docs/networks.md §8.2). Given explicitly, arch, num_classes and T win, and a mismatch with the file raises
    CheckpointError listing the missing, unexpected and wrongly shaped keys and the values to pass. `options` go
    to create_model (e.g. `memory="off"`); the neuron form, BN kind (plain for the ImageNet file),
    head and DVS gate dtype come from the file.
    """
    return _load_reference(path, load_checkpoint(path), arch=arch, num_classes=num_classes, T=T, **options)


def _load_reference(path, ckpt, arch=None, num_classes=None, T=None, **options) -> nn.Module:
    try:
        sd = released.reference_state_dict(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    found = released.resolve(path, sd, arch, num_classes, T, given=options)
    arch, num_classes, T = found["arch"], found["num_classes"], found["T"]
    model = create_model(arch, num_classes, T, **{**found["options"], **options})
    strict_load(
        model,
        sd,
        f"{path} -> {arch}(num_classes={num_classes}, T={T})",
        f"the tensors look like: {found['says']}; pass those (load_reference_checkpoint(path, arch=..., "
        "num_classes=..., T=..., **options)) or omit them to infer",
    )
    model.checkpoint_meta = {
        "format": "reference",
        "path": str(path),
        "dataset": found["dataset"],
        **{k: ckpt[k] for k in ("epoch",) if k in ckpt},
        **({"best_acc": ckpt["max_test_acc"]} if "max_test_acc" in ckpt else {}),
        "note": found["note"],
    }
    if found["note"]:  # loaded, but not as the file name says: one line (logging's default handler prints it)
        log.warning(found["note"])
    return model


__all__ = [
    "CHECKPOINT_SUFFIXES",
    "VERSION",
    "CheckpointError",
    "clean_state_dict",
    "is_ours",
    "load_checkpoint",
    "load_model",
    "load_reference_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "strict_load",
    "unwrap_model",
]
