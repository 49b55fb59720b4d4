"""SpikingJelly's GatedLIFNode, the peer the benchmarks measure glif2 against: the same GLIF equations, run as a
plain multi-step PyTorch loop with a membrane kept on the module (docs/neuron.md §10).

The benchmarks import this file as a sibling module (`python bench/x.py` puts bench/ first on sys.path). It needs
spikingjelly (installed --no-deps by the Makefile), which is imported only inside the functions: a benchmark asks
`missing()` first and skips the peer with one line when it cannot run. Only the gated, soft-gate GLIF has a
counterpart.
"""

from torch import nn

from glif2.memory import set_memory
from glif2.neuron import GLIF

# glif2's parameter names -> GatedLIFNode's (the others, alpha beta gamma tau conduct, are the same)
SJ_NAMES = {"v_th": "v_threshold", "leak": "linear_decay", "v_reset": "v_subreset"}


def missing() -> str | None:
    """None when GatedLIFNode can run here, else the line a benchmark prints to skip it. The import is tried, not just
    looked up: spikingjelly is installed without its dependencies, so a missing one (loguru) shows only on import."""
    try:
        from spikingjelly.activation_based import functional, neuron, surrogate  # noqa: F401
    except ImportError as err:
        return f"spikingjelly not installed: SJ skipped ({err}; pip install --no-deps spikingjelly==2.0.0 loguru)"
    return None


def gated_lif_node(glif: GLIF) -> nn.Module:
    """A GatedLIFNode with `glif`'s shape and parameter values and the reference's rectangle surrogate (width 1)."""
    from spikingjelly.activation_based import neuron, surrogate

    if glif.variant != "glif" or glif.gate_mode != "soft":
        raise ValueError("GatedLIFNode has soft gates and the gated equations only")
    node = neuron.GatedLIFNode(glif.T, inplane=glif.channels, surrogate_function=surrogate.Rect(alpha=1.0))
    node.load_state_dict({SJ_NAMES.get(k, k): v for k, v in glif.state_dict().items()})
    return node.to(glif.tau.device)


def with_gated_lif_nodes(model: nn.Module) -> nn.Module:
    """Replaces every GLIF in `model` by its GatedLIFNode (in place); returns the model. Call `reset(model)` before
    each forward: the nodes keep their membrane between calls."""
    for m in list(model.modules()):
        for name, child in list(m.named_children()):
            if isinstance(child, GLIF):
                setattr(m, name, gated_lif_node(child))
    set_memory(model, "off")  # the peer runs plain autograd
    return model


def reset(model: nn.Module) -> None:
    """SpikingJelly's reset_net: zero every node's membrane."""
    from spikingjelly.activation_based import functional

    functional.reset_net(model)


__all__ = ["SJ_NAMES", "gated_lif_node", "missing", "reset", "with_gated_lif_nodes"]
