"""eval.py end to end on digits with tiny checkpoints (JSON checked), and its metric arithmetic."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import glif2
import pipelines
from glif2.analysis import glif_layers
from glif2.cost import E_MAC, CostCounter
from glif2.train import cli, evaluation

pytestmark = pytest.mark.usefixtures("uncompiled")  # the fused kernels are not what these tests are about

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    paths = []
    x, _ = next(iter(pipelines.build_loader("digits", "train", data_dir=None, batch_size=256)))
    for i, T in enumerate((2, 3)):
        model = glif2.create_model("glifnet_small", 10, T)
        with torch.no_grad():  # BN statistics of real digits, so that every layer fires in evaluation
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.momentum = 1.0
            model(x)
        paths.append(glif2.save_checkpoint(folder / f"tiny{i}.pt", model=model, epoch=i, config={"dataset": "digits"}))
    return folder, paths


def test_eval_file_writes_json(tiny_checkpoints, tmp_path, capsys):
    _, paths = tiny_checkpoints
    out = tmp_path / "res" / "eval.json"
    rows = cli.eval_main(["--checkpoint", str(paths[0]), "--batch-size", "90", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    (row,) = json.loads(out.read_text())
    assert row["checkpoint"] == str(paths[0]) and row["format"] == "glif2" and row["dataset"] == "digits"
    assert (row["arch"], row["T"], row["num_classes"], row["num_samples"]) == ("glifnet_small", 2, 10, 360)
    assert "cost" not in row  # counted only when asked (--report)
    assert 0 <= row["top1"] <= row["top5"] <= 100 and row["loss"] > 0 and row["images_per_s"] > 0
    # every number again by hand: the checkpoint's model in eval mode over the whole digits test split
    model = glif2.load_model(paths[0]).eval()
    spikes = {name: [] for name, _ in glif_layers(model)}
    handles = [
        m.register_forward_hook(lambda m, i, o, n=name: spikes[n].append(o.detach())) for name, m in glif_layers(model)
    ]
    x, y = (
        torch.cat(v) for v in zip(*pipelines.build_loader("digits", "test", data_dir=None, batch_size=360), strict=True)
    )
    with torch.no_grad():
        logits = model(x)
    for h in handles:
        h.remove()
    assert row["top1"] == pytest.approx(100 * (logits.argmax(1) == y).double().mean().item(), abs=1e-9)
    assert row["top5"] == pytest.approx(100 * (logits.topk(5, 1).indices == y[:, None]).any(1).double().mean().item())
    assert row["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    rates = {name: torch.cat(s, dim=1).mean().item() for name, s in spikes.items()}  # t b c h w, over one pass
    assert list(row["firing_rates"]) == list(rates) and row["firing_rates"] == pytest.approx(rates, rel=1e-6)
    assert all(0 < r < 1 for r in rates.values())
    sizes = {name: torch.cat(s, dim=1).numel() for name, s in spikes.items()}
    overall = sum(rates[n] * sizes[n] for n in rates) / sum(sizes.values())
    assert row["firing_rate"] == pytest.approx(overall, rel=1e-6)
    printed = capsys.readouterr().out
    assert "top-1" in printed and "features.1" in printed and "images/s" in printed


def test_eval_report(tiny_checkpoints, tmp_path, capsys):
    """--report: the cost of the evaluated pass (in batches of 90) equals glif2.cost's count over the whole test split
    in one batch; the table is printed, the JSON holds it, the constants are the ones given."""
    _, paths = tiny_checkpoints
    out = tmp_path / "report.json"
    cli.eval_main(
        ["--checkpoint", str(paths[0]), "--batch-size", "90", "--report", "--e-ac", "0.5", "--json", str(out)]
    )
    (row,) = json.loads(out.read_text())
    cost = row["cost"]
    assert (cost["samples"], cost["steps"], cost["e_ac_pj"], cost["e_mac_pj"]) == (360, 2, 0.5, E_MAC)
    model = glif2.load_model(paths[0]).eval()
    x, _ = (
        torch.cat(v) for v in zip(*pipelines.build_loader("digits", "test", data_dir=None, batch_size=360), strict=True)
    )
    with torch.no_grad(), CostCounter(model) as counter:
        model(x)
    expected = counter.report(e_ac=0.5)
    for key in ("sops", "macs", "energy_uj", "ann_macs", "firing_rate"):
        assert cost[key] == pytest.approx(expected[key], rel=1e-6), key
    assert [r["input"] for r in cost["layers"]] == ["input", "spikes", "pooled spikes", "real"]
    assert cost["sops"] > 0 and row["firing_rate"] == pytest.approx(cost["firing_rate"], rel=1e-12)
    printed = capsys.readouterr().out
    assert "0.5 pJ per accumulate" in printed and "SOPs" in printed and "as an ANN" in printed
    with pytest.raises(SystemExit) as exit_info:
        cli.eval_main(["--checkpoint", str(paths[0]), "--report", "--e-mac", "-1"])
    assert exit_info.value.code == 2 and "--e-mac" in capsys.readouterr().err


def test_eval_folder_one_row_each(tiny_checkpoints, tmp_path):
    folder, paths = tiny_checkpoints
    rows = cli.eval_main(
        [
            "--checkpoint",
            str(folder),
            "--dataset",
            "digits",
            "--batch-size",
            "180",
            "--json",
            str(tmp_path / "all.json"),
        ]
    )
    assert [r["checkpoint"] for r in rows] == [str(p) for p in paths]
    assert [r["T"] for r in rows] == [2, 3]
    assert len(json.loads((tmp_path / "all.json").read_text())) == 2


def test_eval_folder_skips_a_damaged_file_and_reports_it(tiny_checkpoints, tmp_path, capsys):
    folder, paths = tiny_checkpoints
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    good = [sweep / p.name for p in paths]
    for src, dst in zip(paths, good, strict=True):
        dst.write_bytes(src.read_bytes())
    cut = sweep / "tiny0b.pt"  # sorts between the good files: the one after it must still be evaluated
    cut.write_bytes(paths[0].read_bytes()[:1000])
    out = tmp_path / "rows.json"
    with pytest.raises(SystemExit) as exit_info:
        cli.eval_main(["--checkpoint", str(sweep), "--dataset", "digits", "--batch-size", "360", "--json", str(out)])
    assert exit_info.value.code == 2
    assert [r["checkpoint"] for r in json.loads(out.read_text())] == [str(p) for p in good]
    err = capsys.readouterr().err
    assert "skipped" in err and str(cut) in err and "1 of 3 files" in err and "tiny0b.pt" in err
    # a single damaged file is still the plain one-file error
    with pytest.raises(SystemExit) as exit_info:
        cli.eval_main(["--checkpoint", str(cut), "--dataset", "digits"])
    assert exit_info.value.code == 2 and "of 3 files" not in capsys.readouterr().err


def test_evaluate_metrics_match_manual():
    torch.manual_seed(0)
    logits = torch.randn(50, 7)
    y = torch.randint(0, 7, (50,))
    batches = [(logits[i : i + 16], y[i : i + 16]) for i in range(0, 50, 16)]
    res = evaluation.evaluate_model(torch.nn.Identity(), batches, torch.device("cpu"), progress=False)
    top5 = logits.topk(5, dim=1).indices
    assert res["top1"] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    assert res["top5"] == pytest.approx(100 * (top5 == y[:, None]).any(1).float().mean().item())
    assert res["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert res["num_samples"] == 50 and res["firing_rates"] == {}


def test_eval_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        evaluation.evaluate_checkpoints(str(tmp_path / "missing.pt"), dataset=None, data_dir="data", batch_size=8)
    with pytest.raises(ValueError, match="no checkpoint files"):
        evaluation.evaluate_checkpoints(str(tmp_path), dataset=None, data_dir="data", batch_size=8)


def test_eval_cli(tiny_checkpoints, tmp_path):
    _, paths = tiny_checkpoints
    out = tmp_path / "cli.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval.py"),
            "--checkpoint",
            str(paths[1]),
            "--dataset",
            "digits",
            "--batch-size",
            "360",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())[0]["T"] == 3
