"""The torch_xla backend without a working torch_xla: errors that say what to install.

The main environment has torch 2.13 and no torch_xla; the torch_xla backend's own tests
run in their environment (tests/torch_xla_backend, scripts/test.sh).
"""

from __future__ import annotations

import importlib.metadata

import pytest

from ttpu import AutoModelForTPU
from ttpu.backends.torch_xla.versions import check_versions
from ttpu.errors import BackendUnavailableError


def _torch_xla_installed() -> bool:
    try:
        importlib.metadata.version("torch_xla")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(_torch_xla_installed(), reason="checks an environment without torch_xla")
def test_missing_torch_xla_names_the_versions_to_install() -> None:
    with pytest.raises(BackendUnavailableError) as error:
        AutoModelForTPU.from_pretrained("any/model", backend="torch_xla")
    message = str(error.value)
    assert "torch_xla, which is not installed" in message
    assert "pip install 'ttpu[torch_xla]'" in message and "torch==2.9.0" in message
    import ttpu

    with pytest.raises(BackendUnavailableError, match="pip install 'ttpu\\[torch_xla\\]'"):
        ttpu.fsdp_v2  # noqa: B018 (the lazy attribute imports torch_xla)


def test_torch_xla_with_another_torch_is_refused_before_import() -> None:
    with pytest.raises(BackendUnavailableError) as error:
        check_versions("2.13.0+cpu", "2.9.0")
    assert "torch_xla 2.9.0 only loads with torch 2.9.0, but torch 2.13.0+cpu is installed" in str(error.value)
    check_versions("2.9.0+cu128", "2.9.0")  # the matching pair passes
