"""Compiled generation matches transformers' generate, token for token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from architectures import ARCHITECTURES, Arch, _is_causal
from transformers import GenerationConfig

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
def test_greedy_matches_transformers(arch: Arch, backend_name: str) -> None:
    module = arch.build()
    inputs = arch.make_inputs(module)  # two prompts, the first left-padded
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    expected = hf_generate(module, ids, mask, max_new_tokens=NEW_TOKENS)
    model = AutoModelForTPU.from_model(module, backend=backend_name)
    actual = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(actual, expected)


def test_generate_runs_the_serving_engines_paged_step(monkeypatch) -> None:
    """generate() runs the engine's paged step (one per model, shared with the engine):
    the prompts as one step of whole rows, then one token per row per step;
    transformers' tokens."""
    from ttpu.backends.jax.paged import PagedModel
    from ttpu.serving.engine import EngineConfig, LLMEngine

    module = next(arch for arch in CAUSAL if arch.name == "llama").build()
    ids, mask = left_padded([[5, 17, 33], list(range(40, 60)), [9] * 11, list(range(3, 17)), [60, 61]])
    expected = hf_generate(module, ids, mask, max_new_tokens=12)
    monkeypatch.setenv("TTPU_PROGRAM_CACHE", "off")  # the steps are traced here, not read from an earlier run's store
    model = AutoModelForTPU.from_model(module, backend="jax")
    steps = []
    logits = PagedModel.logits
    monkeypatch.setattr(PagedModel, "logits", lambda self, params, cache, ids, *rest, **options: (
        steps.append(ids.shape[0]), logits(self, params, cache, ids, *rest, **options))[1])
    np.testing.assert_array_equal(model.generate(ids, attention_mask=mask, max_new_tokens=12), expected)
    assert steps == [8 * 32, 8]  # traced once each: a prefill step of all rows (5 of up to 20 tokens, bucketed to 8 of 32), a decode
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=64))
    assert engine.runner._paged is model.decoder().paged_model()


class CharTokenizer:
    """One character per token id, enough for stop strings and streaming on tiny models."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(0x100 + int(i)) for i in ids)

    def __call__(self, text: str, return_tensors: str = "np") -> dict:
        return {"input_ids": np.array([[ord(c) - 0x100 for c in text]])}


def build(name: str, backend: str) -> tuple[torch.nn.Module, object]:
    arch = next(a for a in CAUSAL if a.name == name)
    module = arch.build()
    return module, AutoModelForTPU.from_model(module, backend=backend, tokenizer=CharTokenizer())


@pytest.fixture(scope="module")
def gemma3(backend_name: str):
    """Tiny Gemma 3: sliding window of 8 on every other layer."""
    return build("gemma3_text", backend_name)


def left_padded(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


PROMPTS = [[5, 17, 33, 4, 90], [7, 8, 9, 10, 11, 12, 13, 14, 15], list(range(20, 34))]


def test_batched_greedy_equals_each_prompt_alone(gemma3) -> None:
    _, model = gemma3
    ids, mask = left_padded(PROMPTS)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=20)
    for row, prompt in enumerate(PROMPTS):
        alone = model.generate(np.array([prompt]), max_new_tokens=20)
        np.testing.assert_array_equal(batched[row, ids.shape[1] :], alone[0, len(prompt) :])


def test_long_prompt_past_the_sliding_window_matches_transformers(gemma3) -> None:
    module, model = gemma3
    ids = np.random.default_rng(1).integers(1, 256, (1, 40))  # 5 windows long
    expected = hf_generate(module, ids, np.ones_like(ids), max_new_tokens=30)
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=30), expected)


def test_prompt_length_and_max_new_tokens_within_buckets_do_not_recompile(gemma3) -> None:
    _, model = gemma3
    model.generate(np.arange(1, 4)[None], max_new_tokens=4)
    compiled = model.compile_count
    for length, new_tokens in [(3, 16), (9, 4), (16, 9), (12, 12), (5, 1)]:
        model.generate(np.arange(1, length + 1)[None], max_new_tokens=new_tokens)
    assert model.compile_count == compiled  # prompt bucket 16, cache bucket 32


def test_model_generation_config_is_the_default_and_kwargs_override(gemma3) -> None:
    module, model = gemma3
    module.generation_config.max_new_tokens = 6
    try:
        assert model.generate(np.array([[3, 4, 5]])).shape == (1, 9)
        assert model.generate(np.array([[3, 4, 5]]), max_new_tokens=2).shape == (1, 5)
        config = GenerationConfig(max_new_tokens=4, do_sample=False)
        assert model.generate(np.array([[3, 4, 5]]), generation_config=config).shape == (1, 7)
    finally:
        module.generation_config.max_new_tokens = None


def test_same_seed_same_tokens_and_top_k_1_is_greedy(gemma3) -> None:
    _, model = gemma3
    ids, mask = left_padded(PROMPTS)
    sample = dict(do_sample=True, temperature=1.5, top_k=0, max_new_tokens=16)
    first = model.generate(ids, attention_mask=mask, seed=3, **sample)
    np.testing.assert_array_equal(first, model.generate(ids, attention_mask=mask, seed=3, **sample))
    assert (first != model.generate(ids, attention_mask=mask, seed=4, **sample)).any()
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=16)
    top1 = model.generate(ids, attention_mask=mask, do_sample=True, top_k=1, seed=5, max_new_tokens=16)
    np.testing.assert_array_equal(top1, greedy)


def test_num_return_sequences_repeats_each_prompt(gemma3) -> None:
    _, model = gemma3
    ids, mask = left_padded(PROMPTS[:2])
    out = model.generate(ids, attention_mask=mask, do_sample=True, num_return_sequences=3, seed=0, max_new_tokens=5)
    assert out.shape == (6, ids.shape[1] + 5)
    np.testing.assert_array_equal(out[:3, : ids.shape[1]], np.repeat(ids[:1], 3, axis=0))


def test_eos_and_stop_strings_end_rows_independently(gemma3) -> None:
    _, model = gemma3
    ids, mask = left_padded(PROMPTS[:2])
    width = ids.shape[1]
    free = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[], pad_token_id=0)
    new = free[:, width:]
    tokenizer = CharTokenizer()
    # Row 0 ends at its 6th token through a stop string: the text of its first six tokens.
    stop = tokenizer.decode(new[0, :6])
    assert stop not in tokenizer.decode(new[1])
    stopped = model.generate(ids, attention_mask=mask, max_new_tokens=20, stop_strings=stop, pad_token_id=0)
    np.testing.assert_array_equal(stopped[0, width : width + 6], new[0, :6])
    assert (stopped[0, width + 6 :] == 0).all()
    np.testing.assert_array_equal(stopped[1, width:], new[1])
    # Row 1 ends through EOS: the first token it makes that row 0 never makes.
    end = next(j for j in range(1, 20) if new[1, j] not in new[0] and new[1, j] not in new[1, :j])
    eos = int(new[1, end])
    ended = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(ended[1, width : width + end + 1], new[1, : end + 1])
    assert (ended[1, width + end + 1 :] == 0).all()
    np.testing.assert_array_equal(ended[0, width:], new[0])


def test_generation_stops_early_when_every_row_ended(gemma3) -> None:
    _, model = gemma3
    free = model.generate(np.array([PROMPTS[0]]), max_new_tokens=20, eos_token_id=[])
    eos = int(free[0, len(PROMPTS[0]) + 2])
    ended = model.generate(np.array([PROMPTS[0]]), max_new_tokens=20, eos_token_id=eos)
    assert ended.shape[1] <= len(PROMPTS[0]) + 3


def test_stream_yields_the_generated_text(gemma3) -> None:
    _, model = gemma3
    tokenizer = CharTokenizer()
    prompt = tokenizer.decode(PROMPTS[1])
    pieces = list(model.stream(prompt, max_new_tokens=12))
    expected = model.generate(np.array([PROMPTS[1]]), max_new_tokens=12)
    assert len(pieces) == 12
    assert "".join(pieces) == tokenizer.decode(expected[0, len(PROMPTS[1]) :])


BAD_REQUESTS = {
    "empty prompt": (np.zeros((1, 0), np.int64), {}),
    "all-padding row": (np.array([[0, 0], [3, 4]]), {"attention_mask": np.array([[0, 0], [1, 1]])}),
    "right-padded": (np.array([[3, 4, 0]]), {"attention_mask": np.array([[1, 1, 0]])}),
    "max_new_tokens 0": (np.array([[3, 4]]), {"max_new_tokens": 0}),
    "max_new_tokens negative": (np.array([[3, 4]]), {"max_new_tokens": -5}),
    "longer than the context": (np.ones((1, 250), np.int64), {"max_new_tokens": 10}),
    "top_p 0": (np.array([[3, 4]]), {"do_sample": True, "top_p": 0.0}),
    "top_p above 1": (np.array([[3, 4]]), {"do_sample": True, "top_p": 1.5}),
    "temperature 0 sampling": (np.array([[3, 4]]), {"do_sample": True, "temperature": 0.0}),
    "unknown option": (np.array([[3, 4]]), {"max_new_tokns": 5}),
    "beam search": (np.array([[3, 4]]), {"num_beams": 4}),
    "float ids": (np.array([[3.0, 4.0]]), {}),
}


@pytest.mark.parametrize("ids, kwargs", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_are_clear_errors_and_leave_no_state(gemma3, ids, kwargs) -> None:
    _, model = gemma3
    before = model.generate(np.array([[3, 4, 5]]), max_new_tokens=3)
    compiled = model.compile_count
    with pytest.raises(InvalidArgumentError):
        model.generate(ids, **kwargs)
    assert model.compile_count == compiled
    np.testing.assert_array_equal(model.generate(np.array([[3, 4, 5]]), max_new_tokens=3), before)


@pytest.mark.parametrize("bad", [300, -1])
def test_token_ids_outside_the_vocabulary_are_an_error(bad: int) -> None:
    arch = next(a for a in CAUSAL if a.name == "llama")
    model = AutoModelForTPU.from_model(arch.build())
    before = model.compile_count
    ids = np.array([[bad, 5]])
    with pytest.raises(InvalidArgumentError, match=f"token id {bad}, outside the model's vocabulary of 256"):
        model.generate(ids, max_new_tokens=3)
    with pytest.raises(InvalidArgumentError, match="outside the model's vocabulary"):
        list(model.stream(ids[0], max_new_tokens=3, tokenizer=CharTokenizer()))
    with pytest.raises(InvalidArgumentError, match="outside the model's vocabulary"):
        model(input_ids=ids)
    assert model.compile_count == before  # refused before anything ran


@pytest.mark.parametrize(
    "settings",
    [
        {"forced_eos_token_id": 3},
        {"forced_bos_token_id": 2},
        {"suppress_tokens": [21, 40, 77]},
        {"begin_suppress_tokens": [21, 40, 77]},
        {"bad_words_ids": [[40], [21, 77], [5, 6, 7]]},
    ],
    ids=lambda s: next(iter(s)),
)
def test_config_logits_processors_match_transformers(settings: dict, backend_name: str) -> None:
    """Processors transformers applies from a model's generation config (bart sets a forced
    EOS, whisper suppresses tokens) run in the compiled sampler, token for token."""
    if backend_name != "jax":
        pytest.skip("implemented on the JAX backend only; torch_xla refuses them with a clear error")
    module, model = build("llama", backend_name)
    prompts = [[5, 6], [8, 9, 10, 11]] if "forced_bos_token_id" not in settings else [[5], [6]]
    ids, mask = left_padded(prompts)
    # The choices these processors change: make the banned tokens the model's favourites.
    reference = hf_generate(module, ids, mask, max_new_tokens=8)
    if "suppress_tokens" in settings or "begin_suppress_tokens" in settings:
        settings = {k: [int(reference[0, ids.shape[1]]), int(reference[1, ids.shape[1]]), *v] for k, v in settings.items()}
    if "bad_words_ids" in settings:
        first, second = (int(t) for t in reference[1, ids.shape[1] : ids.shape[1] + 2])
        settings = {"bad_words_ids": [*settings["bad_words_ids"], [first, second], [int(reference[0, -1])]]}
    module.generation_config.update(**settings)
    try:
        expected = hf_generate(module, ids, mask, max_new_tokens=8)
        actual = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    finally:
        for name in settings:
            setattr(module.generation_config, name, None)
    assert not np.array_equal(expected, reference)  # the processor changed something
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("setting", ["no_repeat_ngram_size", "encoder_no_repeat_ngram_size"])
def test_repeated_ngrams_are_blocked_as_transformers_does(setting: str, size: int, backend_name: str) -> None:
    """n-gram blocking over the prompt and generated tokens (``encoder_``: the prompt's
    n-grams only, as transformers applies it to a decoder-only model), with prompts of
    different lengths (left padding and bucket padding must not count)."""
    if backend_name != "jax":
        pytest.skip("implemented on the JAX backend only; torch_xla refuses it with a clear error")
    module, model = build("llama", backend_name)
    ids, mask = left_padded([[5, 6], [8, 9, 10, 11]])
    # Prompts holding the model's own continuations (twice over), so its next choices repeat their n-grams.
    for _ in range(2):
        free = hf_generate(module, ids, mask, max_new_tokens=8)
        ids, mask = left_padded([list(free[0, 2:]), list(free[1])])
    reference = hf_generate(module, ids, mask, max_new_tokens=10)
    expected = hf_generate(module, ids, mask, max_new_tokens=10, **{setting: size})
    actual = model.generate(ids, attention_mask=mask, max_new_tokens=10, **{setting: size})
    assert not np.array_equal(expected, reference)  # the blocking changed something
    np.testing.assert_array_equal(actual, expected)
