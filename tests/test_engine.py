"""The serving engine end to end on tiny random models: requests of different lengths
submitted together, scheduled in chunks under a token budget, over a paged KV pool (small
enough to preempt, with prefix caching on and off), give transformers' greedy tokens."""

from __future__ import annotations

import copy
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from architectures import ARCHITECTURES
from references import transformers_greedy

from ttpu import AutoModelForTPU
from ttpu.errors import InvalidArgumentError
from ttpu.serving.engine import EngineConfig, LLMEngine
from ttpu.serving.request import SamplingParams
from ttpu.backends.jax.sampling import SamplerMode

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
    """transformers' ``NEW_TOKENS`` greedy tokens after ``prompt`` alone (unpadded)."""
    return transformers_greedy(eager, [prompt], NEW_TOKENS, batch=1)[0]


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
    assert engine.runner.recompute_reason is None  # the paged cache holds it
    batch = prompts()
    assert serve(engine, batch) == [expected_tokens(eager, p) for p in batch]
    assert engine.runner.compile_count <= 2  # one program per (token, request) bucket pair used


def tiny_module(model_type: str, **changes: Any) -> torch.nn.Module:
    """transformers' causal LM of ``model_type`` from the coverage sweep's tiny config
    (with ``changes``), random weights."""
    from ttpu.coverage.configs import tiny_config
    from ttpu.coverage.run import _build, _causal_lm_class, config_for_class

    cls = _causal_lm_class(model_type)
    config = config_for_class(cls, tiny_config(model_type, True))
    config.update(changes)
    return _build(cls, config)


def tiny_causal_lm(model_type: str, **changes: Any):
    """:func:`tiny_module`, and ttpu's model of it."""
    module = tiny_module(model_type, **changes)
    return copy.deepcopy(module), AutoModelForTPU.from_model(module)


@pytest.mark.parametrize("model_type", ["bart", "marian", "whisper"])
def test_models_that_number_positions_themselves_are_paged(model_type: str) -> None:
    """Decoders whose forward takes no position ids (they count from their cache's
    length) get each token's own position through their positional-embedding module:
    the paged pools hold them, chunked prefill beside decodes gives transformers' tokens."""
    eager, model = tiny_causal_lm(model_type)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16, block_size=4))
    assert engine.runner.recompute_reason is None and engine.kv.prefix_caching
    batch = prompts()
    assert serve(engine, batch) == [expected_tokens(eager, p) for p in batch]


def test_layers_given_an_earlier_layers_keys_read_its_pool() -> None:
    """Gemma 3n's KV-shared layers attend with the keys an earlier layer stored: they keep
    no pool and read that layer's, which holds this step's keys already."""
    eager, model = tiny_causal_lm("gemma3n_text")
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16, block_size=4))
    assert engine.runner.recompute_reason is None
    shared = [i for i, mode in enumerate(eager.config.kv_sharing_modes) if mode == "reuse"]
    assert shared and len(engine.runner.cache.pools) == eager.config.num_hidden_layers - len(shared)
    assert not {layer for layer, _ in model.decoder().paged_model().writers} & set(shared)  # no pool written by a shared layer
    batch = prompts()
    assert serve(engine, batch) == [expected_tokens(eager, p) for p in batch]


def test_a_layer_calling_attention_twice_keeps_a_pool_per_call() -> None:
    """DiffLlama's differential attention calls the attention function twice per layer,
    with the same keys and either half of the values: each call writes and reads its own
    pool."""
    eager, model = tiny_causal_lm("diffllama")
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16, block_size=4))
    assert engine.runner.recompute_reason is None
    assert len(engine.runner.cache.pools) == 2 * eager.config.num_hidden_layers
    first, *rest = prompts(prefix=list(range(3, 15)))  # 3 full blocks shared
    assert serve(engine, [first]) == [expected_tokens(eager, first)]
    engine._requests.clear()
    hits = engine.kv.stats.hit
    assert serve(engine, rest) == [expected_tokens(eager, p) for p in rest]  # both pools of a layer hold the prefix
    assert engine.kv.stats.hit - hits >= 3 * 4 * len(rest)


@pytest.mark.parametrize("model_type", ["mamba", "mamba2", "qwen3_next", "falcon_h1", "nemotron_h"])
def test_recurrent_and_hybrid_models_give_transformers_greedy_tokens(model_type: str) -> None:
    """SSM (Mamba, Mamba-2), gated delta net beside attention layers (Qwen3-Next), attention
    and SSM in one layer (Falcon-H1), SSM, attention and MLP-only layers (Nemotron-H): each
    request keeps a state slot; a 48-token budget splits the new prompts over several steps
    (the 40-token one alone), between steps of decodes."""
    eager, model = tiny_causal_lm(model_type)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=48, block_size=4))
    assert engine.runner.has_states and engine.scheduler.whole_prefills and not engine.kv.prefix_caching
    batch = prompts()
    assert serve(engine, batch) == [expected_tokens(eager, p) for p in batch]
    assert engine.kv.used_state_slots == 0  # every slot free after the drain
    engine._requests.clear()
    assert serve(engine, [[5], [7]]) == [expected_tokens(eager, [5]), expected_tokens(eager, [7])]  # a step of 1-token prompts


def test_chunked_attention_layers_give_transformers_greedy_tokens() -> None:
    """Llama 4's chunked layers attend within chunks of 8 positions: the 17- and 40-token
    prompts and their outputs cross several."""
    eager, model = tiny_causal_lm("llama4_text")
    assert eager.config.attention_chunk_size == 8 and "chunked_attention" in eager.config.layer_types
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16, block_size=4))
    batch = prompts()
    assert serve(engine, batch) == [expected_tokens(eager, p) for p in batch]
    # Its NoPE layers' temperature tuning counts positions from a cache's length: paged, exact only below
    # floor_scale; at or above it the engine recomputes the sequences.
    model.torch_module.config.floor_scale = eager.config.floor_scale = 64
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16, block_size=4))
    assert "temperature tuning counts positions from the cache, exact only below floor_scale=64" in engine.runner.recompute_reason
    assert serve(engine, batch) == [expected_tokens(eager, p) for p in batch]


def test_a_tensor_parallel_hybrid_engine_gives_transformers_greedy_tokens() -> None:
    """On 8 virtual devices: 2 key heads do not split over 8, so every device holds the
    whole attention pool and runs the kernel on it (a shard_map: no collective inside the
    kernel's branch and loop); the state slots are whole too."""
    eager, _ = tiny_causal_lm("qwen3_next")
    model = AutoModelForTPU.from_model(copy.deepcopy(eager), parallelism="tp")
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=48, block_size=4))
    assert engine.runner._paged._heads_axes == (None,)
    batch = prompts()[:4]
    assert serve(engine, batch) == [expected_tokens(eager, p) for p in batch]
    for program in engine.runner._step._compiled.values():  # every collective sits outside control flow
        assert not collectives_inside_control_flow(program.as_text())
    compiled = engine.runner.compile_count
    engine._requests.clear()
    assert serve(engine, batch) == [expected_tokens(eager, p) for p in batch]
    assert engine.runner.compile_count == compiled  # the state slots come back from a step as they went in


def collectives_inside_control_flow(hlo: str) -> list[str]:
    """The collectives of compiled ``hlo`` outside its entry computation (in a loop body,
    a branch or a function they call)."""
    found, computation = [], ""
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            computation = line
        elif not computation.startswith("ENTRY") and re.search(r" (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(-start)?\(", line):
            found.append(line.strip())
    return found


def test_a_preempted_hybrid_request_recomputes_its_state() -> None:
    eager, model = tiny_causal_lm("qwen3_next")
    config = EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=64, block_size=4, num_blocks=20)
    engine = LLMEngine(model, config)
    batch = prompts()
    assert serve(engine, batch) == [expected_tokens(eager, p) for p in batch]
    assert engine.scheduler.preemptions > 0 and engine.kv.used_state_slots == 0


@pytest.mark.parametrize("model_type, changes, indexers",
                         [("deepseek_v32", {}, 2), ("glm_moe_dsa", {"indexer_types": ["full", "shared"]}, 1)])
def test_sparse_attention_indexers_keep_their_keys_in_paged_pools(model_type: str, changes: dict[str, Any],
                                                                   indexers: int) -> None:
    """DeepSeek-V3.2's and GLM-MoE-DSA's indexers (GLM's second layer reuses its first's
    choice) score each query against its request's indexer keys: the engine keeps those
    in paged pools beside the keys and values and steps the requests in rows, and each
    token attends to the 8 positions its indexer picks. transformers' greedy tokens for
    prompts of up to 40 tokens (well past 8) under a 16-token budget (prompts computed in
    chunks) and a pool small enough to preempt; and with a cached prefix of 3 blocks,
    whose keys, values and indexer keys the later prompts read without computing them."""
    eager, model = tiny_causal_lm(model_type, **changes)
    config = EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16, block_size=4, num_blocks=24)
    engine = LLMEngine(model, config)
    assert engine.runner.recompute_reason is None and engine.runner.in_rows and not engine.runner.has_states
    assert engine.scheduler.chunked_prefills and max(tokens for tokens, _ in engine.runner.buckets()) == 16
    assert len(engine.runner.cache.indexers) == indexers and engine.kv.prefix_caching
    batch = prompts()
    assert serve(engine, batch) == [expected_tokens(eager, p) for p in batch]
    assert engine.scheduler.preemptions > 0
    first, *rest = prompts(seed=1, prefix=list(range(40, 52)))  # 3 full blocks shared
    assert serve(engine, [first]) == [expected_tokens(eager, first)]
    hits = engine.kv.stats.hit
    assert serve(engine, rest) == [expected_tokens(eager, p) for p in rest]
    assert engine.kv.stats.hit - hits >= 3 * 4 * len(rest)


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


def test_generate_draws_as_the_engine_does_with_the_same_seeds() -> None:
    """One sampler: ``generate(seed=s)``'s row ``i`` (left-padded beside the others) draws
    the tokens an engine request with seed ``s + i`` and the same settings draws."""
    _, model = build("llama")
    batch = prompts()[:3]
    width = max(map(len, batch))
    ids = np.array([[0] * (width - len(p)) + p for p in batch])
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    settings = dict(temperature=0.8, top_k=20, top_p=0.9)
    generated = model.generate(ids, attention_mask=mask, do_sample=True, seed=3, max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, pad_token_id=0, **settings)[:, width:]
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=128, max_num_batched_tokens=64, block_size=4))
    served = [serve(engine, [p], SamplingParams(seed=3 + i, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, **settings))[0]
              for i, p in enumerate(batch)]
    assert generated.tolist() == served
    assert served != serve(engine, batch, GREEDY)  # it did sample


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
        [GREEDY, SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=5, ignore_eos=True),
         SamplingParams(temperature=0, stop=[stop])],
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


def test_a_stored_step_is_not_taken_for_another_engines_step() -> None:
    """Steps are kept in the program store; one of an engine with 4 seats returns 4 rows
    of logits where one with 8 returns 8 for the same inputs, so a second engine must not
    load the first's (it would sample from half its rows)."""
    _, model = tiny_causal_lm("bert")  # recomputed: a 1-request step's logits are padded to the seats
    rows = []
    for seats in (4, 8):
        engine = LLMEngine(model, EngineConfig(max_num_seqs=seats, max_model_len=64, max_num_batched_tokens=64))
        rows.append(engine.runner.run(engine.runner.empty_step(16, 1)).shape[0])
    assert rows == [4, 8]


@pytest.mark.parametrize("model_type", ["llama", "mamba2", "deepseek_v32", "bert"])
def test_after_the_warm_up_no_mix_of_requests_compiles(model_type: str) -> None:
    """Every (token, request) bucket pair and every sampler mode compile up front; then
    200 requests of random lengths and settings, arriving over time, compile nothing
    (Mamba-2's and DeepSeek-V3.2's steps run as rows: new prompts, or what their cached
    prefixes leave of them, or decodes; BERT's recompute whole sequences)."""
    import random

    _, model = build(model_type) if model_type == "llama" else tiny_causal_lm(model_type)
    budget = 32 if model_type == "llama" else 64  # new prompts: 4 rows of 16, 2 of 32, 1 of 64
    engine = LLMEngine(model, EngineConfig(max_num_seqs=8, max_model_len=64, max_num_batched_tokens=budget, block_size=4))
    assert (engine.runner.recompute_reason is None) == (model_type != "bert")
    assert engine.warm_up(progress=False) > 0
    compiled = engine.compile_count
    pairs = engine.runner.buckets()
    assert compiled == len(pairs) + len(SamplerMode.every()) * len({engine.runner.sampled_rows(r) for _, r in pairs})
    rng = random.Random(0)
    for i in range(200):
        params = rng.choice([
            GREEDY, SamplingParams(temperature=0.8, top_k=5, max_tokens=rng.randrange(1, 12), seed=i),
            SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, max_tokens=rng.randrange(1, 12), stop_token_ids=[3, 4]),
            SamplingParams(temperature=0.7, repetition_penalty=1.2, frequency_penalty=0.5, max_tokens=rng.randrange(1, 12)),
            SamplingParams(temperature=0, presence_penalty=1.0, logprobs=rng.randrange(0, 6), max_tokens=rng.randrange(1, 12)),
        ])
        engine.add_request(f"r{i}", [rng.randrange(3, 200) for _ in range(rng.randrange(1, 40))], params)
        for _ in range(rng.randrange(0, 3)):
            engine.step()
    while engine.has_unfinished_requests:
        engine.step()
    assert engine.compile_count == compiled and engine.kv.used_blocks == 0 == engine.kv.used_state_slots


def test_repetition_penalty_and_logprobs_match_transformers() -> None:
    """Greedy under ``repetition_penalty`` gives transformers' tokens (its processor is
    vLLM's formula over prompt and output); ``logprobs`` are the raw distribution's."""
    eager, model = build("llama")
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=128, max_num_batched_tokens=16, block_size=4))
    batch = prompts()[:4]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, repetition_penalty=1.5, logprobs=3)
    requests = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(batch)]
    while engine.has_unfinished_requests:
        engine.step()
    for prompt, request in zip(batch, requests):
        with torch.no_grad():
            out = eager.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0, repetition_penalty=1.5,
                                 output_logits=True, return_dict_in_generate=True)
        assert request.output_token_ids == out.sequences[0, len(prompt) :].tolist()
        assert len(request.output_logprobs) == NEW_TOKENS
        for token, step_logits, logprobs in zip(request.output_token_ids, out.logits, request.output_logprobs):
            reference = torch.log_softmax(step_logits[0].float(), -1)
            assert logprobs.token_id == token
            np.testing.assert_allclose(logprobs.logprob, reference[token].item(), atol=1e-4)
            assert logprobs.rank == 1 + int((reference > reference[token]).sum())
            top = torch.topk(reference, 3)
            assert [t for t, _ in logprobs.top] == top.indices.tolist()
            np.testing.assert_allclose([v for _, v in logprobs.top], top.values.numpy(), atol=1e-4)


def test_the_generation_configs_processors_apply_as_in_transformers_generate() -> None:
    """Forced BOS (after the 1-token prompt) and EOS (last) tokens, suppressed tokens (always
    and first), bad words and repeated 2-grams from the model's generation config: the
    engine's greedy tokens are transformers' generate's, which applies them too."""
    eager, model = build("llama")
    processors = dict(forced_bos_token_id=11, forced_eos_token_id=7, suppress_tokens=[5, 9], begin_suppress_tokens=[3],
                      bad_words_ids=[[42], [17, 23]], no_repeat_ngram_size=2)
    for module in (eager, model.torch_module):
        module.generation_config.update(**processors)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=128, max_num_batched_tokens=32, block_size=4))
    batch = prompts()
    served = serve(engine, batch)
    assert served == [expected_tokens(eager, p) for p in batch]
    assert served[0][0] == 11 and all(tokens[-1] == 7 for tokens in served)


def test_presence_and_frequency_penalties_count_only_output_tokens() -> None:
    from ttpu.serving.request import Request
    from ttpu.backends.jax import sampling
    from ttpu.serving.sampler import row_sampling

    vocab = 8
    logits = np.linspace(-1.0, 2.0, vocab, dtype=np.float32)[None].repeat(2, 0)
    penalized = Request("a", [7, 7, 1], SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25,
                                                      repetition_penalty=2.0))
    penalized.output_token_ids = [7, 2, 2, 0]
    plain = Request("b", [7], SamplingParams(temperature=0))
    rows, mode = row_sampling([penalized, plain], 2, vocab, history_width=16)
    assert mode == SamplerMode(penalties=True)
    # Stop tokens are listed only while min_tokens holds them back: the warm-up's width stays.
    many_stops = Request("c", [7], SamplingParams(temperature=0, stop_token_ids=list(range(1, 8))))
    assert row_sampling([many_stops], 2, vocab, history_width=16)[0].stop_ids.shape == (2, 4)
    expected = logits[0].copy()
    for token in {7, 1, 2, 0}:  # repetition: prompt and output tokens
        expected[token] = expected[token] / 2 if expected[token] > 0 else expected[token] * 2
    for token, count in {7: 1, 2: 2, 0: 1}.items():  # frequency per output occurrence, presence once
        expected[token] -= 0.25 * count + 0.5
    got = np.asarray(sampling._penalized(jnp.asarray(logits), rows))
    np.testing.assert_allclose(got[0], expected, rtol=1e-6)
    np.testing.assert_allclose(got[1], logits[1])  # no penalties on the plain row
    assert np.asarray(sampling.sample(jnp.asarray(logits), rows, mode).tokens).tolist() == [int(np.argmax(expected)), vocab - 1]


@pytest.mark.parametrize("architecture, parallelism",
                         [("llama", "tp"), ("llama", "2d"), ("bloom", "tp"), ("deepseek_v32", "tp")])
def test_tensor_parallel_engine_splits_the_pool_over_kv_heads(architecture: str, parallelism: str) -> None:
    """On 8 virtual devices: each device holds its share of the heads of every pool (and of
    BLOOM's ALiBi slopes; DeepSeek-V3.2's sparse kernel reads its own heads at each
    token's chosen positions, its indexer pools whole), and the tokens are transformers'."""
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if architecture == "llama":
        module = LlamaForCausalLM(LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=8, max_position_embeddings=128, pad_token_id=0,
        )).eval()
    elif architecture == "bloom":
        module = BloomForCausalLM(BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=8, pad_token_id=0)).eval()
    else:
        module = tiny_module(architecture, num_attention_heads=8, num_key_value_heads=8)
    eager = copy.deepcopy(module)
    model = AutoModelForTPU.from_model(module, parallelism=parallelism)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=128, max_num_batched_tokens=16, block_size=4))
    tensor = model.compiled_forward.placement.mesh.shape["tensor"]
    pool = engine.runner.cache.pools[0]  # [blocks, block_size, 2 * kv_heads, dim]
    assert tensor > 1 and pool.sharding.shard_shape(pool.shape)[2] == pool.shape[2] // tensor
    batch = prompts()[:4]
    assert serve(engine, batch) == [expected_tokens(eager, p) for p in batch]
    compiled = engine.runner.compile_count
    engine._requests.clear()
    assert serve(engine, batch) == [expected_tokens(eager, p) for p in batch]
    assert engine.runner.compile_count == compiled  # the pools come back from a step as they went in


@pytest.mark.parametrize("model_type", ["llama", "mamba2"])
def test_a_request_that_raises_in_its_step_fails_alone(model_type: str, monkeypatch) -> None:
    """The step fails after it ran (the cache moved on). Mamba-2's other decodes are not
    replayed on states it moved: they recompute from scratch, with the same tokens."""
    eager, model = build(model_type) if model_type == "llama" else tiny_causal_lm(model_type)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=128, max_num_batched_tokens=64, block_size=4))
    run = engine.runner.run
    batch = prompts()[:3]
    requests = [engine.add_request(name, p, GREEDY) for name, p in zip(["a", "bad", "c"], batch)]

    def failing(inputs):
        logits = run(inputs)
        if "bad" in inputs.sampling_ids and requests[1].output_token_ids:
            raise RuntimeError("boom")  # from its second step on
        return logits

    monkeypatch.setattr(engine.runner, "run", failing)
    while engine.has_unfinished_requests:
        engine.step()
    assert requests[1].finish_reason == "error" and requests[1].error == "RuntimeError: boom"
    assert [requests[0].output_token_ids, requests[2].output_token_ids] == [
        expected_tokens(eager, batch[0]), expected_tokens(eager, batch[2])
    ]
    assert engine.kv.used_blocks == 0 == engine.kv.used_state_slots
    vocab = engine.vocab_size
    with pytest.raises(InvalidArgumentError, match=rf"token ids \[{vocab}\] are outside the model's vocabulary \(0 to {vocab - 1}\)"):
        engine.add_request("outside", [5, vocab], GREEDY)


@pytest.mark.parametrize(
    "model_type, changes, reason",
    [
        ("moss_transcribe_diarize", {}, "takes no position_ids \\(it numbers positions itself.*no positional-embedding module"),
        ("bert", {}, "BertLMHeadModel has none: the forward returns no cache"),
        ("prophetnet", {}, "ProphetNetForCausalLM does not run with the paged attention"),  # no logits_to_keep
        ("inkling2_text", {}, "Inkling2ForCausalLM does not run with the paged attention \\(CompilationError"),  # attention over layers
        ("inkling_text", {}, "InklingForCausalLM fails one request per row .*reads its cache's length"),  # relative positions
        # sinusoidal positions numbered from the padding in its ids, by a module that takes no position ids
        ("trocr", {"use_learned_position_embeddings": False}, "TrOCRForCausalLM.forward takes no position_ids .*no "
         "positional-embedding module of it takes them"),
    ],
    ids=["moss", "bert", "prophetnet", "inkling2", "inkling", "trocr-sinusoidal"],
)
def test_models_the_paged_cache_cannot_hold_are_served_by_recomputing(model_type: str, changes: dict[str, Any],
                                                                       reason: str) -> None:
    """A model whose cache or attention the paged pool cannot hold is served without a
    cache, each step recomputing its requests' whole sequences (as ``generate`` runs a
    model that keeps none): transformers' greedy tokens, the new prompts under a 48-token
    budget in steps of their own, prefix caching off."""
    eager, model = tiny_causal_lm(model_type, **changes)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=48, block_size=4))
    assert re.search(reason, engine.runner.recompute_reason)
    assert engine.scheduler.whole_prefills and not engine.kv.prefix_caching
    assert engine.runner.cache.pools == ()
    batch = prompts()
    assert serve(engine, batch) == [expected_tokens(eager, p) for p in batch]


def test_a_failed_step_leaves_no_unwritten_prefix_behind(monkeypatch) -> None:
    """A request that fails in the step that was to write its prompt's blocks: a request
    that found those blocks as a prefix in the same step recomputes them later, and a
    later request with the same prompt does not find them cached."""
    eager, model = build("llama")
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=128, max_num_batched_tokens=64, block_size=4))
    prepare = engine.runner.prepare

    def failing(out, block_ids, state_slots):
        if any(chunk.request.id == "bad" for chunk in out.chunks):
            raise RuntimeError("boom")
        return prepare(out, block_ids, state_slots)

    monkeypatch.setattr(engine.runner, "prepare", failing)
    shared = list(range(40, 52))  # 3 full blocks
    bad = engine.add_request("bad", [*shared, 7], GREEDY)
    partner = engine.add_request("partner", [*shared, 9, 9], GREEDY)
    while engine.has_unfinished_requests:
        engine.step()
    assert bad.finish_reason == "error" and partner.output_token_ids == expected_tokens(eager, [*shared, 9, 9])
    again = engine.add_request("again", [*shared, 7], GREEDY)
    while engine.has_unfinished_requests:
        engine.step()
    assert again.output_token_ids == expected_tokens(eager, [*shared, 7]) and engine.kv.used_blocks == 0


def test_a_step_that_loses_the_donated_pools_fails_the_running_requests_and_the_engine_goes_on(monkeypatch) -> None:
    eager, model = build("llama")
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=128, max_num_batched_tokens=64, block_size=4))
    run, calls = engine.runner.run, []

    def losing(inputs):
        calls.append(1)
        if len(calls) == 2:  # the second step dies on the device after donating the pools
            for pool in engine.runner.cache.pools:
                pool.delete()
            raise RuntimeError("device lost")
        return run(inputs)

    monkeypatch.setattr(engine.runner, "run", losing)
    batch = prompts()[:2]
    first = [engine.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(batch)]
    while engine.has_unfinished_requests:
        engine.step()
    assert [r.finish_reason for r in first] == ["error", "error"] and "device lost" in first[0].error
    later = engine.add_request("later", batch[0], GREEDY)
    while engine.has_unfinished_requests:
        engine.step()
    assert later.output_token_ids == expected_tokens(eager, batch[0]) and engine.kv.used_blocks == 0
