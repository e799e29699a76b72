import importlib.metadata
import os
import sys
from pathlib import Path

import pytest

# The torch_xla backend's tests run in their own environment (scripts/test.sh): torch_xla
# needs another torch than the main environment's.
try:
    importlib.metadata.version("torch_xla")
    in_torch_xla_environment = True
except importlib.metadata.PackageNotFoundError:
    in_torch_xla_environment = False
collect_ignore_glob: list[str] = [] if in_torch_xla_environment else ["torch_xla_backend/*"]

# Eight virtual CPU devices for sharding tests; must be set before jax initialises. The
# JAX tests' programs are compiled without LLVM's optimizations: most of that suite's time
# is compiling tiny models' programs once each (a fifth faster so), while the real model's
# matrix products run in XLA:CPU's libraries either way. torch_xla's tests keep the default
# level: they are quick to compile, and its FSDPv2 optimizer step, compared with eager
# PyTorch's to 1e-5, moves one weight of its 6144 by 1.4e-5 at level 0.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8"
    + ("" if in_torch_xla_environment else " --xla_backend_optimization_level=0"),
)
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def backend_name() -> str:
    """The backend that backend-neutral tests (generation, ...) run on; the torch_xla
    tests' conftest overrides it and imports those tests."""
    return "jax"
