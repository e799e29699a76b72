"""Each registered patch is needed (the model fails without it) and exact (matches eager)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

from ttpu import AutoModelForTPU
from ttpu.errors import CompilationError
from ttpu.patches import PATCHES, registry


def longcat() -> LongcatFlashForCausalLM:
    config = LongcatFlashConfig(
        vocab_size=128, hidden_size=64, ffn_hidden_size=64, expert_ffn_hidden_size=32,
        num_layers=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        zero_expert_num=2, moe_topk=2, kv_lora_rank=32, q_lora_rank=32,
        qk_rope_head_dim=8, head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return LongcatFlashForCausalLM(config).eval()


def test_every_patch_documents_itself() -> None:
    for patch in PATCHES:
        assert patch.reason and patch.test.startswith("tests/test_patches.py::")
        assert patch.transformers_versions


def test_longcat_flash_matches_eager() -> None:
    reference = longcat()
    model = AutoModelForTPU.from_model(longcat())
    assert [p.name for p in model.patches] == ["longcat_flash.dense_experts"]
    ids = np.random.default_rng(0).integers(1, 128, (2, 9))
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids)).logits.numpy()
    actual = np.asarray(model(input_ids=ids).logits)
    assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 1e-5


def test_longcat_flash_fails_without_its_patch(monkeypatch) -> None:
    monkeypatch.setattr(registry, "PATCHES", [])
    model = AutoModelForTPU.from_model(longcat())
    with pytest.raises(CompilationError, match="LongcatFlashExperts"):
        model(input_ids=np.ones((1, 4), np.int64))


def test_patches_outside_their_transformers_versions_are_not_applied(monkeypatch) -> None:
    patch = PATCHES[0]
    monkeypatch.setattr(registry.transformers, "__version__", "4.57.0")
    assert not patch.is_applicable(longcat())
