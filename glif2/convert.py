"""Convert a released GLIF checkpoint (`.pth.tar`, or the CIFAR10-DVS `.pth`) to a glif2 checkpoint.

    python -m glif2.convert "trained models/resCifar19-CIFAR10-step4-CW.pth.tar" resnet19_c10_t4.pt
    python -m glif2.convert weird-name.pth.tar out.pt --arch resnet19 --num-classes 100 --T 6

The output rebuilds its model from the file alone (`glif2.load_model`).
"""

import argparse
from pathlib import Path

from glif2.checkpoint import load_reference_checkpoint, save_checkpoint


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", help="the released checkpoint file")
    parser.add_argument("out", help="where to write the glif2 checkpoint")
    parser.add_argument("--arch", default=None, help="model name (default: inferred from the file)")
    parser.add_argument("--num-classes", type=int, default=None, help="classes (default: inferred)")
    parser.add_argument("--T", type=int, default=None, help="time steps (default: inferred from conduct)")
    args = parser.parse_args(argv)
    model = load_reference_checkpoint(args.reference, arch=args.arch, num_classes=args.num_classes, T=args.T)
    meta = model.checkpoint_meta
    config = {"source": str(args.reference), **({"dataset": meta["dataset"]} if meta.get("dataset") else {})}
    extra = {k: meta[k] for k in ("epoch", "best_acc") if k in meta}
    out = save_checkpoint(args.out, model=model, config=config, **extra)
    print(f"{args.reference} -> {out}: {model.model_config}")
    return out


if __name__ == "__main__":
    main()
