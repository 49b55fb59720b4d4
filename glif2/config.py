"""Training configuration: one dataclass, named presets that reproduce the paper's runs, flags derived from the fields.

    cfg = TrainConfig.from_name("cifar10-resnet19-t4")          # a preset
    cfg = parse_args(["--preset", "digits", "--epochs", "3"])   # a preset, then flags override single fields

Presets (TRAINING.md §11-§12): the README's CIFAR commands (`--soft-mode --channel-wise --randomgate --tunable-lif`,
SGD 0.9, lr 0.1, wd 4e-5 off the GLIF parameters, gates at lr/10, cosine over the epochs, batch 64, seed 9),
ResNet-19 with the same recipe (the README gives no ResNet-19 command), ImageNet ResNet-18MS (DDP + SyncBN, gates
at lr/1, 150 epochs) and the CIFAR10-DVS 7B-wideNet (one parameter group without weight decay, lr 0.01, periodic
cosine with T_max 64 over 200 epochs, AMP). `digits` is the CPU demo and the default.

`batch_size` is the global batch over all ranks (each rank gets batch_size / world_size); the reference's
`--batch-size` was per process, so its multi-GPU ImageNet run is written here as 50 x the GPU count.
"""

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

COMPILE_CHOICES = ("auto", "none", "default", "max-autotune", "reduce-overhead")
SCHEDULERS = ("auto", "cosine", "soft-cosine")
PARAM_GROUPS = ("glif", "single")
DATASETS = ("cifar10", "cifar100", "imagenet", "cifar10dvs", "digits")
AMP_DTYPES = ("bfloat16", "float16")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run depends on; stored (as a dict) in every checkpoint."""

    name: str = "digits"
    """Run name (the reference's --modeltag): outputs go to `<out_dir>/<name>/`."""
    dataset: str = "digits"
    """One of cifar10, cifar100, imagenet, cifar10dvs, digits."""
    data_dir: str = "data"
    """Dataset root (unused by digits)."""
    download: bool = False
    """Fetch a missing dataset where the library can (CIFAR, CIFAR10-DVS)."""
    backend: str = "auto"
    """Loader backend: auto (DALI when installed and the dataset has a DALI path), dali or torch."""
    num_workers: int = 4
    """Loader worker processes / DALI threads."""
    model: str = "glifnet_small"
    """Registered model name (glif2.list_models())."""
    T: int = 4
    """Time steps (the DVS frames per recording)."""
    channel_wise: bool = True
    """Channel-wise GLIF parameters (all released models); False: one value per layer."""
    gates: str = "soft"
    """Gate mode: soft (the README's --soft-mode), hard, static_soft, static_hard."""
    variant: str = "glif"
    """glif, or glif_f (the gate-free ablation, --softsimple)."""
    bn: str = "td"
    """td (tdBN) or plain BatchNorm (what SyncBN training really runs, GLIF.md Q12)."""
    randomgate: bool = False
    """Re-draw every alpha/beta/gamma logit from U(-0.1, 0.1) after construction (GLIF.md §6)."""
    epochs: int = 200
    """Training epochs (and the cosine length unless t_max is set)."""
    batch_size: int = 64
    """Global training batch over all ranks; must divide by the world size."""
    eval_batch_size: int = 0
    """Global evaluation batch (0: the training batch size)."""
    lr: float = 0.1
    """Base learning rate."""
    momentum: float = 0.9
    """SGD momentum (the reference hard-codes 0.9; no Nesterov, no dampening)."""
    weight_decay: float = 4e-5
    """Weight decay of the non-GLIF parameters (conv, BN, linear); GLIF parameters never decay in `glif` groups."""
    param_groups: str = "glif"
    """glif: parameter groups by name as TRAINING.md §5; single: one group for everything (the DVS script)."""
    tunable_lif: bool = False
    """Three groups (other, neuron, gates) with the gates at lr / gate_lr_divisor (TRAINING.md §5)."""
    gate_lr_divisor: float = 10.0
    """Gate learning-rate divisor with tunable_lif: 10 on CIFAR, 1 on ImageNet."""
    scheduler: str = "auto"
    """cosine (PyTorch's; periodic when t_max < epochs), soft-cosine (the reference's multi-parameter one: stays at
    0 after t_max), or auto: soft-cosine with tunable_lif, else cosine. Stepped once per epoch."""
    t_max: int = 0
    """Cosine half-period in epochs (0: epochs)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing (the reference uses none)."""
    amp: bool = False
    """Autocast the forward and loss (amp_dtype); float16 also turns on a GradScaler."""
    amp_dtype: str = "bfloat16"
    """bfloat16 or float16."""
    sync_bn: bool = False
    """SyncBatchNorm across ranks. It makes every BN plain (no tdBN alpha*V_th scale, GLIF.md Q12): the model is then
    built with bn=plain so that its checkpoint says what was trained."""
    compile: str = "auto"
    """auto (reduce-overhead, i.e. CUDA graphs, on CUDA; default on CPU), none, default, max-autotune,
    reduce-overhead."""
    device: str = "auto"
    """auto (cuda:LOCAL_RANK when CUDA is present, else cpu), cpu or cuda."""
    threads: int = 0
    """CPU threads per process (torch.set_num_threads); 0 keeps torch's default. Small nets on a shared machine run
    faster and steadier on one thread (a busy core stalls every parallel region of a multi-threaded step)."""
    seed: int = 9
    """Seed of the initialisation, the data order and the augmentation."""
    deterministic: bool = False
    """Deterministic algorithms (torch.use_deterministic_algorithms, no cuDNN benchmark): resumes are bitwise."""
    out_dir: str = "runs"
    """Root of the run folders."""
    resume: str = ""
    """"" (start fresh), "auto" (continue from <out_dir>/<name>/last.pt when it exists) or a checkpoint path."""
    log_interval: int = 10
    """Steps between progress updates (each is one host sync)."""
    max_steps: int = 0
    """Stop (with a checkpoint) after this many optimizer steps in total; 0: no limit."""
    tensorboard: bool = True
    """Write TensorBoard scalars to <run>/tb (needs the `train` extra)."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def run_dir(self) -> str:
        return f"{self.out_dir}/{self.name}"

    def validate(self) -> None:
        """Raises ValueError for values no run can use (things that need the world size are checked by train.py)."""

        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {', '.join(options)}")

        choice("dataset", DATASETS)
        choice("compile", COMPILE_CHOICES)
        choice("scheduler", SCHEDULERS)
        choice("param_groups", PARAM_GROUPS)
        choice("amp_dtype", AMP_DTYPES)
        choice("backend", ("auto", "dali", "torch"))
        choice("device", ("auto", "cpu", "cuda"))
        for name in ("T", "epochs", "batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        for name in ("eval_batch_size", "t_max", "max_steps", "num_workers", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.lr <= 0 or self.gate_lr_divisor <= 0:
            raise ValueError(f"lr={self.lr} and gate_lr_divisor={self.gate_lr_divisor} must be positive")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing} must lie in [0, 1)")
        if self.resume not in ("", "auto") and not self.resume.endswith((".pt", ".pth", ".tar", ".ckpt")):
            raise ValueError(f"resume={self.resume!r}: '' (fresh), 'auto', or a checkpoint file (.pt)")

    @property
    def model_options(self) -> dict[str, Any]:
        """Options for glif2.create_model (the GLIF options reach every neuron)."""
        options = dict(channel_wise=self.channel_wise, gates=self.gates, variant=self.variant,
                       bn="plain" if self.sync_bn else self.bn)
        if self.dataset == "digits":
            options["in_channels"] = 1
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_name(cls, preset: str, /, **overrides: Any) -> "TrainConfig":
        """The named preset (see PRESETS; the run is named after it unless `name` is given), with `overrides`."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{"name": preset, **PRESETS[preset], **overrides})


# presets

# The README's CIFAR command: --soft-mode --channel-wise --randomgate --tunable-lif, lr 0.1, batch 64, 200 epochs.
_README_CIFAR = dict(epochs=200, batch_size=64, lr=0.1, weight_decay=4e-5, gates="soft", channel_wise=True,
                     randomgate=True, tunable_lif=True, gate_lr_divisor=10.0, scheduler="soft-cosine", seed=9)

PRESETS: dict[str, dict[str, Any]] = {
    # The CPU demo: the README recipe on a small net and the embedded digits, one CPU thread; ~1-2 minutes.
    "digits": dict(dataset="digits", model="glifnet_small", T=2, epochs=15, batch_size=64, eval_batch_size=360,
                   lr=0.1, weight_decay=4e-5, gates="soft", channel_wise=True, randomgate=True, tunable_lif=True,
                   gate_lr_divisor=10.0, scheduler="soft-cosine", seed=9, log_interval=5, threads=1),
}
for _k in (10, 100):
    for _arch in ("resnet18", "resnet19"):
        for _t in (2, 4, 6):
            PRESETS[f"cifar{_k}-{_arch}-t{_t}"] = dict(dataset=f"cifar{_k}", model=_arch, T=_t, **_README_CIFAR)
# torch.distributed.run --nproc_per_node N ... --batch-size 50 (per GPU) --MS18 --imagenet, T 6; DDP + SyncBN turns
# tdBN into plain BN, and the gates learn at lr / 1. Written for 8 GPUs: pass --batch-size 50N for N.
PRESETS["imagenet-resnet18ms-t6"] = dict(dataset="imagenet", model="resnet18ms", T=6, epochs=150, batch_size=400,
                                         lr=0.1, weight_decay=4e-5, gates="soft", channel_wise=True, randomgate=True,
                                         tunable_lif=True, gate_lr_divisor=1.0, scheduler="soft-cosine",
                                         bn="plain", sync_bn=True, seed=9)
# cifar10dvs/train.py --dsr_da -amp -model SEWResNet_GLIF_dsr -cnf ADD -epochs 200 -T_max 64 -T 16 -lr 0.01 -b 32:
# one SGD group over everything, no weight decay, PyTorch cosine with T_max 64 (periodic over 200 epochs), plain BN. The
# model draws its float64 gates from U(-0.1, 0.1) itself.
PRESETS["cifar10dvs-sew7b-t16"] = dict(dataset="cifar10dvs", model="sew7b_wide", T=16, epochs=200, batch_size=32,
                                       lr=0.01, weight_decay=0.0, param_groups="single", tunable_lif=False,
                                       scheduler="cosine", t_max=64, amp=True, bn="plain", seed=9)
DEFAULT_PRESET = "digits"


# command line


def _flag_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_docs() -> dict[str, str]:
    # The docstring line under each field, read from the source (stdlib only).
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(TrainConfig)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def build_parser() -> argparse.ArgumentParser:
    """--preset plus one flag per TrainConfig field (`--batch-size`, `--amp` / `--no-amp`, ...), defaults unset so
    that only the flags given override the preset."""
    parser = argparse.ArgumentParser(
        description="Train a GLIF network (single process, or under torchrun for DDP). Flags override the preset's "
        "values; --list-presets shows them.",
    )
    parser.add_argument("--preset", default=DEFAULT_PRESET, help=f"named preset: {', '.join(PRESETS)}")
    parser.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    docs = _field_docs()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = _flag_type(hints[f.name])
        help_text = docs.get(f.name, "")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=tp, default=None, help=help_text, metavar=f.name.upper())
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The preset named by --preset (default `digits`) with every flag given applied on top."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_presets:
        for name, values in PRESETS.items():
            print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
        raise SystemExit(0)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("preset", "list_presets")}
    return TrainConfig.from_name(args.preset, **overrides)


def format_config(cfg: TrainConfig) -> str:
    """One `field = value` line per field, for the log."""
    width = max(len(f.name) for f in dataclasses.fields(cfg))
    return "\n".join(f"  {f.name:<{width}} = {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg))


__all__ = ["DEFAULT_PRESET", "PRESETS", "TrainConfig", "build_parser", "format_config", "parse_args"]
