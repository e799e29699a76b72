"""Each registered patch is needed (the model fails without it) and exact (matches eager)."""

from __future__ import annotations

import copy
import functools
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from transformers import (
    JetMoeConfig,
    JetMoeForCausalLM,
    LongcatFlashConfig,
    LongcatFlashForCausalLM,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
)

from ttpu import AutoModelForTPU
from ttpu.errors import CompilationError
from ttpu.patches import PATCHES, registry
from ttpu.serving.engine import EngineConfig, LLMEngine

from test_engine import expected_tokens, prompts, serve, tiny_causal_lm

PATCHED_MODELS = {
    "jetmoe": (
        JetMoeForCausalLM,
        JetMoeConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16,
            intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        ),
    ),
    "longcat_flash": (
        LongcatFlashForCausalLM,
        LongcatFlashConfig(
            vocab_size=128, hidden_size=64, ffn_hidden_size=64, expert_ffn_hidden_size=32,
            num_layers=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
            zero_expert_num=2, moe_topk=2, kv_lora_rank=32, q_lora_rank=32,
            qk_rope_head_dim=8, head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
            max_position_embeddings=128,
        ),
    ),
    "switch_transformers": (
        SwitchTransformersForConditionalGeneration,
        SwitchTransformersConfig(
            vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
            num_heads=4, num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1,
            decoder_start_token_id=0,
        ),
    ),
}


def build(name: str) -> torch.nn.Module:
    model_class, config = PATCHED_MODELS[name]
    torch.manual_seed(0)
    return model_class(config).eval()


def inputs(name: str) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(1, 128, (2, 9))
    if name == "switch_transformers":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return {"input_ids": ids}


def test_every_patch_documents_itself() -> None:
    for patch in PATCHES:
        assert patch.reason and patch.test.startswith("tests/test_patches.py::")
        assert patch.transformers_versions


def patched_in_this_transformers(name: str) -> bool:
    """Whether this transformers still needs ``name``'s experts patch (LongcatFlash's
    experts take transformers' own implementations from 5.25)."""
    return next(p for p in PATCHES if p.name == f"{name}.dense_experts").is_applicable(build(name))


@pytest.mark.parametrize("name", PATCHED_MODELS)
def test_patched_model_matches_eager(name: str) -> None:
    reference = build(name)
    model = AutoModelForTPU.from_model(build(name))
    assert [p.name for p in model.patches] == ([f"{name}.dense_experts"] if patched_in_this_transformers(name) else [])
    with torch.no_grad():
        expected = reference(**{k: torch.from_numpy(v) for k, v in inputs(name).items()}).logits
    actual = np.asarray(model(**inputs(name)).logits)
    assert np.linalg.norm(actual - expected.numpy()) / np.linalg.norm(expected.numpy()) < 1e-5


@pytest.mark.parametrize("name", PATCHED_MODELS)
def test_model_fails_without_its_patch(name: str, monkeypatch) -> None:
    if not patched_in_this_transformers(name):
        pytest.skip(f"transformers {transformers.__version__} needs no patch for {name} (the oldest supported runs this)")
    monkeypatch.setattr(registry, "PATCHES", [])
    model = AutoModelForTPU.from_model(build(name))
    with pytest.raises(CompilationError, match="Experts|TopKGating"):
        model(**inputs(name))


def test_patches_outside_their_transformers_versions_are_not_applied(monkeypatch) -> None:
    monkeypatch.setattr(registry.transformers, "__version__", "4.57.0")
    assert not any(patch.is_applicable(build("longcat_flash")) for patch in PATCHES)


PROGRAM_FINGERPRINTS = """
import hashlib, sys
sys.path.insert(0, "tests")
from architectures import ARCHITECTURES
from ttpu import AutoModelForTPU
from ttpu.patches import PATCHES
arch = next(a for a in ARCHITECTURES if a.name == "gemma3_text")
for variant in ("patched", "unpatched"):
    if variant == "unpatched":
        PATCHES[:] = [p for p in PATCHES if p.name != "stable_layer_type_order"]
    module = arch.build()
    model = AutoModelForTPU.from_model(module)
    inputs = {k: model._forward.to_array(v) for k, v in arch.make_inputs(module).items()}
    text = model._forward._executables.lower(model.params, inputs, ()).as_text()
    print(variant, hashlib.sha256(text.encode()).hexdigest())
"""


def _program_fingerprints(hash_seed: int) -> dict[str, str]:
    """The fingerprints of tiny Gemma 3's traced program with and without the patch that
    orders its layer types, traced in one process under ``hash_seed``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "TTPU_COMPILE_CACHE": "off"}
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM_FINGERPRINTS],
        env=env, capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent,
    )
    return dict(line.split() for line in result.stdout.strip().splitlines()[-2:])


def test_traced_program_is_the_same_in_every_process() -> None:
    # Gemma 3 builds one rotary table per layer type by iterating set(layer_types); these
    # two hash seeds iterate that set in opposite orders.
    first, second = (_program_fingerprints(seed) for seed in (1, 2))
    assert first["unpatched"] != second["unpatched"], "the seeds should trace differently without the patch"
    assert first["patched"] == second["patched"]


def test_stable_set_order_is_scoped_to_tracing() -> None:
    """The modeling module's ``set`` is ttpu's only while ttpu traces; eager code of the
    same module sees the builtin before and after."""
    import sys

    from architectures import ARCHITECTURES

    from ttpu.patches import tracing_scope
    from ttpu.patches.ordering import StableOrderSet

    arch = next(a for a in ARCHITECTURES if a.name == "gemma3_text")
    module = arch.build()
    modeling = sys.modules[type(module).__module__]
    model = AutoModelForTPU.from_model(module)
    assert "stable_layer_type_order" in [p.name for p in model.patches]
    assert "set" not in vars(modeling)
    with tracing_scope(module):
        assert modeling.set is StableOrderSet
    assert "set" not in vars(modeling)
    model(**{k: v for k, v in arch.make_inputs(module).items()})
    assert "set" not in vars(modeling)


@pytest.mark.parametrize("patched", [True, False], ids=["patched", "unpatched"])
def test_generate_with_a_local_window_matches_transformers(patched: bool, monkeypatch) -> None:
    """GPT-Neo's local layers (window 4) read their mask rows at the queries' cache
    positions: the tokens of a left-padded batch equal transformers' past the window, and
    differ without the patch (every step would read the mask's last row: no window)."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    if not patched:
        monkeypatch.setattr(registry, "PATCHES", [p for p in PATCHES if not p.name.startswith("gpt_neo.")])
    config = GPTNeoConfig(
        vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=4, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    module = GPTNeoForCausalLM(config).eval()
    ids = np.array([[0, 0, 5, 17, 33], [7, 8, 9, 10, 11]])
    mask = (np.arange(5) >= np.array([[2], [0]])).astype(np.int64)
    settings = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = module.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **settings).numpy()
    actual = AutoModelForTPU.from_model(module).generate(ids, attention_mask=mask, **settings)
    assert np.array_equal(actual, expected) == patched


@pytest.mark.parametrize(
    "model_type, changes",
    [
        ("gpt_neo", {}),  # global layers and local ones of an 8-position window, unscaled scores
        ("falcon", {}),  # multi-query
        ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),  # grouped queries
        ("falcon", {"alibi": True}),  # ALiBi in place of rotary positions (Falcon-RW)
        ("gpt_neox_japanese", {}),  # rotary on part of each head
        ("bloom", {}),  # ALiBi, no position ids
        ("mpt", {"n_heads": 6, "d_model": 48, "initializer_range": 0.3}),  # ALiBi over 6 heads (interleaved slopes)
        ("xglm", {}),  # sinusoidal positions from a table grown by the cache's length
        ("trocr", {}),  # learned positions numbered from the cache's length
        ("mvp", {}),  # the same, and an attention module shared with its encoder
        ("git", {}),  # BERT's names; its cached step reads the cache's length, which the paged step gives none
    ],
    ids=["gpt_neo", "falcon-mqa", "falcon-gqa", "falcon-alibi", "gpt_neox_japanese", "bloom", "mpt", "xglm", "trocr", "mvp",
         "git"],
)
def test_modules_that_compute_attention_themselves_are_paged(model_type: str, changes: dict[str, Any]) -> None:
    """Attention modules that compute their scores themselves reach the serving engine's
    paged attention through their patched forwards (without, the engine recomputes
    whole sequences): transformers' greedy tokens with chunked prefill beside decodes."""
    eager, model = tiny_causal_lm(model_type, **changes)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16, block_size=4))
    assert engine.runner.recompute_reason is None and engine.kv.prefix_caching
    if "num_kv_heads" in changes:  # grouped keys pooled as such, not broadcast to every query head
        assert {pool.shape[2] for pool in engine.runner.cache.pools} == {2 * changes["num_kv_heads"]}
    batch = prompts()
    assert serve(engine, batch) == [expected_tokens(eager, p) for p in batch]


def test_a_model_with_a_cache_of_its_own_keeps_a_standard_one() -> None:
    """MiniMax keeps its lightning-attention states in a cache class of its own; patched,
    they live in transformers' standard linear-attention cache layers, which the engine
    keeps in a state slot per request beside its attention layers' pools (without the
    patches it recomputes whole sequences): transformers' greedy tokens (on its own
    cache), the new prompts split over steps by a 48-token budget and prefilled in
    lightning blocks of 8 tokens."""
    eager, model = tiny_causal_lm("minimax", block_size=8)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=48, block_size=4))
    assert engine.runner.recompute_reason is None and engine.runner.has_states
    layer_types = eager.config.layer_types
    assert len(engine.runner.cache.pools) == layer_types.count("full_attention") < len(layer_types)
    batch = prompts()
    assert serve(engine, batch) == [expected_tokens(eager, p) for p in batch]
    assert engine.kv.used_state_slots == 0


@pytest.mark.parametrize("first_layer", ["full_attention", "linear_attention"])
def test_minimax_on_a_standard_cache_decodes_from_its_state(first_layer: str) -> None:
    """Patched MiniMax over transformers' DynamicCache and StaticCache (eager): a prompt,
    then one token at a time, gives the logits of the whole sequence run at once. Its
    lightning layers decode from the state their prefill left, which they mark as there
    (transformers marks it on a convolution update, which they make none of); without
    the mark each decode starts from an empty state."""
    from transformers import DynamicCache, StaticCache

    from ttpu.compat import CACHE_KEYWORD
    from ttpu.patches import apply_patches

    second = "linear_attention" if first_layer == "full_attention" else "full_attention"
    stock, _ = tiny_causal_lm("minimax", block_size=4, layer_types=[first_layer, second])
    patched = copy.deepcopy(stock)
    apply_patches(patched)
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, 100, (2, 12)))
    positions = torch.arange(12).expand(2, -1)
    with torch.no_grad():
        expected = stock(ids).logits[:, 8:]
        for cache in (DynamicCache(config=patched.config), StaticCache(config=patched.config, max_cache_len=12)):
            run = functools.partial(patched, use_cache=True, **{CACHE_KEYWORD: cache})
            run(ids[:, :8], position_ids=positions[:, :8])  # the prefill: lightning blocks of 4
            actual = torch.cat([run(ids[:, i : i + 1], position_ids=positions[:, i : i + 1]).logits
                                for i in range(8, 12)], dim=1)
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
