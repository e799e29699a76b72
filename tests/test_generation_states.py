"""Compiled generation of models whose cache is not (only) attention keys and values:
SSM (Mamba), hybrid attention + SSM (Falcon-H1), hybrid attention + gated delta net
(Qwen3-Next), hybrid attention + lightning attention kept by a cache class of its own
(MiniMax) and sparse attention with an indexer (DeepSeek-V3.2: past 8 positions the
tokens depend on each indexer key sitting at its own position) layers, each layer's
state carried through the compiled loop; and the models it carries no cache for."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ttpu import AutoModelForTPU, TPUModel
from ttpu.backends.jax.kv_cache import CONV, INDEXER, KEYS, RECURRENT, UNWRITTEN, VALUES
from ttpu.coverage import tiny_config
from ttpu.patches import registry

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


# The arrays each model's layers carry (all layers together).
STATE_KINDS = {
    "mamba": {CONV, RECURRENT},
    "falcon_h1": {KEYS, VALUES, CONV, RECURRENT},
    "qwen3_next": {KEYS, VALUES, CONV, RECURRENT},
    "minimax": {KEYS, VALUES, RECURRENT},
    "deepseek_v32": {KEYS, VALUES, INDEXER},
}


@pytest.fixture(scope="module", params=sorted(STATE_KINDS))
def stateful(request):
    config = tiny_config(request.param)
    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(config).eval()
    eager = copy.deepcopy(module)  # from_model sets ttpu's attention on the module it wraps
    return request.param, eager, AutoModelForTPU.from_model(module)


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
    # The state really is the model's own kind.
    kinds = {n.split(".")[0] for layer in model.decoder().layout.layers for n in layer.names}
    assert kinds == STATE_KINDS[name]
    # generate() runs on the serving engine's paged step (state slots, or indexer keys' pools, beside paged keys)
    assert model.decoder().paged_for(len(PROMPTS), 16, 64) is not None


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


@pytest.mark.parametrize("cross_attention_layers", [[1], [0, 1]])
def test_cross_attention_layers_without_their_inputs_stay_empty(cross_attention_layers: list[int]) -> None:
    """Mllama's cross-attention layers hold nothing without an image; the model asks its
    cache whether they do (``is_initialized``), so they stay transformers' empty layers,
    also when every layer is one (then no layer counts positions, in transformers too)."""
    config = tiny_config("mllama")
    config.text_config.cross_attention_layers = cross_attention_layers
    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(config).eval()
    eager = copy.deepcopy(module)
    model = AutoModelForTPU.from_model(module)
    ids, mask = left_padded(PROMPTS, pad=0)
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = eager.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **settings).numpy()
    np.testing.assert_array_equal(model.generate(ids, mask, **settings), expected)
    layers = model.decoder().layout.layers
    assert [UNWRITTEN in layer.names for layer in layers] == [i in cross_attention_layers for i in range(2)]


@pytest.mark.parametrize(
    "model_type, reason",
    [
        ("openai-gpt", "the forward returns no cache"),
        ("prophetnet", "its cached step reads a traced value in Python (modeling_prophetnet.py"),
        ("minimax", "the model keeps a cache of its own (MiniMaxCache)"),
    ],
)
def test_a_model_generate_cannot_carry_a_cache_for_recomputes_each_step(
    model_type: str, reason: str, caplog, monkeypatch
) -> None:
    """GPT-1 returns no cache, ProphetNet's cached step compares the cache length in
    Python, MiniMax without its patches refuses any cache but its own: each step runs the
    forward over the whole (masked) token buffer, in the same compiled loop, and says why."""
    monkeypatch.setattr(registry, "PATCHES", [p for p in registry.PATCHES if not p.name.startswith("minimax.")])
    with caplog.at_level("WARNING", logger="ttpu"):
        model = generates_as_transformers(model_type, *left_padded(PROMPTS, pad=0))
    layout = model.decoder().layout
    assert reason in layout.describe() and "recomputes the whole sequence" in layout.describe()
    assert "recomputes the whole sequence at every step" in caplog.text and reason in caplog.text


def test_a_model_whose_dense_step_fails_generates_on_the_paged_step(caplog) -> None:
    """GIT's dense cached step reads the cache's length in Python; the layout keeps its
    cache's layers, and the paged step (which gives the model no cache object) carries
    them: transformers' tokens, and no warning that generation recomputes."""
    # Unpadded: transformers' GIT widens a cached step's mask over image tokens a text-only
    # batch has none of, which shifts a left-padded row's mask onto its padding.
    ids = np.array([PROMPTS[2], [p + 3 for p in PROMPTS[2]]])
    with caplog.at_level("WARNING", logger="ttpu"):
        model = generates_as_transformers("git", ids, np.ones_like(ids))
    layout = model.decoder().layout
    assert "its cached step reads a traced value in Python (modeling_git.py" in layout.recompute and layout.layers
    assert "which a paged step may carry" in layout.describe()
    assert model.decoder().paged_for(len(PROMPTS), 16, 64) is not None
    assert "recomputes the whole sequence" not in caplog.text


def generates_as_transformers(model_type: str, ids: np.ndarray, mask: np.ndarray, backend: str = "jax") -> TPUModel:
    """A tiny random ``model_type`` whose 16 greedy tokens after ``ids`` (``mask``) on
    ``backend`` are checked equal to transformers'; the ttpu model, for its decoder."""
    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    eager = copy.deepcopy(module)  # from_model patches the module it wraps
    model = AutoModelForTPU.from_model(module, backend=backend)
    settings = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = eager.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **settings).numpy()
    np.testing.assert_array_equal(model.generate(ids, mask, **settings), expected)
    return model


def test_causal_lms_named_otherwise_generate_and_an_unbounded_context_is_no_limit() -> None:
    """BertGenerationDecoder is what AutoModelForCausalLM builds (its task is causal-lm,
    though its name says nothing); XLNet's max_position_embeddings of -1 means no limit."""
    from transformers import BertGenerationConfig, BertGenerationDecoder, XLNetConfig

    from ttpu.generation.generate import _context_length
    from ttpu.tasks import task_from_config

    config = BertGenerationConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, is_decoder=True)
    assert task_from_config(config, BertGenerationDecoder.__name__) == "causal-lm"
    module = BertGenerationDecoder(config).eval()
    assert AutoModelForTPU.from_model(module).task == "causal-lm"

    class Unbounded:
        config = XLNetConfig(vocab_size=64, d_model=16, n_layer=1, n_head=2, d_inner=32)

    assert Unbounded.config.max_position_embeddings == -1
    assert _context_length(Unbounded) is None


def test_models_positioned_by_index_keep_their_prompt_length() -> None:
    """Marian's decoder takes no position ids (its positions count from the first token):
    bucket padding would shift them, so its prompts are not padded to a bucket."""
    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(tiny_config("marian")).eval()
    eager = copy.deepcopy(module)
    model = AutoModelForTPU.from_model(module)
    ids, mask = left_padded(PROMPTS[:2], pad=0)
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = eager.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **settings).numpy()
    np.testing.assert_array_equal(model.generate(ids, mask, **settings), expected)
