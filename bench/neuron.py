"""GLIF neuron benchmark: glif2 (compiled, eager) against SpikingJelly's GatedLIFNode (eager, torch.compile).

    python bench/neuron.py                      # CPU, and CUDA when present
    python bench/neuron.py --devices cpu --reps 4 --iters 10

Shape letters: t steps, b batch, c channels, h w space.

All candidates run side by side in one process, interleaved round by round, so machine noise hits them alike; the
reported figure per candidate is the median over rounds of each round's median step time. Compile time is
measured apart (first call) and excluded. "fwd" is a forward with a grad-requiring input (the graph is built);
"fwd+bwd" is `neuron(x).sum().backward()`, the step the figures in the issue refer to. "saved" counts the bytes
that autograd keeps for backward beyond the input, in units of one activation-sized tensor per time step.
On CUDA the fwd+bwd time is also expressed as bandwidth, counting the minimum traffic of 7 element-sized reads
or writes per element-step (docs/performance.md §3.1), against a measured device-to-device copy.
"""

import argparse
import statistics
import time

import peers
import torch

from glif2 import GLIF, eager_kernels

SHAPES = [(4, 32, 64, 32, 32), (16, 16, 64, 32, 32)]


def build_candidates(T: int, C: int, device: str, with_peers: bool) -> dict:
    torch.manual_seed(0)
    ours = GLIF(T, C).to(device)
    cands = {"glif2 compiled": ours, "glif2 eager": ours}  # the same neuron; "eager" runs under eager_kernels()
    if not with_peers:
        return cands
    sj = peers.gated_lif_node(ours)
    sj_compiled = torch.compile(sj)

    def with_reset(node, module):  # its membrane persists across calls; reset_net is part of using it
        def run(x):
            peers.reset(module)
            return node(x)

        return run

    cands["SJ eager"] = with_reset(sj, sj)
    cands["SJ compiled"] = with_reset(sj_compiled, sj)
    return cands


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, iters: int) -> float:
    """Median milliseconds of `iters` calls (CUDA: events; CPU: perf_counter)."""
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def saved_per_step(neuron, x0: torch.Tensor) -> float:
    """Bytes saved for backward beyond the input, in activation-sized tensors per time step."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = x0.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = neuron(x)
    storages.pop(x.untyped_storage().data_ptr(), None)
    out.sum().backward()
    per_step = x0[0].numel() * x0.element_size()
    big = sum(n for n in storages.values() if n >= per_step // 2)  # parameters and per-channel vectors aside
    return big / per_step / x0.shape[0]


def copy_bandwidth(x: torch.Tensor, device: str) -> float:
    """Device copy bandwidth in GB/s (read + write), pre-allocated destination."""
    dst = torch.empty_like(x)
    ms = time_ms(lambda: dst.copy_(x), device, 20)
    return 2 * x.numel() * x.element_size() / ms / 1e6


def bench_shape(shape: tuple, device: str, reps: int, iters: int, with_peers: bool) -> None:
    T, B, C, H, W = shape
    x0 = (torch.randn(shape, device=device) * 0.6 + 0.3).contiguous()
    cands = build_candidates(T, C, device, with_peers)

    def fwd(name, n):
        def run():
            with eager_kernels(name == "glif2 eager"):
                n(x0.clone().requires_grad_())

        return run

    def step(name, n):
        def run():
            with eager_kernels(name == "glif2 eager"):
                n(x0.clone().requires_grad_()).sum().backward()

        return run

    compile_s = {}
    for name, n in cands.items():
        t0 = time.perf_counter()
        step(name, n)()
        sync(device)
        compile_s[name] = time.perf_counter() - t0
    spikes = {name: n(x0).float().mean().item() for name, n in cands.items()}

    results = {name: {"fwd": [], "fwd+bwd": []} for name in cands}
    for _ in range(reps):
        for name, n in cands.items():
            results[name]["fwd"].append(time_ms(fwd(name, n), device, iters))
            results[name]["fwd+bwd"].append(time_ms(step(name, n), device, iters))
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}

    print(
        f"\n## {device}  [T={T}, B={B}, C={C}, {H}, {W}]  float32, {torch.get_num_threads()} threads, "
        f"{reps} rounds x {iters} iters"
    )
    header = f"{'candidate':<16}{'first call s':>13}{'fwd ms':>10}{'fwd+bwd ms':>12}{'saved/step':>12}{'rate':>7}"
    others = [p for p in ("SJ eager", "SJ compiled") if p in med]
    header += "".join(f"{'vs ' + p:>16}" for p in others)
    print(header)
    for name, n in cands.items():
        row = f"{name:<16}{compile_s[name]:>13.1f}{med[name]['fwd']:>10.2f}{med[name]['fwd+bwd']:>12.2f}"
        row += f"{saved_per_step(n, x0):>12.2f}{spikes[name]:>7.3f}"
        for p in others:
            row += f"{med[p]['fwd+bwd'] / med[name]['fwd+bwd']:>15.2f}x"
        print(row)
    if device == "cuda":
        gbs = copy_bandwidth(x0, device)
        ours = med["glif2 compiled"]["fwd+bwd"]
        achieved = 7 * x0.numel() * x0.element_size() / ours / 1e6
        print(
            f"copy bandwidth {gbs:.0f} GB/s; glif2 fwd+bwd at 7 passes: {achieved:.0f} GB/s = "
            f"{100 * achieved / gbs:.0f}% of copy"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="devices to run (cuda if present)")
    parser.add_argument("--reps", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--iters", type=int, default=7, help="timed calls per candidate per round")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}")
    skip = peers.missing()
    if skip:
        print(skip)
    for device in args.devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("\n(cuda not available: skipped)")
            continue
        for shape in SHAPES:
            bench_shape(shape, device, args.reps, args.iters, with_peers=skip is None)


if __name__ == "__main__":
    main()
