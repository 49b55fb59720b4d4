"""Training memory and step time: glif2's memory modes (off, lean, recompute) and SpikingJelly's GatedLIFNode, side by
side, on the paper's networks.

    python bench/memory.py                                   # all three nets, CPU (and CUDA when present)
    python bench/memory.py --nets resnet19 --devices cpu --rounds 3 --steps 2
    python bench/memory.py --devices cuda --nets resnet19 --T 6 --batch 128 --max-batch  # the GPU figures

Shape letters: t steps, b batch, c channels, h w space, k classes.

Nets (as the issue sets them): resnet19 T=4 on 32x32 (batch 4 on CPU), sew7b_wide T=16 on 48x48 (batch 2),
resnet18ms T=6 on 224x224 (batch 1). Each candidate runs eagerly (the model uncompiled; glif2's GLIF kernels are
compiled, as train.py --compile none) and with the whole training objective under torch.compile (train.py's
default). One step = forward, cross-entropy, backward, SGD with momentum.

Figures:
- saved B/ns: the bytes autograd keeps for backward (the unique storages torch.autograd.graph.saved_tensors_hooks
  sees during one training forward; parameters and buffers not counted) divided by the neuron-steps (every GLIF
  output of every step of every image). Compiled candidates are measured on their second call.
- step: the median step time over interleaved rounds (every candidate runs `--steps` steps per round, round after
  round, so machine noise hits them alike); the first steps (compilation) are left out. "x off" is the ratio to the
  glif2 off candidate of the same compile setting.
- CUDA: the peak allocated memory during the timed steps, and with --max-batch the largest ResNet-19 T=6 batch
  (32x32) whose training step fits, per mode (found by doubling, then bisection, uncompiled).
"""

import argparse
import gc
import statistics
import time

import peers
import torch
import torch.nn.functional as F

import glif2
from glif2.compile import compile_model
from glif2.memory.measure import neuron_steps, saved_activation_bytes
from glif2.train.setup import Objective
from pipelines import DATASETS

NETS = {  # model: (dataset (its classes and input shape), T, batch on CPU, batch on CUDA)
    "resnet19": ("cifar10", 4, 4, 64),
    "sew7b_wide": ("cifar10dvs", 16, 2, 32),
    "resnet18ms": ("imagenet", 6, 1, 16),
}
CANDIDATES = ("glif2 off", "glif2 lean", "glif2 recompute", "SJ GatedLIFNode")


def num_classes(net: str) -> int:
    return DATASETS[NETS[net][0]].num_classes


def make_input(net: str, batch: int, device: torch.device, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    info = DATASETS[NETS[net][0]]
    g = torch.Generator().manual_seed(0)
    frames = info.kind == "frames"  # event frames carry t
    x = torch.randn(batch, *((T,) if frames else ()), info.in_channels, info.input_size, info.input_size, generator=g)
    if frames:
        x = x.abs().round()  # event counts
    return x.to(device), torch.randint(0, info.num_classes, (batch,), generator=g).to(device)


class Candidate:
    """One model + optimizer, eager or compiled, with a `step()` that trains on a fixed batch."""

    def __init__(self, net: str, name: str, compiled: bool, device: torch.device, batch: int, T: int):
        torch.manual_seed(0)
        mode = name.split()[-1] if name.startswith("glif2") else "off"
        self.model = glif2.create_model(net, num_classes(net), T, memory=mode)
        self.reset = None
        if name.startswith("SJ"):
            self.model, self.reset = peers.with_gated_lif_nodes(self.model), peers.reset
        self.model.to(device)
        self.objective = Objective(self.model, 0.0, None)  # train.py's: model + cross-entropy
        if compiled:  # SpikingJelly's loop may break the graph: no fullgraph for it
            self.objective = compile_model(self.objective, "default", fullgraph=self.reset is None)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.x, self.y = make_input(net, batch, device, T)
        self.device, self.times = device, []

    def forward(self) -> torch.Tensor:
        if self.reset is not None:
            self.reset(self.model)
        return self.objective(self.x, self.y)[0]

    def step(self) -> None:
        self.forward().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # timing only: a host sync

    def timed(self, steps: int) -> None:
        for _ in range(steps):
            self.sync()
            start = time.perf_counter()
            self.step()
            self.sync()
            self.times.append(time.perf_counter() - start)


def run_net(net: str, device: torch.device, args) -> list[dict]:
    _, T, cpu_batch, cuda_batch = NETS[net]
    batch = args.batch or (cpu_batch if device.type == "cpu" else cuda_batch)
    T = args.T or T
    counter = glif2.create_model(net, num_classes(net), T).to(device).eval()
    neurons = neuron_steps(counter, make_input(net, batch, device, T)[0])
    del counter
    rows, cands = [], {}
    for compiled in [c == "compiled" for c in args.compile]:
        for name in args.candidates:
            key = (name, compiled)
            try:
                cand = Candidate(net, name, compiled, device, batch, T)
                start = time.perf_counter()
                cand.step()  # compiles when compiled
                cand.sync()
                first = time.perf_counter() - start
                saved = saved_activation_bytes(cand.model, cand.forward)
            except Exception as e:  # a candidate that cannot run is reported, not fatal
                print(f"{net} {device.type} {name} {'compiled' if compiled else 'eager'}: failed: {e}", flush=True)
                continue
            cands[key] = cand
            rows.append(
                {
                    "net": net,
                    "device": device.type,
                    "candidate": name,
                    "compiled": compiled,
                    "batch": batch,
                    "T": T,
                    "saved_per_neuron_step": saved["bytes"] / neurons,
                    "first_step_s": first,
                }
            )
    for _ in range(args.rounds):  # interleaved rounds
        for cand in cands.values():
            cand.timed(args.steps)
    for row in rows:
        cand = cands[row["candidate"], row["compiled"]]
        row["step_ms"] = 1e3 * statistics.median(cand.times)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            cand.timed(1)
            row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    for row in rows:
        base = next((r for r in rows if r["candidate"] == "glif2 off" and r["compiled"] == row["compiled"]), None)
        row["vs_off"] = row["step_ms"] / base["step_ms"] if base else float("nan")
    del cands
    gc.collect()
    return rows


def fits(batch: int, mode: str, device: torch.device) -> bool:
    torch.manual_seed(0)
    model = glif2.create_model("resnet19", num_classes("resnet19"), 6, memory=mode).to(device)
    x, y = make_input("resnet19", batch, device, 6)
    try:
        F.cross_entropy(model(x), y).backward()
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del model, x, y
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(mode: str, device: torch.device) -> int:
    """The largest ResNet-19 T=6 batch whose training step fits: doubling, then bisection."""
    lo, hi = 0, 16
    while fits(hi, mode, device):
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 64):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid, mode, device) else (lo, mid)
    return lo


def print_rows(rows: list[dict]) -> None:
    for row in rows:
        peak = f"  peak {row['peak_mib']:9.1f} MiB" if "peak_mib" in row else ""
        print(
            f"{row['net']:10} {row['device']:4} {row['candidate']:16} {'compiled' if row['compiled'] else 'eager':8}"
            f"  T={row['T']} b={row['batch']:<3} saved {row['saved_per_neuron_step']:7.3f} B/ns"
            f"  step {row['step_ms']:9.1f} ms"
            f"  x off {row['vs_off']:5.2f}{peak}  (first step {row['first_step_s']:.1f} s)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, cuda if present)")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES, metavar="NAME")
    parser.add_argument("--batch", type=int, default=0, help="batch for every net (default: per net and device)")
    parser.add_argument("--T", type=int, default=0, help="time steps for every net (default: per net)")
    parser.add_argument(
        "--compile",
        nargs="+",
        default=["eager", "compiled"],
        choices=["eager", "compiled"],
        help="eager (train.py --compile none) and/or compiled (the whole objective)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per candidate per round")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--max-batch", action="store_true", help="CUDA: the largest ResNet-19 T=6 batch per mode")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    skip = peers.missing() if any(name.startswith("SJ") for name in args.candidates) else None
    if skip:
        print(skip, flush=True)
        args.candidates = [name for name in args.candidates if not name.startswith("SJ")]
    for device in map(torch.device, devices):
        print(f"## {device.type}: {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
        for net in args.nets:
            print_rows(run_net(net, device, args))
        if device.type == "cuda" and args.max_batch:
            for mode in ("off", "lean", "recompute"):
                print(f"resnet19 T=6 cuda {mode:9}: largest batch {largest_batch(mode, device)}", flush=True)


if __name__ == "__main__":
    main()
