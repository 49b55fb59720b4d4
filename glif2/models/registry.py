"""The model registry: `register_model`, `create_model`, `list_models`. A leaf: it imports no model (the model
modules import it to register themselves; `glif2.models` imports them all).

Shape letters: t steps, b batch, k classes.

Every registered entrypoint takes `(num_classes, T, **options)` and returns a model whose `forward` gives logits
`b k` (the mean over t) and whose `forward_steps` gives the per-step logits `t b k`. `create_model` attaches
the resolved config (`model.model_config`, plain types only) so a checkpoint can rebuild the model from the file
alone (glif2.checkpoint).
"""

import inspect
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from glif2.memory.lean import MEMORY_MODES, LeanModule, set_memory
from glif2.neuron import EAGER_DEPRECATED, rename_deprecated

INPUT_KINDS = ("image", "frames")
_MODELS: dict[str, Callable[..., nn.Module]] = {}
_INPUTS: dict[str, str] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, inputs: str = "image"):
    """Decorator: registers an entrypoint `fn(num_classes, T, **options) -> nn.Module` under its own name.

    `@register_model` for models of images `b c h w`; `@register_model(inputs="frames")` for models of event frames
    `b t c h w`. An entrypoint that takes `input_size` gets the dataset's input side from the trainer.
    """
    if inputs not in INPUT_KINDS:
        raise ValueError(f"inputs={inputs!r}; choose one of {INPUT_KINDS}")

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if fn.__name__ in _MODELS:
            raise ValueError(f"model {fn.__name__!r} is already registered")
        _MODELS[fn.__name__], _INPUTS[fn.__name__] = fn, inputs
        return fn

    return add(fn) if fn is not None else add


def unregister_model(name: str) -> None:
    """Removes a registered model (for tests and plugins that register temporary models)."""
    _MODELS.pop(name, None)
    _INPUTS.pop(name, None)


def model_inputs(name: str) -> dict[str, Any]:
    """{kind: "image" | "frames", input_size: whether the entrypoint takes the input side} of a registered model."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return {"kind": _INPUTS[name], "input_size": "input_size" in inspect.signature(_MODELS[name]).parameters}


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


def create_model(name: str, num_classes: int, T: int, *, memory: str | None = None, **options) -> nn.Module:
    """Builds a registered model and attaches its resolved config as `model.model_config`.

    Args:
        name: one of `list_models()`.
        num_classes: classes K of the head.
        T: time steps.
        memory: how a training forward keeps activations for backward (glif2.memory): "lean" (the default for
            every model that has a lean path), "recompute" or "off". Results are the same in every mode.
        **options: model options (e.g. `bn="plain"`, `in_channels=1`) and GLIF options passed through to every
            neuron (`channel_wise`, `variant`, `gate_mode`, `gate_init`, `params`, `tau`, `v_th`, `leak`, `v_reset`,
            `conduct`, `surrogate`, `surrogate_width`).

    Returns:
        The model, in training mode, on the CPU.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive int")
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T={T!r} must be a positive int")
    if memory is not None and memory not in MEMORY_MODES:
        raise ValueError(f"memory={memory!r}; choose one of {MEMORY_MODES}")
    options = rename_deprecated(options)
    if options.pop("eager", None) is not None:
        warnings.warn(EAGER_DEPRECATED, DeprecationWarning, stacklevel=2)
    config = {"name": name, "num_classes": num_classes, "T": T, **_plain(options)}
    model = _MODELS[name](num_classes=num_classes, T=T, **options)
    memory = memory or ("lean" if any(isinstance(m, LeanModule) for m in model.modules()) else "off")
    set_memory(model, memory)
    model.model_config = {**config, "memory": memory}
    return model


__all__ = ["INPUT_KINDS", "create_model", "list_models", "model_inputs", "register_model", "unregister_model"]
