"""The authors' released checkpoints: one table of their files, the key map from their names to ours, and the
shape inference that reads what a file holds (the table, by file name, is the default for what the tensors leave
open). docs/networks.md §7-§8.

Shape letters: t steps, c channels, k classes.

Their files hold a state dict under `state_dict` (CIFAR, ImageNet) or `net` (CIFAR10-DVS). Keys go through
`clean_state_dict` (DDP's `module.`), old SpikingJelly container naming is folded into the new one, and the
neuron / tdBN leaf names map through REFERENCE_KEYS. Loading itself (a strict load with one error listing every
key that does not fit) is `glif2.checkpoint.load_reference_checkpoint`.
"""

import re
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from glif2.errors import CheckpointError

# The reference's neuron and tdBN leaf names -> ours. BN's weight/bias/running_* and conv and linear weights keep
# their names.
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


@dataclass(frozen=True)
class ReleasedFile:
    """What one released file holds: the model to build for it and where its state dict sits."""

    arch: str
    num_classes: int
    T: int
    dataset: str
    bn: str = "td"  # "plain": trained under SyncBN, which dropped tdBN's scale (docs/neuron.md §6)
    options: dict[str, Any] = field(default_factory=dict)


def _cifar(arch: str, k: int, t: int) -> ReleasedFile:
    return ReleasedFile(arch, k, t, f"cifar{k}")


_DVS = ReleasedFile("sew7b_wide", 10, 16, "cifar10dvs", bn="plain", options={"gate_dtype": "float64"})

# file stem -> contents. The CIFAR files are named <net>-CIFAR<k>-step<T>-CW.pth.tar; the ImageNet file was saved
# from DDP (keys start with `module.`); the three CIFAR10-DVS files are snapshots of one run.
RELEASED: dict[str, ReleasedFile] = {
    **{f"resCifar18stand-CIFAR{k}-step{t}-CW": _cifar("resnet18", k, t) for k in (10, 100) for t in (2, 4, 6)},
    **{f"resCifar19-CIFAR{k}-step{t}-CW": _cifar("resnet19", k, t) for k in (10, 100) for t in (2, 4, 6)},
    "resnet18MS-ImageNet-step6": ReleasedFile("resnet18ms", 1000, 6, "imagenet", bn="plain"),
    "checkpoint_max": _DVS,
    "checkpoint_max-1": _DVS,
    "checkpoint_max_newest": _DVS,
}


def released_file(path: str | Path) -> ReleasedFile | None:
    """The entry of the released file `path` is, by name: the longest table stem the file name contains (the exact
    stem when it is one; the authors' own loader also matched names by substring). None when the name says
    nothing."""
    found = [stem for stem in RELEASED if stem in Path(path).name]
    return RELEASED[max(found, key=len)] if found else None


def clean_state_dict(state_dict: dict[str, Tensor]) -> "OrderedDict[str, Tensor]":
    """Strips DDP's leading `module.` and torch.compile's `_orig_mod.` (anywhere) from every key."""
    out = OrderedDict()
    for key, value in state_dict.items():
        key = key.replace("_orig_mod.", "")
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def _fold_old_containers(key: str) -> str:
    # SpikingJelly <= 0.0.0.0.6 kept a container's children under `.module`: a Sequential of several
    # (`conv1.0.module.0.weight`) or the single layer itself (`downsample.module.weight`); now they are `.0`, `.1`.
    key = re.sub(r"\.module\.(\d+)\.", r".\1.", key)
    return re.sub(r"\.module\.(?=[^\d])", ".0.", key)


def reference_state_dict(ckpt: dict[str, Any]) -> "OrderedDict[str, Tensor]":
    """The reference file's state dict under our key names: `state_dict`/`net`/a bare dict; prefixes stripped,
    old container naming folded, leaf names mapped through REFERENCE_KEYS."""
    for name in ("state_dict", "net", "model"):
        if isinstance(ckpt.get(name), dict):
            raw = ckpt[name]
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


def infer_from_shapes(sd: dict[str, Tensor]) -> dict[str, Any]:
    """arch, num_classes, T and the model options that change keys or shapes, read off the tensors (a key is left
    out when they do not tell)."""
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


# Where the tensors say what the file holds, for the note when they contradict its name.
_WHERE = {
    "arch": "the key layout",
    "num_classes": "the classifier's rows",
    "T": "conduct's shape",
    "bn": "the BN buffers",
    "gate_dtype": "the gates' dtype",
}


def resolve(
    path: str | Path,
    sd: dict[str, Tensor],
    arch: str | None = None,
    num_classes: int | None = None,
    T: int | None = None,
    given: Collection[str] = (),
) -> dict[str, Any]:
    """What to build for a reference state dict: {arch, num_classes, T, options, dataset, says, note}.

    Explicit arguments win (arch, num_classes, T, and the model options named in `given`, which the caller sets
    itself). Otherwise the tensors decide what they show (the architecture when their keys are a registered network's
    layout, conduct's T, the classifier's classes, BN kind, neuron form, input channels, gate dtype), and the
    released-file table, picked by the file name, fills in the rest: the name is a default, never an override
    (docs/networks.md §8.2). `note` is one line naming what the tensors decided against the name (None when they
    agree); `says` describes the tensors, for error messages.
    """
    table = released_file(path)
    by_shape = infer_from_shapes(sd)
    named = {"arch": table.arch, "num_classes": table.num_classes, "T": table.T} if table else {}
    inferred = {k: by_shape[k] if by_shape.get(k) is not None else named.get(k) for k in ("arch", "num_classes", "T")}
    chosen = {
        "arch": arch or inferred["arch"],
        "num_classes": num_classes or inferred["num_classes"],
        "T": T or inferred["T"],
    }
    if None in chosen.values():
        raise CheckpointError(
            f"{path}: cannot infer the architecture from the file name or the tensors (inferred {inferred}); "
            "pass arch=..., num_classes=..., T=..."
        )
    options = dict(by_shape["options"])
    if chosen["arch"] != by_shape.get("arch"):  # options read off another architecture's tensors do not apply
        options = {k: v for k, v in options.items() if k in ("channel_wise", "variant", "bn")}
    table_fits = table is not None and table.arch == chosen["arch"]
    if table_fits:
        named.update(bn=table.bn, **table.options)
        options = {"bn": table.bn, **table.options, **options}  # the tensors' word over the table's
    # Whatever is built unlike the name and was not asked for explicitly came from the tensors.
    explicit = {k for k, v in {"arch": arch, "num_classes": num_classes, "T": T}.items() if v} | set(given)
    built = {**chosen, **options}
    overruled = [k for k, v in named.items() if k not in explicit and built.get(k, v) != v]
    said = [f"{k}={built[k]!r} from {_WHERE.get(k, 'the tensors')} (the name suggests {named[k]!r})" for k in overruled]
    note = f"{Path(path).name}: " + "; ".join(said) if said else None
    shapes = {**{k: by_shape.get(k) for k in ("arch", "num_classes", "T")}, **by_shape["options"]}
    says = ", ".join(f"{k}={v!r}" for k, v in shapes.items() if v is not None)
    same_data = table_fits and table.num_classes == chosen["num_classes"]
    return {**chosen, "options": options, "dataset": table.dataset if same_data else None, "says": says, "note": note}


__all__ = [
    "REFERENCE_KEYS",
    "RELEASED",
    "ReleasedFile",
    "clean_state_dict",
    "infer_from_shapes",
    "reference_state_dict",
    "released_file",
    "resolve",
]
