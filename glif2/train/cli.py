"""The command lines of train.py / glif2-train and eval.py / glif2-eval.

Train flags are derived from the TrainConfig fields (stdlib argparse): `--batch-size`, `--amp` / `--no-amp`, and a
choice field lists its values (`--dataset {cifar10,...}`). Only user errors (glif2.errors, pipelines.DataError)
become one-line messages (exit 2); anything else is a bug and keeps its traceback.
"""

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from typing import Any

import glif2.train.distributed as dist
from glif2.cost import E_AC, E_MAC
from glif2.errors import CheckpointError, ConfigError
from glif2.train.config import DEFAULT_PRESET, PRESETS, RENAMED, TrainConfig, choices
from pipelines import DATASETS, DataError

USER_ERRORS = (ConfigError, CheckpointError, DataError)


def _flag_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _field_docs() -> dict[str, str]:
    # The docstring line under each field, read from the source (stdlib only).
    tree = ast.parse(textwrap.dedent(inspect.getsource(TrainConfig)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


class _Renamed(argparse.Action):
    """A flag kept for one release under its old name: stores into the new field and says so."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use --{self.dest.replace('_', '-')}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    """--preset plus one flag per TrainConfig field, defaults unset so that only the flags given override the
    preset."""
    parser = argparse.ArgumentParser(
        prog="glif2-train",
        description="Train a GLIF network (single process, or under torchrun for DDP). Flags override the preset's "
        "values; --list-presets shows them. A run never overwrites another run's folder.",
    )
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        choices=list(PRESETS),
        metavar="PRESET",
        help=f"named preset: {{{','.join(PRESETS)}}}",
    )
    parser.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    docs = _field_docs()
    hints = typing.get_type_hints(TrainConfig)
    allowed = choices()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = _flag_type(hints[f.name])
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=docs.get(f.name, ""))
        elif typing.get_origin(tp) is tuple:  # a fixed number of values: --gate-init 0.6 0.8 0.6
            args = typing.get_args(tp)
            parser.add_argument(
                flag, type=args[0], nargs=len(args), default=None, help=docs.get(f.name, ""), metavar=f.name.upper()
            )
        else:
            parser.add_argument(
                flag,
                type=tp,
                default=None,
                help=docs.get(f.name, ""),
                choices=allowed.get(f.name),
                metavar=None if f.name in allowed else f.name.upper(),
            )
    for old, new in RENAMED.items():
        parser.add_argument(
            "--" + old.replace("_", "-"),
            dest=new,
            action=_Renamed,
            default=None,
            choices=allowed.get(new),
            help=argparse.SUPPRESS,
        )
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The preset named by --preset (default `digits`) with every flag given applied on top."""
    args = build_parser().parse_args(argv)
    if args.list_presets:
        for name, values in PRESETS.items():
            print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
        raise SystemExit(0)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("preset", "list_presets")}
    return TrainConfig.from_name(args.preset, **overrides)


def train_main(argv: list[str] | None = None) -> dict[str, Any]:
    """train.py and glif2-train."""
    from glif2.train.loop import NonFiniteLoss, train

    try:
        return train(parse_args(argv))
    except USER_ERRORS as e:  # a user error: one clear line, no traceback
        dist.print0(f"glif2-train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteLoss as e:
        dist.print0(f"glif2-train: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        dist.destroy()


def build_eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glif2-eval",
        description="Evaluate glif2 or released GLIF checkpoints: "
        "top-1, top-5, loss, firing rate per GLIF layer, images/s; with --report, "
        "synaptic operations, MACs and energy per layer.",
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file, or a folder of them (one row each)")
    parser.add_argument(
        "--dataset",
        choices=list(DATASETS),
        default=None,
        help="test set (default: the one the checkpoint names, else from its class count)",
    )
    parser.add_argument("--data-dir", default="data", help="dataset root (digits needs none)")
    parser.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    parser.add_argument("--json", default=None, help="write the rows (a list of dicts) to this JSON file")
    parser.add_argument(
        "--report",
        action="store_true",
        help="also count, on the evaluated data, each layer's synaptic operations (accumulates driven "
        "by spikes) and MACs and an energy estimate per sample; printed as a table and written to "
        "--json under 'cost' (docs/performance.md §6)",
    )
    parser.add_argument(
        "--e-ac", type=float, default=E_AC, help=f"pJ per accumulate for --report (default {E_AC}: 45 nm, 32-bit float)"
    )
    parser.add_argument(
        "--e-mac",
        type=float,
        default=E_MAC,
        help=f"pJ per multiply-accumulate for --report (default {E_MAC}: 45 nm, 32-bit float)",
    )
    return parser


def eval_main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """eval.py and glif2-eval."""
    from glif2.train.evaluation import evaluate_checkpoints

    parser = build_eval_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    try:
        return evaluate_checkpoints(
            args.checkpoint,
            dataset=args.dataset,
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            json_path=args.json,
            report=args.report,
            e_ac=args.e_ac,
            e_mac=args.e_mac,
        )
    except USER_ERRORS as e:
        print(f"glif2-eval: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


__all__ = ["USER_ERRORS", "build_eval_parser", "build_parser", "eval_main", "parse_args", "train_main"]
