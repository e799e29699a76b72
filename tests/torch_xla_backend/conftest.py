"""The torch_xla backend's tests: backend-neutral tests imported here run on torch_xla."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def backend_name() -> str:
    return "torch_xla"
