"""Cold start: the time to the first finished training step, whole-model against regional compilation.

    python bench/compile.py                                   # every registered model, CPU
    python bench/compile.py --models resnet19 sew7b_wide      # some of them
    python bench/compile.py --device cuda --models resnet19   # on a GPU (reduce-overhead: CUDA graphs)

Shape letters: b batch, t steps, c channels, h w space.

Per model (at its preset's T, a small batch, memory "lean" as train.py runs it) and per compile scope ("model": the
whole model and loss as one graph; "regional": each block once per distinct shape, train.py's default), each case
runs in a fresh process:
- cold: an empty inductor cache (a new TORCHINDUCTOR_CACHE_DIR, and a new temporary folder: inductor keeps its
  precompiled C++ header under the temporary folder whatever the cache folder, and building it is part of a first
  start, ~5 s here); the process saves its compile artifacts;
- warm: the same cache again (a resume or a second run on the same machine);
- artifacts: another empty cache, with the artifacts of the cold run loaded first (a resume on another machine,
  the other ranks of a job: glif2.compile_cache.load_compile_cache).
"first step" is the wall time of the first forward, backward and optimizer step, compilation included; "step" the
median of the steps after it in the warm run (compilation done); "graphs" what dynamo compiled. Processes run one
after another, so nothing else competes with them; the machine should be quiet.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# model -> (T, input shape `b ...` of one small batch, classes): the preset's T where a preset uses the model
INPUTS = {
    "glifnet_small": (2, (16, 1, 8, 8), 10),  # digits
    "resnet18": (4, (4, 3, 32, 32), 10),  # cifar10-resnet18-t4
    "resnet19": (4, (4, 3, 32, 32), 10),  # cifar10-resnet19-t4
    "cifarnet": (4, (4, 3, 32, 32), 10),  # no preset: the CIFAR presets' T
    "resnet34": (6, (1, 3, 224, 224), 1000),  # no preset: the ImageNet preset's T
    "resnet18ms": (6, (1, 3, 224, 224), 1000),  # imagenet-resnet18ms-t6
    "resnet34ms": (6, (1, 3, 224, 224), 1000),
    "sew7b_wide": (16, (2, 16, 2, 48, 48), 10),  # cifar10dvs-sew7b-t16
}
KINDS = ("cold", "warm", "artifacts")


def worker(args) -> None:
    """One case in this process: build, compile, time the first step and then the warm steps; print one JSON line."""
    import torch
    from torch._dynamo.utils import counters

    import glif2
    from glif2.compile import compile_scope
    from glif2.compile_cache import load_compile_cache, save_compile_cache
    from glif2.train.setup import Objective

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    T, shape, classes = INPUTS[args.model]
    torch.manual_seed(0)
    model = glif2.create_model(
        args.model, classes, T, **({"input_size": shape[-1]} if args.model in ("sew7b_wide", "cifarnet") else {})
    ).to(device)
    x = torch.rand(shape, device=device) if args.model == "sew7b_wide" else torch.randn(shape, device=device)
    y = torch.randint(0, classes, (shape[0],), device=device)
    loaded = load_compile_cache(args.load, device) if args.load else False
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    objective = compile_scope(Objective(model, 0.0, None), args.scope, mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        loss, _ = objective(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(2):  # CUDA graphs record on the second and third call
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    if args.save:
        save_compile_cache(args.save, device)
    print(
        json.dumps({"first_s": first, "step_ms": 1e3 * statistics.median(times), "graphs": graphs, "loaded": loaded}),
        flush=True,
    )


def run_case(model: str, scope: str, kind: str, cache_dir: str, artifacts: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--model",
        model,
        "--scope",
        scope,
        "--device",
        args.device,
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
    ]
    if kind == "cold":
        cmd += ["--save", artifacts]
    if kind == "artifacts":
        cmd += ["--load", artifacts]
    tmp = Path(f"{cache_dir}-tmp")  # shared by cold and warm (one cache folder), fresh for artifacts (docstring)
    tmp.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": cache_dir,
        "TMPDIR": str(tmp),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{model} {scope} {kind} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {**row, "process_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(INPUTS), choices=list(INPUTS))
    parser.add_argument("--scopes", nargs="+", default=["model", "regional"], choices=["model", "regional"])
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=list(KINDS),
        choices=KINDS,
        help="which starts to time (warm and artifacts need cold's cache and file)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=5, help="timed warm steps")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per case")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--scope", help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--load", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(
        f"## {args.device}: first finished training step (compile included) and warm step; lean memory; "
        f"{args.steps} timed steps",
        flush=True,
    )
    print(
        f"{'model':<14}{'T':>3} {'input':<18}{'scope':<10}{'cold s':>8}{'warm s':>8}{'artif. s':>9}{'step ms':>9}"
        f"{'graphs':>7}",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="glif2-bench-compile-") as tmp:
        for model in args.models:
            T, shape, _ = INPUTS[model]
            for scope in args.scopes:
                cache, artifacts = f"{tmp}/{model}-{scope}-cache", f"{tmp}/{model}-{scope}.bin"
                row = {"model": model, "T": T, "input": list(shape), "scope": scope, "device": args.device}
                for kind in args.kinds:
                    fresh = f"{tmp}/{model}-{scope}-{kind}-cache" if kind == "artifacts" else cache
                    result = run_case(model, scope, kind, fresh, artifacts, args)
                    row[f"{kind}_s"] = result["first_s"]
                    row[f"{kind}_graphs"] = result["graphs"]
                    if kind == "artifacts":
                        row["artifacts_loaded"] = result["loaded"]
                    if kind in ("warm", "cold"):
                        row["step_ms"] = result["step_ms"]  # the warm run's, when it ran
                rows.append(row)
                shape_text = "x".join(map(str, shape))
                print(
                    f"{model:<14}{T:>3} {shape_text:<18}{scope:<10}"
                    + "".join(
                        f"{row[k]:>{w}.1f}" if k in row else f"{'-':>{w}}"
                        for k, w in (("cold_s", 8), ("warm_s", 8), ("artifacts_s", 9))
                    )
                    + f"{row['step_ms']:>9.0f}{row.get('cold_graphs', row.get('warm_graphs', 0)):>7}",
                    flush=True,
                )
            pair = {r["scope"]: r for r in rows if r["model"] == model}
            if {"model", "regional"} <= pair.keys():
                m, r = pair["model"], pair["regional"]
                ratios = [f"{k[:-2]} {r[k] / m[k]:.2f}x" for k in ("cold_s", "warm_s", "artifacts_s") if k in m]
                print(
                    f"{'':<14}    regional / model time: {', '.join(ratios)}, step {r['step_ms'] / m['step_ms']:.2f}x",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
