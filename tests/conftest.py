import importlib.metadata
import os
import sys
from pathlib import Path

import pytest

# Eight virtual CPU devices for sharding tests; must be set before jax initialises. The
# tests' programs are compiled without LLVM's optimizations: most of the suite's time is
# compiling tiny models' programs once each (a fifth faster so), while the real model's
# matrix products run in XLA:CPU's libraries either way.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
sys.path.insert(0, str(Path(__file__).parent))

# The torch_xla backend's tests run in their own environment (scripts/test.sh): torch_xla
# needs another torch than the main environment's.
try:
    importlib.metadata.version("torch_xla")
    collect_ignore_glob: list[str] = []
except importlib.metadata.PackageNotFoundError:
    collect_ignore_glob = ["torch_xla_backend/*"]


@pytest.fixture(scope="session")
def backend_name() -> str:
    """The backend that backend-neutral tests (generation, ...) run on; the torch_xla
    tests' conftest overrides it and imports those tests."""
    return "jax"
