"""Training configuration: one dataclass, and named presets that reproduce the paper's runs (the command line is
derived from the fields in glif2.train.cli).

    cfg = TrainConfig.from_name("cifar10-resnet19-t4")             # a preset
    cfg = TrainConfig.from_name("digits", epochs=3, lr=0.05)       # a preset with fields overridden

Presets (docs/training.md §1): the README's CIFAR commands (`--soft-mode --channel-wise --randomgate --tunable-lif`,
SGD 0.9, lr 0.1, wd 4e-5 off the GLIF parameters, gates at lr/10, cosine over the epochs, batch 64, seed 9),
ResNet-19 with the same recipe (the README gives no ResNet-19 command), ImageNet ResNet-18MS (DDP + SyncBN, gates
at lr/1, 150 epochs) and the CIFAR10-DVS 7B-wideNet (one parameter group without weight decay, lr 0.01, periodic
cosine with T_max 64 over 200 epochs, AMP). `digits` is the CPU demo and the default.

`batch_size` is the global batch over all ranks (each rank gets batch_size / world_size); the reference's
`--batch-size` was per process, so its multi-GPU ImageNet run is written here as 50 x the GPU count.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from glif2.checkpoint import CHECKPOINT_SUFFIXES
from glif2.compile import COMPILE_MODES, COMPILE_SCOPES
from glif2.cost import E_AC, E_MAC, check_energies
from glif2.errors import ConfigError
from glif2.layers import BN_KINDS
from glif2.memory import MEMORY_MODES
from glif2.models import list_models
from glif2.neuron import GATE_INIT, GATE_MODES, PARAM_MODES, VARIANTS, check_gate_init
from glif2.train.distributed import DEFAULT_TIMEOUT_S
from glif2.train.optim import PARAM_GROUPS, SCHEDULERS
from pipelines import BACKENDS, DATASETS

# The allowed values of every choice field (validation and the command line's `--flag {a,b,...}` both read this).
CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": tuple(DATASETS),
    "backend": BACKENDS,
    "gate_mode": GATE_MODES,
    "variant": VARIANTS,
    "params": PARAM_MODES,
    "bn": BN_KINDS,
    "memory": MEMORY_MODES,
    "param_groups": PARAM_GROUPS,
    "scheduler": ("auto", *SCHEDULERS),
    "amp_dtype": ("bfloat16", "float16"),
    "compile": COMPILE_SCOPES,
    "compile_mode": ("auto", *(m for m in COMPILE_MODES if m != "none")),
    "device": ("auto", "cpu", "cuda"),
}


def choices() -> dict[str, tuple[str, ...]]:
    """CHOICES and the models registered now (a user can register more after import)."""
    return {**CHOICES, "model": tuple(list_models())}


# Fields renamed since checkpoints were first written: old name -> new name (configs stored under the old name load).
RENAMED = {"gates": "gate_mode"}
# Stored `compile` values from before compile scopes (the field then held the mode): value -> (scope, mode).
OLD_COMPILE = {
    "auto": ("model", "auto"),
    "default": ("model", "default"),
    "max-autotune": ("model", "max-autotune"),
    "reduce-overhead": ("model", "reduce-overhead"),
}


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run depends on; stored (as a dict) in every checkpoint."""

    name: str = "digits"
    """Run name (the reference's --modeltag): outputs go to `<out_dir>/<name>/`."""
    dataset: str = "digits"
    """The dataset (its classes, input channels and size come from pipelines.DATASETS)."""
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
    gate_mode: str = "soft"
    """Gate mode: soft (the README's --soft-mode), hard, static_soft, static_hard."""
    variant: str = "glif"
    """glif, or glif_f (the gate-free ablation, --softsimple)."""
    gate_init: tuple[float, float, float] = GATE_INIT
    """Initial (alpha, beta, gamma) gate values g in (-0.5, 1.5), kept as logit(0.25 + g / 2) (the authors' --gate)."""
    params: str = "learned"
    """learned, or static: tau, v_th, leak, v_reset and conduct fixed at their initial values (--static-param)."""
    bn: str = "td"
    """td (tdBN) or plain BatchNorm (what SyncBN training really runs, docs/training.md §6)."""
    memory: str = "lean"
    """Activations kept for backward (docs/performance.md §5): lean (packed spikes, one fused BN->GLIF unit), recompute
    (also redo each conv in the backward: about 1 bit per neuron-step), off (plain autograd). The same results."""
    randomgate: bool = False
    """Re-draw every alpha/beta/gamma logit from U(-0.1, 0.1) after construction (docs/neuron.md §3.4)."""
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
    """glif: parameter groups by name (docs/training.md §2); single: one group for everything (the DVS script)."""
    tunable_lif: bool = False
    """Three groups (other, neuron, gates) with the gates at lr / gate_lr_divisor (docs/training.md §2)."""
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
    """SyncBatchNorm across ranks. It makes every BN plain (no tdBN alpha*V_th scale, docs/training.md §6): the model
    is then built with bn=plain so that its checkpoint says what was trained."""
    compile: str = "regional"
    """What torch.compile compiles (docs/performance.md §8): regional (each block once per distinct shape: the first
    step within seconds), model (the whole model and loss as one graph), none (only the fused GLIF kernels)."""
    compile_mode: str = "auto"
    """Inductor's mode: auto (reduce-overhead, i.e. CUDA graphs, on CUDA; default on CPU), default, max-autotune,
    reduce-overhead."""
    compile_cache: str = ""
    """Compile artifacts to load before compiling: "" (the run folder's compile_cache.bin when present), a file
    (e.g. another run's, with the same shapes), or "off". The run folder's file is written after the first epoch."""
    device: str = "auto"
    """auto (cuda:LOCAL_RANK when CUDA is present, else cpu), cpu or cuda."""
    dist_timeout: int = DEFAULT_TIMEOUT_S
    """Seconds the process-group set-up and each collective may wait for the other ranks before failing (torch's
    default is 30 minutes): how long a rank can wait on a peer that is gone."""
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
    report: bool = False
    """Count the test pass's firing rate, synaptic operations, MACs and energy per sample after every epoch, into
    metrics.jsonl and TensorBoard (the test pass then runs the uncompiled model; docs/performance.md §6)."""
    e_ac: float = E_AC
    """pJ per accumulate for --report's energy (45 nm, 32-bit float)."""
    e_mac: float = E_MAC
    """pJ per multiply-accumulate for --report's energy (45 nm, 32-bit float)."""

    def __post_init__(self) -> None:
        self.gate_init = tuple(self.gate_init)  # a list when read from JSON or the command line
        self.validate()

    @property
    def run_dir(self) -> str:
        return f"{self.out_dir}/{self.name}"

    def validate(self) -> None:
        """Raises ConfigError, naming the field, for values no run can use (things that need the world size or the
        data are checked when the run starts)."""
        for name, options in choices().items():
            if getattr(self, name) not in options:
                raise ConfigError(f"{name}={getattr(self, name)!r}; choose one of {', '.join(options)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name}={value} must be a finite number")
        for name in ("T", "epochs", "batch_size", "log_interval", "dist_timeout"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        for name in ("eval_batch_size", "t_max", "max_steps", "num_workers", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be positive")
        if self.gate_lr_divisor <= 0:
            raise ConfigError(
                f"gate_lr_divisor={self.gate_lr_divisor} must be positive (the gates learn at lr / gate_lr_divisor)"
            )
        try:
            check_gate_init(self.gate_init)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum={self.momentum} must lie in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay} must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must lie in [0, 1)")
        if self.compile == "none" and self.compile_mode not in ("auto", "default"):
            raise ConfigError(
                f"compile_mode={self.compile_mode!r} with compile=none: nothing would be compiled; "
                "pass --compile regional or --compile model"
            )
        check_energies(self.e_ac, self.e_mac)
        if self.resume not in ("", "auto") and not self.resume.endswith(CHECKPOINT_SUFFIXES):
            raise ConfigError(
                f"resume={self.resume!r}: '' (fresh), 'auto', or a checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """A config from a stored dict (a checkpoint's `config`); renamed fields are read under their new names,
        fields this version does not know are ignored."""
        values = {RENAMED.get(k, k): v for k, v in values.items()}
        if values.get("compile") in OLD_COMPILE:  # before compile scopes: the field held inductor's mode
            values["compile"], values["compile_mode"] = OLD_COMPILE[values["compile"]]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_name(cls, preset: str, /, **overrides: Any) -> "TrainConfig":
        """The named preset (see PRESETS; the run is named after it unless `name` is given), with `overrides`."""
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{"name": preset, **PRESETS[preset], **overrides})


# presets

# The README's CIFAR command: --soft-mode --channel-wise --randomgate --tunable-lif, lr 0.1, batch 64, 200 epochs.
_README_CIFAR = dict(
    epochs=200,
    batch_size=64,
    lr=0.1,
    weight_decay=4e-5,
    gate_mode="soft",
    channel_wise=True,
    randomgate=True,
    tunable_lif=True,
    gate_lr_divisor=10.0,
    scheduler="soft-cosine",
    seed=9,
)

PRESETS: dict[str, dict[str, Any]] = {
    # The CPU demo: the README recipe on a small net and the embedded digits, one CPU thread; ~1-2 minutes.
    "digits": dict(
        dataset="digits",
        model="glifnet_small",
        T=2,
        epochs=15,
        batch_size=64,
        eval_batch_size=360,
        lr=0.1,
        weight_decay=4e-5,
        gate_mode="soft",
        channel_wise=True,
        randomgate=True,
        tunable_lif=True,
        gate_lr_divisor=10.0,
        scheduler="soft-cosine",
        seed=9,
        log_interval=5,
        threads=1,
    ),
}
for _k in (10, 100):
    for _arch in ("resnet18", "resnet19"):
        for _t in (2, 4, 6):
            PRESETS[f"cifar{_k}-{_arch}-t{_t}"] = dict(dataset=f"cifar{_k}", model=_arch, T=_t, **_README_CIFAR)
# torch.distributed.run --nproc_per_node N ... --batch-size 50 (per GPU) --MS18 --imagenet, T 6; DDP + SyncBN turns
# tdBN into plain BN, and the gates learn at lr / 1. Written for 8 GPUs: pass --batch-size 50N for N.
PRESETS["imagenet-resnet18ms-t6"] = dict(
    dataset="imagenet",
    model="resnet18ms",
    T=6,
    epochs=150,
    batch_size=400,
    lr=0.1,
    weight_decay=4e-5,
    gate_mode="soft",
    channel_wise=True,
    randomgate=True,
    tunable_lif=True,
    gate_lr_divisor=1.0,
    scheduler="soft-cosine",
    bn="plain",
    sync_bn=True,
    seed=9,
)
# cifar10dvs/train.py --dsr_da -amp -model SEWResNet_GLIF_dsr -cnf ADD -epochs 200 -T_max 64 -T 16 -lr 0.01 -b 32:
# one SGD group over everything, no weight decay, PyTorch cosine with T_max 64 (periodic over 200 epochs), plain BN. The
# model draws its float64 gates from U(-0.1, 0.1) itself.
PRESETS["cifar10dvs-sew7b-t16"] = dict(
    dataset="cifar10dvs",
    model="sew7b_wide",
    T=16,
    epochs=200,
    batch_size=32,
    lr=0.01,
    weight_decay=0.0,
    param_groups="single",
    tunable_lif=False,
    scheduler="cosine",
    t_max=64,
    amp=True,
    bn="plain",
    seed=9,
)
DEFAULT_PRESET = "digits"


__all__ = ["CHOICES", "DEFAULT_PRESET", "OLD_COMPILE", "PRESETS", "RENAMED", "TrainConfig", "choices"]
