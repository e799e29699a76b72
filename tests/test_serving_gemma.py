"""The serving engine on the real Gemma 3 270M (offline GGUF weights): 16 prompts of
1-600 tokens of local prose submitted together give transformers' greedy tokens, under a
token budget that prefills in chunks, a pool small enough to preempt, and prefix caching
on and off."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from references import transformers_greedy
from transformers import AutoModelForCausalLM

from ttpu import AutoModelForTPU, models
from ttpu.serving.engine import EngineConfig, LLMEngine
from ttpu.serving.request import SamplingParams

pytestmark = pytest.mark.slow

NEW_TOKENS = 16
LENGTHS = (1, 7, 33, 600, 64, 250, 2, 128, 17, 480, 90, 5, 320, 45, 3, 200)


@pytest.fixture(scope="module")
def gemma():
    model = AutoModelForTPU.from_pretrained("gemma-3-270m")
    eager = AutoModelForCausalLM.from_pretrained(
        models.offline_model_dir("gemma-3-270m"), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    text = importlib.metadata.metadata("transformers").get_payload()  # local prose
    ids = model.tokenizer(text)["input_ids"]
    # Half the prompts start at the text's start (shared prefixes), half further on.
    prompts = [ids[: n] if i % 2 else [ids[0], *ids[1000 + 37 * i : 1000 + 37 * i + n - 1]] for i, n in enumerate(LENGTHS)]
    return model, prompts, transformers_greedy(eager, prompts, NEW_TOKENS)


# Both prefill in chunks (a 128-token budget); preemption with prefix caching on is
# tested on tiny models (tests/test_engine.py), so the real model runs two engines, not three.
CONFIGS = {
    "chunked-prefill": EngineConfig(max_num_seqs=16, max_model_len=640, max_num_batched_tokens=128),
    "preemption-no-prefix-cache": EngineConfig(
        max_num_seqs=16, max_model_len=640, max_num_batched_tokens=128, num_blocks=48, enable_prefix_caching=False
    ),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_gemma_served_together_gives_transformers_greedy_tokens(gemma, config: EngineConfig) -> None:
    model, prompts, expected = gemma
    engine = LLMEngine(model, config)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    requests = [engine.add_request(str(i), prompt, params) for i, prompt in enumerate(prompts)]
    while engine.has_unfinished_requests:
        engine.step()
    assert [r.output_token_ids for r in requests] == expected
    assert engine.kv.used_blocks == 0
    assert (engine.scheduler.preemptions > 0) == (config.num_blocks is not None)
    assert (engine.kv.stats.hit > 0) == config.enable_prefix_caching
