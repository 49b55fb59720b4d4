"""train.py and glif2.train (config, optim, distributed, loop): presets and flags, parameter groups and schedules,
fail-fast errors, exact resume, atomic checkpoints under SIGKILL and SIGTERM, two-process DDP (gloo), and the digits
run.

Shape letters: t steps, b batch, c channels, k classes.

Runs use --compile none (the GLIF kernels are still compiled, and cached in TORCHINDUCTOR_CACHE_DIR) and T=2 so the
file stays within a few minutes on two CPU cores.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from einops import reduce, repeat
from torch import nn

from glif2.checkpoint import load_checkpoint, save_checkpoint
from glif2.models.registry import list_models, register_model, unregister_model
from glif2.neuron import GLIF
from glif2.train import cli, loop
from glif2.train.cli import parse_args
from glif2.train.config import PRESETS, TrainConfig
from glif2.train.loop import StopReason
from glif2.train.optim import build_scheduler, param_groups

ROOT = Path(__file__).resolve().parents[1]

FAST = ["--compile", "none", "--T", "2", "--no-tensorboard", "--log-interval", "50"]


class Probe(nn.Module):
    """A BN-free GLIF net for the DDP test (per-rank BN statistics would make DDP differ from one process)."""

    def __init__(self, num_classes: int, T: int, **neuron):
        super().__init__()
        self.T = T
        self.fc1 = nn.Linear(64, 32, bias=False)
        self.lif = GLIF(T, 32, **neuron)
        self.fc2 = nn.Linear(32, num_classes, bias=False)

    def forward(self, x):
        x = repeat(self.fc1(x.flatten(1)), "b c -> t b c", t=self.T)
        return reduce(self.fc2(self.lif(x)), "t b k -> b k", "mean")


def ddp_probe(num_classes: int, T: int, *, bn: str = "td", in_channels: int = 1, channel_wise: bool = True,
              params: str = "learned", **neuron):
    return Probe(num_classes, T, **neuron)


@pytest.fixture
def probe_model():
    """The probe registered for the test only (the registry is global: nothing may leak into other tests)."""
    register_model(ddp_probe)
    yield
    unregister_model("ddp_probe")


@pytest.fixture
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def run(tmp_path, *flags: str, name: str = "r") -> dict:
    return cli.train_main([*FAST, "--out-dir", str(tmp_path), "--name", name, *flags])


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# config


def test_presets_cover_the_reference_runs():
    expected = {"digits", "imagenet-resnet18ms-t6", "cifar10dvs-sew7b-t16"} | {
        f"cifar{k}-{arch}-t{t}" for k in (10, 100) for arch in ("resnet18", "resnet19") for t in (2, 4, 6)}
    assert expected <= set(PRESETS)
    for name in PRESETS:
        cfg = TrainConfig.from_name(name)
        assert cfg.model in list_models()
    r18 = TrainConfig.from_name("cifar100-resnet18-t4")
    assert (r18.dataset, r18.model, r18.T) == ("cifar100", "resnet18", 4)
    assert (r18.epochs, r18.batch_size, r18.lr, r18.weight_decay) == (200, 64, 0.1, 4e-5)
    assert r18.randomgate and r18.tunable_lif and r18.gate_lr_divisor == 10 and r18.gate_mode == "soft"
    imnet = TrainConfig.from_name("imagenet-resnet18ms-t6")
    assert imnet.gate_lr_divisor == 1 and imnet.sync_bn and loop.model_options(imnet)["bn"] == "plain"
    dvs = TrainConfig.from_name("cifar10dvs-sew7b-t16")
    assert loop.model_options(dvs)["bn"] == "plain" and not dvs.randomgate  # the model draws its float64 gates itself
    assert (dvs.param_groups, dvs.weight_decay, dvs.t_max, dvs.epochs, dvs.lr, dvs.amp) == ("single", 0.0, 64, 200,
                                                                                             0.01, True)


def test_flags_override_the_preset():
    cfg = parse_args(["--preset", "cifar10-resnet19-t4", "--epochs", "3", "--no-randomgate", "--lr", "0.05",
                      "--label-smoothing", "0.1"])
    assert (cfg.epochs, cfg.randomgate, cfg.lr, cfg.label_smoothing, cfg.T) == (3, False, 0.05, 0.1, 4)
    assert parse_args([]) == TrainConfig.from_name("digits")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_param_groups_follow_the_reference():
    from glif2 import create_model

    model = create_model("glifnet_small", 10, 2)
    named = {id(p): n.rsplit(".", 1)[-1] for n, p in model.named_parameters()}
    groups = param_groups(model, lr=0.1, weight_decay=4e-5, tunable_lif=True, gate_lr_divisor=10)
    leaves = [{named[id(p)] for p in g["params"]} for g in groups]
    assert leaves[1] == {"tau", "v_th", "leak", "conduct", "v_reset"} and leaves[2] == {"alpha", "beta", "gamma"}
    assert "weight" in leaves[0] and "bias" in leaves[0]  # BN affine parameters decay, as in the reference
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.1, 4e-5), (0.1, 0.0), (0.01, 0.0)]
    two = param_groups(model, lr=0.1, weight_decay=4e-5)
    assert len(two) == 2 and two[1]["weight_decay"] == 0 and len(two[1]["params"]) == len(groups[1]["params"]) + len(
        groups[2]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_schedules():
    def lrs(kind, epochs, t_max=0, n=None):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
        sched = build_scheduler(opt, kind=kind, epochs=epochs, t_max=t_max)
        out = []
        for _ in range(n or epochs):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    soft = lrs("soft-cosine", 10, n=14)
    assert soft[0] == 0.01 and soft[5] == pytest.approx(0.005) and soft[10:] == [0.0] * 4  # no rise after T_max
    assert soft[:10] == pytest.approx(lrs("cosine", 10), abs=1e-12)
    dvs = lrs("cosine", 200, t_max=64)
    for e in (0, 64, 128, 168):  # docs/training.md §3.3: lr(e) = 0.005 (1 + cos(pi e / 64))
        assert dvs[e] == pytest.approx(0.005 * (1 + math.cos(math.pi * e / 64)), abs=1e-9)


# fail fast


@pytest.mark.parametrize(
    "flags, env, message",
    [
        (["--preset", "cifar10-resnet99-t4"], {}, "invalid choice: 'cifar10-resnet99-t4'"),
        (["--preset", "cifar10-resnet19-t4", "--data-dir", "/nonexistent/cifar"], {}, "does not exist"),
        (["--batch-size", "63"], {"WORLD_SIZE": "2"}, "does not divide over 2 ranks"),
        (["--compile", "fast"], {}, "invalid choice: 'fast'"),
    ],
    ids=["preset", "data-folder", "batch-over-ranks", "compile-mode"],
)
def test_bad_input_fails_fast(tmp_path, monkeypatch, capsys, flags, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        cli.train_main([*flags, "--out-dir", str(tmp_path)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert time.perf_counter() - start < 5 and not any(tmp_path.iterdir())  # nothing built, nothing written


def test_resume_with_another_T_fails_fast(tmp_path, capsys):
    cfg = TrainConfig.from_name("digits", T=2, out_dir=str(tmp_path), name="r")
    save_checkpoint(tmp_path / "r" / "last.pt", model={}, config=cfg.to_dict(), epoch=1, step=22)
    with pytest.raises(SystemExit):
        run(tmp_path, "--T", "4", "--resume", "auto")
    err = capsys.readouterr().err
    assert "T=2" in err and "T=4" in err


# checkpoints and resume


def test_resume_mid_epoch_is_bitwise(tmp_path, restore_determinism):
    flags = ["--epochs", "2", "--deterministic"]
    full = run(tmp_path, *flags, name="full")
    stopped = run(tmp_path, *flags, "--max-steps", "30", name="split")  # 22 steps per epoch: stops in epoch 2
    assert (stopped["stopped"], stopped["step"], stopped["epoch"]) == (StopReason.MAX_STEPS, 30, 1)
    assert load_checkpoint(tmp_path / "split" / "last.pt")["step"] == 30
    resumed = run(tmp_path, *flags, "--resume", "auto", name="split")
    assert (resumed["step"], resumed["epoch"]) == (full["step"], full["epoch"]) == (44, 2)
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert state_equal(a["model"], b["model"])
    for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(s["momentum_buffer"], t["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"] and a["best_acc"] == b["best_acc"]
    epochs = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2]
    params = [json.loads(line) for line in (tmp_path / "split" / "glif_params.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in params] == [0, 1, 2]
    assert set(params[-1]["layers"]["features.1"]["alpha"]) == {"mean", "std", "min", "q25", "median", "q75", "max"}


_WRITER = """
import sys, torch
from glif2.checkpoint import save_checkpoint
path = sys.argv[1]
save_checkpoint(path, model={"w": torch.ones(3)}, epoch=1, step=7)
print("saved", flush=True)
big = {"w": torch.randn(64, 1024, 1024)}  # 256 MiB: the kill lands inside the write
while True:
    save_checkpoint(path, model=big, epoch=2, step=8)
"""


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "saved"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    ckpt = load_checkpoint(path)  # the old file or a complete new one, never a torn one
    assert (ckpt["epoch"], ckpt["step"]) in ((1, 7), (2, 8))
    assert ckpt["model"]["w"].shape in ((3,), (64, 1024, 1024))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    run(tmp_path, "--epochs", "1")
    last = tmp_path / "r" / "last.pt"
    before = last.read_bytes()
    forward = loop.Objective.forward

    def poisoned(self, x, y):
        loss, logits = forward(self, x, y)
        return loss * float("nan"), logits

    monkeypatch.setattr(loop.Objective, "forward", poisoned)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--epochs", "2", "--resume", "auto")
    assert e.value.code == 1
    assert "non-finite" in capsys.readouterr().err
    assert last.read_bytes() == before


def test_sigterm_saves_and_resumes(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), *FAST, "--log-interval", "1", "--epochs", "40",
           "--out-dir", str(tmp_path), "--name", "term"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    for line in proc.stdout:  # wait until training is under way
        if "step 3/" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped (sigterm)" in out
    ckpt = load_checkpoint(tmp_path / "term" / "last.pt")
    assert 0 < ckpt["step"] < 40 * 22
    resumed = run(tmp_path, "--epochs", "1", "--resume", "auto", name="term") if ckpt["step"] < 22 else None
    if resumed is not None:
        assert resumed["step"] == 22


# DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, flags: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if "ddp_probe" not in list_models():  # a spawned process starts with a fresh registry
        register_model(ddp_probe)
    result = cli.train_main([*flags, "--out-dir", out, "--name", f"ddp{world}"])
    torch.save({k: v.detach().clone() for k, v in result["model"].state_dict().items()}, f"{out}/rank{rank}.pt")


def test_ddp_two_processes_match_one(tmp_path, probe_model):
    import torch.multiprocessing as mp

    flags = [*FAST, "--model", "ddp_probe", "--batch-size", "64", "--eval-batch-size", "64", "--max-steps", "6",
             "--lr", "0.5", "--device", "cpu"]
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), flags), nprocs=2, join=True)
    single = cli.train_main([*flags, "--out-dir", str(tmp_path), "--name", "single"])["model"].state_dict()
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert state_equal(r0, r1)  # every rank holds the same parameters
    start = load_checkpoint(tmp_path / "ddp2" / "last.pt")
    assert start["step"] == 6
    for k in single:
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5)


# the default run


def test_default_run_reaches_accuracy_and_eval_agrees(tmp_path):
    result = run(tmp_path, "--epochs", "4", name="digits")
    assert result["best_acc"] >= 85.0
    best = tmp_path / "digits" / "best.pt"
    row = cli.eval_main(["--checkpoint", str(best)])[0]
    assert row["top1"] == pytest.approx(load_checkpoint(best)["test_acc"], abs=1e-9)
    assert row["dataset"] == "digits" and row["T"] == 2
