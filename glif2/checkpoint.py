"""Checkpoints: ours (one atomic file that rebuilds its model) and the paper's released `.pth.tar` files.

Shape letters: t steps, c channels, k classes.

Our format is a dict {version, model (state_dict), model_config, config, optimizer, scheduler, scaler, rng, epoch,
step, best_acc, ...} loaded with `weights_only=True`. The reference files hold only a state_dict (under
`state_dict`, or `net` for CIFAR10-DVS); their keys go through `clean_state_dict`, the old SpikingJelly container
naming is folded into the new one, and the neuron leaf names map through REFERENCE_KEYS; architecture, classes,
T and the neuron form are inferred from the file name and the tensor shapes (ARCHITECTURES.md §6-§7), then the
state dict loads strictly, or one error lists everything that did not fit.
"""

import argparse
import os
import pickle
import random
import re
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from glif2.models import create_model

VERSION = 1

# The reference's neuron and tdBN leaf names -> ours (ARCHITECTURES.md §7). BN's weight/bias/running_* and conv
# and linear weights keep their names.
REFERENCE_KEYS = {
    "alpha": "alpha",
    "beta": "beta",
    "gamma": "gamma",
    "tau": "tau",
    "Vth": "v_th",  # GLIF threshold, and tdBN's fixed-threshold buffer
    "leak": "leak",
    "reVth": "v_reset",
    "conduct": "conduct",
}

# Released file names (ARCHITECTURES.md §6) -> (arch, dataset); classes and T come from the groups.
_NAME_PATTERNS = (
    (re.compile(r"resCifar18stand-CIFAR(?P<k>10|100)-step(?P<t>\d+)"), "resnet18", None),
    (re.compile(r"resCifar19-CIFAR(?P<k>10|100)-step(?P<t>\d+)"), "resnet19", None),
    (re.compile(r"resnet18MS-ImageNet-step(?P<t>\d+)"), "resnet18ms", "imagenet"),
    (re.compile(r"resnet34MS-ImageNet-step(?P<t>\d+)"), "resnet34ms", "imagenet"),
    (re.compile(r"checkpoint_max"), "sew7b_wide", "cifar10dvs"),
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose tensors do not fit the model."""


# helpers


def clean_state_dict(state_dict: dict[str, Tensor]) -> "OrderedDict[str, Tensor]":
    """Strips DDP's leading `module.` and torch.compile's `_orig_mod.` (anywhere) from every key."""
    out = OrderedDict()
    for key, value in state_dict.items():
        key = key.replace("_orig_mod.", "")
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The raw module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(model, nn.parallel.DistributedDataParallel) else None
        )
        if inner is None:
            return model
        model = inner


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

    `argparse.Namespace` is allow-listed (the original GLIF code may store its args). Truncated, corrupt or
    non-checkpoint files raise CheckpointError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        raise CheckpointError(
            f"{path}: cannot be read with weights_only=True (not a checkpoint, or it holds Python objects other "
            f"than tensors and plain types): {first}"
        ) from e
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated, corrupt, or not a checkpoint file; "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def is_ours(ckpt: dict[str, Any]) -> bool:
    """True for a glif2 checkpoint (it carries a format version and the model's config)."""
    return "version" in ckpt and "model_config" in ckpt and "model" in ckpt


def _check_and_load(model: nn.Module, state_dict: dict[str, Tensor], what: str, hint: str) -> None:
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


def guess_dataset(model_config: dict[str, Any], config: dict[str, Any] | None = None) -> str | None:
    """The dataset a checkpoint was trained on: from the train config when it says, else from the model."""
    config = config or {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    for value in (config.get("dataset"), data.get("dataset"), data.get("name")):
        if isinstance(value, str) and value in ("cifar10", "cifar100", "imagenet", "cifar10dvs", "digits"):
            return value
    name, k = model_config.get("name"), model_config.get("num_classes")
    if name == "sew7b_wide":
        return "cifar10dvs"
    if name == "glifnet_small" or model_config.get("in_channels") == 1:
        return "digits"
    return {10: "cifar10", 100: "cifar100", 1000: "imagenet"}.get(k)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """Rebuilds a model from a checkpoint file alone: ours (from its model_config) or a released reference file.

    `overrides` replace model options (e.g. `eager=True`); ones that change shapes make the strict load fail.
    The model gets `model_config` and `checkpoint_meta` ({format, path, dataset, epoch, step, best_acc}).
    """
    ckpt = load_checkpoint(path, map_location)
    if not is_ours(ckpt):
        return _load_reference(path, ckpt, **overrides).to(map_location)
    config = {**ckpt["model_config"], **overrides}
    name, num_classes, T = config.pop("name"), config.pop("num_classes"), config.pop("T")
    model = create_model(name, num_classes, T, **config)
    _check_and_load(model, ckpt["model"], f"{path} -> {name}", f"the file's model_config is {ckpt['model_config']}")
    model.checkpoint_meta = {
        "format": "glif2",
        "path": str(path),
        "dataset": guess_dataset(model.model_config, ckpt.get("config") if isinstance(ckpt.get("config"), dict) else None),
        **{k: ckpt[k] for k in ("epoch", "step", "best_acc") if k in ckpt},
    }
    return model.to(map_location)


# the reference's files


def _fold_old_containers(key: str) -> str:
    # SpikingJelly <= 0.0.0.0.6 kept a container's children under `.module`: a Sequential of several
    # (`conv1.0.module.0.weight`) or the single layer itself (`downsample.module.weight`); now they are `.0`, `.1`.
    key = re.sub(r"\.module\.(\d+)\.", r".\1.", key)
    return re.sub(r"\.module\.(?=[^\d])", ".0.", key)


def reference_state_dict(ckpt: dict[str, Any]) -> "OrderedDict[str, Tensor]":
    """The reference file's state dict under our key names: `state_dict`/`net`/a bare dict; prefixes stripped,
    old container naming folded, leaf names mapped through REFERENCE_KEYS."""
    for field in ("state_dict", "net", "model"):
        if isinstance(ckpt.get(field), dict):
            raw = ckpt[field]
            break
    else:
        raw = ckpt
    if not raw or not all(isinstance(v, Tensor) for v in raw.values()):
        raise CheckpointError(
            f"no state dict found (top-level keys: {sorted(ckpt)[:10]}); expected 'state_dict' (CIFAR/ImageNet "
            "files), 'net' (CIFAR10-DVS) or a dict of tensors"
        )
    out = OrderedDict()
    for key, value in clean_state_dict(raw).items():
        *path, leaf = _fold_old_containers(key).split(".")
        out[".".join([*path, REFERENCE_KEYS.get(leaf, leaf)])] = value
    return out


def infer_from_name(path: str | os.PathLike) -> dict[str, Any]:
    """arch, num_classes, T and dataset from a released file's name (empty when it matches no pattern)."""
    name = Path(path).name
    for pattern, arch, dataset in _NAME_PATTERNS:
        m = pattern.search(name)
        if not m:
            continue
        found: dict[str, Any] = {"arch": arch}
        groups = m.groupdict()
        if "k" in groups:
            found["num_classes"] = int(groups["k"])
            dataset = f"cifar{groups['k']}"
        if "t" in groups:
            found["T"] = int(groups["t"])
        if arch == "sew7b_wide":
            found.update(num_classes=10, T=16)
        elif arch.endswith("ms"):
            found["num_classes"] = 1000
        found["dataset"] = dataset
        return found
    return {}


def infer_from_shapes(sd: dict[str, Tensor]) -> dict[str, Any]:
    """arch, num_classes, T and the model options that change keys or shapes, read off the tensors."""
    found: dict[str, Any] = {}
    options: dict[str, Any] = {}
    conduct = next((k for k in sd if k.endswith(".conduct")), None)
    if conduct is not None:
        found["T"] = int(sd[conduct].shape[0])
        neuron = conduct[: -len(".conduct")]
        options["channel_wise"] = sd[conduct].dim() == 2
        options["variant"] = "glif" if f"{neuron}.alpha" in sd else "glif_f"
    bn_keys = [k[: -len(".running_mean")] for k in sd if k.endswith(".running_mean")]
    if bn_keys:
        options["bn"] = "td" if f"{bn_keys[0]}.v_th" in sd else "plain"

    if "out.weight" in sd and "conv.0.0.0.weight" in sd:  # CIFAR10-DVS 7B-wideNet
        found.update(arch="sew7b_wide", num_classes=int(sd["out.weight"].shape[0]))
        options["in_channels"] = int(sd["conv.0.0.0.weight"].shape[1])
        options["input_size"] = round(16 * (sd["out.weight"].shape[1] / 128) ** 0.5)
        alpha = next((v for k, v in sd.items() if k.endswith(".alpha")), None)
        if alpha is not None:
            options["gate_dtype"] = "float64" if alpha.dtype == torch.float64 else "float32"
    elif "classifier.2.weight" in sd and "features.0.0.weight" in sd:  # CIFARNet
        found.update(arch="cifarnet", num_classes=int(sd["classifier.2.weight"].shape[0]))
        options["in_channels"] = int(sd["features.0.0.weight"].shape[1])
        options["input_size"] = round(4 * (sd["classifier.0.weight"].shape[1] / 512) ** 0.5)
    elif "conv1.0.0.weight" in sd:  # the ResNets
        stem = sd["conv1.0.0.weight"]
        blocks = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"features\.(\d+)\.", k))), default=-1)
        ms = "features.0.body.3.0.weight" in sd
        if stem.shape[-1] == 7:
            arch = {(True, 8): "resnet18ms", (True, 16): "resnet34ms", (False, 16): "resnet34"}.get((ms, blocks))
        else:
            arch = {64: "resnet18", 128: "resnet19"}.get(int(stem.shape[0])) if not ms else None
        if arch is not None:
            found["arch"] = arch
        head = [k for k in sd if re.fullmatch(r"lastave\.\d+\.weight", k)]
        if head:
            found["num_classes"] = int(sd[max(head)].shape[0])
            options["head"] = "two_linear" if len(head) == 2 else "linear"
        options["in_channels"] = int(stem.shape[1])
    found["options"] = options
    return found


def load_reference_checkpoint(
    path: str | os.PathLike,
    arch: str | None = None,
    num_classes: int | None = None,
    T: int | None = None,
    **options: Any,
) -> nn.Module:
    """Loads one of the paper's released files (or a file in their format) into a ready model.

    arch, num_classes and T default to what the tensors say, then to what the file name says
    (`resCifar19-CIFAR100-step4-CW.pth.tar` -> resnet19, 100, 4); given explicitly they win, and a mismatch
    with the file raises CheckpointError listing the missing, unexpected and wrongly shaped keys and the values
    to pass. `options` go to create_model (e.g. `eager=True`); the neuron form, BN kind (plain for the ImageNet
    file), head and DVS gate dtype are inferred.
    """
    return _load_reference(path, load_checkpoint(path), arch=arch, num_classes=num_classes, T=T, **options)


def _load_reference(path, ckpt, arch=None, num_classes=None, T=None, **options) -> nn.Module:
    sd = reference_state_dict(ckpt)
    by_name, by_shape = infer_from_name(path), infer_from_shapes(sd)
    inferred = {k: by_shape.get(k, by_name.get(k)) for k in ("arch", "num_classes", "T")}
    arch = arch or inferred["arch"]
    num_classes = num_classes or inferred["num_classes"]
    T = T or inferred["T"]
    if arch is None or num_classes is None or T is None:
        raise CheckpointError(
            f"{path}: cannot infer the architecture from the file name or the tensors (inferred {inferred}); "
            "pass arch=..., num_classes=..., T=..."
        )
    model_options = {**by_shape["options"], **options}
    if arch != by_shape.get("arch"):  # options read off another architecture's tensors do not apply
        model_options = {k: v for k, v in model_options.items() if k in options or k in ("channel_wise", "variant", "bn")}
    model = create_model(arch, num_classes, T, **model_options)
    file_says = ", ".join(f"{k}={v!r}" for k, v in {**inferred, **by_shape["options"]}.items() if v is not None)
    _check_and_load(
        model,
        sd,
        f"{path} -> {arch}(num_classes={num_classes}, T={T})",
        f"the file looks like: {file_says}; pass those (load_reference_checkpoint(path, arch=..., num_classes=..., "
        "T=..., **options)) or omit them to infer",
    )
    model.checkpoint_meta = {
        "format": "reference",
        "path": str(path),
        "dataset": by_name.get("dataset") or guess_dataset(model.model_config),
        **{k: ckpt[k] for k in ("epoch",) if k in ckpt},
        **({"best_acc": ckpt["max_test_acc"]} if "max_test_acc" in ckpt else {}),
    }
    return model


__all__ = [
    "REFERENCE_KEYS",
    "VERSION",
    "CheckpointError",
    "clean_state_dict",
    "guess_dataset",
    "infer_from_name",
    "infer_from_shapes",
    "is_ours",
    "load_checkpoint",
    "load_model",
    "load_reference_checkpoint",
    "reference_state_dict",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "unwrap_model",
]
