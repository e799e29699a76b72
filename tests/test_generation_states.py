"""Compiled generation of models whose cache is not (only) attention keys and values:
SSM (Mamba), hybrid attention + SSM (Falcon-H1) and hybrid attention + gated delta net
(Qwen3-Next) layers, each layer's state carried through the compiled loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ttpu import AutoModelForTPU
from ttpu.backends.jax.kv_cache import CONV, KEYS, RECURRENT
from ttpu.coverage import tiny_config

NEW_TOKENS = 32
PROMPTS = [[5, 17, 33, 4, 90], [7, 8, 9, 10, 11, 12, 13, 14, 15], list(range(20, 34))]


def left_padded(prompts: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), pad, np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@pytest.fixture(scope="module", params=["mamba", "falcon_h1", "qwen3_next"])
def stateful(request):
    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(tiny_config(request.param)).eval()
    return request.param, module, AutoModelForTPU.from_model(module)


def test_greedy_matches_transformers_on_a_left_padded_batch(stateful) -> None:
    name, module, model = stateful
    ids, mask = left_padded(PROMPTS, pad=0)
    with torch.no_grad():
        expected = module.generate(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
        ).numpy()
    actual = model.generate(ids, mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(actual, expected)
    # The state really is the model's own kind: linear states, and keys for the hybrids.
    kinds = {n.split(".")[0] for layer in model.decoder().layout.layers for n in layer.names}
    assert CONV in kinds
    assert (KEYS in kinds) == (name != "mamba")
    assert ("hybrid" in model.decoder().layout.describe() or "full attention" in model.decoder().layout.describe()) == (
        name != "mamba"
    )


def test_sampling_is_reproducible_and_nothing_recompiles_within_a_bucket(stateful) -> None:
    _, _, model = stateful
    ids, mask = left_padded(PROMPTS, pad=0)
    settings = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=20, pad_token_id=0)
    first = model.generate(ids, mask, seed=3, **settings)
    compiled = model.compile_count
    assert np.array_equal(model.generate(ids, mask, seed=3, **settings), first)
    # Other prompt lengths and token counts in the same buckets reuse the programs.
    short, short_mask = left_padded([p[:4] for p in PROMPTS], pad=0)
    model.generate(short, short_mask, seed=4, **{**settings, "max_new_tokens": 9})
    assert model.compile_count == compiled


def test_a_model_whose_forward_keeps_no_cache_recomputes_each_step(caplog) -> None:
    """GPT-1 returns no cache: each step runs the forward over the whole (masked) token
    buffer, in the same compiled loop, and says so."""
    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(tiny_config("openai-gpt")).eval()
    model = AutoModelForTPU.from_model(module)
    ids, mask = left_padded(PROMPTS, pad=0)
    with torch.no_grad():
        expected = module.generate(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=16,
            do_sample=False, pad_token_id=0,
        ).numpy()
    with caplog.at_level("WARNING", logger="ttpu"):
        actual = model.generate(ids, mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(actual, expected)
    layout = model.decoder().layout
    assert layout.recompute and "recomputes the whole sequence" in layout.describe()
    assert "recomputes the whole sequence at every step" in caplog.text
