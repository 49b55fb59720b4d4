"""Convert a released GLIF checkpoint (`.pth.tar`, or the CIFAR10-DVS `.pth`) to a glif2 checkpoint.

    python -m glif2.convert "trained models/resCifar19-CIFAR10-step4-CW.pth.tar" resnet19_c10_t4.pt
    python -m glif2.convert weird-name.pth.tar out.pt --arch resnet19 --num-classes 100 --T 6

The output rebuilds its model from the file alone (`glif2.load_model`).
"""

import argparse
import sys
from pathlib import Path

from glif2.checkpoint import load_reference_checkpoint, save_checkpoint
from glif2.errors import CheckpointError, ConfigError


def main(argv: list[str] | None = None) -> Path:
    """The command line. A file that cannot be read or converted is one line on stderr and exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m glif2.convert", description=__doc__.splitlines()[0])
    parser.add_argument("reference", help="the released checkpoint file")
    parser.add_argument("out", help="where to write the glif2 checkpoint")
    parser.add_argument("--arch", default=None, help="model name (default: inferred from the file)")
    parser.add_argument("--num-classes", type=int, default=None, help="classes (default: inferred)")
    parser.add_argument("--T", type=int, default=None, help="time steps (default: inferred from conduct)")
    args = parser.parse_args(argv)
    reference, out = Path(args.reference), Path(args.out)
    if not reference.is_file():
        parser.error(f"{reference}: no such file")
    if out.exists() and out.resolve() == reference.resolve():
        parser.error(f"{out}: the output would replace the file being converted; write it elsewhere")
    try:
        model = load_reference_checkpoint(reference, arch=args.arch, num_classes=args.num_classes, T=args.T)
    except (CheckpointError, ConfigError) as e:  # user errors: one line, no traceback
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    meta = model.checkpoint_meta
    config = {"source": str(reference), **({"dataset": meta["dataset"]} if meta.get("dataset") else {})}
    extra = {k: meta[k] for k in ("epoch", "best_acc") if k in meta}
    written = save_checkpoint(out, model=model, config=config, **extra)
    print(f"{reference} -> {written}: {model.model_config}")
    return written


if __name__ == "__main__":
    main()
