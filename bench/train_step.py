"""Training-step benchmark: ResNet-19 at T=4 on a CIFAR-shaped batch, glif2 against SpikingJelly's GatedLIFNode.

    python bench/train_step.py                         # CPU (batch 4), and CUDA (batch 64) when present
    python bench/train_step.py --devices cuda --batch-size 128 --steps 30

Shape letters: t steps, b batch, c channels, h w space, k classes.

One step = forward, cross-entropy, backward, SGD (momentum 0.9) on x `b 3 32 32`, y `b`. Candidates, side by side:
- "glif2 compiled": the whole step compiled as train.py does it (reduce-overhead, i.e. CUDA graphs, on CUDA;
  inductor default on CPU);
- "glif2 fused": the model uncompiled, each GLIF running its own fused kernels (train.py --compile none);
- "glif2 eager": everything eager, the GLIF recursion included (under glif2.eager_kernels());
- "SJ GatedLIFNode": the same network with every GLIF replaced by spikingjelly 2.0.0's GatedLIFNode (channel-wise,
  rectangle surrogate, functional.reset_net before each forward), eager.

Each candidate runs in its own subprocess, so peak memory is its own: on CUDA torch.cuda.max_memory_allocated over
the timed steps; on CPU the peak resident-set growth during the timed steps above the resident set before them
(sampled from /proc/self/statm every 2 ms). Timing: warm-up steps first, so that compilation and first-call
allocations stay out of the figure (the first step's time, compile included, is reported apart), then the median step
time over the timed steps, with CUDA events on CUDA (they time the GPU's work, not the host's queueing of it).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import peers
import torch

CANDIDATES = ("glif2 compiled", "glif2 fused", "glif2 eager", "SJ GatedLIFNode")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set in a thread; `peak - base` is the growth while the context is open."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def run_candidate(name: str, device: str, batch: int, T: int, warmup: int, steps: int) -> dict:
    from glif2 import create_model
    from glif2.compile import compile_model, eager_kernels
    from glif2.train.setup import Objective

    torch.manual_seed(0)
    dev = torch.device(device)
    model = create_model("resnet19", 10, T)
    reset = None
    if name == "SJ GatedLIFNode":
        model, reset = peers.with_gated_lif_nodes(model), peers.reset
    model.to(dev)
    mode = ("reduce-overhead" if dev.type == "cuda" else "default") if name == "glif2 compiled" else "none"
    objective = compile_model(Objective(model, 0.0, None), mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)

    def step():
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        if reset is not None:
            reset(model)
        with eager_kernels(name == "glif2 eager"):
            loss, _ = objective(x, y)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0  # compile (if any) + the first step
    for _ in range(warmup - 1):
        step()
    sync()
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with PeakRSS() as mem:
            for _ in range(steps):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
        peak = mem.peak - mem.base
    median = statistics.median(times)
    return {
        "candidate": name,
        "device": device,
        "batch": batch,
        "T": T,
        "first_step_s": first,
        "step_ms": 1e3 * median,
        "images_per_s": batch / median,
        "peak_mem_mib": peak / 2**20,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, cuda if present)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch (default: 4 on CPU, 64 on CUDA)")
    parser.add_argument("--T", type=int, default=4, help="time steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 20 on CUDA)")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES, metavar="NAME")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one candidate
    args = parser.parse_args()

    if args.child:
        name, device = json.loads(args.child)
        steps = args.steps or (20 if device == "cuda" else 3)
        batch = args.batch_size or (64 if device == "cuda" else 4)
        print("RESULT " + json.dumps(run_candidate(name, device, batch, args.T, args.warmup, steps)), flush=True)
        return

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    candidates = args.candidates
    skip = peers.missing() if "SJ GatedLIFNode" in candidates else None
    if skip:
        print(skip, flush=True)
        candidates = [name for name in candidates if name != "SJ GatedLIFNode"]
    rows = []
    for device in devices:
        for name in candidates:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                json.dumps([name, device]),
                "--T",
                str(args.T),
                "--warmup",
                str(args.warmup),
            ]
            cmd += ["--steps", str(args.steps)] if args.steps else []
            cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not found:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                print(f"{device} {name}: failed: {' | '.join(tail)}", flush=True)
                continue
            row = json.loads(found[0])
            rows.append(row)
            print(
                f"{device:4} {name:16} b={row['batch']:<4} T={row['T']}  step {row['step_ms']:9.1f} ms  "
                f"{row['images_per_s']:8.1f} img/s  peak {row['peak_mem_mib']:8.1f} MiB  "
                f"(first step incl. compile {row['first_step_s']:.1f} s)",
                flush=True,
            )
    for device in devices:
        base = next((r for r in rows if r["device"] == device and r["candidate"] == "SJ GatedLIFNode"), None)
        if base:
            speedups = ", ".join(
                f"{r['candidate']} {base['step_ms'] / r['step_ms']:.2f}x"
                for r in rows
                if r["device"] == device and r is not base
            )
            print(f"{device}: speed vs SJ GatedLIFNode: {speedups}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
