"""Which torch_xla works with which torch, checked before ``import torch_xla``.

torch_xla ships a C++ extension built against one torch release and loads only with
it (with another torch, ``import torch_xla`` dies with "_XLAC...so: undefined symbol"),
yet its wheel does not declare that pin. ttpu checks the installed versions first and
says exactly what to install instead.

Measured on these machines: torch_xla 2.9.0 (the newest release) loads with torch 2.9.0
only; torch 2.9.0 from PyPI is the CUDA build (~4.1 GB, nvidia packages needed even for
``import torch``); ``torch-xla[pallas]==2.9.0`` pins jax 0.7.1 for the Pallas kernels.
"""

from __future__ import annotations

import importlib.metadata

from ttpu.errors import BackendUnavailableError

TORCH_XLA_VERSION = "2.9.0"
INSTALL = (
    f"pip install 'ttpu[torch_xla]' (= torch=={TORCH_XLA_VERSION} "
    f"'torch-xla[pallas]=={TORCH_XLA_VERSION}'), in an environment of its own: torch "
    f"{TORCH_XLA_VERSION} from PyPI is the CUDA build (about 4 GB), and ttpu's JAX backend "
    "environment uses another torch"
)


def release(version: str) -> str:
    """"2.9.0+cu128" -> "2.9.0"."""
    return version.split("+")[0]


def check_versions(torch_version: str, torch_xla_version: str | None) -> None:
    """Raise a :class:`BackendUnavailableError` saying what to install unless this
    torch_xla can load with this torch (same release, as torch_xla requires)."""
    if torch_xla_version is None:
        raise BackendUnavailableError(f"backend 'torch_xla' needs torch_xla, which is not installed: {INSTALL}.")
    if release(torch_xla_version) != release(torch_version):
        raise BackendUnavailableError(
            f"torch_xla {torch_xla_version} only loads with torch {release(torch_xla_version)}, but torch "
            f"{torch_version} is installed (importing it would fail with an undefined symbol): {INSTALL}."
        )


def import_torch_xla():
    """``torch_xla``, after checking that it can load with the installed torch."""
    import torch

    try:
        installed = importlib.metadata.version("torch_xla")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    check_versions(torch.__version__, installed)
    import torch_xla

    return torch_xla
