"""Exceptions raised by ttpu. Every message says what was wrong and what to do."""


class TTPUError(Exception):
    """Base class of ttpu's errors."""


class InvalidArgumentError(TTPUError, ValueError):
    """An argument (backend, task, dtype, input ...) has an unsupported value."""


class ModelNotFoundError(TTPUError, OSError):
    """A model name could not be resolved to weights."""


class BackendUnavailableError(TTPUError, ImportError):
    """The requested backend's packages are not installed or do not load."""


class CompilationError(TTPUError, RuntimeError):
    """The model could not be traced or compiled for XLA."""
