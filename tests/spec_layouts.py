"""The reference checkpoints' key layouts, written from docs/networks.md §2-§4 and §8.3, independently of
glif2.models: name -> (shape, kind) with the reference's own leaf names (Vth, reVth). Used to build fixture files
in the reference format and to count parameters.

Shape letters: t steps, c channels, k classes.
"""

import re
from collections import OrderedDict

import torch

PARAM, BUFFER = "param", "buffer"


def glif(d, prefix, c, T, *, channel_wise=True, variant="glif"):
    shape = (c,) if channel_wise else ()
    gates = ("alpha", "beta", "gamma") if variant == "glif" else ("gamma",)
    for name in (*gates, "tau", "Vth", "leak", "reVth"):
        d[f"{prefix}.{name}"] = (shape, PARAM)
    d[f"{prefix}.conduct"] = ((T, c) if channel_wise else (T,), PARAM)


def bn(d, prefix, c, *, td=True):
    d[f"{prefix}.weight"] = ((c,), PARAM)
    d[f"{prefix}.bias"] = ((c,), PARAM)
    d[f"{prefix}.running_mean"] = ((c,), BUFFER)
    d[f"{prefix}.running_var"] = ((c,), BUFFER)
    d[f"{prefix}.num_batches_tracked"] = ((), BUFFER)
    if td:
        d[f"{prefix}.Vth"] = ((), BUFFER)


def conv(d, prefix, c_out, c_in, k):
    d[f"{prefix}.weight"] = ((c_out, c_in, k, k), PARAM)


def _blocks(first, widths, repeats, strides):
    out, c_in = [], first
    for c, n, s in zip(widths, repeats, strides, strict=True):
        for i in range(n):
            out.append((c_in, c, s if i == 0 else 1))
            c_in = c
    return out


ARCHS = {
    # name: (stem channels, stem kernel, stage widths, repeats, strides, membrane shortcut)
    "resnet18": (64, 3, (64, 128, 256, 512), (2, 2, 2, 2), (1, 1, 2, 2), False),
    "resnet19": (128, 3, (128, 256, 512), (3, 3, 2), (1, 2, 2), False),
    "resnet34": (64, 7, (64, 128, 256, 512), (3, 4, 6, 3), (2, 2, 2, 2), False),
    "resnet18ms": (64, 7, (64, 128, 256, 512), (2, 2, 2, 2), (2, 2, 2, 2), True),
    "resnet34ms": (64, 7, (64, 128, 256, 512), (3, 4, 6, 3), (2, 2, 2, 2), True),
}


def resnet_layout(arch, K, T, *, td=True, channel_wise=True, variant="glif", two_linear=None):
    """The key templates of docs/networks.md §8.3. two_linear=None applies the reference's rule for the released
    (CW GLIF) classes."""
    stem_c, stem_k, widths, repeats, strides, ms = ARCHS[arch]
    if two_linear is None:
        two_linear = K <= 50 and arch != "resnet34"
    d = OrderedDict()
    g = {"T": T, "channel_wise": channel_wise, "variant": variant}
    conv(d, "conv1.0.0", stem_c, 3, stem_k)
    bn(d, "conv1.0.1", stem_c, td=td)
    glif(d, "conv1.1", stem_c, **g)
    for i, (c_in, c, s) in enumerate(_blocks(stem_c, widths, repeats, strides)):
        p = f"features.{i}"
        if ms:
            glif(d, f"{p}.body.0", c_in, **g)
            conv(d, f"{p}.body.1.0", c, c_in, 3)
            bn(d, f"{p}.body.1.1", c, td=td)
            glif(d, f"{p}.body.2", c, **g)
            conv(d, f"{p}.body.3.0", c, c, 3)
            bn(d, f"{p}.body.3.1", c, td=td)
        else:
            conv(d, f"{p}.body.0.0", c, c_in, 3)
            bn(d, f"{p}.body.0.1", c, td=td)
            glif(d, f"{p}.body.1", c, **g)
            conv(d, f"{p}.body.2.0", c, c, 3)
            bn(d, f"{p}.body.2.1", c, td=td)
        if c_in == c and s == 1:
            bn(d, f"{p}.downsample.0", c, td=td)
        else:
            conv(d, f"{p}.downsample.0.0", c, c_in, 1)
            bn(d, f"{p}.downsample.0.1", c, td=td)
        if not ms:
            glif(d, f"{p}.lif", c, **g)
    if two_linear:
        d["lastave.0.weight"] = ((256, 512), PARAM)
        d["lastave.1.weight"] = ((K, 256), PARAM)
    else:
        d["lastave.0.weight"] = ((K, 512), PARAM)
    return d


def cifarnet_layout(K, T):
    d = OrderedDict()
    c_in, i = 3, 0
    for v in (128, 256, "A", 512, "A", 1024, 512):
        if v == "A":
            i += 1
            continue
        conv(d, f"features.{i}.0", v, c_in, 3)
        bn(d, f"features.{i}.1", v)
        glif(d, f"features.{i + 1}", v, T)
        c_in, i = v, i + 2
    d["classifier.0.weight"] = ((1024, 512 * 8 * 8), PARAM)
    d["classifier.1.weight"] = ((512, 1024), PARAM)
    d["classifier.2.weight"] = ((K, 512), PARAM)
    return d


def dvs_layout(K=10, T=16):
    """A.4: SEWResNet_GLIF_dsr (plain BN)."""
    d = OrderedDict()

    def unit(prefix, c_out, c_in, k):
        conv(d, f"{prefix}.0.0", c_out, c_in, k)
        bn(d, f"{prefix}.0.1", c_out, td=False)
        glif(d, f"{prefix}.1", c_out, T)

    unit("conv.0", 64, 2, 1)
    for n in (1, 2, 3, 4):
        unit(f"conv.{n}.conv.0", 64, 64, 3)
        unit(f"conv.{n}.conv.1", 64, 64, 3)
    unit("conv.6", 128, 64, 1)
    for n in (7, 9, 11):
        unit(f"conv.{n}.conv.0", 128, 128, 3)
        unit(f"conv.{n}.conv.1", 128, 128, 3)
    d["out.weight"] = ((K, 1152), PARAM)
    d["out.bias"] = ((K,), PARAM)
    return d


def layout(arch, K, T, **kw):
    if arch == "cifarnet":
        return cifarnet_layout(K, T)
    if arch == "sew7b_wide":
        return dvs_layout(K, T)
    return resnet_layout(arch, K, T, **kw)


def count_params(d):
    n = 0
    for shape, kind in d.values():
        if kind == PARAM:
            n += int(torch.Size(shape).numel())
    return n


def random_state_dict(d, *, seed=0, float64_gates=False):
    """Random tensors with the layout's names and shapes (running_var positive, counters int64, Vth 0.5)."""
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for name, (shape, kind) in d.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[name] = torch.tensor(1000, dtype=torch.int64)
        elif kind == BUFFER and leaf == "Vth":
            out[name] = torch.tensor(0.5)
        elif leaf == "running_var":
            out[name] = torch.rand(shape, generator=g) + 0.5
        else:
            dtype = torch.float64 if float64_gates and leaf in ("alpha", "beta", "gamma") else torch.float32
            out[name] = torch.randn(shape, generator=g, dtype=dtype) * 0.1
    return out


_OLD_RULES = (
    # an identity shortcut's container holds a single BN: SpikingJelly <= 0.0.0.0.6 stored it as `.module` itself
    (re.compile(r"^(features\.\d+\.downsample)\.0\.([A-Za-z_]+)$"), r"\1.module.\2"),
    # every other container holds several layers, stored under `.module` as a Sequential
    (
        re.compile(
            r"^(.*(?:conv1\.0|body\.\d|downsample\.0|conv\.\d+\.0|conv\.[01]\.0|^features\.\d+|classifier|lastave))"
            r"\.(\d+)\.([A-Za-z_]+)$"
        ),
        r"\1.module.\2.\3",
    ),
)


def old_naming(key):
    """The key under SpikingJelly <= 0.0.0.0.6's container naming (children under `.module`)."""
    for pattern, replacement in _OLD_RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key
