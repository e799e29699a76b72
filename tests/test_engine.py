"""The serving engine end to end on tiny random models: requests of different lengths
submitted together, scheduled in chunks under a token budget, over a paged KV pool (small
enough to preempt, with prefix caching on and off), give transformers' greedy tokens."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from architectures import ARCHITECTURES

from ttpu import AutoModelForTPU
from ttpu.errors import InvalidArgumentError
from ttpu.serving.engine import EngineConfig, LLMEngine
from ttpu.serving.request import SamplingParams

NEW_TOKENS = 10
PROMPT_LENGTHS = (1, 5, 17, 40, 9, 3)
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)  # transformers' min_new_tokens


def build(name: str):
    arch = next(a for a in ARCHITECTURES if a.name == name)
    module = arch.build()
    eager = copy.deepcopy(module)  # from_model sets ttpu's attention on the module it wraps
    return eager, AutoModelForTPU.from_model(module)


def prompts(seed: int = 0, prefix: list[int] | None = None) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[*(prefix or []), *rng.integers(3, 100, n).tolist()] for n in PROMPT_LENGTHS]


def expected_tokens(eager: torch.nn.Module, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = eager.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def serve(engine: LLMEngine, all_prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    requests = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(all_prompts)]
    while engine.has_unfinished_requests:
        engine.step()
    assert engine.kv.used_blocks == 0  # every block free after the drain
    return [r.output_token_ids for r in requests]


@pytest.mark.parametrize(
    "name", ["llama", "mistral", "mixtral", "qwen2", "qwen3_moe", "gemma2", "gemma3_text", "phi3", "gpt2", "opt"]
)
def test_requests_batched_continuously_give_transformers_greedy_tokens(name: str) -> None:
    """GQA, sliding windows (Mistral, Gemma 2/3), soft-capping (Gemma 2), MoE (Mixtral,
    Qwen3-MoE), learned positions (GPT-2, OPT); a budget of 16 tokens per step prefills the
    40-token prompt in chunks beside the others' decodes."""
    eager, model = build(name)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=128, max_num_batched_tokens=16, block_size=4))
    batch = prompts()
    assert serve(engine, batch) == [expected_tokens(eager, p) for p in batch]
    assert engine.runner.compile_count <= 2  # one program per (token, request) bucket pair used


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_preemption_by_recompute_keeps_the_tokens(prefix_caching: bool) -> None:
    eager, model = build("gemma3_text")
    config = EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=8, block_size=4, num_blocks=20,
                          enable_prefix_caching=prefix_caching)
    engine = LLMEngine(model, config)
    batch = prompts()
    assert serve(engine, batch) == [expected_tokens(eager, p) for p in batch]
    assert engine.scheduler.preemptions > 0
    assert (engine.kv.stats.hit > 0) == prefix_caching  # a resumed request finds its own blocks


def test_a_shared_prefix_is_computed_once() -> None:
    eager, model = build("llama")
    engine = LLMEngine(model, EngineConfig(max_num_seqs=8, max_model_len=128, max_num_batched_tokens=64, block_size=4))
    shared = list(range(40, 52))  # 3 full blocks
    first, *rest = prompts(seed=1, prefix=shared)
    assert serve(engine, [first]) == [expected_tokens(eager, first)]
    engine._requests.clear()
    hits_before = engine.kv.stats.hit
    outputs = []
    for i, prompt in enumerate(rest):
        engine.add_request(f"again{i}", prompt, GREEDY)
    requests = list(engine._requests.values())
    while engine.has_unfinished_requests:
        engine.step()
    outputs = [r.output_token_ids for r in requests]
    assert outputs == [expected_tokens(eager, p) for p in rest]
    # Each later prompt found the 3 shared blocks (only its suffix was computed).
    assert engine.kv.stats.hit - hits_before >= 3 * 4 * len(rest)


def test_a_seeded_request_samples_the_same_tokens_whatever_runs_beside_it() -> None:
    _, model = build("llama")
    engine = LLMEngine(model, EngineConfig(max_num_seqs=8, max_model_len=128, max_num_batched_tokens=64, block_size=4))
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=7, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    alone = serve(engine, [[5, 6, 7]], params)[0]
    engine._requests.clear()
    crowd = serve(engine, [[9, 9], [5, 6, 7], list(range(3, 30))], params)
    assert crowd[1] == alone
    greedy = serve(engine, [[5, 6, 7]], GREEDY)[0]
    assert alone != greedy  # it did sample


def test_an_aborted_request_frees_its_blocks_and_the_others_go_on() -> None:
    eager, model = build("llama")
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=128, max_num_batched_tokens=64, block_size=4))
    batch = prompts()[:3]
    requests = [engine.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(batch)]
    engine.step()
    engine.abort("r1")
    while engine.has_unfinished_requests:
        engine.step()
    assert requests[1].finish_reason == "abort" and engine.kv.used_blocks == 0
    assert [requests[0].output_token_ids, requests[2].output_token_ids] == [
        expected_tokens(eager, batch[0]), expected_tokens(eager, batch[2])
    ]


def test_a_request_longer_than_the_engine_allows_is_refused() -> None:
    _, model = build("llama")
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=32, max_num_batched_tokens=16, block_size=4))
    with pytest.raises(InvalidArgumentError, match="exceed the engine's max_model_len=32"):
        engine.add_request("long", list(range(3, 30)), SamplingParams(max_tokens=10))
    assert not engine.has_unfinished_requests


class CharTokenizer:
    """One character per token id (as transformers' tokenizers answer a single string)."""

    chat_template = None

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(0x100 + int(i)) for i in ids)

    def __call__(self, text: str) -> dict:
        return {"input_ids": [ord(c) - 0x100 for c in text]}


def test_llm_takes_text_token_ids_and_per_prompt_params_and_cuts_stop_strings() -> None:
    from ttpu import LLM, SamplingParams

    eager, model = build("llama")
    model.tokenizer = CharTokenizer()
    llm = LLM(model, max_num_seqs=4, max_model_len=128, max_num_batched_tokens=32, block_size=4)
    text = CharTokenizer().decode([5, 17, 33, 4])
    reference = expected_tokens(eager, [5, 17, 33, 4])
    stop = CharTokenizer().decode(reference[3:4])
    outputs = llm.generate(
        [text, {"prompt_token_ids": [9, 9, 9]}, [5, 17, 33, 4]],
        [GREEDY, SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=5), SamplingParams(temperature=0, stop=[stop])],
        use_tqdm=False,
    )
    first, second, third = outputs
    assert first.prompt == text and first.prompt_token_ids == [5, 17, 33, 4]
    assert first.outputs[0].token_ids == reference and first.outputs[0].finish_reason == "length"
    assert [len(o.token_ids) for o in second.outputs] == [5, 5] and second.outputs[0].token_ids != second.outputs[1].token_ids
    # The stop string (the 4th greedy token's character) ends the text before it.
    full = CharTokenizer().decode(reference)
    assert third.outputs[0].finish_reason == "stop" and third.outputs[0].text == full[: full.find(stop)]
    with pytest.raises(InvalidArgumentError, match="a prompt is a string, token ids"):
        llm.generate([3.5], use_tqdm=False)
    assert llm.engine.kv.used_blocks == 0


def test_after_the_warm_up_no_mix_of_requests_compiles() -> None:
    """Every (token, request) bucket pair and both sampler variants compile up front;
    then 80 requests of random lengths and settings, arriving over time, compile nothing."""
    import random

    _, model = build("llama")
    engine = LLMEngine(model, EngineConfig(max_num_seqs=8, max_model_len=64, max_num_batched_tokens=32, block_size=4))
    assert engine.warm_up(progress=False) > 0
    compiled = engine.compile_count
    pairs = engine.runner.buckets()
    assert compiled == len(pairs) + 2 * len({requests for _, requests in pairs})  # steps; greedy/filtering samplers
    rng = random.Random(0)
    for i in range(80):
        params = rng.choice([
            GREEDY, SamplingParams(temperature=0.8, top_k=5, max_tokens=rng.randrange(1, 12), seed=i),
            SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, max_tokens=rng.randrange(1, 12), stop_token_ids=[3, 4]),
        ])
        engine.add_request(f"r{i}", [rng.randrange(3, 200) for _ in range(rng.randrange(1, 40))], params)
        for _ in range(rng.randrange(0, 3)):
            engine.step()
    while engine.has_unfinished_requests:
        engine.step()
    assert engine.compile_count == compiled and engine.kv.used_blocks == 0
