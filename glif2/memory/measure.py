"""Measuring what training keeps: neuron-steps and the bytes autograd saves for backward. Used by bench/memory.py and
the tests; not part of the lean path.

Shape letters: none (counts and bytes).
"""

from typing import Any

import torch
from torch import Tensor, nn

from glif2.analysis import FiringRates


def neuron_steps(model: nn.Module, x: Tensor) -> int:
    """GLIF outputs of one forward of `model` on x, over all layers and steps (the plain path, no autograd)."""
    with torch.no_grad(), FiringRates(model) as counter:
        model(x)
    return sum(counter.counts.values())


def saved_activation_bytes(model: nn.Module, step) -> dict[str, Any]:
    """Bytes of the activations autograd keeps for backward during `step()` (a training forward of `model`): the
    unique storages that torch.autograd.graph.saved_tensors_hooks sees, the model's parameters and buffers not
    counted (the model holds them anyway). Returns {bytes, tensors, by_dtype: {dtype: bytes}}; divide by
    `neuron_steps` for bytes per neuron-step."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, tuple[int, torch.dtype]] = {}

    def keep(t: Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = (storage.nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        result = step()
    del result
    by_dtype: dict[torch.dtype, int] = {}
    for nbytes, dtype in seen.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    return {"bytes": sum(by_dtype.values()), "tensors": len(seen), "by_dtype": by_dtype}
