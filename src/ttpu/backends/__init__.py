"""Backends: each one is an optional extra, imported only when it is asked for."""

from __future__ import annotations

import importlib

from ttpu.backends.base import Backend, CompiledForward
from ttpu.errors import BackendUnavailableError, InvalidArgumentError

BACKENDS: dict[str, tuple[str, str]] = {
    # name: (module:class, what to install)
    "jax": ("ttpu.backends.jax.backend:JaxBackend", "pip install 'ttpu[jax]'"),
    "torch_xla": ("ttpu.backends.torch_xla.backend:TorchXlaBackend", "pip install 'ttpu[torch_xla]'"),
}

__all__ = ["Backend", "CompiledForward", "get_backend"]


def get_backend(name: str) -> Backend:
    """Instantiate the backend called ``name``, with a clear error if it cannot load."""
    if name not in BACKENDS:
        raise InvalidArgumentError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}.")
    target, install = BACKENDS[name]
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except BackendUnavailableError:
        raise  # already says what to install
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend {name!r} could not be imported ({exc}); install it with: {install}"
        ) from exc
    return getattr(module, class_name)()
