"""The user-error types. Each message names what is wrong and how to fix it, and the command-line tools print
them as one line without a traceback; anything else raised inside glif2 is a bug and keeps its traceback.
(Data files that cannot be read raise `pipelines.DataError`.)"""


class ConfigError(ValueError):
    """A setting no run can use: a bad flag value, an option a model or dataset cannot take."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose tensors do not fit the model."""


class ExportError(ValueError):
    """A network that an exchange format cannot express: each layer named with what is not expressible."""


__all__ = ["CheckpointError", "ConfigError", "ExportError"]
