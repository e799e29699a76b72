"""Compiled generation matches transformers' generate, token for token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from architectures import ARCHITECTURES, Arch, _is_causal
from ttpu import AutoModelForTPU
from ttpu.errors import InvalidArgumentError

CAUSAL = [arch for arch in ARCHITECTURES if _is_causal(arch)]
NEW_TOKENS = 24


def hf_generate(module: torch.nn.Module, ids: np.ndarray, mask: np.ndarray, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = module.generate(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False, **kwargs
        )
    return out.numpy()


@pytest.mark.parametrize("arch", CAUSAL, ids=lambda a: a.name)
def test_greedy_matches_transformers(arch: Arch) -> None:
    module = arch.build()
    inputs = arch.make_inputs(module)  # two prompts, the first left-padded
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    expected = hf_generate(module, ids, mask, max_new_tokens=NEW_TOKENS)
    model = AutoModelForTPU.from_model(module)
    actual = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(actual, expected)
