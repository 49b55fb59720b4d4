"""Shared test set-up: hypothesis profiles, optional oracles that cannot vanish in CI, and a guard that no test leaves
global state behind.

- Hypothesis: `ci` (derandomized: the same cases every run, no deadline) when CI is set, else `dev` (new random
  cases every run); HYPOTHESIS_PROFILE overrides either.
- Optional oracles and backends (SpikingJelly, DALI, matplotlib, ...): `require("module")` imports one inside a
  test, and `needs("module")` marks a test or a parametrized case. Outside CI a missing module skips; in CI
  (CI=true, set by .ci/run) it fails, so a broken install cannot turn checks into silent skips.
- Helpers several test files share: `free_ports` for process groups, `assert_same_training_state` for two
  checkpoints of training runs, the `uncompiled` fixture (glif2's fused kernels run eagerly in that test).
- Every test starts from the same seeds (torch, numpy, random) and must leave the process as it found it:
  deterministic mode, threads, cuDNN flags, default dtype, grad mode, the model registry, the eager-kernels switch,
  dynamo's config, signal handlers, process groups and the environment (see `global_state`).
"""

import importlib
import os
import random
import signal
import socket

import numpy as np
import pytest
import torch
import torch._dynamo.config as dynamo_config
import torch._inductor.config as inductor_config
from hypothesis import HealthCheck, settings

from glif2.compile import eager_kernels, kernels_are_eager
from glif2.models import list_models

CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

# `ci`: reproducible (derandomized) and without deadlines, since compiling a kernel can take seconds. `dev`: fresh
# random cases on every local run (failures are replayed from the local .hypothesis database).
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "dev", derandomize=False, deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if CI else "dev"))

torch.set_num_threads(min(2, torch.get_num_threads()))


# optional oracles and backends


def missing(module: str) -> str | None:
    """Why `module` cannot be imported (None when it can). Finding the spec is not enough: a broken install imports
    badly, so the module is imported."""
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or whatever a broken install raises on import
        return f"{type(e).__name__}: {e}"
    return None


def require(module: str):
    """Imports an optional oracle or backend for a test: skips when it is missing, except in CI, where it fails."""
    reason = missing(module)
    if reason is None:
        return importlib.import_module(module)
    if CI:
        pytest.fail(f"{module} is required in CI (CI=true) but cannot be imported: {reason}", pytrace=False)
    pytest.skip(f"{module} not installed ({reason})")


def needs(*modules: str) -> pytest.MarkDecorator:
    """A mark for a test or a parametrized case (`pytest.param("dali", marks=needs("nvidia.dali"))`): skipped when a
    module is missing outside CI. In CI nothing is skipped: the case runs and fails on the missing module."""
    absent = [m for m in modules if missing(m)]
    return pytest.mark.skipif(bool(absent) and not CI, reason=f"not installed: {', '.join(absent)}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# shared helpers


@pytest.fixture
def uncompiled():
    """The test runs with glif2's fused kernels uncompiled (glif2.eager_kernels): for tests about something other
    than the kernels, which would otherwise pay their compilation."""
    with eager_kernels():
        yield


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on the loopback (all bound at once, so that no two are the same)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two checkpoints: identical model, optimizer momenta, schedule, counters and scores."""
    assert state_equal(a["model"], b["model"])
    for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(s["momentum_buffer"], t["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    for key in ("epoch", "step", "best_acc", "test_acc"):
        assert a[key] == b[key], key


# no global state between tests

ENV_KEYS = ("CUBLAS_WORKSPACE_CONFIG", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def global_state() -> dict:
    """Process-wide settings a test (or the code under test) could change and forget to put back."""
    return {
        "deterministic algorithms": (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),
        "threads": torch.get_num_threads(),
        "cudnn": (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic),
        "float32 matmul precision": torch.get_float32_matmul_precision(),
        "default dtype": torch.get_default_dtype(),
        "grad mode": torch.is_grad_enabled(),
        "autocast": torch.is_autocast_enabled("cpu"),
        "registered models": tuple(list_models()),
        "eager kernels": kernels_are_eager(),
        "dynamo config": dynamo_config.get_config_copy(),
        "inductor config": {k: v for k, v in inductor_config.get_config_copy().items() if not callable(v)},
        "signal handlers": (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)),
        "process group": torch.distributed.is_available() and torch.distributed.is_initialized(),
        "environment": {k: os.environ.get(k) for k in ENV_KEYS},
    }


@pytest.fixture(autouse=True)
def no_leaked_global_state():
    """Seeds every test alike (its result cannot depend on the tests before it) and fails it when it changed a
    process-wide setting (see `global_state`) without putting it back."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    before = global_state()
    yield
    after = global_state()
    leaked = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if "dynamo config" in leaked or "inductor config" in leaked:  # name the keys, not two whole dicts
        for name in ("dynamo config", "inductor config"):
            if name in leaked:
                a, b = leaked[name]
                leaked[name] = {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert not leaked, f"the test left global state changed (before, after): {leaked}"
