"""torch_xla backend on PJRT CPU: the forward matches eager PyTorch.

Runs in the torch_xla environment only (`scripts/test.sh` builds it); the main
environment's torch cannot load torch_xla.
"""

from __future__ import annotations

import pytest
import torch
from architectures import ARCHITECTURES, main_output
from test_parity import TOLERANCE, relative_error

from ttpu.backends import get_backend
from ttpu.sharding import plan_sharding



@pytest.fixture(scope="module")
def backend():
    return get_backend("torch_xla")


def test_runs_on_pjrt_cpu(backend) -> None:
    assert backend.platform() == "cpu"


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_forward_matches_eager_pytorch(backend, arch) -> None:
    module = arch.build()
    inputs = arch.make_inputs(module)
    with torch.no_grad():
        expected = main_output(module(**{k: torch.from_numpy(v) for k, v in inputs.items()})).numpy()
    plan = plan_sharding(module, parallelism=None, mesh=None, rules=None, device_count=1, device_memory=None)
    forward = backend.compile(module, plan, release_host_weights=False)
    actual = main_output(forward(inputs, {})).cpu().numpy()
    assert actual.shape == expected.shape
    assert relative_error(actual, expected, inputs.get("attention_mask")) <= TOLERANCE
    compiled = forward.compile_count
    assert compiled >= 1
    forward(inputs, {})
    assert forward.compile_count == compiled  # the same shapes reuse the cached graphs
