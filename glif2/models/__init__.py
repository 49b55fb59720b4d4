"""Model registry and analysis helpers.

Shape letters: t steps, b batch, c channels, h w space, k classes.

Every registered entrypoint takes `(num_classes, T, **options)` and returns a model whose `forward` gives logits
`b k` (the mean over t) and whose `forward_steps` gives the per-step logits `t b k`. `create_model` attaches
the resolved config (`model.model_config`, plain types only) so a checkpoint can rebuild the model from the file
alone (glif2.checkpoint).
"""

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from glif2.neuron import GLIF

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: registers an entrypoint `fn(num_classes, T, **options) -> nn.Module` under its own name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def _plain(value):
    # Tuples become lists and everything must be a plain type, so the config survives a weights_only load.
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"model option {value!r} ({type(value).__name__}) is not a plain int/float/str/bool/list")


def create_model(name: str, num_classes: int, T: int, **options) -> nn.Module:
    """Builds a registered model and attaches its resolved config as `model.model_config`.

    Args:
        name: one of `list_models()`.
        num_classes: classes K of the head.
        T: time steps.
        **options: model options (e.g. `bn="plain"`, `in_channels=1`) and GLIF options passed through to every
            neuron (`channel_wise`, `variant`, `gates`, `gate`, `tau`, `v_th`, `leak`, `v_reset`, `conduct`,
            `surrogate`, `surrogate_width`, `eager`).

    Returns:
        The model, in training mode, on the CPU.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive int")
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T={T!r} must be a positive int")
    config = {"name": name, "num_classes": num_classes, "T": T, **_plain(options)}
    model = _MODELS[name](num_classes=num_classes, T=T, **options)
    model.model_config = config
    return model


def neuron_factory(T: int, channel_wise: bool = True, **glif_options) -> Callable[[int], GLIF]:
    """Returns `make(channels) -> GLIF` with the shared options; channel_wise=False gives layer-wise neurons."""
    if "gate" in glif_options:
        glif_options["gate"] = tuple(glif_options["gate"])
    GLIF(T, None if not channel_wise else 1, **glif_options)  # validate the options once, before building

    def make(channels: int) -> GLIF:
        return GLIF(T, channels if channel_wise else None, **glif_options)

    return make


# analysis


def glif_layers(model: nn.Module) -> Iterator[tuple[str, GLIF]]:
    """(name, module) of every GLIF layer, in registration order (the order of the forward pass)."""
    for name, m in model.named_modules():
        if isinstance(m, GLIF):
            yield name, m


class FiringRates:
    """Accumulates each GLIF layer's mean firing rate over any number of forward passes, through hooks.

    The model's own forward stays hook-free and stateless; while the context is open every GLIF output adds its
    spike sum and element count to on-device tensors (no host sync until `rates()` is read).

        with FiringRates(model) as fr:
            for x, y in loader:
                model(x)
        fr.rates()   # {layer name: spikes per neuron per step}
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles = []

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs, output: Tensor) -> None:
            total = output.detach().sum(dtype=torch.float64)
            self.sums[name] = self.sums[name] + total if name in self.sums else total
            self.counts[name] = self.counts.get(name, 0) + output.numel()

        return hook

    def __enter__(self):
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in glif_layers(self.model)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def rates(self) -> dict[str, float]:
        """Mean firing rate per layer (a host sync)."""
        return {name: float(total) / self.counts[name] for name, total in self.sums.items()}


@torch.no_grad()
def firing_rates(model: nn.Module, x: Tensor) -> dict[str, float]:
    """Per-layer mean firing rate of one forward pass on x (analysis only)."""
    with FiringRates(model) as fr:
        model(x)
    return fr.rates()


from glif2.models import resnet, sew

__all__ = [
    "FiringRates",
    "create_model",
    "firing_rates",
    "glif_layers",
    "list_models",
    "neuron_factory",
    "register_model",
    "resnet",
    "sew",
]
