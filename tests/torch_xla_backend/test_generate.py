"""generate() on the torch_xla backend: the JAX backend's generation tests, run here on
torch_xla (``backend_name`` in this folder's conftest), and the checks of torch_xla's own
sampling code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_generation import (  # noqa: F401 (pytest collects these here, on torch_xla)
    PROMPTS,
    gemma3,
    test_bad_requests_are_clear_errors_and_leave_no_state,
    test_batched_greedy_equals_each_prompt_alone,
    test_eos_and_stop_strings_end_rows_independently,
    test_generation_stops_early_when_every_row_ended,
    test_greedy_matches_transformers,
    test_long_prompt_past_the_sliding_window_matches_transformers,
    test_model_generation_config_is_the_default_and_kwargs_override,
    test_num_return_sequences_repeats_each_prompt,
    test_prompt_length_and_max_new_tokens_within_buckets_do_not_recompile,
    test_same_seed_same_tokens_and_top_k_1_is_greedy,
    test_stream_yields_the_generated_text,
)
from test_generation_states import PROMPTS as STATE_PROMPTS
from test_generation_states import generates_as_transformers, left_padded
from transformers import LogitsProcessorList, MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

from ttpu.generation.config import GenerationSettings


def test_sampled_tokens_follow_the_filtered_distribution(gemma3) -> None:  # noqa: F811 (the fixture)
    """top_k=3 sampling only ever picks among the greedy model's 3 best first tokens, and
    over many rows picks more than one of them."""
    _, model = gemma3
    prompt = np.array([PROMPTS[1]])
    with torch.no_grad():
        logits = gemma3[0](input_ids=torch.from_numpy(prompt)).logits[0, -1]
    best = set(torch.topk(logits, 3).indices.tolist())
    rows = np.repeat(prompt, 16, axis=0)
    first = model.generate(rows, do_sample=True, top_k=3, seed=0, max_new_tokens=1)[:, -1]
    assert set(first.tolist()) <= best and len(set(first.tolist())) > 1


def test_repetition_penalty_and_min_new_tokens_as_transformers() -> None:
    """The chooser's penalty and EOS suppression over the static buffer equal transformers'
    processors on the same (unpadded) tokens."""
    from ttpu.backends.torch_xla.sampling import TokenChooser

    settings = GenerationSettings(max_new_tokens=8, min_new_tokens=3, repetition_penalty=1.7, eos_token_ids=(5, 9))
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    seen = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    chooser = TokenChooser(settings, 64, torch.device("cpu"))
    for generated in (1, 3):
        processors = LogitsProcessorList([
            RepetitionPenaltyLogitsProcessor(1.7),
            MinNewTokensLengthLogitsProcessor(10 - generated, 3, [5, 9]),
        ])
        expected = processors(seen, logits.clone()).argmax(-1)
        actual = chooser(logits, seen, torch.ones_like(seen), torch.tensor(generated))
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("model_type", ["qwen3_next", "minimax", "mpt", "xglm", "trocr", "mvp", "deepseek_v32"])
def test_cached_greedy_matches_transformers(model_type: str) -> None:
    """transformers' StaticCache on the XLA device, its length a device tensor: linear-
    attention layers beside attention layers (Qwen3-Next's convolution and recurrent
    states; MiniMax's recurrent state alone, in the standard cache by ttpu's patches,
    which mark the layer's previous state themselves: transformers marks it on a
    convolution update), the patched modules that read that length (MPT's ALiBi bias
    sliced by the keys' length, XGLM's sinusoidal table, TrOCR's and MVP's learned
    positions added to it), and DeepSeek-V3.2's sparse attention (its indexer's keys in
    the static cache, its top-k ``indices`` restricting ttpu's torch_xla attention's mask)."""
    generates_as_transformers(model_type, *left_padded(STATE_PROMPTS, pad=0), backend="torch_xla")
