"""Every core architecture matches its eager PyTorch forward (float32, rel err <= 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from architectures import ARCHITECTURES, Arch, main_output
from ttpu import AutoModelForTPU

TOLERANCE = 1e-5


def relative_error(actual: np.ndarray, expected: np.ndarray, mask: np.ndarray | None) -> float:
    if mask is not None and actual.ndim >= 2 and actual.shape[:2] == mask.shape:
        real = mask.astype(bool)
        actual, expected = actual[real], expected[real]
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_matches_eager_pytorch(arch: Arch) -> None:
    module = arch.build()
    inputs = arch.make_inputs(module)
    with torch.no_grad():
        expected = main_output(module(**{k: torch.from_numpy(v) for k, v in inputs.items()}))
    model = AutoModelForTPU.from_model(module)
    actual = np.asarray(main_output(model(**inputs)))
    assert actual.shape == tuple(expected.shape)
    error = relative_error(actual, expected.numpy(), inputs.get("attention_mask"))
    assert error <= TOLERANCE, f"{arch.name}: relative error {error:.2e}"
