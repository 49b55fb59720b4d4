"""train.py and glif2.train (config, optim, distributed, loop, evaluation): presets and flags, parameter groups and
schedules, fail-fast errors, the digits run as shipped (compiled by regions, evaluation through the compiled graphs,
its compile artifacts saved and loaded again),
--amp (bf16 on CPU) and --sync-bn, exact resume (also after SIGTERM and under DDP), atomic checkpoints under SIGKILL,
two-process DDP (gloo) against one process, and train() leaving the process as it found it.

Shape letters: t steps, b batch, c channels, k classes.

Most runs use --compile none (the GLIF kernels are still compiled, and cached in TORCHINDUCTOR_CACHE_DIR) and T=2 so
the file stays within a few minutes on two CPU cores; the default run, --amp and the dynamo checks compile by regions
as train.py does by default.
"""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_training_state, free_ports, needs, state_equal
from datasets_fixtures import write_cifar
from einops import reduce, repeat
from torch import nn
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

import glif2
from glif2.checkpoint import load_checkpoint, save_checkpoint
from glif2.compile import run_region
from glif2.cost import CostCounter
from glif2.errors import ConfigError
from glif2.models.registry import list_models, register_model, unregister_model
from glif2.neuron import GATE_INIT_RANGE, GLIF
from glif2.train import cli, evaluation, setup
from glif2.train.cli import parse_args
from glif2.train.config import CHOICES, PRESETS, TrainConfig
from glif2.train.loop import StopReason
from glif2.train.optim import build_scheduler, param_groups
from pipelines._common import TensorLoader

ROOT = Path(__file__).resolve().parents[1]

SHIPPED = ["--T", "2", "--no-tensorboard", "--log-interval", "50"]  # the default compile (by regions)
FAST = ["--compile", "none", *SHIPPED]


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


def ddp_probe(
    num_classes: int,
    T: int,
    *,
    bn: str = "td",
    in_channels: int = 1,
    channel_wise: bool = True,
    params: str = "learned",
    **neuron,
):
    return Probe(num_classes, T, **neuron)


@pytest.fixture
def probe_model():
    """The probe registered for the test only (the registry is global: nothing may leak into other tests)."""
    register_model(ddp_probe)
    yield
    unregister_model("ddp_probe")


def run(tmp_path, *flags: str, name: str = "r") -> dict:
    return cli.train_main([*FAST, "--out-dir", str(tmp_path), "--name", name, *flags])


def records(run_dir: Path, kind: str = "epoch") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# config


def test_presets_cover_the_reference_runs():
    expected = {"digits", "imagenet-resnet18ms-t6", "cifar10dvs-sew7b-t16"} | {
        f"cifar{k}-{arch}-t{t}" for k in (10, 100) for arch in ("resnet18", "resnet19") for t in (2, 4, 6)
    }
    assert expected <= set(PRESETS)
    for name in PRESETS:
        cfg = TrainConfig.from_name(name)
        assert cfg.model in list_models()
    r18 = TrainConfig.from_name("cifar100-resnet18-t4")
    assert (r18.dataset, r18.model, r18.T) == ("cifar100", "resnet18", 4)
    assert (r18.epochs, r18.batch_size, r18.lr, r18.weight_decay) == (200, 64, 0.1, 4e-5)
    assert r18.randomgate and r18.tunable_lif and r18.gate_lr_divisor == 10 and r18.gate_mode == "soft"
    imnet = TrainConfig.from_name("imagenet-resnet18ms-t6")
    assert imnet.gate_lr_divisor == 1 and imnet.sync_bn and setup.model_options(imnet)["bn"] == "plain"
    dvs = TrainConfig.from_name("cifar10dvs-sew7b-t16")
    assert setup.model_options(dvs)["bn"] == "plain" and not dvs.randomgate  # the model draws its float64 gates itself
    assert (dvs.param_groups, dvs.weight_decay, dvs.t_max, dvs.epochs, dvs.lr, dvs.amp) == (
        "single",
        0.0,
        64,
        200,
        0.01,
        True,
    )


def test_flags_override_the_preset():
    cfg = parse_args(
        [
            "--preset",
            "cifar10-resnet19-t4",
            "--epochs",
            "3",
            "--no-randomgate",
            "--lr",
            "0.05",
            "--label-smoothing",
            "0.1",
        ]
    )
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
    assert (
        len(two) == 2
        and two[1]["weight_decay"] == 0
        and len(two[1]["params"]) == len(groups[1]["params"]) + len(groups[2]["params"])
    )
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


def test_every_config_choice_is_one_the_optimizer_takes():
    """The config's param_groups and scheduler choices are the optimizer's own: each builds, and an unknown one is
    refused naming them all."""
    model = glif2.create_model("glifnet_small", 10, 2)
    for mode in CHOICES["param_groups"]:
        assert param_groups(model, lr=0.1, weight_decay=0.0, mode=mode)
    for kind in CHOICES["scheduler"]:
        if kind != "auto":  # resolved by the loop from tunable_lif
            build_scheduler(torch.optim.SGD(model.parameters(), lr=0.1), kind=kind, epochs=4)
    with pytest.raises(ValueError, match="choose one of " + ", ".join(CHOICES["param_groups"])):
        param_groups(model, lr=0.1, weight_decay=0.0, mode="layers")
    with pytest.raises(ValueError, match="choose one of " + ", ".join(CHOICES["scheduler"][1:])):
        build_scheduler(torch.optim.SGD(model.parameters(), lr=0.1), kind="step", epochs=4)


@pytest.mark.parametrize("g", [-0.5, -0.4999, 0.0, 1.4999, 1.5, 2.0])
def test_config_and_neuron_take_the_same_gate_init(g):
    """One range for both: the config refuses (ConfigError) exactly the gate_init values GLIF refuses (ValueError),
    and GLIF's docstring and the --gate-init help state that range."""
    gate_init = (0.6, g, 0.6)
    try:
        GLIF(2, 3, gate_init=gate_init)
        neuron_error = None
    except ValueError as err:
        neuron_error = str(err)
    if neuron_error is None:
        assert TrainConfig.from_name("digits", gate_init=gate_init).gate_init == gate_init
    else:
        with pytest.raises(ConfigError) as err:
            TrainConfig.from_name("digits", gate_init=gate_init)
        assert str(err.value) == neuron_error
    assert (neuron_error is None) == (GATE_INIT_RANGE[0] < g < GATE_INIT_RANGE[1])
    stated = "g in ({}, {})".format(*GATE_INIT_RANGE)
    assert stated in " ".join(cli.build_parser().format_help().split()) and stated in " ".join(GLIF.__doc__.split())


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
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--T", "4", "--resume", "auto")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "T=2" in err and "T=4" in err


# checkpoints and resume


def test_resume_mid_epoch_is_bitwise(tmp_path):
    flags = ["--epochs", "2", "--deterministic"]
    full = run(tmp_path, *flags, name="full")
    stopped = run(tmp_path, *flags, "--max-steps", "30", name="split")  # 22 steps per epoch: stops in epoch 2
    assert (stopped["stopped"], stopped["step"], stopped["epoch"]) == (StopReason.MAX_STEPS, 30, 1)
    assert load_checkpoint(tmp_path / "split" / "last.pt")["step"] == 30
    resumed = run(tmp_path, *flags, "--resume", "auto", name="split")
    assert (resumed["step"], resumed["epoch"]) == (full["step"], full["epoch"]) == (44, 2)
    assert_same_training_state(
        load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    )
    epochs = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2]
    params = [json.loads(line) for line in (tmp_path / "split" / "glif_params.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in params] == [0, 1, 2]
    assert set(params[-1]["layers"]["features.1"]["alpha"]) == {"mean", "std", "min", "q25", "median", "q75", "max"}


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs("nvidia.dali"))])
def test_resume_mid_epoch_with_augmentation_is_bitwise(tmp_path, backend):
    """CIFAR in its real format (random pixels): crops and mirrors must come from (seed, epoch) alone, so that a run
    resumed mid-epoch sees the augmentation an uninterrupted one saw (docs/training.md §5)."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (112, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 112)
    write_cifar(str(tmp_path / "data"), "cifar10", images[:96], labels[:96], images[96:], labels[96:])
    flags = [
        "--dataset",
        "cifar10",
        "--data-dir",
        str(tmp_path / "data"),
        "--backend",
        backend,
        "--model",
        "glifnet_small",
        "--batch-size",
        "16",
        "--eval-batch-size",
        "16",
        "--epochs",
        "2",
        "--deterministic",
    ]
    full = run(tmp_path, *flags, name="full")
    run(tmp_path, *flags, "--max-steps", "8", name="split")  # 6 steps per epoch: stops in epoch 2
    resumed = run(tmp_path, *flags, "--resume", "auto", name="split")
    assert full["step"] == resumed["step"] == 12
    assert full["model"].features[0][0].in_channels == 3  # the digits net takes its input layer from the dataset
    assert_same_training_state(
        load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    )


_WRITER = """
import sys, time, torch
from glif2.checkpoint import save_checkpoint
path = sys.argv[1]
save_checkpoint(path, model={"w": torch.ones(3)}, epoch=1, step=7)
print("saved", flush=True)
save_checkpoint(path, model={"w": torch.randn(64, 1024, 1024)}, epoch=2, step=8)  # 256 MiB: killed while writing
print("written", flush=True)
time.sleep(60)
"""


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "saved"
        old = path.read_bytes()

        def writing() -> bool:  # bytes of the new checkpoint are on disk: in a temporary file, or in last.pt itself
            others = [p for p in tmp_path.iterdir() if p != path]
            return any(p.stat().st_size > 0 for p in others) or path.stat().st_size != len(old)

        deadline = time.monotonic() + 60
        while not writing():
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never started the second write"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert "written" not in rest, "the kill landed after the write: the test proved nothing"
    ckpt = load_checkpoint(path)  # the old file, whole: never a torn one
    assert (ckpt["epoch"], ckpt["step"]) == (1, 7) and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert path.read_bytes() == old
    # the torn temporary file is hidden and never taken for a checkpoint (eval.py's folder sweep, --resume)
    assert all(p.name.startswith(".") for p in tmp_path.iterdir() if p != path)
    assert evaluation.find_checkpoints(tmp_path) == [path]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    run(tmp_path, "--epochs", "1")
    last = tmp_path / "r" / "last.pt"
    before = last.read_bytes()
    forward = setup.Objective.forward

    def poisoned(self, x, y):
        loss, logits = forward(self, x, y)
        return loss * float("nan"), logits

    monkeypatch.setattr(setup.Objective, "forward", poisoned)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--epochs", "2", "--resume", "auto")
    assert e.value.code == 1
    assert "non-finite" in capsys.readouterr().err
    assert last.read_bytes() == before


def test_sigterm_checkpoints_and_the_resumed_run_is_exact(tmp_path):
    flags = ["--deterministic", "--epochs", "40"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *FAST,
        *flags,
        "--log-interval",
        "1",
        "--out-dir",
        str(tmp_path),
        "--name",
        "term",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    for line in proc.stdout:  # wait until training is under way
        if "step 3/" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped (sigterm)" in out
    stop = load_checkpoint(tmp_path / "term" / "last.pt")["step"]
    assert 3 <= stop < 40 * 22
    # Continue past the next epoch's end (22 steps each: an evaluation and a schedule step after the resume) and
    # compare with a run that was never interrupted.
    target = str(stop + 25)
    resumed = run(tmp_path, *flags, "--resume", "auto", "--max-steps", target, name="term")
    straight = run(tmp_path, *flags, "--max-steps", target, name="straight")
    assert resumed["step"] == straight["step"] == stop + 25 and resumed["epoch"] >= 1
    assert_same_training_state(
        load_checkpoint(tmp_path / "term" / "last.pt"), load_checkpoint(tmp_path / "straight" / "last.pt")
    )
    scores = ("epoch", "step", "test_loss", "test_acc", "test_top5", "best_acc", "lr")
    assert [{k: r[k] for k in scores} for r in records(tmp_path / "term")] == [
        {k: r[k] for k in scores} for r in records(tmp_path / "straight")
    ]


# DDP (gloo, two processes): one spawn runs every distributed case; the tests below check its outputs

DDP_FLAGS = [
    *FAST,
    "--model",
    "ddp_probe",
    "--memory",
    "off",
    "--batch-size",
    "64",
    "--eval-batch-size",
    "64",
    "--lr",
    "0.5",
    "--device",
    "cpu",
    "--epochs",
    "2",
    "--deterministic",
]
DDP_RUNS = [("full", []), ("split", ["--max-steps", "30"]), ("split", ["--resume", "auto"])]  # 22 steps per epoch


def eval_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """101 samples `b 6` in 7 classes and a fixed linear head `6 k` (float64): logits are `x @ head`."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(101, 6, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 7, (101,), generator=g), torch.randn(6, 7, generator=g, dtype=torch.float64)


def cost_problem() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A fixed probe (real-valued first layer, GLIF, a layer on spikes) and 101 samples `b 64` in 7 classes."""
    g = torch.Generator().manual_seed(4)
    probe = Probe(7, 2, eager=True)
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return probe.eval(), (torch.randn(101, 64, generator=g), torch.randint(0, 7, (101,), generator=g))


def _ddp_worker(rank: int, world: int, ports: list[int], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    if "ddp_probe" not in list_models():  # a spawned process starts with a fresh registry
        register_model(ddp_probe)
    # evaluation over uneven shards (51 / 50 samples) whose last batches are short (3 / 2)
    os.environ["MASTER_PORT"] = str(ports[0])
    torch.distributed.init_process_group("gloo")
    x, y, head = eval_problem()
    loader = TensorLoader(
        x,
        y,
        transform=lambda v, g: v,
        draws=0,
        num_classes=7,
        train=False,
        batch_size=16,
        rank=rank,
        world_size=world,
        seed=0,
        device="cpu",
    )
    result = evaluation.evaluate(lambda v, t: v @ head, loader, torch.device("cpu"))
    shards = [len(b) for b, _ in loader]
    Path(out, f"eval-rank{rank}.json").write_text(json.dumps({**result, "batches": shards}))
    # the cost report of a sharded evaluation: summed over both ranks
    probe, (x, y) = cost_problem()
    loader = TensorLoader(
        x,
        y,
        transform=lambda v, g: v,
        draws=0,
        num_classes=7,
        train=False,
        batch_size=16,
        rank=rank,
        world_size=world,
        seed=0,
        device="cpu",
    )
    cost = evaluation.evaluate_model(probe, loader, torch.device("cpu"), progress=False, report=True)["cost"]
    Path(out, f"cost-rank{rank}.json").write_text(json.dumps(cost))
    torch.distributed.destroy_process_group()
    # training: uninterrupted, then stopped mid-epoch 2 and resumed
    for i, (name, flags) in enumerate(DDP_RUNS, start=1):
        os.environ["MASTER_PORT"] = str(ports[i])
        result = cli.train_main([*DDP_FLAGS, *flags, "--out-dir", out, "--name", name])
        state = {k: v.detach().clone() for k, v in result["model"].state_dict().items()}
        torch.save({"state": state, "step": result["step"]}, f"{out}/{name}-{i}-rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(2, free_ports(1 + len(DDP_RUNS)), str(out)), nprocs=2, join=True)
    return out


def test_ddp_evaluation_counts_every_sample_once(ddp):
    x, y, head = eval_problem()
    logits = (x @ head).float()
    top = logits.topk(5, dim=1).indices == y[:, None]
    expected = {
        "num_samples": 101,
        "loss": F.cross_entropy(logits, y, reduction="sum").item() / 101,
        "top1": 100 * top[:, 0].sum().item() / 101,
        "top5": 100 * top.any(1).sum().item() / 101,
    }
    r0, r1 = (json.loads((ddp / f"eval-rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["batches"], r1["batches"]) == ([16, 16, 16, 3], [16, 16, 16, 2])  # uneven shards, short last batches
    for r in (r0, r1):  # every rank gets the sums over both
        assert r["num_samples"] == 101 and r["top1"] == expected["top1"] and r["top5"] == expected["top5"]
        assert r["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert 0 < expected["top1"] < expected["top5"] < 100
    # the cost report: every rank gets the counts of one process over all 101 samples
    probe, (x, _) = cost_problem()
    with torch.no_grad(), CostCounter(probe) as counter:
        probe(x)
    one = counter.report()
    for rank in (0, 1):
        cost = json.loads((ddp / f"cost-rank{rank}.json").read_text())
        assert cost["samples"] == 101 and [r["input"] for r in cost["layers"]] == ["input", "spikes"]
        for key in ("sops", "macs", "ann_macs", "energy_uj", "firing_rate"):
            assert cost[key] == pytest.approx(one[key], rel=1e-9), key
        assert cost["sops"] > 0


def test_ddp_two_processes_match_one(ddp, tmp_path, probe_model):
    single = cli.train_main([*DDP_FLAGS, "--out-dir", str(tmp_path), "--name", "single"])
    r0, r1 = (torch.load(ddp / f"full-1-rank{r}.pt")["state"] for r in (0, 1))
    assert state_equal(r0, r1)  # every rank holds the same parameters
    ours = single["model"].state_dict()
    for k in ours:
        torch.testing.assert_close(r0[k], ours[k], rtol=1e-4, atol=1e-5, msg=k)
    # the parameters did move: the state at step 30 (mid-epoch 2) differs from the final one in every tensor
    at_30 = torch.load(ddp / "split-2-rank0.pt")
    assert at_30["step"] == 30
    assert all(not torch.equal(at_30["state"][k], r0[k]) for k in r0), "some parameter never moved"
    # evaluation after each epoch, summed over both ranks: the scores of one process
    ddp_epochs, single_epochs = records(ddp / "full"), records(tmp_path / "single")
    assert [r["epoch"] for r in ddp_epochs] == [1, 2]
    for a, b in zip(ddp_epochs, single_epochs, strict=True):
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=0.3)  # one sample of 360 at most
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert ddp_epochs[1]["test_acc"] > 50


def test_ddp_mid_epoch_resume_is_bitwise(ddp):
    for rank in (0, 1):
        full, resumed = (torch.load(ddp / f"{name}-rank{rank}.pt") for name in ("full-1", "split-3"))
        assert full["step"] == resumed["step"] == 44
        assert state_equal(full["state"], resumed["state"])
    assert_same_training_state(load_checkpoint(ddp / "full" / "last.pt"), load_checkpoint(ddp / "split" / "last.pt"))
    scores = ("epoch", "step", "test_loss", "test_acc", "test_top5", "best_acc", "lr")
    assert [{k: r[k] for k in scores} for r in records(ddp / "split")] == [
        {k: r[k] for k in scores} for r in records(ddp / "full")
    ]


def test_resume_with_another_world_size_is_refused(ddp, tmp_path, probe_model, capsys):
    path = tmp_path / "from-ddp.pt"
    shutil.copy(ddp / "split" / "last.pt", path)
    with pytest.raises(SystemExit) as e:
        cli.train_main([*DDP_FLAGS, "--out-dir", str(tmp_path), "--name", "one", "--resume", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "written by a run on 2 processes and this one has 1" in err and "Resume with 2 processes" in err
    assert not (tmp_path / "one").exists()  # nothing written


# the run as shipped: the default compile, --amp, --sync-bn


def test_default_run_as_shipped_reaches_accuracy_and_eval_agrees(tmp_path):
    """train.py's defaults on CPU: the digits net compiled by regions (no breaks), the evaluation after each epoch
    without grad through the compiled regions (GLIF.forward's no-grad path); eval.py (eager) agrees. The first
    epoch saves the compile artifacts in the run folder and a resumed run loads them."""
    counters.clear()
    torch._dynamo.reset()  # the region graphs counted below are this run's only
    result = cli.train_main([*SHIPPED, "--epochs", "4", "--out-dir", str(tmp_path), "--name", "digits"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    # two regions (the features, the head), each a graph for training and one for evaluation without grad; a
    # recompile (e.g. one per epoch or per step) adds more. (The lean unit's GLIF and packing kernels are compiled
    # graphs of their own, one per layer shape.)
    assert len(_debug_get_cache_entry_list(run_region.__code__)) == 4
    cache = tmp_path / "digits" / "compile_cache.bin"
    assert cache.is_file() and json.loads(cache.read_bytes().split(b"\n", 1)[0])["torch"] == torch.__version__
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.train_main([*SHIPPED, "--epochs", "5", "--out-dir", str(tmp_path), "--name", "digits", "--resume", "auto"])
    assert not [w for w in caught if "compile cache" in str(w.message)]  # loaded, not ignored
    assert result["best_acc"] >= 85.0
    best = tmp_path / "digits" / "best.pt"
    epoch = {r["epoch"]: r for r in records(tmp_path / "digits")}[load_checkpoint(best)["epoch"]]
    row = cli.eval_main(["--checkpoint", str(best)])[0]
    assert (row["dataset"], row["T"], row["num_samples"]) == ("digits", 2, 360)
    assert row["top1"] == pytest.approx(epoch["test_acc"], abs=0.3)  # compiled and eager: one sample at most
    assert row["loss"] == pytest.approx(epoch["test_loss"], rel=1e-3)
    assert "test_sops" not in epoch  # counted only when asked (--report)


def test_report_in_the_epoch_records(tmp_path):
    """--report: every epoch record holds the test pass's firing rate, SOPs, MACs and energy per sample, the counts
    of eval.py --report on the checkpoint of that epoch."""
    run(tmp_path, "--epochs", "1", "--report", "--e-mac", "3.0", name="rep")
    (epoch,) = records(tmp_path / "rep")
    row = cli.eval_main(["--checkpoint", str(tmp_path / "rep" / "last.pt"), "--report", "--e-mac", "3.0"])[0]
    for key in ("firing_rate", "sops", "macs", "energy_uj"):
        assert epoch[f"test_{key}"] == pytest.approx(row["cost"][key], rel=1e-6), key
    assert epoch["test_sops"] > 0 and epoch["test_acc"] == pytest.approx(row["top1"])


def test_amp_bf16_on_cpu(tmp_path, monkeypatch):
    seen = set()
    check = GLIF.check_input

    def recording(self, x):  # traced into the compiled graphs: records what each GLIF layer receives
        seen.add((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), x.dtype))
        check(self, x)

    monkeypatch.setattr(GLIF, "check_input", recording)
    counters.clear()
    torch._dynamo.reset()
    # memory off: the recorder sits in GLIF.forward, which the lean path (a fused BN -> GLIF unit) does not call;
    # tests/test_memory.py checks the lean path under bf16 autocast against this one, bit for bit
    cli.train_main([*SHIPPED, "--amp", "--memory", "off", "--epochs", "1", "--out-dir", str(tmp_path), "--name", "amp"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    # two regions, training and evaluation, plus at most one recompile each when the recorder's set first grows:
    # never one per step
    assert len(_debug_get_cache_entry_list(run_region.__code__)) <= 6
    training = {(autocast, dtype) for grad, autocast, dtype in seen if grad}
    assert training == {(True, torch.bfloat16)}  # every GLIF layer gets bf16 from conv + BN under autocast
    # evaluation (no grad) autocasts too, and tdBN's evaluation keeps the bf16 of its input
    assert {(autocast, dtype) for grad, autocast, dtype in seen if not grad} == {(True, torch.bfloat16)}
    ckpt = load_checkpoint(tmp_path / "amp" / "last.pt")
    assert ckpt["config"]["amp"] and ckpt["config"]["amp_dtype"] == "bfloat16"
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt["model"].values())  # weights stay float32
    (epoch,) = records(tmp_path / "amp")
    assert math.isfinite(epoch["train_loss"]) and math.isfinite(epoch["test_loss"]) and epoch["test_acc"] > 15


def test_sync_bn_in_one_process_is_plain_bn(tmp_path):
    flags = ["--deterministic", "--epochs", "1", "--batch-size", "256"]
    sync = run(tmp_path, *flags, "--sync-bn", name="sync")
    run(tmp_path, *flags, "--bn", "plain", name="plain")
    norms = [m for m in sync["model"].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 3 and all(type(m) is nn.SyncBatchNorm for m in norms)
    a, b = load_checkpoint(tmp_path / "sync" / "last.pt"), load_checkpoint(tmp_path / "plain" / "last.pt")
    assert a["model_config"]["bn"] == "plain"  # the checkpoint says what was trained: plain BN, no tdBN scale
    assert list(a["model"]) == list(b["model"]) and a["step"] == 5
    assert_same_training_state(a, b)
    assert glif2.load_model(tmp_path / "sync" / "last.pt").state_dict().keys() == a["model"].keys()


def test_train_leaves_the_process_as_it_found_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    threads, cudnn = torch.get_num_threads(), (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        torch.set_num_threads(3)  # train() sets 1 (--threads), seeds everything and turns on determinism
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
        random.seed(1), np.random.seed(2), torch.manual_seed(3)
        rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        run(tmp_path, "--deterministic", "--threads", "1", "--max-steps", "3")
        assert random.getstate() == rng[0]
        assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), rng[1], strict=True))
        assert torch.equal(torch.get_rng_state(), rng[2])
        assert torch.get_num_threads() == 3
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (True, False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
