"""glif2.memory: the lean and recompute modes compute exactly what the plain path computes, in less memory.

Shape letters: t steps, b batch, c channels, h w space, k classes.

Oracles: the plain path ("off"), which is autograd itself; bitwise in float32 on the CPU (the same kernels run on
rebuilt-bit-for-bit inputs), 1e-9 relative in float64 under torch.compile; a single process over the global batch for
SyncBatchNorm across two processes; hypothesis for the bit packing.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import free_ports
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import glif2
import glif2.memory.fused
from glif2.compile import compile_model, compile_regions, eager_kernels
from glif2.layers import TimeMerged, tdBatchNorm
from glif2.memory.fused import BranchGrads, BranchSpec, NeuronSpec, SavedBranch, UnitSpec, flatten, parse, unflatten
from glif2.memory.grid import SPIKES, Encoding, Grid, pack, unpack
from glif2.memory.lean import LeanModule, LeanSequential, active_mode, set_memory
from glif2.memory.measure import neuron_steps, saved_activation_bytes
from glif2.memory.saving import ConvSpec
from glif2.neuron import GLIF

pytestmark = pytest.mark.usefixtures("uncompiled")  # the fused kernels run eagerly unless a test turns them back on

# model -> (classes, T, input shape, options): small enough for the suite, every block kind covered
MODELS = {
    "resnet18": (10, 2, (2, 3, 8, 8), {}),
    "resnet19": (10, 2, (2, 3, 8, 8), {}),
    "resnet34": (10, 2, (1, 3, 32, 32), {}),
    "resnet18ms": (10, 2, (1, 3, 32, 32), {}),
    "resnet34ms": (10, 2, (1, 3, 32, 32), {}),
    "cifarnet": (10, 2, (2, 3, 16, 16), {"input_size": 16}),
    "glifnet_small": (10, 2, (4, 1, 8, 8), {}),
    "sew7b_wide": (10, 2, (2, 2, 2, 16, 16), {"input_size": 16}),
    "sew7b_wide-AND": (10, 2, (2, 2, 2, 16, 16), {"input_size": 16, "connect": "AND"}),
    "sew7b_wide-IAND": (10, 2, (2, 2, 2, 16, 16), {"input_size": 16, "connect": "IAND"}),
}
MODES = ("off", "lean", "recompute")


def test_every_registered_model_has_a_lean_path():
    assert {name.split("-")[0] for name in MODELS} == set(glif2.list_models())
    for name in glif2.list_models():
        options = {"input_size": 16} if name in ("cifarnet", "sew7b_wide") else {}
        assert glif2.create_model(name, 10, 2, **options).memory_mode == "lean"


def _build(name: str, mode: str, dtype=torch.float32, **extra):
    classes, T, shape, options = MODELS[name]
    torch.manual_seed(0)
    model = glif2.create_model(name.split("-")[0], classes, T, memory=mode, **options, **extra)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g, dtype=dtype) * 2
    if name.startswith("sew"):
        x = x.abs().round()  # event counts
    y = torch.randint(0, classes, (shape[0],), generator=g)
    return model.to(dtype), x.requires_grad_(), y


def _step(model, x, y, amp: bool = False, wrap=None):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = (model if wrap is None else wrap)(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    return {
        "loss": loss.detach(),
        "logits": logits.detach(),
        "x": x.grad.clone(),
        **{f"grad {k}": p.grad for k, p in model.named_parameters() if p.grad is not None},
        **{f"buffer {k}": b.clone() for k, b in model.named_buffers()},
    }


def _differ(a: dict, b: dict, rtol: float = 0.0) -> list[str]:
    """Keys whose tensors differ: bit for bit when rtol is 0."""
    assert a.keys() == b.keys()
    if rtol == 0.0:
        return [k for k in a if not torch.equal(a[k], b[k])]
    return [k for k in a if not torch.allclose(a[k].double(), b[k].double(), rtol=rtol, atol=rtol * a[k].abs().max())]


def _all_modes(name: str, amp: bool = False, **options) -> dict[str, dict]:
    return {mode: _step(*_build(name, mode, **options), amp=amp) for mode in MODES}


def _assert_bitwise_to_off(got: dict[str, dict]) -> None:
    for mode in ("lean", "recompute"):
        assert not _differ(got[mode], got["off"]), (mode, _differ(got[mode], got["off"]))


@pytest.mark.parametrize("name", list(MODELS))
def test_bitwise_equal_to_autograd_float32(name):
    """Loss, logits, the input gradient, every parameter gradient and every BN buffer of lean and recompute equal
    the plain path's bit for bit: the same kernels run on the same (rebuilt) inputs."""
    _assert_bitwise_to_off(_all_modes(name))


@pytest.mark.parametrize("name", ["resnet19", "sew7b_wide"])
def test_bitwise_equal_under_bf16_autocast(name):
    """Under AMP the lean path keeps the bf16 BN inputs and casts exactly where autocast would."""
    _assert_bitwise_to_off(_all_modes(name, amp=True))


@pytest.mark.parametrize(
    "options",
    [
        {"channel_wise": False},
        {"variant": "glif_f"},
        {"gate_mode": "hard"},
        {"params": "static", "gate_mode": "static_soft", "surrogate": "atan"},
    ],
    ids=["layer-wise", "glif_f", "hard", "static-atan"],
)
def test_bitwise_equal_for_every_neuron_form(options):
    _assert_bitwise_to_off(_all_modes("resnet19", **options))


def test_evaluation_and_no_grad_take_the_plain_path():
    model, x, _ = _build("resnet19", "lean")
    block = model.features[0]
    assert active_mode(block) == "lean"
    with torch.no_grad():
        assert active_mode(block) is None
    model.eval()
    assert active_mode(block) is None
    plain, _, _ = _build("resnet19", "off")
    with torch.no_grad():
        assert torch.equal(model(x), plain.eval()(x))


# memory


def _saved(model, run, x, y) -> tuple[float, dict]:
    saved = saved_activation_bytes(model, lambda: F.cross_entropy(run(x), y))
    return saved["bytes"] / neuron_steps(model.eval(), x.detach()), saved["by_dtype"]


def test_lean_and_recompute_keep_a_fraction_of_the_activations():
    """ResNet-19 (T=2, 16x16, batch 2: per-channel statistics weigh more here than at the benchmark's 32x32): the plain
    path keeps ~12.5 bytes per neuron-step; lean keeps the BN input once (4 B) plus packed spikes; recompute keeps
    little more than the packed spikes. bench/memory.py measures the full-size figures."""
    figures = {}
    for mode in MODES:
        model, x, y = _build("resnet19", mode)
        x = torch.randn(2, 3, 16, 16)
        figures[mode] = _saved(model, model, x, y)
    off, lean, recompute = (figures[m][0] for m in MODES)
    assert 12.0 < off < 13.0
    assert lean < 0.4 * off and recompute < 0.04 * off
    assert torch.uint8 in figures["lean"][1] and torch.bool not in figures["lean"][1]


@pytest.mark.parametrize("scope", ["model", "regional"])
def test_compiled_modes_are_exact_and_keep_what_eager_keeps(scope):
    """Under torch.compile, whole-model or by regions (train.py's default), lean and recompute give the compiled plain
    path's results within 1e-9 (float64), and so does the compiled plain path the eager one's; the partitioner saves
    nothing more than the eager lean path does: the unit is a pair of opaque custom ops, so no spike masks and no
    unpacked spikes; only copies of the conv weights (inductor's channels-last layout) may come on top."""
    results, saved = {}, {}
    for mode in MODES:
        model, x, y = _build("glifnet_small", mode, torch.float64)
        if mode == "off":
            eager_off = _step(*_build("glifnet_small", mode, torch.float64))
        compiled = compile_model(model, "default") if scope == "model" else compile_regions(model, "default")
        results[mode] = _step(model, x, y, wrap=compiled)
        saved[mode] = _saved(model.train(), compiled, x, y)
        eager_model, _, _ = _build("glifnet_small", mode, torch.float64)
        weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 4)
        eager_figure = _saved(eager_model, eager_model, x, y)[0]
        assert mode == "off" or torch.bool not in saved[mode][1], mode  # the plain path's compiled GLIF saves masks
        assert saved[mode][0] <= eager_figure + weights / neuron_steps(model, x.detach()) + 0.1, (mode, saved[mode])
    assert not _differ(results["off"], eager_off, rtol=1e-9), _differ(results["off"], eager_off, 1e-9)
    for mode in ("lean", "recompute"):
        assert not _differ(results[mode], results["off"], rtol=1e-9), (
            mode,
            _differ(results[mode], results["off"], 1e-9),
        )


# packing


@st.composite
def grid_values(draw):
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=4)))
    grid = Grid(draw(st.sampled_from([1, 2, 4, 16])), draw(st.sampled_from([1, 2, 3, 5, 15, 16, 255])))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["random", "zeros", "top"]))
    k = torch.randint(0, grid.top + 1, shape, generator=g)
    if kind != "random":
        k = torch.full(shape, 0 if kind == "zeros" else grid.top)
    return k, grid, draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))


@given(grid_values())
@example((torch.ones(1, 1), SPIKES, torch.float32))
@example((torch.zeros(3, 5, 7), SPIKES, torch.float32))
def test_pack_round_trip_is_exact(case):
    k, grid, dtype = case
    x = (k.double() / grid.scale).to(dtype)
    packed = pack(x, grid)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-x.numel() * grid.bits // 8)
    assert torch.equal(unpack(packed, grid, tuple(x.shape), dtype), x)


def test_grid_arithmetic():
    assert SPIKES.bits == 1 and (SPIKES + SPIKES) == Grid(1, 2) and (SPIKES + SPIKES).bits == 2
    assert (SPIKES + SPIKES + SPIKES + SPIKES).bits == 4 and Grid(1, 255).bits == 8 and Grid(1, 256).bits is None
    assert SPIKES.pooled(4) == Grid(4, 4) and SPIKES.pooled(9) is None  # 1/9 is not exact in binary
    assert Grid(4, 4) + SPIKES == Grid(4, 8) and SPIKES * SPIKES == SPIKES
    spikes = (torch.rand(2, 3, 8, 8) > 0.5).float()
    pooled = F.avg_pool2d(spikes, 2)
    assert torch.equal(
        unpack(pack(pooled, SPIKES.pooled(4)), SPIKES.pooled(4), tuple(pooled.shape), torch.float32), pooled
    )


def test_custom_ops_pass_opcheck():
    """The unit's custom ops: schema, fake (meta) implementations and autograd registration agree with the real
    ones, so torch.compile can trace them."""
    model, x, y = _build("glifnet_small", "lean")
    calls = []
    real = glif2.memory.fused.unit_forward

    def spy(*args):
        calls.append(args)
        return real(*args)

    glif2.memory.fused.unit_forward = spy
    try:
        F.cross_entropy(model(x), y)
    finally:
        glif2.memory.fused.unit_forward = real
    v, tensors, coeffs, spec = calls[0]
    torch.library.opcheck(
        torch.ops.glif2.unit_forward.default,
        (v, tensors, coeffs, spec),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


# options


def test_memory_option_round_trips_and_validates(tmp_path):
    model = glif2.create_model("glifnet_small", 10, 2, memory="recompute")
    assert model.memory_mode == "recompute" and model.model_config["memory"] == "recompute"
    assert model.features.memory_mode == "recompute"  # the switch reaches every LeanModule
    path = glif2.save_checkpoint(tmp_path / "m.pt", model=model)
    assert glif2.load_model(path).memory_mode == "recompute"
    assert glif2.load_model(path, memory="off").memory_mode == "off"
    with pytest.raises(ValueError, match="memory='tiny'"):
        glif2.create_model("glifnet_small", 10, 2, memory="tiny")


# SyncBatchNorm across processes


def _sync_model(mode: str, sync: bool):
    torch.manual_seed(0)
    model = glif2.create_model("glifnet_small", 10, 2, memory=mode, bn="plain").double()
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync else model


def _sync_data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)


def _sync_worker(rank: int, port: int, mode: str, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = _sync_model(mode, sync=True)
    x, y = _sync_data()
    with eager_kernels():
        F.cross_entropy(model(x[4 * rank : 4 * rank + 4]), y[4 * rank : 4 * rank + 4]).backward()
    for p in model.parameters():  # what DDP does (torch's DDP refuses SyncBatchNorm on the CPU)
        torch.distributed.all_reduce(p.grad)
        p.grad /= 2
    if rank == 0:
        torch.save(
            {"grads": {k: p.grad for k, p in model.named_parameters()}, "buffers": dict(model.named_buffers())}, out
        )
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("mode", ["lean", "recompute"])
def test_sync_batchnorm_across_two_processes_equals_one_process(tmp_path, mode):
    """Statistics over the global batch (two collectives), local weight gradients averaged, input gradients from the
    globally reduced sums: two CPU processes with half the batch each equal one process with all of it."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank0.pt")
    mp.spawn(_sync_worker, args=(free_ports(1)[0], mode, out), nprocs=2, join=True)
    got = torch.load(out)
    model = _sync_model("off", sync=False)
    x, y = _sync_data()
    F.cross_entropy(model(x), y).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][k], p.grad, rtol=1e-9, atol=1e-12, msg=k)
    for k, b in model.named_buffers():
        torch.testing.assert_close(got["buffers"][k], b, rtol=1e-12, atol=1e-12, msg=k)


# the protocol (docs/performance.md §7)


def _pool_net(pool: nn.AvgPool2d) -> LeanSequential:
    torch.manual_seed(0)
    return set_memory(
        LeanSequential(
            TimeMerged(nn.Conv2d(1, 4, 3, padding=1, bias=False), tdBatchNorm(4)),
            GLIF(2, 4),
            TimeMerged(pool),
            image_steps=2,
        ),
        "lean",
    )


@pytest.mark.parametrize(
    "pool, why",
    [
        (nn.AvgPool2d(2, 2, ceil_mode=True), "ceil_mode"),
        (nn.AvgPool2d(2, 2, padding=1, count_include_pad=False), "count_include_pad=False"),
        (nn.AvgPool2d(2, 2, divisor_override=3), "divisor_override=3"),
    ],
    ids=["ceil_mode", "padding-not-counted", "divisor"],
)
def test_pools_whose_output_is_off_the_grid_are_refused(pool, why):
    """Packing a pool's output on the k / window grid is exact only for whole windows divided by their size: any
    other pool on spikes is refused at its first lean call, naming the option (a 7x7 map pooled by 4 with
    ceil_mode would otherwise be packed wrongly without a sound)."""
    net = _pool_net(pool)
    x = torch.rand(3, 1, 7, 7)
    with pytest.raises(ValueError, match=why):
        net(x)
    with torch.no_grad():
        assert net(x).shape[0] == 2  # the plain path (no grad) is unaffected
    assert _pool_net(nn.AvgPool2d(2, 2, padding=1))(x).shape == (2, 3, 4, 4, 4)  # zeros counted: still exact


def test_out_grid_must_say_what_lean_produced():
    class Liar(LeanModule):
        def __init__(self):
            super().__init__()
            self.neuron = GLIF(2, 3)

        def plain(self, x):
            return self.neuron(x)

        def lean(self, act, mode):
            return act.then(self.neuron(act.x), SPIKES)

        def out_grid(self, in_grid):
            return Grid(1, 2)  # wrong: spikes are Grid(1, 1)

    liar = set_memory(Liar(), "lean")
    with pytest.raises(AssertionError, match="fix out_grid"):
        liar(torch.randn(2, 4, 3, 5))


def test_a_model_without_a_lean_path_accepts_off_only():
    net = nn.Sequential(TimeMerged(nn.Conv2d(1, 4, 3, bias=False), tdBatchNorm(4)), GLIF(2, 4))
    with pytest.raises(ValueError, match="has no lean path"):
        set_memory(net, "lean")
    assert set_memory(net, "off").memory_mode == "off"


def test_unit_layouts_round_trip():
    """The unit's static facts cross the custom-op schema as text and come back as the same typed spec; the tensor
    layouts flatten and unflatten by name."""
    spec = UnitSpec(
        branches=(
            BranchSpec(
                Encoding.packed(Grid(4, 20)), ConvSpec((1, 1), (1, 1), (1, 1), 1), 1e-5, "", (8, 3, 4, 4), "float32"
            ),
            BranchSpec(Encoding.repeated(4), None, 1e-3, "g", (2, 3, 4, 4), "bfloat16"),
            BranchSpec(Encoding(), None, 1e-5, "", (8, 3, 4, 4), "float64"),
        ),
        neuron=NeuronSpec(4, "t b c ... -> t b c (...)", "rect", 1.0),
    )
    assert parse(spec.encode()) == spec and parse(spec.encode()).branches[0].conv.padding == (1, 1)
    assert parse(UnitSpec(spec.branches[:1], None).encode()).neuron is None
    tensors = [SavedBranch(*(torch.full((k + 1,), float(10 * b + k)) for k in range(6))) for b in range(3)]
    flat = flatten(tensors)
    assert len(flat) == 18 and unflatten(SavedBranch, flat, 3)[2].mean[0] == 24.0
    masks = [BranchGrads(True, False, True, False), BranchGrads(False, False, False, True)]
    assert unflatten(BranchGrads, flatten(masks) + [torch.zeros(1)], 2) == masks  # coefficient grads follow


# CUDA (skipped without it; scripts/gpu_check.sh runs these)


def _cuda_step(name: str, mode: str) -> dict:
    model, x, y = _build(name, mode)
    return _step(model.cuda(), x.detach().cuda().requires_grad_(), y.cuda())


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["lean", "recompute"])
@pytest.mark.parametrize("name", ["resnet19", "sew7b_wide"])
def test_cuda_bitwise_equal_to_autograd_with_native_kernels(name, mode):
    """With cuDNN off, the plain path and the lean unit run the same native CUDA kernels (convolution, batch norm)
    on the same rebuilt inputs: bit for bit equal, as on the CPU."""
    with torch.backends.cudnn.flags(enabled=False):
        off, got = _cuda_step(name, "off"), _cuda_step(name, mode)
    assert not _differ(got, off), _differ(got, off)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["lean", "recompute"])
def test_cuda_matches_the_plain_path_with_cudnn_and_compiled_kernels(mode):
    """With cuDNN the plain path's BN is cuDNN's and the unit's is ATen's native kernel: equal to float32 rounding,
    which the stem's weight gradient (a sum over every position of every step) amplifies most."""
    with (
        eager_kernels(False),
        torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False),
    ):
        off, got = _cuda_step("resnet19", "off"), _cuda_step("resnet19", mode)
    assert not _differ(got, off, rtol=1e-3), _differ(got, off, rtol=1e-3)


def _train_steps(scope: str, compile_mode: str, steps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(first-step gradients, final parameters) of `steps` SGD steps of the lean ResNet-19 on CUDA, compiled as
    train.py does it."""
    from glif2.train.setup import Objective

    model, x, y = _build("resnet19", "lean")
    model, x, y = model.cuda(), x.detach().cuda(), y.cuda()
    objective = Objective(model, 0.0, None)
    if scope == "model":
        objective = compile_model(objective, compile_mode)
    else:
        compile_regions(model, compile_mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    first = None
    for _ in range(steps):
        torch.compiler.cudagraph_mark_step_begin()
        loss, _ = objective(x, y)
        loss.backward()
        if first is None:
            first = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert torch.isfinite(loss)
    return first, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.gpu
@pytest.mark.parametrize("scope", ["regional", "model"])
def test_cuda_graphs_replay_the_compiled_step(scope):
    """CUDA graphs (reduce-overhead) replay the same kernels the plain compiled step runs: four SGD steps of the lean
    ResNet-19 end on the same parameters, so no replay reads a stale or overwritten buffer. One step agrees with the
    uncompiled lean model to float32 rounding (more steps would let rounding flip spikes and drift apart)."""
    with (
        eager_kernels(False),
        torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False),
    ):
        eager_grads, _ = _train_steps("none", "none", steps=1)
        grads, plain = _train_steps(scope, "default")
        graph_grads, graphs = _train_steps(scope, "reduce-overhead")
    torch.testing.assert_close(graphs, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(graph_grads, grads, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, eager_grads, rtol=1e-3, atol=1e-3 * eager_grads.abs().max().item())
