"""GLIF as NIR's LIF: the parameter mapping, the conditions under which it is exact, and, for --approximate, how far
the nearest LIF is from the GLIF on a probe input (docs/export.md §2, §6).

Shape letters: t steps, b batch, c channels, n the flattened space.

NIR's LIF, `tau dv/dt = (v_leak - v) + r I`, spike when v > v_threshold, then v = v_reset, taken one forward-Euler
step of `dt` per GLIF step, is the GLIF recursion (docs/neuron.md §2.3) exactly when reset_mul = 1 (a hard reset),
the gain is the same at every step and decay < 1.
"""

from typing import NamedTuple

import nir
import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from glif2.kernels import GLIFCoeffs, GLIFState, glif_step
from glif2.neuron import GLIF

DT = 1e-4  # the Euler step the LIF time constants are given for (snnTorch's NIR convention), docs/export.md §2.4
APPROX_DECAY = 1.0 - 1e-6  # --approximate: the decay that stands for a GLIF without one (alpha 0)


class LIFParams(NamedTuple):
    """NIR LIF parameters per channel (float64 `c`; one entry for a layer-wise GLIF) and why they are not exact."""

    tau: np.ndarray
    r: np.ndarray
    v_leak: np.ndarray
    v_threshold: np.ndarray
    v_reset: np.ndarray
    problems: list[str]


def as_float64(v: Tensor) -> np.ndarray:
    """A tensor as a float64 numpy array on the host."""
    return v.detach().to("cpu", torch.float64).numpy()


def _span(values: np.ndarray) -> str:
    lo, hi = float(values.min()), float(values.max())
    return f"{lo:.3g}" if f"{lo:.3g}" == f"{hi:.3g}" else f"{lo:.3g}..{hi:.3g}"


def _where(mask: np.ndarray) -> str:
    return "" if mask.size == 1 else f" in {int(mask.sum())}/{mask.size} channels"


def lif_parameters(glif: GLIF, dt: float = DT) -> LIFParams:
    """NIR's LIF for one GLIF layer (docs/export.md §2.3): with the recursion's coefficients,

        tau = dt / (1 - decay), r = gain / (1 - decay), v_leak = -drift / (1 - decay), v_threshold = v_th,
        v_reset = -reset_sub / decay,

    exact when reset_mul = 1, gain is the same at every step and decay < 1. Otherwise `problems` says what fails, and
    the parameters are the nearest LIF (docs/export.md §6): the mean gain over t, a reset to where a spike at
    threshold would leave the potential, and a decay of at most APPROX_DECAY."""
    p = glif.coefficients()
    decay, reset_mul, drift, reset_sub, v_th = (as_float64(v).reshape(-1) for v in p[:5])
    gain = as_float64(p.gain).reshape(p.gain.shape[0], -1)  # t c
    values = {k: as_float64(v).reshape(-1) for k, v in glif.effective_values().items()}
    soft, varies, no_decay = reset_mul != 1.0, (gain != gain[0]).any(0), decay >= 1.0
    problems = []
    if soft.any():
        problems.append(f"gamma {_span(reset_mul[soft])} (soft reset){_where(soft)}")
    if varies.any():
        beta = f"beta {_span(values['beta'][varies])}, " if "beta" in values else ""
        problems.append(f"conductance varies over t ({beta}gain {_span(gain[:, varies])}){_where(varies)}")
    if no_decay.any():
        problems.append(f"alpha 0 (no decay, a linear leak of {_span(drift[no_decay])} per step){_where(no_decay)}")
    lost = (decay <= 0.0) & (reset_sub != 0.0)  # tau underflowed to 0: the reset then has no v_reset to live in
    if lost.any():
        problems.append(f"decay 0 with a subtractive reset of {_span(reset_sub[lost])}{_where(lost)}")
    d = np.where(no_decay, APPROX_DECAY, decay)
    g = np.where(varies, gain.mean(0), gain[0])  # gain[0] itself where exact: a mean of equal values may round
    # -reset_sub / decay exactly when reset_mul = 1 (0 where nothing is subtracted, whatever the decay)
    shift = np.divide(reset_sub, d, out=np.zeros_like(d), where=reset_sub != 0.0)
    v_reset = (1.0 - reset_mul) * v_th - shift + 0.0
    return LIFParams(dt / (1.0 - d), g / (1.0 - d), -drift / (1.0 - d) + 0.0, v_th, v_reset, problems)


def glif_to_lif(glif: GLIF, shape: tuple[int, ...], dt: float = DT) -> tuple[nir.LIF, list[str]]:
    """The `LIF` node for a GLIF whose per-sample input has `shape` (`c h w` or `c`): per-channel parameters broadcast
    over space, as NIR's type check wants one value per neuron. Returns (node, problems)."""
    p = lif_parameters(glif, dt)
    if glif.channels is not None and glif.channels != shape[0]:
        raise ValueError(f"GLIF with {glif.channels} channels gets an input of shape {shape}")

    def full(v: np.ndarray) -> np.ndarray:
        return np.broadcast_to(v.reshape(-1, *[1] * (len(shape) - 1)), shape).copy()  # a writable array of its own

    node = nir.LIF(
        tau=full(p.tau), r=full(p.r), v_leak=full(p.v_leak), v_threshold=full(p.v_threshold), v_reset=full(p.v_reset)
    )
    return node, p.problems


@torch.no_grad()
def layer_difference(glif: GLIF, x: Tensor, dt: float = DT) -> tuple[float, float, float]:
    """Runs the GLIF (its recursion, float64) and its exported LIF (NIR's Euler step, docs/export.md §2.1) on the same
    input `t b c ...`. Returns (the fraction of neuron-steps whose spikes differ, the max and the mean of
    |u - v| over the pre-reset potentials)."""
    flat = rearrange(x.double(), glif.flat_pattern())  # t b c n
    p = GLIFCoeffs(*(v.detach().cpu().double() for v in glif.coefficients()))
    tau, r, v_leak, v_th, v_reset = (rearrange(torch.from_numpy(v), "c -> c 1") for v in lif_parameters(glif, dt)[:5])
    flat = flat.cpu()
    state = GLIFState(torch.zeros_like(flat[0]), torch.zeros_like(flat[0]))
    v, flips, gaps = torch.zeros_like(flat[0]), 0.0, []
    for t in range(flat.shape[0]):
        o, state = glif_step(flat[t], p.gain[t], state, p)
        v = v + dt / tau * (v_leak - v + r * flat[t])
        z = v > v_th
        flips += float((o != z.double()).sum())
        gaps.append((state.u - v).abs())
        v = torch.where(z, v_reset, v)
    gaps = torch.stack(gaps)
    return flips / gaps.numel(), float(gaps.max()), float(gaps.mean())


@torch.no_grad()
def measure(model: nn.Module, neurons: dict[str, GLIF], nodes: dict[str, nir.NIRNode], x: Tensor, dt: float) -> None:
    """--approximate: feeds the probe `x` through the model in evaluation mode, records every GLIF's input, and writes
    into each GLIF's LIF node (`nodes[name]`) how far the two differ on it (layer_difference): spike_mismatch,
    membrane_max_diff, membrane_mean_diff."""
    seen: dict[str, Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _, args, name=name: seen.setdefault(name, args[0].detach()))
        for name, m in neurons.items()
    ]
    training = model.training
    try:
        model.eval()
        model(x)
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    for name, glif in neurons.items():
        mismatch, gap_max, gap_mean = layer_difference(glif, seen[name], dt)
        nodes[name].metadata.update(spike_mismatch=mismatch, membrane_max_diff=gap_max, membrane_mean_diff=gap_mean)


def report(graph: nir.NIRGraph) -> list[str]:
    """One line per LIF node: exact or not, and (after an approximate export) how far it differs from its GLIF."""
    lines = []
    for name, node in graph.nodes.items():
        if isinstance(node, nir.LIF):
            m = node.metadata
            line = f"{name:<24} {'exact ' if int(m.get('exact', 1)) else 'approx'}"
            if "spike_mismatch" in m:
                line += (
                    f"  spikes differ {float(m['spike_mismatch']):7.2%}  |u - v| max "
                    f"{float(m['membrane_max_diff']):.3g} mean {float(m['membrane_mean_diff']):.3g}"
                )
            lines.append(line + (f"  ({m['problems']})" if m.get("problems") else ""))
    return lines


__all__ = [
    "APPROX_DECAY",
    "DT",
    "LIFParams",
    "as_float64",
    "glif_to_lif",
    "layer_difference",
    "lif_parameters",
    "measure",
    "report",
]
