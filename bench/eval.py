"""Benchmark eval.py's evaluation loop: images/s of a ResNet-19 (T=4, random weights) over CIFAR-shaped images.

    python bench/eval.py                         # 10,000 images (the CIFAR-10 test-set size), batch 100
    python bench/eval.py --num-images 1000 --eager
    python bench/eval.py --compile default       # whole-model torch.compile on top of the fused GLIF kernels

Shape letters: b batch, c channels, h w space.

The data are random `b 3 32 32` tensors made up front (no dataset files needed), so the figure is the model's
eval throughput through glif2.train.evaluation.evaluate_model (forward, metrics, firing-rate
hooks). The first batch (kernel compilation)
is timed apart and left out of images/s.
"""

import argparse
import time

import torch

import glif2
from glif2.compile import COMPILE_MODES, compile_model
from glif2.train.evaluation import evaluate_model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet19", help="registered model name")
    parser.add_argument("--T", type=int, default=4, help="time steps")
    parser.add_argument("--num-images", type=int, default=10_000, help="images to evaluate")
    parser.add_argument("--batch-size", type=int, default=100, help="batch size")
    parser.add_argument("--eager", action="store_true", help="run the GLIF kernels uncompiled")
    parser.add_argument("--compile", default="none", choices=COMPILE_MODES, help="whole-model compile mode")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = glif2.create_model(args.model, 10, args.T).to(device).eval()
    model = compile_model(model, args.compile)
    g = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, args.num_images, args.batch_size):
        b = min(args.batch_size, args.num_images - start)
        batches.append((torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g)))
    t0 = time.perf_counter()
    with glif2.eager_kernels(args.eager):
        res = evaluate_model(model, batches, device, desc=f"{args.model} T={args.T}")
    wall = time.perf_counter() - t0
    warmup = wall - (res["num_samples"] - args.batch_size) / res["images_per_s"] if len(batches) > 1 else wall
    print(
        f"{args.model} T={args.T} on {device} ({torch.get_num_threads()} threads), batch {args.batch_size}, "
        f"GLIF kernels {'eager' if args.eager else 'compiled'}, model compile {args.compile}: "
        f"{res['num_samples']} images, {res['images_per_s']:.1f} images/s (first batch, incl. compilation, "
        f"{warmup:.1f} s, excluded); total {wall:.1f} s"
    )
    return res


if __name__ == "__main__":
    main()
