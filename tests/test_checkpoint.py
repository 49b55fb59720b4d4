"""glif2.checkpoint and glif2.convert: the released-file loader (fixtures built from the key tables of
docs/networks.md §8.3), our checkpoint round trip and its atomic write."""

import argparse
import logging
import os
import random

import numpy as np
import pytest
import torch
from spec_layouts import dvs_layout, layout, old_naming, random_state_dict

import glif2
from glif2 import convert
from glif2.checkpoint import CheckpointError, clean_state_dict, rng_state, set_rng_state
from glif2.released import REFERENCE_KEYS

pytestmark = pytest.mark.usefixtures("uncompiled")  # the fused kernels are not what these tests are about

# (file name, arch, classes, T, layout options, the key count where docs/networks.md §7.1 gives it: at T=6, DVS T=16)
RELEASED = [
    ("resCifar18stand-CIFAR10-step6-CW.pth.tar", "resnet18", 10, 6, {}, 308),
    ("resCifar18stand-CIFAR100-step2-CW.pth.tar", "resnet18", 100, 2, {}, None),
    ("resCifar19-CIFAR10-step4-CW.pth.tar", "resnet19", 10, 4, {}, None),
    ("resCifar19-CIFAR100-step6-CW.pth.tar", "resnet19", 100, 6, {}, 306),
    ("resnet18MS-ImageNet-step6.pth.tar", "resnet18ms", 1000, 6, {"td": False}, 283),
    ("checkpoint_max.pth", "sew7b_wide", 10, 16, {}, 226),
]
# Files in the reference format that were never released (names give nothing away: shapes decide).
UNNAMED = [
    ("some-cifarnet.pth.tar", "cifarnet", 10, 2, {}),
    ("layerwise19.pth.tar", "resnet19", 10, 2, {"channel_wise": False}),
    ("softsimple18.pth.tar", "resnet18", 100, 2, {"variant": "glif_f", "two_linear": False}),
    ("r34.pth.tar", "resnet34", 1000, 2, {}),
]


def ours(key):
    *path, leaf = key.split(".")
    return ".".join([*path, REFERENCE_KEYS.get(leaf, leaf)])


def write_reference(path, arch, K, T, opts, *, prefix="", old=False, extra=None):
    """A file in the reference format: {'state_dict': ...} (or {'net': ...} + training state for DVS)."""
    sd = random_state_dict(layout(arch, K, T, **opts), float64_gates=arch == "sew7b_wide")
    stored = {prefix + (old_naming(k) if old else k): v for k, v in sd.items()}
    if arch == "sew7b_wide":
        payload = {
            "net": stored,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "lr_scheduler": {"last_epoch": 3},
            "epoch": 168,
            "max_test_acc": 0.781,
        }
    else:
        payload = {"state_dict": stored}
    payload.update(extra or {})
    torch.save(payload, path)
    return sd


def assert_loaded(model, sd):
    got = model.state_dict()
    assert len(got) == len(sd)
    for k, v in sd.items():
        assert got[ours(k)].dtype == v.dtype, k
        assert torch.equal(got[ours(k)], v), k


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("reference")


@pytest.mark.parametrize("name, arch, K, T, opts, keys", RELEASED, ids=[r[0] for r in RELEASED])
def test_released_layouts_load_strictly(ref_dir, name, arch, K, T, opts, keys):
    if keys is not None:
        assert len(layout(arch, K, 6 if arch != "sew7b_wide" else 16, **opts)) == keys
    prefix = "module." if arch == "resnet18ms" else ""  # saved from DDP (docs/networks.md §7.2)
    sd = write_reference(ref_dir / name, arch, K, T, opts, prefix=prefix)
    model = glif2.load_reference_checkpoint(ref_dir / name)
    assert (model.model_config["name"], model.model_config["num_classes"], model.model_config["T"]) == (arch, K, T)
    assert model.checkpoint_meta["note"] is None  # the tensors agree with the name: nothing to say
    assert_loaded(model, sd)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    plain = arch in ("resnet18ms", "sew7b_wide")
    assert all(isinstance(m, glif2.tdBatchNorm) != plain for m in bn)
    if arch == "sew7b_wide":
        assert model.conv[0][1].alpha.dtype == torch.float64
        assert model.checkpoint_meta["dataset"] == "cifar10dvs" and model.checkpoint_meta["epoch"] == 168
    else:
        x = torch.randn(1, 3, 16, 16)
        assert torch.isfinite(model.eval()(x)).all()


@pytest.mark.parametrize("name, arch, K, T, opts", UNNAMED, ids=[u[0] for u in UNNAMED])
def test_unreleased_layouts_inferred_from_shapes(tmp_path, name, arch, K, T, opts):
    sd = write_reference(tmp_path / name, arch, K, T, opts)
    model = glif2.load_reference_checkpoint(tmp_path / name)
    assert (model.model_config["name"], model.model_config["num_classes"], model.model_config["T"]) == (arch, K, T)
    assert_loaded(model, sd)


@pytest.mark.parametrize(
    "arch, K, T", [("resnet19", 10, 2), ("resnet18ms", 1000, 2), ("sew7b_wide", 10, 2), ("cifarnet", 10, 2)]
)
def test_old_container_naming_and_prefixes(tmp_path, arch, K, T):
    opts = {"td": False} if arch == "resnet18ms" else {}
    path = tmp_path / "old.pth.tar"
    sd = write_reference(path, arch, K, T, opts, prefix="module.", old=True)
    stored = torch.load(path, weights_only=True)
    assert any(".module." in k for k in (stored.get("state_dict") or stored["net"]))
    assert_loaded(glif2.load_reference_checkpoint(path), sd)


def test_namespace_in_file_is_allowed(tmp_path):
    path = tmp_path / "resCifar19-CIFAR10-step2-CW.pth.tar"
    write_reference(path, "resnet19", 10, 2, {}, extra={"args": argparse.Namespace(t=2, cifar100=False)})
    assert glif2.load_reference_checkpoint(path).model_config["T"] == 2


def test_wrong_classes_names_keys_and_hint(ref_dir):
    path = ref_dir / "resCifar19-CIFAR10-step4-CW.pth.tar"
    if not path.exists():
        write_reference(path, "resnet19", 10, 4, {})
    with pytest.raises(CheckpointError) as err:
        glif2.load_reference_checkpoint(path, num_classes=100)
    msg = str(err.value)
    assert "lastave.1.weight" in msg and "wrong shape" in msg and "num_classes=10" in msg


def test_wrong_T_names_conduct_and_hint(tmp_path):
    path = tmp_path / "resCifar18stand-CIFAR10-step6-CW.pth.tar"
    write_reference(path, "resnet18", 10, 6, {})
    with pytest.raises(CheckpointError) as err:
        glif2.load_reference_checkpoint(path, T=4)
    msg = str(err.value)
    assert "conv1.1.conduct: file (6, 64) vs model (4, 64)" in msg and "T=6" in msg


def test_wrong_arch_lists_missing_and_unexpected(tmp_path):
    path = tmp_path / "x.pth.tar"
    write_reference(path, "resnet19", 10, 2, {})
    with pytest.raises(CheckpointError) as err:
        glif2.load_reference_checkpoint(path, arch="resnet18ms")
    msg = str(err.value)
    assert "missing" in msg and "unexpected" in msg and "arch='resnet19'" in msg


def test_missing_key(tmp_path):
    path = tmp_path / "resCifar19-CIFAR100-step2-CW.pth.tar"
    sd = random_state_dict(layout("resnet19", 100, 2))
    del sd["features.3.lif.reVth"]
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match=r"(?s)1 missing.*features\.3\.lif\.v_reset"):
        glif2.load_reference_checkpoint(path)


def test_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "resCifar19-CIFAR10-step2-CW.pth.tar"
    write_reference(good, "resnet19", 10, 2, {})
    data = good.read_bytes()
    (tmp_path / "truncated.pth.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.pth.tar").write_text("not a checkpoint\n")
    (tmp_path / "empty.pth.tar").write_bytes(b"")
    for name in ("truncated.pth.tar", "notes.pth.tar", "empty.pth.tar"):
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint|cannot be read"):
            glif2.load_model(tmp_path / name)
    torch.save({"weights": [1, 2, 3]}, tmp_path / "list.pth.tar")
    with pytest.raises(CheckpointError, match="no state dict found"):
        glif2.load_reference_checkpoint(tmp_path / "list.pth.tar")
    torch.save({"state_dict": {"foo.weight": torch.zeros(3)}}, tmp_path / "foo.pth.tar")
    with pytest.raises(CheckpointError, match="cannot infer the architecture"):
        glif2.load_reference_checkpoint(tmp_path / "foo.pth.tar")


def test_the_name_is_a_default_the_tensors_decide(tmp_path, caplog):
    """An authors'-format CIFAR10-DVS file trained at T=4 and saved under their default name (which the table reads
    as T=16) loads at T=4 with a one-line note, and gives exactly the logits of the authors' network at T=4 built
    directly with the same weights."""
    sd = random_state_dict(dvs_layout(10, T=4), float64_gates=True)
    for key in sd:  # BN weight 1, bias 0.3: the neurons fire, so the logits depend on every layer's spikes
        if key.endswith(".0.1.weight"):
            sd[key] = torch.ones_like(sd[key])
        elif key.endswith(".0.1.bias"):
            sd[key] = torch.full_like(sd[key], 0.3)
    path = tmp_path / "checkpoint_max.pth"
    torch.save({"net": sd, "epoch": 11, "max_test_acc": 0.5}, path)
    with caplog.at_level(logging.WARNING, logger="glif2.checkpoint"):
        model = glif2.load_reference_checkpoint(path, eager=True)
    assert caplog.messages == ["checkpoint_max.pth: T=4 from conduct's shape (the name suggests 16)"]
    assert (model.model_config["name"], model.model_config["num_classes"], model.model_config["T"]) == (
        "sew7b_wide",
        10,
        4,
    )
    assert model.checkpoint_meta["dataset"] == "cifar10dvs" and model.conv[0][1].alpha.dtype == torch.float64
    authors = glif2.create_model("sew7b_wide", 10, 4, eager=True)  # plain BN, float64 gates: their 7B-wideNet
    authors.load_state_dict({ours(k): v for k, v in sd.items()}, strict=True)
    x = torch.randint(0, 4, (3, 4, 2, 48, 48), generator=torch.Generator().manual_seed(1)).float()
    with torch.no_grad(), glif2.FiringRates(model.eval()) as fr:
        logits = model(x)
    assert 0.01 < fr.overall() < 0.99
    assert torch.equal(logits, authors.eval()(x).detach())


def test_a_cifar_name_with_other_tensors(tmp_path, caplog):
    """The classifier's rows and conduct's T win over a CIFAR name; the table's dataset then no longer applies. A
    file whose tensors fit no registered network keeps the strict error, and explicit arguments still win."""
    path = tmp_path / "resCifar19-CIFAR10-step4-CW.pth.tar"
    sd = write_reference(path, "resnet19", 100, 2, {})
    with caplog.at_level(logging.WARNING, logger="glif2.checkpoint"):
        model = glif2.load_reference_checkpoint(path)
    assert caplog.messages == [
        f"{path.name}: num_classes=100 from the classifier's rows (the name suggests 10); T=2 "
        "from conduct's shape (the name suggests 4)"
    ]
    assert (model.model_config["num_classes"], model.model_config["T"]) == (100, 2)
    assert model.checkpoint_meta["dataset"] is None  # not CIFAR-10: eval.py guesses cifar100 from the classes
    assert_loaded(model, sd)
    with pytest.raises(CheckpointError, match=r"conv1\.1\.conduct: file \(2, 128\) vs model \(4, 128\)"):
        glif2.load_reference_checkpoint(path, T=4)
    odd = {k: v for k, v in random_state_dict(layout("resnet19", 10, 4)).items()}
    odd["conv1.0.0.weight"] = torch.zeros(96, 3, 3, 3)  # a stem width no registered network has
    torch.save({"state_dict": odd}, tmp_path / "checkpoint_max.pth")
    with pytest.raises(CheckpointError, match=r"(?s)-> sew7b_wide.*missing.*unexpected.*tensors look like"):
        glif2.load_reference_checkpoint(tmp_path / "checkpoint_max.pth")


def test_convert_writes_our_format(tmp_path):
    ref = tmp_path / "resCifar19-CIFAR100-step2-CW.pth.tar"
    sd = write_reference(ref, "resnet19", 100, 2, {})
    out = convert.main([str(ref), str(tmp_path / "r19.pt")])
    ckpt = glif2.load_checkpoint(out)
    assert ckpt["version"] == glif2.checkpoint.VERSION and ckpt["config"]["dataset"] == "cifar100"
    model = glif2.load_model(out)
    assert model.checkpoint_meta["format"] == "glif2" and model.checkpoint_meta["dataset"] == "cifar100"
    assert_loaded(model, sd)


# ours


def _trained_small(T=2):
    torch.manual_seed(0)
    model = glif2.create_model("glifnet_small", 10, T, gate_mode="hard")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return model, opt, x


def test_round_trip_identical_logits(tmp_path):
    model, opt, x = _trained_small()
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)
    path = glif2.save_checkpoint(
        tmp_path / "run" / "last.pt",
        model=model,
        optimizer=opt,
        scheduler=sched,
        rng=rng_state(),
        epoch=4,
        step=40,
        best_acc=91.5,
        config={"dataset": "digits", "lr": 0.1, "milestones": [3, 6]},
    )
    ckpt = glif2.load_checkpoint(path)
    assert ckpt["epoch"] == 4 and ckpt["config"]["milestones"] == [3, 6] and "state" in ckpt["optimizer"]
    loaded = glif2.load_model(path)
    assert loaded.model_config == model.model_config and loaded.model_config["gate_mode"] == "hard"
    assert loaded.checkpoint_meta == {
        "format": "glif2",
        "path": str(path),
        "dataset": "digits",
        "epoch": 4,
        "step": 40,
        "best_acc": 91.5,
    }
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x))
    opt2 = torch.optim.SGD(loaded.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ckpt["optimizer"])


def test_round_trip_dvs_float64_gates(tmp_path):
    model = glif2.create_model("sew7b_wide", 10, 2, input_size=16)
    path = glif2.save_checkpoint(tmp_path / "dvs.pt", model=model)
    loaded = glif2.load_model(path)
    assert loaded.conv[0][1].alpha.dtype == torch.float64
    x = torch.rand(2, 2, 2, 16, 16)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x))


def test_wrapped_model_saves_clean_keys(tmp_path):
    model = glif2.create_model("glifnet_small", 10, 2)
    compiled = torch.compile(model)  # wraps as `_orig_mod`; nothing is compiled until it is called
    path = glif2.save_checkpoint(tmp_path / "c.pt", model=compiled)
    ckpt = glif2.load_checkpoint(path)
    assert list(ckpt["model"]) == list(model.state_dict()) and ckpt["model_config"] == model.model_config
    dirty = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    assert list(clean_state_dict(dirty)) == list(model.state_dict())


def test_crash_between_write_and_rename_keeps_old_file(tmp_path, monkeypatch):
    model, _, _ = _trained_small()
    path = glif2.save_checkpoint(tmp_path / "ckpt.pt", model=model, epoch=1)

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        glif2.save_checkpoint(path, model=model, epoch=2)
    monkeypatch.undo()
    assert glif2.load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left behind


def test_load_model_overrides_and_shape_errors(tmp_path):
    model = glif2.create_model("glifnet_small", 10, 2)
    path = glif2.save_checkpoint(tmp_path / "m.pt", model=model)
    assert glif2.load_model(path, memory="off").model_config["memory"] == "off"
    with pytest.raises(CheckpointError, match="conduct: file"):
        glif2.load_model(path, T=3)


def test_configs_under_the_deprecated_gate_names_load_silently(tmp_path, recwarn):
    """Files written before gate_mode= / gate_init= were named store gates / gate: they load under the new names,
    without a warning (the user did not write them); create_model still takes the old keywords, with one."""
    with pytest.warns(DeprecationWarning, match="gates= is deprecated"):
        model = glif2.create_model("glifnet_small", 10, 2, gates="hard", memory="off")
    assert model.model_config["gate_mode"] == "hard" and "gates" not in model.model_config
    config = {
        ("gates" if k == "gate_mode" else "gate" if k == "gate_init" else k): v for k, v in model.model_config.items()
    }
    path = glif2.save_checkpoint(tmp_path / "old.pt", model=model, model_config=config)
    recwarn.clear()
    loaded = glif2.load_model(path)
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
    assert loaded.model_config["gate_mode"] == "hard" and loaded.features[1].gate_mode == "hard"


def test_rng_state_round_trip(tmp_path):
    path = glif2.save_checkpoint(tmp_path / "rng.pt", rng=rng_state())
    a = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(glif2.load_checkpoint(path)["rng"])
    b = (random.random(), np.random.rand(), torch.rand(1))
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])
