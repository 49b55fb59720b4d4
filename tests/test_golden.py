"""Golden outputs of the released architectures, computed once by the authors' own network code.

Shape letters: t steps, b batch, k classes.

Each tests/golden/<released file stem>.json holds, for one released file name (docs/networks.md §7.1), the float32
logits (`float.hex`, exact) and the spike count of every neuron layer (per step, in forward order) that the
authors' model gives in eval mode on a fixed input, with weights that `fill` below regenerates. The test writes
those weights in the authors' container under the released name, loads them with
`glif2.load_reference_checkpoint(path)` alone, and demands the same spike counts exactly and the same logits to
float32 rounding (LOGIT_TOLERANCE, below), with the compiled GLIF kernels and under `eager_kernels()`.

How the numbers were produced (once, outside this repository; none of the authors' code is in it):
- Code: CAS-CLab/Gated-LIF as stored in the public index: `layers.py` and `cifar10dvs/layers.py` at 5cda262
  (2023-02-18 HEAD, whose backward bug, docs/neuron.md §9 Q1, does not touch the forward), `blocks.py`,
  `networks_for_CIFAR.py`, `networks_for_ImageNet.py`, `cifar10dvs/smodels.py` at 88b0bfa. SpikingJelly was a
  stand-in with 0.0.0.0.10 semantics (`clock_driven.layer.SeqToANNContainer`: an nn.Sequential that runs its
  children on `(t b) ...`); the DVS code's other SpikingJelly imports are unused by the GLIF net.
- Models, built as `train.py` does with `--soft-mode --channel-wise` (gate [0.6, 0.8, 0.6], param
  [tau, Vth, linear_decay, conduct] of layers.py, `static_gate=static_param=time_wise=False`):
  `ResNet_18_stand_CW(n_class=10 | 100)`, `ResNet_19_cifar_CW(n_class=10 | 100)`,
  `ResNet_18_stand_CW_MS(n_class=1000)` converted by `nn.SyncBatchNorm.convert_sync_batchnorm` (its keys saved
  with DDP's `module.` prefix, no `Vth` buffers), and `SEWResNet_GLIF_dsr('ADD', T=16)` (float64 gates, saved
  under `net`). T is the file name's. ResNet-34MS has no released file and is not covered.
- Weights: the model's state_dict keys in order; entry i is `fill(kind, shape, dtype, [seed, i])`, its kind
  taken from the module owning it (conv, linear, BatchNorm/tdBN, GLIF). The golden file lists every
  (key, shape, dtype, kind), the seed and the value ranges, so this test rebuilds the file without the authors'
  code. The ranges make every neuron layer fire at 12-63 % (counts and shapes per layer in the golden files).
- Input: `make_input` (CIFAR: 2 x 3 x 32 x 32 values in [-2, 2); ImageNet: 1 x 3 x 64 x 64, the nets being
  fully convolutional; DVS: 2 x 16 x 2 x 48 x 48 event counts 0..3). Eval mode, torch.no_grad, float32,
  torch 2.14.1 on x86-64 CPU; forward hooks on the authors' `LIFSpike_CW` modules, whose names equal ours.

The CPU kernels (oneDNN convolution, BLAS matmul) choose their blocking, and so their order of summation, by the
CPU they run on: on an x86-64 machine other than the one the goldens were made on (torch 2.14.1 both), the logits
came out up to 5e-7 of the largest logit away (a few float32 ulps) with every spike count equal. So spike counts are
compared exactly and logits within LOGIT_TOLERANCE of the largest golden logit, 8x that measured spread. What the
goldens catch, measured: formula and constant errors in GLIF, tdBN or the wiring, a wrong key mapping or load option
(the planted faults below); most single parameter tensors scaled by 1 + 1e-4 on a spike path (not all: a last-layer
reset gate survives 1e-3); the head's weights scaled by 1 + 1e-4. Ulp-level reorderings inside GLIF or tdBN (e.g.
tdBN's scale folded into its weight) flipped no spike on inputs this small: the kernel tests own those.
"""

import copy
import json
import math
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import glif2
from glif2.compile import eager_kernels

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.json"))
SENTINEL = "resCifar18stand-CIFAR10-step4-CW"  # for the planted faults: tdBN, a two-linear head, T = 4, and cheap

# kind -> (low, high) of a uniform draw: value = low + (high - low) * u, u from numpy's legacy RandomState (a
# stream numpy keeps frozen), computed in float64 and rounded once to the entry's dtype. Only +, -, * and a
# correctly rounded sqrt are involved, so the weights are the same on every platform and torch version.
UNIFORM = {
    "bn.weight": (0.5, 1.5),
    "bn.bias": (-0.2, 0.6),
    "bn.running_mean": (-0.2, 0.2),
    "bn.running_var": (0.5, 2.0),  # narrower variances let the MS net's real-valued residual stream blow up
    "linear.bias": (-0.1, 0.1),
    # GLIF logits: wide enough that every channel differs (a Vth/reVth or gate mix-up changes spikes)
    "glif.alpha": (-2.0, 2.0),
    "glif.beta": (-2.0, 2.0),
    "glif.gamma": (-2.0, 2.0),
    "glif.tau": (-2.5, 0.5),
    "glif.Vth": (-0.75, 0.75),
    "glif.leak": (-4.0, -1.5),
    "glif.reVth": (-1.0, 1.0),
    "glif.conduct": (-1.0, 2.0),
}
TDBN_VTH = 0.5  # tdBN's constant buffer in the static-image code (layers.py `Vth`), left at its value
KINDS = {*UNIFORM, "conv.weight", "linear.weight", "bn.num_batches_tracked", "tdbn.Vth"}

# helpers


def fill(kind: str, shape: list[int], dtype: torch.dtype, seed: list[int]) -> Tensor:
    """One state-dict entry of the golden weights: a deterministic function of (kind, shape, dtype, seed)."""
    if kind == "tdbn.Vth":
        return torch.tensor(TDBN_VTH, dtype=dtype)
    u = np.random.RandomState(seed).random_sample(math.prod(shape))
    if kind == "bn.num_batches_tracked":  # unused in eval; any int64
        return torch.tensor(int(u[0] * 1e6), dtype=dtype)
    if kind in ("conv.weight", "linear.weight"):
        # variance 1 / fan_in: inputs with unit second moment give outputs with unit second moment
        bound = math.sqrt(3.0 / math.prod(shape[1:]))
        low, high = -bound, bound
    else:
        low, high = UNIFORM[kind]
    return torch.from_numpy(low + (high - low) * u).reshape(shape).to(dtype)


def reference_weights(golden: dict) -> dict[str, Tensor]:
    """The authors'-format state dict (their key names, order, shapes and dtypes) the golden file was made from."""
    seed = golden["weights"]["seed"]
    return {
        key: fill(kind, shape, getattr(torch, dtype), [seed, i])
        for i, (key, shape, dtype, kind) in enumerate(golden["weights"]["entries"])
    }


def make_input(recipe: dict) -> Tensor:
    """The fixed float32 input: images `b c h w` in [-2, 2), or DVS frames `b t c h w` of event counts 0..3."""
    u = np.random.RandomState(recipe["seed"]).random_sample(math.prod(recipe["shape"])).reshape(recipe["shape"])
    if recipe["kind"] == "image":
        x = 4.0 * u - 2.0
    elif recipe["kind"] == "events":
        x = (u < 0.3).astype(np.float64) + (u < 0.1) + (u < 0.03)
    else:
        raise ValueError(f"unknown input kind {recipe['kind']!r}")
    return torch.from_numpy(x).to(torch.float32)


def from_hex(values: list[str], shape: list[int]) -> Tensor:
    # float32 -> float64 -> hex is exact, and so is the way back
    return torch.tensor([float.fromhex(v) for v in values], dtype=torch.float64).reshape(shape).float()


@cache
def load_golden(stem: str) -> dict:
    return json.loads((GOLDEN / f"{stem}.json").read_text())


def write_reference(golden: dict, folder: Path) -> Path:
    """The golden weights saved in the authors' container under the released file name."""
    weights = reference_weights(golden)
    if golden["container"] == "net":  # CIFAR10-DVS: the training state around the net (docs/networks.md §7.2)
        payload = {
            "net": weights,
            "optimizer": {"state": {}, "param_groups": []},
            "lr_scheduler": {},
            "epoch": 0,
            "max_test_acc": 0.0,
        }
    else:
        payload = {"state_dict": weights}
    path = folder / golden["file"]
    torch.save(payload, path)
    return path


def run(model: nn.Module, golden: dict) -> tuple[Tensor, list[tuple[str, list[int]]]]:
    """Eval-mode logits on the golden input and (layer name, spike count per step) of every GLIF, in call order."""
    counts = []

    def hook(name):
        return lambda module, inputs, out: counts.append((name, out.flatten(1).sum(1, dtype=torch.float64).tolist()))

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, glif2.GLIF)]
    try:
        model.eval()
        with torch.no_grad():
            logits = model(make_input(golden["input"]))
    finally:
        for h in handles:
            h.remove()
    return logits, [(name, [int(c) for c in per_step]) for name, per_step in counts]


LOGIT_TOLERANCE = 2.0**-18  # of the largest golden logit (about 3.8e-6): 8x the spread between two CPUs


def mismatch(golden: dict, logits: Tensor, counts: list[tuple[str, list[int]]]) -> str:
    """'' when the spike counts equal the golden ones exactly and the logits within LOGIT_TOLERANCE of the largest
    golden logit, else what differs."""
    expected = from_hex(golden["logits"]["hex"], golden["logits"]["shape"])
    want = [(s["glif2"], s["per_step"]) for s in golden["spikes"]]
    problems = []
    if [n for n, _ in counts] != [n for n, _ in want]:
        problems.append(f"neuron layers {[n for n, _ in counts]} != golden {[n for n, _ in want]}")
    else:
        bad = [f"{n}: {got} != {ref}" for (n, got), (_, ref) in zip(counts, want, strict=True) if got != ref]
        if bad:
            problems.append(f"spike counts per step differ in {len(bad)} of {len(want)} layers, first: {bad[:3]}")
    if logits.dtype != expected.dtype or logits.shape != expected.shape:
        problems.append(f"logits {logits.dtype} {tuple(logits.shape)} != golden float32 {tuple(expected.shape)}")
    else:
        diff = (logits.double() - expected.double()).abs()
        bound = LOGIT_TOLERANCE * expected.abs().max().item()
        if (diff > bound).any():
            problems.append(
                f"logits differ beyond {bound:.3g} in {int((diff > bound).sum())}/{diff.numel()} "
                f"entries, max |diff| {diff.max().item():.3g}"
            )
    return "; ".join(problems)


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    """stem -> path of the golden weights in the released format (written once per module)."""
    folder = tmp_path_factory.mktemp("released")
    written = {}

    def get(stem: str) -> Path:
        if stem not in written:
            written[stem] = write_reference(load_golden(stem), folder)
        return written[stem]

    return get


# tests


def test_golden_files_describe_what_the_test_regenerates():
    assert len(CASES) == 6, CASES
    assert sum((GOLDEN / f"{s}.json").stat().st_size for s in CASES) < 1_000_000
    for stem in CASES:
        golden = load_golden(stem)
        assert golden["file"].startswith(stem)
        # the fill procedure must still be the one the numbers were made with
        assert {k: tuple(v) for k, v in golden["weights"]["uniform"].items()} == UNIFORM, stem
        assert golden["weights"]["tdbn_vth"] == TDBN_VTH
        assert {kind for *_, kind in golden["weights"]["entries"]} <= KINDS
        # every neuron layer fires at a rate where a changed membrane shows up as changed spikes
        for s in golden["spikes"]:
            assert sum(s["per_step"]) == s["count"]
            assert 0.01 < s["count"] / math.prod(s["shape"]) < 0.8, (stem, s["layer"])


@pytest.mark.parametrize("eager", [False, True], ids=["compiled", "eager"])
@pytest.mark.parametrize("stem", CASES)
def test_released_format_reproduces_golden_outputs(reference_file, stem, eager):
    golden = load_golden(stem)
    model = glif2.load_reference_checkpoint(reference_file(stem))
    config = model.model_config
    want = golden["glif2"]
    assert (config["name"], config["num_classes"], config["T"]) == (want["arch"], want["num_classes"], want["T"])
    with eager_kernels(eager):
        problems = mismatch(golden, *run(model, golden))
    assert not problems, f"{golden['file']} ({'eager' if eager else 'compiled'}): {problems}"


def _swap_threshold_and_reset(model):  # the Vth / reVth key mapping mixed up in one layer
    neuron = model.features[-1].lif
    with torch.no_grad():
        v_th = neuron.v_th.clone()
        neuron.v_th.copy_(neuron.v_reset)
        neuron.v_reset.copy_(v_th)


def _shortcut_bn_alpha_one(model):  # tdBN's 1/sqrt(2) forgotten on one shortcut
    model.features[1].downsample[0].alpha = 1.0


def _conductance_one_step_late(model):  # conduct[t - 1] used at step t in the stem
    with torch.no_grad():
        model.conv1[1].conduct.copy_(model.conv1[1].conduct.roll(1, 0))


def _stem_bn_weight_relative_1e4(model):  # a parameter tensor off by 1e-4 relative
    with torch.no_grad():
        model.conv1[0][1].weight.mul_(1 + 1e-4)


def _head_weights_relative_1e4(model):  # after the last spikes: only the logits can tell
    with torch.no_grad():
        model.lastave[-1].weight.mul_(1 + 1e-4)


# name -> (fault applied to the loaded model, load options); each must make the golden comparison fail
FAULTS = {
    "swap_v_th_v_reset": (_swap_threshold_and_reset, {}),
    "shortcut_bn_alpha_1": (_shortcut_bn_alpha_one, {}),
    "conduct_one_step_late": (_conductance_one_step_late, {}),
    "stem_bn_weight_1e-4": (_stem_bn_weight_relative_1e4, {}),
    "head_weights_1e-4": (_head_weights_relative_1e4, {}),
    "hard_gates_option": (None, {"gate_mode": "hard"}),
}


@pytest.fixture(scope="module")
def sentinel_model(reference_file):
    return glif2.load_reference_checkpoint(reference_file(SENTINEL))


@pytest.mark.parametrize("fault", FAULTS)
def test_golden_catches_planted_faults(reference_file, sentinel_model, fault, uncompiled):
    golden = load_golden(SENTINEL)
    plant, options = FAULTS[fault]
    if options:
        model = glif2.load_reference_checkpoint(reference_file(SENTINEL), **options)
    else:
        model = copy.deepcopy(sentinel_model)
    if plant is not None:
        plant(model)
    assert mismatch(golden, *run(model, golden)), f"{fault} left the golden outputs unchanged"


def test_backward_only_options_keep_the_golden_outputs(reference_file, uncompiled):
    # Detached (static) soft gates change gradients only: the forward, and so the goldens, must not move.
    golden = load_golden(SENTINEL)
    model = glif2.load_reference_checkpoint(reference_file(SENTINEL), gate_mode="static_soft")
    assert not mismatch(golden, *run(model, golden))
