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

import glif2
from glif2 import memory
from glif2.compile import compile_model
from glif2.memory import SPIKES, Grid, neuron_steps, pack, saved_activation_bytes, unpack

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
        assert glif2.create_model(name, 10, 2, **options).memory == "lean"


def _build(name: str, mode: str, dtype=torch.float32, eager: bool = True, **extra):
    classes, T, shape, options = MODELS[name]
    torch.manual_seed(0)
    model = glif2.create_model(name.split("-")[0], classes, T, memory=mode, eager=eager, **options, **extra)
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
    return {"loss": loss.detach(), "logits": logits.detach(), "x": x.grad.clone(),
            **{f"grad {k}": p.grad for k, p in model.named_parameters() if p.grad is not None},
            **{f"buffer {k}": b.clone() for k, b in model.named_buffers()}}


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


@pytest.mark.parametrize("options", [{"channel_wise": False}, {"variant": "glif_f"}, {"gate_mode": "hard"},
                                     {"params": "static", "gate_mode": "static_soft", "surrogate": "atan"}],
                         ids=["layer-wise", "glif_f", "hard", "static-atan"])
def test_bitwise_equal_for_every_neuron_form(options):
    _assert_bitwise_to_off(_all_modes("resnet19", **options))


def test_evaluation_and_no_grad_take_the_plain_path():
    model, x, _ = _build("resnet19", "lean")
    assert memory.lean_of(model) is not None
    with torch.no_grad():
        assert memory.lean_of(model) is None
    model.eval()
    assert memory.lean_of(model) is None
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


def test_whole_model_compile_is_exact_and_keeps_what_eager_keeps():
    """Under whole-model torch.compile (train.py's default) lean and recompute give the compiled plain path's results
    within 1e-9 (float64), and the partitioner saves nothing more than the eager lean path does: the unit is a pair
    of opaque custom ops, so no spike masks and no unpacked spikes; only copies of the conv weights (inductor's
    channels-last layout on the CPU) may come on top."""
    results, saved = {}, {}
    for mode in MODES:
        model, x, y = _build("glifnet_small", mode, torch.float64, eager=False)
        compiled = compile_model(model, "default")
        results[mode] = _step(model, x, y, wrap=compiled)
        saved[mode] = _saved(model.train(), compiled, x, y)
        eager_model, _, _ = _build("glifnet_small", mode, torch.float64)
        weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 4)
        eager_figure = _saved(eager_model, eager_model, x, y)[0]
        assert mode == "off" or torch.bool not in saved[mode][1], mode  # the plain path's compiled GLIF saves masks
        assert saved[mode][0] <= eager_figure + weights / neuron_steps(model, x.detach()) + 0.1, (mode, saved[mode])
    for mode in ("lean", "recompute"):
        assert not _differ(results[mode], results["off"], rtol=1e-9), (mode, _differ(results[mode], results["off"],
                                                                                     1e-9))


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
    assert torch.equal(unpack(pack(pooled, SPIKES.pooled(4)), SPIKES.pooled(4), tuple(pooled.shape), torch.float32),
                       pooled)


def test_custom_ops_pass_opcheck():
    """The unit's custom ops: schema, fake (meta) implementations and autograd registration agree with the real
    ones, so torch.compile can trace them."""
    model, x, y = _build("glifnet_small", "lean")
    calls = []
    real = memory.unit_forward

    def spy(*args):
        calls.append(args)
        return real(*args)

    memory.unit_forward = spy
    try:
        F.cross_entropy(model(x), y)
    finally:
        memory.unit_forward = real
    v, tensors, coeffs, spec = calls[0]
    torch.library.opcheck(torch.ops.glif2.unit_forward.default, (v, tensors, coeffs, spec),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# options


def test_memory_option_round_trips_and_validates(tmp_path):
    model = glif2.create_model("glifnet_small", 10, 2, memory="recompute", eager=True)
    assert model.memory == "recompute" and model.model_config["memory"] == "recompute"
    path = glif2.save_checkpoint(tmp_path / "m.pt", model=model)
    assert glif2.load_model(path).memory == "recompute"
    assert glif2.load_model(path, memory="off").memory == "off"
    with pytest.raises(ValueError, match="memory='tiny'"):
        glif2.create_model("glifnet_small", 10, 2, memory="tiny")


# SyncBatchNorm across processes


def _sync_model(mode: str, sync: bool):
    torch.manual_seed(0)
    model = glif2.create_model("glifnet_small", 10, 2, memory=mode, bn="plain", eager=True).double()
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
    F.cross_entropy(model(x[4 * rank : 4 * rank + 4]), y[4 * rank : 4 * rank + 4]).backward()
    for p in model.parameters():  # what DDP does (torch's DDP refuses SyncBatchNorm on the CPU)
        torch.distributed.all_reduce(p.grad)
        p.grad /= 2
    if rank == 0:
        torch.save({"grads": {k: p.grad for k, p in model.named_parameters()}, "buffers": dict(model.named_buffers())},
                   out)
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


# CUDA (skipped without it; scripts/gpu_check.sh runs these)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["lean", "recompute"])
def test_cuda_matches_the_plain_path(mode):
    """On CUDA the same ops run on rebuilt inputs; cuDNN may pick other algorithms for the recomputed convolution,
    so the comparison allows float32 rounding."""
    results = {}
    for m in ("off", mode):
        model, x, y = _build("resnet19", m, eager=False)
        model, x, y = model.cuda(), x.detach().cuda().requires_grad_(), y.cuda()
        results[m] = _step(model, x, y)
    assert not _differ(results[mode], results["off"], rtol=1e-4), _differ(results[mode], results["off"], rtol=1e-4)


@pytest.mark.gpu
def test_cuda_graphs_train_the_lean_path():
    """train.py's CUDA step: model + loss compiled with reduce-overhead (CUDA graphs) in lean mode, a few SGD steps,
    the same trajectory as the uncompiled lean model."""
    from glif2.train.loop import Objective

    finals = []
    for mode in ("none", "reduce-overhead"):
        model, x, y = _build("resnet19", "lean", eager=False)
        model, x, y = model.cuda(), x.detach().cuda(), y.cuda()
        objective = compile_model(Objective(model, 0.0, None), mode)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for _ in range(4):
            torch.compiler.cudagraph_mark_step_begin()
            loss, _ = objective(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert torch.isfinite(loss)
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-3, atol=1e-4)
