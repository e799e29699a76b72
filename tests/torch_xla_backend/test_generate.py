"""generate() on the torch_xla backend: token-identical to transformers, same options
and semantics as on the JAX backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from architectures import ARCHITECTURES, _is_causal
from test_generation import PROMPTS, NEW_TOKENS, CharTokenizer, hf_generate, left_padded
from transformers import LogitsProcessorList, MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

from ttpu import AutoModelForTPU
from ttpu.errors import InvalidArgumentError
from ttpu.generation.config import GenerationSettings

CAUSAL = [a for a in ARCHITECTURES if _is_causal(a)]


@pytest.mark.parametrize("arch", CAUSAL, ids=lambda a: a.name)
def test_greedy_matches_transformers(arch) -> None:
    module = arch.build()
    inputs = arch.make_inputs(module)  # two prompts, the first left-padded
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    expected = hf_generate(module, ids, mask, max_new_tokens=NEW_TOKENS)
    model = AutoModelForTPU.from_model(module, backend="torch_xla")
    np.testing.assert_array_equal(model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS), expected)


@pytest.fixture(scope="module")
def gemma3():
    module = next(a for a in CAUSAL if a.name == "gemma3_text").build()
    return module, AutoModelForTPU.from_model(module, backend="torch_xla", tokenizer=CharTokenizer())


def test_long_prompt_past_the_sliding_window_matches_transformers(gemma3) -> None:
    module, model = gemma3
    ids = np.random.default_rng(1).integers(1, 256, (1, 40))  # 5 windows long
    expected = hf_generate(module, ids, np.ones_like(ids), max_new_tokens=30)
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=30), expected)


def test_one_decode_graph_for_every_step_and_length_within_the_buckets(gemma3) -> None:
    _, model = gemma3
    model.generate(np.arange(1, 4)[None], max_new_tokens=4)
    compiled = model.compile_count
    for length, new_tokens in [(3, 16), (9, 4), (12, 12), (5, 1)]:
        model.generate(np.arange(1, length + 1)[None], max_new_tokens=new_tokens)
    assert model.compile_count == compiled  # prompt bucket 16, cache bucket 32


def test_sampling_is_seeded_and_top_k_1_is_greedy(gemma3) -> None:
    _, model = gemma3
    ids, mask = left_padded(PROMPTS)
    sample = dict(do_sample=True, temperature=1.5, top_k=0, max_new_tokens=16)
    first = model.generate(ids, attention_mask=mask, seed=3, **sample)
    np.testing.assert_array_equal(first, model.generate(ids, attention_mask=mask, seed=3, **sample))
    assert (first != model.generate(ids, attention_mask=mask, seed=4, **sample)).any()
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=16)
    top1 = model.generate(ids, attention_mask=mask, do_sample=True, top_k=1, seed=5, max_new_tokens=16)
    np.testing.assert_array_equal(top1, greedy)


def test_sampled_tokens_follow_the_filtered_distribution(gemma3) -> None:
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


def test_repetition_penalty_and_min_new_tokens_as_transformers(gemma3) -> None:
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


def test_eos_stop_strings_and_streaming(gemma3) -> None:
    _, model = gemma3
    ids, mask = left_padded(PROMPTS[:2])
    width = ids.shape[1]
    free = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[], pad_token_id=0)
    new = free[:, width:]
    tokenizer = CharTokenizer()
    stop = tokenizer.decode(new[0, :6])
    stopped = model.generate(ids, attention_mask=mask, max_new_tokens=20, stop_strings=stop, pad_token_id=0)
    np.testing.assert_array_equal(stopped[0, width : width + 6], new[0, :6])
    assert (stopped[0, width + 6 :] == 0).all()
    np.testing.assert_array_equal(stopped[1, width:], new[1])
    end = next(j for j in range(1, 20) if new[1, j] not in new[1, :j])  # the row's first new token
    eos = int(new[1, end])
    ended = model.generate(ids[1:], attention_mask=mask[1:], max_new_tokens=20, eos_token_id=eos)
    assert ended.shape[1] == width + end + 1 and ended[0, -1] == eos
    pieces = list(model.stream(tokenizer.decode(PROMPTS[1]), max_new_tokens=12))
    expected = model.generate(np.array([PROMPTS[1]]), max_new_tokens=12)
    assert "".join(pieces) == tokenizer.decode(expected[0, len(PROMPTS[1]) :]) and len(pieces) == 12


def test_num_return_sequences_and_bad_requests(gemma3) -> None:
    _, model = gemma3
    ids, mask = left_padded(PROMPTS[:2])
    out = model.generate(ids, attention_mask=mask, do_sample=True, num_return_sequences=3, seed=0, max_new_tokens=5)
    assert out.shape == (6, ids.shape[1] + 5)
    with pytest.raises(InvalidArgumentError, match="left-padded"):
        model.generate(np.array([[3, 4, 0]]), attention_mask=np.array([[1, 1, 0]]))
    with pytest.raises(InvalidArgumentError, match="num_beams"):
        model.generate(np.array([[3, 4]]), num_beams=4)
